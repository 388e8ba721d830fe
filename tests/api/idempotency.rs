//! `Idempotency-Key` on writes: a retry answers what the first answered without acting again.

use centraldb_mfa::store::Db;
use serde_json::{Value, json};

use crate::helpers::*;

const IK: &str = "idempotency-key";

impl TestApp {
    /// `(state, response IS NULL)` of every idempotency record.
    async fn idempotency_rows(&self) -> Vec<(String, bool)> {
        let sql = "SELECT state, response IS NULL FROM idempotency_keys ORDER BY created_at";
        match self.db() {
            Db::Sqlite { pool, .. } => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
            Db::Postgres { pool } => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        }
    }

    async fn audit_count(&self, type_: &str) -> usize {
        self.audit().await.iter().filter(|e| e.type_ == type_).count()
    }

    async fn version_of(&self, user: &str) -> Value {
        let m = self.get(&format!("{}/metadata", tokens_path(user))).send().await;
        assert_eq!(m.status, 200, "{}", m.text);
        m.json["version"].clone()
    }
}

#[tokio::test]
async fn lost_response_put_with_if_match_is_answered_again_without_a_second_write() {
    let app = TestApp::spawn().await;
    assert_eq!(app.put(&tokens_path("u1")).json(garth_body("a")).send().await.status, 201);
    // One body: garth_body stamps expiries from the clock, so a body built per call differs
    // once a second ticks over between the two sends (then 422 idempotency_key_reused).
    let body = garth_body("b");
    let put = || app.put(&tokens_path("u1")).header("if-match", "\"1\"").header(IK, "refresh-1").json(body.clone());
    let first = put().send().await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("etag"), Some("\"2\""));
    assert_eq!(first.header("idempotent-replayed"), None);

    // The response was lost; the worker retries the very same request.
    let retry = put().send().await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(retry.header("etag"), Some("\"2\""));
    assert_eq!(retry.json, first.json);
    assert_eq!(retry.header("content-type"), first.header("content-type"));
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.version_of("u1").await, 2);
    assert_eq!(app.audit_count("token.write").await, 2, "the create and the one keyed write");
    assert_eq!(app.idempotency_rows().await, vec![("done".to_string(), false)]);
}

#[tokio::test]
async fn retry_without_if_match_writes_no_second_version() {
    let app = TestApp::spawn().await;
    // One body: garth_body stamps expiries from the clock, so a body built per call differs
    // once a second ticks over between the two sends (then 422 idempotency_key_reused).
    let body = garth_body("a");
    let put = || app.put(&tokens_path("u1")).header(IK, "w-1").json(body.clone());
    let first = put().send().await;
    assert_eq!(first.status, 201, "{}", first.text);
    let retry = put().send().await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!((retry.header("etag"), &retry.json), (Some("\"1\""), &first.json));
    assert_eq!(app.version_of("u1").await, 1);
    assert_eq!(app.audit_count("token.write").await, 1);
    // Without the key, the same body is a new write, as before.
    assert_eq!(app.put(&tokens_path("u1")).json(garth_body("a")).send().await.status, 200);
    assert_eq!(app.version_of("u1").await, 2);
}

#[tokio::test]
async fn same_key_with_a_different_request_is_422_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let first = app.put(&tokens_path("u1")).header(IK, "k").json(garth_body("a")).send().await;
    assert_eq!(first.status, 201, "{}", first.text);
    let other_body = app.put(&tokens_path("u1")).header(IK, "k").json(garth_body("b")).send().await;
    other_body.assert_problem(422, "idempotency_key_reused");
    let other_header = app.put(&tokens_path("u1")).header(IK, "k").header("if-match", "\"1\"").json(garth_body("a"));
    other_header.send().await.assert_problem(422, "idempotency_key_reused");
    let other_path = app.put(&tokens_path("u2")).header(IK, "k").json(garth_body("a")).send().await;
    other_path.assert_problem(422, "idempotency_key_reused");
    let other_route = app.post(&format!("{}/invalidate", tokens_path("u1"))).header(IK, "k").send().await;
    other_route.assert_problem(422, "idempotency_key_reused");
    assert_eq!(app.version_of("u1").await, 1);
    assert_eq!(app.get(&format!("{}/metadata", tokens_path("u2"))).send().await.status, 404);
    assert_eq!(app.audit_count("token.write").await, 1);
    assert_eq!(app.audit_count("token.invalidate").await, 0);
}

#[tokio::test]
async fn invalid_keys_are_422_and_change_nothing() {
    let app = TestApp::spawn().await;
    let long = "a".repeat(256);
    for bad in ["a b", long.as_str(), "tab\tkey"] {
        let r = app.put(&tokens_path("u1")).header(IK, bad).json(garth_body("a")).send().await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], "Idempotency-Key");
    }
    let twice = app.put(&tokens_path("u1")).header(IK, "a").header(IK, "b").json(garth_body("a")).send().await;
    twice.assert_problem(422, "validation_failed");
    assert_eq!(app.get(&format!("{}/metadata", tokens_path("u1"))).send().await.status, 404);
    assert!(app.idempotency_rows().await.is_empty());
    // 255 visible characters are fine.
    let ok = app.put(&tokens_path("u1")).header(IK, &"~".repeat(255)).json(garth_body("a")).send().await;
    assert_eq!(ok.status, 201, "{}", ok.text);
}

#[tokio::test]
async fn challenge_creation_retry_returns_the_same_code_and_stores_it_encrypted() {
    let app = TestApp::spawn().await;
    let body = json!({"user_id": "u1", "method": "email", "destination": "j@example.com", "verifier": "service"});
    let create = || app.post("/api/v1/mfa/challenges").header(IK, "ch-1").json(body.clone());
    let first = create().send().await;
    assert_eq!(first.status, 201, "{}", first.text);
    let code = first.json["code"].as_str().unwrap().to_string();
    let retry = create().send().await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!(retry.json, first.json, "same challenge id, same code");
    assert_eq!(retry.header("location"), first.header("location"));
    assert_eq!(app.audit_count("challenge.created").await, 1);
    assert!(!contains(&app.raw_database().await, &code), "the generated code is stored in the clear");
    // The replayed code is the one that verifies.
    let v = app.post(&format!("/api/v1/mfa/challenges/{}/verify", first.json["id"].as_str().unwrap()));
    let v = v.json(json!({"code": code})).send().await;
    assert_eq!(v.status, 200, "{}", v.text);
}

#[tokio::test]
async fn a_duplicate_while_the_first_still_runs_is_409_with_retry_after() {
    // Slow argon2: creating a service-verified challenge hashes its code.
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_ARGON2_MEMORY_KIB".into(), "8192".into());
        v.insert("CENTRALDB_ARGON2_ITERATIONS".into(), "40".into());
    })
    .await;
    let body = json!({"user_id": "u1", "method": "email", "destination": "j@example.com", "verifier": "service"});
    let create = || app.post("/api/v1/mfa/challenges").header(IK, "slow").json(body.clone());
    let (first, second) = tokio::join!(create().send(), async {
        // Send the duplicate once the first holds the key (and is hashing).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while app.idempotency_rows().await != vec![("running".to_string(), true)] {
            assert!(std::time::Instant::now() < deadline, "the first request never held the key");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        create().send().await
    });
    assert_eq!(first.status, 201, "{}", first.text);
    second.assert_problem(409, "idempotency_key_in_use");
    assert!(second.header("retry-after").is_some());
    let again = create().send().await;
    assert_eq!((again.status.as_u16(), &again.json), (201, &first.json));
    assert_eq!(app.audit_count("challenge.created").await, 1);
}

#[tokio::test]
async fn different_api_keys_with_the_same_key_do_not_collide() {
    let app = TestApp::spawn().await;
    let (a, b) = (app.key("tokens:write tokens:read").await, app.key("tokens:write tokens:read").await);
    let ra = app.put(&tokens_path("ua")).key(&a).header(IK, "shared").json(garth_body("a")).send().await;
    let rb = app.put(&tokens_path("ub")).key(&b).header(IK, "shared").json(garth_body("b")).send().await;
    assert_eq!((ra.status.as_u16(), rb.status.as_u16()), (201, 201), "{} {}", ra.text, rb.text);
    assert_eq!((ra.json["user_id"].as_str(), rb.json["user_id"].as_str()), (Some("ua"), Some("ub")));
    assert_eq!(app.idempotency_rows().await.len(), 2);
    // A key without the scope is refused as before, and that refusal is not kept.
    let reader = app.key("tokens:read").await;
    let r = app.put(&tokens_path("uc")).key(&reader).header(IK, "shared").json(garth_body("c")).send().await;
    r.assert_problem(403, "forbidden");
    assert_eq!(app.idempotency_rows().await.len(), 2);
}

#[tokio::test]
async fn client_errors_are_replayed_too() {
    let app = TestApp::spawn().await;
    // One body: garth_body stamps expiries from the clock, so a body built per call differs
    // once a second ticks over between the two sends (then 422 idempotency_key_reused).
    let body = garth_body("a");
    let put = || app.put(&tokens_path("u1")).header(IK, "stale").header("if-match", "\"7\"").json(body.clone());
    put().send().await.assert_problem(412, "version_conflict");
    // The kept answer, not a new evaluation.
    let retry = put().send().await;
    retry.assert_problem(412, "version_conflict");
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn expired_keys_are_purged_and_a_retry_acts_again() {
    let app = TestApp::spawn().await;
    // One body: garth_body stamps expiries from the clock, so a body built per call differs
    // once a second ticks over between the two sends (then 422 idempotency_key_reused).
    let body = garth_body("a");
    let put = || app.put(&tokens_path("u1")).header(IK, "old").json(body.clone());
    assert_eq!(put().send().await.status, 201);
    assert_eq!(app.idempotency_rows().await.len(), 1);
    // Not yet expired: kept.
    centraldb_mfa::sweeper::sweep_once(&app.state, centraldb_mfa::store::now()).await.unwrap();
    assert_eq!(app.idempotency_rows().await.len(), 1);
    let later = centraldb_mfa::store::now() + chrono::Duration::hours(25);
    centraldb_mfa::sweeper::sweep_once(&app.state, later).await.unwrap();
    assert!(app.idempotency_rows().await.is_empty(), "purged after CENTRALDB_IDEMPOTENCY_TTL_SECS");
    let again = put().send().await;
    assert_eq!(again.status, 200, "the key is new again: the write acts (a replace)");
    assert_eq!(app.version_of("u1").await, 2);
}

#[tokio::test]
async fn an_expired_key_acts_again_before_the_sweeper_runs() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_IDEMPOTENCY_TTL_SECS".into(), "1".into());
    })
    .await;
    // One body: garth_body stamps expiries from the clock, so a body built per call differs
    // once a second ticks over between the two sends (then 422 idempotency_key_reused).
    let body = garth_body("a");
    let put = || app.put(&tokens_path("u1")).header(IK, "short").json(body.clone());
    assert_eq!(put().send().await.status, 201);
    assert_eq!(put().send().await.status, 201, "replayed within the TTL");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(put().send().await.status, 200, "past the TTL the key acts again");
    assert_eq!(app.version_of("u1").await, 2);
}

#[tokio::test]
async fn a_write_whose_client_went_away_still_keeps_its_answer_for_the_retry() {
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_ARGON2_MEMORY_KIB".into(), "8192".into());
        v.insert("CENTRALDB_ARGON2_ITERATIONS".into(), "40".into());
    })
    .await;
    let body = json!({"user_id": "u1", "method": "email", "destination": "j@example.com", "verifier": "service"});
    let create = || app.post("/api/v1/mfa/challenges").header(IK, "gone").json(body.clone());
    // The client gives up (its request future is dropped) once the write holds the key.
    tokio::select! {
        r = create().send() => panic!("the first request was meant to be abandoned, got {}", r.status),
        () = async {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while app.idempotency_rows().await != vec![("running".to_string(), true)] {
                assert!(std::time::Instant::now() < deadline, "the first request never held the key");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        } => {}
    }
    // Generous: on a starved machine (a release build beside the suite) the slow argon2 check
    // alone took more than 20 s once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while app.idempotency_rows().await != vec![("done".to_string(), false)] {
        assert!(std::time::Instant::now() < deadline, "the abandoned write's answer was never kept");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let retry = create().send().await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(app.audit_count("challenge.created").await, 1, "created once");
}

#[tokio::test]
async fn an_invented_method_with_a_key_is_still_405() {
    let app = TestApp::spawn().await;
    let method = axum::http::Method::from_bytes(b"QUERY").unwrap();
    let r = app.request(method, "/api/v1/sessions").header(IK, "q").send().await;
    r.assert_problem(405, "method_not_allowed");
    assert!(app.idempotency_rows().await.is_empty());
}

#[tokio::test]
async fn a_write_abandoned_at_any_point_never_leaves_its_key_running() {
    // The client gives up after 0, 25, 50 ... µs: some requests are dropped before their claim,
    // some between the claim and the write, some during the write. A claim that is won must
    // always be followed by the write and its kept answer (before the fix, a request dropped
    // right after its claim committed left the key `running` until its lease lapsed, and every
    // retry got 409 meanwhile).
    let app = TestApp::spawn().await;
    let body = garth_body("a");
    for i in 0..240u64 {
        let key = format!("k{i}");
        let put = app.put(&tokens_path(&format!("u{i}"))).header(IK, &key).json(body.clone());
        let _ = tokio::time::timeout(std::time::Duration::from_micros(25 * i), put.send()).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rows = app.idempotency_rows().await;
        let running = rows.iter().filter(|(state, _)| state == "running").count();
        if running == 0 {
            assert!(rows.iter().all(|(state, no_answer)| state == "done" && !no_answer), "{rows:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{running} keys left running: {rows:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
