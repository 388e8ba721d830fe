"""python-garminconnect 0.3.x: load a ready ``Garmin`` for a user, write its DI tokens back with
compare-and-set, and a ``refresh`` for ``ensure_fresh`` that uses the library's own DI refresh
(``Client._refresh_di_token``, the rotating ``di_refresh_token`` grant).

garminconnect refreshes by itself once the DI token is within 900 s of expiry (and swallows the
errors of that refresh, so a rotated token could be lost). :func:`load_garmin` hands out clients
valid for at least 1800 s, so a worker that loads a client per job never reaches that margin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import garminconnect as _gc
    from garminconnect.client import Client as _DIClient
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("centraldb_mfa.adapters.garminconnect needs garminconnect==0.3.*") from err

from ..client import CentralDB
from ..errors import CentralDBError

__all__ = ["load_garmin", "save_garmin", "make_refresh", "refresh", "NotRefreshable", "MIN_VALID_SECONDS"]

LIBRARY_MARGIN_SECONDS = 900
MIN_VALID_SECONDS = 1800


class NotRefreshable(CentralDBError):
    """The stored login has no ``di_refresh_token`` (Garmin's web JWT fallback): log in again."""


ClientFactory = Callable[[], _DIClient]


def _body(client: _DIClient) -> dict[str, Any]:
    return {"kind": "garminconnect", "garminconnect_dump": client.dumps()}


def make_refresh(client_factory: ClientFactory | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A ``refresh`` for ``ensure_fresh``: loads the stored dump into ``client_factory()``
    (default ``garminconnect.client.Client()``), runs the library's DI refresh, and returns the
    new PUT body (``garminconnect_dump``)."""

    def refresh_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
        dump = bundle.get("garminconnect_dump")
        if dump is None:
            raise ValueError("read the bundle with representation='garminconnect_dump'")
        client = (client_factory or _DIClient)()
        client.loads(dump)
        if not client.di_refresh_token or not client.di_client_id:
            raise NotRefreshable("this login has no DI refresh token: log in again")
        client._refresh_di_token()  # the library's own refresh; raises when Garmin refuses
        return _body(client)

    return refresh_bundle


refresh = make_refresh()


def load_garmin(
    db: CentralDB,
    user_id: str,
    *,
    min_valid_seconds: float = MIN_VALID_SECONDS,
    holder: str | None = None,
    client_factory: ClientFactory | None = None,
) -> tuple[_gc.Garmin, int]:
    """A ``Garmin`` whose DI token is valid for at least ``min_valid_seconds`` (never less than
    the library's own 900 s margin plus a minute), refreshed through ``ensure_fresh`` when needed,
    and the bundle version for :func:`save_garmin`."""
    bundle = db.ensure_fresh(
        user_id,
        make_refresh(client_factory),
        min_valid_seconds=max(min_valid_seconds, LIBRARY_MARGIN_SECONDS + 60),
        holder=holder,
        representation="garminconnect_dump",
    )
    garmin = _gc.Garmin()
    if client_factory is not None:
        garmin.client = client_factory()
    garmin.client.loads(bundle["garminconnect_dump"])
    return garmin, int(bundle["version"])


def save_garmin(db: CentralDB, user_id: str, garmin: _gc.Garmin, *, version: int | None = None) -> dict[str, Any]:
    """Store the DI tokens (``garmin.client.dumps()``); with ``version`` a compare-and-set."""
    return db.put_tokens(user_id, _body(garmin.client), if_match=version)
