"""Starts the real centraldb-mfa binary on a fresh database (SQLite file, or a fresh PostgreSQL
schema) for the interop tests, and gives them the README's Python snippets to run.

Environment (set by scripts/interop):
  CENTRALDB_BIN                  the binary (default target/debug/centraldb-mfa)
  CENTRALDB_TEST_BACKEND         sqlite (default) or postgres
  CENTRALDB_TEST_POSTGRES_URL    default postgres://postgres@127.0.0.1:5432/test
  INTEROP_LIBS                   comma-separated libraries this venv must have: garth, garth-ng,
                                 garminconnect (the tests of the others are skipped)
"""

import json
import os
import re
import secrets
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def expected_libs() -> set[str]:
    return {x.strip() for x in os.environ.get("INTEROP_LIBS", "").split(",") if x.strip()}


def installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture
def needs():
    """needs("garth-ng"): skip unless this venv is meant for that library; fail if it should be
    there and is not."""

    def check(lib: str) -> None:
        if lib not in expected_libs():
            pytest.skip(f"{lib} is tested in another virtual environment")
        # garth 0.8 and garth-ng install the same import name: tell them apart by distribution.
        assert installed(lib), f"{lib} is not installed in this virtual environment"
        if lib == "garth":
            assert not installed("garth-ng"), "garth and garth-ng cannot share a virtual environment"

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


def _psql(url: str, sql: str) -> None:
    subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True, capture_output=True)


@pytest.fixture(scope="session")
def server():
    binary = os.environ.get("CENTRALDB_BIN", str(ROOT / "target" / "debug" / "centraldb-mfa"))
    backend = os.environ.get("CENTRALDB_TEST_BACKEND", "sqlite")
    data = tempfile.TemporaryDirectory(prefix="cdb-interop-")
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
    if backend == "postgres":
        base = os.environ.get("CENTRALDB_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
        schema = f"cdbi_{int(time.time())}_{secrets.token_hex(6)}"
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
        yield {"base": f"http://{addr[0]}/api/v1", "api_key": admin_key}
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
def snippets(server, monkeypatch):
    """The README snippets, pointed at the test server."""
    monkeypatch.setenv("CDB_URL", server["base"])
    monkeypatch.setenv("CDB_API_KEY", server["api_key"])
    return run_snippets
