#!/usr/bin/env python3
"""Crash-safety test: SIGKILL the real centraldb-mfa binary under concurrent token PUT load.

For each backend (SQLite, PostgreSQL) one deployment (data dir, encryption key, bootstrap admin
key, database) is used for all cycles. Each cycle:

  1. start `centraldb-mfa serve` on a free loopback port and wait for /readyz;
  2. run N writer threads doing `PUT /api/v1/users/{user}/tokens` (If-None-Match: * for users not
     stored yet, If-Match: "<version>" for stored ones); every write carries a unique marker in
     its token fields; every 2xx answer is recorded as acknowledged (user, version, marker);
  3. SIGKILL the server at a random moment (0.3-3 s after the load started); requests in flight
     at that moment are "unknown" (neither acknowledged nor refused);
  4. restart on the same data, wait for /readyz, GET every user's tokens and check:
     stored version >= the highest acknowledged version, and, when equal, the stored marker is
     the acknowledged one; a newer stored version must carry the marker of a write whose outcome
     was unknown (in flight at a kill or answered 5xx) -- never of a refused (412) one;
  5. `centraldb-mfa audit verify` (CLI, same env) and GET /api/v1/audit/verify must report ok.
After the last cycle, the `token.write` success events (GET /api/v1/audit/events) must be exactly
versions 1..stored for every user: one event per surviving write, none for a write rolled back.

Any lost write, foreign content or audit failure makes the exit code 1, and so does any answer
under load other than 2xx or 412 (a 500, a 422, a 401, ...: the run counts them as unknown
outcomes for the loss check, and fails), and a cycle that acknowledged fewer than --min-acks
writes (a server refusing every write must not pass as "0 lost"). `--inject-fault` is a
self-test of the checks (deletes one acknowledged bundle and edits one audit event; must fail);
`scripts/reliability` runs it and checks that it fails for the planted reasons.
`--log-dir DIR` runs every server at RUST_LOG=trace with its output in DIR, and registers every
secret the run used (admin key, encryption key, every token value sent) in DIR/secrets-*.txt
for scripts/scan-logs.py.
python3 stdlib only; the binary is not built here (cargo build first).

  cargo build && scripts/crash-safety.py                       # both backends, 20 cycles each
  scripts/crash-safety.py --backend sqlite --cycles 5 --seed 1 --json out.json
"""

import argparse
import http.client
import random
import signal
import sys
import threading
import time

import harness
from harness import Deployment, Ledger, Server, log, request, stored_marker


class CycleStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = 0
        self.conflicts = 0
        self.unknown = 0
        self.refused_conn = 0
        self.other = {}
        self.errors = []

    def bump(self, field, n=1):
        with self.lock:
            setattr(self, field, getattr(self, field) + n)

    def other_status(self, st):
        with self.lock:
            self.other[str(st)] = self.other.get(str(st), 0) + 1


def writer(*a):
    stats = a[8]
    try:
        _writer(*a)
    except Exception as e:  # reported as a problem: a dead writer thread would silently thin the load
        with stats.lock:
            stats.errors.append(f"writer {a[0]}: {type(e).__name__}: {e}")


def _writer(wid, cycle, server, dep, ledger, users, stop, stats, rng):
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    conn = None
    n = 0
    while not stop.is_set():
        user = rng.choice(users)
        with ledger.lock:
            known = ledger.known.get(user)
        n += 1
        marker = f"{dep.backend[:2]}c{cycle}w{wid}n{n}"
        headers = dict(auth)
        if known is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = f'"{known}"'
        if conn is None:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
            try:
                conn.connect()
            except OSError:
                # Never reached the server: not a write at all.
                conn = None
                stats.bump("refused_conn")
                if stop.is_set():
                    break
                time.sleep(0.01)
                continue
        tb = dep.bundle(marker)
        try:
            st, body = request(None, None, "PUT", f"/api/v1/users/{user}/tokens", tb, headers, conn=conn)
        except (OSError, http.client.HTTPException):
            # Sent (at least partly) when the server died: outcome unknown.
            ledger.unknown_outcome(user, marker)
            stats.bump("unknown")
            try:
                conn.close()
            except Exception:
                pass
            conn = None
            continue
        if 200 <= st < 300:
            if not isinstance(body, dict) or not isinstance(body.get("version"), int):
                raise RuntimeError(f"2xx answer without a version: {body!r}")
            ledger.ack(user, body["version"], marker)
            stats.bump("acked")
        elif st == 412:
            ledger.refuse(user, marker, (body or {}).get("current_version"))
            stats.bump("conflicts")
        else:
            # Anything else (500, 503, 422, 401, ...) is a failure of the run; a 5xx may or may not
            # have been applied, so the loss check treats the write as of unknown outcome.
            ledger.unknown_outcome(user, marker)
            code = (body or {}).get("code") if isinstance(body, dict) else None
            stats.other_status(f"{st} {code}" if code else st)
    if conn is not None:
        conn.close()


# --------------------------------------------------------------------------------------------
# Checks after a restart
# --------------------------------------------------------------------------------------------


def check_users(server, dep, ledger, all_users):
    """Returns (lost {(user, version)}, problems, landed_unknown); updates ledger.known from what is stored."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    lost = set()
    landed = 0
    problems = []
    try:
        for user in sorted(all_users):
            st, body = request(None, None, "GET", f"/api/v1/users/{user}/tokens", None, auth, conn=conn)
            acks, unknown, refused = ledger.view(user)
            max_ack = max(acks) if acks else None
            if st == 404:
                stored_v, marker = None, None
            elif st == 200:
                stored_v, marker = int(body["version"]), stored_marker(body)
            else:
                problems.append(f"{user}: GET answered {st}: {body}")
                continue
            with ledger.lock:
                ledger.known[user] = stored_v
            if max_ack is not None and (stored_v is None or stored_v < max_ack):
                gone = {(user, v) for v in acks if stored_v is None or v > stored_v}
                lost |= gone
                problems.append(
                    f"{user}: LOST {len(gone)} acknowledged write(s): stored version {stored_v}, "
                    f"acknowledged up to {max_ack} ({acks[max_ack]})"
                )
                continue
            if stored_v is None:
                continue
            if stored_v == max_ack:
                if marker != acks[max_ack]:
                    lost.add((user, max_ack))
                    problems.append(
                        f"{user}: version {stored_v} holds {marker!r}, but the write acknowledged "
                        f"with that version was {acks[max_ack]!r}"
                    )
                continue
            # Stored version is newer than any acknowledgement: it must be an unknown-outcome write.
            if marker in unknown:
                landed += 1
                with ledger.lock:
                    ledger.acks.setdefault(user, {})[stored_v] = marker  # now known durable
            elif marker in refused:
                problems.append(f"{user}: version {stored_v} holds {marker!r}, a write refused with 412")
            else:
                problems.append(f"{user}: version {stored_v} holds {marker!r}, not a write of unknown outcome")
    finally:
        conn.close()
    return lost, problems, landed


def audit_events_check(server, dep, ledger, all_users):
    """Every stored version has exactly one `token.write` success event, and no event is left over
    from a write that did not survive: per user the event versions are exactly 1..stored version."""
    auth = {"Authorization": f"Bearer {dep.admin_key}"}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    seen = {}
    after = None
    pages = 0
    try:
        while True:
            q = "type=token.write&outcome=success&limit=1000" + (f"&after={after}" if after is not None else "")
            st, body = request(None, None, "GET", f"/api/v1/audit/events?{q}", None, auth, conn=conn)
            if st != 200:
                return [f"GET /api/v1/audit/events answered {st}: {body}"], 0
            pages += 1
            for e in body["events"]:
                u = e.get("user_id")
                if u in all_users:
                    seen.setdefault(u, []).append(int(e["details"]["version"]))
            after = body.get("next_after")
            if after is None:
                break
    finally:
        conn.close()
    problems = []
    n = 0
    with ledger.lock:
        stored = {u: ledger.known.get(u) for u in all_users}
    for u in sorted(all_users):
        versions = sorted(seen.get(u, []))
        n += len(versions)
        want = list(range(1, (stored[u] or 0) + 1))
        if versions != want:
            extra = sorted(set(versions) - set(want)) + [v for i, v in enumerate(versions) if i and versions[i - 1] == v]
            missing = sorted(set(want) - set(versions))
            problems.append(
                f"{u}: token.write events do not match the stored version {stored[u]}: "
                f"missing {missing[:10]}, extra/duplicate {extra[:10]}"
            )
    return problems, n


# --------------------------------------------------------------------------------------------
# One backend
# --------------------------------------------------------------------------------------------


def run_backend(args, backend, workdir, rng):
    t0 = time.monotonic()
    dep = Deployment(args, backend, workdir, "crash-safety")
    ledger = Ledger()
    base_users = [f"crash-{backend}-u{i:03d}" for i in range(args.users)]
    fresh_per_cycle = max(1, args.users // 8)
    all_users = set()
    summary = {
        "backend": backend,
        "cycles": 0,
        "writes_acknowledged": 0,
        "writes_lost": 0,
        "unknown_in_flight": 0,
        "unknown_found_stored": 0,
        "conflicts_412": 0,
        "other_statuses": {},
        "audit_verify_cli": None,
        "audit_verify_http": None,
        "audit_ok": True,
        "problems": [],
        "per_cycle": [],
    }
    log(f"{backend}: data {dep.dir}" + (f", database {dep.db_name}" if dep.db_name else ""))
    for cycle in range(1, args.cycles + 1):
        # Fresh users every cycle, so first writes (If-None-Match: *) are in flight at every kill.
        users = base_users + [f"crash-{backend}-c{cycle:02d}-n{i}" for i in range(fresh_per_cycle)]
        all_users.update(users)
        server = Server(dep, f"{cycle:02d}")
        server.wait_ready()
        stats = CycleStats()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=writer,
                args=(w, cycle, server, dep, ledger, users, stop, stats, random.Random(rng.random())),
                daemon=True,
            )
            for w in range(args.writers)
        ]
        for t in threads:
            t.start()
        delay = rng.uniform(args.kill_min, args.kill_max)
        time.sleep(delay)
        # A cycle must acknowledge --min-acks writes: on a slow machine the kill waits for them
        # (up to --min-acks-wait s more), a server refusing every write fails the cycle.
        waited_until = time.monotonic() + args.min_acks_wait
        while stats.acked < args.min_acks and time.monotonic() < waited_until and not stats.errors:
            time.sleep(0.05)
        stop.set()
        rc = server.sigkill()
        for t in threads:
            t.join(timeout=30)
        problems = list(stats.errors)
        too_few = False
        if stats.other:
            problems.append(
                f"UNEXPECTED STATUS under load (only 2xx and 412 are expected): {dict(sorted(stats.other.items()))}"
            )
        if stats.acked < args.min_acks:
            problems.append(
                f"TOO FEW WRITES: {stats.acked} acknowledged in {delay:.2f} s + up to {args.min_acks_wait:g} s "
                f"of load (minimum {args.min_acks}); 412 {stats.conflicts}, other {stats.other}"
            )
            too_few = True
        if rc != -signal.SIGKILL:
            summary["problems"].append(f"cycle {cycle}: server exited with {rc} before the kill")

        if args.inject_fault and cycle == 1:
            # Self-test of the checker: lose one acknowledged write and tamper one audit event.
            with ledger.lock:
                victim = sorted(u for u in ledger.acks if ledger.acks[u])[0]
            dep.exec_sql(f"DELETE FROM token_bundles WHERE user_id = '{victim}'")
            dep.exec_sql("UPDATE audit_events SET outcome = 'tampered' WHERE seq = 2")
            log(f"{backend}: --inject-fault: deleted {victim}'s bundle, edited audit event 2")

        # Restart on the same data and check.
        server = Server(dep, f"{cycle * 100:02d}")
        server.wait_ready()
        lost_set, check_problems, landed = check_users(server, dep, ledger, all_users)
        problems.extend(check_problems)
        lost = len(lost_set - ledger.lost)  # counted once, in the cycle it is first seen
        ledger.lost |= lost_set
        cli_ok, cli_desc, http_ok, http_desc = harness.audit_verify(dep, server.host, server.port)
        if cycle == args.cycles:
            ev_problems, n_events = audit_events_check(server, dep, ledger, all_users)
            summary["token_write_events_checked"] = n_events
            summary["token_write_events_ok"] = not ev_problems
            problems.extend(ev_problems)
        server.stop(timeout=20)

        summary["cycles"] = cycle
        summary["writes_acknowledged"] += stats.acked
        summary["writes_lost"] += lost
        summary["unknown_in_flight"] += stats.unknown
        summary["unknown_found_stored"] += landed
        summary["conflicts_412"] += stats.conflicts
        for k, v in stats.other.items():
            summary["other_statuses"][k] = summary["other_statuses"].get(k, 0) + v
        summary["audit_verify_cli"] = cli_desc
        summary["audit_verify_http"] = http_desc
        if not (cli_ok and http_ok):
            summary["audit_ok"] = False
            problems.append(f"audit verify failed: cli={cli_desc!r} http={http_desc!r}")
        summary["problems"].extend(f"cycle {cycle}: {p}" for p in problems)
        summary["per_cycle"].append(
            {
                "cycle": cycle,
                "kill_after_s": round(delay, 3),
                "acknowledged": stats.acked,
                "conflicts_412": stats.conflicts,
                "unknown_in_flight": stats.unknown,
                "unknown_found_stored": landed,
                "connect_refused": stats.refused_conn,
                "other_statuses": stats.other,
                "lost": lost,
                "audit_cli_ok": cli_ok,
                "audit_http_ok": http_ok,
            }
        )
        log(
            f"{backend} cycle {cycle:2d}/{args.cycles}: kill after {delay:.2f}s, acked {stats.acked}, "
            f"412 {stats.conflicts}, unknown {stats.unknown} (stored {landed}), lost {lost}, "
            f"audit cli {'ok' if cli_ok else 'FAIL'} / http {'ok' if http_ok else 'FAIL'}"
        )
        for p in problems[:20]:
            log(f"  PROBLEM: {p}")
        if too_few:
            log(f"{backend}: stopping after cycle {cycle}: the server does not acknowledge writes")
            break
    if ledger.duplicate_acks:
        for u, v, m1, m2 in ledger.duplicate_acks[:20]:
            summary["problems"].append(f"{u}: version {v} acknowledged twice ({m1}, {m2})")
        summary["writes_lost"] += len(ledger.duplicate_acks)
    summary["duplicate_version_acks"] = len(ledger.duplicate_acks)
    summary["users_checked"] = len(all_users)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["ok"] = summary["writes_lost"] == 0 and summary["audit_ok"] and not summary["problems"]
    return summary


def main():
    ap = argparse.ArgumentParser(
        description="SIGKILL the real centraldb-mfa binary under concurrent token PUT load, restart it, and "
        "check that every acknowledged write survived and the audit chain verifies. Exit 1 on any loss.",
    )
    harness.add_target_args(ap)
    ap.add_argument("--cycles", type=int, default=20, help="kill/restart cycles per backend (default 20)")
    ap.add_argument("--writers", type=int, default=16, help="concurrent writer threads (default 16)")
    ap.add_argument("--users", type=int, default=64, help="users written to (plus users/8 new ones per cycle)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (kill moments, user choice)")
    ap.add_argument("--kill-min", type=float, default=0.3, help="earliest kill after load start, s (default 0.3)")
    ap.add_argument("--kill-max", type=float, default=3.0, help="latest kill after load start, s (default 3.0)")
    ap.add_argument(
        "--inject-fault",
        action="store_true",
        help="self-test: after the first kill, delete one acknowledged bundle and edit one audit event "
        "directly in the database; the run must then report a lost write and a broken chain (exit 1)",
    )
    ap.add_argument(
        "--min-acks",
        type=int,
        default=10,
        help="fewest acknowledged writes a cycle must see (default 10; 16 writers over 0.3-3 s do hundreds)",
    )
    ap.add_argument(
        "--min-acks-wait",
        type=float,
        default=20.0,
        help="longest extra wait for --min-acks before the kill (default 20 s)",
    )
    harness.add_run_args(ap)
    args = ap.parse_args()

    if not harness.binary_ok(args.bin):
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    workdir = harness.start_run(args, "crash-safety-")

    backends = harness.backends_of(args)
    log(f"seed {seed}; backends {', '.join(backends)}; {args.cycles} cycles, {args.writers} writers, {args.users} users")
    t0 = time.monotonic()
    results = harness.run_backends(args, backends, lambda b: run_backend(args, b, workdir, rng))
    failed = False

    print()
    print("crash-safety summary")
    for r in results:
        if "error" in r:
            print(f"  {r['backend']:8s} ERROR: {r['error']}")
            failed = True
            continue
        print(
            f"  {r['backend']:8s} cycles {r['cycles']}, writes acknowledged {r['writes_acknowledged']}, "
            f"writes lost {r['writes_lost']}, unknown (in flight at kill) {r['unknown_in_flight']} "
            f"({r['unknown_found_stored']} found stored), 412 conflicts {r['conflicts_412']}, "
            f"audit verify {'ok' if r['audit_ok'] else 'FAILED'} [{r['audit_verify_cli']}; "
            f"http {r['audit_verify_http']}], token.write events match stored versions: "
            f"{'yes' if r.get('token_write_events_ok') else 'NO'} ({r.get('token_write_events_checked')}), "
            f"{r['seconds']} s"
        )
        if r["other_statuses"]:
            print(f"           other statuses: {r['other_statuses']}")
        for p in r["problems"][:50]:
            print(f"           PROBLEM {p}")
        failed |= not r["ok"]
    return harness.finish(args, seed, t0, failed, results)


if __name__ == "__main__":
    try:
        code = main()
    finally:
        harness.cleanup()
    sys.exit(code)
