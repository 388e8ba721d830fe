"""Fixtures for the centraldb_mfa tests: the real centraldb-mfa binary on a fresh database
(SQLite file, or a fresh PostgreSQL schema; tests/interop/live_server.py, shared with the interop
tests), a client for it, and the Garmin libraries of this virtual environment with Garmin's
endpoints stubbed (garmin_stub.py).

Environment (set by scripts/pyclient): CENTRALDB_BIN, CENTRALDB_TEST_BACKEND and
CENTRALDB_TEST_POSTGRES_URL (see live_server.py), and
  PYCLIENT_LIBS    comma-separated libraries this venv must have: garth, garth-ng, garminconnect
                   (the tests of the others are skipped)
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from centraldb_mfa import CentralDB

ROOT = Path(__file__).resolve().parents[3]
ALL_LIBS = ("garth", "garth-ng", "garminconnect")

# The "start the real binary" fixture the interop tests use too.
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from live_server import require_lib, running_server  # noqa: E402


@pytest.fixture(scope="session")
def server() -> Iterator[dict[str, str]]:
    with running_server("cdb-pyclient-", "cdbpy_") as srv:
        yield {"url": f"http://{srv['addr']}", "api_key": srv["api_key"], "backend": srv["backend"]}


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
    require_lib(name, "PYCLIENT_LIBS")
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
