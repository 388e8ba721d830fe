#!/usr/bin/env python3
"""Sequential MFA verify latency against a running centraldb-mfa (stdlib only).

    scripts/verify-latency.py --url http://127.0.0.1:8080 --key "$(cat data/admin-api-key)" -n 200

Creates N service-verified challenges with a known code, then verifies each once (right code),
one request at a time, and prints p50/p95/p99/max of the verify requests in milliseconds.
A micro-measurement for the README; the load generator (issue 5) measures under load.
"""
import argparse, json, time, urllib.request, uuid


def call(url, key, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key", required=True)
    ap.add_argument("-n", type=int, default=100)
    a = ap.parse_args()
    ids = []
    for i in range(a.n):
        user = f"lat-{uuid.uuid4().hex[:12]}"
        s, b = call(a.url, a.key, "POST", "/api/v1/mfa/challenges",
                    {"user_id": user, "method": "email", "verifier": "service", "code": "482913"})
        assert s == 201, (s, b)
        ids.append(b["id"])
    lat = []
    for cid in ids:
        t = time.perf_counter()
        s, b = call(a.url, a.key, "POST", f"/api/v1/mfa/challenges/{cid}/verify", {"code": "482913"})
        lat.append((time.perf_counter() - t) * 1000)
        assert s == 200, (s, b)
    print(json.dumps({"verifications": len(lat), "p50_ms": round(pct(lat, 50), 2), "p95_ms": round(pct(lat, 95), 2),
                      "p99_ms": round(pct(lat, 99), 2), "max_ms": round(max(lat), 2)}))


if __name__ == "__main__":
    main()
