use std::sync::Arc;

use serde_json::{Value, json};

use crate::helpers::*;

const CH: &str = "/api/v1/mfa/challenges";

async fn create(app: &TestApp, body: Value) -> TestResponse {
    app.post(CH).json(body).send().await
}

fn service(user: &str) -> Value {
    json!({"user_id": user, "method": "email", "destination": "john@example.com", "verifier": "service"})
}

fn external(user: &str) -> Value {
    json!({"user_id": user, "method": "sms", "destination": "+1 555 123 1234", "verifier": "external",
           "resume_state": "gAJ9cQAoWAUAAABsb2dpbnEBVRESUME-SECRET"})
}

async fn raw_challenge(app: &TestApp, id: &str) -> (String, i64, Option<Vec<u8>>, Option<String>) {
    let id = uuid::Uuid::parse_str(id).unwrap();
    let sql = "SELECT status, attempts, resume_state, code_hash FROM challenges WHERE id = $1";
    match app.db() {
        centraldb_mfa::store::Db::Sqlite { pool, .. } => sqlx::query_as(sql).bind(id).fetch_one(pool).await.unwrap(),
        centraldb_mfa::store::Db::Postgres { pool } => sqlx::query_as(sql).bind(id).fetch_one(pool).await.unwrap(),
    }
}

#[tokio::test]
async fn service_challenge_full_flow() {
    let app = TestApp::spawn().await;
    let r = create(&app, service("alice")).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    let code = r.json["code"].as_str().unwrap().to_string();
    assert_eq!(code.len(), 6);
    assert!(code.chars().all(|c| c.is_ascii_digit()));
    assert_eq!(r.json["destination"], "j***@example.com");
    assert_eq!(r.json["status"], "pending");
    assert_eq!(r.json["attempts"], 0);
    assert_eq!(r.json["max_attempts"], 5);
    assert_eq!(r.json["verifier"], "service");
    // The code is shown once: never again.
    let g = app.get(&format!("{CH}/{id}")).send().await;
    assert_eq!(g.status, 200);
    assert!(g.json.get("code").is_none() && !g.text.contains(&code));
    // Wrong, then right.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": wrong})).send().await;
    v.assert_problem(400, "invalid_code");
    assert_eq!(v.json["attempts_remaining"], 4);
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": code})).send().await;
    assert_eq!(v.status, 200, "{}", v.text);
    assert_eq!(v.json["status"], "verified");
    assert!(v.json["verified_at"].is_string());
    // Single use.
    let c = app.post(&format!("{CH}/{id}/consume")).send().await;
    assert_eq!(c.status, 200);
    assert_eq!(c.json["status"], "consumed");
    let c = app.post(&format!("{CH}/{id}/consume")).send().await;
    c.assert_problem(409, "challenge_not_pending");
    assert_eq!(c.json["challenge_status"], "consumed");
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": code})).send().await;
    v.assert_problem(409, "challenge_not_pending");
    let types: Vec<String> = app.audit().await.into_iter().map(|e| e.type_).collect();
    for t in [
        "challenge.created",
        "challenge.attempt",
        "challenge.verify_failed",
        "challenge.verified",
        "challenge.consumed",
    ] {
        assert!(types.iter().any(|x| x == t), "no {t} in {types:?}");
    }
    assert!(!format!("{:?}", app.audit().await).contains(&code), "the code is never audited");
}

#[tokio::test]
async fn a_given_code_is_stored_only_as_an_argon2id_hash() {
    let app = TestApp::spawn().await;
    let mut body = service("bob");
    body["code"] = json!("Zq81Xk");
    let r = create(&app, body).await;
    assert_eq!(r.status, 201);
    assert!(r.json.get("code").is_none(), "a given code is not echoed");
    let id = r.json["id"].as_str().unwrap();
    let (_, _, _, hash) = raw_challenge(&app, id).await;
    assert!(hash.unwrap().starts_with("$argon2id$"));
    let raw = app.raw_database().await;
    assert!(!contains(&raw, "Zq81Xk"));
    assert!(!contains(&raw, "john@example.com"), "the destination is stored masked");
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "Zq81Xk"})).send().await;
    assert_eq!(v.status, 200);
}

#[tokio::test]
async fn default_argon2_parameters_are_owasp() {
    let app = TestApp::spawn_with(|v| {
        v.remove("CENTRALDB_ARGON2_MEMORY_KIB");
        v.remove("CENTRALDB_ARGON2_ITERATIONS");
    })
    .await;
    let mut body = service("owasp");
    body["code"] = json!("123456");
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let (_, _, _, hash) = raw_challenge(&app, &id).await;
    assert!(hash.unwrap().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
    assert_eq!(v.status, 200);
}

#[tokio::test]
async fn the_last_wrong_attempt_locks_the_challenge_and_fails_the_session() {
    let app = TestApp::spawn().await;
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "carol"})).send().await;
    let sid = s.json["id"].as_str().unwrap().to_string();
    let mut body = service("carol");
    body["session_id"] = json!(sid);
    body["max_attempts"] = json!(3);
    body["code"] = json!("123456");
    let r = create(&app, body).await;
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(app.get(&format!("/api/v1/sessions/{sid}")).send().await.json["state"], "mfa_required");
    for remaining in [2, 1, 0] {
        let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "999999"})).send().await;
        v.assert_problem(400, "invalid_code");
        assert_eq!(v.json["attempts_remaining"], remaining);
    }
    assert_eq!(app.get(&format!("{CH}/{id}")).send().await.json["status"], "failed");
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
    v.assert_problem(423, "challenge_locked");
    assert_eq!(app.get(&format!("/api/v1/sessions/{sid}")).send().await.json["state"], "failed");
    assert!(app.audit().await.iter().any(|e| e.type_ == "challenge.locked"));
}

#[tokio::test]
async fn an_expired_challenge_reads_expired_before_any_sweeper() {
    let app = TestApp::spawn().await;
    let mut body = service("dave");
    body["ttl_seconds"] = json!(1);
    body["code"] = json!("123456");
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(app.get(&format!("{CH}/{id}")).send().await.json["status"], "expired");
    let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
    v.assert_problem(410, "challenge_expired");
    let (_, attempts, _, _) = raw_challenge(&app, &id).await;
    assert_eq!(attempts, 0, "no attempt is used on an expired challenge");
}

#[tokio::test]
async fn external_flow_with_replay_protection_and_encrypted_resume_state() {
    let app = TestApp::spawn().await;
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "erin"})).send().await;
    let sid = s.json["id"].as_str().unwrap().to_string();
    let mut body = external("erin");
    body["session_id"] = json!(sid);
    let r = create(&app, body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.json.get("code").is_none());
    assert_eq!(r.json["destination"], "*******1234");
    let id = r.json["id"].as_str().unwrap().to_string();
    let raw = app.raw_database().await;
    assert!(!contains(&raw, "RESUME-SECRET"), "resume state is encrypted at rest");

    let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "424242"})).send().await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.json["attempt"], 1);
    assert_eq!(a.json["attempts_remaining"], 4);
    assert_eq!(a.json["resume_state"], "gAJ9cQAoWAUAAABsb2dpbnEBVRESUME-SECRET");
    // The same code again never reaches Garmin and uses no attempt.
    let d = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "424242"})).send().await;
    d.assert_problem(409, "duplicate_code");
    assert_eq!(app.get(&format!("{CH}/{id}")).send().await.json["attempts"], 1);
    // Garmin said no, then yes to a second code.
    let res = app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": false})).send().await;
    assert_eq!(res.status, 200, "{}", res.text);
    assert_eq!(res.json["status"], "pending");
    let res = app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": true})).send().await;
    res.assert_problem(409, "attempt_resolved");
    let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "135790"})).send().await;
    assert_eq!(a.json["attempt"], 2);
    let res = app.post(&format!("{CH}/{id}/attempts/2/result")).json(json!({"success": true})).send().await;
    assert_eq!(res.json["status"], "verified");
    assert_eq!(app.get(&format!("/api/v1/sessions/{sid}")).send().await.json["state"], "mfa_verified");
    app.post(&format!("{CH}/{id}/attempts/9/result"))
        .json(json!({"success": true}))
        .send()
        .await
        .assert_problem(404, "attempt_not_found");
    assert_eq!(app.post(&format!("{CH}/{id}/consume")).send().await.status, 200);
    let (status, _, resume, _) = raw_challenge(&app, &id).await;
    assert_eq!(status, "consumed");
    assert!(resume.is_none(), "consumed challenges keep no resume state");
    // A service challenge does not take /attempts, nor an external one /verify.
    app.post(&format!("{CH}/{id}/verify"))
        .json(json!({"code": "135790"}))
        .send()
        .await
        .assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn external_failure_on_the_last_attempt_fails_the_challenge() {
    let app = TestApp::spawn().await;
    let mut body = external("fay");
    body["max_attempts"] = json!(2);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    for (n, code) in [(1, "111111"), (2, "222222")] {
        let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": code})).send().await;
        assert_eq!(a.json["attempt"], n);
        app.post(&format!("{CH}/{id}/attempts/{n}/result")).json(json!({"success": false})).send().await;
    }
    assert_eq!(app.get(&format!("{CH}/{id}")).send().await.json["status"], "failed");
    app.post(&format!("{CH}/{id}/attempts"))
        .json(json!({"code": "333333"}))
        .send()
        .await
        .assert_problem(423, "challenge_locked");
}

#[tokio::test]
async fn at_most_three_pending_challenges_per_user() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        assert_eq!(create(&app, service("greedy")).await.status, 201);
    }
    let r = create(&app, service("greedy")).await;
    r.assert_problem(429, "too_many_challenges");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry), "{retry}");
    assert!(app.audit().await.iter().any(|e| e.type_ == "challenge.refused" && e.outcome == "denied"));
    // Other users are not affected.
    assert_eq!(create(&app, service("modest")).await.status, 201);
    // A new challenge for a session replaces that session's pending one.
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "sess"})).send().await;
    let sid = s.json["id"].as_str().unwrap().to_string();
    let mut first = None;
    for _ in 0..4 {
        let mut b = service("sess");
        b["session_id"] = json!(sid);
        let r = create(&app, b).await;
        assert_eq!(r.status, 201, "{}", r.text);
        first.get_or_insert(r.json["id"].as_str().unwrap().to_string());
    }
    let first = first.unwrap();
    assert_eq!(app.get(&format!("{CH}/{first}")).send().await.json["status"], "cancelled");
}

/// Pending challenges service-wide per the counter rows of migration 0009 (sum of the shards).
async fn pending_counter(app: &TestApp) -> i64 {
    let mut c = app.db().read().await.unwrap();
    centraldb_mfa::store::challenges::pending_upper_bound(&mut c.conn()).await.unwrap()
}

#[tokio::test]
async fn the_service_wide_cap_counts_live_pending_challenges() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_MFA_MAX_PENDING_GLOBAL".into(), "2".into());
    })
    .await;
    let a = create(&app, external("cap-a")).await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(create(&app, external("cap-b")).await.status, 201);
    let r = create(&app, external("cap-c")).await;
    r.assert_problem(503, "unavailable");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(app.audit().await.iter().any(|e| e.type_ == "challenge.refused"
        && e.user_id.as_deref() == Some("cap-c")
        && details(e)["reason"] == "global_cap"));
    assert_eq!(pending_counter(&app).await, 2);
    // A challenge that leaves `pending` (here: cancelled) frees its place.
    let id = a.json["id"].as_str().unwrap();
    assert_eq!(app.delete(&format!("{CH}/{id}")).send().await.status, 204);
    assert_eq!(pending_counter(&app).await, 1);
    let c = create(&app, external("cap-c")).await;
    assert_eq!(c.status, 201, "{}", c.text);
    // A pending challenge past its expiry that the sweeper has not reached yet still counts in
    // the counter, but not against the cap: the exact count decides once the counter is at it.
    app.exec("UPDATE challenges SET expires_at = '2001-01-01T00:00:00+00:00' WHERE user_id = 'cap-b'").await;
    assert_eq!(pending_counter(&app).await, 2);
    assert_eq!(create(&app, external("cap-d")).await.status, 201);
    assert_eq!(pending_counter(&app).await, 3);
    create(&app, external("cap-e")).await.assert_problem(503, "unavailable");
    // Verified and consumed challenges leave the count; the counter agrees with the table.
    let id = c.json["id"].as_str().unwrap();
    let at = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "123456"})).send().await;
    assert_eq!(at.status, 201, "{}", at.text);
    let n = at.json["attempt"].as_i64().unwrap();
    let res = app.post(&format!("{CH}/{id}/attempts/{n}/result")).json(json!({"success": true})).send().await;
    assert_eq!(res.status, 200, "{}", res.text);
    assert_eq!(pending_counter(&app).await, 2);
    assert_eq!(create(&app, external("cap-e")).await.status, 201);
    let exact = {
        let mut c = app.db().read().await.unwrap();
        centraldb_mfa::store::challenges::count_pending_global_upto(&mut c.conn(), chrono::DateTime::UNIX_EPOCH, 100)
            .await
            .unwrap()
    };
    assert_eq!(pending_counter(&app).await, exact);
    assert_eq!(exact, 3);
}

#[tokio::test]
async fn the_failure_budget_refuses_new_challenges() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_MFA_FAILURE_BUDGET".into(), "2".into());
    })
    .await;
    let mut body = service("brute");
    body["code"] = json!("123456");
    body["max_attempts"] = json!(10);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        app.post(&format!("{CH}/{id}/verify"))
            .json(json!({"code": "000000"}))
            .send()
            .await
            .assert_problem(400, "invalid_code");
    }
    let r = create(&app, service("brute")).await;
    r.assert_problem(429, "too_many_failures");
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        (json!({"user_id": "u", "method": "email", "verifier": "external", "code": "123456"}), "code"),
        (json!({"user_id": "u", "method": "email", "verifier": "service", "ttl_seconds": 601}), "ttl_seconds"),
        (json!({"user_id": "u", "method": "email", "verifier": "service", "max_attempts": 11}), "max_attempts"),
        (json!({"user_id": "u", "method": "email", "verifier": "service", "max_attempts": 0}), "max_attempts"),
        (
            json!({"user_id": "u", "method": "email", "verifier": "service", "destination": "not-an-email"}),
            "destination",
        ),
        (json!({"user_id": "bad id", "method": "email", "verifier": "service"}), "user_id"),
        (json!({"user_id": "u", "method": "email", "verifier": "service", "code": "12"}), "code"),
        (
            json!({"user_id": "u", "method": "email", "verifier": "external", "resume_state": "x".repeat(16 * 1024 + 1)}),
            "resume_state",
        ),
    ];
    for (body, field) in cases {
        let r = create(&app, body).await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], field, "{}", r.text);
    }
    for body in [
        json!({"user_id": "u", "method": "pigeon", "verifier": "service"}),
        json!({"user_id": "u", "method": "email", "verifier": "service", "surprise": true}),
        json!({"user_id": "u", "verifier": "service"}),
    ] {
        create(&app, body).await.assert_problem(422, "validation_failed");
    }
    app.get(&format!("{CH}/not-a-uuid")).send().await.assert_problem(422, "validation_failed");
    let unknown = uuid::Uuid::now_v7();
    app.get(&format!("{CH}/{unknown}")).send().await.assert_problem(404, "challenge_not_found");
    app.post(&format!("{CH}/{unknown}/verify"))
        .json(json!({"code": "123456"}))
        .send()
        .await
        .assert_problem(404, "challenge_not_found");
    let s = app.post("/api/v1/sessions").json(json!({"user_id": "other"})).send().await;
    let mut b = service("u");
    b["session_id"] = s.json["id"].clone();
    let r = create(&app, b).await;
    r.assert_problem(422, "validation_failed");
    assert_eq!(r.json["field"], "session_id");
    assert!(app.audit().await.iter().all(|e| e.type_ != "challenge.created"), "nothing was created");
    // Scope.
    let reader = app.key("tokens:read").await;
    app.post(CH).key(&reader).json(service("u")).send().await.assert_problem(403, "forbidden");
}

#[tokio::test]
async fn cancel_is_idempotent_and_destroys_the_resume_state() {
    let app = TestApp::spawn().await;
    let id = create(&app, external("gina")).await.json["id"].as_str().unwrap().to_string();
    assert_eq!(app.delete(&format!("{CH}/{id}")).send().await.status, 204);
    assert_eq!(app.delete(&format!("{CH}/{id}")).send().await.status, 204);
    let (status, _, resume, _) = raw_challenge(&app, &id).await;
    assert_eq!((status.as_str(), resume.is_none()), ("cancelled", true));
    app.post(&format!("{CH}/{id}/attempts"))
        .json(json!({"code": "123456"}))
        .send()
        .await
        .assert_problem(409, "challenge_not_pending");
}

/// N concurrent right codes against one challenge: at most `max_attempts` checks, exactly one success.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_verifications_allow_one_success_and_bounded_checks() {
    let app = Arc::new(TestApp::spawn().await);
    let mut body = service("race");
    body["code"] = json!("123456");
    body["max_attempts"] = json!(5);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (app, id) = (app.clone(), id.clone());
        set.spawn(async move {
            app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await.status.as_u16()
        });
    }
    let statuses: Vec<u16> = set.join_all().await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 1, "exactly one success: {statuses:?}");
    assert!(statuses.iter().all(|s| [200, 409, 423].contains(s)), "{statuses:?}");
    let (_, attempts, _, _) = raw_challenge(&app, &id).await;
    assert!(attempts <= 5, "at most max_attempts checks, got {attempts}");
    let checks = app.audit().await.iter().filter(|e| e.type_ == "challenge.attempt").count();
    assert!(checks <= 5, "{checks} attempts recorded");
    // 40 concurrent consumes: exactly one.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (app, id) = (app.clone(), id.clone());
        set.spawn(async move { app.post(&format!("{CH}/{id}/consume")).send().await.status.as_u16() });
    }
    let statuses: Vec<u16> = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 39);
}

/// N concurrent wrong codes: exactly `max_attempts` are checked, the rest are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wrong_codes_take_exactly_max_attempts() {
    let app = Arc::new(TestApp::spawn().await);
    let mut body = service("brute2");
    body["code"] = json!("123456");
    body["max_attempts"] = json!(4);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (app, id) = (app.clone(), id.clone());
        set.spawn(async move {
            app.post(&format!("{CH}/{id}/verify"))
                .json(json!({"code": format!("{:06}", 200_000 + i)}))
                .send()
                .await
                .status
                .as_u16()
        });
    }
    let statuses: Vec<u16> = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 423).count(), 26, "{statuses:?}");
    let (status, attempts, _, _) = raw_challenge(&app, &id).await;
    assert_eq!((status.as_str(), attempts), ("failed", 4));
}

/// A code tried before a key rotation is still a duplicate after it (while the old key is held):
/// its MAC was made under the old key, so every key of the keyring is checked.
#[tokio::test]
async fn a_code_tried_before_a_key_rotation_is_still_a_duplicate() {
    let app = TestApp::spawn().await;
    let id = create(&app, external("rota")).await.json["id"].as_str().unwrap().to_string();
    let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "111111"})).send().await;
    assert_eq!(a.status, 201, "{}", a.text);
    let res = app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": false})).send().await;
    assert_eq!(res.status, 200, "{}", res.text);
    // Every instance restarts with k2 first and k1 kept.
    let k1 = app.vars["CENTRALDB_ENCRYPTION_KEYS"].clone();
    let rotated = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_DATABASE_URL".into(), app.db_url.clone());
        v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), format!("{},{k1}", key_spec("k2")));
    })
    .await;
    let d = rotated.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "111111"})).send().await;
    d.assert_problem(409, "duplicate_code");
    // A new code is tried under k2, and is a duplicate from then on too.
    let b = rotated.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "222222"})).send().await;
    assert_eq!(b.status, 201, "{}", b.text);
    assert_eq!(b.json["attempt"], 2);
    let d2 = rotated.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "222222"})).send().await;
    d2.assert_problem(409, "duplicate_code");
    assert_eq!(rotated.get(&format!("{CH}/{id}")).send().await.json["attempts"], 2, "no attempt used by replays");
}

/// Concurrent external attempts with the same code: one reservation, the rest `duplicate_code`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_codes_reserve_one_attempt() {
    let app = Arc::new(TestApp::spawn().await);
    let id = create(&app, external("dup")).await.json["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (app, id) = (app.clone(), id.clone());
        set.spawn(async move {
            app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "777777"})).send().await.status.as_u16()
        });
    }
    let statuses: Vec<u16> = set.join_all().await;
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 19, "{statuses:?}");
    let (_, attempts, _, _) = raw_challenge(&app, &id).await;
    assert_eq!(attempts, 1);
}

/// A verification refused because the argon2 queue is full (503) uses no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_refusal_uses_no_attempt() {
    let app = Arc::new(
        TestApp::spawn_with(|v| {
            v.remove("CENTRALDB_ARGON2_MEMORY_KIB");
            v.remove("CENTRALDB_ARGON2_ITERATIONS");
            v.insert("CENTRALDB_ARGON2_WORKERS".into(), "1".into());
            v.insert("CENTRALDB_ARGON2_QUEUE".into(), "0".into());
        })
        .await,
    );
    let mut body = service("busy");
    body["code"] = json!("123456");
    body["max_attempts"] = json!(10);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let (app, id) = (app.clone(), id.clone());
        set.spawn(async move {
            let r = app
                .post(&format!("{CH}/{id}/verify"))
                .json(json!({"code": format!("{:06}", 500_000 + i)}))
                .send()
                .await;
            (r.status.as_u16(), r.header("retry-after").is_some())
        });
    }
    let results = set.join_all().await;
    let checked = results.iter().filter(|(s, _)| *s == 400).count();
    let busy = results.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(checked + busy, 10, "{results:?}");
    assert!(busy > 0, "with one worker and no queue some are refused: {results:?}");
    assert!(results.iter().filter(|(s, _)| *s == 503).all(|(_, retry)| *retry), "503 carries Retry-After");
    let (status, attempts, _, _) = raw_challenge(&app, &id).await;
    assert_eq!(attempts as usize, checked, "only checked codes used an attempt");
    assert_eq!(status, "pending");
}

/// Garmin's answer to an attempt reserved in time still counts after the challenge expires,
/// even if the sweeper runs in between (within the grace period).
#[tokio::test]
async fn a_late_garmin_answer_survives_a_sweep_within_the_grace_period() {
    let app = TestApp::spawn().await;
    let mut body = external("late");
    body["ttl_seconds"] = json!(1);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "246810"})).send().await;
    assert_eq!(a.status, 201);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let report = centraldb_mfa::sweeper::sweep_once(&app.state, centraldb_mfa::store::now()).await.unwrap();
    assert_eq!(report.challenges_expired, 0, "an answer is still awaited");
    let res = app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": true})).send().await;
    assert_eq!(res.status, 200, "{}", res.text);
    assert_eq!(res.json["status"], "verified");
    // Past the grace period an unanswered challenge is expired as usual.
    let mut body = external("late2");
    body["ttl_seconds"] = json!(1);
    let id2 = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    app.post(&format!("{CH}/{id2}/attempts")).json(json!({"code": "135799"})).send().await;
    let later = centraldb_mfa::store::now() + chrono::Duration::seconds(200);
    let report = centraldb_mfa::sweeper::sweep_once(&app.state, later).await.unwrap();
    assert_eq!(report.challenges_expired, 1, "only the unanswered one: {report:?}");
    assert_eq!(raw_challenge(&app, &id2).await.0, "expired");
}

#[tokio::test]
async fn deleting_an_ended_challenge_is_204_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut body = service("ended");
    body["code"] = json!("123456");
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
    assert_eq!(app.post(&format!("{CH}/{id}/consume")).send().await.status, 200);
    assert_eq!(app.delete(&format!("{CH}/{id}")).send().await.status, 204);
    assert_eq!(app.get(&format!("{CH}/{id}")).send().await.json["status"], "consumed");
}

/// Polls `cond` every 10 ms for up to 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond().await {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Sends `/verify` and goes away (the request future is dropped, as hyper drops a handler when
/// its client resets the connection) once the attempt is reserved, while the code is checked.
async fn verify_and_go_away(app: &Arc<TestApp>, id: &str, code: &str) {
    let before = raw_challenge(app, id).await.1;
    let request = tokio::spawn({
        let (app, uri, code) = (app.clone(), format!("{CH}/{id}/verify"), code.to_string());
        async move { app.post(&uri).json(json!({"code": code})).send().await }
    });
    while raw_challenge(app, id).await.1 == before {
        assert!(!request.is_finished(), "the check ended before the client went away: make argon2 slower");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert!(!request.is_finished(), "the check ended before the client went away: make argon2 slower");
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
}

/// A client that goes away while its code is checked (issue 15, finding 6): the attempt it
/// reserved is still checked and its outcome recorded: a wrong code counts as a failure (budget,
/// audit), a right one verifies the challenge and moves the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_verification_is_still_checked_and_recorded() {
    // A slow check (~0.2 s), so the client is surely gone before it ends.
    let app = Arc::new(
        TestApp::spawn_with(|v| {
            v.insert("CENTRALDB_ARGON2_MEMORY_KIB".into(), "8192".into());
            v.insert("CENTRALDB_ARGON2_ITERATIONS".into(), "30".into());
        })
        .await,
    );
    let s = app.new_session("gone", None).await;
    let mut body = service("gone");
    body["session_id"] = s["id"].clone();
    body["code"] = json!("123456");
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    let events = |app: Arc<TestApp>, t: &'static str| async move {
        app.audit().await.into_iter().filter(|e| e.type_ == t).map(|e| details(&e)).collect::<Vec<_>>()
    };

    verify_and_go_away(&app, &id, "000000").await;
    eventually("the abandoned wrong code is recorded", || async {
        !events(app.clone(), "challenge.verify_failed").await.is_empty()
    })
    .await;
    let failed = events(app.clone(), "challenge.verify_failed").await;
    assert_eq!(failed[0]["challenge_id"], id.as_str());
    assert_eq!(failed[0]["attempt"], 1);
    assert_eq!(failed[0]["attempts_remaining"], 4);
    assert_eq!(raw_challenge(&app, &id).await.0, "pending");
    assert_eq!(raw_challenge(&app, &id).await.1, 1);
    let failures: i64 = match app.db() {
        centraldb_mfa::store::Db::Sqlite { pool, .. } => {
            sqlx::query_scalar("SELECT COUNT(*) FROM mfa_failures WHERE user_id = 'gone'").fetch_one(pool).await
        }
        centraldb_mfa::store::Db::Postgres { pool } => {
            sqlx::query_scalar("SELECT COUNT(*) FROM mfa_failures WHERE user_id = 'gone'").fetch_one(pool).await
        }
    }
    .unwrap();
    assert_eq!(failures, 1, "the failure counts against the user's budget");
    let g = app.get(&format!("{CH}/{id}")).send().await;
    assert_eq!(g.json["attempts"], 1);

    verify_and_go_away(&app, &id, "123456").await;
    eventually("the abandoned right code verifies the challenge", || async {
        raw_challenge(&app, &id).await.0 == "verified"
    })
    .await;
    let verified = events(app.clone(), "challenge.verified").await;
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0]["attempt"], 2);
    eventually("the session is moved", || async {
        app.session_state_in_db(uuid_of(&s["id"])).await.as_deref() == Some("mfa_verified")
    })
    .await;
    assert_eq!(app.post(&format!("{CH}/{id}/consume")).send().await.status, 200);
}

/// 60 right codes for one challenge (max_attempts 10) at once, over three instances on one
/// database (issue 15, finding 15): exactly one 200; every other answer is 409
/// `challenge_not_pending` with `challenge_status: verified`, never 423 `challenge_locked` (the
/// challenge is verified, not failed), even for requests that found every attempt taken by
/// checks still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_right_codes_over_three_instances_never_report_a_verified_challenge_locked() {
    // The real argon2 cost, so checks overlap; a queue long enough for everyone (no 503).
    let tweak = |v: &mut std::collections::HashMap<String, String>| {
        v.remove("CENTRALDB_ARGON2_MEMORY_KIB");
        v.remove("CENTRALDB_ARGON2_ITERATIONS");
        v.insert("CENTRALDB_ARGON2_QUEUE".into(), "100".into());
    };
    let first = TestApp::spawn_with(tweak).await;
    let same_db = |v: &mut std::collections::HashMap<String, String>| {
        tweak(v);
        v.insert("CENTRALDB_DATABASE_URL".into(), first.db_url.clone());
        v.insert("CENTRALDB_ENCRYPTION_KEYS".into(), first.vars["CENTRALDB_ENCRYPTION_KEYS"].clone());
    };
    let second = TestApp::spawn_with(same_db).await;
    let third = TestApp::spawn_with(same_db).await;
    let apps = Arc::new([first, second, third]);
    let mut body = service("tri");
    body["code"] = json!("123456");
    body["max_attempts"] = json!(10);
    let id = create(&apps[0], body).await.json["id"].as_str().unwrap().to_string();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (apps, id) = (apps.clone(), id.clone());
        set.spawn(async move {
            let r = apps[i % 3].post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
            (r.status.as_u16(), r.json.clone())
        });
    }
    let answers = set.join_all().await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 1, "exactly one success: {answers:?}");
    for (status, json) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(
            (*status, json["code"].as_str(), json["challenge_status"].as_str()),
            (409, Some("challenge_not_pending"), Some("verified")),
            "{answers:?}"
        );
    }
    let (status, attempts, _, _) = raw_challenge(&apps[0], &id).await;
    assert_eq!(status, "verified");
    assert!(attempts <= 10, "{attempts}");
}

/// `/attempts` reads the challenge under its lock, so a challenge Garmin verified is answered as
/// verified (409 `challenge_not_pending`), never as locked, even with every attempt used; while
/// the last results are still awaited, no attempt is left (423).
#[tokio::test]
async fn attempts_on_a_verified_external_challenge_are_not_reported_locked() {
    let app = TestApp::spawn().await;
    let mut body = external("ext-lock");
    body["max_attempts"] = json!(2);
    let id = create(&app, body).await.json["id"].as_str().unwrap().to_string();
    for code in ["111111", "222222"] {
        assert_eq!(app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": code})).send().await.status, 201);
    }
    app.post(&format!("{CH}/{id}/attempts"))
        .json(json!({"code": "333333"}))
        .send()
        .await
        .assert_problem(423, "challenge_locked");
    let r = app.post(&format!("{CH}/{id}/attempts/1/result")).json(json!({"success": false})).send().await;
    assert_eq!(r.json["status"], "pending", "attempt 2 is still open: {}", r.text);
    let r = app.post(&format!("{CH}/{id}/attempts/2/result")).json(json!({"success": true})).send().await;
    assert_eq!(r.json["status"], "verified", "{}", r.text);
    let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "444444"})).send().await;
    a.assert_problem(409, "challenge_not_pending");
    assert_eq!(a.json["challenge_status"], "verified");
}
