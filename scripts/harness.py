"""Shared harness of the scripts that run the real centraldb-mfa binary (python3 stdlib only).

Used by crash-safety.py, rotation.py, outage.py and timing-oracle.py (each imports it as
`harness`: the scripts' folder is first on sys.path when a script runs):

- process bookkeeping: every child registered here is killed, and every clean-up callable run
  once, on exit or on SIGINT/SIGTERM (`install_cleanup`, `add_cleanup`, `track`);
- `Deployment`: one data dir, admin key, keyring and (PostgreSQL) a fresh database, with the
  CLI, direct SQL (only for the fault self-tests) and the run's secrets (`SecretLog`, the
  format scripts/scan-logs.py reads);
- `Server`: one `serve` process, its output kept in a log file, ready when /readyz answers 200;
- `request` (one JSON request, optionally on a kept-alive connection), `token_body` /
  `stored_marker` (a token bundle whose four secret fields carry one marker), `Ledger` (what
  the clients learnt: acknowledged, refused and unknown-outcome writes) and `audit_verify`
  (`audit verify` on the CLI and GET /api/v1/audit/verify).
"""

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
DEFAULT_BIN = "target/debug/centraldb-mfa"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"

_children = []  # live child processes, killed on exit
_cleanups = []  # callables run once on exit (drop PG database, remove temp dirs)
_cleaned = False


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Clean-up on exit
# --------------------------------------------------------------------------------------------


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


def install_cleanup():
    """`cleanup` at exit and on SIGINT/SIGTERM."""
    atexit.register(cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def add_cleanup(fn, last=False):
    """Runs `fn` once on exit; clean-ups run newest first, a `last` one after all others."""
    if last:
        _cleanups.insert(0, fn)
    else:
        _cleanups.append(fn)


def track(proc):
    _children.append(proc)
    return proc


def untrack(proc):
    if proc in _children:
        _children.remove(proc)


def kill_children():
    """Kills every child still running (after a backend, whatever its outcome)."""
    for p in list(_children):
        if p.poll() is None:
            p.kill()
            p.wait()
        _children.remove(p)


def terminate(proc, timeout=20):
    """SIGTERM (graceful), SIGKILL after `timeout` s; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# --------------------------------------------------------------------------------------------
# A run: binary, work dir, log dir
# --------------------------------------------------------------------------------------------


def binary_ok(path):
    """False (with the error printed) when the binary to test is missing."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return True
    print(f"error: binary {path!r} not found; build it first (cargo build)", file=sys.stderr)
    return False


def start_run(args, prefix):
    """Installs the clean-up, makes the work dir (removed at exit unless --keep), makes
    --log-dir absolute and replaces args.bin by a private copy (other builds may relink
    target/debug while this runs). Returns the work dir."""
    if args.log_dir:
        args.log_dir = os.path.abspath(args.log_dir)
        os.makedirs(args.log_dir, exist_ok=True)
    install_cleanup()
    workdir = tempfile.mkdtemp(prefix=prefix)
    if args.keep:
        log(f"keeping {workdir}")
    else:
        add_cleanup(lambda: shutil.rmtree(workdir, ignore_errors=True), last=True)
    snapshot = os.path.join(workdir, "centraldb-mfa")
    shutil.copy2(os.path.abspath(args.bin), snapshot)
    args.bin = snapshot
    return workdir


def add_target_args(ap):
    """--bin and --backend (first in every load script's options)."""
    ap.add_argument("--bin", default=DEFAULT_BIN, help="binary to test (not built by this script)")
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")


def backends_of(args):
    return ["sqlite", "postgres"] if args.backend == "both" else [args.backend]


def add_run_args(ap):
    """The options every load script shares (after its own)."""
    ap.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="server to create a fresh database on (dropped afterwards)",
    )
    ap.add_argument(
        "--log-dir",
        metavar="DIR",
        help="run the servers at RUST_LOG=trace, keep their output in DIR and register the run's secrets there "
        "(secrets-*.txt) for scripts/scan-logs.py",
    )
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and server logs (path is printed)")
    ap.add_argument("--json", metavar="OUT", help="write the summary as JSON to OUT")


def run_backends(args, backends, run_one):
    """run_one(backend) for each backend; a start-up failure etc. is a failed backend, not a
    crash of the script. Children left running are killed after each backend."""
    results = []
    for b in backends:
        try:
            results.append(run_one(b))
        except Exception as e:
            results.append({"backend": b, "ok": False, "error": f"{type(e).__name__}: {e}"})
            log(f"{b}: ERROR {type(e).__name__}: {e}")
        kill_children()
    return results


def finish(args, seed, t0, failed, results):
    """The summary's last line (the reliability runner greps `total ...: FAIL`) and --json."""
    total = round(time.monotonic() - t0, 1)
    print(f"  total {total} s, seed {seed}: {'FAIL' if failed else 'PASS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": seed, "seconds": total, "ok": not failed, "backends": results}, f, indent=2)
    return 1 if failed else 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_key(prefix):
    return prefix + "".join(random.SystemRandom().choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(BOOT_KEY_LEN))


def keygen(binary, kid):
    r = subprocess.run([binary, "keygen", "--id", kid], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not r.stdout.strip().startswith(f"{kid}:"):
        raise RuntimeError(f"keygen --id {kid} failed: {r.stderr}")
    return r.stdout.strip()


# --------------------------------------------------------------------------------------------
# Secrets registered for scripts/scan-logs.py
# --------------------------------------------------------------------------------------------


class SecretLog:
    """The secrets a run used, one JSON string a line (the format scripts/scan-logs.py reads)."""

    def __init__(self, path, flush=False):
        self.lock = threading.Lock()
        self.flush = flush
        self.f = open(path, "a", encoding="utf-8")
        add_cleanup(self.f.close)

    def add(self, *secrets):
        with self.lock:
            for s in secrets:
                self.f.write(json.dumps(s) + "\n")
            if self.flush:
                self.f.flush()

    def add_keyring(self, spec):
        """`id:base64,...`: the spec, each key in base64 and in hex."""
        self.add(spec)
        for part in spec.split(","):
            b64 = part.split(":", 1)[-1]
            self.add(b64, base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex())

    def add_bundle(self, body):
        o1, o2 = body["oauth1_token"], body["oauth2_token"]
        self.add(o1["oauth_token"], o1["oauth_token_secret"], o2["access_token"], o2["refresh_token"])


# --------------------------------------------------------------------------------------------
# Deployment and server process
# --------------------------------------------------------------------------------------------


class Deployment:
    """One deployment of a script (`name`) on one backend: data dir, bootstrap admin key, the
    keyring (keygen of each id in `key_ids`; the first one configured), a fresh PostgreSQL
    database. With a `port` the server always listens there (clients keep going across
    restarts), else on a free one it reports. `extra_secrets` are registered with --log-dir."""

    def __init__(self, args, backend, workdir, name, key_ids=("k1",), port=None, env=None, extra_secrets=()):
        self.bin = args.bin
        self.name = name
        self.backend = backend
        self.dir = os.path.join(workdir, backend)
        self.data = os.path.join(self.dir, "data")
        os.makedirs(self.dir, mode=0o700)
        self.admin_key = random_key(f"{name}-")
        self.keys = {kid: keygen(self.bin, kid) for kid in key_ids}
        self.port = port
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "RUST_LOG": "info",
            "CENTRALDB_LOG_FORMAT": "json",
            "CENTRALDB_LISTEN": f"127.0.0.1:{port or 0}",
            "CENTRALDB_DATA_DIR": self.data,
            "CENTRALDB_ENCRYPTION_KEYS": self.keys[key_ids[0]],
            "CENTRALDB_BOOTSTRAP_ADMIN_KEY": self.admin_key,
            **(env or {}),
        }
        self.db_name = None
        self.log_dir = None
        self.secrets = None
        if args.log_dir:
            self.log_dir = os.path.join(args.log_dir, f"{name}-{backend}")
            os.makedirs(self.log_dir, exist_ok=True)
            self.env["RUST_LOG"] = "trace"
            self.secrets = SecretLog(os.path.join(self.log_dir, f"secrets-{name}-{backend}.txt"))
            self.secrets.add(self.admin_key, *extra_secrets)
            for spec in self.keys.values():
                self.secrets.add_keyring(spec)
        if backend == "postgres":
            self._create_pg_database(args.postgres_url)

    def secret(self, *values):
        if self.secrets:
            self.secrets.add(*values)

    def bundle(self, marker):
        """The token body of a write; its secrets registered for the log scan."""
        b = token_body(marker)
        if self.secrets:
            self.secrets.add_bundle(b)
        return b

    def _create_pg_database(self, base_url):
        if shutil.which("psql") is None:
            raise RuntimeError("psql not found (needed to create the PostgreSQL database)")
        name = f"{self.name.replace('-', '_')}_{os.getpid()}_{random.SystemRandom().randrange(1 << 30)}"
        r = subprocess.run(
            ["psql", base_url, "-v", "ON_ERROR_STOP=1", "-qc", f'CREATE DATABASE "{name}"'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"cannot create PostgreSQL database: {r.stderr.strip()}")
        self.db_name = name

        def drop():
            subprocess.run(
                ["psql", base_url, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                capture_output=True,
                timeout=60,
            )

        add_cleanup(drop)
        u = urllib.parse.urlsplit(base_url)
        self.env["CENTRALDB_DATABASE_URL"] = urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + name, u.query, ""))

    def _psql(self, flags, sql):
        r = subprocess.run(
            ["psql", self.env["CENTRALDB_DATABASE_URL"], "-v", "ON_ERROR_STOP=1", flags, sql],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr.strip()}")
        return r.stdout

    def exec_sql(self, sql):
        """Runs SQL directly against the deployment's database (only for --inject-fault)."""
        if self.backend == "sqlite":
            import sqlite3

            db = sqlite3.connect(os.path.join(self.data, "centraldb-mfa.db"), timeout=30)
            try:
                db.execute(sql)
                db.commit()
            finally:
                db.close()
            return
        self._psql("-qc", sql)

    def query_scalar(self, sql):
        """One integer from a read-only query, straight from the database."""
        if self.backend == "sqlite":
            import sqlite3

            db = sqlite3.connect(f"file:{os.path.join(self.data, 'centraldb-mfa.db')}?mode=ro", uri=True, timeout=30)
            try:
                return int(db.execute(sql).fetchone()[0])
            finally:
                db.close()
        return int(self._psql("-tAqc", sql).strip())

    def cli(self, *cli_args, env=None):
        return subprocess.Popen(
            [self.bin, *cli_args],
            env={**self.env, "RUST_LOG": "warn", **(env or {})},
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run_cli(self, *cli_args, timeout=120, env=None):
        """Runs a CLI command to completion; returns (exit code, stdout, stderr)."""
        p = track(self.cli(*cli_args, env=env))
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            untrack(p)
        if self.log_dir:
            with open(os.path.join(self.log_dir, "cli.log"), "a") as f:
                f.write((out or "") + (err or ""))
        return p.returncode, out, err


class Server:
    """One `serve` process; its combined output goes to `serve-<name>.log` in the log dir (or
    the deployment's dir). The address is the deployment's port, or the one the server logs."""

    def __init__(self, dep, name):
        self.log_path = os.path.join(dep.log_dir or dep.dir, f"serve-{name}.log")
        self.proc = track(
            subprocess.Popen(
                [dep.bin, "serve"],
                env=dict(dep.env),
                cwd=dep.dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
        self.addr = None
        self.host, self.port = ("127.0.0.1", dep.port) if dep.port else (None, None)
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
                    f = v.get("fields", {}) if isinstance(v, dict) else {}
                    if f.get("message") == "centraldb-mfa listening":
                        self.addr = f.get("addr")

    def log_tail(self, n=5):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail(1)}")
            if self.port is None and self.addr:
                host, port = self.addr.rsplit(":", 1)
                self.host, self.port = host, int(port)
            if self.port is not None:
                try:
                    st, _ = request(self.host, self.port, "GET", "/readyz", None, {}, timeout=3)
                    if st == 200:
                        return
                except (OSError, http.client.HTTPException):
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"/readyz not ready within {timeout}s; see {self.log_path}")

    def _reap(self):
        self._reader.join(timeout=10)
        untrack(self.proc)

    def stop(self, timeout=30):
        """SIGTERM (graceful: in-flight requests finish); returns the exit code."""
        rc = terminate(self.proc, timeout)
        self._reap()
        return rc

    def sigkill(self):
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=30)
        self._reap()
        return rc


def request(host, port, method, path, body, headers, timeout=15, conn=None):
    """One JSON request (on `conn` when given); returns (status, parsed JSON body or None)."""
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


def audit_verify(dep, host, port):
    """`audit verify` (CLI) and GET /api/v1/audit/verify: (cli ok, the CLI's `audit chain`
    line, http ok, the HTTP answer)."""
    rc, out, err = dep.run_cli("audit", "verify")
    text = (out + err).strip()
    cli_ok = rc == 0 and "audit chain ok" in text
    lines = [ln for ln in text.splitlines() if "audit chain" in ln] or text.splitlines()
    try:
        st, body = request(
            host, port, "GET", "/api/v1/audit/verify", None, {"Authorization": f"Bearer {dep.admin_key}"}, timeout=120
        )
        http_ok = st == 200 and bool(body) and body.get("ok") is True
        http_desc = json.dumps(body) if body is not None else f"HTTP {st}"
    except (OSError, http.client.HTTPException) as e:
        http_ok, http_desc = False, f"error: {e}"
    return cli_ok, lines[-1] if lines else f"exit {rc}", http_ok, http_desc


# --------------------------------------------------------------------------------------------
# Bundles, markers, bookkeeping
# --------------------------------------------------------------------------------------------


def token_body(marker):
    """A garth bundle whose four secret fields and `jti` all carry `marker`."""
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
    """The marker of a stored bundle; `MIXED:...` when its fields come from different writes,
    None when it is not a bundle."""
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
    """What the clients learnt: acknowledged (version, marker) per user, writes refused with
    412 and writes of unknown outcome (in flight at a kill or restart, or answered 5xx)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.known = {}  # user -> version the writers use for If-Match (absent: If-None-Match)
        self.acks = {}  # user -> {version: marker}
        self.unknown = {}  # user -> set of markers whose outcome is unknown
        self.refused = {}  # user -> set of markers answered 412
        self.n_acks = 0
        self.duplicate_acks = []
        self.lost = set()  # (user, version) of acknowledged writes found missing

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

    def refuse(self, user, marker, current_version):
        """A 412: the write did not happen; the writers move on to the current version."""
        with self.lock:
            self.refused.setdefault(user, set()).add(marker)
            k = self.known.get(user)
            if current_version is not None and (k is None or int(current_version) > k):
                self.known[user] = int(current_version)

    def unknown_outcome(self, user, marker):
        with self.lock:
            self.unknown.setdefault(user, set()).add(marker)

    def view(self, user):
        """(acks {version: marker}, unknown markers, refused markers) of one user, copied."""
        with self.lock:
            return (
                dict(self.acks.get(user, {})),
                set(self.unknown.get(user, set())),
                set(self.refused.get(user, set())),
            )

    def max_ack(self, user):
        with self.lock:
            per = self.acks.get(user)
            if not per:
                return None, None
            v = max(per)
            return v, per[v]
