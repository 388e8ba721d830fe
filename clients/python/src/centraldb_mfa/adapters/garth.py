"""garth 0.8.0 and garth-ng 1.1.0 (the same import name ``garth``): load a ready client for a
user, write a client's tokens back with compare-and-set, and a ``refresh`` for ``ensure_fresh``
that uses the library's own refresh (garth 0.8: ``Client.refresh_oauth2()``, the OAuth1 →
OAuth2 exchange; garth-ng: ``Client.refresh_token()``, the DI refresh-token grant).

Bundles are kept in the library's own ``dumps()`` form (``garth_dump``), which the service
returns in the form the writing library loads.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any

try:
    import garth as _garth
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("centraldb_mfa.adapters.garth needs garth==0.8.* or garth-ng==1.1.*") from err

from ..client import CentralDB

__all__ = ["IS_GARTH_NG", "load_client", "save_client", "make_refresh", "refresh", "MIN_VALID_SECONDS"]


def _is_ng() -> bool:
    try:
        metadata.version("garth-ng")
        return True
    except metadata.PackageNotFoundError:
        return False


IS_GARTH_NG = _is_ng()

# Refresh well ahead of expiry: the libraries refresh by themselves only once the access token
# has expired, and garminconnect's margin is 900 s; 1800 s keeps every worker on the service's
# side of both, so no library ever refreshes behind the service's back.
MIN_VALID_SECONDS = 1800

ClientFactory = Callable[[], "_garth.Client"]


def _body(client: _garth.Client) -> dict[str, Any]:
    return {"kind": "garth", "garth_dump": client.dumps()}


def make_refresh(client_factory: ClientFactory | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``refresh`` for ``ensure_fresh``: loads the stored dump into ``client_factory()`` (default
    ``garth.Client()``; pass your own to set proxies or sessions), refreshes with the library's
    own call, and returns the new PUT body (``garth_dump``)."""

    def refresh_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
        client = (client_factory or _garth.Client)()
        dump = bundle.get("garth_dump")
        if dump is None:
            raise ValueError("read the bundle with representation='garth_dump'")
        client.loads(dump)
        if IS_GARTH_NG:
            client.refresh_token()
        else:
            client.refresh_oauth2()
        return _body(client)

    return refresh_bundle


refresh = make_refresh()


def load_client(
    db: CentralDB,
    user_id: str,
    *,
    min_valid_seconds: float = MIN_VALID_SECONDS,
    holder: str | None = None,
    client_factory: ClientFactory | None = None,
) -> tuple[_garth.Client, int]:
    """A ``garth.Client`` whose access token is valid for at least ``min_valid_seconds`` (refreshed
    through ``ensure_fresh`` when needed: one refresh across all workers), and the bundle version
    to pass to :func:`save_client` as the compare-and-set handle."""
    bundle = db.ensure_fresh(
        user_id,
        make_refresh(client_factory),
        min_valid_seconds=min_valid_seconds,
        holder=holder,
        representation="garth_dump",
    )
    client = (client_factory or _garth.Client)()
    client.loads(bundle["garth_dump"])
    return client, int(bundle["version"])


def save_client(
    db: CentralDB, user_id: str, client: _garth.Client, *, version: int | None = None
) -> dict[str, Any]:
    """Store the client's tokens. With ``version`` it is a compare-and-set (VersionConflict when
    another worker wrote since); without, an unconditional write (a new login). Returns the
    metadata (``version``)."""
    return db.put_tokens(user_id, _body(client), if_match=version)
