//! The closed-loop modes (flow, token-get, token-put, mfa-verify, healthz, refusal-flood),
//! their seeding, and the route names every report uses.

use super::*;

pub(crate) const R_HEALTHZ: &str = "GET /healthz";
pub(crate) const R_TOKENS_GET: &str = "GET /api/v1/users/{user_id}/tokens";
pub(crate) const R_TOKENS_PUT: &str = "PUT /api/v1/users/{user_id}/tokens";
pub(crate) const R_TOKENS_PUT_IF_MATCH: &str = "PUT /api/v1/users/{user_id}/tokens (If-Match)";
pub(crate) const R_TOKENS_DELETE: &str = "DELETE /api/v1/users/{user_id}/tokens";
pub(crate) const R_FLOOD: &str = "GET /api/v1/users/{user_id}/tokens (invalid key)";
pub(crate) const R_SESSIONS: &str = "POST /api/v1/sessions";
pub(crate) const R_CHALLENGES: &str = "POST /api/v1/mfa/challenges";
pub(crate) const R_VERIFY: &str = "POST /api/v1/mfa/challenges/{id}/verify";
pub(crate) const R_ATTEMPTS: &str = "POST /api/v1/mfa/challenges/{id}/attempts";
pub(crate) const R_RESULT: &str = "POST /api/v1/mfa/challenges/{id}/attempts/{n}/result";
pub(crate) const R_CONSUME: &str = "POST /api/v1/mfa/challenges/{id}/consume";
pub(crate) const R_TRANSITION: &str = "POST /api/v1/sessions/{id}/transition";
pub(crate) const P_FLOW: &str = "flow (end to end)";
pub(crate) const P_VERIFICATION: &str = "verification (attempt + result)";

pub(crate) fn is_derived(route: &str) -> bool {
    route == P_FLOW || route == P_VERIFICATION
}

/// Report order: the flow's own order, derived rows last.
pub(crate) fn rank(route: &str) -> usize {
    const ORDER: [&str; 15] = [
        R_HEALTHZ,
        R_SESSIONS,
        R_CHALLENGES,
        R_VERIFY,
        R_ATTEMPTS,
        R_RESULT,
        R_CONSUME,
        R_TOKENS_PUT,
        R_TRANSITION,
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
pub(crate) async fn seed_tokens(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize, par: usize) -> Vec<i64> {
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

pub(crate) async fn op_healthz(run: Arc<Run>, mut vu: Vu) -> Vu {
    while run.take() {
        let _ = vu.call(R_HEALTHZ, Method::GET, "/healthz", &[], None, None).await;
    }
    vu
}

pub(crate) async fn op_token_get(run: Arc<Run>, mut vu: Vu) -> Vu {
    let users = run.args.users.max(1);
    while run.take() {
        let j = run.counter.fetch_add(1, Ordering::Relaxed) % users;
        let path = format!("/api/v1/users/{}/tokens", run.user("u", j));
        let _ = vu.call(R_TOKENS_GET, Method::GET, &path, &[], None, None).await;
    }
    vu
}

/// Each VU owns users j ≡ vu.id (mod connections) and keeps their versions.
pub(crate) async fn op_token_put(run: Arc<Run>, mut vu: Vu, mut mine: Vec<(String, i64)>) -> Vu {
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
pub(crate) fn start_flood(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize) -> tokio::task::JoinSet<()> {
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
pub(crate) async fn op_verify(run: Arc<Run>, mut vu: Vu, ids: Arc<Vec<String>>, tickets: Option<Tickets>) -> Vu {
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
pub(crate) async fn op_open(run: Arc<Run>, mut vu: Vu, tickets: Tickets) -> Vu {
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

pub(crate) fn resume_state(tag: &str) -> String {
    // ~1 KiB of opaque state, like a pickled garth client.
    let mut s = format!("garth-resume:{tag}:");
    while s.len() < 1024 {
        s.push_str("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0MjQy");
    }
    s
}

/// One GarminSync login for a fresh user. Returns Err(outcome of the failing step).
pub(crate) async fn one_flow(run: &Run, vu: &mut Vu, user: &str) -> Result<(), Outcome> {
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

pub(crate) async fn op_flow(run: Arc<Run>, mut vu: Vu) -> Vu {
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
pub(crate) async fn seed_challenges(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize, par: usize) -> Vec<String> {
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
