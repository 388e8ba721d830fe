"""centraldb-mfa's Python client: ``CentralDB`` (sync) and ``AsyncCentralDB`` (asyncio), typed
problem+json exceptions, ``ensure_fresh`` (one refresh across all workers), the external MFA
helpers (:mod:`centraldb_mfa.mfa`) and the library adapters (:mod:`centraldb_mfa.adapters`)."""

from ._core import NO_RETRY, RetryPolicy
from .aio import AsyncCentralDB
from .client import Bundle, CentralDB
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .mfa import CodeResult, ExternalMFA, LoginStarted, pack_state, unpack_state

__version__ = "0.1.0"

__all__ = [
    "AsyncCentralDB",
    "Bundle",
    "CentralDB",
    "CodeResult",
    "ExternalMFA",
    "LoginStarted",
    "NO_RETRY",
    "RetryPolicy",
    "pack_state",
    "unpack_state",
    *_errors_all,
]
