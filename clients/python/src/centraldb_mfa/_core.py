"""Pieces shared by the sync and the asyncio client: URL and header building, the retry policy,
the freshness rule of ``ensure_fresh`` and the default lease holder name. No I/O here."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from .errors import ProblemError, problem_from_response, retry_after_seconds

API_PREFIX = "/api/v1"
USER_AGENT = "centraldb-mfa-python/0.1.0"

# Statuses retried (when the answer allows it): overload, rate limits, and a keyed write whose
# first copy is still running (409 idempotency_key_in_use, which always sends Retry-After: 1).
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """How requests are retried on 503 / 429 / 409 ``idempotency_key_in_use`` and on connection
    errors. ``attempts`` counts the first try. A ``Retry-After`` longer than
    ``max_retry_after`` is not waited for: the error is raised at once (e.g. a 429
    ``too_many_challenges`` that asks for minutes). Without ``Retry-After`` the delay is an
    exponential backoff with jitter from ``base_delay`` up to ``max_delay``."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_retry_after: float = 30.0

    def backoff(self, attempt: int) -> float:
        delay: float = min(self.max_delay, self.base_delay * (2**attempt))
        return delay * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(attempts=1)


def api_base(base_url: str) -> str:
    """``http://host:8080`` or ``http://host:8080/api/v1`` → ``http://host:8080/api/v1``."""
    base = base_url.rstrip("/")
    if not base.endswith(API_PREFIX):
        base += API_PREFIX
    return base


def seg(value: str | int) -> str:
    """One path segment, percent-encoded."""
    return quote(str(value), safe="")


def etag(version: int | str) -> str:
    """``3`` or ``'3'`` or ``'"3"'`` → ``'"3"'``."""
    s = str(version)
    return s if s.startswith('"') or s.startswith('W/"') else f'"{s}"'


def new_idempotency_key() -> str:
    return f"cdbpy-{uuid.uuid4()}"


def default_holder() -> str:
    """A lease holder name unique to this call: host, pid, thread, random. The service gives a
    holder its own live lease back, so two concurrent callers must never share one."""
    host = socket.gethostname()[:60] or "host"
    return f"{host}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:12]}"[:128]


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def is_fresh(bundle: dict[str, Any], min_valid_seconds: float) -> bool:
    """A bundle is fresh when its status is ``valid`` and its access token is valid for more than
    ``min_valid_seconds`` (a bundle without a known expiry, e.g. non-JWT DI tokens, counts as
    fresh while its status is ``valid``)."""
    if bundle.get("status") != "valid":
        return False
    expires = parse_time(bundle.get("access_expires_at"))
    return expires is None or expires - time.time() > min_valid_seconds


def lease_wait_seconds(expires_at: str | None, remaining: float) -> int:
    """How long a waiter long-polls while another holder refreshes: until shortly after that
    lease lapses (then it re-reads and may take over), at most 25 s, at least 1 s."""
    until = parse_time(expires_at)
    wait = 25.0 if until is None else until - time.time() + 0.5
    return int(max(1.0, min(25.0, wait, remaining)) + 0.999)


def retry_delay(policy: RetryPolicy, attempt: int, response: httpx.Response | None) -> float | None:
    """Seconds to wait before the next attempt, or None when this answer must not be retried."""
    if attempt + 1 >= policy.attempts:
        return None
    if response is None:  # transport error
        return policy.backoff(attempt)
    code = None
    if response.status_code == 409:
        if "json" not in response.headers.get("Content-Type", ""):
            return None
        try:
            code = response.json().get("code")
        except ValueError:
            return None
        if code != "idempotency_key_in_use":
            return None
    elif response.status_code not in RETRY_STATUSES:
        return None
    after = retry_after_seconds(response)
    if after is None:
        return policy.backoff(attempt)
    if after > policy.max_retry_after:
        return None
    return after + random.random() * 0.1


def raise_for(response: httpx.Response, ok: tuple[int, ...]) -> None:
    if response.status_code not in ok:
        raise problem_from_response(response)


def json_or_empty(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 204 or not response.content:
        return {}
    body = response.json()
    return body if isinstance(body, dict) else {"value": body}


__all__ = ["RetryPolicy", "NO_RETRY", "ProblemError"]
