"""The real centraldb-mfa binary on a fresh database, for the Python suites that run it: the
interop tests (tests/interop/conftest.py) and the Python client's tests
(clients/python/tests/conftest.py, which puts this folder on sys.path). Not a test file.

Environment (set by scripts/interop and scripts/pyclient):
  CENTRALDB_BIN                  the binary (default target/debug/centraldb-mfa)
  CENTRALDB_TEST_BACKEND         sqlite (default) or postgres
  CENTRALDB_TEST_POSTGRES_URL    default postgres://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def expected_libs(variable: str) -> set[str]:
    """The comma-separated libraries the environment variable `variable` says this venv has."""
    return {x.strip() for x in os.environ.get(variable, "").split(",") if x.strip()}


def installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def require_lib(lib: str, variable: str) -> None:
    """Skips unless this venv is meant for `lib` (per `variable`); fails if it should be there
    and is not."""
    if lib not in expected_libs(variable):
        pytest.skip(f"{lib} is tested in another virtual environment")
    # garth 0.8 and garth-ng install the same import name: tell them apart by distribution.
    assert installed(lib), f"{lib} is not installed in this virtual environment"
    if lib == "garth":
        assert not installed("garth-ng"), "garth and garth-ng cannot share a virtual environment"


def _psql(url: str, sql: str) -> None:
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, capture_output=True)


@contextmanager
def running_server(data_prefix: str, schema_prefix: str) -> Iterator[dict[str, str]]:
    """Starts `serve` on 127.0.0.1:0 with a fresh data dir (`data_prefix`) and, on PostgreSQL, a
    fresh schema (`schema_prefix` + time + random); yields addr (host:port), api_key (the
    bootstrap admin key) and backend; stops the server and drops the schema after."""
    binary = os.environ.get("CENTRALDB_BIN", str(ROOT / "target" / "debug" / "centraldb-mfa"))
    backend = os.environ.get("CENTRALDB_TEST_BACKEND", "sqlite")
    data = tempfile.TemporaryDirectory(prefix=data_prefix)
    admin_key = secrets.token_urlsafe(32)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CENTRALDB_DATA_DIR": data.name,
        "CENTRALDB_LISTEN": "127.0.0.1:0",
        "CENTRALDB_LOG_FORMAT": "json",
        "RUST_LOG": "info",
        "CENTRALDB_BOOTSTRAP_ADMIN_KEY": admin_key,
    }
    schema = None
    base = os.environ.get("CENTRALDB_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
    if backend == "postgres":
        schema = f"{schema_prefix}{int(time.time())}_{secrets.token_hex(6)}"
        _psql(base, f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in base else "?"
        env["CENTRALDB_DATABASE_URL"] = f"{base}{sep}options=-c%20search_path%3D{schema}"
        key = subprocess.run([binary, "keygen", "--id", "k1"], check=True, capture_output=True, text=True)
        env["CENTRALDB_ENCRYPTION_KEYS"] = key.stdout.strip()
    proc = subprocess.Popen(
        [binary, "serve"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    addr: list[str] = []
    ready = threading.Event()
    log: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            try:
                v = json.loads(line)
            except ValueError:
                continue
            fields = v.get("fields", {}) if isinstance(v, dict) else {}
            if fields.get("message") == "centraldb-mfa listening":
                addr.append(fields["addr"])
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(60):
            raise RuntimeError("centraldb-mfa did not start:\n" + "".join(log[-50:]))
        yield {"addr": addr[0], "api_key": admin_key, "backend": backend}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        data.cleanup()
        if schema:
            _psql(base, f"DROP SCHEMA {schema} CASCADE")
