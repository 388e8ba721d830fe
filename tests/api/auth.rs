use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_401_and_audited() {
    let app = TestApp::spawn().await;
    let p = tokens_path("victim");
    let r = app.get(&p).no_auth().send().await;
    r.assert_problem(401, "unauthenticated");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    app.get(&p).no_auth().header("authorization", "Basic abc").send().await.assert_problem(401, "unauthenticated");
    app.get(&p).key("cdbm_not-a-real-key").send().await.assert_problem(401, "unauthenticated");
    let denied: Vec<_> = app.audit().await.into_iter().filter(|e| e.type_ == "auth.denied").collect();
    assert_eq!(denied.len(), 3);
    assert!(denied.iter().all(|e| e.outcome == "denied"));
    assert!(denied[0].details.contains("missing_key"));
    assert!(denied[0].details.contains("/api/v1/users/victim/tokens"), "the full path is recorded");
    assert!(denied[1].details.contains("malformed_authorization"));
    assert!(denied[2].details.contains("unknown_key"));
    assert!(!format!("{denied:?}").contains("cdbm_not-a-real-key"), "presented keys are never audited");
}

#[tokio::test]
async fn scopes_are_enforced_with_403() {
    let app = TestApp::spawn().await;
    let reader = app.key("tokens:read").await;
    let writer = app.key("tokens:write").await;
    let p = tokens_path("scoped");
    let r = app.put(&p).key(&reader).json(garth_body("a")).send().await;
    r.assert_problem(403, "forbidden");
    assert_eq!(r.json["required_scope"], "tokens:write");
    assert_eq!(app.put(&p).key(&writer).json(garth_body("a")).send().await.status, 201);
    app.get(&p).key(&writer).send().await.assert_problem(403, "forbidden");
    assert_eq!(app.get(&p).key(&reader).send().await.status, 200);
    let mfa_only = app.key("mfa").await;
    app.get(&p).key(&mfa_only).send().await.assert_problem(403, "forbidden");
    let forbidden: Vec<_> = app
        .audit()
        .await
        .into_iter()
        .filter(|e| e.type_ == "auth.denied" && e.details.contains("insufficient_scope"))
        .collect();
    assert_eq!(forbidden.len(), 3);
    assert!(forbidden.iter().all(|e| e.actor.as_deref().is_some_and(|a| a.starts_with("key:"))));
}

#[tokio::test]
async fn auth_comes_before_validation() {
    let app = TestApp::spawn().await;
    app.put(&tokens_path("bad%20id")).no_auth().json(json!({})).send().await.assert_problem(401, "unauthenticated");
}

#[tokio::test]
async fn revoked_keys_stop_working() {
    let app = TestApp::spawn().await;
    let (id, key) = centraldb_mfa::services::api_keys::create(
        app.db(),
        "short-lived",
        &centraldb_mfa::domain::Scopes::parse_list("tokens:read").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(app.get("/api/v1/users/x/auth-status").key(&key).send().await.status, 200);
    assert!(centraldb_mfa::services::api_keys::revoke(app.db(), id).await.unwrap());
    app.state.api_keys.forget(id);
    app.get("/api/v1/users/x/auth-status").key(&key).send().await.assert_problem(401, "unauthenticated");
}

#[tokio::test]
async fn changing_the_bootstrap_key_revokes_the_old_one() {
    let app = TestApp::spawn().await;
    let dir = app.dir.path().display().to_string();
    let url = app.db_url.clone();
    let keys = app.vars["CENTRALDB_ENCRYPTION_KEYS"].clone();
    drop(app);
    let new_admin = "another-bootstrap-admin-key-abcdefghijklmnop";
    let app2 = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_DATA_DIR".into(), dir);
        v.insert("CENTRALDB_DATABASE_URL".into(), url);
        v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), keys);
        v.insert("CENTRALDB_BOOTSTRAP_ADMIN_KEY".into(), new_admin.into());
    })
    .await;
    app2.get("/api/v1/users/x/auth-status").send().await.assert_problem(401, "unauthenticated");
    assert_eq!(app2.get("/api/v1/users/x/auth-status").key(new_admin).send().await.status, 200);
}

// ---- refusal floods (issue 15, finding 4) ----------------------------------------------------

/// A request from `ip` (a `ConnectInfo` peer address, as the real server sets it) with `key`.
async fn from_ip(app: &TestApp, ip: &str, key: Option<&str>) -> TestResponse {
    use axum::{body::Body, extract::ConnectInfo, http::Request};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = Request::builder().uri("/api/v1/users/victim/tokens");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let mut req = req.body(Body::empty()).unwrap();
    let peer: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    TestResponse { status, headers, text: String::from_utf8_lossy(&bytes).into_owned(), json }
}

/// Events written since `before` (an index into the log).
async fn audit_since(app: &TestApp, before: usize) -> Vec<centraldb_mfa::store::audit::AuditRow> {
    app.audit().await.into_iter().skip(before).collect()
}

#[tokio::test]
async fn a_flood_of_2000_refusals_from_one_source_writes_eleven_audit_rows() {
    // Default settings: 10 refusals audited one by one per source and 60 s window, the budget
    // 1,000 per window, then 429s; everything beyond the first 10 is one summary event.
    let app = TestApp::spawn().await;
    let before = app.audit().await.len();
    let start = centraldb_mfa::store::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut eleventh = None;
    for i in 0..2000 {
        if i == 10 {
            eleventh = Some(centraldb_mfa::store::now());
        }
        let r = from_ip(&app, "203.0.113.7", Some("cdbm_flood-not-a-key")).await;
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    let end = centraldb_mfa::store::now();
    assert_eq!(statuses, [(401, 1000), (429, 1000)].into_iter().collect());
    let rows = audit_since(&app, before).await;
    assert_eq!(rows.len(), 10, "only the first 10 are written at once");
    assert!(rows.iter().all(|e| e.type_ == "auth.denied" && e.source_ip.as_deref() == Some("203.0.113.7")));
    assert!(rows.iter().all(|e| e.request_id.is_some()), "each single event carries its request id");
    // The window is still open: nothing to flush yet.
    assert_eq!(centraldb_mfa::sweeper::flush_refusals(&app.state, end, false).await.unwrap(), 0);
    // When it has ended, one summary.
    let later = start + chrono::Duration::seconds(61);
    assert_eq!(centraldb_mfa::sweeper::flush_refusals(&app.state, later, false).await.unwrap(), 1);
    let rows = audit_since(&app, before).await;
    assert_eq!(rows.len(), 11, "2,000 refused requests: 10 single events and one summary");
    let s = rows.last().unwrap();
    assert_eq!(
        (s.type_.as_str(), s.outcome.as_str(), s.source_ip.as_deref()),
        ("auth.refusals", "denied", Some("203.0.113.7"))
    );
    let d = details(s);
    assert_eq!(d["count"], 1990);
    assert_eq!(d["throttled"], 1000);
    assert_eq!(d["individually_recorded"], 10);
    assert_eq!(d["reasons"], json!({"unknown_key": 990, "throttled": 1000}));
    let first = time_of(&d["first_at"]);
    let last = time_of(&d["last_at"]);
    assert!(eleventh.unwrap() <= first && first <= last && last <= end, "{d}");
    assert!(first >= start);
    let r = app.get("/api/v1/audit/verify").send().await;
    assert_eq!(r.json["ok"], true, "{}", r.text);
}

#[tokio::test]
async fn past_the_refusal_budget_a_source_gets_429_with_retry_after_and_no_write() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_REFUSAL_BUDGET".into(), "20".into());
        // Every cached key is due for a re-check at once (the cache period is over).
        v.insert("CENTRALDB_API_KEY_CACHE_SECS".into(), "0".into());
    })
    .await;
    // The admin key is verified (and cached) before the flood.
    assert_eq!(from_ip(&app, "198.51.100.9", Some(ADMIN_KEY)).await.status, 404);
    for _ in 0..20 {
        from_ip(&app, "198.51.100.9", None).await.assert_problem(401, "unauthenticated");
    }
    let rows_before = app.audit().await.len();
    for key in [None, Some("cdbm_guess"), Some("")] {
        let r = from_ip(&app, "198.51.100.9", key).await;
        r.assert_problem(429, "too_many_requests");
        let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(app.audit().await.len(), rows_before, "a 429 writes nothing when it is answered");
    }
    // A valid key verified before still works from that address (re-checked, since its cache
    // period is over); other addresses are not affected.
    assert_eq!(from_ip(&app, "198.51.100.9", Some(ADMIN_KEY)).await.status, 404);
    from_ip(&app, "198.51.100.10", None).await.assert_problem(401, "unauthenticated");
    // At shutdown every open window is written: the 429s are counted in the summary.
    let before = app.audit().await.len();
    centraldb_mfa::sweeper::flush_refusals(&app.state, centraldb_mfa::store::now(), true).await.unwrap();
    let rows = audit_since(&app, before).await;
    let s: Vec<_> = rows.iter().filter(|e| e.type_ == "auth.refusals").collect();
    assert_eq!(s.len(), 1, "{rows:?}");
    let d = details(s[0]);
    assert_eq!((d["count"].as_u64(), d["throttled"].as_u64()), (Some(13), Some(3)), "{d}");
}
