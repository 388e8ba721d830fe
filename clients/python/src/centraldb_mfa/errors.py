"""Typed exceptions for centraldb-mfa's problem+json errors (RFC 9457).

Every error answer of the service carries a ``code``; :func:`problem_from_response` turns it into
the matching subclass of :class:`ProblemError`, with the HTTP status, the problem's members and
any extra members (``current_version``, ``holder``, ``attempts_remaining``, ...) as attributes.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "CentralDBError",
    "ProblemError",
    "Unauthenticated",
    "Forbidden",
    "ValidationFailed",
    "NotFound",
    "PayloadTooLarge",
    "Unavailable",
    "TooManyRequests",
    "IdempotencyKeyReused",
    "IdempotencyKeyInUse",
    "TokensNotFound",
    "ReauthRequired",
    "VersionConflict",
    "LeaseHeld",
    "LeaseLost",
    "TooManyChallenges",
    "TooManyFailures",
    "InvalidCode",
    "ChallengeLocked",
    "ChallengeExpired",
    "ChallengeNotPending",
    "DuplicateCode",
    "AttemptNotFound",
    "AttemptResolved",
    "InvalidTransition",
    "InternalError",
    "RefreshTimeout",
    "problem_from_response",
]


class CentralDBError(Exception):
    """Base class of every error this package raises on purpose."""


class ProblemError(CentralDBError):
    """An ``application/problem+json`` answer (or any non-2xx answer) from the service.

    ``status`` is the HTTP status, ``code`` the problem's ``code`` (``None`` if the body was not
    problem+json), ``extra`` the members beyond type/title/status/detail/code, also readable as
    attributes (``err.current_version``). ``retry_after`` is the ``Retry-After`` header in
    seconds, when there was one.
    """

    code_name: str | None = None

    def __init__(
        self,
        status: int,
        code: str | None,
        *,
        title: str | None = None,
        detail: str | None = None,
        type: str | None = None,
        extra: dict[str, Any] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.type = type
        self.extra: dict[str, Any] = dict(extra or {})
        self.retry_after = retry_after
        self.request_id = request_id
        super().__init__(f"{status} {code or title or 'error'}: {detail or ''}".rstrip(": "))

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose the problem's extra members.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)


class Unauthenticated(ProblemError):
    """401: missing or unknown API key."""


class Forbidden(ProblemError):
    """403: the API key lacks the scope."""


class ValidationFailed(ProblemError):
    """422 ``validation_failed``: bad input; ``field`` names it when known."""


class NotFound(ProblemError):
    """404 for a challenge, session, route... (``not_found``)."""


class PayloadTooLarge(ProblemError):
    """413 ``payload_too_large``."""


class Unavailable(ProblemError):
    """503 ``unavailable`` (retried automatically, raised once the retries are used up)."""


class TooManyRequests(ProblemError):
    """429 ``too_many_requests``."""


class IdempotencyKeyReused(ProblemError):
    """422: the same ``Idempotency-Key`` was sent with a different request."""


class IdempotencyKeyInUse(ProblemError):
    """409: the first request with this ``Idempotency-Key`` is still running."""


class TokensNotFound(ProblemError):
    """404 ``tokens_not_found``: nothing is stored for this user (log in)."""


class ReauthRequired(ProblemError):
    """410 ``reauth_required``: invalidated or past its refresh expiry; ``reason`` says why."""


class VersionConflict(ProblemError):
    """412 ``version_conflict``: the stored version is ``current_version``, not the one given."""


class LeaseHeld(ProblemError):
    """409 ``lease_held``: another holder (``holder``) has the refresh lease until ``expires_at``."""


class LeaseLost(ProblemError):
    """409 ``lease_lost``: this fence is no longer the live lease; nothing was written."""


class TooManyChallenges(ProblemError):
    """429 ``too_many_challenges``: the user has 3 pending challenges."""


class TooManyFailures(ProblemError):
    """429 ``too_many_failures``: the user's failure budget is used up."""


class InvalidCode(ProblemError):
    """400 ``invalid_code`` (service verifier); ``attempts_remaining`` says how many are left."""


class ChallengeLocked(ProblemError):
    """423 ``challenge_locked``: no attempts left; start the login over."""


class ChallengeExpired(ProblemError):
    """410 ``challenge_expired``."""


class ChallengeNotPending(ProblemError):
    """409 ``challenge_not_pending``: verified, consumed or cancelled (``challenge_status``)."""


class DuplicateCode(ProblemError):
    """409 ``duplicate_code``: this code was tried already; no attempt was used."""


class AttemptNotFound(ProblemError):
    """404 ``attempt_not_found``."""


class AttemptResolved(ProblemError):
    """409 ``attempt_resolved``: this attempt's result was reported already."""


class InvalidTransition(ProblemError):
    """409 ``invalid_transition``: the session cannot move there from its state."""


class InternalError(ProblemError):
    """500 ``internal_error``."""


class RefreshTimeout(CentralDBError):
    """``ensure_fresh`` waited longer than its ``timeout`` for a usable bundle."""


_BY_CODE: dict[str, type[ProblemError]] = {
    "unauthenticated": Unauthenticated,
    "forbidden": Forbidden,
    "validation_failed": ValidationFailed,
    "not_found": NotFound,
    "payload_too_large": PayloadTooLarge,
    "unavailable": Unavailable,
    "too_many_requests": TooManyRequests,
    "idempotency_key_reused": IdempotencyKeyReused,
    "idempotency_key_in_use": IdempotencyKeyInUse,
    "tokens_not_found": TokensNotFound,
    "reauth_required": ReauthRequired,
    "version_conflict": VersionConflict,
    "lease_held": LeaseHeld,
    "lease_lost": LeaseLost,
    "too_many_challenges": TooManyChallenges,
    "too_many_failures": TooManyFailures,
    "invalid_code": InvalidCode,
    "challenge_locked": ChallengeLocked,
    "challenge_expired": ChallengeExpired,
    "challenge_not_pending": ChallengeNotPending,
    "duplicate_code": DuplicateCode,
    "attempt_not_found": AttemptNotFound,
    "attempt_resolved": AttemptResolved,
    "invalid_transition": InvalidTransition,
    "internal_error": InternalError,
}

_BY_STATUS: dict[int, type[ProblemError]] = {
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: TooManyRequests,
    500: InternalError,
    503: Unavailable,
}

for _code, _cls in _BY_CODE.items():
    _cls.code_name = _code


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` as seconds (delta form only; an HTTP date is ignored)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


def problem_from_response(response: httpx.Response) -> ProblemError:
    """The typed exception for a non-2xx answer."""
    body: dict[str, Any] = {}
    if "json" in response.headers.get("Content-Type", ""):
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            body = parsed
    code = body.get("code") if isinstance(body.get("code"), str) else None
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(response.status_code, ProblemError)
    extra = {k: v for k, v in body.items() if k not in ("type", "title", "status", "detail", "code")}
    return cls(
        response.status_code,
        code,
        title=body.get("title") or response.reason_phrase or None,
        detail=body.get("detail"),
        type=body.get("type"),
        extra=extra,
        retry_after=retry_after_seconds(response),
        request_id=response.headers.get("X-Request-Id"),
    )
