#!/usr/bin/env python3
"""Key rotation + `rewrap` under load: nothing is lost (real binary, SQLite and PostgreSQL).

Per backend, one deployment (data dir, bootstrap admin key, keys k1 and k2, a fresh PostgreSQL
database) goes through the rotation README.md documents, while load threads keep writing:

  1. `serve` with CENTRALDB_ENCRYPTION_KEYS=k1; seed --users bundles (PUT If-None-Match: *) and
     --challenges external-verifier MFA challenges with a resume state; on half of them one
     attempt is reserved (code A) and answered "failed" by "Garmin", so a tried code exists;
  2. load threads start: PUT (If-Match: "<version>") to random users of the first half (the other
     half stays under k1 until rewrap, so rewrap always has work) + GET of random users of all,
     each write carrying a unique marker; every 2xx is an acknowledged write, every GET is
     checked against what was acknowledged before it was sent;
  3. rotation: SIGTERM, restart with CENTRALDB_ENCRYPTION_KEYS=k2,k1 on the same port; connection
     errors while the server is down are counted as "restart gap" (not acknowledged writes);
  4. `centraldb-mfa rewrap` runs as a separate process with the same env, concurrently with the
     load, to completion (output and duration recorded);
  5. load continues --tail seconds, then stops. Checks: every acknowledged write readable with its
     version and marker; no 5xx at any time; no token_bundles.key_id / challenges.resume_key_id /
     audit_events.chain_key_id left at k1 (direct SQL); `audit verify` (CLI) and
     GET /api/v1/audit/verify ok; the pending challenges' tried code A is still refused (409
     duplicate_code) after the rotation;
  6. restart with CENTRALDB_ENCRYPTION_KEYS=k2 only: it must start; every bundle readable at the
     version checked in 5; every challenge GETs as pending; each challenge replays code A (409
     duplicate_code expected), reserves a new attempt (201, its original resume state comes
     back), is resolved successfully and consumed; audit verify (CLI + HTTP) again.

Under load, any answer other than 2xx (and 412 for a PUT) is a failure (a 500, a 422, a 401,
...), and each load phase (before the restart, restart to end of rewrap, tail) must acknowledge at
least --min-acks writes, so a server refusing every write cannot pass. `--inject-fault` is the
self-test of the checks (`scripts/reliability` runs it and checks it fails for the planted
reasons). `--log-dir DIR` runs every server at RUST_LOG=trace with its output in DIR and
registers the run's secrets (admin key, both keys, every token value sent, resume states, codes)
in DIR/secrets-*.txt for scripts/scan-logs.py.

Exit 1 on any failure. python3 stdlib only; the binary is not built here (cargo build first).

  cargo build && scripts/rotation.py                        # both backends
  scripts/rotation.py --backend sqlite --users 100 --json out.json
"""

import argparse
import http.client
import json
import os
import random
import re
import sys
import threading
import time

import harness
from harness import Deployment, Ledger, Server, log, request, stored_marker

CH = "/api/v1/mfa/challenges"
CODE_A = "111111"  # tried before the rotation on half of the challenges
CODE_B = "222222"  # tried after the rotation (under k2) on the other half
CODE_FINAL = "246802"  # the code that completes every challenge at the end


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {
            "put_acked": 0,
            "put_412": 0,
            "get_ok": 0,
            "restart_gap_errors": 0,  # connection errors while the server was being restarted
            "unknown_outcome": 0,  # PUTs sent (connection open) but unanswered: outcome unknown
            "conn_errors_outside_gap": 0,
        }
        self.status_5xx = {}
        self.other_status = {}
        self.problems = []

    def bump(self, k, n=1):
        with self.lock:
            self.c[k] += n

    def problem(self, p):
        with self.lock:
            self.problems.append(p)

    def status(self, what, st, body):
        with self.lock:
            key = f"{what} {st}"
            if st >= 500:
                self.status_5xx[key] = self.status_5xx.get(key, 0) + 1
                if len(self.problems) < 200:
                    self.problems.append(f"{what} answered {st}: {json.dumps(body)[:300]}")
            else:
                # 2xx, and 412 for a PUT, are counted elsewhere: anything else (422, 401, 404, ...)
                # is as much a failure as a 5xx.
                self.other_status[key] = self.other_status.get(key, 0) + 1
                if len(self.problems) < 200:
                    self.problems.append(f"UNEXPECTED STATUS: {what} answered {st}: {json.dumps(body)[:300]}")


class Gap:
    """Set while the server is deliberately down (between SIGTERM and the next /readyz)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.down = False
        self.epoch = 0  # bumped at each restart start and end

    def set(self, down):
        with self.lock:
            self.down = down
            self.epoch += 1

    def snapshot(self):
        with self.lock:
            return self.down, self.epoch


def load_thread(*a):
    stats = a[5]
    try:
        _load(*a)
    except Exception as e:  # a dead thread would silently thin the load
        stats.problem(f"load thread {a[0]}: {type(e).__name__}: {e}")


def _load(tid, dep, ledger, users, stop, stats, gap, rng):
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    conn = None
    n = 0

    def conn_failed(gap_before):
        down, epoch = gap.snapshot()
        if gap_before[0] or down or gap_before[1] != epoch:
            stats.bump("restart_gap_errors")
            return True
        stats.bump("conn_errors_outside_gap")
        return False

    hot = users[: max(1, len(users) // 2)]  # written to; the other half stays under k1 until rewrap moves it
    while not stop.is_set():
        user = rng.choice(hot)
        with ledger.lock:
            known = ledger.known.get(user, 0)
        n += 1
        marker = f"{dep.backend[:2]}t{tid}n{n}"
        g = gap.snapshot()
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=30)
            try:
                conn.connect()
            except OSError as e:
                # Never reached the server: not a write at all.
                conn.close()
                conn = None
                if not conn_failed(g):
                    stats.problem(f"connect: error outside the restart gap: {e}")
                time.sleep(0.02)
                continue
        try:
            st, body = request(
                None,
                None,
                "PUT",
                f"/api/v1/users/{user}/tokens",
                dep.bundle(marker),
                {**auth, "If-Match": f'"{known}"'},
                conn=conn,
            )
        except (OSError, http.client.HTTPException) as e:
            ledger.unknown_outcome(user, marker)
            stats.bump("unknown_outcome")
            if not conn_failed(g):
                stats.problem(f"PUT {user}: connection error outside the restart gap: {e}")
            conn.close()
            conn = None
            time.sleep(0.02)
            continue
        if 200 <= st < 300:
            if not isinstance(body, dict) or not isinstance(body.get("version"), int):
                stats.problem(f"PUT {user}: 2xx without a version: {body!r}")
            else:
                ledger.ack(user, body["version"], marker)
                stats.bump("put_acked")
        elif st == 412:
            ledger.refuse(user, marker, (body or {}).get("current_version"))
            stats.bump("put_412")
        else:
            ledger.unknown_outcome(user, marker)
            stats.status("PUT", st, body)

        # GET a random user; what it shows must not be older than what was acknowledged before.
        user = rng.choice(users)
        want_v, want_m = ledger.max_ack(user)
        g = gap.snapshot()
        try:
            st, body = request(None, None, "GET", f"/api/v1/users/{user}/tokens", None, auth, conn=conn)
        except (OSError, http.client.HTTPException) as e:
            if not conn_failed(g):
                stats.problem(f"GET {user}: connection error outside the restart gap: {e}")
            conn.close()
            conn = None
            continue
        if st == 200:
            stats.bump("get_ok")
            v, m = int(body["version"]), stored_marker(body)
            if want_v is not None and v < want_v:
                stats.problem(f"GET {user}: version {v} older than acknowledged {want_v}")
            elif want_v is not None and v == want_v and m != want_m:
                stats.problem(f"GET {user}: version {v} holds {m!r}, acknowledged {want_m!r}")
        else:
            stats.status("GET", st, body)
    if conn is not None:
        conn.close()


# --------------------------------------------------------------------------------------------
# Seeding and checks
# --------------------------------------------------------------------------------------------


def parallel(fn, items, threads=8):
    """Runs fn(item, conn) over items on a few threads; returns the list of problems."""
    problems = []
    lock = threading.Lock()
    it = iter(list(items))

    def run():
        conn = None
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                break
            if conn is None:
                conn = http.client.HTTPConnection(*fn.addr, timeout=60)
            try:
                p = fn(item, conn)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = None
                p = f"{item}: {type(e).__name__}: {e}"
            if p:
                with lock:
                    problems.append(p)
        if conn is not None:
            conn.close()

    ts = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return problems


def seed_users(dep, ledger, users):
    auth = {"Authorization": f"Bearer {dep.admin_key}"}

    def put(user, conn):
        marker = f"{dep.backend[:2]}seed-{user}"
        hdr = {**auth, "If-None-Match": "*"}
        st, body = request(None, None, "PUT", f"/api/v1/users/{user}/tokens", dep.bundle(marker), hdr, conn=conn)
        if st not in (200, 201):
            return f"seed PUT {user}: {st} {body}"
        ledger.ack(user, int(body["version"]), marker)
        return None

    put.addr = ("127.0.0.1", dep.port)
    return parallel(put, users)


def create_challenges(dep, n):
    """External-verifier challenges with a resume state; on even ones code A is tried and failed."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    out, problems = [], []
    conn = http.client.HTTPConnection("127.0.0.1", dep.port, timeout=30)
    try:
        for i in range(n):
            resume = f"gAJ9-resume-{dep.backend}-{i}-" + os.urandom(8).hex()
            dep.secret(resume)
            body = {
                "user_id": f"rot-{dep.backend}-ch{i:02d}",
                "method": "sms",
                "destination": "+1 555 123 1234",
                "verifier": "external",
                "ttl_seconds": 600,
                "max_attempts": 5,
                "resume_state": resume,
            }
            st, r = request(None, None, "POST", CH, body, auth, conn=conn)
            if st != 201:
                problems.append(f"create challenge {i}: {st} {r}")
                continue
            ch = {"id": r["id"], "resume": resume, "tried_a": i % 2 == 0}
            if ch["tried_a"]:
                st, a = request(None, None, "POST", f"{CH}/{ch['id']}/attempts", {"code": CODE_A}, auth, conn=conn)
                if st != 201 or a.get("resume_state") != resume:
                    problems.append(f"challenge {i}: attempt with code A: {st} {a}")
                st, a = request(
                    None, None, "POST", f"{CH}/{ch['id']}/attempts/1/result", {"success": False}, auth, conn=conn
                )
                if st != 200 or a.get("status") != "pending":
                    problems.append(f"challenge {i}: failed result: {st} {a}")
            out.append(ch)
    finally:
        conn.close()
    return out, problems


def check_users(dep, ledger, users):
    """GET every user: stored version >= highest acknowledged, marker matches when equal, a newer
    version carries a write of unknown outcome. Returns (lost, problems, stored {user: version})."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    lost, stored, lock = [], {}, threading.Lock()

    def get(user, conn):
        st, body = request(None, None, "GET", f"/api/v1/users/{user}/tokens", None, auth, conn=conn)
        acks, unknown, refused = ledger.view(user)
        if st != 200:
            with lock:
                lost.append(user)
            return f"{user}: GET answered {st}: {body}"
        v, m = int(body["version"]), stored_marker(body)
        with lock:
            stored[user] = (v, m)
        max_ack = max(acks) if acks else None
        if max_ack is not None and v < max_ack:
            with lock:
                lost.append(user)
            return f"{user}: LOST: stored version {v}, acknowledged up to {max_ack}"
        if v == max_ack:
            if m != acks[max_ack]:
                with lock:
                    lost.append(user)
                return f"{user}: version {v} holds {m!r}, the acknowledged write was {acks[max_ack]!r}"
            return None
        if m in refused:
            return f"{user}: version {v} holds {m!r}, a write refused with 412"
        if m not in unknown:
            return f"{user}: version {v} holds {m!r}, not a write of unknown outcome"
        return None

    get.addr = ("127.0.0.1", dep.port)
    problems = parallel(get, users)
    return lost, problems, stored


def audit_checks(dep):
    cli_ok, cli_desc, http_ok, http_desc = harness.audit_verify(dep, "127.0.0.1", dep.port)
    return cli_ok and http_ok, f"cli: {cli_desc}; http: {http_desc}"


def k1_rows(dep):
    return {
        "token_bundles": dep.query_scalar("SELECT COUNT(*) FROM token_bundles WHERE key_id = 'k1'"),
        "challenges": dep.query_scalar("SELECT COUNT(*) FROM challenges WHERE resume_key_id = 'k1'"),
        "audit_events": dep.query_scalar("SELECT COUNT(*) FROM audit_events WHERE chain_key_id = 'k1'"),
    }


def try_code_b(dep, challenges):
    """Code B is tried (and failed by Garmin) under the new key k2, with k1 still held."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    problems = []
    for ch in challenges:
        st, r = request("127.0.0.1", dep.port, "POST", f"{CH}/{ch['id']}/attempts", {"code": CODE_B}, auth)
        if st != 201:
            problems.append(f"challenge {ch['id']}: trying code B under k2: {st} {json.dumps(r)[:200]}")
            continue
        st, r = request(
            "127.0.0.1", dep.port, "POST", f"{CH}/{ch['id']}/attempts/{r['attempt']}/result", {"success": False}, auth
        )
        if st != 200:
            problems.append(f"challenge {ch['id']}: result of code B: {st} {json.dumps(r)[:200]}")
        ch["tried_b"] = True
    return problems


def replay_code_a(dep, challenges, code=None, flag="tried_a", when="before the rotation"):
    """A code tried earlier must still be refused as a duplicate (409 duplicate_code)."""
    code = code or CODE_A
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    problems = []
    for ch in challenges:
        if not ch.get(flag):
            continue
        st, r = request("127.0.0.1", dep.port, "POST", f"{CH}/{ch['id']}/attempts", {"code": code}, auth)
        if st != 409 or (r or {}).get("code") != "duplicate_code":
            problems.append(
                f"challenge {ch['id']}: code tried {when} replayed: {st} {json.dumps(r)[:200]} "
                f"(expected 409 duplicate_code: a replayed code must never reach Garmin)"
            )
            if st == 201:
                # The replay took an attempt; resolve it so the challenge stays usable.
                request(
                    "127.0.0.1",
                    dep.port,
                    "POST",
                    f"{CH}/{ch['id']}/attempts/{r['attempt']}/result",
                    {"success": False},
                    auth,
                )
    return problems


def finish_challenges(dep, challenges):
    """After k1 is gone: GET pending, a new code reserves an attempt returning the original resume
    state, Garmin says yes, consume."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    problems, done = [], 0
    for ch in challenges:
        base = f"{CH}/{ch['id']}"
        st, r = request("127.0.0.1", dep.port, "GET", base, None, auth)
        if st != 200 or r.get("status") != "pending":
            problems.append(f"challenge {ch['id']}: GET {st} {r}")
            continue
        st, a = request("127.0.0.1", dep.port, "POST", f"{base}/attempts", {"code": CODE_FINAL}, auth)
        if st != 201 or a.get("resume_state") != ch["resume"]:
            problems.append(f"challenge {ch['id']}: attempt after rotation: {st} {json.dumps(a)[:200]}")
            continue
        st, r = request("127.0.0.1", dep.port, "POST", f"{base}/attempts/{a['attempt']}/result", {"success": True}, auth)
        if st != 200 or r.get("status") != "verified":
            problems.append(f"challenge {ch['id']}: result: {st} {r}")
            continue
        st, r = request("127.0.0.1", dep.port, "POST", f"{base}/consume", None, auth)
        if st != 200:
            problems.append(f"challenge {ch['id']}: consume: {st} {r}")
            continue
        done += 1
    return problems, done


REWRAP_RE = re.compile(
    r"rewrapped (\d+) ciphertext\(s\) under key '([^']*)'; (\d+) changed concurrently.*?; (\d+) failed to decrypt; "
    r"(?:re-sealed (\d+) audit event\(s\)|(audit chain NOT re-sealed.*))"
)


# --------------------------------------------------------------------------------------------
# One backend
# --------------------------------------------------------------------------------------------


def run_backend(args, backend, workdir):
    t0 = time.monotonic()
    dep = Deployment(
        args,
        backend,
        workdir,
        "rotation",
        key_ids=("k1", "k2"),
        port=harness.free_port(),  # same port across restarts: clients keep going
        env={"CENTRALDB_MFA_MAX_PENDING_PER_USER": "10"},
        extra_secrets=(CODE_A, CODE_B, CODE_FINAL),
    )
    ledger = Ledger()
    stats = Stats()
    gap = Gap()
    users = [f"rot-{backend}-u{i:04d}" for i in range(args.users)]
    s = {
        "backend": backend,
        "users": len(users),
        "challenges": args.challenges,
        "problems": [],
    }
    P = s["problems"]
    log(f"{backend}: data {dep.dir}, port {dep.port}" + (f", database {dep.db_name}" if dep.db_name else ""))

    # 1. keyring {k1}: seed.
    server = Server(dep, "1-k1")
    server.wait_ready(timeout=60)
    t = time.monotonic()
    P.extend(seed_users(dep, ledger, users))
    challenges, cp = create_challenges(dep, args.challenges)
    P.extend(cp)
    s["seed_seconds"] = round(time.monotonic() - t, 2)
    s["k1_rows_before"] = k1_rows(dep)
    log(f"{backend}: seeded {len(users)} users, {len(challenges)} challenges in {s['seed_seconds']} s; "
        f"rows under k1: {s['k1_rows_before']}")

    # 2. load + rotation restart.
    stop = threading.Event()
    rng = random.Random(args.seed)
    threads = [
        threading.Thread(
            target=load_thread,
            args=(i, dep, ledger, users, stop, stats, gap, random.Random(rng.random())),
            daemon=True,
        )
        for i in range(args.threads)
    ]
    load_t0 = time.monotonic()
    for th in threads:
        th.start()
    phase_acks = []  # acknowledged writes per load phase
    acked_before = [0]

    def end_phase(name):
        # A phase must acknowledge --min-acks writes: on a slow machine it waits for them (up to
        # --min-acks-wait s more); a server refusing every write fails.
        deadline = time.monotonic() + args.min_acks_wait
        while True:
            with stats.lock:
                n = stats.c["put_acked"]
            if n - acked_before[0] >= args.min_acks or time.monotonic() >= deadline or stop.is_set():
                break
            time.sleep(0.05)
        phase_acks.append((name, n - acked_before[0]))
        acked_before[0] = n

    try:
        time.sleep(args.warmup)
        end_phase("before the restart")
        gap.set(True)
        t = time.monotonic()
        rc = server.stop()
        if rc != 0:
            P.append(f"server (k1) exited with {rc} on SIGTERM")
        dep.env["CENTRALDB_ENCRYPTION_KEYS"] = f"{dep.keys['k2']},{dep.keys['k1']}"  # README step 2: new key first, old kept
        server = Server(dep, "2-k2k1")
        server.wait_ready(timeout=60)
        gap.set(False)
        s["restart_gap_seconds"] = round(time.monotonic() - t, 2)
        log(f"{backend}: restarted with k2,k1 in {s['restart_gap_seconds']} s")

        # Negative control: before rewrap, a keyring without k1 must be refused (rows still need it).
        rc, out, err = dep.run_cli("audit", "verify", env={"CENTRALDB_ENCRYPTION_KEYS": dep.keys["k2"]})
        s["k2_only_before_rewrap"] = (out + err).strip().splitlines()[-1:] or [f"exit {rc}"]
        if rc == 0 or "'k1'" not in out + err:
            P.append(f"a keyring without k1 was not refused before rewrap: exit {rc}: {(out + err).strip()}")

        # 3. rewrap, concurrently with the load.
        time.sleep(args.pre_rewrap)
        t = time.monotonic()
        rc, out, err = dep.run_cli("rewrap", timeout=args.rewrap_timeout)
        s["rewrap_seconds"] = round(time.monotonic() - t, 2)
        s["rewrap_exit"] = rc
        s["rewrap_output"] = out.strip()
        s["rewrap_stderr"] = err.strip()[-2000:]
        log(f"{backend}: rewrap exit {rc} in {s['rewrap_seconds']} s: {s['rewrap_output']}")
        m = REWRAP_RE.search(out)
        if rc != 0 or not m:
            P.append(f"rewrap failed (exit {rc}): {s['rewrap_output']} {s['rewrap_stderr']}")
        if m:
            s["rewrapped"] = int(m.group(1))
            s["rewrap_active_key"] = m.group(2)
            s["rewrap_changed_concurrently"] = int(m.group(3))
            s["rewrap_failed"] = int(m.group(4))
            s["audit_resealed"] = int(m.group(5)) if m.group(5) else None
            if m.group(2) != "k2" or m.group(6):
                P.append(f"rewrap: unexpected output {m.group(0)!r}")
            if s["rewrapped"] < len(users) // 2:
                P.append(f"rewrap moved only {s['rewrapped']} ciphertext(s): the cold half of the users "
                         f"({len(users) - len(users) // 2} bundles under k1) should all have been rewrapped")

        end_phase("restart to end of rewrap")
        # 4. a few more seconds of load.
        time.sleep(args.tail)
        end_phase("after rewrap")
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=60)
    s["acks_per_phase"] = dict(phase_acks)
    for name, n in phase_acks:
        if n < args.min_acks:
            P.insert(0, f"TOO FEW WRITES: {n} acknowledged under load {name} (minimum {args.min_acks})")
    s["load_seconds"] = round(time.monotonic() - load_t0, 2)
    s.update(stats.c)
    s["status_5xx"] = stats.status_5xx
    s["other_statuses"] = stats.other_status
    P.extend(stats.problems)
    if ledger.duplicate_acks:
        for u, v, m1, m2 in ledger.duplicate_acks[:20]:
            P.append(f"{u}: version {v} acknowledged twice ({m1}, {m2})")
    s["writes_acknowledged"] = sum(len(v) for v in ledger.acks.values())

    if args.inject_fault:
        # Self-test of the checks: lose one acknowledged write and mark one resume state as under k1.
        victim = users[-1]
        dep.exec_sql(f"DELETE FROM token_bundles WHERE user_id = '{victim}'")
        dep.exec_sql(f"UPDATE challenges SET resume_key_id = 'k1' WHERE id = '{challenges[0]['id']}'"
                     if backend == "postgres" else
                     f"UPDATE challenges SET resume_key_id = 'k1' WHERE resume_state IS NOT NULL "
                     f"AND id = (SELECT MIN(id) FROM challenges WHERE resume_state IS NOT NULL)")
        log(f"{backend}: --inject-fault: deleted {victim}'s bundle, set one challenge's resume_key_id to k1")

    lost, cp, stored = check_users(dep, ledger, users)
    P.extend(cp)
    s["unknown_outcome_found_stored"] = sum(
        1 for u, (v, mk) in stored.items() if mk in ledger.unknown.get(u, set())
    )
    s["k1_rows_after_rewrap"] = k1_rows(dep)
    if any(s["k1_rows_after_rewrap"].values()):
        P.append(f"rows still under k1 after rewrap: {s['k1_rows_after_rewrap']}")
    ok, desc = audit_checks(dep)
    s["audit_after_rewrap"] = desc
    if not ok:
        P.append(f"audit verify after rewrap failed: {desc}")
    rp = replay_code_a(dep, challenges[: len(challenges) // 2])  # half checked with k1 still present
    P.extend(rp)
    P.extend(try_code_b(dep, challenges[len(challenges) // 2 :]))
    log(f"{backend}: after rewrap: acked {s['writes_acknowledged']}, lost {len(lost)}, "
        f"k1 rows {s['k1_rows_after_rewrap']}, audit {'ok' if ok else 'FAILED'}")

    # 5. keyring {k2}: must start, everything readable, challenges usable.
    rc = server.stop()
    if rc != 0:
        P.append(f"server (k2,k1) exited with {rc} on SIGTERM")
    dep.env["CENTRALDB_ENCRYPTION_KEYS"] = dep.keys["k2"]  # README step 4
    server = Server(dep, "3-k2")
    try:
        server.wait_ready(timeout=60)
        s["k2_only_start"] = "ok"
    except RuntimeError as e:
        s["k2_only_start"] = f"REFUSED: {e}"
        P.append(f"start with keyring {{k2}} refused: {e}")
    if s["k2_only_start"] == "ok":
        lost2, cp, stored2 = check_users(dep, ledger, users)
        P.extend(f"k2 only: {p}" for p in cp)
        changed = [u for u in users if u in stored and stored2.get(u) != stored[u]]
        if changed:
            P.append(f"k2 only: {len(changed)} bundle(s) differ from the check before, e.g. {changed[:3]}")
        lost = sorted(set(lost) | set(lost2))
        s["bundles_readable_k2_only"] = len(stored2)
        # Codes tried under k2 stay duplicates. Codes tried under k1 are recognised only while k1
        # is held (README, rotation step 4: wait out the longest challenge lifetime before
        # removing it); those replays are counted, not failed.
        second = challenges[len(challenges) // 2 :]
        P.extend(f"k2 only: {p}" for p in replay_code_a(dep, second, CODE_B, "tried_b", "under k2"))
        s["k1_codes_replayed_after_k1_removed"] = len(replay_code_a(dep, second))
        cp, done = finish_challenges(dep, challenges)
        P.extend(f"k2 only: {p}" for p in cp)
        s["challenges_completed_k2_only"] = done
        ok2, desc2 = audit_checks(dep)
        s["audit_k2_only"] = desc2
        if not ok2:
            P.append(f"audit verify with k2 only failed: {desc2}")
        ok = ok and ok2
        rc = server.stop()
        if rc != 0:
            P.append(f"server (k2) exited with {rc} on SIGTERM")
    else:
        ok = False
    s["replays_accepted_after_rotation"] = sum(1 for p in P if "code tried before the rotation" in p)
    s["writes_lost"] = len(lost)
    s["rows_left_under_k1"] = sum(s["k1_rows_after_rewrap"].values())
    s["count_5xx"] = sum(stats.status_5xx.values())
    s["audit_ok"] = ok
    s["seconds"] = round(time.monotonic() - t0, 1)
    s["ok"] = not P
    return s


def main():
    ap = argparse.ArgumentParser(
        description="Rotate the encryption keyring (k1 -> k2,k1 -> rewrap -> k2) of the real centraldb-mfa binary "
        "under concurrent PUT/GET load and check nothing is lost: acknowledged writes readable, no 5xx, no row "
        "left under k1, audit chain verifies, pending MFA challenges still work. Exit 1 on any failure.",
    )
    harness.add_target_args(ap)
    ap.add_argument("--users", type=int, default=300, help="users with a bundle (default 300)")
    ap.add_argument("--challenges", type=int, default=20, help="external MFA challenges with resume state (default 20)")
    ap.add_argument("--threads", type=int, default=8, help="load threads doing PUT + GET (default 8)")
    ap.add_argument("--warmup", type=float, default=3.0, help="load seconds before the rotation restart (default 3)")
    ap.add_argument("--pre-rewrap", type=float, default=1.0, help="load seconds between restart and rewrap (default 1)")
    ap.add_argument("--tail", type=float, default=5.0, help="load seconds after rewrap finished (default 5)")
    ap.add_argument("--rewrap-timeout", type=float, default=120.0, help="rewrap must finish within this (s)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for the load")
    ap.add_argument(
        "--inject-fault",
        action="store_true",
        help="self-test: after rewrap, delete one acknowledged bundle and label one resume state as k1 directly "
        "in the database; the run must then report a lost write, a row under k1 and a refused k2-only start (exit 1)",
    )
    ap.add_argument(
        "--min-acks",
        type=int,
        default=10,
        help="fewest writes each load phase must acknowledge (default 10; a phase sees hundreds)",
    )
    ap.add_argument(
        "--min-acks-wait",
        type=float,
        default=20.0,
        help="longest extra wait for --min-acks at the end of a load phase (default 20 s)",
    )
    harness.add_run_args(ap)
    args = ap.parse_args()

    if not harness.binary_ok(args.bin):
        return 2
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
    workdir = harness.start_run(args, "rotation-")

    backends = harness.backends_of(args)
    log(f"seed {args.seed}; backends {', '.join(backends)}; {args.users} users, {args.challenges} challenges, "
        f"{args.threads} load threads")
    t0 = time.monotonic()
    results = harness.run_backends(args, backends, lambda b: run_backend(args, b, workdir))

    failed = False
    print()
    print("rotation summary")
    for r in results:
        if "error" in r:
            print(f"  {r['backend']:8s} ERROR: {r['error']}")
            failed = True
            continue
        print(
            f"  {r['backend']:8s} users {r['users']}, writes acknowledged {r['writes_acknowledged']} "
            f"({r['users']} seed + {r['put_acked']} under load), "
            f"writes lost {r['writes_lost']}, rewrapped {r.get('rewrapped')} "
            f"({r.get('rewrap_changed_concurrently')} changed concurrently, {r.get('rewrap_failed')} failed; "
            f"audit re-sealed {r.get('audit_resealed')}) in {r.get('rewrap_seconds')} s, rows left under k1 "
            f"{r['rows_left_under_k1']}, 5xx {r['count_5xx']}, restart gap {r.get('restart_gap_seconds')} s "
            f"({r['restart_gap_errors']} connection errors, of them {r['unknown_outcome']} PUTs sent and not answered), "
            f"412 {r['put_412']}, GETs checked {r['get_ok']}, start with k2 only: {r.get('k2_only_start')}, "
            f"challenges completed {r.get('challenges_completed_k2_only')}/{r['challenges']}, "
            f"audit verify {'ok' if r['audit_ok'] else 'FAILED'}, {r['seconds']} s"
        )
        print(f"           writes acknowledged per load phase: {r.get('acks_per_phase')}")
        if r["other_statuses"]:
            print(f"           other statuses: {r['other_statuses']}")
        print(f"           k2 only before rewrap (must be refused): {r.get('k2_only_before_rewrap')}")
        print(
            f"           code tried before the rotation, replayed after it: "
            f"{r.get('replays_accepted_after_rotation')}/{r['challenges'] // 2} accepted (must be 0: 409 duplicate_code)"
        )
        print(f"           rewrap: {r.get('rewrap_output')}")
        print(f"           audit after rewrap: {r.get('audit_after_rewrap')}")
        print(f"           audit with k2 only: {r.get('audit_k2_only')}")
        if r["status_5xx"]:
            print(f"           5xx: {r['status_5xx']}")
        for p in r["problems"][:40]:
            print(f"           PROBLEM {p}")
        if len(r["problems"]) > 40:
            print(f"           ... {len(r['problems']) - 40} more problem(s)")
        failed |= not r["ok"]
    return harness.finish(args, args.seed, t0, failed, results)


if __name__ == "__main__":
    try:
        code = main()
    finally:
        harness.cleanup()
    sys.exit(code)
