"""Starts the real centraldb-mfa binary on a fresh database (SQLite file, or a fresh PostgreSQL
schema) for the interop tests (live_server.py, shared with the Python client's tests), and gives
them the README's Python snippets to run.

Environment (set by scripts/interop): CENTRALDB_BIN, CENTRALDB_TEST_BACKEND and
CENTRALDB_TEST_POSTGRES_URL (see live_server.py), and
  INTEROP_LIBS    comma-separated libraries this venv must have: garth, garth-ng, garminconnect
                  (the tests of the others are skipped)
"""

import re

import pytest
from live_server import ROOT, require_lib, running_server


@pytest.fixture
def needs():
    """needs("garth-ng"): skip unless this venv is meant for that library; fail if it should be
    there and is not."""

    def check(lib: str) -> None:
        require_lib(lib, "INTEROP_LIBS")

    return check


def readme_snippet(name: str) -> str:
    """The ```python block that follows `<!-- interop:NAME -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- interop:" + re.escape(name) + r" -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet marked <!-- interop:{name} -->"
    return m.group(1)


def run_snippets(*names: str) -> dict:
    """Runs README snippets (the common one first) and returns their namespace."""
    ns: dict = {"__name__": "readme_snippet"}
    for name in ("common",) + names:
        exec(compile(readme_snippet(name), f"README.md:{name}", "exec"), ns)
    return ns


@pytest.fixture(scope="session")
def server():
    with running_server("cdb-interop-", "cdbi_") as srv:
        yield {"base": f"http://{srv['addr']}/api/v1", "api_key": srv["api_key"]}


@pytest.fixture
def snippets(server, monkeypatch):
    """The README snippets, pointed at the test server."""
    monkeypatch.setenv("CDB_URL", server["base"])
    monkeypatch.setenv("CDB_API_KEY", server["api_key"])
    return run_snippets
