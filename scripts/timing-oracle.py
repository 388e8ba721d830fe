#!/usr/bin/env python3
"""API-key timing oracle: do rejected keys of different kinds take measurably different times?

    scripts/timing-oracle.py [--bin target/release/centraldb-mfa] [-n 20000] [--data-dir DIR]
                             [--database-url postgres://...] [--json out.json]
    scripts/timing-oracle.py --url HOST:PORT --known KEY --revoked KEY

Without --url it starts the binary itself (SQLite in a fresh data folder, on /dev/shm when there
is one, so that fsync noise does not drown the signal), creates two API keys with the CLI,
revokes one, and serves on a free loopback port. With --url it measures a running server (give
a valid key with --known and a revoked one with --revoked).

One keep-alive HTTP/1.1 connection sends GET /api/v1/users/oracle/auth-status with these
`Authorization` kinds, N of each after a warm-up, in N blocks that hold each kind once in a
random order (so load drift hits every kind alike):

  unknown      Bearer cdbm_<43 random base64url chars>      (a well-formed key never issued)
  known-prefix Bearer <a valid key's first 12 chars><36 random chars>  (right prefix, wrong secret)
  revoked      Bearer <a revoked key>                       (same answer as unknown: 401)
  garbage      Bearer <random junk of random length>
  malformed    Basic <junk>                                 (refused before any key check)

The time of each request is measured from sending to the end of the response on the client.
Per kind: median, p10 and p90 (microseconds); against `unknown`: the difference of medians with
a 95% bootstrap confidence interval (percentile method, blocks resampled, --boot resamples). A difference whose
interval excludes 0 AND exceeds --threshold-us is reported as MEASURABLE; the key kinds an
attacker could tell apart are `known-prefix` and `revoked` (the answer is the same 401).
`garbage`/`malformed` are syntactic and shown for reference only.

Exit 1 (FAILED) only on the oracle that matters: `known-prefix` (a right key prefix with a wrong
secret, which would let a guesser confirm a prefix) against `unknown`, when the whole 95% interval
lies beyond --fail-us (default 15 µs: an order above what a noisy 2-core machine shows for the
identical code path, and far below what an extra query or a prefix-only lookup costs). The
`revoked` comparison stays report-only: revoking costs a small real difference (a cache sweep for
a real key id, +2 to +6 µs in debug builds), which no threshold separates from noise robustly.

`--log-dir DIR`: the measured server's output goes to DIR, and before the measurement a second
server on the same data runs at RUST_LOG=trace for a probe (every kind 50 times and the valid
key), its output in DIR too; the keys used are registered in DIR/secrets-timing-oracle.txt for
scripts/scan-logs.py.
"""

import argparse
import base64
import http.client
import json
import os
import random
import secrets as rnd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from harness import free_port, terminate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/api/v1/users/oracle/auth-status"
ORACLE_KINDS = ("known-prefix", "revoked")


def b64key():
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def serve(binary, env, log_path=None):
    """`serve` on a free port; returns (process, addr). Output to `log_path` (or discarded)."""
    port = free_port()
    env = {**env, "CENTRALDB_LISTEN": f"127.0.0.1:{port}"}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([binary, "serve"], env=env, stdout=out, stderr=out)
    if log_path:
        out.close()
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                c.close()
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"server did not start (log: {log_path})")


def start_server(binary, data_dir, database_url=None, log_dir=None):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CENTRALDB_DATA_DIR": data_dir,
        "CENTRALDB_LOG_FORMAT": "json",
        "RUST_LOG": "warn",
        # Tens of thousands of refused requests come from this one address: past the default
        # budget they would be answered 429 (tested in tests/api/auth.rs); here each must be
        # checked like any other request.
        "CENTRALDB_REFUSAL_BUDGET": "10000000",
    }

    def cli(*args):
        out = subprocess.run([binary, *args], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            sys.exit(f"{' '.join(args)} failed: {out.stderr}")
        return out.stdout

    if database_url:
        env["CENTRALDB_DATABASE_URL"] = database_url
        env["CENTRALDB_ENCRYPTION_KEYS"] = cli("keygen", "--id", "k1").strip()

    known = cli("api-key", "create", "--name", "oracle-known", "--scope", "tokens:read").strip()
    revoked = cli("api-key", "create", "--name", "oracle-revoked", "--scope", "tokens:read").strip()
    rid = next(ln.split()[0] for ln in cli("api-key", "list").splitlines() if "oracle-revoked" in ln)
    cli("api-key", "revoke", rid)
    if log_dir:
        with open(os.path.join(log_dir, "secrets-timing-oracle.txt"), "a") as f:
            for sec in [known, revoked] + ([env["CENTRALDB_ENCRYPTION_KEYS"]] if database_url else []):
                f.write(json.dumps(sec) + "\n")
        trace_probe(binary, env, log_dir, known, revoked)
    proc, addr = serve(binary, env, os.path.join(log_dir, "serve-measured.log") if log_dir else None)
    return proc, addr, known, revoked


def trace_probe(binary, env, log_dir, known, revoked, per_kind=50):
    """A server at RUST_LOG=trace on the same data answers every kind of key (and the valid one)
    `per_kind` times; its log goes to the scan, with every presented key registered."""
    proc, addr = serve(binary, {**env, "RUST_LOG": "trace"}, os.path.join(log_dir, "serve-trace-probe.log"))
    presented = [known]
    try:
        host, port = addr.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for kind in ("unknown", "known-prefix", "revoked", "garbage", "malformed") * per_kind + ("valid",):
            h = "Bearer " + known if kind == "valid" else header_for(kind, known, revoked)
            presented.append(h.split(" ", 1)[1])
            conn.request("GET", PATH, headers={"Authorization": h})
            r = conn.getresponse()
            r.read()
            if r.status != (200 if kind == "valid" else 401):
                sys.exit(f"trace probe: {kind} answered {r.status}")
        conn.close()
    finally:
        terminate(proc)
        with open(os.path.join(log_dir, "secrets-timing-oracle.txt"), "a") as f:
            for sec in presented:
                f.write(json.dumps(sec) + "\n")


def header_for(kind, known, revoked):
    if kind == "unknown":
        return "Bearer cdbm_" + b64key()
    if kind == "known-prefix":
        return "Bearer " + known[:12] + b64key()[:36]
    if kind == "revoked":
        return "Bearer " + revoked
    if kind == "garbage":
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&*+-.^_|~"
        return "Bearer " + "".join(random.choice(alphabet) for _ in range(random.randint(1, 80)))
    if kind == "malformed":
        return "Basic " + b64key()[:20]
    raise ValueError(kind)


def pct(sorted_xs, p):
    return sorted_xs[min(len(sorted_xs) - 1, int(round(p / 100 * (len(sorted_xs) - 1))))]


def bootstrap_diff(a, b, boot, rng):
    """95% percentile-bootstrap interval of median(b) - median(a). `a[i]` and `b[i]` were measured
    in the same block, so blocks are resampled (keeps the pairing; load drift cancels out)."""
    diffs = []
    n = len(a)
    for _ in range(boot):
        idx = rng.choices(range(n), k=n)
        diffs.append(statistics.median([b[i] for i in idx]) - statistics.median([a[i] for i in idx]))
    diffs.sort()
    return pct(diffs, 2.5), pct(diffs, 97.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=None, help="binary (default: target/release, else target/debug)")
    ap.add_argument("-n", type=int, default=20000, help="requests per kind (default 20000)")
    ap.add_argument("--warmup", type=int, default=500, help="unrecorded requests per kind first")
    ap.add_argument("--boot", type=int, default=400, help="bootstrap resamples")
    ap.add_argument("--threshold-us", type=float, default=3.0, help="smallest difference worth reporting (default 3)")
    ap.add_argument(
        "--fail-us",
        type=float,
        default=15.0,
        help="exit 1 when the 95%% interval of known-prefix minus unknown lies entirely beyond this (default 15)",
    )
    ap.add_argument("--log-dir", default=None, help="keep the servers' logs here (and a trace-level probe), for scan-logs.py")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--database-url", default=None, help="an empty PostgreSQL database/schema (default: SQLite)")
    ap.add_argument("--url", default=None, help="host:port of a running server (skips start-up)")
    ap.add_argument("--known", default=None)
    ap.add_argument("--revoked", default=None)
    ap.add_argument("--kinds", default="unknown,known-prefix,revoked,garbage,malformed")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    kinds = a.kinds.split(",")

    proc = None
    tmp = None
    if a.url:
        if not (a.known and a.revoked):
            sys.exit("--url needs --known and --revoked")
        addr, known, revoked = a.url.removeprefix("http://"), a.known, a.revoked
        binary = "(running server)"
    else:
        binary = a.bin
        if binary is None:
            for c in ("target/release/centraldb-mfa", "target/debug/centraldb-mfa"):
                if os.path.exists(os.path.join(ROOT, c)):
                    binary = os.path.join(ROOT, c)
                    break
        if binary is None or not os.path.exists(binary):
            sys.exit("no binary: cargo build --release (or pass --bin)")
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.mkdtemp(prefix="timing-oracle-", dir=a.data_dir or base)
        log_dir = None
        if a.log_dir:
            log_dir = os.path.abspath(os.path.join(a.log_dir, "timing-oracle"))
            os.makedirs(log_dir, exist_ok=True)
        proc, addr, known, revoked = start_server(binary, os.path.join(tmp, "data"), a.database_url, log_dir)

    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one(kind):
        h = {"Authorization": header_for(kind, known, revoked)}
        t0 = time.perf_counter_ns()
        conn.request("GET", PATH, headers=h)
        r = conn.getresponse()
        r.read()
        t1 = time.perf_counter_ns()
        return r.status, (t1 - t0) / 1000.0

    try:
        # sanity: every kind is refused with 401, and the valid key is accepted
        s, _ = one("unknown")
        assert s == 401, s
        conn.request("GET", PATH, headers={"Authorization": "Bearer " + known})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, f"valid key answered {r.status}"
        for kind in kinds:
            s, _ = one(kind)
            assert s == 401, f"{kind} answered {s}"

        order = [k for k in kinds for _ in range(a.warmup)]
        rng.shuffle(order)
        for k in order:
            one(k)
        # n blocks, each with every kind once in a random order
        samples = {k: [] for k in kinds}
        started = time.time()
        for i in range(a.n):
            block = list(kinds)
            rng.shuffle(block)
            for k in block:
                s, us = one(k)
                if s != 401:
                    sys.exit(f"{k} answered {s}")
                samples[k].append(us)
            if (i + 1) % 5000 == 0:
                print(f"  {i + 1}/{a.n} blocks, {time.time() - started:.0f}s", file=sys.stderr)
        elapsed = time.time() - started
    finally:
        conn.close()
        if proc:
            terminate(proc)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    results = {"binary": binary, "requests_per_kind": a.n, "seconds": round(elapsed, 1), "kinds": {}}
    print(f"binary: {binary}; {a.n} requests per kind, in random order within blocks; {elapsed:.0f}s")
    print(f"{'kind':<14}{'median µs':>11}{'p10 µs':>10}{'p90 µs':>10}   median - median(unknown) [95% bootstrap CI]")
    ref = samples.get("unknown")
    measurable = []
    failed = []
    for k in kinds:
        xs = sorted(samples[k])
        row = {"median_us": round(statistics.median(xs), 1), "p10_us": round(pct(xs, 10), 1),
               "p90_us": round(pct(xs, 90), 1)}
        line = f"{k:<14}{row['median_us']:>11.1f}{row['p10_us']:>10.1f}{row['p90_us']:>10.1f}"
        if ref is not None and k != "unknown":
            d = statistics.median(xs) - statistics.median(ref)
            lo, hi = bootstrap_diff(ref, samples[k], a.boot, rng)
            row.update({"diff_us": round(d, 1), "ci95_us": [round(lo, 1), round(hi, 1)]})
            verdict = ""
            if (lo > 0 or hi < 0) and abs(d) >= a.threshold_us:
                verdict = "MEASURABLE" if k in ORACLE_KINDS else "differs (syntactic, not an oracle)"
                if k in ORACLE_KINDS:
                    measurable.append(k)
            elif lo > 0 or hi < 0:
                verdict = f"significant but below {a.threshold_us:g} µs"
            else:
                verdict = "no difference"
            if k == "known-prefix" and (lo > a.fail_us or hi < -a.fail_us):
                verdict = f"FAILED: the whole 95% interval is beyond {a.fail_us:g} µs"
                failed.append(k)
            row["verdict"] = verdict
            line += f"   {d:+8.1f} [{lo:+.1f}, {hi:+.1f}]  {verdict}"
        results["kinds"][k] = row
        print(line)
    results["fail_us"] = a.fail_us
    results["failed"] = failed
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    if failed:
        print(
            f"timing oracle: FAILED: a right prefix with a wrong secret is told apart from an unknown key "
            f"(95% interval beyond {a.fail_us:g} µs)"
        )
        return 1
    if measurable:
        print(f"timing oracle: MEASURABLE for {', '.join(measurable)} (below the {a.fail_us:g} µs failure bound "
              f"for known-prefix; revoked is report only)")
        return 0
    print("timing oracle: none measurable (unknown, known-prefix and revoked keys take the same time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
