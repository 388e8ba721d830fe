//! Load generator for a running centraldb-mfa (loopback only).
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080 --key-file data/admin-api-key \
//!     --mode token-get --connections 64 --duration 20 --users 1000
//! ```
//!
//! Every virtual user (VU) is one tokio task owning exactly one HTTP/1.1 keep-alive connection
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

const MAX_CONNECTIONS: usize = 20_000;
const MAX_DURATION_SECS: f64 = 600.0;
const MAX_REQUESTS: u64 = 50_000_000;
/// Highest latency the histograms hold (longer ones are clamped to it).
const MAX_LATENCY_US: u64 = 300_000_000;
const KNOWN_CODE: &str = "482913";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Flow,
    TokenGet,
    TokenPut,
    MfaVerify,
    Healthz,
    RefusalFlood,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Flow => "flow",
            Self::TokenGet => "token-get",
            Self::TokenPut => "token-put",
            Self::MfaVerify => "mfa-verify",
            Self::Healthz => "healthz",
            Self::RefusalFlood => "refusal-flood",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "loadgen", about = "HTTP load generator for centraldb-mfa (loopback targets only)")]
struct Args {
    /// Base URL of the server; must be http:// on 127.0.0.0/8, [::1] or localhost.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key (admin, or one with the scopes the mode needs). Prefer --key-file: argv is visible to `ps`.
    #[arg(long, conflicts_with = "key_file")]
    key: Option<String>,
    /// File holding the API key (first line).
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Mode::Flow)]
    mode: Mode,
    /// Virtual users, one HTTP/1.1 connection each (1..=20000).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run (at most 600). Default 10 when --requests is not given either.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many operations (requests; for `flow`, whole flows).
    #[arg(long)]
    requests: Option<u64>,
    /// Open-loop target rate in requests/s (healthz, token-get, mfa-verify).
    #[arg(long)]
    rate: Option<f64>,
    /// refusal-flood: connections sending requests with an invalid key, closed loop.
    #[arg(long, default_value_t = 4)]
    flood_connections: usize,
    /// refusal-flood: total invalid-key requests per second, spread over the flood connections
    /// (default: as fast as they are answered).
    #[arg(long)]
    flood_rate: Option<f64>,
    /// Users to seed for token-get / token-put.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// GETs per flow iteration.
    #[arg(long, default_value_t = 5)]
    gets: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Per-request timeout in seconds (a timed-out request counts as an error).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Spread the VUs' start over this many seconds (VU i starts at i/N of it); default: all at once.
    #[arg(long)]
    ramp: Option<f64>,
    /// Connections opened at once while connecting the VUs (keeps the server's accept backlog sane).
    #[arg(long, default_value_t = 128)]
    connect_parallelism: usize,
    /// Prefix of the user ids this run creates (default: lg<random>).
    #[arg(long)]
    user_prefix: Option<String>,
    /// Size of the OAuth2 access token in generated garth bundles (a real one is a ~1 KB JWT).
    #[arg(long, default_value_t = 600)]
    access_token_len: usize,
}

// ---- target ---------------------------------------------------------------------------------

/// The server: a loopback socket address and the Host header to send.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: HeaderValue,
}

fn parse_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("--url: scheme {other} is not supported (plain http on loopback only)")),
        None => return Err("--url must start with http://".into()),
    }
    let auth = uri.authority().ok_or("--url has no host")?;
    if auth.as_str().contains('@') {
        return Err("--url must not carry credentials".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("--url must be just scheme://host:port (no path or query)".into());
    }
    let host = auth.host();
    let port = auth.port_u16().unwrap_or(80);
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        // Deliberately not resolved: /etc/hosts could point "localhost" anywhere.
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("--url host {host:?} refused: only 127.0.0.1/8, [::1] or localhost are allowed"))?
    };
    if !ip.is_loopback() {
        return Err(format!("--url host {ip} refused: this tool only targets loopback addresses"));
    }
    let host = HeaderValue::from_str(auth.as_str()).map_err(|_| "--url host is not a valid header value")?;
    Ok(Target { addr: SocketAddr::new(ip, port), host })
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the resulting soft limit.
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// CPU seconds (user, system) this process has used.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return (0.0, 0.0);
        }
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (s(u.ru_utime), s(u.ru_stime))
    }
}

// ---- recording ------------------------------------------------------------------------------

fn new_hist() -> Histogram<u64> {
    // 3 significant digits over 1 µs .. 300 s. Bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

#[derive(Default)]
struct RouteStats {
    by_status: BTreeMap<u16, Histogram<u64>>,
    /// Transport failures by kind (connect, io, timeout), with their latencies.
    transport: BTreeMap<&'static str, Histogram<u64>>,
}

impl RouteStats {
    fn merge(&mut self, other: &RouteStats) {
        for (k, h) in &other.by_status {
            let _ = self.by_status.entry(*k).or_insert_with(new_hist).add(h);
        }
        for (k, h) in &other.transport {
            let _ = self.transport.entry(*k).or_insert_with(new_hist).add(h);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Status(u16),
    Transport(&'static str),
}

/// Sharded by VU so 10,000 users do not contend on one lock.
struct Recorder {
    shards: Vec<Mutex<HashMap<&'static str, RouteStats>>>,
}

impl Recorder {
    fn new(shards: usize) -> Self {
        Self { shards: (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn record(&self, shard: usize, route: &'static str, outcome: Outcome, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let Ok(mut map) = self.shards[shard % self.shards.len()].lock() else { return };
        let stats = map.entry(route).or_default();
        let h = match outcome {
            Outcome::Status(s) => stats.by_status.entry(s).or_insert_with(new_hist),
            Outcome::Transport(k) => stats.transport.entry(k).or_insert_with(new_hist),
        };
        h.saturating_record(us);
    }

    fn merged(&self) -> BTreeMap<&'static str, RouteStats> {
        let mut out: BTreeMap<&'static str, RouteStats> = BTreeMap::new();
        for shard in &self.shards {
            if let Ok(map) = shard.lock() {
                for (route, stats) in map.iter() {
                    out.entry(route).or_default().merge(stats);
                }
            }
        }
        out
    }
}

// ---- one connection per virtual user --------------------------------------------------------

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The version an `ETag: "<n>"` names.
    fn etag_version(&self) -> Option<i64> {
        let v = self.headers.get(header::ETAG)?.to_str().ok()?;
        v.trim().trim_matches('"').parse().ok()
    }
}

struct Vu {
    id: usize,
    target: Target,
    auth: Option<HeaderValue>,
    sender: Option<SendRequest<Full<Bytes>>>,
    timeout: Duration,
    recorder: Arc<Recorder>,
    reconnects: u64,
}

impl Vu {
    async fn connect(&mut self) -> Result<(), &'static str> {
        self.sender = None;
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| "connect_timeout")?
            .map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "connect")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        self.reconnects += 1;
        Ok(())
    }

    async fn ensure_connected(&mut self) -> Result<(), &'static str> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        Ok(())
    }

    /// One request on this VU's connection; the connection is re-opened if the server closed it.
    async fn raw(
        &mut self,
        method: Method,
        path: &str,
        extra: &[(&'static str, String)],
        body: Option<Bytes>,
    ) -> Result<Resp, &'static str> {
        self.ensure_connected().await?;
        let mut b = Request::builder().method(method).uri(path).header(header::HOST, self.target.host.clone());
        if let Some(a) = &self.auth {
            b = b.header(header::AUTHORIZATION, a.clone());
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        for (k, v) in extra {
            b = b.header(*k, v.as_str());
        }
        let req = b.body(Full::new(body.unwrap_or_default())).map_err(|_| "request")?;
        let Some(sender) = self.sender.as_mut() else { return Err("connect") };
        let exchange = async {
            sender.ready().await.map_err(|_| "io")?;
            let resp = sender.send_request(req).await.map_err(|_| "io")?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|_| "io")?.to_bytes();
            Ok::<_, &'static str>(Resp { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err("timeout")
            }
        }
    }

    /// A request, recorded under `route` with its latency measured from `since` (now when None).
    async fn call(
        &mut self,
        route: &'static str,
        method: Method,
        path: &str,
        extra: &[(&'static str, String)],
        body: Option<Bytes>,
        since: Option<Instant>,
    ) -> Result<Resp, Outcome> {
        let start = since.unwrap_or_else(Instant::now);
        let result = self.raw(method, path, extra, body).await;
        let elapsed = start.elapsed();
        match result {
            Ok(r) => {
                self.recorder.record(self.id, route, Outcome::Status(r.status.as_u16()), elapsed);
                Ok(r)
            }
            Err(kind) => {
                self.recorder.record(self.id, route, Outcome::Transport(kind), elapsed);
                Err(Outcome::Transport(kind))
            }
        }
    }
}

/// `Ok` when the answer has the expected status, else the outcome to blame.
fn want(r: Result<Resp, Outcome>, want: u16) -> Result<Resp, Outcome> {
    match r {
        Ok(r) if r.status.as_u16() == want => Ok(r),
        Ok(r) => Err(Outcome::Status(r.status.as_u16())),
        Err(e) => Err(e),
    }
}

// ---- run control ----------------------------------------------------------------------------

struct Run {
    args: Args,
    mode: Mode,
    target: Target,
    auth: Option<HeaderValue>,
    prefix: String,
    timeout: Duration,
    /// Operations still allowed (`--requests`), or u64::MAX.
    budget: AtomicU64,
    /// Set when the duration is over (or on a hard stop).
    stop: AtomicBool,
    counter: AtomicUsize,
}

impl Run {
    /// Takes one operation from the budget; false when the run is over.
    fn take(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    fn vu(&self, id: usize, recorder: &Arc<Recorder>) -> Vu {
        Vu {
            id,
            target: self.target.clone(),
            auth: self.auth.clone(),
            sender: None,
            timeout: self.timeout,
            recorder: recorder.clone(),
            reconnects: 0,
        }
    }

    fn user(&self, what: &str, n: usize) -> String {
        format!("{}-{what}{n}", self.prefix)
    }

    fn garth_body(&self, tag: &str) -> Bytes {
        let now = chrono::Utc::now().timestamp();
        let filler: String = std::iter::repeat_n('a', self.args.access_token_len.saturating_sub(tag.len())).collect();
        let body = json!({
            "kind": "garth",
            "oauth1_token": {"oauth_token": format!("o1tok-{tag}"), "oauth_token_secret": format!("o1sec-{tag}"),
                             "mfa_token": null, "mfa_expiration_timestamp": null, "domain": "garmin.com"},
            "oauth2_token": {"scope": "CONNECT_READ CONNECT_WRITE", "jti": format!("jti-{tag}"), "token_type": "Bearer",
                             "access_token": format!("acc-{tag}-{filler}"), "refresh_token": format!("ref-{tag}"),
                             "expires_in": 86_400, "expires_at": now + 86_400,
                             "refresh_token_expires_in": 2_592_000, "refresh_token_expires_at": now + 2_592_000}
        });
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[loadgen] {}", msg.as_ref());
}

/// Opens `n` VUs' connections, at most `parallelism` at a time. VUs that cannot connect are
/// kept (they retry on their first request) and counted.
async fn connect_all(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize) -> (Vec<Vu>, usize, Duration) {
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(run.args.connect_parallelism.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for id in 0..n {
        let mut vu = run.vu(id, recorder);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut ok = false;
            for attempt in 0..5u32 {
                if vu.connect().await.is_ok() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            vu.reconnects = 0;
            (vu, ok)
        }));
    }
    let mut vus = Vec::with_capacity(n);
    let mut failed = 0;
    for t in tasks {
        if let Ok((vu, ok)) = t.await {
            failed += usize::from(!ok);
            vus.push(vu);
        }
    }
    (vus, failed, start.elapsed())
}

/// Runs `work` on every VU until the run is over; each VU's total reconnect count is returned.
async fn drive<F, Fut>(run: &Arc<Run>, vus: Vec<Vu>, work: F) -> (Duration, u64, usize)
where
    F: Fn(Arc<Run>, Vu) -> Fut,
    Fut: std::future::Future<Output = Vu> + Send + 'static,
{
    let duration = run.args.duration.map(Duration::from_secs_f64);
    let ramp = run.args.ramp.map(Duration::from_secs_f64).unwrap_or_default();
    let n = vus.len().max(1);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for vu in vus {
        let delay = ramp.mul_f64(vu.id as f64 / n as f64);
        let job = work(run.clone(), vu);
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            job.await
        });
    }
    // Stop taking new work at the deadline; a hard stop aborts whatever is still running.
    let stopper = {
        let run = run.clone();
        tokio::spawn(async move {
            if let Some(d) = duration {
                tokio::time::sleep(d).await;
                run.stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let hard =
        duration.unwrap_or(Duration::from_secs_f64(MAX_DURATION_SECS)) + run.timeout * 3 + Duration::from_secs(30);
    let mut reconnects = 0;
    let mut aborted = 0;
    let deadline = tokio::time::Instant::now() + hard;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(vu))) => reconnects += vu.reconnects,
            Ok(Some(Err(_))) => aborted += 1,
            Ok(None) => break,
            Err(_) => {
                run.stop.store(true, Ordering::Relaxed);
                aborted += set.len();
                set.abort_all();
                log(format!("hard stop: aborted {aborted} virtual users still running"));
                break;
            }
        }
    }
    stopper.abort();
    (start.elapsed(), reconnects, aborted)
}

// ---- modes ----------------------------------------------------------------------------------

const R_HEALTHZ: &str = "GET /healthz";
const R_TOKENS_GET: &str = "GET /api/v1/users/{user_id}/tokens";
const R_TOKENS_PUT: &str = "PUT /api/v1/users/{user_id}/tokens";
const R_TOKENS_PUT_IF_MATCH: &str = "PUT /api/v1/users/{user_id}/tokens (If-Match)";
const R_TOKENS_DELETE: &str = "DELETE /api/v1/users/{user_id}/tokens";
const R_FLOOD: &str = "GET /api/v1/users/{user_id}/tokens (invalid key)";
const R_SESSIONS: &str = "POST /api/v1/sessions";
const R_CHALLENGES: &str = "POST /api/v1/mfa/challenges";
const R_VERIFY: &str = "POST /api/v1/mfa/challenges/{id}/verify";
const R_ATTEMPTS: &str = "POST /api/v1/mfa/challenges/{id}/attempts";
const R_RESULT: &str = "POST /api/v1/mfa/challenges/{id}/attempts/{n}/result";
const R_CONSUME: &str = "POST /api/v1/mfa/challenges/{id}/consume";
const P_FLOW: &str = "flow (end to end)";
const P_VERIFICATION: &str = "verification (attempt + result)";

fn is_derived(route: &str) -> bool {
    route == P_FLOW || route == P_VERIFICATION
}

/// Report order: the flow's own order, derived rows last.
fn rank(route: &str) -> usize {
    const ORDER: [&str; 14] = [
        R_HEALTHZ,
        R_SESSIONS,
        R_CHALLENGES,
        R_VERIFY,
        R_ATTEMPTS,
        R_RESULT,
        R_CONSUME,
        R_TOKENS_PUT,
        R_TOKENS_GET,
        R_TOKENS_PUT_IF_MATCH,
        R_TOKENS_DELETE,
        R_FLOOD,
        P_VERIFICATION,
        P_FLOW,
    ];
    ORDER.iter().position(|r| *r == route).unwrap_or(ORDER.len())
}

/// PUTs `n` bundles with `par` connections; returns their versions (0 where the PUT failed).
async fn seed_tokens(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize, par: usize) -> Vec<i64> {
    let next = Arc::new(AtomicUsize::new(0));
    let versions = Arc::new(Mutex::new(vec![0i64; n]));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..par.min(n).max(1) {
        let mut vu = run.vu(id, recorder);
        let (run, next, versions) = (run.clone(), next.clone(), versions.clone());
        set.spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= n {
                    break;
                }
                let user = run.user("u", j);
                let path = format!("/api/v1/users/{user}/tokens");
                let r = vu.call(R_TOKENS_PUT, Method::PUT, &path, &[], Some(run.garth_body(&user)), None).await;
                if let Ok(r) = r
                    && r.status.is_success()
                    && let (Some(v), Ok(mut vs)) = (r.etag_version(), versions.lock())
                {
                    vs[j] = v;
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    versions.lock().map(|v| v.clone()).unwrap_or_default()
}

async fn op_healthz(run: Arc<Run>, mut vu: Vu) -> Vu {
    while run.take() {
        let _ = vu.call(R_HEALTHZ, Method::GET, "/healthz", &[], None, None).await;
    }
    vu
}

async fn op_token_get(run: Arc<Run>, mut vu: Vu) -> Vu {
    let users = run.args.users.max(1);
    while run.take() {
        let j = run.counter.fetch_add(1, Ordering::Relaxed) % users;
        let path = format!("/api/v1/users/{}/tokens", run.user("u", j));
        let _ = vu.call(R_TOKENS_GET, Method::GET, &path, &[], None, None).await;
    }
    vu
}

/// Each VU owns users j ≡ vu.id (mod connections) and keeps their versions.
async fn op_token_put(run: Arc<Run>, mut vu: Vu, mut mine: Vec<(String, i64)>) -> Vu {
    if mine.is_empty() {
        return vu;
    }
    let mut i = 0usize;
    let mut round = 0u64;
    while run.take() {
        let (user, version) = &mut mine[i];
        let path = format!("/api/v1/users/{user}/tokens");
        let body = run.garth_body(&format!("{user}-r{round}"));
        let headers = [("if-match", format!("\"{version}\""))];
        match vu.call(R_TOKENS_PUT_IF_MATCH, Method::PUT, &path, &headers, Some(body), None).await {
            Ok(r) if r.status.is_success() => *version = r.etag_version().unwrap_or(*version + 1),
            Ok(r) if r.status == StatusCode::PRECONDITION_FAILED => {
                if let Some(v) = r.json()["current_version"].as_i64() {
                    *version = v;
                }
            }
            _ => {}
        }
        i += 1;
        if i == mine.len() {
            i = 0;
            round += 1;
        }
    }
    vu
}

/// refusal-flood: `n` connections with an invalid key, each sending its next request when the
/// previous one is answered, until the run stops.
fn start_flood(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    let bad = HeaderValue::from_static("Bearer cdbm_loadgen-invalid-key-0000000000000000");
    for i in 0..n {
        let mut vu = run.vu(run.args.connections + i, recorder);
        vu.auth = Some(bad.clone());
        let run = run.clone();
        // With a rate, flooder i sends its k-th request at start + (k * n + i) / rate.
        let every = run.args.flood_rate.map(|r| Duration::from_secs_f64(n as f64 / r));
        set.spawn(async move {
            let start = tokio::time::Instant::now() + every.map_or(Duration::ZERO, |e| e.mul_f64(i as f64 / n as f64));
            let mut k = 0u32;
            while !run.stop.load(Ordering::Relaxed) {
                if let Some(e) = every {
                    tokio::time::sleep_until(start + e * k).await;
                    k += 1;
                }
                let path = format!("/api/v1/users/{}/tokens", run.user("flood", i));
                if vu.call(R_FLOOD, Method::GET, &path, &[], None, None).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    set
}

/// Verifies challenges by index from `ids`; with a rate, tickets carry their due time.
async fn op_verify(run: Arc<Run>, mut vu: Vu, ids: Arc<Vec<String>>, tickets: Option<Tickets>) -> Vu {
    let body = Bytes::from(serde_json::to_vec(&json!({"code": KNOWN_CODE})).unwrap_or_default());
    loop {
        let (j, due) = match &tickets {
            Some(t) => match t.next().await {
                Some(x) => x,
                None => break,
            },
            None => {
                if !run.take() {
                    break;
                }
                (run.counter.fetch_add(1, Ordering::Relaxed), None)
            }
        };
        let Some(id) = ids.get(j) else { break };
        let path = format!("/api/v1/mfa/challenges/{id}/verify");
        let _ = vu.call(R_VERIFY, Method::POST, &path, &[], Some(body.clone()), due).await;
    }
    vu
}

/// Open-loop work for healthz and token-get.
async fn op_open(run: Arc<Run>, mut vu: Vu, tickets: Tickets) -> Vu {
    let users = run.args.users.max(1);
    while let Some((j, due)) = tickets.next().await {
        match run.mode {
            Mode::TokenGet => {
                let path = format!("/api/v1/users/{}/tokens", run.user("u", j % users));
                let _ = vu.call(R_TOKENS_GET, Method::GET, &path, &[], None, due).await;
            }
            _ => {
                let _ = vu.call(R_HEALTHZ, Method::GET, "/healthz", &[], None, due).await;
            }
        }
    }
    vu
}

fn resume_state(tag: &str) -> String {
    // ~1 KiB of opaque state, like a pickled garth client.
    let mut s = format!("garth-resume:{tag}:");
    while s.len() < 1024 {
        s.push_str("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0MjQy");
    }
    s
}

/// One GarminSync login for a fresh user. Returns Err(outcome of the failing step).
async fn one_flow(run: &Run, vu: &mut Vu, user: &str) -> Result<(), Outcome> {
    let js = |v: Value| Some(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()));
    let r = want(
        vu.call(R_SESSIONS, Method::POST, "/api/v1/sessions", &[], js(json!({"user_id": user})), None).await,
        201,
    )?;
    let session_id = r.json()["id"].as_str().unwrap_or_default().to_string();
    let r = want(
        vu.call(
            R_CHALLENGES,
            Method::POST,
            "/api/v1/mfa/challenges",
            &[],
            js(json!({"user_id": user, "session_id": session_id, "method": "email",
                      "destination": "runner@example.com", "verifier": "external",
                      "resume_state": resume_state(user)})),
            None,
        )
        .await,
        201,
    )?;
    let cid = r.json()["id"].as_str().unwrap_or_default().to_string();
    let verification = Instant::now();
    let r = want(
        vu.call(
            R_ATTEMPTS,
            Method::POST,
            &format!("/api/v1/mfa/challenges/{cid}/attempts"),
            &[],
            js(json!({"code": "123456"})),
            None,
        )
        .await,
        201,
    )?;
    let n = r.json()["attempt"].as_i64().unwrap_or(1);
    want(
        vu.call(
            R_RESULT,
            Method::POST,
            &format!("/api/v1/mfa/challenges/{cid}/attempts/{n}/result"),
            &[],
            js(json!({"success": true})),
            None,
        )
        .await,
        200,
    )?;
    vu.recorder.record(vu.id, P_VERIFICATION, Outcome::Status(200), verification.elapsed());
    want(
        vu.call(R_CONSUME, Method::POST, &format!("/api/v1/mfa/challenges/{cid}/consume"), &[], None, None).await,
        200,
    )?;
    let tokens = format!("/api/v1/users/{user}/tokens");
    let r = want(vu.call(R_TOKENS_PUT, Method::PUT, &tokens, &[], Some(run.garth_body(user)), None).await, 201)?;
    let mut version = r.etag_version().unwrap_or(1);
    for _ in 0..run.args.gets {
        let r = want(vu.call(R_TOKENS_GET, Method::GET, &tokens, &[], None, None).await, 200)?;
        version = r.etag_version().unwrap_or(version);
    }
    let refreshed = run.garth_body(&format!("{user}-refreshed"));
    let headers = [("if-match", format!("\"{version}\""))];
    want(vu.call(R_TOKENS_PUT_IF_MATCH, Method::PUT, &tokens, &headers, Some(refreshed), None).await, 200)?;
    want(vu.call(R_TOKENS_DELETE, Method::DELETE, &tokens, &[], None, None).await, 204)?;
    Ok(())
}

async fn op_flow(run: Arc<Run>, mut vu: Vu) -> Vu {
    let mut iter = 0usize;
    while run.take() {
        let user = format!("{}-f{}-{iter}", run.prefix, vu.id);
        iter += 1;
        let start = Instant::now();
        match one_flow(&run, &mut vu, &user).await {
            Ok(()) => vu.recorder.record(vu.id, P_FLOW, Outcome::Status(200), start.elapsed()),
            Err(o) => {
                vu.recorder.record(vu.id, P_FLOW, o, start.elapsed());
                // Best effort clean-up of whatever the failed flow left (also recorded).
                let path = format!("/api/v1/users/{user}/tokens");
                let _ = vu.call(R_TOKENS_DELETE, Method::DELETE, &path, &[], None, None).await;
            }
        }
    }
    vu
}

/// Pre-creates `n` service-verified challenges (one fresh user each) with the known code.
async fn seed_challenges(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize, par: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(vec![String::new(); n]));
    let mut set = tokio::task::JoinSet::new();
    for id in 0..par.min(n).max(1) {
        let mut vu = run.vu(id, recorder);
        let (run, next, ids) = (run.clone(), next.clone(), ids.clone());
        set.spawn(async move {
            loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                if j >= n {
                    break;
                }
                let body = Bytes::from(
                    serde_json::to_vec(&json!({"user_id": run.user("v", j), "method": "email",
                        "destination": "runner@example.com", "verifier": "service", "code": KNOWN_CODE,
                        "ttl_seconds": 600}))
                    .unwrap_or_default(),
                );
                // The server answers 503 when its argon2 queue is full: back off and retry.
                for attempt in 0..40u32 {
                    match vu
                        .call(R_CHALLENGES, Method::POST, "/api/v1/mfa/challenges", &[], Some(body.clone()), None)
                        .await
                    {
                        Ok(r) if r.status == StatusCode::CREATED => {
                            if let (Some(cid), Ok(mut v)) = (r.json()["id"].as_str(), ids.lock()) {
                                v[j] = cid.to_string();
                            }
                            break;
                        }
                        Ok(r) if r.status == StatusCode::SERVICE_UNAVAILABLE => {
                            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1).min(10))).await;
                        }
                        _ => break,
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let out: Vec<String> = ids.lock().map(|v| v.clone()).unwrap_or_default();
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

// ---- open loop ------------------------------------------------------------------------------

/// Request number and its due time.
type Ticket = (usize, Option<Instant>);

/// Due tickets, shared by the VUs of an open-loop run.
#[derive(Clone)]
struct Tickets {
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Ticket>>>,
}

impl Tickets {
    async fn next(&self) -> Option<Ticket> {
        self.rx.lock().await.recv().await
    }
}

/// Issues ticket i at start + i/rate until the run is over (or `limit` tickets).
fn start_dispatcher(run: Arc<Run>, rate: f64, limit: usize) -> (Tickets, tokio::task::JoinHandle<u64>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut max_lag_us = 0u64;
        for i in 0..limit {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            if !run.take() {
                break;
            }
            max_lag_us = max_lag_us.max(due.elapsed().as_micros() as u64);
            if tx.send((i, Some(due.into_std()))).is_err() {
                break;
            }
        }
        max_lag_us
    });
    (Tickets { rx: Arc::new(tokio::sync::Mutex::new(rx)) }, handle)
}

// ---- report ---------------------------------------------------------------------------------

/// Microseconds as milliseconds (keeping microsecond resolution).
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)), "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)), "max_ms": ms(h.max()), "mean_ms": ms(h.mean() as u64),
        "min_ms": ms(h.min()),
    })
}

fn is_error_status(s: u16) -> bool {
    s >= 400
}

fn route_json(route: &str, stats: &RouteStats, elapsed: f64) -> (Value, Histogram<u64>, u64, u64) {
    let mut all = new_hist();
    let mut statuses = serde_json::Map::new();
    let mut by_status = serde_json::Map::new();
    let mut errors = 0u64;
    for (s, h) in &stats.by_status {
        let _ = all.add(h);
        statuses.insert(s.to_string(), json!(h.len()));
        by_status.insert(s.to_string(), latency_json(h));
        if is_error_status(*s) {
            errors += h.len();
        }
    }
    let mut transport = serde_json::Map::new();
    for (k, h) in &stats.transport {
        let _ = all.add(h);
        transport.insert(k.to_string(), json!(h.len()));
        by_status.insert(k.to_string(), latency_json(h));
        errors += h.len();
    }
    let n = all.len();
    let v = json!({
        "route": route, "derived": is_derived(route), "requests": n, "errors": errors,
        "statuses": statuses, "transport_errors": transport,
        "throughput_rps": if elapsed > 0.0 { (n as f64 / elapsed * 10.0).round() / 10.0 } else { 0.0 },
        "latency": latency_json(&all), "latency_by_status": by_status,
    });
    (v, all, n, errors)
}

fn phase_json(recorder: &Recorder, elapsed: f64) -> Value {
    let merged = recorder.merged();
    let mut routes = Vec::new();
    let mut total = new_hist();
    let (mut total_n, mut total_err) = (0u64, 0u64);
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    // Real routes first, derived (flow, verification) last.
    let mut order: Vec<&&'static str> = merged.keys().collect();
    order.sort_by_key(|r| (rank(r), **r));
    for route in order {
        let stats = &merged[*route];
        let (v, all, n, errors) = route_json(route, stats, elapsed);
        if !is_derived(route) {
            let _ = total.add(&all);
            total_n += n;
            total_err += errors;
            for (s, c) in v["statuses"]
                .as_object()
                .into_iter()
                .flatten()
                .chain(v["transport_errors"].as_object().into_iter().flatten())
            {
                *statuses.entry(s.clone()).or_default() += c.as_u64().unwrap_or(0);
            }
        }
        routes.push(v);
    }
    json!({
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "routes": routes,
        "total": {"requests": total_n, "errors": total_err, "statuses": statuses,
                  "throughput_rps": if elapsed > 0.0 { (total_n as f64 / elapsed * 10.0).round() / 10.0 } else { 0.0 },
                  "latency": latency_json(&total)},
    })
}

fn print_table(report: &Value) {
    let a = &report["args"];
    let opt = |v: &Value| if v.is_null() { "-".to_string() } else { v.to_string() };
    println!(
        "mode={} url={} connections={} duration_s={} requests={} rate={} users={} gets={}",
        report["mode"].as_str().unwrap_or(""),
        a["url"].as_str().unwrap_or(""),
        a["connections"],
        opt(&a["duration_s"]),
        opt(&a["requests"]),
        opt(&a["rate"]),
        a["users"],
        a["gets"]
    );
    if let Some(seed) = report.get("seed").filter(|s| !s.is_null()) {
        println!(
            "seed: {} requests, {} errors in {:.1}s",
            seed["total"]["requests"],
            seed["total"]["errors"],
            seed["elapsed_s"].as_f64().unwrap_or(0.0)
        );
    }
    let run = &report["run"];
    println!(
        "run: {:.2}s; connect: {} connections in {:.2}s ({} failed); reconnects during run: {}; client CPU {:.1}s user + {:.1}s sys",
        run["elapsed_s"].as_f64().unwrap_or(0.0),
        report["connect"]["connections"],
        report["connect"]["elapsed_s"].as_f64().unwrap_or(0.0),
        report["connect"]["failed"],
        report["reconnects"],
        report["client_cpu_s"]["user"].as_f64().unwrap_or(0.0),
        report["client_cpu_s"]["sys"].as_f64().unwrap_or(0.0),
    );
    if let Some(lag) = report.get("open_loop_max_dispatch_lag_ms").filter(|v| !v.is_null()) {
        println!("open loop: target {} req/s, max dispatch lag {} ms", a["rate"], lag);
    }
    println!(
        "{:<58} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "route", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    let row = |name: &str, v: &Value| {
        let l = &v["latency"];
        let f = |k: &str| l[k].as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<58} {:>9} {:>7} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
            name,
            v["requests"].as_u64().unwrap_or(0),
            v["errors"].as_u64().unwrap_or(0),
            v["throughput_rps"].as_f64().unwrap_or(0.0),
            f("p50_ms"),
            f("p95_ms"),
            f("p99_ms"),
            f("max_ms")
        );
    };
    for r in run["routes"].as_array().into_iter().flatten() {
        row(r["route"].as_str().unwrap_or(""), r);
        let mut parts: Vec<String> = Vec::new();
        for (s, c) in r["statuses"].as_object().into_iter().flatten() {
            let p99 = r["latency_by_status"][s]["p99_ms"].as_f64().unwrap_or(0.0);
            parts.push(format!("{s}: {c} (p99 {p99:.3} ms)"));
        }
        for (s, c) in r["transport_errors"].as_object().into_iter().flatten() {
            parts.push(format!("{s}: {c}"));
        }
        println!("    {}", parts.join(", "));
    }
    row("TOTAL (excluding derived rows)", &run["total"]);
}

// ---- main -----------------------------------------------------------------------------------

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
        if !matches!(args.mode, Mode::Healthz | Mode::TokenGet | Mode::MfaVerify) {
            return Err("--rate applies to healthz, token-get and mfa-verify".into());
        }
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
    let nofile = raise_nofile_limit();
    if (args.connections as u64) + 64 > nofile {
        eprintln!("error: {} connections need more open files than RLIMIT_NOFILE allows ({nofile})", args.connections);
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
    let a = &run.args;
    let report = json!({
        "tool": "centraldb-mfa loadgen",
        "mode": mode.name(),
        "started_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "args": {"url": a.url, "connections": a.connections, "duration_s": a.duration, "requests": a.requests,
                 "rate": a.rate, "ramp_s": a.ramp, "users": a.users, "gets": a.gets, "timeout_s": a.timeout,
                 "access_token_len": a.access_token_len, "user_prefix": run.prefix},
        "connect": {"connections": n, "failed": connect_failed, "elapsed_s": (connect_time.as_secs_f64() * 1000.0).round() / 1000.0},
        "seed": if seeded { phase_json(&seed_rec, seed_elapsed) } else { Value::Null },
        "run": phase_json(&rec, elapsed.as_secs_f64()),
        "reconnects": reconnects,
        "aborted_vus": aborted,
        "client_cpu_s": {"user": ((cpu1.0 - cpu0.0) * 100.0).round() / 100.0, "sys": ((cpu1.1 - cpu0.1) * 100.0).round() / 100.0},
        "open_loop_max_dispatch_lag_ms": max_lag,
    });
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
