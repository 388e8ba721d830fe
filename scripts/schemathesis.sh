#!/usr/bin/env bash
# Property-based API testing of the real binary with schemathesis (PyPI), against openapi.json.
#
# Every operation in openapi.json, all phases (examples, coverage, fuzzing, stateful), positive
# and negative (malformed) data, all checks: no 5xx, status codes / content types / headers /
# bodies as documented, negative data rejected, missing auth refused, ... Exits non-zero on any
# failure and prints the totals.
#
# Usage: scripts/schemathesis.sh [--bin PATH] [--max-examples N] [--seed N] [--workers N]
#                                [--max-time SECONDS] [-- extra `st run` arguments]
# Env:   ST_MAX_EXAMPLES (default 100), ST_SEED (default 20261124), ST_WORKERS (default 1),
#        ST_BIN, ST_REPORT_DIR (default target/schemathesis/report), ST_KEEP=1 (keep the data dir),
#        ST_POSTGRES_URL (run on a fresh database created on this server, dropped afterwards;
#        default: SQLite), ST_LOG_DIR (the service runs at RUST_LOG=trace, its log and the secrets
#        of the run go to ST_LOG_DIR/schemathesis-<backend>/ for scripts/scan-logs.py)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

ST_VERSION=4.32.5
BIN=${ST_BIN:-$ROOT/target/debug/centraldb-mfa}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-100}
SEED=${ST_SEED:-20261124}
# One worker: with two, hypothesis' lambda-source cache hits a thread-safety bug ("AST
# constructor recursion depth mismatch") now and then; one worker is fast enough.
WORKERS=${ST_WORKERS:-1}
MAX_TIME=${ST_MAX_TIME:-}
REPORT_DIR=$(realpath -m "${ST_REPORT_DIR:-$ROOT/target/schemathesis/report}")
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN=$(realpath "$2"); shift 2 ;;
        --max-examples|-n) MAX_EXAMPLES=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --workers|-w) WORKERS=$2; shift 2 ;;
        --max-time) MAX_TIME=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -x $BIN ]]; then
    echo "no binary at $BIN: run 'cargo build' first (or pass --bin)" >&2
    exit 2
fi

# ---- schemathesis in a venv under target/ (reused when the pinned version is there) ----------
VENV=$ROOT/target/schemathesis-venv
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "version $ST_VERSION\$"; then
    echo "installing schemathesis $ST_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

# ---- the service: SQLite in a fresh data dir, a bootstrap admin key, a free loopback port ----
WORK=$(mktemp -d "${TMPDIR:-/tmp}/centraldb-st.XXXXXX")
PID=
PG_DB=
PG_ADMIN_URL=${ST_POSTGRES_URL:-}
cleanup() {
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        kill -KILL "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    if [[ -n $PG_DB ]]; then
        psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    if [[ ${ST_KEEP:-0} != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADMIN_KEY=cdbm_st_$(python3 -c 'import secrets; print(secrets.token_hex(24))')
BASE=http://127.0.0.1:$PORT

# ---- the database: SQLite in the data dir, or a fresh PostgreSQL database ---------------------
DB_ENV=()
BACKEND=sqlite
if [[ -n $PG_ADMIN_URL ]]; then
    BACKEND=postgres
    PG_DB="st_$$_$RANDOM$RANDOM"
    psql "$PG_ADMIN_URL" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE \"$PG_DB\"" >/dev/null
    DB_URL=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme, p.netloc, "/" + sys.argv[2], p.query, "")))' "$PG_ADMIN_URL" "$PG_DB")
    KEYS=$("$BIN" keygen --id k1)
    DB_ENV=(CENTRALDB_DATABASE_URL="$DB_URL" CENTRALDB_ENCRYPTION_KEYS="$KEYS")
fi

# ---- the log: at trace into ST_LOG_DIR (scanned for the secrets registered below) ---------------
LOG_LEVEL=info
SERVICE_LOG=$WORK/service.log
SECRETS=/dev/null
if [[ -n ${ST_LOG_DIR:-} ]]; then
    LOG_LEVEL=trace
    mkdir -p "$ST_LOG_DIR/schemathesis-$BACKEND"
    SERVICE_LOG=$(realpath "$ST_LOG_DIR/schemathesis-$BACKEND")/service.log
    SECRETS=$(realpath "$ST_LOG_DIR/schemathesis-$BACKEND")/secrets-schemathesis-$BACKEND.txt
fi
secret() { for s in "$@"; do python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$s" >>"$SECRETS"; done; }
secret "$ADMIN_KEY"
if [[ -n ${KEYS:-} ]]; then
    secret "$KEYS" "${KEYS#*:}" "$(python3 -c 'import base64, sys; k = sys.argv[1]; print(base64.b64decode(k + "=" * (-len(k) % 4), altchars=b"-_" if "-" in k or "_" in k else None).hex())' "${KEYS#*:}")"
fi

env -i PATH="$PATH" \
    CENTRALDB_DATA_DIR="$WORK/data" \
    CENTRALDB_LISTEN="127.0.0.1:$PORT" \
    CENTRALDB_BOOTSTRAP_ADMIN_KEY="$ADMIN_KEY" \
    CENTRALDB_LOG_FORMAT=json \
    RUST_LOG="$LOG_LEVEL" \
    "${DB_ENV[@]}" \
    "$BIN" serve >"$SERVICE_LOG" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
    if curl -fsS "$BASE/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "the service exited during start-up:" >&2
        cat "$SERVICE_LOG" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "$BASE/readyz" >/dev/null

# ---- seed data, so operations that need an existing resource get past 404 -----------------
# (stored bundles for metadata/invalidate/lease, a service challenge for /verify, an external
# one with attempt 1 reserved for /attempts/{n}/result; schemathesis' own links cover the rest)
api() { # METHOD PATH [JSON]
    curl -fsS -X "$1" -H "Authorization: Bearer $ADMIN_KEY" -H 'Content-Type: application/json' \
        ${3:+--data "$3"} "$BASE$2"
}
NOW=$(date +%s)
TAG=$(python3 -c 'import secrets; print(secrets.token_hex(8))')
secret "st-o1-$TAG" "st-o1s-$TAG" "st-acc-$TAG" "st-ref-$TAG"
GARTH='{"kind":"garth","oauth1_token":{"oauth_token":"st-o1-'$TAG'","oauth_token_secret":"st-o1s-'$TAG'","mfa_token":null,"mfa_expiration_timestamp":null,"domain":"garmin.com"},"oauth2_token":{"scope":"CONNECT_READ","jti":"st","token_type":"Bearer","access_token":"st-acc-'$TAG'","refresh_token":"st-ref-'$TAG'","expires_in":86400,"expires_at":'$((NOW + 86400))',"refresh_token_expires_in":2592000,"refresh_token_expires_at":'$((NOW + 2592000))'}}'
for user in st-meta st-lease st-invalidate; do api PUT "/api/v1/users/$user/tokens" "$GARTH" >/dev/null; done
json_id() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
SERVICE_CHALLENGE=$(api POST /api/v1/mfa/challenges \
    '{"user_id":"st-verify","method":"totp","verifier":"service","ttl_seconds":600,"max_attempts":10}' | json_id)
EXTERNAL_CHALLENGE=$(api POST /api/v1/mfa/challenges \
    '{"user_id":"st-external","method":"sms","verifier":"external","ttl_seconds":600,"max_attempts":10}' | json_id)
api POST "/api/v1/mfa/challenges/$EXTERNAL_CHALLENGE/attempts" '{"code":"123456"}' >/dev/null

# ---- schemathesis configuration -----------------------------------------------------------
# Everything is on; the few settings below are narrow and explained.
CONFIG=$WORK/schemathesis.toml
cat >"$CONFIG" <<EOF
# Seeded resources (see above). The path parameter is fixed for these operations only; the same
# path parsing is fuzzed through every other operation.
[[operations]]
include-name = "GET /api/v1/users/{user_id}/tokens/metadata"
parameters = { "path.user_id" = "st-meta" }

[[operations]]
include-name = "POST /api/v1/users/{user_id}/tokens/lease"
parameters = { "path.user_id" = "st-lease" }

[[operations]]
include-name = "POST /api/v1/users/{user_id}/tokens/invalidate"
parameters = { "path.user_id" = "st-invalidate" }

[[operations]]
include-name = "POST /api/v1/mfa/challenges/{id}/verify"
parameters = { "path.id" = "$SERVICE_CHALLENGE" }

[[operations]]
include-name = "POST /api/v1/mfa/challenges/{id}/attempts/{n}/result"
parameters = { "path.id" = "$EXTERNAL_CHALLENGE", "path.n" = 1 }
EOF
cat >>"$CONFIG" <<'EOF'
# Keep NUL bytes in generated strings (hostile input).
[generation]
allow-x00 = true

# Every check (set here, not with `--checks all`, so the per-operation settings below apply).
[checks]
enabled = true
# A schema-violating body can also be rejected for its size before it is parsed: 413
# payload_too_large (CENTRALDB_BODY_LIMIT_BYTES, documented on every body-taking operation) is a
# rejection like 422. Found when the fuzzer grew a resume_state past the body limit.
negative_data_rejection.expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# positive_data_acceptance ("schema-valid data must be accepted") is on for token PUT and
# challenge creation: scripts/schemathesis_hooks.py narrows their positive cases to what the
# rules between fields (which OpenAPI 3.1 cannot state) allow. It is off only for the operations
# below, whose rule depends on a query combination or on the target resource; every other
# check, including negative data rejection, stays on for them.

# PUT tokens: `If-Match: "<n>"` / `If-Match: *` against a stored version that differs (or no
# bundle) answers 412, a documented state answer like 409. An unknown request header is no error
# in HTTP: the coverage phase's "headers with an unexpected property" case is accepted (a seeded
# lease lets it through, 200), which schemathesis would count as "schema-violating request
# accepted"; so no extra parameters are generated here (unknown body fields are still refused
# by the body rules, 422, and that is tested in tests/api).
[[operations]]
include-name = "PUT /api/v1/users/{user_id}/tokens"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]
generation.allow-extra-parameters = false

# invalidate / DELETE tokens: `If-Match` against another stored version (or no bundle) answers
# 412, and a bundle already invalidated or past its refresh expiry answers 410, documented state
# answers like 409. Lease acquire on such a bundle answers 410 too.
[[operations]]
include-name = ["POST /api/v1/users/{user_id}/tokens/invalidate", "DELETE /api/v1/users/{user_id}/tokens"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "412", "429", "5xx"]

[[operations]]
include-name = "POST /api/v1/users/{user_id}/tokens/lease"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]

# GET tokens: `wait_seconds` only together with `newer_than` (422 otherwise).
[[operations]]
include-name = "GET /api/v1/users/{user_id}/tokens"
checks.positive_data_acceptance.enabled = false

# verify / attempts: which of the two a challenge takes depends on its `verifier` (`service`:
# /verify, `external`: /attempts); the other one answers 422.
[[operations]]
include-name = ["POST /api/v1/mfa/challenges/{id}/verify", "POST /api/v1/mfa/challenges/{id}/attempts"]
checks.positive_data_acceptance.enabled = false

# A challenge answers a schema-valid request by its state: 410 `challenge_expired`, 423
# `challenge_locked` (no attempts left), as it answers 409 for other states; both are
# documented. schemathesis counts only 409 as a state answer by default.
[[operations]]
include-name = ["POST /api/v1/mfa/challenges/{id}/consume", "POST /api/v1/mfa/challenges/{id}/attempts/{n}/result", "DELETE /api/v1/mfa/challenges/{id}"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "423", "429", "5xx"]

# DELETE of a session or challenge cancels the flow; the record stays readable (state
# `cancelled`, or the state it had already ended in) for status checks and audit, by design.
[[operations]]
include-name = ["DELETE /api/v1/sessions/{id}", "GET /api/v1/sessions/{id}", "DELETE /api/v1/mfa/challenges/{id}", "GET /api/v1/mfa/challenges/{id}"]
checks.use_after_free.enabled = false

# GET audit events: `until` must be later than `since`.
[[operations]]
include-name = "GET /api/v1/audit/events"
checks.positive_data_acceptance.enabled = false
EOF

mkdir -p "$REPORT_DIR"
ARGS=(
    --config-file "$CONFIG"
    run "$ROOT/openapi.json"
    --url "$BASE"
    -H "Authorization: Bearer $ADMIN_KEY"
    --mode all
    --phases examples,coverage,fuzzing,stateful
    --max-examples "$MAX_EXAMPLES"
    --seed "$SEED"
    --workers "$WORKERS"
    --generation-database none
    --request-timeout 40
    --suppress-health-check all
    --report junit,ndjson
    --report-dir "$REPORT_DIR"
    --no-color
)
[[ -n $MAX_TIME ]] && ARGS+=(--max-time "$MAX_TIME")
ARGS+=("${EXTRA[@]}")

echo "schemathesis $ST_VERSION against $BASE ($BIN, $BACKEND): max-examples=$MAX_EXAMPLES seed=$SEED workers=$WORKERS"
START=$(date +%s)
set +e
# Run from the scratch dir: schemathesis writes a .schemathesis/ folder into its working dir.
(cd "$WORK" && PYTHONPATH="$ROOT/scripts" SCHEMATHESIS_HOOKS=schemathesis_hooks "$VENV/bin/st" "${ARGS[@]}") 2>&1 | tee "$WORK/st.out"
RC=${PIPESTATUS[0]}
set -e
ELAPSED=$(( $(date +%s) - START ))

# The service must have survived the run.
if ! kill -0 "$PID" 2>/dev/null; then
    echo "FAIL: the service died during the run" >&2
    tail -50 "$SERVICE_LOG" >&2
    RC=1
fi
# ... and must still stop cleanly on SIGTERM (in-flight requests finish, then the pool closes).
if kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID"
    for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$PID" 2>/dev/null; then
        echo "FAIL: the service did not stop within 10 s of SIGTERM" >&2
        RC=1
    else
        wait "$PID" 2>/dev/null || true
    fi
fi
ERRORS=$(grep -c '"level":"ERROR"' "$SERVICE_LOG" || true)
if [[ $ERRORS -gt 0 ]]; then
    echo "FAIL: $ERRORS ERROR lines in the service log" >&2
    grep '"level":"ERROR"' "$SERVICE_LOG" | head -5 >&2
    RC=1
fi
PANICS=$(grep -c -i 'panic' "$SERVICE_LOG" || true)
if [[ $PANICS -gt 0 ]]; then
    echo "FAIL: $PANICS panic lines in the service log" >&2
    grep -i 'panic' "$SERVICE_LOG" | head -5 >&2
    RC=1
fi

# ---- totals (from the NDJSON event stream) ---------------------------------------------------
"$VENV/bin/python" - "$REPORT_DIR" "$ELAPSED" "$RC" "$WORK/st.out" <<'EOF' || RC=1
import json, pathlib, re, sys
report_dir, elapsed, rc = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
st_out = pathlib.Path(sys.argv[4]).read_text(errors="replace")
tested = re.search(r"Tested: (\d+)", st_out)
generated = re.search(r"Test cases:\s*\n\s*(.+)", st_out)
failures = re.search(r"=+ (\d+) failures?", st_out)
files = sorted(report_dir.glob("*.ndjson"), key=lambda p: p.stat().st_mtime)
ops, cases, statuses = set(), 0, {}
# Security headers on every response the service gave (OpenAPI cannot mark a response header
# required in utoipa's model, so schemathesis would not check their presence).
REQUIRED = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
missing_headers = []
if files:
    for line in files[-1].read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        (kind, body), = ev.items() if len(ev) == 1 else (("", {}),)
        if kind == "ScenarioFinished":
            rec = body.get("recorder") or {}
            label = rec.get("label")
            if label and not label.startswith("Stateful"):
                ops.add(label)
            for interactions in [rec.get("interactions") or {}]:
                for it in interactions.values():
                    cases += 1
                    resp = it.get("response") or {}
                    s = resp.get("status_code")
                    if s is not None:
                        statuses[s] = statuses.get(s, 0) + 1
                        headers = {k.lower(): v for k, v in (resp.get("headers") or {}).items()}
                        for name, value in REQUIRED.items():
                            if value not in (headers.get(name) or []):
                                req = it.get("request") or {}
                                missing_headers.append(f"{req.get('method')} {req.get('uri')} -> {s}: no {name}: {value}")
five = sum(n for s, n in statuses.items() if s >= 500)
print(f"TOTALS: operations tested={tested.group(1) if tested else '?'}; "
      f"test cases: {generated.group(1).strip() if generated else '?'}; "
      f"schemathesis failures={failures.group(1) if failures else 0}; "
      f"requests recorded={cases} (5xx: {five}); elapsed={elapsed}s; exit so far={rc}")
print("status codes: " + ", ".join(f"{s}={n}" for s, n in sorted(statuses.items())))
print(f"security headers (Cache-Control: no-store, X-Content-Type-Options: nosniff): "
      f"{cases - len(missing_headers)}/{cases} responses complete")
for m in missing_headers[:10]:
    print("  MISSING " + m[:300])
if cases == 0:
    print(f"no recorded responses in {report_dir}: the header and 5xx checks could not run")
    sys.exit(1)
sys.exit(1 if missing_headers or five else 0)
EOF
exit "$RC"
