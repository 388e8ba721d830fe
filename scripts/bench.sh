#!/usr/bin/env bash
# Load-test centraldb-mfa on this machine (not run by CI): builds release, starts the server on
# 127.0.0.1 with a fresh SQLite data folder (and, with --postgres, a second time on PostgreSQL),
# runs the loadgen scenarios against it, records the server's CPU time and resident memory per
# scenario, prints a table and writes the JSON results to a folder, then stops the server.
#
#   scripts/bench.sh [--postgres URL] [--out DIR] [--bin PATH] [--label TEXT] [--quick] [--no-10k]
#                    [--port N] [--only LIST] [--two-instances] [--sqlite-only | --postgres-only]
#
#   --postgres URL  also run on PostgreSQL (loopback only); a fresh schema is created with psql
#                   when psql is installed (and dropped afterwards), else the URL's database is used
#   --out DIR       results folder (default target/bench-results/<UTC timestamp>)
#   --bin PATH      server binary to test instead of building this tree (e.g. a baseline build)
#   --loadgen PATH  loadgen binary to use instead of building examples/loadgen (with --bin: no build)
#   --label TEXT    recorded in summary.json (e.g. "baseline b0e1010")
#   --quick         5 s scenarios and 200/1000 flow users: a smoke test of the harness
#   --no-10k        skip the 10,000-user flow
#   --summarize DIR only rebuild summary.json and the table from the results in DIR
#   --only LIST     comma-separated scenario names to run (healthz,token-get,token-put,
#                   mfa-verify-50,mfa-verify-overload,flow-1000,flow-10000,put-quiet,refusal-flood,
#                   sc004, sc004-2x)
#   --two-instances with --postgres: also run sc004-2x, the sc004 users spread over two server
#                   instances (ports N and N+1) on the one PostgreSQL database
#   --postgres-only skip the SQLite run (with --postgres)
#   --sqlite-only   skip the PostgreSQL run even with --postgres
#   --scan RATES    a capacity scan: for each comma-separated rate R, scenario `scan-R` is the sc004
#                   flow at R new users/s for 60 s with 5-15 s think time (steady request rate after
#                   15 s, ~8 requests a user), each on a freshly started server. Where the step p95s
#                   cross 100 ms, and the machine's busy share there, is the capacity bound.
#
# Every scenario also records the machine's busy share of its CPUs over the scenario
# (/proc/stat; the loadgen and PostgreSQL run on the same cores) and, on PostgreSQL, the CPU
# seconds of the database's processes (`postgres` processes alive at the end of the scenario).
#
# `sc004` is issue 16's realistic login load (loadgen --mode open-flow): 170 new users/s for
# 120 s, each thinking 30-90 s between its challenge and its attempt (about 10,000 users in
# flight), all sharing 256 keep-alive connections. It runs on a freshly started server; its CPU
# and peak RSS are the server's (summed CPU and the largest VmHWM over the instances for
# sc004-2x), and `srv_us/req` = server CPU microseconds per request served.
#
# `put-quiet` and `refusal-flood` measure what a flood of refused requests does to legitimate
# writes: 16 connections PUT with If-Match, alone (put-quiet) and while 4 more connections send
# 2,000 requests/s with an invalid key (refusal-flood, the rate of the reported incident; its table rows are
# the PUTs and the flood, whose req/s is the refusal rate and statuses show 401 vs 429).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

PG_URL=""
OUT=""
BIN=""
LOADGEN_BIN=""
QUICK=0
RUN_10K=1
PORT=18080
ONLY=""
LABEL=""
SUMMARIZE=""
TWO=0
RUN_SQLITE=1
RUN_PG=1
SCAN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --postgres) PG_URL="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --loadgen) LOADGEN_BIN="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --no-10k) RUN_10K=0; shift ;;
    --port) PORT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --label) LABEL="$2"; shift 2 ;;
    --summarize) SUMMARIZE="$2"; shift 2 ;;
    --two-instances) TWO=1; shift ;;
    --postgres-only) RUN_SQLITE=0; shift ;;
    --sqlite-only) RUN_PG=0; shift ;;
    --scan) SCAN="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v jq >/dev/null || { echo "jq is required" >&2; exit 2; }
command -v curl >/dev/null || { echo "curl is required" >&2; exit 2; }

# PostgreSQL must be on this machine: this workplace allows no traffic elsewhere.
if [[ -n "$PG_URL" ]]; then
  rest="${PG_URL#*://}"; rest="${rest%%[/?]*}"; rest="${rest##*@}"
  if [[ "$rest" == \[* ]]; then pg_host="${rest%%]*}"; pg_host="${pg_host#[}"; else pg_host="${rest%%:*}"; fi
  case "$pg_host" in
    127.*|localhost|::1|"") ;;
    *) echo "refusing --postgres host '$pg_host': loopback only" >&2; exit 2 ;;
  esac
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="${OUT:-${SUMMARIZE:-target/bench-results/$STAMP}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [[ $QUICK == 1 ]]; then
  DUR=5; DUR_OVER=5; FLOW_SMALL=200; FLOW_BIG=1000; FLOW_CAP=60
  SC004=(--rate 20 --duration 10 --think 1:3 --pool 64 --timeout 60)
else
  DUR=20; DUR_OVER=10; FLOW_SMALL=1000; FLOW_BIG=10000; FLOW_CAP=180
  SC004=(--rate 170 --duration 120 --think 30:90 --pool 256 --timeout 60)
fi

# ---- summary ----------------------------------------------------------------------------------

summarize() {
  mem_kib="$(awk '$1 == "MemTotal:" {print $2}' /proc/meminfo)"
  git_rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git_dirty="$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ')"
  jq -s --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --arg nproc "$(nproc)" --arg mem "$mem_kib" \
    --arg kernel "$(uname -r)" --arg rustc "$(rustc --version)" --arg rev "$git_rev" --arg dirty "$git_dirty" \
    --arg bin "$BIN" --arg lbl "$LABEL" '
    . as $all |
    def rps($b; $s): ($all | map(select(.backend == $b and .scenario == $s)) | .[0].run.total.throughput_rps) // null;
    {date: $date, "label": $lbl, server_binary: $bin, git_rev: $rev, modified_tracked_files: ($dirty | tonumber),
     machine: {nproc: ($nproc | tonumber), mem_total_kib: ($mem | tonumber), kernel: $kernel, rustc: $rustc},
     token_get_to_healthz: (map(.backend) | unique | map({key: ., value:
        (if rps(.; "token-get") and rps(.; "healthz") then (rps(.; "token-get") / rps(.; "healthz") * 1000 | round / 1000) else null end)})
        | from_entries),
     scenarios: sort_by((.backend != "sqlite"),
        (.scenario as $n | ["healthz", "token-get", "token-put", "mfa-verify-50", "mfa-verify-overload", "put-quiet", "refusal-flood"] | index($n) // 9),
        (.args.connections))}' $(ls "$OUT"/sqlite-*.json "$OUT"/postgres-*.json 2>/dev/null) > "$OUT/summary.json"

  echo
  echo "== results ($OUT) =="
  printf '%-9s %-20s %-34s %9s %7s %9s %8s %8s %8s %9s %7s %8s %8s  %s\n' \
    backend scenario row requests errors req/s p50_ms p95_ms p99_ms max_ms srv_cpu rss0_MiB hwm_MiB statuses
  jq -r '
    def n(x): if x == null then "-" else (x * 100 | round / 100 | tostring) end;
    def st(r): [(r.statuses // {} | to_entries[]), (r.transport_errors // {} | to_entries[])] | map("\(.key):\(.value)") | join(" ");
    def row(s; name; r): [s.backend, s.scenario, name, (r.requests|tostring), (r.errors|tostring), n(r.throughput_rps),
        n(r.latency.p50_ms), n(r.latency.p95_ms), n(r.latency.p99_ms), n(r.latency.max_ms),
        n(s.server.cpu_s), n(s.server.vm_rss_before_kib / 1024), n(s.server.vm_hwm_kib / 1024), st(r)] | @tsv;
    .scenarios[] as $s |
    def per_req(x): if x != null and $s.run.total.requests > 0 then (x * 1e6 / $s.run.total.requests | round | tostring) else "-" end;
    if ($s.scenario | startswith("sc004") or startswith("scan-")) then
      row($s; "all requests (peak \($s.open_flow.peak_in_flight) in flight, srv \(per_req($s.server.cpu_s)) us/req, pg \(per_req($s.server.postgres_cpu_s)) us/req, machine \((($s.server.machine_busy // 0) * 100 | round))% busy)"; $s.run.total),
      ($s.run.routes[] as $r | row($s; $r.route; $r))
    elif ($s.scenario | startswith("flow")) then
      row($s; "all requests"; $s.run.total),
      ($s.run.routes[] | select(.derived or (.route | test("GET /api"))) as $r | row($s; $r.route; $r))
    elif $s.scenario == "refusal-flood" then
      ($s.run.routes[] as $r | row($s; $r.route; $r))
    else
      ($s.run.routes[0] // $s.run.total) as $r | row($s; $r.route; $r)
    end' "$OUT/summary.json" |
  while IFS=$'\t' read -r b sc label req err rps p50 p95 p99 max cpu rss0 hwm sts; do
    printf '%-9s %-20s %-34.34s %9s %7s %9s %8s %8s %8s %9s %7s %8s %8s  %s\n' \
      "$b" "$sc" "$label" "$req" "$err" "$rps" "$p50" "$p95" "$p99" "$max" "$cpu" "$rss0" "$hwm" "$sts"
  done
  echo
  jq -r '"token GET / healthz throughput: " + (.token_get_to_healthz | tostring)' "$OUT/summary.json"
  echo "JSON: $OUT/summary.json (and one file per scenario)"
}

if [[ -n "$SUMMARIZE" ]]; then
  summarize
  exit 0
fi

echo "== building (release) =="
if [[ -z "$BIN" ]]; then
  cargo build --release --bin centraldb-mfa --example loadgen
  BIN="$ROOT/target/release/centraldb-mfa"
elif [[ -z "$LOADGEN_BIN" ]]; then
  cargo build --release --example loadgen
fi
LOADGEN="${LOADGEN_BIN:-$ROOT/target/release/examples/loadgen}"
[[ -x "$BIN" ]] || { echo "no server binary at $BIN" >&2; exit 2; }

# The server gets as many open files as allowed (10,000 connections need them).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

CLK_TCK="$(getconf CLK_TCK)"
SERVER_PID=""
SERVER_PIDS=()
WORK=""
PG_SCHEMA=""
PG_ADMIN_URL=""

stop_server() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  SERVER_PID=""
  SERVER_PIDS=()
}

drop_pg_schema() {
  if [[ -n "$PG_SCHEMA" ]]; then
    psql -q "$PG_ADMIN_URL" -c "DROP SCHEMA IF EXISTS $PG_SCHEMA CASCADE" >/dev/null 2>&1 || true
    PG_SCHEMA=""
  fi
}

cleanup() {
  stop_server
  drop_pg_schema
  # an `if`, not `[[ ]] && rm`: under set -e a false test as the trap's last command would make
  # a successful run exit 1
  if [[ -n "$WORK" && -d "$WORK" ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The machine's busy and total CPU ticks so far (/proc/stat's first line: all CPUs).
machine_ticks() { awk '$1 == "cpu" {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit}' /proc/stat; }
# CPU ticks (user + system) of the PostgreSQL processes alive now (0 without a postgres process).
pg_ticks() {
  local sum=0 pid v
  for pid in $(pgrep -x postgres 2>/dev/null); do
    v="$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

# The largest value of a /proc/PID/status field over the running instances (kiB).
proc_field() {
  local pid v max=0
  for pid in "${SERVER_PIDS[@]}"; do
    v="$(awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
    (( ${v:-0} > max )) && max="${v:-0}"
  done
  echo "$max"
}
# CPU ticks (user + system) summed over the running instances.
cpu_ticks() {
  local pid sum=0 v
  for pid in "${SERVER_PIDS[@]}"; do
    v="$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

prepare_work() {
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/centraldb-bench.XXXXXX")"
  mkdir -m 700 "$WORK/data"
  "$BIN" keygen --id k1 > "$WORK/encryption-keys"
  # A bootstrap admin key: 43 random URL-safe characters.
  printf 'bench%s' "$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | head -c 43)" > "$WORK/admin-key"
  chmod 600 "$WORK/encryption-keys" "$WORK/admin-key"
}

start_server() { # backend database_url [port] (same data folder, keys and database on a restart)
  local backend="$1" url="$2" port="${3:-$PORT}"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use; pass --port" >&2; exit 2
  fi
  env CENTRALDB_DATA_DIR="$WORK/data" \
    CENTRALDB_DATABASE_URL="$url" \
    CENTRALDB_ENCRYPTION_KEYS_FILE="$WORK/encryption-keys" \
    CENTRALDB_BOOTSTRAP_ADMIN_KEY_FILE="$WORK/admin-key" \
    CENTRALDB_LISTEN="127.0.0.1:$port" \
    CENTRALDB_LOG_FORMAT=json \
    RUST_LOG=warn \
    "$BIN" serve >> "$OUT/server-$backend.log" 2>&1 &
  SERVER_PID=$!
  SERVER_PIDS+=("$SERVER_PID")
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.2
  done
  echo "server did not become ready; log:" >&2
  tail -20 "$OUT/server-$backend.log" >&2
  exit 1
}

wanted() { [[ -z "$ONLY" || ",$ONLY," == *",$1,"* ]]; }

# scenario backend name loadgen-args...
scenario() {
  local backend="$1" name="$2"; shift 2
  wanted "$name" || return 0
  local file="$OUT/$backend-$name.json"
  echo "== $backend: $name: loadgen $* =="
  # Reset the peak RSS, so VmHWM is this scenario's peak (Linux >= 4.0; best effort).
  local pid
  for pid in "${SERVER_PIDS[@]}"; do echo 5 > "/proc/$pid/clear_refs" 2>/dev/null || true; done
  local t0 t1 rc=0 rss0 m0 m1 pg0 pg1
  rss0="$(proc_field VmRSS)"
  t0="$(cpu_ticks)"; m0="$(machine_ticks)"; pg0="$(pg_ticks)"
  "$LOADGEN" --url "http://127.0.0.1:$PORT" --key-file "$WORK/admin-key" --json --out "$file" "$@" > /dev/null || rc=$?
  t1="$(cpu_ticks)"; m1="$(machine_ticks)"; pg1="$(pg_ticks)"
  local busy pg_cpu
  busy="$(awk -v a="$m0" -v b="$m1" 'BEGIN {split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.3f", (d > 0 ? (y[1] - x[1]) / d : 0)}')"
  pg_cpu="$(awk -v a="$pg0" -v b="$pg1" -v hz="$CLK_TCK" 'BEGIN {v = (b - a) / hz; printf "%.2f", (v > 0 ? v : 0)}')"
  [[ "$backend" == postgres ]] || pg_cpu=null
  for pid in "${SERVER_PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the server died during $name; log tail:" >&2; tail -20 "$OUT/server-$backend.log" >&2; exit 1
    fi
  done
  local hwm rss
  hwm="$(proc_field VmHWM)"; rss="$(proc_field VmRSS)"
  if [[ -s "$file" ]]; then
    jq --arg b "$backend" --arg n "$name" --argjson cpu "$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN {printf "%.2f", (b - a) / hz}')" \
      --argjson hwm "${hwm:-0}" --argjson rss "${rss:-0}" --argjson rss0 "${rss0:-0}" --argjson rc "$rc" \
      --arg cmd "loadgen $*" --argjson busy "$busy" --argjson pgcpu "$pg_cpu" \
      '. + {backend: $b, scenario: $n, command: $cmd, loadgen_exit: $rc,
            server: {instances: '"${#SERVER_PIDS[@]}"', cpu_s: $cpu, vm_rss_before_kib: $rss0, vm_hwm_kib: $hwm,
                     vm_rss_after_kib: $rss, machine_busy: $busy, postgres_cpu_s: $pgcpu, load_average: "'"$(cut -d' ' -f1-3 /proc/loadavg)"'"}}' "$file" > "$file.tmp" && mv "$file.tmp" "$file"
  else
    echo "loadgen wrote no result for $name (exit $rc)" >&2
  fi
}

run_backend() { # backend database_url
  local backend="$1" url="$2"
  echo "== $backend: starting server =="
  prepare_work
  : > "$OUT/server-$backend.log"
  start_server "$backend" "$url"
  scenario "$backend" healthz --mode healthz --connections 64 --duration "$DUR"
  scenario "$backend" token-get --mode token-get --connections 64 --duration "$DUR" --users 1000
  scenario "$backend" token-put --mode token-put --connections 64 --duration "$DUR" --users 1000
  scenario "$backend" put-quiet --mode token-put --connections 16 --duration "$DUR" --users 1000
  scenario "$backend" refusal-flood --mode refusal-flood --connections 16 --flood-connections 4 \
    --flood-rate 2000 --duration "$DUR" --users 1000
  scenario "$backend" mfa-verify-50 --mode mfa-verify --rate 50 --duration "$DUR" --connections 64
  # Past capacity: argon2 at ~20 ms a core gives ~100/s on 2 cores; ask for 3x that.
  scenario "$backend" mfa-verify-overload --mode mfa-verify --rate 300 --duration "$DUR_OVER" --connections 512
  # The flows run on a freshly started server (same database), so their memory figures are not
  # inflated by what the argon2 scenarios left in the allocator.
  restart_for_flow() { wanted "$1" || return 0; stop_server; start_server "$backend" "$url"; }
  restart_for_flow "flow-$FLOW_SMALL"
  scenario "$backend" "flow-$FLOW_SMALL" --mode flow --connections "$FLOW_SMALL" --requests "$FLOW_SMALL" \
    --gets 5 --duration "$FLOW_CAP" --timeout 60
  if [[ $RUN_10K == 1 ]]; then
    restart_for_flow "flow-$FLOW_BIG"
    scenario "$backend" "flow-$FLOW_BIG" --mode flow --connections "$FLOW_BIG" --requests "$FLOW_BIG" \
      --gets 5 --duration "$FLOW_CAP" --timeout 60
  fi
  restart_for_flow sc004
  scenario "$backend" sc004 --mode open-flow "${SC004[@]}"
  local rate
  for rate in ${SCAN//,/ }; do
    stop_server
    start_server "$backend" "$url"
    ONLY_SAVE="$ONLY"; ONLY=""
    scenario "$backend" "scan-$rate" --mode open-flow --rate "$rate" --duration 60 --think 5:15 --pool 256 --timeout 60
    ONLY="$ONLY_SAVE"
  done
  if [[ $TWO == 1 && "$backend" == postgres ]] && wanted sc004-2x; then
    stop_server
    start_server "$backend" "$url" "$PORT"
    start_server "$backend" "$url" "$((PORT + 1))"
    scenario "$backend" sc004-2x --mode open-flow "${SC004[@]}" --also-url "http://127.0.0.1:$((PORT + 1))"
  fi
  stop_server
  rm -rf "$WORK"; WORK=""
}

# ---- run ------------------------------------------------------------------------------------

# Empty CENTRALDB_DATABASE_URL means the default: <data>/centraldb-mfa.db.
if [[ $RUN_SQLITE == 1 ]]; then run_backend sqlite ""; fi

if [[ -n "$PG_URL" && $RUN_PG == 1 ]]; then
  pg_url="$PG_URL"
  if command -v psql >/dev/null; then
    PG_ADMIN_URL="$PG_URL"
    PG_SCHEMA="cdbbench_$(date +%s)_$RANDOM"
    psql -q "$PG_ADMIN_URL" -c "CREATE SCHEMA $PG_SCHEMA" >/dev/null
    sep='?'; [[ "$PG_URL" == *\?* ]] && sep='&'
    pg_url="${PG_URL}${sep}options=-c%20search_path%3D${PG_SCHEMA}"
  else
    echo "psql not found: the tables go into the database named by --postgres as it is" >&2
  fi
  run_backend postgres "$pg_url"
  drop_pg_schema
fi

summarize
