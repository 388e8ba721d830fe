"""ensure_fresh with the real libraries (Garmin stubbed) against the real service: one refresh
across threads and processes, everyone gets its tokens, failures leave the store untouched, and a
refresher whose lease lapsed cannot overwrite the newer write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from garmin_stub import FACTORIES, LIB_REPRESENTATION, FakeGarmin, access_token, adapter, seed_body

from centraldb_mfa import CentralDB, LeaseHeld, LeaseLost, ReauthRequired, TokensNotFound, VersionConflict

HERE = Path(__file__).parent


def seed(db: CentralDB, user: str, lib: str, expires_in: int) -> dict[str, Any]:
    return db.put_tokens(user, seed_body(lib, expires_in))


def stored(db: CentralDB, user: str, lib: str) -> dict[str, Any]:
    return db.get_tokens(user, representation=LIB_REPRESENTATION[lib])


def test_a_fresh_bundle_is_returned_without_refreshing(db, user, lib, tmp_path):
    seed(db, user, lib, expires_in=3 * 3600)
    fake = FakeGarmin(tmp_path / "garmin.log")
    refresh = adapter(lib).make_refresh(FACTORIES[lib](fake))
    got = db.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib])
    assert got["version"] == 1
    assert access_token(lib, got).startswith("eyJ") if lib == "garminconnect" else access_token(lib, got) == "acc-seed"
    assert fake.calls("start") == [], "Garmin was called for a fresh bundle"
    # Inside min_valid_seconds it refreshes.
    got = db.ensure_fresh(user, refresh, min_valid_seconds=4 * 3600, representation=LIB_REPRESENTATION[lib])
    assert got["version"] == 2 and len(fake.calls()) == 1


def test_16_threads_make_exactly_one_refresh_and_all_get_its_tokens(db, server, user, lib, tmp_path):
    seed(db, user, lib, expires_in=600)  # inside the 1800 s default margin
    fake = FakeGarmin(tmp_path / "garmin.log", delay=0.3)
    refresh = adapter(lib).make_refresh(FACTORIES[lib](fake))
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def run() -> None:
        with CentralDB(server["url"], server["api_key"]) as mine:
            barrier.wait()
            try:
                results.append(mine.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib]))
            except Exception as err:
                results.append(err)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [r for r in results if isinstance(r, Exception)], results
    issued = fake.calls()
    assert len(issued) == 1, f"{len(issued)} refreshes at Garmin"
    assert len(fake.calls("start")) == 1
    tokens = {access_token(lib, r) for r in results}
    assert len(results) == 16 and tokens == {issued[0]["access_token"]}
    assert {r["version"] for r in results} == {2}
    now = stored(db, user, lib)
    assert now["version"] == 2 and access_token(lib, now) == issued[0]["access_token"]


def spawn_worker(server, user: str, lib: str, log: Path, **opts: Any) -> subprocess.Popen[str]:
    args = [sys.executable, str(HERE / "worker.py"), server["url"], server["api_key"], user, lib, str(log)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_results(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, list[dict[str, Any]]]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_4_processes_make_exactly_one_refresh_and_all_get_its_tokens(db, server, user, lib, tmp_path):
    seed(db, user, lib, expires_in=600)
    log = tmp_path / "garmin.log"
    go = tmp_path / "go"
    procs = [spawn_worker(server, user, lib, log, threads=4, go=go, delay=0.5) for _ in range(4)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert len(list(tmp_path.glob("go.ready.*"))) == 4, "the workers did not start"
    go.touch()  # all 16 threads in 4 processes start now
    results = []
    for p in procs:
        code, res = worker_results(p)
        assert code == 0, res
        results += res
    issued = FakeGarmin(log).calls()
    assert len(issued) == 1, f"{len(issued)} refreshes at Garmin"
    assert len(results) == 16
    assert {r["access_token"] for r in results} == {issued[0]["access_token"]}
    assert {r["version"] for r in results} == {2}
    assert access_token(lib, stored(db, user, lib)) == issued[0]["access_token"]


def test_a_raising_refresh_leaves_the_store_untouched_and_releases_the_lease(db, user, lib, tmp_path):
    seed(db, user, lib, expires_in=600)
    before = stored(db, user, lib)
    fake = FakeGarmin(tmp_path / "garmin.log", fail=True)
    refresh = adapter(lib).make_refresh(FACTORIES[lib](fake))
    with pytest.raises(Exception) as info:
        db.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib])
    assert not isinstance(info.value, LeaseHeld)
    assert len(fake.calls("refused")) == 1
    after = stored(db, user, lib)
    assert after["version"] == 1 and after == {**before, "last_used_at": after["last_used_at"]}
    # The lease was released: another holder gets one at once (201, a new fence).
    lease = db.acquire_lease(user, "someone-else", ttl_seconds=5)
    assert lease["fence"] == 2 and lease["holder"] == "someone-else"
    db.release_lease(user, lease["fence"])


@pytest.mark.slow
def test_a_lapsed_lease_never_overwrites_the_newer_write(db, server, user, lib, tmp_path):
    """Thread A gets the lease (1 s) and stalls in its refresh; B takes over once it lapses and
    writes; A's late write is refused with LeaseLost and the store keeps B's tokens."""
    seed(db, user, lib, expires_in=600)
    fake = FakeGarmin(tmp_path / "garmin.log")
    lib_refresh = adapter(lib).make_refresh(FACTORIES[lib](fake))
    stalled, go_on = threading.Event(), threading.Event()

    def slow_refresh(bundle: dict[str, Any]) -> dict[str, Any]:
        body = lib_refresh(bundle)  # Garmin answered...
        stalled.set()
        go_on.wait(30)  # ...then a long pause (GC, swap) past the lease
        return body

    outcome: list[Any] = []

    def run_a() -> None:
        with CentralDB(server["url"], server["api_key"]) as a:
            try:
                outcome.append(a.ensure_fresh(user, slow_refresh, lease_ttl=1, representation=LIB_REPRESENTATION[lib]))
            except Exception as err:
                outcome.append(err)

    ta = threading.Thread(target=run_a)
    ta.start()
    assert stalled.wait(30)
    b = db.ensure_fresh(user, lib_refresh, representation=LIB_REPRESENTATION[lib])  # waits for the lapse
    go_on.set()
    ta.join(30)
    assert isinstance(outcome[0], LeaseLost), outcome
    issued = fake.calls()
    assert len(issued) == 2
    assert b["version"] == 2 and access_token(lib, b) == issued[1]["access_token"]
    now = stored(db, user, lib)
    assert now["version"] == 2 and access_token(lib, now) == issued[1]["access_token"]


@pytest.mark.slow
def test_a_refresher_killed_or_frozen_mid_refresh_is_taken_over_and_its_late_write_refused(
    db, server, user, lib, tmp_path
):
    seed(db, user, lib, expires_in=600)
    log = tmp_path / "garmin.log"
    fake = FakeGarmin(log)
    # Two workers start together (interpreter start-up is the slow part). The one that gets the
    # lease (2 s) is killed while Garmin is answering; the other takes over once that lease
    # lapses, and is frozen (SIGSTOP) in the middle of its own refresh.
    workers = [spawn_worker(server, user, lib, log, delay=1.5, lease_ttl=2) for _ in range(2)]
    deadline = time.time() + 60
    while not fake.calls("start") and time.time() < deadline:
        time.sleep(0.02)
    assert fake.calls("start"), "no worker reached Garmin"
    first = fake.calls("start")[0]["pid"]
    killed = next(w for w in workers if w.pid == first)
    frozen = next(w for w in workers if w.pid != first)
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    while len(fake.calls("start")) < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert len(fake.calls("start")) == 2, "nobody took over after the lease lapsed"
    assert fake.calls("start")[1]["pid"] == frozen.pid
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        # This process takes over once the frozen one's lease lapses, and writes.
        refresh = adapter(lib).make_refresh(FACTORIES[lib](fake))
        got = db.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib])
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    code, res = worker_results(frozen)
    assert code == 3 and res[0]["error"] == "LeaseLost", res
    issued = fake.calls()
    mine = [e for e in issued if e["pid"] == os.getpid()]
    assert len(mine) == 1 and got["version"] == 2 and access_token(lib, got) == mine[0]["access_token"]
    assert len(issued) == 2, "the frozen worker got tokens from Garmin too, but could not store them"
    now = stored(db, user, lib)
    assert now["version"] == 2 and access_token(lib, now) == mine[0]["access_token"]


def test_nothing_to_refresh_raises_the_service_errors(db, user, lib, tmp_path):
    refresh = adapter(lib).make_refresh(FACTORIES[lib](FakeGarmin(tmp_path / "g.log")))
    with pytest.raises(TokensNotFound):
        db.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib])
    seed(db, user, lib, expires_in=600)
    db.invalidate_tokens(user, "password_changed")
    with pytest.raises(ReauthRequired) as info:
        db.ensure_fresh(user, refresh, representation=LIB_REPRESENTATION[lib])
    assert info.value.reason == "password_changed" and info.value.status == 410


def test_adapter_loads_a_ready_client_and_writes_back_with_compare_and_set(db, user, lib, tmp_path):
    seed(db, user, lib, expires_in=1200)  # past garminconnect's 900 s margin, inside 1800 s
    fake = FakeGarmin(tmp_path / "garmin.log")
    factory = FACTORIES[lib](fake)
    mod = adapter(lib)
    if lib == "garminconnect":
        garmin, version = mod.load_garmin(db, user, client_factory=factory)
        client = garmin.client
        assert not client._token_expires_soon(), "the library would refresh behind the service's back"
        assert client.di_token == fake.calls()[0]["access_token"]
        save = lambda v: mod.save_garmin(db, user, garmin, version=v)  # noqa: E731
    else:
        client, version = mod.load_client(db, user, client_factory=factory)
        assert not client.oauth2_token.expired
        assert client.oauth2_token.expires_at - time.time() > 1800
        assert client.oauth2_token.access_token == fake.calls()[0]["access_token"]
        save = lambda v: mod.save_client(db, user, client, version=v)  # noqa: E731
    assert version == 2 and len(fake.calls()) == 1
    assert save(version)["version"] == 3
    with pytest.raises(VersionConflict) as info:
        save(version)  # stale: another worker wrote version 3
    assert info.value.current_version == 3 and info.value.status == 412


def readme_snippet(name: str) -> str:
    """The ```python block after `<!-- pyclient:NAME -->` in the repository's README.md."""
    import re

    text = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    m = re.search(r"<!-- pyclient:" + re.escape(name) + r" -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet marked <!-- pyclient:{name} -->"
    return m.group(1)


def test_the_readme_three_lines_work(server, db, user, lib, monkeypatch):
    db.put_tokens(user, seed_body(lib, expires_in=3 * 3600, tag="readme"))  # fresh: no Garmin call
    monkeypatch.setenv("CDB_URL", server["url"])
    monkeypatch.setenv("CDB_API_KEY", server["api_key"])
    snippet = readme_snippet("garminconnect" if lib == "garminconnect" else "garth")
    assert len(snippet.strip().splitlines()) == 3
    ns: dict[str, Any] = {"os": os, "user_id": user}
    exec(compile(snippet, "README.md", "exec"), ns)
    if lib == "garminconnect":
        dump = db.get_tokens(user, representation="garminconnect_dump")["garminconnect_dump"]
        assert ns["garmin"].client.dumps() == dump
    else:
        assert ns["client"].oauth2_token.access_token == "acc-readme"
    assert ns["version"] == 1
