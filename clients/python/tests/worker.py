"""A GarminSync worker process for the multi-process tests: ``threads`` threads call
``ensure_fresh`` (through the library adapter's refresh, Garmin stubbed) for one user, all
starting once the file ``--go`` exists (after announcing ``GO.ready.PID``), and print one JSON line per thread:
``{"ok": true, "access_token": ..., "version": ...}`` or ``{"ok": false, "error": "LeaseLost"}``.
Exit status 0 when every thread succeeded, 3 otherwise.

    python worker.py URL API_KEY USER LIB LOG --threads 4 --go FILE [--delay S] [--lease-ttl N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from garmin_stub import FACTORIES, LIB_REPRESENTATION, FakeGarmin, access_token, adapter  # noqa: E402

from centraldb_mfa import CentralDB  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("url", "api_key", "user", "lib", "log"):
        p.add_argument(name)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--go", default=None, help="announce readiness as GO.ready.PID, start once GO exists")
    p.add_argument("--delay", type=float, default=0.3)
    p.add_argument("--lease-ttl", type=int, default=30)
    a = p.parse_args()
    fake = FakeGarmin(Path(a.log), delay=a.delay)
    refresh = adapter(a.lib).make_refresh(FACTORIES[a.lib](fake))
    results: list[dict[str, object]] = []
    lock = threading.Lock()

    def run() -> None:
        with CentralDB(a.url, a.api_key, timeout=30) as db:
            while a.go and not os.path.exists(a.go):
                time.sleep(0.002)
            try:
                b = db.ensure_fresh(
                    a.user, refresh, lease_ttl=a.lease_ttl, representation=LIB_REPRESENTATION[a.lib]
                )
                r: dict[str, object] = {"ok": True, "access_token": access_token(a.lib, b), "version": b["version"]}
            except Exception as err:  # reported to the test
                r = {"ok": False, "error": type(err).__name__, "detail": str(err)}
        with lock:
            results.append(r)

    threads = [threading.Thread(target=run) for _ in range(a.threads)]
    for t in threads:
        t.start()
    if a.go:
        Path(f"{a.go}.ready.{os.getpid()}").touch()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r), flush=True)
    return 0 if all(r["ok"] for r in results) else 3


if __name__ == "__main__":
    sys.exit(main())
