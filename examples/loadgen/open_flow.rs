//! `open-flow`: the realistic login scenario (issue 16 item 6), an open model. Users arrive at
//! `--rate` per second for `--duration` seconds whatever the server's speed; each runs session →
//! external challenge (with a ~2 KB resume state) → think (uniform `--think A:B` seconds, the user
//! reading the e-mail) → attempt → result → consume → PUT tokens → session `authenticated` → GET
//! tokens. All users share `--pool` keep-alive connections (split evenly over the `--url` and
//! `--also-url` servers, users spread round-robin over them), like GarminSync's workers sharing
//! one HTTP pool. A step's latency runs from when the user wants to send it, so the wait for a
//! free connection is counted.

use super::*;

/// Size of the resume state each challenge carries (a pickled garth client is about this big).
pub(crate) const OPEN_FLOW_RESUME_BYTES: usize = 2048;

/// Keep-alive connections to one server, shared by every user sent there.
pub(crate) struct Pool {
    conns: Mutex<Vec<Vu>>,
    gate: Semaphore,
    timeout: Duration,
}

impl Pool {
    /// One request on a free connection (waiting for one first); latency includes the wait.
    pub(crate) async fn call(
        &self,
        route: &'static str,
        method: Method,
        path: &str,
        extra: &[(&'static str, String)],
        body: Option<Bytes>,
    ) -> Result<Resp, Outcome> {
        let start = Instant::now();
        let Ok(Ok(permit)) = tokio::time::timeout(self.timeout, self.gate.acquire()).await else {
            return Err(Outcome::Transport("pool_timeout"));
        };
        let Some(mut vu) = self.conns.lock().ok().and_then(|mut c| c.pop()) else {
            return Err(Outcome::Transport("pool_empty"));
        };
        let r = vu.call(route, method, path, extra, body, Some(start)).await;
        if let Ok(mut c) = self.conns.lock() {
            c.push(vu);
        }
        drop(permit);
        r
    }

    fn reconnects(&self) -> u64 {
        self.conns.lock().map(|c| c.iter().map(|v| v.reconnects).sum()).unwrap_or(0)
    }
}

/// `A:B` seconds, 0 <= A <= B <= 600.
pub(crate) fn parse_think(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s.split_once(':').unwrap_or((s, s));
    let a: f64 = a.trim().parse().map_err(|_| format!("--think {s:?}: expected A:B seconds"))?;
    let b: f64 = b.trim().parse().map_err(|_| format!("--think {s:?}: expected A:B seconds"))?;
    if !(0.0..=MAX_DURATION_SECS).contains(&a) || !(a..=MAX_DURATION_SECS).contains(&b) {
        return Err(format!("--think {s:?}: need 0 <= A <= B <= {MAX_DURATION_SECS}"));
    }
    Ok((a, b))
}

fn resume_state_of(tag: &str, len: usize) -> String {
    let mut s = format!("garth-resume:{tag}:");
    while s.len() < len {
        s.push_str("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0MjQy");
    }
    s.truncate(len);
    s
}

/// One user's login; Err names the step's outcome that broke it.
async fn one_login(
    run: &Run,
    pool: &Pool,
    user: &str,
    think: Duration,
    shard: usize,
    rec: &Recorder,
) -> Result<(), Outcome> {
    let js = |v: Value| Some(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()));
    let r =
        want(pool.call(R_SESSIONS, Method::POST, "/api/v1/sessions", &[], js(json!({"user_id": user}))).await, 201)?;
    let sid = r.json()["id"].as_str().unwrap_or_default().to_string();
    let body = json!({"user_id": user, "session_id": sid, "method": "email", "destination": "runner@example.com",
                      "verifier": "external", "resume_state": resume_state_of(user, OPEN_FLOW_RESUME_BYTES)});
    let r = want(pool.call(R_CHALLENGES, Method::POST, "/api/v1/mfa/challenges", &[], js(body)).await, 201)?;
    let cid = r.json()["id"].as_str().unwrap_or_default().to_string();
    tokio::time::sleep(think).await;
    let verification = Instant::now();
    let path = format!("/api/v1/mfa/challenges/{cid}/attempts");
    let r = want(pool.call(R_ATTEMPTS, Method::POST, &path, &[], js(json!({"code": "123456"}))).await, 201)?;
    let n = r.json()["attempt"].as_i64().unwrap_or(1);
    let path = format!("/api/v1/mfa/challenges/{cid}/attempts/{n}/result");
    want(pool.call(R_RESULT, Method::POST, &path, &[], js(json!({"success": true}))).await, 200)?;
    rec.record(shard, P_VERIFICATION, Outcome::Status(200), verification.elapsed());
    let path = format!("/api/v1/mfa/challenges/{cid}/consume");
    want(pool.call(R_CONSUME, Method::POST, &path, &[], None).await, 200)?;
    let tokens = format!("/api/v1/users/{user}/tokens");
    want(pool.call(R_TOKENS_PUT, Method::PUT, &tokens, &[], Some(run.garth_body(user))).await, 201)?;
    let path = format!("/api/v1/sessions/{sid}/transition");
    want(pool.call(R_TRANSITION, Method::POST, &path, &[], js(json!({"to": "authenticated"}))).await, 200)?;
    want(pool.call(R_TOKENS_GET, Method::GET, &tokens, &[], None).await, 200)?;
    Ok(())
}

/// What `open-flow` adds to the report.
pub(crate) struct OpenFlowResult {
    pub(crate) elapsed: Duration,
    pub(crate) reconnects: u64,
    pub(crate) aborted: usize,
    pub(crate) connect_failed: usize,
    pub(crate) connect_time: Duration,
    pub(crate) summary: Value,
}

pub(crate) async fn run_open_flow(run: Arc<Run>, targets: Vec<Target>, rec: Arc<Recorder>) -> OpenFlowResult {
    let a = &run.args;
    let rate = a.rate.unwrap_or(10.0);
    let duration = a.duration.unwrap_or(10.0);
    let (think_lo, think_hi) = a.think.as_deref().map(parse_think).and_then(Result::ok).unwrap_or((0.0, 0.0));
    let users = ((rate * duration).round() as u64).min(a.requests.unwrap_or(u64::MAX)).max(1);
    let per_target = (a.pool / targets.len()).max(1);

    // The pools, connected before the clock starts.
    let connect_start = Instant::now();
    let mut pools = Vec::new();
    let mut connect_failed = 0;
    for (t, target) in targets.iter().enumerate() {
        let (vus, failed, _) = connect_to(&run, &rec, target, t * per_target, per_target).await;
        connect_failed += failed;
        pools.push(Arc::new(Pool { gate: Semaphore::new(vus.len()), conns: Mutex::new(vus), timeout: run.timeout }));
    }
    let connect_time = connect_start.elapsed();
    log(format!(
        "open-flow: {users} users at {rate}/s over {duration}s, think {think_lo}-{think_hi}s, pool {} x {per_target}",
        pools.len()
    ));

    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut max_lag = Duration::ZERO;
    // Sample the users in flight once a second (for the report's timeline).
    let timeline = Arc::new(Mutex::new(Vec::<usize>::new()));
    let sampler = {
        let (in_flight, timeline) = (in_flight.clone(), timeline.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Ok(mut t) = timeline.lock() {
                    t.push(in_flight.load(Ordering::Relaxed));
                }
            }
        })
    };
    for i in 0..users {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
        max_lag = max_lag.max(due.elapsed());
        let pool = pools[i as usize % pools.len()].clone();
        let think = Duration::from_secs_f64(think_lo + (think_hi - think_lo) * rand::random::<f64>());
        let (run, rec, in_flight, peak, ok, failed) =
            (run.clone(), rec.clone(), in_flight.clone(), peak.clone(), ok.clone(), failed.clone());
        set.spawn(async move {
            let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now, Ordering::Relaxed);
            let user = format!("{}-o{i}", run.prefix);
            let shard = i as usize;
            let t0 = Instant::now();
            match one_login(&run, &pool, &user, think, shard, &rec).await {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    rec.record(shard, P_FLOW, Outcome::Status(200), t0.elapsed());
                }
                Err(o) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    rec.record(shard, P_FLOW, o, t0.elapsed());
                }
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
        // Reap finished users as we go, so the set does not hold 20,000 finished tasks.
        while set.try_join_next().is_some() {}
    }
    let arrivals_done = start.elapsed();
    // The last arrivals still need their think time and 7 steps.
    let hard = Duration::from_secs_f64(think_hi) + run.timeout * 8 + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + hard;
    let mut aborted = 0;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(_))) => aborted += 1,
            Ok(None) => break,
            Err(_) => {
                aborted += set.len();
                set.abort_all();
                log(format!("hard stop: aborted {aborted} users still in flight"));
                break;
            }
        }
    }
    sampler.abort();
    let elapsed = start.elapsed();
    let reconnects = pools.iter().map(|p| p.reconnects()).sum();
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    let summary = json!({
        "users": users,
        "completed": ok.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "aborted": aborted,
        "peak_in_flight": peak.load(Ordering::Relaxed),
        "in_flight_per_s": timeline,
        "arrival_rate": rate,
        "arrival_window_s": (arrivals_done.as_secs_f64() * 1000.0).round() / 1000.0,
        "max_arrival_lag_ms": ms(max_lag.as_micros() as u64),
        "think_s": [think_lo, think_hi],
        "pool": per_target * pools.len(),
        "servers": targets.iter().map(|t| t.addr.to_string()).collect::<Vec<_>>(),
        "resume_state_bytes": OPEN_FLOW_RESUME_BYTES,
    });
    OpenFlowResult { elapsed, reconnects, aborted, connect_failed, connect_time, summary }
}
