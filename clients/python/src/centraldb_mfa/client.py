"""The synchronous client: every v1 route as a method, retries and ``Idempotency-Key`` built in,
and ``ensure_fresh``, the one-call refresh coordination (lease + fence + long-poll).

``aio.py`` is generated from this file by ``tools/unasync.py``: edit this one, then run
``python tools/unasync.py`` (a test checks that the two agree).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from . import _core
from ._core import RetryPolicy, etag, seg
from .errors import LeaseHeld, ProblemError, RefreshTimeout

Bundle = dict[str, Any]


class CentralDB:
    """Client for one centraldb-mfa service.

    ``base_url`` is the service root (``http://centraldb-mfa:8080``) or its ``/api/v1``.
    ``timeout`` applies to every request (a long-poll adds its wait to it). ``retry`` says how
    503 / 429 / connection errors are retried; every write carries an ``Idempotency-Key``
    (generated unless given) that its retries reuse, so a retried write never acts twice.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = _core.api_base(base_url)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout)
        self._headers = {"Authorization": f"Bearer {api_key}", "User-Agent": _core.USER_AGENT}

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> CentralDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport -----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        headers: dict[str, str | None] | None = None,
        write: bool = False,
        idempotency_key: str | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
        timeout: float | None = None,
        root: bool = False,
    ) -> httpx.Response:
        url = (self.base_url[: -len(_core.API_PREFIX)] if root else self.base_url) + path
        hdrs = dict(self._headers)
        if headers:
            hdrs.update({k: v for k, v in headers.items() if v is not None})
        if write:
            hdrs["Idempotency-Key"] = idempotency_key or _core.new_idempotency_key()
        query = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, url, params=query, json=json, headers=hdrs, timeout=timeout or self.timeout
                )
            except httpx.TransportError:
                delay = _core.retry_delay(self.retry, attempt, None)
                if delay is None:
                    raise
            else:
                delay = _core.retry_delay(self.retry, attempt, response)
                if delay is None:
                    _core.raise_for(response, ok)
                    return response
            time.sleep(delay)
            attempt += 1

    # ---- token bundles -------------------------------------------------------------------

    def get_tokens(self, user_id: str, *, representation: str | None = None) -> Bundle:
        """GET the bundle (metadata + secrets, or ``garth_dump`` / ``garminconnect_dump`` with
        ``representation``). Raises TokensNotFound (404) or ReauthRequired (410)."""
        r = self._request("GET", f"/users/{seg(user_id)}/tokens", params={"representation": representation})
        return _core.json_or_empty(r)

    def wait_for_tokens(
        self, user_id: str, newer_than: int, *, wait_seconds: int = 25, representation: str | None = None
    ) -> Bundle | None:
        """Long-poll: the bundle as soon as its version is above ``newer_than``; ``None`` when
        the wait (0..30 s) ends first (304)."""
        r = self._request(
            "GET",
            f"/users/{seg(user_id)}/tokens",
            params={"representation": representation, "newer_than": newer_than, "wait_seconds": wait_seconds},
            ok=(200, 304),
            timeout=self.timeout + wait_seconds,
        )
        return None if r.status_code == 304 else _core.json_or_empty(r)

    def get_token_metadata(self, user_id: str) -> Bundle:
        """Metadata only (no decryption)."""
        return _core.json_or_empty(self._request("GET", f"/users/{seg(user_id)}/tokens/metadata"))

    def put_tokens(
        self,
        user_id: str,
        body: dict[str, Any],
        *,
        if_match: int | str | None = None,
        if_none_match: bool = False,
        fence: int | None = None,
        idempotency_key: str | None = None,
    ) -> Bundle:
        """Store or replace the bundle; returns the metadata (``version``). ``if_match`` makes it a
        compare-and-set (VersionConflict on a stale version), ``fence`` writes under a lease
        (LeaseLost when it lapsed)."""
        headers = {
            "If-Match": etag(if_match) if if_match is not None else None,
            "If-None-Match": "*" if if_none_match else None,
            "X-Lease-Fence": str(fence) if fence is not None else None,
        }
        r = self._request(
            "PUT", f"/users/{seg(user_id)}/tokens", json=body, headers=headers, write=True, idempotency_key=idempotency_key
        )
        return _core.json_or_empty(r)

    def invalidate_tokens(
        self, user_id: str, reason: str, *, if_match: int | str | None = None, fence: int | None = None
    ) -> None:
        """Destroy the secrets and mark the user ``reauth_required`` with ``reason``."""
        headers = {
            "If-Match": etag(if_match) if if_match is not None else None,
            "X-Lease-Fence": str(fence) if fence is not None else None,
        }
        self._request(
            "POST", f"/users/{seg(user_id)}/tokens/invalidate", json={"reason": reason}, headers=headers, write=True
        )

    def delete_tokens(self, user_id: str, *, if_match: int | str | None = None, fence: int | None = None) -> None:
        """Log out: remove the bundle, end sessions, challenges and the lease."""
        headers = {
            "If-Match": etag(if_match) if if_match is not None else None,
            "X-Lease-Fence": str(fence) if fence is not None else None,
        }
        self._request("DELETE", f"/users/{seg(user_id)}/tokens", headers=headers, write=True)

    def auth_status(self, user_id: str) -> dict[str, Any]:
        """``{"user_id", "status": VALID|MISSING|EXPIRED|MFA_PENDING, "tokens", "session"}``."""
        return _core.json_or_empty(self._request("GET", f"/users/{seg(user_id)}/auth-status"))

    # ---- refresh leases ------------------------------------------------------------------

    def acquire_lease(self, user_id: str, holder: str, *, ttl_seconds: int | None = None) -> dict[str, Any]:
        """``{"lease_id", "fence", "holder", "expires_at", "version"}``; LeaseHeld (with
        ``holder``, ``expires_at``) while another holder's lease is live."""
        body: dict[str, Any] = {"holder": holder}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        return _core.json_or_empty(
            self._request("POST", f"/users/{seg(user_id)}/tokens/lease", json=body, write=True)
        )

    def release_lease(self, user_id: str, fence: int) -> None:
        """Release the lease early (LeaseLost if that fence is not the live lease)."""
        self._request(
            "DELETE", f"/users/{seg(user_id)}/tokens/lease", headers={"X-Lease-Fence": str(fence)}, write=True
        )

    def _release_quietly(self, user_id: str, fence: int) -> None:
        try:
            self.release_lease(user_id, fence)
        except (ProblemError, httpx.HTTPError):
            pass  # it lapses by itself; the fence stops any late write

    def ensure_fresh(
        self,
        user_id: str,
        refresh: Callable[[Bundle], dict[str, Any]],
        *,
        min_valid_seconds: float = 1800,
        holder: str | None = None,
        lease_ttl: int = 30,
        timeout: float = 120.0,
        representation: str | None = None,
    ) -> Bundle:
        """A bundle whose access token is valid for more than ``min_valid_seconds``.

        If the stored one is not, exactly one caller (across threads, processes and hosts) gets
        the lease and runs ``refresh(bundle)`` (the GET body; it returns the new PUT body), which
        is written with ``If-Match`` and the lease's fence; everyone else long-polls for that
        write and returns it. A ``refresh`` that raises leaves the store untouched, releases the
        lease and re-raises. A refresher whose lease lapsed (and was taken over) gets
        ``LeaseLost`` and writes nothing. ``holder`` must be unique per concurrent caller
        (default: host:pid:thread:random). Raises TokensNotFound / ReauthRequired when there is
        nothing to refresh, RefreshTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        bundle = self.get_tokens(user_id, representation=representation)
        while True:
            if _core.is_fresh(bundle, min_valid_seconds):
                return bundle
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RefreshTimeout(f"no fresh bundle for {user_id!r} within {timeout} s")
            try:
                lease = self.acquire_lease(user_id, holder or _core.default_holder(), ttl_seconds=lease_ttl)
            except LeaseHeld as held:
                wait = _core.lease_wait_seconds(held.extra.get("expires_at"), remaining)
                newer = self.wait_for_tokens(
                    user_id, int(bundle["version"]), wait_seconds=wait, representation=representation
                )
                bundle = newer if newer is not None else self.get_tokens(user_id, representation=representation)
                continue
            fence = int(lease["fence"])
            if lease.get("version") != bundle.get("version"):
                # written since we read it: read again (it may be fresh now)
                self._release_quietly(user_id, fence)
                bundle = self.get_tokens(user_id, representation=representation)
                continue
            try:
                new_body = refresh(dict(bundle))  # unasync: maybe-await
            except BaseException:
                self._release_quietly(user_id, fence)
                raise
            try:
                meta = self.put_tokens(user_id, new_body, if_match=bundle["version"], fence=fence)
            except ProblemError as err:
                if err.code != "lease_lost":
                    self._release_quietly(user_id, fence)
                raise
            return {**new_body, **meta}

    # ---- MFA challenges ------------------------------------------------------------------

    def create_challenge(
        self,
        user_id: str,
        *,
        method: str,
        verifier: str,
        session_id: str | None = None,
        destination: str | None = None,
        code: str | None = None,
        ttl_seconds: int | None = None,
        max_attempts: int | None = None,
        resume_state: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """POST /mfa/challenges. With ``verifier="service"`` and no ``code`` the answer carries the
        generated ``code`` (once)."""
        body = {
            "user_id": user_id,
            "method": method,
            "verifier": verifier,
            "session_id": session_id,
            "destination": destination,
            "code": code,
            "ttl_seconds": ttl_seconds,
            "max_attempts": max_attempts,
            "resume_state": resume_state,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return _core.json_or_empty(
            self._request("POST", "/mfa/challenges", json=body, write=True, idempotency_key=idempotency_key)
        )

    def get_challenge(self, challenge_id: str) -> dict[str, Any]:
        return _core.json_or_empty(self._request("GET", f"/mfa/challenges/{seg(challenge_id)}"))

    def verify_challenge(self, challenge_id: str, code: str) -> dict[str, Any]:
        """Service verifier: ``{"status": "verified", ...}``, or InvalidCode / ChallengeLocked /
        ChallengeExpired / ChallengeNotPending."""
        return _core.json_or_empty(
            self._request("POST", f"/mfa/challenges/{seg(challenge_id)}/verify", json={"code": code}, write=True)
        )

    def submit_attempt(self, challenge_id: str, code: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """External verifier: reserve one attempt for ``code``: ``{"attempt", "attempts_remaining",
        "resume_state"}``. DuplicateCode when this code was tried already (no attempt used)."""
        return _core.json_or_empty(
            self._request(
                "POST",
                f"/mfa/challenges/{seg(challenge_id)}/attempts",
                json={"code": code},
                write=True,
                idempotency_key=idempotency_key,
            )
        )

    def report_attempt(self, challenge_id: str, attempt: int, success: bool) -> dict[str, Any]:
        """External verifier: what Garmin answered for attempt ``attempt``; returns the challenge."""
        return _core.json_or_empty(
            self._request(
                "POST",
                f"/mfa/challenges/{seg(challenge_id)}/attempts/{int(attempt)}/result",
                json={"success": bool(success)},
                write=True,
            )
        )

    def consume_challenge(self, challenge_id: str) -> dict[str, Any]:
        """``verified`` → ``consumed``, exactly once (ChallengeNotPending after)."""
        return _core.json_or_empty(
            self._request("POST", f"/mfa/challenges/{seg(challenge_id)}/consume", write=True)
        )

    def cancel_challenge(self, challenge_id: str) -> None:
        self._request("DELETE", f"/mfa/challenges/{seg(challenge_id)}", write=True)

    # ---- login sessions ------------------------------------------------------------------

    def create_session(
        self, user_id: str, *, ttl_seconds: int | None = None, client: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": user_id}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if client is not None:
            body["client"] = client
        return _core.json_or_empty(self._request("POST", "/sessions", json=body, write=True))

    def get_session(self, session_id: str) -> dict[str, Any]:
        return _core.json_or_empty(self._request("GET", f"/sessions/{seg(session_id)}"))

    def list_sessions(self, user_id: str) -> list[dict[str, Any]]:
        """The user's active sessions, newest first."""
        r = self._request("GET", f"/users/{seg(user_id)}/sessions")
        body = r.json()
        if isinstance(body, dict):
            return list(body.get("sessions", []))
        return list(body)

    def transition_session(self, session_id: str, to: str, *, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"to": to}
        if reason is not None:
            body["reason"] = reason
        return _core.json_or_empty(
            self._request("POST", f"/sessions/{seg(session_id)}/transition", json=body, write=True)
        )

    def cancel_session(self, session_id: str) -> None:
        self._request("DELETE", f"/sessions/{seg(session_id)}", write=True)

    # ---- audit ---------------------------------------------------------------------------

    def audit_events(
        self,
        *,
        user_id: str | None = None,
        type: str | None = None,
        outcome: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        after: int | None = None,
    ) -> dict[str, Any]:
        """One page: ``{"events": [...], "next_after"}`` (oldest first)."""
        params = {
            "user_id": user_id,
            "type": type,
            "outcome": outcome,
            "since": since,
            "until": until,
            "limit": limit,
            "after": after,
        }
        return _core.json_or_empty(self._request("GET", "/audit/events", params=params))

    def iter_audit_events(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every matching event, following ``next_after`` page by page."""
        after = filters.pop("after", None)
        while True:
            page = self.audit_events(after=after, **filters)
            for event in page.get("events", []):
                yield event
            after = page.get("next_after")
            if after is None or not page.get("events"):
                return

    def verify_audit(self) -> dict[str, Any]:
        """``{"ok", "events_checked", "first_bad_seq"?}`` (scope ``admin``)."""
        return _core.json_or_empty(self._request("GET", "/audit/verify"))

    def audit_checkpoint(self) -> dict[str, Any]:
        """A signed checkpoint of every audit chain's head (scope ``audit:read``): keep it
        elsewhere; ``centraldb-mfa audit verify --checkpoint FILE`` checks the log against it."""
        return _core.json_or_empty(self._request("GET", "/audit/checkpoint"))

    def audit_public_keys(self) -> dict[str, Any]:
        """``{"keys": [{"key_id", "algorithm", "public_key"}]}``: the checkpoints' Ed25519 keys."""
        return _core.json_or_empty(self._request("GET", "/audit/public-key"))

    # ---- operations (no auth needed) -----------------------------------------------------

    def healthz(self) -> dict[str, Any]:
        return _core.json_or_empty(self._request("GET", "/healthz", root=True))

    def readyz(self) -> dict[str, Any]:
        """The readiness answer; Unavailable (after retries) while not ready."""
        return _core.json_or_empty(self._request("GET", "/readyz", root=True))

    def metrics(self) -> str:
        r = self._request("GET", "/metrics", root=True)
        return r.text
