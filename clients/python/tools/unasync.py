"""Generates src/centraldb_mfa/aio.py (AsyncCentralDB) from client.py (CentralDB).

    python tools/unasync.py           write aio.py
    python tools/unasync.py --check   exit 1 if aio.py is not what client.py gives

Every method of the client class except ``__init__`` becomes ``async``, calls to them are awaited,
httpx.Client becomes httpx.AsyncClient, time.sleep becomes asyncio.sleep, and a line marked
``# unasync: maybe-await`` awaits its call's result when it is awaitable (so ``refresh`` may be a
plain function or a coroutine function).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "centraldb_mfa"


def transform(text: str) -> str:
    sync_only = {"__init__"}
    methods = set(re.findall(r"^    def (\w+)\(", text, re.M)) - sync_only
    out = text
    out = out.replace(
        '"""The synchronous client: every v1 route',
        '"""GENERATED from client.py by tools/unasync.py: do not edit.\n\nThe asyncio client: every v1 route',
    )
    out = out.replace(
        "``aio.py`` is generated from this file by ``tools/unasync.py``: edit this one, then run\n"
        "``python tools/unasync.py`` (a test checks that the two agree).\n",
        "Edit client.py, then run ``python tools/unasync.py``.\n",
    )
    out = out.replace("from collections.abc import Callable, Iterator", "from collections.abc import AsyncIterator, Awaitable, Callable")
    out = out.replace("import time\n", "import asyncio\nimport inspect\nimport time\n", 1)
    out = out.replace("Iterator[", "AsyncIterator[")
    out = out.replace("Callable[[Bundle], dict[str, Any]]", "Callable[[Bundle], dict[str, Any] | Awaitable[dict[str, Any]]]")
    out = out.replace("class CentralDB:", "class AsyncCentralDB:")
    out = out.replace("-> CentralDB:", "-> AsyncCentralDB:")
    out = out.replace("httpx.Client", "httpx.AsyncClient")
    out = out.replace("def __enter__(", "def __aenter__(").replace("def __exit__(", "def __aexit__(")
    methods |= {"__aenter__", "__aexit__"}
    methods -= {"__enter__", "__exit__"}
    out = out.replace("self._http.close()", "await self._http.aclose()")
    out = out.replace("self._http.request(", "await self._http.request(")
    out = out.replace("time.sleep(", "await asyncio.sleep(")
    out = out.replace("The synchronous client", "The asyncio client")

    def asyncify(m: re.Match[str]) -> str:
        return f"    async def {m.group(1)}(" if m.group(1) in methods else m.group(0)

    out = re.sub(r"^    def (\w+)\(", asyncify, out, flags=re.M)
    # iter_audit_events is an async generator: called without await.
    call_methods = methods - {"iter_audit_events"}
    out = re.sub(
        r"(?<!await )self\.(\w+)\(",
        lambda m: f"await self.{m.group(1)}(" if m.group(1) in call_methods else m.group(0),
        out,
    )
    out = re.sub(
        r"^(\s*)(\w+) = (.*)  # unasync: maybe-await$",
        r"\1\2 = \3\n\1if inspect.isawaitable(\2):\n\1    \2 = await \2",
        out,
        flags=re.M,
    )
    return out


def main() -> int:
    generated = transform((SRC / "client.py").read_text())
    target = SRC / "aio.py"
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != generated:
            print("aio.py is out of date: run python tools/unasync.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
