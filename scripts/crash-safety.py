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
import atexit
import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

BOOT_KEY_LEN = 48
FAR_EXPIRY = 4102444800  # 2100-01-01: the sweeper never expires these bundles.

_children = []  # live server processes, killed on exit
_cleanups = []  # callables run once on exit (drop PG database, remove temp dirs)
_cleaned = False


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cleanup():
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    for p in list(_children):
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=10)
            except Exception:
                pass
    for fn in reversed(_cleanups):
        try:
            fn()
        except Exception as e:  # keep cleaning up the rest
            print(f"cleanup error: {e}", file=sys.stderr)


def _on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


# --------------------------------------------------------------------------------------------
# Deployment and server process
# --------------------------------------------------------------------------------------------


class Deployment:
    def __init__(self, args, backend, workdir):
        self.bin = args.bin
        self.backend = backend
        self.dir = os.path.join(workdir, backend)
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.dir, mode=0o700)
        self.admin_key = "crash-safety-" + "".join(
            random.SystemRandom().choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(BOOT_KEY_LEN)
        )
        keygen = subprocess.run([self.bin, "keygen", "--id", "k1"], capture_output=True, text=True, timeout=30)
        if keygen.returncode != 0:
            raise RuntimeError(f"keygen failed: {keygen.stderr}")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "RUST_LOG": "info",
            "CENTRALDB_LOG_FORMAT": "json",
            "CENTRALDB_LISTEN": "127.0.0.1:0",
            "CENTRALDB_DATA_DIR": self.data,
            "CENTRALDB_ENCRYPTION_KEYS": keygen.stdout.strip(),
            "CENTRALDB_BOOTSTRAP_ADMIN_KEY": self.admin_key,
        }
        self.db_name = None
        self.log_dir = None
        self.secrets = None
        if args.log_dir:
            self.log_dir = os.path.join(args.log_dir, f"crash-safety-{backend}")
            os.makedirs(self.log_dir, exist_ok=True)
            self.env["RUST_LOG"] = "trace"
            self.secrets = SecretLog(os.path.join(self.log_dir, f"secrets-crash-safety-{backend}.txt"))
            self.secrets.add(self.admin_key)
            self.secrets.add_keyring(self.env["CENTRALDB_ENCRYPTION_KEYS"])
        if backend == "postgres":
            self._create_pg_database(args.postgres_url)

    def _create_pg_database(self, base_url):
        if shutil.which("psql") is None:
            raise RuntimeError("psql not found (needed to create the PostgreSQL database)")
        name = f"crash_safety_{os.getpid()}_{random.SystemRandom().randrange(1 << 30)}"
        admin_url = base_url
        r = subprocess.run(
            ["psql", admin_url, "-v", "ON_ERROR_STOP=1", "-qc", f'CREATE DATABASE "{name}"'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"cannot create PostgreSQL database: {r.stderr.strip()}")
        self.db_name = name

        def drop():
            subprocess.run(
                ["psql", admin_url, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                capture_output=True,
                timeout=60,
            )

        _cleanups.append(drop)
        u = urllib.parse.urlsplit(base_url)
        self.env["CENTRALDB_DATABASE_URL"] = urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + name, u.query, ""))

    def exec_sql(self, sql):
        """Runs SQL directly against the deployment's database (only for --inject-fault)."""
        if self.backend == "sqlite":
            import sqlite3

            db = sqlite3.connect(os.path.join(self.data, "centraldb-mfa.db"))
            try:
                db.execute(sql)
                db.commit()
            finally:
                db.close()
        else:
            r = subprocess.run(
                ["psql", self.env["CENTRALDB_DATABASE_URL"], "-v", "ON_ERROR_STOP=1", "-qc", sql],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode != 0:
                raise RuntimeError(f"psql: {r.stderr.strip()}")

    def run_cli(self, *cli_args, timeout=120):
        r = subprocess.run(
            [self.bin, *cli_args],
            env={**self.env, "RUST_LOG": "warn"},
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if self.log_dir:
            with open(os.path.join(self.log_dir, "cli.log"), "a") as f:
                f.write(r.stdout + r.stderr)
        return r


class SecretLog:
    """The secrets a run used, one JSON string a line (the format scripts/scan-logs.py reads)."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.f = open(path, "a", encoding="utf-8")
        _cleanups.append(self.f.close)

    def add(self, *secrets):
        with self.lock:
            for s in secrets:
                self.f.write(json.dumps(s) + "\n")

    def add_keyring(self, spec):
        """`id:base64,...`: the spec, each key in base64 and in hex."""
        self.add(spec)
        for part in spec.split(","):
            b64 = part.split(":", 1)[-1]
            self.add(b64, base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex())

    def add_bundle(self, body):
        o1, o2 = body["oauth1_token"], body["oauth2_token"]
        self.add(o1["oauth_token"], o1["oauth_token_secret"], o2["access_token"], o2["refresh_token"])


class Server:
    """One `serve` process; its combined output goes to a log file, the listen address is parsed."""

    def __init__(self, dep, cycle):
        self.log_path = os.path.join(dep.log_dir or dep.dir, f"serve-{cycle:02d}.log")
        self.proc = subprocess.Popen(
            [dep.bin, "serve"],
            env=dep.env,
            cwd=dep.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        _children.append(self.proc)
        self.addr = None
        self._addr_ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log_path, "wb") as out:
            for line in self.proc.stdout:
                out.write(line)
                if self.addr is None:
                    try:
                        v = json.loads(line)
                    except ValueError:
                        continue
                    f = v.get("fields", {})
                    if f.get("message") == "centraldb-mfa listening":
                        self.addr = f.get("addr")
                        self._addr_ready.set()
        self._addr_ready.set()

    def wait_ready(self, admin_key, timeout=30.0):
        deadline = time.monotonic() + timeout
        if not self._addr_ready.wait(timeout) or self.addr is None:
            raise RuntimeError(f"server did not start (exit {self.proc.poll()}); see {self.log_path}")
        host, port = self.addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                st, _ = request(self.host, self.port, "GET", "/readyz", None, {}, timeout=3)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"/readyz not ready within {timeout}s; see {self.log_path}")

    def sigkill(self):
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        _children.remove(self.proc)
        return rc


def request(host, port, method, path, body, headers, timeout=10, conn=None):
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        h = dict(headers)
        if data is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return resp.status, parsed
    finally:
        if own:
            conn.close()


# --------------------------------------------------------------------------------------------
# Write bookkeeping
# --------------------------------------------------------------------------------------------


def token_body(marker):
    return {
        "kind": "garth",
        "oauth1_token": {
            "oauth_token": f"o1-{marker}",
            "oauth_token_secret": f"o1s-{marker}",
            "mfa_token": None,
            "mfa_expiration_timestamp": None,
            "domain": "garmin.com",
        },
        "oauth2_token": {
            "scope": "CONNECT_READ CONNECT_WRITE",
            "jti": marker,
            "token_type": "Bearer",
            "access_token": f"acc-{marker}",
            "refresh_token": f"ref-{marker}",
            "expires_in": 86400,
            "expires_at": FAR_EXPIRY,
            "refresh_token_expires_in": 2592000,
            "refresh_token_expires_at": FAR_EXPIRY,
        },
    }


def stored_marker(body):
    try:
        m = body["oauth2_token"]["jti"]
        # All four fields must belong to the same write.
        parts = {
            body["oauth1_token"]["oauth_token"][3:],
            body["oauth1_token"]["oauth_token_secret"][4:],
            body["oauth2_token"]["access_token"][4:],
            body["oauth2_token"]["refresh_token"][4:],
        }
        return m if parts == {m} else f"MIXED:{sorted(parts | {m})}"
    except (KeyError, TypeError):
        return None


class Ledger:
    """Everything the clients learnt, across all cycles of one backend."""

    def __init__(self):
        self.lock = threading.Lock()
        self.known = {}  # user -> version the writers will use for If-Match (None: If-None-Match)
        self.acks = {}  # user -> {version: marker}
        self.unknown = {}  # user -> set of markers whose outcome is unknown
        self.refused = {}  # user -> set of markers answered 412
        self.n_acks = 0
        self.duplicate_acks = []
        self.lost = set()  # (user, version) of acknowledged writes found missing, over all cycles

    def ack(self, user, version, marker):
        with self.lock:
            per = self.acks.setdefault(user, {})
            if version in per:
                self.duplicate_acks.append((user, version, per[version], marker))
            per[version] = marker
            self.n_acks += 1
            cur = self.known.get(user)
            if cur is None or version > cur:
                self.known[user] = version


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
        tb = token_body(marker)
        if dep.secrets:
            dep.secrets.add_bundle(tb)
        try:
            st, body = request(None, None, "PUT", f"/api/v1/users/{user}/tokens", tb, headers, conn=conn)
        except (OSError, http.client.HTTPException):
            # Sent (at least partly) when the server died: outcome unknown.
            with ledger.lock:
                ledger.unknown.setdefault(user, set()).add(marker)
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
            cur = (body or {}).get("current_version")
            with ledger.lock:
                ledger.refused.setdefault(user, set()).add(marker)
                k = ledger.known.get(user)
                if cur is not None and (k is None or cur > k):
                    ledger.known[user] = int(cur)
            stats.bump("conflicts")
        else:
            # Anything else (500, 503, 422, 401, ...) is a failure of the run; a 5xx may or may not
            # have been applied, so the loss check treats the write as of unknown outcome.
            with ledger.lock:
                ledger.unknown.setdefault(user, set()).add(marker)
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
            with ledger.lock:
                acks = dict(ledger.acks.get(user, {}))
                unknown = set(ledger.unknown.get(user, set()))
                refused = set(ledger.refused.get(user, set()))
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


def audit_checks(server, dep):
    cli = dep.run_cli("audit", "verify")
    cli_out = (cli.stdout + cli.stderr).strip()
    cli_ok = cli.returncode == 0 and "audit chain ok" in cli_out
    lines = [ln for ln in cli_out.splitlines() if "audit chain" in ln] or cli_out.splitlines()
    try:
        st, body = request(
            server.host,
            server.port,
            "GET",
            "/api/v1/audit/verify",
            None,
            {"Authorization": f"Bearer {dep.admin_key}"},
            timeout=120,
        )
        http_ok = st == 200 and bool(body) and body.get("ok") is True
        http_desc = json.dumps(body) if body is not None else f"HTTP {st}"
    except (OSError, http.client.HTTPException) as e:
        http_ok, http_desc = False, f"error: {e}"
    return cli_ok, lines[-1] if lines else f"exit {cli.returncode}", http_ok, http_desc


# --------------------------------------------------------------------------------------------
# One backend
# --------------------------------------------------------------------------------------------


def run_backend(args, backend, workdir, rng):
    t0 = time.monotonic()
    dep = Deployment(args, backend, workdir)
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
        server = Server(dep, cycle)
        server.wait_ready(dep.admin_key)
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
        server = Server(dep, cycle * 100)
        server.wait_ready(dep.admin_key)
        lost_set, check_problems, landed = check_users(server, dep, ledger, all_users)
        problems.extend(check_problems)
        lost = len(lost_set - ledger.lost)  # counted once, in the cycle it is first seen
        ledger.lost |= lost_set
        cli_ok, cli_desc, http_ok, http_desc = audit_checks(server, dep)
        if cycle == args.cycles:
            ev_problems, n_events = audit_events_check(server, dep, ledger, all_users)
            summary["token_write_events_checked"] = n_events
            summary["token_write_events_ok"] = not ev_problems
            problems.extend(ev_problems)
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        _children.remove(server.proc)

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
    ap.add_argument("--bin", default="target/debug/centraldb-mfa", help="binary to test (not built by this script)")
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--cycles", type=int, default=20, help="kill/restart cycles per backend (default 20)")
    ap.add_argument("--writers", type=int, default=16, help="concurrent writer threads (default 16)")
    ap.add_argument("--users", type=int, default=64, help="users written to (plus users/8 new ones per cycle)")
    ap.add_argument(
        "--postgres-url",
        default="postgres://postgres@127.0.0.1:5432/test",
        help="server to create a fresh database on (dropped afterwards)",
    )
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
    ap.add_argument(
        "--log-dir",
        metavar="DIR",
        help="run the servers at RUST_LOG=trace, keep their output in DIR and register the run's secrets there "
        "(secrets-*.txt) for scripts/scan-logs.py",
    )
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and server logs (path is printed)")
    ap.add_argument("--json", metavar="OUT", help="write the summary as JSON to OUT")
    args = ap.parse_args()

    if not (os.path.isfile(args.bin) and os.access(args.bin, os.X_OK)):
        print(f"error: binary {args.bin!r} not found; build it first (cargo build)", file=sys.stderr)
        return 2
    args.bin = os.path.abspath(args.bin)
    if args.log_dir:
        args.log_dir = os.path.abspath(args.log_dir)
        os.makedirs(args.log_dir, exist_ok=True)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)

    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    workdir = tempfile.mkdtemp(prefix="crash-safety-")
    if args.keep:
        log(f"keeping {workdir}")
    else:
        _cleanups.insert(0, lambda: shutil.rmtree(workdir, ignore_errors=True))

    # Run a private copy: other builds may relink target/debug while this runs.
    snapshot = os.path.join(workdir, "centraldb-mfa")
    shutil.copy2(args.bin, snapshot)
    args.bin = snapshot

    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    log(f"seed {seed}; backends {', '.join(backends)}; {args.cycles} cycles, {args.writers} writers, {args.users} users")
    t0 = time.monotonic()
    results = []
    failed = False
    for b in backends:
        try:
            results.append(run_backend(args, b, workdir, rng))
        except Exception as e:  # a start-up failure etc. is a failed run, not a crash of the script
            results.append({"backend": b, "ok": False, "error": str(e)})
            log(f"{b}: ERROR {e}")
        cleanup_children()

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
    total = round(time.monotonic() - t0, 1)
    print(f"  total {total} s, seed {seed}: {'FAIL' if failed else 'PASS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": seed, "seconds": total, "ok": not failed, "backends": results}, f, indent=2)
    return 1 if failed else 0


def cleanup_children():
    for p in list(_children):
        if p.poll() is None:
            p.kill()
            p.wait()
        _children.remove(p)


if __name__ == "__main__":
    try:
        code = main()
    finally:
        cleanup()
    sys.exit(code)
