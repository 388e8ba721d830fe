"""The MFA login across processes, for logins whose code Garmin checks (``verifier: external``).

Process A (the request with e-mail and password) starts the login at Garmin, which stops at
"enter the code"; :meth:`ExternalMFA.start` stores that half-finished login's state in the service
(encrypted) and links it to a login session. Process B (the later request with the code; any
worker, any host) calls :meth:`ExternalMFA.submit_code`: it reserves one attempt for that code
(a code already tried is refused by the service and never reaches Garmin), gives the stored state
and the code to ``finish`` (your call to Garmin), reports the result, and on success stores the
tokens, consumes the challenge and marks the session ``authenticated`` (:meth:`complete`).

State serialisation: :func:`pack_state` / :func:`unpack_state` (pickle + zlib + base64; at most
16 KiB encoded). Unpickling runs code chosen by whoever wrote the bytes: unpickle only states your
own code stored through an ``mfa`` key you trust (see the README's pickle trust boundary).
"""

from __future__ import annotations

import base64
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .client import CentralDB
from .errors import DuplicateCode

T = TypeVar("T")

__all__ = ["ExternalMFA", "LoginStarted", "CodeResult", "pack_state", "unpack_state"]


def pack_state(state: Any) -> str:
    """Any picklable login state → the ``resume_state`` string (zlib-compressed, base64)."""
    return base64.b64encode(zlib.compress(pickle.dumps(state))).decode("ascii")


def unpack_state(resume_state: str) -> Any:
    """The inverse of :func:`pack_state`. Only for states your own code stored."""
    return pickle.loads(zlib.decompress(base64.b64decode(resume_state)))  # noqa: S301


@dataclass(frozen=True)
class LoginStarted:
    """What the first request hands to the browser (e.g. in a form): the ids to send back."""

    user_id: str
    session_id: str
    challenge_id: str
    expires_at: str


@dataclass
class CodeResult(Generic[T]):
    """``status``: ``verified`` (``value`` is what ``finish`` returned), ``wrong_code`` (Garmin
    refused it; ``attempts_remaining`` left; 0 means the challenge is now failed: start over), or
    ``duplicate_code`` (tried before; nothing was sent to Garmin, no attempt used)."""

    status: str
    attempts_remaining: int | None = None
    value: T | None = None
    error: BaseException | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "verified"


class ExternalMFA:
    """Helpers for the external-verifier flow on top of a :class:`CentralDB` (scopes ``mfa``,
    ``sessions``, and ``tokens:write`` for :meth:`complete`)."""

    def __init__(self, db: CentralDB) -> None:
        self.db = db

    def start(
        self,
        user_id: str,
        state: Any,
        *,
        method: str = "email",
        destination: str | None = None,
        session_id: str | None = None,
        ttl_seconds: int | None = None,
        max_attempts: int | None = None,
        packed: bool = False,
    ) -> LoginStarted:
        """Store the half-finished login. ``state`` is packed with :func:`pack_state` unless
        ``packed`` (then it must already be the string to store). Without ``session_id`` a new
        login session is created (it supersedes the user's older ones). TooManyChallenges /
        TooManyFailures (429, with ``retry_after``) when the user is over a limit."""
        if session_id is None:
            session_id = str(self.db.create_session(user_id)["id"])
        challenge = self.db.create_challenge(
            user_id,
            method=method,
            verifier="external",
            session_id=session_id,
            destination=destination,
            ttl_seconds=ttl_seconds,
            max_attempts=max_attempts,
            resume_state=state if packed else pack_state(state),
        )
        return LoginStarted(user_id, session_id, str(challenge["id"]), str(challenge["expires_at"]))

    def submit_code(
        self,
        challenge_id: str,
        code: str,
        finish: Callable[[Any, str], T],
        *,
        refused: tuple[type[BaseException], ...] = (Exception,),
        packed: bool = False,
    ) -> CodeResult[T]:
        """Try ``code`` once. ``finish(state, code)`` is your call to Garmin with the stored state
        (unpacked unless ``packed``); it returns the login's result, or raises one of ``refused``
        when Garmin refused the code (any other exception propagates and leaves the attempt
        unanswered: the service then lets the challenge run out). Raises ChallengeLocked,
        ChallengeExpired, ChallengeNotPending when this login cannot go on (start over)."""
        try:
            attempt = self.db.submit_attempt(challenge_id, code)
        except DuplicateCode:
            return CodeResult("duplicate_code")
        n = int(attempt["attempt"])
        remaining = int(attempt["attempts_remaining"])
        raw = attempt["resume_state"]
        state = raw if packed else unpack_state(raw)
        try:
            value = finish(state, code)
        except refused as err:
            self.db.report_attempt(challenge_id, n, False)
            return CodeResult("wrong_code", remaining, error=err)
        self.db.report_attempt(challenge_id, n, True)
        return CodeResult("verified", remaining, value=value)

    def complete(
        self, login: LoginStarted | tuple[str, str, str], tokens: dict[str, Any]
    ) -> dict[str, Any]:
        """After ``verified``: store ``tokens`` (a PUT body), consume the challenge (which
        destroys the stored state) and move the session to ``authenticated``. ``login`` is the
        :class:`LoginStarted` or ``(user_id, session_id, challenge_id)``. Returns the tokens'
        metadata."""
        if isinstance(login, LoginStarted):
            user_id, session_id, challenge_id = login.user_id, login.session_id, login.challenge_id
        else:
            user_id, session_id, challenge_id = login
        meta = self.db.put_tokens(user_id, tokens)
        self.db.consume_challenge(challenge_id)
        self.db.transition_session(session_id, "authenticated")
        return meta

    def abandon(self, login: LoginStarted) -> None:
        """The user gave up: cancel the challenge and the session."""
        self.db.cancel_challenge(login.challenge_id)
        self.db.cancel_session(login.session_id)
