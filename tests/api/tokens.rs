use base64::Engine;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn garth_objects_round_trip_with_metadata_and_etag() {
    let app = TestApp::spawn().await;
    let body = garth_body("a");
    let r = app.put(&tokens_path("alice")).json(body.clone()).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.header("etag"), Some("\"1\""));
    assert_eq!(r.json["version"], 1);
    assert_eq!(r.json["status"], "valid");
    assert_eq!(r.json["kind"], "garth");
    assert_eq!(r.json["user_id"], "alice");
    // Metadata never carries secrets.
    for s in garth_secrets("a") {
        assert!(!r.text.contains(&s));
    }
    let expires_at = body["oauth2_token"]["expires_at"].as_i64().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(r.json["access_expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(at.timestamp(), expires_at);
    let rexp = body["oauth2_token"]["refresh_token_expires_at"].as_i64().unwrap();
    let rt = chrono::DateTime::parse_from_rfc3339(r.json["refresh_expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(rt.timestamp(), rexp);

    let g = app.get(&tokens_path("alice")).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.header("etag"), Some("\"1\""));
    assert_eq!(g.header("cache-control"), Some("no-store"));
    assert_eq!(g.json["oauth1_token"], body["oauth1_token"], "unknown fields kept as given");
    assert_eq!(g.json["oauth2_token"], body["oauth2_token"]);
    assert!(g.json["last_used_at"].is_string());
    for f in
        ["user_id", "kind", "version", "status", "access_expires_at", "refresh_expires_at", "created_at", "updated_at"]
    {
        assert!(!g.json[f].is_null(), "missing {f}");
    }
}

#[tokio::test]
async fn replace_answers_200_and_bumps_version() {
    let app = TestApp::spawn().await;
    assert_eq!(app.put(&tokens_path("u1")).json(garth_body("a")).send().await.status, 201);
    let r = app.put(&tokens_path("u1")).json(garth_body("b")).send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["version"], 2);
    assert_eq!(r.header("etag"), Some("\"2\""));
    let g = app.get(&tokens_path("u1")).send().await;
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-b-SECRET");
    assert_eq!(g.json["created_at"], r.json["created_at"]);
}

#[tokio::test]
async fn garth_dump_in_and_out() {
    let app = TestApp::spawn().await;
    let arr = json!([oauth1("d"), oauth2("d")]);
    let dump = base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&arr).unwrap());
    let r = app.put(&tokens_path("dumper")).json(json!({"kind": "garth", "garth_dump": dump})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    let g = app.get(&format!("{}?representation=garth_dump", tokens_path("dumper"))).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert!(g.json.get("oauth1_token").is_none());
    let back = base64::engine::general_purpose::STANDARD.decode(g.json["garth_dump"].as_str().unwrap()).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&back).unwrap(), arr, "loadable by garth.Client.loads()");
    let g = app.get(&tokens_path("dumper")).send().await;
    assert_eq!(g.json["oauth1_token"], arr[0]);
    // Bad representation values are refused.
    let g = app.get(&format!("{}?representation=xml", tokens_path("dumper"))).send().await;
    g.assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn garminconnect_bundle_takes_expiry_from_jwt_exp() {
    let app = TestApp::spawn().await;
    let (exp, rexp) = (future(3600), future(86_400 * 30));
    let body = json!({"kind": "garminconnect", "di_token": jwt(exp, "acc"), "di_refresh_token": jwt(rexp, "ref"),
                      "di_client_id": "client-1"});
    let r = app.put(&tokens_path("gc")).json(body.clone()).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    let at = chrono::DateTime::parse_from_rfc3339(r.json["access_expires_at"].as_str().unwrap()).unwrap();
    assert_eq!(at.timestamp(), exp);
    let g = app.get(&tokens_path("gc")).send().await;
    for f in ["di_token", "di_refresh_token", "di_client_id"] {
        assert_eq!(g.json[f], body[f]);
    }
    // Opaque (non-JWT) tokens have no known expiry.
    let r = app
        .put(&tokens_path("gc2"))
        .json(
            json!({"kind": "garminconnect", "di_token": "opaque", "di_refresh_token": "opaque2", "di_client_id": "c"}),
        )
        .send()
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json["access_expires_at"].is_null() && r.json["refresh_expires_at"].is_null());
    let g = app.get(&format!("{}?representation=garth_dump", tokens_path("gc2"))).send().await;
    g.assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn if_match_is_compare_and_set() {
    let app = TestApp::spawn().await;
    let p = tokens_path("cas");
    // If-Match on nothing stored.
    let r = app.put(&p).header("if-match", "\"1\"").json(garth_body("a")).send().await;
    r.assert_problem(412, "version_conflict");
    assert!(r.json["current_version"].is_null());
    app.put(&p).json(garth_body("a")).send().await;
    let ok = app.put(&p).header("if-match", "\"1\"").json(garth_body("b")).send().await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json["version"], 2);
    let stale = app.put(&p).header("if-match", "\"1\"").json(garth_body("c")).send().await;
    stale.assert_problem(412, "version_conflict");
    assert_eq!(stale.json["current_version"], 2);
    let g = app.get(&p).send().await;
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-b-SECRET", "a refused write changes nothing");
    // Malformed If-Match is refused, not ignored.
    let r = app.put(&p).header("if-match", "W/\"2\"").json(garth_body("c")).send().await;
    r.assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn if_none_match_star_only_creates() {
    let app = TestApp::spawn().await;
    let p = tokens_path("inm");
    let r = app.put(&p).header("if-none-match", "*").json(garth_body("a")).send().await;
    assert_eq!(r.status, 201);
    let r = app.put(&p).header("if-none-match", "*").json(garth_body("b")).send().await;
    r.assert_problem(412, "version_conflict");
    assert_eq!(r.json["current_version"], 1);
}

#[tokio::test]
async fn validation_failures_name_the_field_and_change_nothing() {
    let app = TestApp::spawn().await;
    let p = tokens_path("val");
    let mut body = garth_body("a");
    body["oauth2_token"].as_object_mut().unwrap().remove("access_token");
    let r = app.put(&p).json(body).send().await;
    r.assert_problem(422, "validation_failed");
    assert_eq!(r.json["field"], "oauth2_token.access_token");
    let r = app.put(&p).json(json!({"kind": "garth", "oauth1_token": oauth1("a")})).send().await;
    assert_eq!(r.json["field"], "oauth2_token");
    let r = app.put(&p).json(json!({"kind": 7})).send().await;
    assert_eq!(r.json["field"], "kind");
    let r = app.put(&p).json(json!(["not", "an", "object"])).send().await;
    r.assert_problem(422, "validation_failed");
    // Malformed JSON.
    let r = app.put(&p).raw_body("application/json", "{\"kind\": ").send().await;
    r.assert_problem(422, "validation_failed");
    // Not JSON at all.
    let r = app.put(&p).raw_body("text/plain", "hello").send().await;
    r.assert_problem(415, "unsupported_media_type");
    // Over the 64 KiB limit.
    let mut big = garth_body("a");
    big["oauth1_token"]["padding"] = json!("x".repeat(70 * 1024));
    let r = app.put(&p).json(big).send().await;
    r.assert_problem(413, "payload_too_large");
    // Bad user ids.
    for bad in ["a%20b", "%C3%A9", &"x".repeat(129), "a%2Fb"] {
        let r = app.put(&tokens_path(bad)).json(garth_body("a")).send().await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], "user_id");
    }
    // Nothing was stored.
    app.get(&p).send().await.assert_problem(404, "tokens_not_found");
    assert!(app.audit().await.iter().all(|e| e.type_ != "token.write"));
}

#[tokio::test]
async fn missing_bundle_is_404_everywhere() {
    let app = TestApp::spawn().await;
    app.get(&tokens_path("ghost")).send().await.assert_problem(404, "tokens_not_found");
    app.get(&format!("{}/metadata", tokens_path("ghost"))).send().await.assert_problem(404, "tokens_not_found");
    app.post(&format!("{}/invalidate", tokens_path("ghost")))
        .json(json!({"reason": "x"}))
        .send()
        .await
        .assert_problem(404, "tokens_not_found");
    let r = app.delete(&tokens_path("ghost")).send().await;
    assert_eq!(r.status, 204, "logout is idempotent");
}

#[tokio::test]
async fn invalidate_destroys_ciphertext_and_answers_410() {
    let app = TestApp::spawn().await;
    let p = tokens_path("inv");
    app.put(&p).json(garth_body("a")).send().await;
    let r = app.post(&format!("{p}/invalidate")).json(json!({"reason": "password_changed"})).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(app.ciphertext("inv").await, None, "ciphertext destroyed");
    let g = app.get(&p).send().await;
    g.assert_problem(410, "reauth_required");
    assert_eq!(g.json["reason"], "password_changed");
    let m = app.get(&format!("{p}/metadata")).send().await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json["status"], "reauth_required");
    assert_eq!(m.json["version"], 2, "invalidation is a write");
    let s = app.get("/api/v1/users/inv/auth-status").send().await;
    assert_eq!(s.json["status"], "EXPIRED");
    // A fresh login replaces the tombstone: created again, version keeps counting.
    let r = app.put(&p).json(garth_body("b")).send().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["version"], 3);
    assert_eq!(r.json["status"], "valid");
    // Reasons are bounded.
    let r = app.post(&format!("{p}/invalidate")).json(json!({"reason": "x".repeat(201)})).send().await;
    r.assert_problem(422, "validation_failed");
}

#[tokio::test]
async fn delete_is_logout() {
    let app = TestApp::spawn().await;
    let p = tokens_path("bye");
    app.put(&p).json(garth_body("a")).send().await;
    assert_eq!(app.delete(&p).send().await.status, 204);
    app.get(&p).send().await.assert_problem(404, "tokens_not_found");
    assert_eq!(app.get("/api/v1/users/bye/auth-status").send().await.json["status"], "MISSING");
}

#[tokio::test]
async fn expiry_drives_status() {
    let app = TestApp::spawn().await;
    // Access expired, refresh still valid: usable, refresh needed.
    let body = json!({"kind": "garth", "oauth1_token": oauth1("x"), "oauth2_token": oauth2_with("x", future(-60), future(3600))});
    let r = app.put(&tokens_path("stale")).json(body).send().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["status"], "access_expired");
    assert_eq!(app.get(&tokens_path("stale")).send().await.status, 200);
    assert_eq!(app.get("/api/v1/users/stale/auth-status").send().await.json["status"], "VALID");
    // Refresh expired: accepted and reported, but not handed out.
    let body = json!({"kind": "garth", "oauth1_token": oauth1("y"), "oauth2_token": oauth2_with("y", future(-120), future(-60))});
    let r = app.put(&tokens_path("dead")).json(body).send().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["status"], "reauth_required");
    let g = app.get(&tokens_path("dead")).send().await;
    g.assert_problem(410, "reauth_required");
    assert_eq!(g.json["reason"], "refresh_expired");
    let s = app.get("/api/v1/users/dead/auth-status").send().await;
    assert_eq!(s.json["status"], "EXPIRED");
    assert_eq!(s.json["tokens"]["status"], "reauth_required");
}

#[tokio::test]
async fn auth_status_reports_each_state() {
    let app = TestApp::spawn().await;
    let s = app.get("/api/v1/users/nobody/auth-status").send().await;
    assert_eq!(s.status, 200);
    assert_eq!(s.json, json!({"user_id": "nobody", "status": "MISSING", "tokens": null, "session": null}));
    app.put(&tokens_path("ok")).json(garth_body("a")).send().await;
    let s = app.get("/api/v1/users/ok/auth-status").send().await;
    assert_eq!(s.json["status"], "VALID");
    assert_eq!(s.json["tokens"]["version"], 1);
}

#[tokio::test]
async fn database_holds_ciphertext_never_token_strings() {
    let app = TestApp::spawn().await;
    app.put(&tokens_path("raw1")).json(garth_body("raw1")).send().await;
    let di = json!({"kind": "garminconnect", "di_token": "di-access-RAWSECRET", "di_refresh_token": "di-refresh-RAWSECRET",
                    "di_client_id": "di-client-RAWSECRET"});
    app.put(&tokens_path("raw2")).json(di).send().await;
    // Reading also writes (audit, last_used_at); still no plaintext.
    app.get(&tokens_path("raw1")).send().await;
    app.get(&tokens_path("raw2")).send().await;
    let raw = app.raw_database().await;
    assert!(raw.len() > 1000, "the dump is not empty");
    assert!(contains(&raw, "raw1"), "the dump really holds rows (user id is plain)");
    let mut secrets = garth_secrets("raw1");
    secrets.extend(["di-access-RAWSECRET", "di-refresh-RAWSECRET", "di-client-RAWSECRET"].map(String::from));
    for s in &secrets {
        assert!(!contains(&raw, s), "plaintext {s} found in the database");
    }
    assert!(!contains(&raw, ADMIN_KEY), "API keys are stored hashed");
}

#[tokio::test]
async fn ciphertext_moved_between_users_fails_cleanly() {
    let app = TestApp::spawn().await;
    app.put(&tokens_path("alice")).json(garth_body("alice")).send().await;
    app.put(&tokens_path("bob")).json(garth_body("bob")).send().await;
    let (a, b) = (app.ciphertext("alice").await.unwrap(), app.ciphertext("bob").await.unwrap());
    app.set_ciphertext("alice", &b).await;
    app.set_ciphertext("bob", &a).await;
    for user in ["alice", "bob"] {
        let r = app.get(&tokens_path(user)).send().await;
        r.assert_problem(500, "internal_error");
        for s in garth_secrets("alice").iter().chain(garth_secrets("bob").iter()) {
            assert!(!r.text.contains(s.as_str()), "plaintext leaked");
        }
    }
    let errors: Vec<_> =
        app.audit().await.into_iter().filter(|e| e.type_ == "token.read" && e.outcome == "error").collect();
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| e.details.contains("decrypt_failed")));
    // A flipped byte and a truncated envelope are caught the same way.
    app.put(&tokens_path("carol")).json(garth_body("carol")).send().await;
    let mut c = app.ciphertext("carol").await.unwrap();
    let last = c.len() - 1;
    c[last] ^= 1;
    app.set_ciphertext("carol", &c).await;
    app.get(&tokens_path("carol")).send().await.assert_problem(500, "internal_error");
    app.set_ciphertext("carol", &c[..10]).await;
    app.get(&tokens_path("carol")).send().await.assert_problem(500, "internal_error");
}

#[tokio::test]
async fn every_token_call_writes_one_audit_row_without_secrets() {
    let app = TestApp::spawn().await;
    let p = tokens_path("aud");
    let before = app.audit().await.len();
    let r = app.put(&p).header("x-request-id", "req-123").json(garth_body("aud")).send().await;
    assert_eq!(r.header("x-request-id"), Some("req-123"));
    app.get(&p).send().await;
    app.get(&format!("{p}/metadata")).send().await;
    app.get("/api/v1/users/aud/auth-status").send().await;
    app.put(&p).header("if-match", "\"9\"").json(garth_body("aud")).send().await;
    app.post(&format!("{p}/invalidate")).json(json!({})).send().await;
    app.get(&p).send().await;
    app.delete(&p).send().await;
    let events = app.audit().await;
    let new: Vec<_> = events[before..].iter().collect();
    let types: Vec<(&str, &str)> = new.iter().map(|e| (e.type_.as_str(), e.outcome.as_str())).collect();
    assert_eq!(
        types,
        vec![
            ("token.write", "success"),
            ("token.read", "success"),
            ("token.metadata_read", "success"),
            ("auth_status.read", "success"),
            ("token.write", "failure"),
            ("token.invalidate", "success"),
            ("token.read", "failure"),
            ("token.delete", "success"),
        ]
    );
    assert_eq!(new[0].request_id.as_deref(), Some("req-123"));
    assert!(new.iter().all(|e| e.user_id.as_deref() == Some("aud")));
    assert!(new.iter().all(|e| e.actor.as_deref().is_some_and(|a| a.starts_with("key:"))));
    assert!(new[1..].iter().all(|e| e.request_id.as_deref().is_some_and(|r| !r.is_empty())));
    let all = format!("{new:?}");
    for s in garth_secrets("aud") {
        assert!(!all.contains(&s));
    }
}

#[tokio::test]
async fn if_none_match_star_lets_a_dead_bundle_be_replaced() {
    let app = TestApp::spawn().await;
    let p = tokens_path("relogin");
    let dead = json!({"kind": "garth", "oauth1_token": oauth1("x"), "oauth2_token": oauth2_with("x", future(-120), future(-60))});
    assert_eq!(app.put(&p).json(dead).send().await.status, 201);
    let r = app.put(&p).header("if-none-match", "*").json(garth_body("y")).send().await;
    assert_eq!(r.status, 201, "a bundle past its refresh expiry is not usable: {}", r.text);
    assert_eq!(r.json["version"], 2);
    assert_eq!(r.json["status"], "valid");
}

#[tokio::test]
async fn garth_dump_of_a_di_bundle_is_refused_before_decrypting() {
    let app = TestApp::spawn().await;
    let p = tokens_path("di");
    let body = json!({"kind": "garminconnect", "di_token": "a", "di_refresh_token": "b", "di_client_id": "c"});
    app.put(&p).json(body).send().await;
    let r = app.get(&format!("{p}?representation=garth_dump")).send().await;
    r.assert_problem(422, "validation_failed");
    assert_eq!(r.json["field"], "representation");
    let last = app.audit().await.pop().unwrap();
    assert_eq!((last.type_.as_str(), last.outcome.as_str()), ("token.read", "failure"));
    let m = app.get(&format!("{p}/metadata")).send().await;
    assert!(m.json["last_used_at"].is_null(), "nothing was handed out");
}

#[tokio::test]
async fn invalidate_accepts_an_empty_body() {
    let app = TestApp::spawn().await;
    let p = tokens_path("empty");
    app.put(&p).json(garth_body("a")).send().await;
    let r = app.post(&format!("{p}/invalidate")).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(app.get(&p).send().await.json["reason"], "invalidated");
    let r = app.post(&format!("{p}/invalidate")).raw_body("application/json", "{oops").send().await;
    r.assert_problem(422, "validation_failed");
}

/// Writes that share a group commit stay independent: a refused write undoes only itself, and
/// writes cancelled at random moments (a client gone, a timeout) leave a consistent store whose
/// audit chain still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_and_cancelled_writes_stay_independent() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..40 {
        let app = app.clone();
        set.spawn(async move {
            let mut req = app.put(&tokens_path(&format!("g{i}"))).json(garth_body(&format!("g{i}")));
            if i % 2 == 1 {
                req = req.header("if-match", "\"7\"");
            }
            (i, req.send().await.status.as_u16())
        });
    }
    for (i, status) in set.join_all().await {
        assert_eq!(status, if i % 2 == 0 { 201 } else { 412 }, "user g{i}");
    }
    for i in 0..40 {
        let r = app.get(&tokens_path(&format!("g{i}"))).send().await;
        if i % 2 == 0 {
            assert_eq!(r.status, 200);
            assert_eq!(r.json["oauth2_token"]["access_token"], format!("acc-g{i}-SECRET"));
        } else {
            r.assert_problem(404, "tokens_not_found");
        }
    }
    // Cancel writes at random points.
    for i in 0..30u64 {
        let app2 = app.clone();
        let fut = async move { app2.put(&tokens_path("cancelled")).json(garth_body(&format!("c{i}"))).send().await };
        let _ = tokio::time::timeout(std::time::Duration::from_micros(i * 150), fut).await;
    }
    // Everything still works, and what was written is whole.
    let w = app.put(&tokens_path("after")).json(garth_body("after")).send().await;
    assert_eq!(w.status, 201, "{}", w.text);
    // However many cancelled writes committed (n, each with its audit row), one more write
    // finds exactly them: it creates (201) when none did, else replaces (200), as version n + 1.
    let writes = || async {
        app.audit()
            .await
            .iter()
            .filter(|e| e.type_ == "token.write" && e.user_id.as_deref() == Some("cancelled"))
            .count() as i64
    };
    let n = writes().await;
    let r = app.put(&tokens_path("cancelled")).json(garth_body("final")).send().await;
    assert_eq!(r.status, if n == 0 { 201 } else { 200 }, "{n} committed before: {}", r.text);
    assert_eq!(r.json["version"], n + 1, "every committed write has its audit row, and only those: {}", r.text);
    let r = app.get(&tokens_path("cancelled")).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["version"], n + 1);
    assert_eq!(r.json["oauth2_token"]["access_token"], "acc-final-SECRET");
    assert_eq!(writes().await, n + 1);
    let report = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(report.ok, "{report:?}");
}

/// `garth_body(tag)` as JSON text with extra number fields spliced into both token objects,
/// written exactly as given (no serializer in between).
fn garth_text_with_numbers(tag: &str, numbers: &str) -> String {
    let with = |v: Value| {
        let t = serde_json::to_string(&v).unwrap();
        format!("{},{numbers}}}", &t[..t.len() - 1])
    };
    format!(r#"{{"kind":"garth","oauth1_token":{},"oauth2_token":{}}}"#, with(oauth1(tag)), with(oauth2(tag)))
}

/// Issue 15 finding 13: unknown fields are kept and returned as given, numbers included
/// (`123456789012345678901` came back as `1.2345678901234568e+20`, `1.50` as `1.5`). Every
/// digit is kept, beyond f64's range and precision too; only an exponent is spelt the one way
/// serde_json writes it (`1E2` and `1e2` both come back as `1e+2`, the same number).
#[tokio::test]
async fn unknown_number_fields_come_back_with_their_exact_text() {
    const NUMBERS: &str = r#""n_big":123456789012345678901,"n_dec":1.50,"n_neg":-0.0,"n_long":0.10000000000000000000000001,"n_tiny":1e-400,"n_huge":1e+400,"n_exp":-2.50e-7"#;
    let app = TestApp::spawn().await;
    let text = garth_text_with_numbers("num", NUMBERS);
    let r = app.put(&tokens_path("num")).raw_body("application/json", text.clone()).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    // From the body sent (oauth2() reads the clock: a second call may be a second later).
    let sent: Value = serde_json::from_str(&text).unwrap();
    let expires_at = sent["oauth2_token"]["expires_at"].as_i64().unwrap();
    assert_eq!(
        r.json["access_expires_at"].as_str().map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()),
        Some(expires_at)
    );
    let g = app.get(&tokens_path("num")).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.text.matches(NUMBERS).count(), 2, "both objects keep the number texts: {}", g.text);
    // The garth_dump representation carries the same text.
    let d = app.get(&format!("{}?representation=garth_dump", tokens_path("num"))).send().await;
    assert_eq!(d.status, 200, "{}", d.text);
    let dump = base64::engine::general_purpose::STANDARD.decode(d.json["garth_dump"].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8(dump).unwrap().matches(NUMBERS).count(), 2);
    // A garth_dump given on input keeps them too.
    let inner = text.replacen(r#"{"kind":"garth","oauth1_token":"#, "[", 1).replacen(r#","oauth2_token":"#, ",", 1);
    let inner = format!("{}]", &inner[..inner.len() - 1]);
    let body = json!({"kind": "garth", "garth_dump": base64::engine::general_purpose::STANDARD.encode(&inner)});
    assert_eq!(app.put(&tokens_path("num2")).json(body).send().await.status, 201);
    let g = app.get(&tokens_path("num2")).send().await;
    assert_eq!(g.text.matches(NUMBERS).count(), 2, "{}", g.text);
}

/// Issue 15 finding 13: a key given twice (in the body or inside a token object) is refused
/// with 422 naming it, and nothing is stored (serde_json kept the last one silently).
#[tokio::test]
async fn duplicate_keys_are_refused_and_nothing_changes() {
    let app = TestApp::spawn().await;
    let p = tokens_path("dup");
    assert_eq!(app.put(&p).json(garth_body("dup")).send().await.status, 201);
    let o1 = serde_json::to_string(&oauth1("dup2")).unwrap();
    let o2 = serde_json::to_string(&oauth2("dup2")).unwrap();
    let dup_o1 = format!(r#"{},"oauth_token":"other"}}"#, &o1[..o1.len() - 1]);
    let dup_o2 = format!(r#"{},"access\u005ftoken":"other"}}"#, &o2[..o2.len() - 1]);
    let dump = base64::engine::general_purpose::STANDARD.encode(format!("[{dup_o1},{o2}]"));
    let cases = [
        (format!(r#"{{"kind":"garth","oauth1_token":{o1},"oauth2_token":{o2},"kind":"garth"}}"#), "kind"),
        (format!(r#"{{"kind":"garth","oauth1_token":{dup_o1},"oauth2_token":{o2}}}"#), "oauth1_token.oauth_token"),
        (format!(r#"{{"kind":"garth","oauth1_token":{o1},"oauth2_token":{dup_o2}}}"#), "oauth2_token.access_token"),
        (format!(r#"{{"kind":"garth","garth_dump":"{dump}"}}"#), "garth_dump"),
        (
            r#"{"kind":"garminconnect","di_token":"a","di_refresh_token":"b","di_client_id":"c","di_token":"d"}"#
                .to_string(),
            "di_token",
        ),
    ];
    let stored = app.ciphertext("dup").await;
    for (body, field) in cases {
        for user in ["dup", "dup-new"] {
            let r = app.put(&tokens_path(user)).raw_body("application/json", body.clone()).send().await;
            r.assert_problem(422, "validation_failed");
            assert_eq!(r.json["field"], field, "{body}: {}", r.text);
        }
    }
    app.get(&tokens_path("dup-new")).send().await.assert_problem(404, "tokens_not_found");
    assert_eq!(app.ciphertext("dup").await, stored, "the stored bundle is unchanged");
    let g = app.get(&p).send().await;
    assert_eq!(
        (g.json["version"].as_i64(), g.json["oauth1_token"]["oauth_token"].clone()),
        (Some(1), oauth1("dup")["oauth_token"].clone())
    );
}

// ---- ciphertexts are bound to the write that stored them (issue 15 finding 7) ---------------

/// The columns a ciphertext's binding lives in: the ciphertext, its key id and its write id.
async fn sealed_columns(app: &TestApp, user: &str) -> (Option<Vec<u8>>, Option<String>, Option<uuid::Uuid>) {
    use centraldb_mfa::store::Db;
    let sql = "SELECT ciphertext, key_id, write_id FROM token_bundles WHERE user_id = $1";
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_as(sql).bind(user).fetch_one(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_as(sql).bind(user).fetch_one(pool).await.unwrap(),
    }
}

/// Puts these columns back into the row, as someone editing the database would (and clears the
/// tombstone's reason, so the row looks live).
async fn restore_sealed_columns(
    app: &TestApp,
    user: &str,
    (ct, key_id, write_id): &(Option<Vec<u8>>, Option<String>, Option<uuid::Uuid>),
) {
    use centraldb_mfa::store::Db;
    let sql = "UPDATE token_bundles SET ciphertext = $2, key_id = $3, write_id = $4, reauth_reason = NULL \
               WHERE user_id = $1";
    match app.db() {
        Db::Sqlite { pool, .. } => {
            sqlx::query(sql).bind(user).bind(ct).bind(key_id).bind(write_id).execute(pool).await.unwrap();
        }
        Db::Postgres { pool } => {
            sqlx::query(sql).bind(user).bind(ct).bind(key_id).bind(write_id).execute(pool).await.unwrap();
        }
    }
}

/// A GET answers the generic 500, hands out nothing, and audits `decrypt_failed`.
async fn assert_refused_as_tampered(app: &TestApp, user: &str, tags: &[&str]) {
    let before = app.audit().await.len();
    let r = app.get(&tokens_path(user)).send().await;
    r.assert_problem(500, "internal_error");
    for s in tags.iter().flat_map(|t| garth_secrets(t)) {
        assert!(!r.text.contains(&s), "plaintext leaked");
    }
    let events = app.audit().await;
    let e = &events[before];
    assert_eq!((e.type_.as_str(), e.outcome.as_str()), ("token.read", "error"));
    assert_eq!(details(e)["reason"], "decrypt_failed");
}

#[tokio::test]
async fn an_older_ciphertext_put_back_into_the_row_does_not_decrypt() {
    let app = TestApp::spawn().await;
    // After a newer write.
    app.put(&tokens_path("rb1")).json(garth_body("rb1-v1")).send().await;
    let v1 = sealed_columns(&app, "rb1").await;
    assert!(v1.2.is_some(), "every write has a write id");
    app.put(&tokens_path("rb1")).json(garth_body("rb1-v2")).send().await;
    app.set_ciphertext("rb1", v1.0.as_deref().unwrap()).await;
    assert_refused_as_tampered(&app, "rb1", &["rb1-v1", "rb1-v2"]).await;
    // Even with its write id restored too: the version differs.
    restore_sealed_columns(&app, "rb1", &v1).await;
    assert_refused_as_tampered(&app, "rb1", &["rb1-v1", "rb1-v2"]).await;
    // After an invalidation (ciphertext, key id and write id all put back).
    app.put(&tokens_path("rb2")).json(garth_body("rb2")).send().await;
    let live = sealed_columns(&app, "rb2").await;
    assert_eq!(app.post(&format!("{}/invalidate", tokens_path("rb2"))).send().await.status, 204);
    restore_sealed_columns(&app, "rb2", &live).await;
    assert_refused_as_tampered(&app, "rb2", &["rb2"]).await;
    // After a logout and a new login, which starts at version 1 again.
    app.put(&tokens_path("rb3")).json(garth_body("rb3-old")).send().await;
    let old = sealed_columns(&app, "rb3").await;
    assert_eq!(app.delete(&tokens_path("rb3")).send().await.status, 204);
    let r = app.put(&tokens_path("rb3")).json(garth_body("rb3-new")).send().await;
    assert_eq!(r.json["version"], 1);
    app.set_ciphertext("rb3", old.0.as_deref().unwrap()).await;
    assert_refused_as_tampered(&app, "rb3", &["rb3-old", "rb3-new"]).await;
}

/// A legacy row: what a write stored before write ids existed (associated data: user and kind).
async fn make_legacy(app: &TestApp, user: &str, tag: &str) {
    use centraldb_mfa::{crypto::Aad, domain::TokenBundle};
    let bundle = TokenBundle::from_body(garth_body(tag)).unwrap();
    let envelope = app.state.keyring.encrypt(&bundle.plaintext, &Aad::token_bundle(user, "garth"));
    restore_sealed_columns(app, user, &(Some(envelope), Some("k1".into()), None)).await;
}

#[tokio::test]
async fn legacy_rows_are_upgraded_at_start_up_and_by_rewrap_and_never_read_as_is() {
    use centraldb_mfa::{
        config::Settings,
        services::{audit::AuditContext, keys},
        startup,
    };
    let app = TestApp::spawn().await;
    for u in ["old1", "old2"] {
        app.put(&tokens_path(u)).json(garth_body(&format!("{u}-new"))).send().await;
        make_legacy(&app, u, &format!("{u}-legacy")).await;
    }
    // A running service never reads the legacy binding (else an editor of the database could put
    // an older legacy ciphertext back and clear the write id).
    assert_refused_as_tampered(&app, "old1", &["old1-legacy", "old1-new"]).await;
    // `rewrap` upgrades it (same key: only the binding changes).
    let report = keys::rewrap(app.db(), &app.state.keyring, &AuditContext::system("test")).await.unwrap();
    assert_eq!((report.rewrapped, report.legacy_upgraded, report.failed.len()), (2, 2, 0), "{report:?}");
    let g = app.get(&tokens_path("old1")).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-old1-legacy-SECRET");
    assert!(sealed_columns(&app, "old1").await.2.is_some());
    let again = keys::rewrap(app.db(), &app.state.keyring, &AuditContext::system("test")).await.unwrap();
    assert_eq!((again.rewrapped, again.legacy_upgraded), (0, 0));
    // Start-up upgrades what a previous version wrote: a restart on the same database.
    make_legacy(&app, "old2", "old2-legacy").await;
    let settings = Settings::from_lookup(|k| app.vars.get(k).cloned()).unwrap();
    let restarted = startup::build_state(settings).await.unwrap();
    restarted.db.close().await;
    let g = app.get(&tokens_path("old2")).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.json["oauth2_token"]["access_token"], "acc-old2-legacy-SECRET");
    assert_eq!(g.json["version"], 1, "the upgrade is no new version");
    let upgraded: Vec<_> = app.audit().await.into_iter().filter(|e| e.type_ == "token.upgraded").collect();
    assert_eq!(upgraded.len(), 1);
    assert_eq!(details(&upgraded[0])["legacy_upgraded"], 1);
    let report = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(report.ok, "{report:?}");
}

// ---- destroyed ciphertext leaves the SQLite WAL (issue 15 finding 12) ----------------------

/// Whether the raw database (SQLite: the file, its `-wal` and `-shm`; PostgreSQL: every row as
/// text) holds these bytes, as they are or hex-encoded.
fn holds(raw: &[u8], bytes: &[u8]) -> bool {
    let hex = hex::encode(bytes);
    raw.windows(bytes.len()).any(|w| w == bytes) || raw.windows(hex.len()).any(|w| w == hex.as_bytes())
}

/// Waits (up to `bound`) until the raw database holds none of `cts`; returns how long it took.
async fn gone_within(app: &TestApp, cts: &[Vec<u8>], bound: std::time::Duration) -> std::time::Duration {
    let t = std::time::Instant::now();
    loop {
        let raw = app.raw_database().await;
        let left: Vec<usize> = (0..cts.len()).filter(|i| holds(&raw, &cts[*i][cts[*i].len() - 48..])).collect();
        if left.is_empty() {
            return t.elapsed();
        }
        assert!(t.elapsed() < bound, "destroyed ciphertext(s) {left:?} still on disk after {:?}", t.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn destroyed_ciphertext_leaves_the_database_and_its_wal_within_the_bound() {
    let bound = std::time::Duration::from_secs(2);
    let app = TestApp::spawn().await;
    // Some unrelated traffic, so the log holds other frames too.
    for i in 0..20 {
        app.put(&tokens_path(&format!("other{i}"))).json(garth_body(&format!("other{i}"))).send().await;
    }
    let mut cts = Vec::new();
    for tag in ["del-v1", "del-v2"] {
        app.put(&tokens_path("del")).json(garth_body(tag)).send().await;
        cts.push(app.ciphertext("del").await.unwrap());
    }
    let raw = app.raw_database().await;
    let live = cts.last().unwrap();
    assert!(holds(&raw, &live[live.len() - 48..]), "the search finds live ciphertext");
    assert_eq!(app.delete(&tokens_path("del")).send().await.status, 204);
    let took = gone_within(&app, &cts, bound).await;
    eprintln!("after DELETE: gone in {took:?}");
    // The same after an invalidation.
    app.put(&tokens_path("inv")).json(garth_body("inv")).send().await;
    let ct = app.ciphertext("inv").await.unwrap();
    assert_eq!(app.post(&format!("{}/invalidate", tokens_path("inv"))).send().await.status, 204);
    let took = gone_within(&app, &[ct], bound).await;
    eprintln!("after invalidate: gone in {took:?}");
    // Live bundles are untouched.
    assert_eq!(app.get(&tokens_path("other7")).send().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroyed_ciphertext_leaves_the_wal_under_concurrent_reads_and_writes() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    app.put(&tokens_path("busy-del")).json(garth_body("busy-del")).send().await;
    let ct = app.ciphertext("busy-del").await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (app, stop) = (app.clone(), stop.clone());
        load.spawn(async move {
            let user = format!("load{w}");
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = app.put(&tokens_path(&user)).json(garth_body(&format!("{user}-{n}"))).send().await;
                assert!(r.status.is_success(), "{}", r.text);
                assert_eq!(app.get(&tokens_path(&user)).send().await.status, 200);
                n += 1;
            }
            n
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(app.delete(&tokens_path("busy-del")).send().await.status, 204);
    let took = gone_within(&app, &[ct], std::time::Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds: u32 = load.join_all().await.into_iter().sum();
    eprintln!("under load ({rounds} write+read rounds): gone in {took:?}");
}

/// garth-ng's OAuth2 token as its `dumps()` writes it: float expiries, no `token_type` needed,
/// `client_id` and the MFA fields.
fn garth_ng_oauth2(tag: &str) -> Value {
    secret(&format!("ng-acc-{tag}-SECRET"));
    secret(&format!("ng-ref-{tag}-SECRET"));
    let text = format!(
        r#"{{"access_token": "ng-acc-{tag}-SECRET", "refresh_token": "ng-ref-{tag}-SECRET", "expires_in": 3600,
            "token_type": "Bearer", "expires_at": {}.5, "refresh_token_expires_in": 7776000,
            "refresh_token_expires_at": {}.25, "scope": "CONNECT_READ", "jti": "jti-{tag}", "mfa_token": null,
            "mfa_expiration_timestamp": null, "mfa_expiration_timestamp_millis": null, "client_id": "GCM_ANDROID_DARK"}}"#,
        future(3600),
        future(7_776_000)
    );
    serde_json::from_str(&text).unwrap()
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
}

fn unb64(s: &Value) -> Value {
    serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap()).unwrap()
}

fn unix_of(v: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().timestamp()
}

/// garth-ng writes `[oauth2]` (one element): accepted, expiries from the float `expires_at` and
/// `refresh_token_expires_at` (truncated), and read back in the same one-element form (garth-ng's
/// `loads()` refuses the two-element one), with the float text exactly as written.
#[tokio::test]
async fn garth_ng_one_element_dump_round_trips_in_its_own_form() {
    let app = TestApp::spawn().await;
    let o2 = garth_ng_oauth2("d");
    let r = app
        .put(&tokens_path("ng"))
        .json(json!({"kind": "garth", "garth_dump": b64(&json!([o2.clone()]))}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["kind"], "garth");
    assert_eq!(r.json["status"], "valid");
    assert_eq!(r.json["refreshable"], true);
    let exp: f64 = o2["expires_at"].to_string().parse().unwrap();
    let rexp: f64 = o2["refresh_token_expires_at"].to_string().parse().unwrap();
    assert_eq!(unix_of(&r.json["access_expires_at"]), exp.trunc() as i64);
    assert_eq!(unix_of(&r.json["refresh_expires_at"]), rexp.trunc() as i64);

    let g = app.get(&format!("{}?representation=garth_dump", tokens_path("ng"))).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    let back = unb64(&g.json["garth_dump"]);
    assert_eq!(back, json!([o2.clone()]), "one element, as garth-ng's loads() needs");
    assert!(back[0]["expires_at"].to_string().ends_with(".5"), "float kept as written: {}", back[0]["expires_at"]);

    let g = app.get(&tokens_path("ng")).send().await;
    assert_eq!(g.json["oauth2_token"], o2);
    assert!(g.json.get("oauth1_token").is_none(), "no OAuth1 token invented: {}", g.text);
}

/// The objects form with `oauth2_token` alone is garth-ng too: the objects come back exactly as
/// written, and the dump representation is the one-element form. garth 0.8 bundles keep theirs.
#[tokio::test]
async fn garth_ng_oauth2_alone_is_accepted_and_returned_as_written() {
    let app = TestApp::spawn().await;
    let o2 = garth_ng_oauth2("o");
    let r = app.put(&tokens_path("ng2")).json(json!({"kind": "garth", "oauth2_token": o2.clone()})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    let g = app.get(&tokens_path("ng2")).send().await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json["oauth2_token"], o2);
    assert!(g.json.get("oauth1_token").is_none());
    let d = app.get(&format!("{}?representation=garth_dump", tokens_path("ng2"))).send().await;
    assert_eq!(unb64(&d.json["garth_dump"]), json!([o2]));
    // A garth 0.8 bundle written as a dump still comes back as two elements.
    let arr = json!([oauth1("g"), oauth2("g")]);
    assert_eq!(
        app.put(&tokens_path("g08")).json(json!({"kind": "garth", "garth_dump": b64(&arr)})).send().await.status,
        201
    );
    let d = app.get(&format!("{}?representation=garth_dump", tokens_path("g08"))).send().await;
    assert_eq!(unb64(&d.json["garth_dump"]), arr);
    // Validation still names the field, and refuses changing nothing.
    let mut bad = garth_ng_oauth2("b");
    bad.as_object_mut().unwrap().remove("refresh_token");
    app.put(&tokens_path("ng2"))
        .json(json!({"kind": "garth", "oauth2_token": bad}))
        .send()
        .await
        .assert_problem(422, "validation_failed");
    let mut bad = garth_ng_oauth2("b");
    bad["expires_at"] = json!(-1.5);
    let p = app.put(&tokens_path("ng2")).json(json!({"kind": "garth", "oauth2_token": bad})).send().await;
    p.assert_problem(422, "validation_failed");
    assert_eq!(p.json["field"], "oauth2_token.expires_at");
    app.put(&tokens_path("ng2"))
        .json(json!({"kind": "garth", "garth_dump": b64(&json!([]))}))
        .send()
        .await
        .assert_problem(422, "validation_failed");
    assert_eq!(app.get(&tokens_path("ng2")).send().await.json["version"], 1);
}

/// garth 0.8's objects form with non-integral float expiries (as garth-ng's `time.time()` sums
/// give them): accepted and truncated to seconds.
#[tokio::test]
async fn non_integral_float_expiries_are_truncated_to_seconds() {
    let app = TestApp::spawn().await;
    let (e, re) = (future(3600), future(86_400));
    let mut o2 = oauth2("f");
    o2["expires_at"] = serde_json::from_str(&format!("{e}.75")).unwrap();
    o2["refresh_token_expires_at"] = serde_json::from_str(&format!("{re}.5")).unwrap();
    let r = app
        .put(&tokens_path("fl"))
        .json(json!({"kind": "garth", "oauth1_token": oauth1("f"), "oauth2_token": o2}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(unix_of(&r.json["access_expires_at"]), e);
    assert_eq!(unix_of(&r.json["refresh_expires_at"]), re);
    let g = app.get(&tokens_path("fl")).send().await;
    assert_eq!(g.json["oauth2_token"]["expires_at"].to_string(), format!("{e}.75"));
}

/// python-garminconnect's `Client.dumps()` string is accepted as `garminconnect_dump` and given
/// back byte for byte; the three-field form gets a dump in `json.dumps`'s own spelling.
#[tokio::test]
async fn garminconnect_dump_round_trips_byte_exactly() {
    let app = TestApp::spawn().await;
    let (exp, rexp) = (future(3600), future(86_400 * 30));
    let (at, rt) = (jwt(exp, "gcd-acc"), jwt(rexp, "gcd-ref"));
    let dump = format!(r#"{{"di_token": "{at}", "di_refresh_token": "{rt}", "di_client_id": "GCM_ANDROID_DARK"}}"#);
    let r =
        app.put(&tokens_path("gcd")).json(json!({"kind": "garminconnect", "garminconnect_dump": dump})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["kind"], "garminconnect");
    assert_eq!(r.json["refreshable"], true);
    assert_eq!(unix_of(&r.json["access_expires_at"]), exp);
    assert_eq!(unix_of(&r.json["refresh_expires_at"]), rexp);
    let g = app.get(&format!("{}?representation=garminconnect_dump", tokens_path("gcd"))).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.json["garminconnect_dump"], dump, "byte for byte");
    assert!(g.json.get("di_token").is_none());
    let g = app.get(&tokens_path("gcd")).send().await;
    assert_eq!(g.json["di_token"], at);
    assert_eq!(g.json["di_refresh_token"], rt);
    assert!(g.json.get("garminconnect_dump").is_none());
    // The fields form, read as a dump.
    let body = json!({"kind": "garminconnect", "di_token": at, "di_refresh_token": rt, "di_client_id": "c"});
    assert_eq!(app.put(&tokens_path("gcf")).json(body).send().await.status, 201);
    let g = app.get(&format!("{}?representation=garminconnect_dump", tokens_path("gcf"))).send().await;
    assert_eq!(
        g.json["garminconnect_dump"],
        format!(r#"{{"di_token": "{at}", "di_refresh_token": "{rt}", "di_client_id": "c"}}"#)
    );
    // garth_dump of a DI bundle and garminconnect_dump of a garth one are refused.
    app.get(&format!("{}?representation=garth_dump", tokens_path("gcf")))
        .send()
        .await
        .assert_problem(422, "validation_failed");
    assert_eq!(app.put(&tokens_path("g")).json(garth_body("g")).send().await.status, 201);
    app.get(&format!("{}?representation=garminconnect_dump", tokens_path("g")))
        .send()
        .await
        .assert_problem(422, "validation_failed");
    // Bad dumps name the field and change nothing.
    for bad in [
        "not json",
        "[1]",
        r#"{"di_refresh_token": "r", "di_client_id": "c"}"#,
        r#"{"di_token": "a", "di_refresh_token": "r", "di_client_id": "c", "x": 1}"#,
        r#"{"di_token": "a", "di_token": "b", "di_refresh_token": "r", "di_client_id": "c"}"#,
    ] {
        let p =
            app.put(&tokens_path("gcd")).json(json!({"kind": "garminconnect", "garminconnect_dump": bad})).send().await;
        p.assert_problem(422, "validation_failed");
        assert!(p.json["field"].as_str().unwrap().starts_with("garminconnect_dump"), "{}", p.text);
    }
    assert_eq!(app.get(&tokens_path("gcd")).send().await.json["version"], 1);
}

/// A garminconnect login that fell back to the web JWT has no refresh token (and maybe no client
/// id): accepted in both forms, it ends when the access token does, and says it cannot be
/// refreshed.
#[tokio::test]
async fn garminconnect_without_refresh_token_is_not_refreshable() {
    let app = TestApp::spawn().await;
    let exp = future(3600);
    let at = jwt(exp, "norefresh");
    let body = json!({"kind": "garminconnect", "di_token": at, "di_refresh_token": null, "di_client_id": null});
    let r = app.put(&tokens_path("nr")).json(body).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["refreshable"], false);
    assert_eq!(unix_of(&r.json["refresh_expires_at"]), exp, "the login ends with the access token");
    let g = app.get(&tokens_path("nr")).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.json["refreshable"], false);
    assert!(g.json["di_refresh_token"].is_null() && g.json.get("di_refresh_token").is_some(), "{}", g.text);
    assert!(g.json["di_client_id"].is_null() && g.json.get("di_client_id").is_some());
    let g = app.get(&format!("{}?representation=garminconnect_dump", tokens_path("nr"))).send().await;
    assert_eq!(
        g.json["garminconnect_dump"],
        format!(r#"{{"di_token": "{at}", "di_refresh_token": null, "di_client_id": null}}"#)
    );
    let dump = format!(r#"{{"di_token": "{at}", "di_refresh_token": null, "di_client_id": null}}"#);
    let r =
        app.put(&tokens_path("nr2")).json(json!({"kind": "garminconnect", "garminconnect_dump": dump})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["refreshable"], false);
    // The key must still be there (null when there is none).
    let p = app
        .put(&tokens_path("nr3"))
        .json(json!({"kind": "garminconnect", "di_token": at, "di_client_id": null}))
        .send()
        .await;
    p.assert_problem(422, "validation_failed");
    assert_eq!(p.json["field"], "di_refresh_token");
}
