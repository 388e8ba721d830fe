"""Fixtures for the centraldb_mfa tests: the real centraldb-mfa binary on a fresh database
(SQLite file, or a fresh PostgreSQL schema), a client for it, and the Garmin libraries of this
virtual environment with Garmin's endpoints stubbed (garmin_stub.py).

Environment (set by scripts/pyclient):
  CENTRALDB_BIN                  the binary (default target/debug/centraldb-mfa)
  CENTRALDB_TEST_BACKEND         sqlite (default) or postgres
  CENTRALDB_TEST_POSTGRES_URL    default postgres://postgres@127.0.0.1:5432/test
  PYCLIENT_LIBS                  comma-separated libraries this venv must have: garth, garth-ng,
                                 garminconnect (the tests of the others are skipped)
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
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from centraldb_mfa import CentralDB

ROOT = Path(__file__).resolve().parents[3]
ALL_LIBS = ("garth", "garth-ng", "garminconnect")


def expected_libs() -> set[str]:
    return {x.strip() for x in os.environ.get("PYCLIENT_LIBS", "").split(",") if x.strip()}


def installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def _psql(url: str, sql: str) -> None:
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, capture_output=True)


@pytest.fixture(scope="session")
def server() -> Iterator[dict[str, str]]:
    binary = os.environ.get("CENTRALDB_BIN", str(ROOT / "target" / "debug" / "centraldb-mfa"))
    backend = os.environ.get("CENTRALDB_TEST_BACKEND", "sqlite")
    data = tempfile.TemporaryDirectory(prefix="cdb-pyclient-")
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
        schema = f"cdbpy_{int(time.time())}_{secrets.token_hex(6)}"
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
        yield {"url": f"http://{addr[0]}", "api_key": admin_key, "backend": backend}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        data.cleanup()
        if schema:
            _psql(base, f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def db(server: dict[str, str]) -> Iterator[CentralDB]:
    with CentralDB(server["url"], server["api_key"]) as client:
        yield client


@pytest.fixture
def user() -> str:
    return f"u-{secrets.token_hex(6)}"


@pytest.fixture(params=ALL_LIBS)
def lib(request: pytest.FixtureRequest) -> str:
    """Each Garmin library this virtual environment is meant for (the others are skipped)."""
    name: str = request.param
    if name not in expected_libs():
        pytest.skip(f"{name} is tested in another virtual environment")
    assert installed(name), f"{name} is not installed in this virtual environment"
    if name == "garth":
        assert not installed("garth-ng"), "garth and garth-ng cannot share a virtual environment"
    return name


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "slow: takes a few seconds (lease lapses)")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests that use no Garmin library (the contract, MFA, async) run in one virtual environment
    only: PYCLIENT_CORE=off skips them in the others."""
    if os.environ.get("PYCLIENT_CORE", "on") != "off":
        return
    skip = pytest.mark.skip(reason="library-independent: run in the first virtual environment")
    for item in items:
        if "lib" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
