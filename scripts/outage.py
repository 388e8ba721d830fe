#!/usr/bin/env python3
"""Database outage checks against the real centraldb-mfa binary (python3 stdlib only).

pg:   a private PostgreSQL cluster (initdb in a temp dir, its own port and socket dir; the shared
      cluster on :5432 is never touched) is stopped under steady token PUT/GET load with
      `pg_ctl stop -m immediate` / `-m fast`, three times in one process lifetime. Every answer
      during the outage must be a 503 problem+json `unavailable` with Retry-After within the
      request timeout, no 500s, the process stays up, /readyz 503, /healthz 200. After the
      restart, token requests and /readyz must be back within 5 s; acknowledged writes must be
      readable and the audit chain must verify.
disk: the SQLite data dir on a small tmpfs that is filled up (a filler file plus token writes).
      Expect 507 (or 503) problem+json, no 500, the process stays up; deleting the filler must
      bring writes back without a restart; afterwards PRAGMA integrity_check = ok, every
      acknowledged write readable with its version, `audit verify` ok.

A phase that cannot run (no tmpfs can be mounted: not root, no mount permission) is SKIPPED
outside CI; with --require-disk or CI=true it is a failure. `--log-dir DIR` runs the services at
RUST_LOG=trace with their output in DIR and registers the run's secrets (admin key, encryption
keys, every token value sent) in DIR/secrets-outage.txt for scripts/scan-logs.py.

Exit status 0 when every check passes (or a phase is SKIPPED outside CI), 1 otherwise.
"""

import argparse
import base64
import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import harness
from harness import free_port, log, stored_marker

ADMIN_KEY = "outage-admin-key-" + os.urandom(16).hex()
LOG_DIR = None  # --log-dir: services at trace, their logs kept here
SECRETS = None  # --log-dir: a harness.SecretLog of the run's secrets (scripts/scan-logs.py)
RECOVERY_LIMIT_S = 5.0


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 1)


# ---------------------------------------------------------------------------------------------
# HTTP


class Resp:
    __slots__ = ("status", "headers", "body", "json", "start", "end", "error")

    def __init__(self, start):
        self.status = None
        self.headers = {}
        self.body = b""
        self.json = None
        self.start = start
        self.end = None
        self.error = None

    @property
    def took(self):
        return self.end - self.start

    def problem_code(self):
        if isinstance(self.json, dict):
            return self.json.get("code")
        return None


def request(port, method, path, body=None, key=ADMIN_KEY, timeout=30.0):
    """One request on a fresh connection. Never raises: transport errors land in `error`."""
    r = Resp(time.monotonic())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {}
        data = None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        r.body = resp.read()
        r.status = resp.status
        r.headers = {k.lower(): v for k, v in resp.getheaders()}
        if r.body:
            try:
                r.json = json.loads(r.body)
            except ValueError:
                pass
    except Exception as e:  # noqa: BLE001 - any transport failure is a finding
        r.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        r.end = time.monotonic()
    return r


def garth_body(tag):
    """A token bundle whose secret fields carry `tag` (registered for the log scan)."""
    b = harness.token_body(tag)
    if SECRETS is not None:
        SECRETS.add_bundle(b)
    return b


def tokens_path(user):
    return f"/api/v1/users/{user}/tokens"


def check_unavailable(r, request_timeout):
    """Problems with an answer that must be a 503 `unavailable` (empty list when fine)."""
    bad = []
    if r.error:
        return [f"no answer: {r.error} after {ms(r.took)} ms"]
    if r.status != 503:
        bad.append(f"status {r.status}")
    ctype = r.headers.get("content-type", "")
    if not ctype.startswith("application/problem+json"):
        bad.append(f"content-type {ctype!r}")
    j = r.json if isinstance(r.json, dict) else {}
    if j.get("code") != "unavailable" or not str(j.get("type", "")).endswith(":unavailable"):
        bad.append(f"code/type {j.get('code')!r}/{j.get('type')!r}")
    ra = r.headers.get("retry-after")
    if ra is None or not ra.isdigit() or int(ra) < 1:
        bad.append(f"Retry-After {ra!r}")
    if r.took > request_timeout + 1.0:
        bad.append(f"answered after {ms(r.took)} ms (request timeout {request_timeout} s)")
    return bad


# ---------------------------------------------------------------------------------------------
# The service


class Service:
    def __init__(self, binary, env, logdir, name):
        self.port = free_port()
        self.env = dict(env)
        self.env.update(
            {
                "CENTRALDB_LISTEN": f"127.0.0.1:{self.port}",
                "CENTRALDB_LOG_FORMAT": "json",
                "RUST_LOG": "trace" if LOG_DIR else os.environ.get("RUST_LOG", "info"),
                "CENTRALDB_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            }
        )
        self.binary = binary
        self.log_path = os.path.join(LOG_DIR or logdir, f"{name}.log")
        self.proc = None

    def full_env(self):
        base = {k: v for k, v in os.environ.items() if not k.startswith("CENTRALDB_")}
        base.update(self.env)
        return base

    def start(self, wait=30.0):
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve"], env=self.full_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
        )
        logf.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; log: {self.log_path}")
            r = request(self.port, "GET", "/healthz", key=None, timeout=2)
            if r.status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the service did not answer /healthz within {wait} s; log: {self.log_path}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=20.0):
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def cli(self, *args, timeout=60):
        p = subprocess.run(
            [self.binary, *args], env=self.full_env(), capture_output=True, text=True, timeout=timeout
        )
        return p.returncode, p.stdout, p.stderr

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.readlines()[-n:]
        except OSError:
            return []


def service_env(data_dir, request_timeout, acquire_ms, database_url=None):
    spec = "k1:" + base64.b64encode(os.urandom(32)).decode()
    if SECRETS is not None:
        SECRETS.add_keyring(spec)
    env = {
        "CENTRALDB_DATA_DIR": data_dir,
        "CENTRALDB_ENCRYPTION_KEYS": spec,
        "CENTRALDB_REQUEST_TIMEOUT_SECS": str(request_timeout),
        "CENTRALDB_DB_ACQUIRE_TIMEOUT_MS": str(acquire_ms),
        "CENTRALDB_SWEEP_INTERVAL_SECS": "1",
    }
    if database_url:
        env["CENTRALDB_DATABASE_URL"] = database_url
    return env


# ---------------------------------------------------------------------------------------------
# Load: token PUT + GET from several threads, every answer recorded


class Load:
    """Each thread writes fresh users (version 1) and overwrites one hot user of its own
    (versions 1, 2, ...), and reads back users it saw acknowledged."""

    def __init__(self, port, threads, prefix, timeout):
        self.port = port
        self.threads = threads
        self.prefix = prefix
        self.timeout = timeout
        self.lock = threading.Lock()
        self.results = []  # (kind, Resp)
        self.acked = {}  # user -> (version, tag): the latest acknowledged write
        self.uncertain = {}  # user -> set of tags whose write got no clear answer after the last ack
        self.wrong_reads = []
        self.stop_ev = threading.Event()
        self.pause_ev = threading.Event()
        self.workers = []

    def _record(self, kind, r):
        with self.lock:
            self.results.append((kind, r))

    def _put(self, user, tag):
        r = request(self.port, "PUT", tokens_path(user), garth_body(tag), timeout=self.timeout)
        self._record("put", r)
        with self.lock:
            if r.status in (200, 201) and isinstance(r.json, dict):
                self.acked[user] = (r.json.get("version"), tag)
                self.uncertain.pop(user, None)
            elif r.status is None or r.status >= 500:
                # Refused or cut off: it must have left nothing, but a cut-off write may have
                # committed, so a later read may show it (never something else).
                self.uncertain.setdefault(user, set()).add(tag)
        return r

    def _get(self, user):
        r = request(self.port, "GET", tokens_path(user), timeout=self.timeout)
        self._record("get", r)
        if r.status == 200:
            self.check_read(user, r)
        return r

    def check_read(self, user, r):
        with self.lock:
            acked = self.acked.get(user)
            uncertain = set(self.uncertain.get(user, ()))
        j = r.json if isinstance(r.json, dict) else {}
        got_tag = stored_marker(j)
        got_v = j.get("version")
        if acked is None:
            ok = got_tag in uncertain
        else:
            av, at = acked
            ok = (got_v == av and got_tag == at) or (isinstance(got_v, int) and got_v > av and got_tag in uncertain)
        if not ok:
            with self.lock:
                self.wrong_reads.append(f"{user}: read v{got_v} {got_tag!r}, acknowledged {acked}")
        return ok

    def _worker(self, t):
        n = 0
        hot = f"{self.prefix}-hot{t}"
        rnd = random.Random(t)
        while not self.stop_ev.is_set():
            if self.pause_ev.is_set():
                time.sleep(0.02)
                continue
            n += 1
            if n % 3 == 0:
                self._put(hot, f"{hot}-{n}")
            else:
                self._put(f"{self.prefix}-t{t}-n{n}", f"{self.prefix}-t{t}-n{n}")
            with self.lock:
                users = [u for u in self.acked if u.startswith(f"{self.prefix}-t{t}-") or u == hot]
            if users:
                self._get(rnd.choice(users[-20:] + [hot]) if hot in self.acked else rnd.choice(users[-20:]))

    def start(self):
        for t in range(self.threads):
            th = threading.Thread(target=self._worker, args=(t,), daemon=True)
            th.start()
            self.workers.append(th)

    def stop(self):
        self.stop_ev.set()
        for th in self.workers:
            th.join(self.timeout + 5)

    def snapshot(self):
        with self.lock:
            return list(self.results)


class Monitor:
    """Polls /readyz and /healthz every `interval` seconds."""

    def __init__(self, port, interval=0.1, timeout=10):
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.readyz = []
        self.healthz = []
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_ev.is_set():
            self.readyz.append(request(self.port, "GET", "/readyz", key=None, timeout=self.timeout))
            self.healthz.append(request(self.port, "GET", "/healthz", key=None, timeout=self.timeout))
            time.sleep(self.interval)

    def start(self):
        self.th.start()

    def stop(self):
        self.stop_ev.set()
        self.th.join(self.timeout + 2)


def status_counts(resps):
    out = {}
    for r in resps:
        k = str(r.status) if r.status is not None else "no_answer"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def find_pg_bin(name):
    cands = [f"/usr/local/bin/{name}"]
    base = "/usr/lib/postgresql"
    if os.path.isdir(base):
        for v in sorted(os.listdir(base), key=lambda s: int(s) if s.isdigit() else 0, reverse=True):
            cands.append(os.path.join(base, v, "bin", name))
    for c in cands:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(f"{name} not found (looked in /usr/local/bin and /usr/lib/postgresql/*/bin)")


def as_postgres(args, **kw):
    cmd = args
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


class Cluster:
    def __init__(self, root):
        self.root = root
        self.data = os.path.join(root, "pgdata")
        self.sock = root
        self.port = free_port()
        self.logfile = os.path.join(root, "postgres.log")
        self.initdb = find_pg_bin("initdb")
        self.pg_ctl = find_pg_bin("pg_ctl")
        self.pg_isready = find_pg_bin("pg_isready")

    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def init(self):
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
        p = as_postgres([self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        if p.returncode != 0:
            raise RuntimeError(f"initdb failed: {p.stdout}{p.stderr}")

    def start(self):
        """Starts the cluster; returns the monotonic time it was first seen accepting connections
        (pg_isready polled every 10 ms, since `pg_ctl -w` only checks ten times a second)."""
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        p = as_postgres([self.pg_ctl, "-D", self.data, "-l", self.logfile, "-W", "-o", opts, "start"])
        if p.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {p.stdout}{p.stderr}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            q = subprocess.run(
                [self.pg_isready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"], capture_output=True
            )
            if q.returncode == 0:
                return time.monotonic()
            time.sleep(0.01)
        raise RuntimeError(f"the private cluster does not accept connections; see {self.logfile}")

    def stop(self, mode):
        p = as_postgres([self.pg_ctl, "-D", self.data, "-w", "-t", "60", "-m", mode, "stop"])
        return p.returncode == 0, (p.stdout + p.stderr).strip()

    def running(self):
        p = as_postgres([self.pg_ctl, "-D", self.data, "status"])
        return p.returncode == 0


def run_pg(args, report):
    request_timeout = args.request_timeout
    out = {"outages": [], "ok": False}
    report["pg"] = out
    failures = []
    root = tempfile.mkdtemp(prefix="cdb-outage-pg-")
    logdir = tempfile.mkdtemp(prefix="cdb-outage-logs-")
    cluster = None
    svc = None
    load = None
    mon = None
    try:
        cluster = Cluster(root)
        log(f"pg: initdb in {cluster.data} (port {cluster.port}, socket dir {cluster.sock})")
        cluster.init()
        cluster.start()
        svc = Service(
            args.bin,
            service_env(os.path.join(root, "svcdata"), request_timeout, args.acquire_ms, cluster.url()),
            logdir,
            "pg-service",
        )
        svc.start()
        pid = svc.proc.pid
        log(f"pg: service pid {pid} on :{svc.port}, log {svc.log_path}")
        out["service_log"] = svc.log_path
        out["request_timeout_s"] = request_timeout
        load = Load(svc.port, args.threads, "pg", request_timeout + 10)
        mon = Monitor(svc.port)
        load.start()
        mon.start()
        modes = ["immediate", "fast", "immediate"][: args.outages] if args.outages <= 3 else (
            ["immediate", "fast"] * args.outages
        )[: args.outages]
        time.sleep(args.steady)
        for i, mode in enumerate(modes, 1):
            before = load.snapshot()
            ok_before = sum(1 for k, r in before if r.status in (200, 201))
            log(f"pg: outage {i}: pg_ctl stop -m {mode} ({ok_before} 2xx answers so far)")
            t_stop_req = time.monotonic()
            ok, msg = cluster.stop(mode)
            t_stopped = time.monotonic()
            if not ok:
                failures.append(f"outage {i}: pg_ctl stop -m {mode} failed: {msg}")
            time.sleep(args.outage_secs)
            t_restart_req = time.monotonic()
            t_accepting = cluster.start()
            log(f"pg: outage {i}: cluster accepts connections again after {ms(t_accepting - t_stop_req)} ms down")
            # Wait for recovery (first 2xx token answer started after the restart, /readyz 200).
            first_2xx = first_ready = None
            deadline = t_accepting + RECOVERY_LIMIT_S + args.request_timeout + 2
            while time.monotonic() < deadline and (first_2xx is None or first_ready is None):
                time.sleep(0.05)
                if first_2xx is None:
                    ends = [r.end for k, r in load.snapshot() if r.start >= t_accepting and r.status in (200, 201)]
                    if ends:
                        first_2xx = min(ends)
                if first_ready is None:
                    ends = [r.end for r in list(mon.readyz) if r.start >= t_accepting and r.status == 200]
                    if ends:
                        first_ready = min(ends)
            # Load goes on: after the recovery, nothing may fail any more.
            time.sleep(max(args.steady, RECOVERY_LIMIT_S + 1.0 - (time.monotonic() - t_accepting)))
            res = load.snapshot()
            # Started while the cluster was down: a 503 `unavailable` (bounded by the request
            # timeout), or a success that ended after the cluster was back.
            def served_after_return(r):
                return r.status in (200, 201) and r.end >= t_restart_req

            started = [(k, r) for k, r in res if t_stopped <= r.start < t_restart_req]
            during = [(k, r) for k, r in started if not served_after_return(r)]
            straddling = [(k, r) for k, r in res if r.end > t_stop_req and r.start < t_stopped]
            after = [(k, r) for k, r in res if r.start >= t_accepting]
            bad = []
            for k, r in during:
                p = check_unavailable(r, request_timeout)
                if p:
                    bad.append(f"{k} during the outage: {'; '.join(p)} body={r.body[:200]!r}")
            for k, r in res:
                if r.end > t_stop_req and r.start < t_restart_req and r.error:
                    bad.append(f"no answer around the outage: {r.error}")
                if r.end > t_stop_req and r.start < t_restart_req and r.took > request_timeout + 1.0:
                    bad.append(f"{k} around the outage took {ms(r.took)} ms (request timeout {request_timeout} s)")
            first_503 = [r.end for k, r in res if r.end >= t_stop_req and r.status == 503]
            fivehundreds = [r for k, r in res if r.end >= t_stop_req and r.status == 500]
            for r in fivehundreds:
                bad.append(f"500 answered: {r.body[:200]!r}")
            ready_started = [r for r in list(mon.readyz) if t_stopped <= r.start < t_restart_req]
            ready_during = [r for r in ready_started if not (r.status == 200 and r.end >= t_restart_req)]
            ready_bad = [r for r in ready_during if check_unavailable(r, request_timeout)]
            health_during = [r for r in list(mon.healthz) if r.start >= t_stop_req and r.end <= t_restart_req]
            health_bad = [r for r in health_during if r.status != 200]
            if ready_bad:
                bad.append(
                    f"/readyz during the outage: {len(ready_bad)} of {len(ready_during)} not a 503 unavailable "
                    f"({status_counts(ready_bad)}; e.g. {'; '.join(check_unavailable(ready_bad[0], request_timeout))})"
                )
            # A short outage (under the pool's acquire timeout) may be ridden out by waiting.
            long_outage = args.outage_secs >= args.acquire_ms / 1000.0 + 2.0
            if long_outage and not ready_during:
                bad.append("/readyz never answered during the outage")
            if health_bad:
                bad.append(f"/healthz during the outage: {status_counts(health_bad)}")
            if not first_503:
                bad.append("no 503 at all after the stop")
            if long_outage and not during:
                bad.append("no token request was refused during the outage")
            if not svc.alive():
                bad.append(f"the service exited ({svc.proc.returncode})")
            elif svc.proc.pid != pid:
                bad.append("the service was restarted")
            late = [r.end for k, r in after if r.status not in (200, 201)]
            last_failure = max(late) - t_accepting if late else None
            if last_failure is not None and last_failure > RECOVERY_LIMIT_S:
                bad.append(f"token requests still failing {ms(last_failure)} ms after the cluster was back")
            rec_2xx = None if first_2xx is None else first_2xx - t_accepting
            rec_ready = None if first_ready is None else first_ready - t_accepting
            if rec_2xx is None or rec_2xx > RECOVERY_LIMIT_S:
                bad.append(f"token requests not back within {RECOVERY_LIMIT_S} s: {ms(rec_2xx)} ms")
            if rec_ready is None or rec_ready > RECOVERY_LIMIT_S:
                bad.append(f"/readyz not 200 within {RECOVERY_LIMIT_S} s: {ms(rec_ready)} ms")
            durs = sorted(r.took for k, r in during)
            o = {
                "n": i,
                "mode": mode,
                "pg_ctl_stop_ms": ms(t_stopped - t_stop_req),
                "down_ms": ms(t_accepting - t_stop_req),
                "stop_to_first_503_ms": ms(min(first_503) - t_stop_req) if first_503 else None,
                "during_outage_token_answers": status_counts(r for k, r in during),
                "during_outage_codes": sorted({str(r.problem_code()) for k, r in during}),
                "during_outage_answer_ms_max": ms(durs[-1]) if durs else None,
                "during_outage_answer_ms_median": ms(durs[len(durs) // 2]) if durs else None,
                "in_flight_at_stop": status_counts(r for k, r in straddling),
                "started_in_outage_served_after_return": sum(1 for k, r in started if served_after_return(r)),
                "readyz_during_outage": status_counts(ready_during),
                "healthz_during_outage": status_counts(health_during),
                "accepting_to_first_token_2xx_ms": ms(rec_2xx),
                "accepting_to_readyz_200_ms": ms(rec_ready),
                "accepting_to_last_token_failure_ms": ms(last_failure),
                "after_restart_token_answers": status_counts(r for k, r in after),
                "500s": len(fivehundreds),
                "process_alive": svc.alive(),
                "problems": bad[:20],
                "problem_count": len(bad),
            }
            out["outages"].append(o)
            log(f"pg: outage {i} ({mode}): " + json.dumps({k: v for k, v in o.items() if k != "problems"}))
            for b in bad[:10]:
                log(f"pg:   PROBLEM {b}")
            failures.extend(f"outage {i}: {b}" for b in bad)
        time.sleep(args.steady)
        load.stop()
        mon.stop()
        # Everything acknowledged is readable, with its version and content.
        with load.lock:
            acked = dict(load.acked)
        unreadable = []
        for user in acked:
            r = request(svc.port, "GET", tokens_path(user), timeout=request_timeout + 5)
            if r.status != 200:
                unreadable.append(f"{user}: {r.status} {r.error or r.body[:120]!r}")
            elif not load.check_read(user, r):
                unreadable.append(f"{user}: wrong content")
        out["acknowledged_users"] = len(acked)
        out["acknowledged_unreadable"] = unreadable[:20]
        out["wrong_reads_under_load"] = load.wrong_reads[:20]
        if unreadable:
            failures.append(f"{len(unreadable)} acknowledged writes not readable: {unreadable[:5]}")
        if load.wrong_reads:
            failures.append(f"{len(load.wrong_reads)} reads under load returned the wrong bundle: {load.wrong_reads[:5]}")
        v = request(svc.port, "GET", "/api/v1/audit/verify", timeout=60)
        out["audit_verify_http"] = v.json if v.status == 200 else f"{v.status} {v.body[:200]!r}"
        if v.status != 200 or not isinstance(v.json, dict) or v.json.get("ok") is not True:
            failures.append(f"/api/v1/audit/verify: {v.status} {v.body[:200]!r}")
        out["service_log"] = log_findings(svc.log_path)
        if out["service_log"]["panics"]:
            failures.append(f"the service log shows {out['service_log']['panics']} panics")
        allres = load.snapshot()
        out["all_token_answers"] = status_counts(r for k, r in allres)
        out["all_put_answers"] = status_counts(r for k, r in allres if k == "put")
        out["all_get_answers"] = status_counts(r for k, r in allres if k == "get")
        code = svc.stop()
        out["service_exit_code"] = code
        if code != 0:
            failures.append(f"the service exited with {code} on SIGTERM")
        rc, so, se = svc.cli("audit", "verify")
        out["audit_verify_cli"] = so.strip() or se.strip().splitlines()[-1:]
        if rc != 0:
            failures.append(f"audit verify CLI exit {rc}: {so}{se}")
    except Exception as e:  # noqa: BLE001
        failures.append(f"pg phase aborted: {e}")
        traceback.print_exc()
    finally:
        if load:
            load.stop()
        if mon:
            mon.stop()
        if svc and svc.alive():
            svc.stop()
        if cluster and os.path.isdir(cluster.data):
            try:
                if cluster.running():
                    cluster.stop("immediate")
            except Exception as e:  # noqa: BLE001
                log(f"pg: cleanup: could not stop the private cluster: {e}")
        shutil.rmtree(root, ignore_errors=True)
        if svc and (failures or args.keep_logs):
            out["service_log_tail"] = svc.log_tail()
            log(f"pg: service log kept: {svc.log_path}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    out["failures"] = failures
    out["ok"] = not failures
    return not failures


# ---------------------------------------------------------------------------------------------
# SQLite disk full


def fill(path, chunk=1 << 16):
    """Writes zeros to `path` until the file system is full; returns the bytes written."""
    written = 0
    buf = b"\0" * chunk
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n = f.write(buf)
            except OSError:
                if chunk > 512:
                    chunk //= 8
                    buf = b"\0" * chunk
                    continue
                break
            if not n:
                break
            written += n
        try:
            os.fsync(f.fileno())
        except OSError:
            pass
    return written


def check_refusal(r, request_timeout, what):
    """Problems with an answer given while the disk is full: 2xx, or a 507/503 problem+json."""
    if r.error:
        return [f"{what}: no answer: {r.error} after {ms(r.took)} ms"]
    if r.status in (200, 201):
        return []
    bad = []
    j = r.json if isinstance(r.json, dict) else {}
    ctype = r.headers.get("content-type", "")
    if r.status not in (503, 507) or not ctype.startswith("application/problem+json"):
        bad.append(f"{what}: {r.status} {ctype} {r.body[:200]!r}")
    elif r.status == 507 and j.get("code") != "insufficient_storage":
        bad.append(f"{what}: 507 with code {j.get('code')!r}")
    elif r.status == 503 and j.get("code") != "unavailable":
        bad.append(f"{what}: 503 with code {j.get('code')!r}")
    if "retry-after" not in r.headers:
        bad.append(f"{what}: {r.status} without Retry-After")
    if r.took > request_timeout + 1.0:
        bad.append(f"{what}: {r.status} after {ms(r.took)} ms (request timeout {request_timeout} s)")
    return bad


def refusal_codes(resps):
    codes = {}
    for r in resps:
        if r.status not in (200, 201):
            c = f"{r.status} {r.problem_code()}" if r.status else "no_answer"
            codes[c] = codes.get(c, 0) + 1
    return codes


def log_findings(path):
    """Counts of ERROR lines and panics in a service log."""
    errors = panics = 0
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if '"level":"ERROR"' in line:
                    errors += 1
                if "panicked" in line:
                    panics += 1
    except OSError:
        pass
    return {"error_lines": errors, "panics": panics}


def fill_under_load(svc, load, filler, headroom, fill_secs):
    """Fills the tmpfs (leaving `headroom` bytes) while `load` runs, until the writes are refused
    for a while. Returns (filler bytes, seconds from full to the first refusal or None)."""
    filled = fill(filler)
    if headroom > 0:
        filled = max(0, filled - headroom)
        os.truncate(filler, filled)
    t_full = time.monotonic()
    while time.monotonic() - t_full < fill_secs:
        time.sleep(0.2)
        puts = [r for k, r in load.snapshot() if k == "put" and r.start >= t_full]
        recent = [r for r in puts if r.start >= time.monotonic() - 1.0]
        refused = [r for r in puts if r.status not in (200, 201)]
        if len(refused) >= 30 and recent and all(r.status not in (200, 201) for r in recent):
            break
    first = [r.end for k, r in load.snapshot() if k == "put" and r.start >= t_full and r.status not in (200, 201)]
    return filled, t_full, (min(first) - t_full) if first else None


def run_disk(args, report):
    out = {"ok": False}
    report["disk"] = out
    failures = []
    request_timeout = args.request_timeout
    mnt = tempfile.mkdtemp(prefix="cdb-outage-tmpfs-")
    logdir = tempfile.mkdtemp(prefix="cdb-outage-logs-")
    mounted = False
    svc = None
    load = None
    try:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_size},mode=0700", "tmpfs", mnt],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            reason = (p.stderr or p.stdout).strip() or f"mount exited {p.returncode}"
            out["skipped"] = reason
            if args.require_disk:
                log(f"disk: FAILED: cannot mount a tmpfs, and the disk phase is required: {reason}")
            else:
                log(f"disk: SKIPPED: cannot mount a tmpfs: {reason}")
            if args.require_disk:
                failures.append(f"cannot mount a tmpfs: {reason}")
            return not failures
        mounted = True
        data = os.path.join(mnt, "data")
        dbfile = os.path.join(data, "centraldb-mfa.db")
        filler = os.path.join(mnt, "filler")
        svc = Service(args.bin, service_env(data, request_timeout, args.acquire_ms), logdir, "disk-service")
        svc.start()
        pid = svc.proc.pid
        out["tmpfs_size"] = args.tmpfs_size
        out["threads"] = args.threads
        log(f"disk: service pid {pid} on :{svc.port}, data on a tmpfs of {args.tmpfs_size} at {mnt}")
        bad = []
        load = Load(svc.port, args.threads, "d", request_timeout + 10)
        load.start()
        time.sleep(args.steady)
        ok_before = sum(1 for k, r in load.snapshot() if r.status in (200, 201))

        # 1. The disk fills up under load.
        filled, t_full, first_refusal = fill_under_load(svc, load, filler, args.headroom, args.fill_secs)
        t_full_end = time.monotonic()
        st = os.statvfs(mnt)
        out["filler_bytes"] = filled
        out["free_bytes_at_end_of_fill"] = st.f_bavail * st.f_frsize
        out["ok_answers_before_fill"] = ok_before
        out["full_to_first_refusal_ms"] = ms(first_refusal)
        full = [(k, r) for k, r in load.snapshot() if r.start >= t_full and r.end <= t_full_end]
        full_puts = [r for k, r in full if k == "put"]
        full_gets = [r for k, r in full if k == "get"]
        for k, r in full:
            bad.extend(check_refusal(r, request_timeout, f"{k.upper()} with a full disk"))
        if not any(r.status not in (200, 201) for r in full_puts):
            bad.append(f"the disk never filled up within {args.fill_secs} s ({len(full_puts)} writes)")
        ready_full = request(svc.port, "GET", "/readyz", key=None, timeout=request_timeout + 5)
        health_full = request(svc.port, "GET", "/healthz", key=None, timeout=5)
        if health_full.status != 200:
            bad.append(f"/healthz with a full disk: {health_full.status} {health_full.error}")
        if not svc.alive() or svc.proc.pid != pid:
            bad.append("the service exited with a full disk")
        out["full_put_answers"] = status_counts(full_puts)
        out["full_put_refusals"] = refusal_codes(full_puts)
        out["full_get_answers"] = status_counts(full_gets)
        out["full_get_refusals"] = refusal_codes(full_gets)
        out["full_refusal_ms_max"] = ms(max((r.took for k, r in full if r.status not in (200, 201)), default=0))
        out["full_readyz"] = ready_full.status
        out["full_healthz"] = health_full.status
        log("disk: full: " + json.dumps({k: out[k] for k in ("full_put_answers", "full_put_refusals",
                                                              "full_get_refusals", "full_to_first_refusal_ms")}))

        # 2. Space returns: writes succeed again without a restart.
        os.unlink(filler)
        t_free = time.monotonic()
        rec = None
        while time.monotonic() - t_free < 30 and rec is None:
            time.sleep(0.02)
            ends = [r.end for k, r in load.snapshot() if k == "put" and r.start >= t_free and r.status in (200, 201)]
            if ends:
                rec = min(ends) - t_free
        time.sleep(args.steady)
        after = [(k, r) for k, r in load.snapshot() if r.start >= t_free + (rec or 0) + 0.5]
        out["space_back_to_first_2xx_ms"] = ms(rec)
        out["after_space_answers"] = status_counts(r for k, r in after)
        if rec is None or rec > RECOVERY_LIMIT_S:
            bad.append(f"writes not back within {RECOVERY_LIMIT_S} s of freeing space: {ms(rec)} ms")
        if any(r.status not in (200, 201) for k, r in after):
            bad.append(f"answers after recovery: {status_counts(r for k, r in after)}")
        ready = request(svc.port, "GET", "/readyz", key=None, timeout=10)
        out["after_readyz"] = ready.status
        if ready.status != 200:
            bad.append(f"/readyz after recovery: {ready.status}")

        # 3. Full again, and the service is stopped while the disk is full.
        filled2, t_full2, first2 = fill_under_load(svc, load, filler, 0, min(args.fill_secs, 10))
        load.stop()
        second = [(k, r) for k, r in load.snapshot() if r.start >= t_full2]
        for k, r in second:
            bad.extend(check_refusal(r, request_timeout, f"{k.upper()} with a full disk (2nd)"))
        out["full2_answers"] = status_counts(r for k, r in second)
        out["full2_refusals"] = refusal_codes(r for k, r in second)
        if not svc.alive() or svc.proc.pid != pid:
            bad.append("the service did not stay up")
        code = svc.stop()
        out["exit_code_stopped_while_full"] = code
        if code != 0:
            bad.append(f"the service exited with {code} on SIGTERM while the disk was full")
        os.unlink(filler)

        # 4. The file: integrity, and the acknowledged versions as stored.
        con = sqlite3.connect(dbfile)
        try:
            integrity = [row[0] for row in con.execute("PRAGMA integrity_check")]
            stored = dict(con.execute("SELECT user_id, version FROM token_bundles"))
        finally:
            con.close()
        out["integrity_check"] = integrity
        if integrity != ["ok"]:
            bad.append(f"PRAGMA integrity_check: {integrity[:5]}")
        with load.lock:
            acked = dict(load.acked)
            uncertain = {u: set(t) for u, t in load.uncertain.items()}
        wrong_v = [u for u, (ver, _) in acked.items() if stored.get(u) != ver and not uncertain.get(u)]
        out["acknowledged_users"] = len(acked)
        out["stored_version_mismatches"] = wrong_v[:20]
        if wrong_v:
            bad.append(f"{len(wrong_v)} stored versions differ from the acknowledged ones: {wrong_v[:5]}")
        rc, so, se = svc.cli("audit", "verify")
        out["audit_verify_cli"] = so.strip() or se.strip().splitlines()[-1:]
        if rc != 0:
            bad.append(f"audit verify CLI exit {rc}: {so}{se}")

        # 5. Restarted: every acknowledged write readable with its version, the chain verifies.
        svc.start()
        unreadable = []
        for user in acked:
            r = request(svc.port, "GET", tokens_path(user), timeout=request_timeout + 10)
            if r.status != 200:
                unreadable.append(f"{user}: {r.status} {r.error or r.body[:120]!r}")
            elif not load.check_read(user, r):
                unreadable.append(f"{user}: wrong content")
        out["acknowledged_unreadable"] = unreadable[:20]
        out["wrong_reads_under_load"] = load.wrong_reads[:20]
        if unreadable:
            bad.append(f"{len(unreadable)} acknowledged writes not readable: {unreadable[:5]}")
        if load.wrong_reads:
            bad.append(f"{len(load.wrong_reads)} reads returned the wrong bundle: {load.wrong_reads[:5]}")
        v = request(svc.port, "GET", "/api/v1/audit/verify", timeout=60)
        out["audit_verify_http"] = v.json if v.status == 200 else f"{v.status} {v.body[:200]!r}"
        if v.status != 200 or not isinstance(v.json, dict) or v.json.get("ok") is not True:
            bad.append(f"/api/v1/audit/verify: {v.status} {v.body[:200]!r}")
        code = svc.stop()
        if code != 0:
            bad.append(f"the restarted service exited with {code} on SIGTERM")
        allres = load.snapshot()
        out["all_put_answers"] = status_counts(r for k, r in allres if k == "put")
        out["all_get_answers"] = status_counts(r for k, r in allres if k == "get")
        out["service_log"] = log_findings(svc.log_path)
        if out["service_log"]["panics"]:
            bad.append(f"the service log shows {out['service_log']['panics']} panics")
        failures.extend(bad)
        for b in bad[:10]:
            log(f"disk:   PROBLEM {b}")
    except Exception as e:  # noqa: BLE001
        failures.append(f"disk phase aborted: {e}")
        traceback.print_exc()
    finally:
        if load:
            load.stop()
        if svc and svc.alive():
            svc.stop()
        if mounted:
            u = subprocess.run(["umount", mnt], capture_output=True, text=True)
            if u.returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True, text=True)
        try:
            os.rmdir(mnt)
        except OSError as e:
            log(f"disk: cleanup: {mnt}: {e}")
        if svc and (failures or args.keep_logs):
            out["service_log_tail"] = svc.log_tail()
            log(f"disk: service log kept: {svc.log_path}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    out["failures"] = failures
    out["ok"] = not failures
    return not failures


def psql(cluster, db, sql):
    return as_postgres(
        [find_pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(cluster.port),
         "-U", "postgres", "-d", db, "-At", "-c", sql]
    )


def run_pgdisk(args, report):
    """PostgreSQL with its data (not its WAL) on a small tmpfs: a tablespace that fills up.
    Writes must be refused with 507 (SQLSTATE 53100) or 503, never 500, and come back once
    space returns."""
    out = {"ok": False}
    report["pgdisk"] = out
    failures = []
    request_timeout = args.request_timeout
    root = tempfile.mkdtemp(prefix="cdb-outage-pgdisk-")
    mnt = tempfile.mkdtemp(prefix="cdb-outage-tmpfs-")
    logdir = tempfile.mkdtemp(prefix="cdb-outage-logs-")
    mounted = False
    cluster = svc = load = None
    try:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_size},mode=0700", "tmpfs", mnt],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            reason = (p.stderr or p.stdout).strip() or f"mount exited {p.returncode}"
            out["skipped"] = reason
            if args.require_disk:
                log(f"pgdisk: FAILED: cannot mount a tmpfs, and the pgdisk phase is required: {reason}")
            else:
                log(f"pgdisk: SKIPPED: cannot mount a tmpfs: {reason}")
            if args.require_disk:
                failures.append(f"cannot mount a tmpfs: {reason}")
            return not failures
        mounted = True
        ts = os.path.join(mnt, "ts")
        os.mkdir(ts, 0o700)
        shutil.chown(mnt, user="postgres")
        shutil.chown(ts, user="postgres")
        cluster = Cluster(root)
        cluster.init()
        cluster.start()
        for sql, db in (
            (f"CREATE TABLESPACE small LOCATION '{ts}'", "postgres"),
            ("CREATE DATABASE cdb TABLESPACE small", "postgres"),
            ("CREATE EXTENSION amcheck", "cdb"),
        ):
            q = psql(cluster, db, sql)
            if q.returncode != 0:
                raise RuntimeError(f"{sql}: {q.stderr.strip()}")
        url = f"postgres://postgres@127.0.0.1:{cluster.port}/cdb"
        svc = Service(
            args.bin,
            service_env(os.path.join(root, "svcdata"), request_timeout, args.acquire_ms, url),
            logdir,
            "pgdisk-service",
        )
        svc.start()
        pid = svc.proc.pid
        out["tmpfs_size"] = args.tmpfs_size
        log(f"pgdisk: service pid {pid} on :{svc.port}; database cdb in a tablespace on a tmpfs of {args.tmpfs_size}")
        bad = []
        load = Load(svc.port, args.threads, "pd", request_timeout + 10)
        load.start()
        time.sleep(args.steady)
        filler = os.path.join(mnt, "filler")
        filled, t_full, first_refusal = fill_under_load(svc, load, filler, args.headroom, args.fill_secs)
        t_full_end = time.monotonic()
        full = [(k, r) for k, r in load.snapshot() if r.start >= t_full and r.end <= t_full_end]
        full_puts = [r for k, r in full if k == "put"]
        for k, r in full:
            bad.extend(check_refusal(r, request_timeout, f"{k.upper()} with a full tablespace"))
        if not any(r.status not in (200, 201) for r in full_puts):
            bad.append(f"the tablespace never filled up within {args.fill_secs} s ({len(full_puts)} writes)")
        health = request(svc.port, "GET", "/healthz", key=None, timeout=5)
        if health.status != 200:
            bad.append(f"/healthz with a full tablespace: {health.status} {health.error}")
        out["filler_bytes"] = filled
        out["full_to_first_refusal_ms"] = ms(first_refusal)
        out["full_put_answers"] = status_counts(full_puts)
        out["full_put_refusals"] = refusal_codes(full_puts)
        out["full_get_answers"] = status_counts(r for k, r in full if k == "get")
        out["full_get_refusals"] = refusal_codes(r for k, r in full if k == "get")
        out["full_healthz"] = health.status
        log("pgdisk: full: " + json.dumps({k: out[k] for k in ("full_put_answers", "full_put_refusals",
                                                                "full_get_refusals", "full_to_first_refusal_ms")}))
        os.unlink(filler)
        t_free = time.monotonic()
        rec = None
        while time.monotonic() - t_free < 30 and rec is None:
            time.sleep(0.02)
            ends = [r.end for k, r in load.snapshot() if k == "put" and r.start >= t_free and r.status in (200, 201)]
            if ends:
                rec = min(ends) - t_free
        time.sleep(args.steady)
        load.stop()
        after = [(k, r) for k, r in load.snapshot() if r.start >= t_free + (rec or 0) + 0.5]
        out["space_back_to_first_2xx_ms"] = ms(rec)
        out["after_space_answers"] = status_counts(r for k, r in after)
        if rec is None or rec > RECOVERY_LIMIT_S:
            bad.append(f"writes not back within {RECOVERY_LIMIT_S} s of freeing space: {ms(rec)} ms")
        if any(r.status not in (200, 201) for k, r in after):
            bad.append(f"answers after recovery: {status_counts(r for k, r in after)}")
        with load.lock:
            acked = dict(load.acked)
        unreadable = []
        for user in acked:
            r = request(svc.port, "GET", tokens_path(user), timeout=request_timeout + 10)
            if r.status != 200:
                unreadable.append(f"{user}: {r.status} {r.error or r.body[:120]!r}")
            elif not load.check_read(user, r):
                unreadable.append(f"{user}: wrong content")
        out["acknowledged_users"] = len(acked)
        out["acknowledged_unreadable"] = unreadable[:20]
        if unreadable:
            bad.append(f"{len(unreadable)} acknowledged writes not readable: {unreadable[:5]}")
        if load.wrong_reads:
            bad.append(f"{len(load.wrong_reads)} reads returned the wrong bundle: {load.wrong_reads[:5]}")
        v = request(svc.port, "GET", "/api/v1/audit/verify", timeout=60)
        out["audit_verify_http"] = v.json if v.status == 200 else f"{v.status} {v.body[:200]!r}"
        if v.status != 200 or not isinstance(v.json, dict) or v.json.get("ok") is not True:
            bad.append(f"/api/v1/audit/verify: {v.status} {v.body[:200]!r}")
        if not svc.alive() or svc.proc.pid != pid:
            bad.append("the service did not stay up")
        code = svc.stop()
        if code != 0:
            bad.append(f"the service exited with {code} on SIGTERM")
        amcheck = as_postgres(
            [find_pg_bin("pg_amcheck"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", "cdb",
             "--heapallindexed"]
        )
        out["pg_amcheck"] = "ok" if amcheck.returncode == 0 else (amcheck.stdout + amcheck.stderr).strip()[:500]
        if amcheck.returncode != 0:
            bad.append(f"pg_amcheck: {out['pg_amcheck']}")
        out["service_log"] = log_findings(svc.log_path)
        if out["service_log"]["panics"]:
            bad.append(f"the service log shows {out['service_log']['panics']} panics")
        failures.extend(bad)
        for b in bad[:10]:
            log(f"pgdisk:   PROBLEM {b}")
    except Exception as e:  # noqa: BLE001
        failures.append(f"pgdisk phase aborted: {e}")
        traceback.print_exc()
    finally:
        if load:
            load.stop()
        if svc and svc.alive():
            svc.stop()
        if cluster and os.path.isdir(cluster.data):
            try:
                if cluster.running():
                    cluster.stop("immediate")
            except Exception as e:  # noqa: BLE001
                log(f"pgdisk: cleanup: could not stop the private cluster: {e}")
        if mounted:
            u = subprocess.run(["umount", mnt], capture_output=True, text=True)
            if u.returncode != 0:
                subprocess.run(["umount", "-l", mnt], capture_output=True, text=True)
        for d in (mnt, root):
            shutil.rmtree(d, ignore_errors=True)
        if svc and (failures or args.keep_logs):
            out["service_log_tail"] = svc.log_tail()
            log(f"pgdisk: service log kept: {svc.log_path}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    out["failures"] = failures
    out["ok"] = not failures
    return not failures


def main():
    ap = argparse.ArgumentParser(
        description="Database outage checks for centraldb-mfa: a private PostgreSQL cluster stopped under load "
        "(pg), and the SQLite disk filling up on a small tmpfs (disk). Needs root for runuser/mount."
    )
    ap.add_argument("--bin", default="target/debug/centraldb-mfa", help="the service binary (default: %(default)s)")
    ap.add_argument("--json", metavar="OUT", help="write the figures and findings as JSON to OUT")
    ap.add_argument(
        "--only",
        choices=["pg", "disk", "pgdisk"],
        help="run one phase only: pg (cluster stops), disk (SQLite on a full tmpfs), pgdisk (a PostgreSQL "
        "tablespace on a full tmpfs; an extra)",
    )
    ap.add_argument("--threads", type=int, default=6, help="load threads on PostgreSQL (default: %(default)s)")
    ap.add_argument("--outages", type=int, default=3, help="PostgreSQL outages in a row (default: %(default)s)")
    ap.add_argument("--outage-secs", type=float, default=5.0, help="how long each outage lasts (default: %(default)s)")
    ap.add_argument("--steady", type=float, default=2.0, help="seconds of load before each outage (default: %(default)s)")
    ap.add_argument(
        "--request-timeout", type=int, default=3, help="CENTRALDB_REQUEST_TIMEOUT_SECS for the service (default: %(default)s)"
    )
    ap.add_argument(
        "--acquire-ms", type=int, default=1000, help="CENTRALDB_DB_ACQUIRE_TIMEOUT_MS for the service (default: %(default)s)"
    )
    ap.add_argument("--tmpfs-size", default="16m", help="size of the tmpfs for the SQLite disk test (default: %(default)s)")
    ap.add_argument("--fill-secs", type=float, default=60.0, help="longest time spent filling the disk (default: %(default)s)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the service logs (always kept on failure)")
    ap.add_argument(
        "--headroom",
        default=128 * 1024,
        type=int,
        help="bytes the filler file leaves free for token writes to use up (default: %(default)s)",
    )
    ap.add_argument(
        "--require-disk",
        action="store_true",
        help="fail (instead of SKIPPED) when no tmpfs can be mounted (always so with CI=true)",
    )
    ap.add_argument(
        "--log-dir",
        metavar="DIR",
        help="run the services at RUST_LOG=trace, keep their logs in DIR and register the run's secrets there "
        "(secrets-outage.txt) for scripts/scan-logs.py",
    )
    args = ap.parse_args()
    if os.environ.get("CI") == "true":
        args.require_disk = True  # in CI a phase that cannot run fails
    global LOG_DIR, SECRETS
    if args.log_dir:
        LOG_DIR = os.path.abspath(os.path.join(args.log_dir, "outage"))
        os.makedirs(LOG_DIR, exist_ok=True)
        SECRETS = harness.SecretLog(os.path.join(LOG_DIR, "secrets-outage.txt"), flush=True)
        SECRETS.add(ADMIN_KEY)
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        ap.error(f"--bin {args.bin} is not an executable (build it with cargo build)")
    report = {"bin": args.bin, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # SIGTERM unwinds like Ctrl-C, so the cluster is stopped and the tmpfs unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A private copy: other builds may relink the binary while this runs.
    bindir = tempfile.mkdtemp(prefix="cdb-outage-bin-")
    try:
        args.bin = shutil.copy2(args.bin, os.path.join(bindir, os.path.basename(args.bin)))
        ok = True
        if args.only in (None, "pg"):
            ok &= run_pg(args, report)
        if args.only in (None, "disk"):
            ok &= run_disk(args, report)
        if args.only in (None, "pgdisk"):
            ok &= run_pgdisk(args, report)
    finally:
        shutil.rmtree(bindir, ignore_errors=True)
    report["ok"] = ok
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    skipped = [name for name in ("pg", "disk", "pgdisk") if isinstance(report.get(name), dict) and report[name].get("skipped")]
    print("RESULT:", "PASS" if ok else "FAIL", f"({', '.join(skipped)} SKIPPED)" if skipped else "", flush=True)
    if skipped and args.require_disk:
        print(f"RESULT: FAIL: {', '.join(skipped)} could not run (required with --require-disk / CI=true)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
