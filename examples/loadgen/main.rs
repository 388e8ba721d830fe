//! Load generator for a running centraldb-mfa (loopback only).
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --key-file data/admin-api-key \
//!     --mode token-get --connections 64 --duration 20 --users 1000
//! ```
//!
//! Except in `open-flow`, every virtual user (VU) is one tokio task owning exactly one HTTP/1.1 keep-alive connection
//! (hyper's connection-level client: no pool, nothing shared between users), so
//! `--connections 10000` means 10,000 sockets and 10,000 tasks on a couple of threads.
//!
//! Modes:
//! - `flow`: the GarminSync login flow, once per iteration with a fresh user id: session →
//!   external challenge → attempt → result → consume → PUT tokens → `--gets` × GET → PUT with
//!   If-Match (a refresh) → DELETE. Besides every route it reports `flow (end to end)` and
//!   `verification (attempt + result)`.
//! - `token-get`: seeds `--users` bundles with PUT, then GETs them round-robin.
//! - `token-put`: seeds `--users` bundles (at least one per connection), each connection then
//!   rewrites its own users with `If-Match: "<version>"` (so there is no self-inflicted 412).
//! - `mfa-verify`: pre-creates service-verified challenges with a known code (one user each),
//!   then verifies each exactly once; only the verifications are reported.
//! - `healthz`: `GET /healthz`.
//! - `refusal-flood`: `token-put` (legitimate PUTs with If-Match on `--connections`) while
//!   `--flood-connections` more connections send GETs with an invalid API key as fast as they
//!   are answered (401, or 429 once the source is over its refusal budget). The flood is
//!   reported as its own route; its rate is the refusal rate.
//!
//! - `open-flow` (open model, the issue 16 scenario): users arrive at `--rate` per second for
//!   `--duration` seconds; each runs session → external challenge (2 KB resume state) → think
//!   (uniform `--think A:B` s) → attempt → result → consume → PUT tokens → session
//!   `authenticated` → GET tokens, all users sharing `--pool` keep-alive connections (split over
//!   `--url` and any `--also-url` servers). Reports the peak users in flight, every step, the
//!   flow end to end and errors by status (see `open_flow.rs`).
//!
//! Closed loop by default (each VU sends its next request when the previous one answered).
//! `--rate R` (healthz, token-get, mfa-verify) is open loop: request i is due at start + i/R
//! and its latency is measured from that due time, so queueing in front of a slow server is
//! counted (no coordinated omission); the VUs then only serve as a connection pool.
//!
//! Per route template: requests, answers by status, transport errors, throughput,
//! p50/p95/p99/max (HDR histogram, microsecond resolution), the same per status, and a total.
//! `--json` prints the report as JSON instead of the table; `--out FILE` also writes it there.
//!
//! Safety: only `http://` URLs on a loopback address (`127.0.0.0/8`, `::1`, `localhost`, which
//! is taken to mean 127.0.0.1 without asking a resolver) are accepted; every run is bounded by
//! `--duration` (at most 600 s) and/or `--requests`, and a hard stop aborts anything left.

mod modes;
mod open_flow;
mod record;
mod report;
mod run;
mod target;
mod vu;

use modes::*;
use open_flow::*;
use record::*;
use report::*;
use run::*;
use target::*;
use vu::*;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{
    HeaderMap, Method, Request, StatusCode, Uri,
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::Semaphore};

pub(crate) const MAX_CONNECTIONS: usize = 20_000;
pub(crate) const MAX_DURATION_SECS: f64 = 600.0;
pub(crate) const MAX_REQUESTS: u64 = 50_000_000;
/// Highest latency the histograms hold (longer ones are clamped to it).
pub(crate) const MAX_LATENCY_US: u64 = 300_000_000;
pub(crate) const KNOWN_CODE: &str = "482913";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    Flow,
    TokenGet,
    TokenPut,
    MfaVerify,
    Healthz,
    RefusalFlood,
    OpenFlow,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Flow => "flow",
            Self::TokenGet => "token-get",
            Self::TokenPut => "token-put",
            Self::MfaVerify => "mfa-verify",
            Self::Healthz => "healthz",
            Self::RefusalFlood => "refusal-flood",
            Self::OpenFlow => "open-flow",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "HTTP load generator for centraldb-mfa (loopback targets only)")]
pub(crate) struct Args {
    /// Base URL of the server; must be http:// on 127.0.0.0/8, [::1] or localhost.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// API key (admin, or one with the scopes the mode needs). Prefer --key-file: argv is visible to `ps`.
    #[arg(long, conflicts_with = "key_file")]
    pub(crate) key: Option<String>,
    /// File holding the API key (first line).
    #[arg(long)]
    pub(crate) key_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Mode::Flow)]
    pub(crate) mode: Mode,
    /// Virtual users, one HTTP/1.1 connection each (1..=20000).
    #[arg(long, default_value_t = 64)]
    pub(crate) connections: usize,
    /// Seconds to run (at most 600). Default 10 when --requests is not given either.
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Stop after this many operations (requests; for `flow`, whole flows).
    #[arg(long)]
    pub(crate) requests: Option<u64>,
    /// Open-loop target rate in requests/s (healthz, token-get, mfa-verify).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// refusal-flood: connections sending requests with an invalid key, closed loop.
    #[arg(long, default_value_t = 4)]
    pub(crate) flood_connections: usize,
    /// refusal-flood: total invalid-key requests per second, spread over the flood connections
    /// (default: as fast as they are answered).
    #[arg(long)]
    pub(crate) flood_rate: Option<f64>,
    /// Users to seed for token-get / token-put.
    #[arg(long, default_value_t = 1000)]
    pub(crate) users: usize,
    /// GETs per flow iteration.
    #[arg(long, default_value_t = 5)]
    pub(crate) gets: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Per-request timeout in seconds (a timed-out request counts as an error).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) timeout: f64,
    /// Spread the VUs' start over this many seconds (VU i starts at i/N of it); default: all at once.
    #[arg(long)]
    pub(crate) ramp: Option<f64>,
    /// Connections opened at once while connecting the VUs (keeps the server's accept backlog sane).
    #[arg(long, default_value_t = 128)]
    pub(crate) connect_parallelism: usize,
    /// Prefix of the user ids this run creates (default: lg<random>).
    #[arg(long)]
    pub(crate) user_prefix: Option<String>,
    /// open-flow: a second (third, ...) server to spread the users over, round-robin (same rules as --url).
    #[arg(long)]
    pub(crate) also_url: Vec<String>,
    /// open-flow: keep-alive connections all users share (split evenly over the servers).
    #[arg(long, default_value_t = 256)]
    pub(crate) pool: usize,
    /// open-flow: think time between the challenge and the attempt, uniform in A:B seconds.
    #[arg(long)]
    pub(crate) think: Option<String>,
    /// Size of the OAuth2 access token in generated garth bundles (a real one is a ~1 KB JWT).
    #[arg(long, default_value_t = 600)]
    pub(crate) access_token_len: usize,
}

fn validate(args: &Args) -> Result<(), String> {
    if !(1..=MAX_CONNECTIONS).contains(&args.connections) {
        return Err(format!("--connections must be 1..={MAX_CONNECTIONS}"));
    }
    if let Some(d) = args.duration
        && !(d > 0.0 && d <= MAX_DURATION_SECS)
    {
        return Err(format!("--duration must be in (0, {MAX_DURATION_SECS}] seconds"));
    }
    if let Some(n) = args.requests
        && !(1..=MAX_REQUESTS).contains(&n)
    {
        return Err(format!("--requests must be 1..={MAX_REQUESTS}"));
    }
    if let Some(r) = args.rate {
        if !(r > 0.0 && r <= 100_000.0) {
            return Err("--rate must be in (0, 100000] requests/s".into());
        }
        if !matches!(args.mode, Mode::Healthz | Mode::TokenGet | Mode::MfaVerify | Mode::OpenFlow) {
            return Err("--rate applies to healthz, token-get, mfa-verify and open-flow (users/s)".into());
        }
    }
    if !(1..=MAX_CONNECTIONS).contains(&args.pool) {
        return Err(format!("--pool must be 1..={MAX_CONNECTIONS}"));
    }
    if let Some(t) = &args.think {
        parse_think(t)?;
    }
    if args.also_url.len() > 7 {
        return Err("--also-url: at most 7 more servers".into());
    }
    if args.mode == Mode::OpenFlow && (args.rate.is_none() || args.duration.is_none()) {
        return Err("open-flow needs --rate (users/s) and --duration (s of arrivals)".into());
    }
    if !(1..=1_000_000).contains(&args.users) {
        return Err("--users must be 1..=1000000".into());
    }
    if let Some(r) = args.flood_rate
        && !(r > 0.0 && r <= 100_000.0)
    {
        return Err("--flood-rate must be in (0, 100000] requests/s".into());
    }
    if args.flood_connections > 1000 {
        return Err("--flood-connections must be at most 1000".into());
    }
    if args.gets > 1000 {
        return Err("--gets must be at most 1000".into());
    }
    if let Some(r) = args.ramp
        && !(0.0..=MAX_DURATION_SECS).contains(&r)
    {
        return Err(format!("--ramp must be in [0, {MAX_DURATION_SECS}] seconds"));
    }
    if !(args.timeout > 0.0 && args.timeout <= 300.0) {
        return Err("--timeout must be in (0, 300] seconds".into());
    }
    if args.access_token_len > 16_000 {
        return Err("--access-token-len must be at most 16000".into());
    }
    if let Some(p) = &args.user_prefix
        && (p.is_empty() || p.len() > 40 || !p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err("--user-prefix must be 1-40 characters of [A-Za-z0-9._-]".into());
    }
    Ok(())
}

fn read_key(args: &Args) -> Result<Option<HeaderValue>, String> {
    let key = match (&args.key, &args.key_file) {
        (Some(k), _) => Some(k.trim().to_string()),
        (None, Some(p)) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("--key-file {}: {e}", p.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        (None, None) => std::env::var("CENTRALDB_LOADGEN_KEY").ok(),
    };
    match key {
        Some(k) if !k.is_empty() => HeaderValue::from_str(&format!("Bearer {k}"))
            .map(|mut v| {
                v.set_sensitive(true);
                Some(v)
            })
            .map_err(|_| "the API key is not a valid header value".into()),
        _ => Ok(None),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Err(e) = validate(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let target = match parse_target(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let auth = match read_key(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if auth.is_none() && args.mode != Mode::Healthz {
        eprintln!("error: mode {} needs --key or --key-file (or CENTRALDB_LOADGEN_KEY)", args.mode.name());
        return ExitCode::from(2);
    }
    let mut targets = vec![target.clone()];
    for u in &args.also_url {
        match parse_target(u) {
            Ok(t) => targets.push(t),
            Err(e) => {
                eprintln!("error: --also-url: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let nofile = raise_nofile_limit();
    let sockets = if args.mode == Mode::OpenFlow { args.pool } else { args.connections };
    if (sockets as u64) + 64 > nofile {
        eprintln!("error: {sockets} connections need more open files than RLIMIT_NOFILE allows ({nofile})");
        return ExitCode::from(2);
    }
    if args.duration.is_none() && args.requests.is_none() {
        args.duration = Some(10.0);
    }
    let mode = args.mode;
    if matches!(mode, Mode::TokenPut | Mode::RefusalFlood) {
        args.users = args.users.max(args.connections);
    }
    let prefix = args.user_prefix.clone().unwrap_or_else(|| format!("lg{:08x}", rand::random::<u32>()));
    let run = Arc::new(Run {
        mode,
        target,
        auth,
        prefix,
        timeout: Duration::from_secs_f64(args.timeout),
        budget: AtomicU64::new(args.requests.unwrap_or(u64::MAX)),
        stop: AtomicBool::new(false),
        counter: AtomicUsize::new(0),
        args,
    });
    let shards = 16;
    let n = run.args.connections;

    // 1. Seed (not part of the measured run).
    let seed_rec = Arc::new(Recorder::new(shards));
    let seed_start = Instant::now();
    let mut versions = Vec::new();
    let mut challenge_ids = Vec::new();
    let mut seeded = false;
    match mode {
        Mode::TokenGet | Mode::TokenPut | Mode::RefusalFlood => {
            log(format!("seeding {} token bundles", run.args.users));
            versions = seed_tokens(&run, &seed_rec, run.args.users, n.min(64)).await;
            seeded = true;
            let failed = versions.iter().filter(|v| **v == 0).count();
            if failed > 0 {
                log(format!("warning: {failed} of {} seed PUTs failed", versions.len()));
            }
        }
        Mode::MfaVerify => {
            let want = match (run.args.requests, run.args.rate, run.args.duration) {
                (Some(r), _, _) => r as usize,
                (None, Some(rate), Some(d)) => (rate * d).ceil() as usize,
                // Closed loop, duration only: as many as ~60 s of argon2 at a few per core can use.
                _ => 2000,
            };
            if want > 100_000 {
                eprintln!("error: mfa-verify would pre-create {want} challenges; at most 100000");
                return ExitCode::from(2);
            }
            log(format!("pre-creating {want} service-verified challenges (argon2: this takes a while)"));
            challenge_ids = seed_challenges(&run, &seed_rec, want, n.clamp(1, 8)).await;
            seeded = true;
            if challenge_ids.len() < want {
                log(format!("warning: only {} of {want} challenges were created", challenge_ids.len()));
            }
        }
        _ => {}
    }
    let seed_elapsed = seed_start.elapsed().as_secs_f64();

    // 2. Connect every VU, then start them together.
    let rec = Arc::new(Recorder::new(shards));
    if mode == Mode::OpenFlow {
        let cpu0 = cpu_seconds();
        let r = run_open_flow(run.clone(), targets, rec.clone()).await;
        let cpu1 = cpu_seconds();
        return finish(
            &run,
            json!({
                "connect": {"connections": run.args.pool, "failed": r.connect_failed,
                            "elapsed_s": (r.connect_time.as_secs_f64() * 1000.0).round() / 1000.0},
                "seed": Value::Null,
                "run": phase_json(&rec, r.elapsed.as_secs_f64()),
                "open_flow": r.summary,
                "reconnects": r.reconnects,
                "aborted_vus": r.aborted,
                "client_cpu_s": {"user": ((cpu1.0 - cpu0.0) * 100.0).round() / 100.0,
                                 "sys": ((cpu1.1 - cpu0.1) * 100.0).round() / 100.0},
                "open_loop_max_dispatch_lag_ms": Value::Null,
            }),
            r.aborted,
        );
    }
    log(format!("opening {n} connections"));
    let (vus, connect_failed, connect_time) = connect_all(&run, &rec, n).await;
    log(format!(
        "{} connected in {:.2}s ({connect_failed} failed); running {}",
        vus.len(),
        connect_time.as_secs_f64(),
        mode.name()
    ));
    let cpu0 = cpu_seconds();
    let mut dispatch: Option<tokio::task::JoinHandle<u64>> = None;
    let (elapsed, reconnects, aborted) = match (mode, run.args.rate) {
        (Mode::Healthz, None) => drive(&run, vus, op_healthz).await,
        (Mode::TokenGet, None) => drive(&run, vus, op_token_get).await,
        (Mode::Flow, _) => drive(&run, vus, op_flow).await,
        // Ran (and returned) above.
        (Mode::OpenFlow, _) => (Duration::ZERO, 0, 0),
        (Mode::TokenPut | Mode::RefusalFlood, _) => {
            let mut flood = (mode == Mode::RefusalFlood).then(|| start_flood(&run, &rec, run.args.flood_connections));
            let users = run.args.users;
            let mut per_vu: Vec<Vec<(String, i64)>> = vec![Vec::new(); n];
            for (j, v) in versions.iter().enumerate().take(users) {
                if *v > 0 {
                    per_vu[j % n].push((run.user("u", j), *v));
                }
            }
            let per_vu = Arc::new(Mutex::new(per_vu));
            let result = drive(&run, vus, move |run, vu| {
                let mine = per_vu.lock().map(|mut p| std::mem::take(&mut p[vu.id])).unwrap_or_default();
                op_token_put(run, vu, mine)
            })
            .await;
            run.stop.store(true, Ordering::Relaxed);
            if let Some(f) = flood.as_mut() {
                let _ = tokio::time::timeout(run.timeout + Duration::from_secs(1), async {
                    while f.join_next().await.is_some() {}
                })
                .await;
                f.abort_all();
            }
            result
        }
        (Mode::MfaVerify, rate) => {
            let ids = Arc::new(std::mem::take(&mut challenge_ids));
            let tickets = rate.map(|r| {
                let (t, h) = start_dispatcher(run.clone(), r, ids.len());
                dispatch = Some(h);
                t
            });
            if tickets.is_none() {
                // Closed loop: never more verifications than challenges.
                let _ =
                    run.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.min(ids.len() as u64)));
            }
            drive(&run, vus, move |run, vu| op_verify(run, vu, ids.clone(), tickets.clone())).await
        }
        (Mode::Healthz | Mode::TokenGet, Some(rate)) => {
            let (tickets, h) = start_dispatcher(run.clone(), rate, usize::MAX);
            dispatch = Some(h);
            drive(&run, vus, move |run, vu| op_open(run, vu, tickets.clone())).await
        }
    };
    let cpu1 = cpu_seconds();
    let max_lag = match dispatch {
        Some(h) => {
            h.abort();
            h.await.ok().map(ms)
        }
        None => None,
    };
    finish(
        &run,
        json!({
            "connect": {"connections": n, "failed": connect_failed, "elapsed_s": (connect_time.as_secs_f64() * 1000.0).round() / 1000.0},
            "seed": if seeded { phase_json(&seed_rec, seed_elapsed) } else { Value::Null },
            "run": phase_json(&rec, elapsed.as_secs_f64()),
            "reconnects": reconnects,
            "aborted_vus": aborted,
            "client_cpu_s": {"user": ((cpu1.0 - cpu0.0) * 100.0).round() / 100.0, "sys": ((cpu1.1 - cpu0.1) * 100.0).round() / 100.0},
            "open_loop_max_dispatch_lag_ms": max_lag,
        }),
        aborted,
    )
}

/// Adds the run's description to `parts`, writes and prints the report; the exit code.
fn finish(run: &Run, parts: Value, aborted: usize) -> ExitCode {
    let a = &run.args;
    let mut report = json!({
        "tool": "centraldb-mfa loadgen",
        "mode": run.mode.name(),
        "started_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "args": {"url": a.url, "connections": a.connections, "duration_s": a.duration, "requests": a.requests,
                 "rate": a.rate, "ramp_s": a.ramp, "users": a.users, "gets": a.gets, "timeout_s": a.timeout,
                 "access_token_len": a.access_token_len, "user_prefix": run.prefix,
                 "also_url": a.also_url, "pool": a.pool, "think_s": a.think},
    });
    if let (Some(r), Some(p)) = (report.as_object_mut(), parts.as_object()) {
        r.extend(p.clone());
    }
    if let Some(path) = &run.args.out
        && let Err(e) = std::fs::write(path, serde_json::to_vec_pretty(&report).unwrap_or_default())
    {
        eprintln!("error: cannot write {}: {e}", path.display());
    }
    if run.args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print_table(&report);
    }
    if aborted > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
