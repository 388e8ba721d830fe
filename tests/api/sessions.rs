//! Login sessions: `/api/v1/sessions`, `/api/v1/users/{user_id}/sessions`, their state machine,
//! supersession, read-time expiry, auth-status, logout and their audit trail.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const STATES: [&str; 8] =
    ["started", "mfa_required", "mfa_verified", "authenticated", "failed", "cancelled", "expired", "superseded"];

fn session_path(s: &Value) -> String {
    format!("/api/v1/sessions/{}", s["id"].as_str().unwrap())
}

fn transition_path(s: &Value) -> String {
    format!("{}/transition", session_path(s))
}

fn challenge_path(c: &Value) -> String {
    format!("/api/v1/mfa/challenges/{}", c["id"].as_str().unwrap())
}

async fn transition(app: &TestApp, s: &Value, to: &str) -> TestResponse {
    app.post(&transition_path(s)).json(json!({"to": to})).send().await
}

#[track_caller]
fn assert_invalid_transition(r: &TestResponse, from: &str, to: &str) {
    r.assert_problem(409, "invalid_transition");
    assert_eq!(r.json["from"], from, "{}", r.text);
    assert_eq!(r.json["to"], to, "{}", r.text);
}

#[tokio::test]
async fn create_get_and_list_a_session() {
    let app = TestApp::spawn().await;
    let before = chrono::Utc::now();
    let r = app
        .post("/api/v1/sessions")
        .json(json!({"user_id": "alice", "client": {"ip": "203.0.113.7", "user_agent": "GarminSync/2.1"}}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let s = r.json;
    let id = uuid_of(&s["id"]);
    assert_eq!(id.get_version_num(), 7, "ids are UUIDv7");
    assert_eq!(s["user_id"], "alice");
    assert_eq!(s["state"], "started");
    assert!(s["challenge_id"].is_null(), "{s}");
    let created = time_of(&s["created_at"]);
    assert_eq!(time_of(&s["updated_at"]), created);
    assert!(created >= before - chrono::Duration::seconds(1) && created <= chrono::Utc::now());
    assert_eq!(time_of(&s["expires_at"]) - created, chrono::Duration::seconds(900), "default TTL is 900 s");

    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    for f in ["id", "user_id", "state", "challenge_id", "created_at", "updated_at", "expires_at"] {
        assert_eq!(g.json[f], s[f], "GET returns the same {f}");
    }
    assert_eq!(app.session_state_in_db(id).await.as_deref(), Some("started"));

    let l = app.get("/api/v1/users/alice/sessions").send().await;
    assert_eq!(l.status, 200, "{}", l.text);
    assert_eq!(l.json["user_id"], "alice");
    let list = l.json["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", l.text);
    assert_eq!(list[0]["id"], s["id"]);
    assert_eq!(list[0]["state"], "started");

    // A user with no session: an empty list, not a 404.
    let none = app.get("/api/v1/users/nobody/sessions").send().await;
    assert_eq!(none.status, 200, "{}", none.text);
    assert_eq!(none.json, json!({"user_id": "nobody", "sessions": []}));

    // A chosen TTL.
    let short = app.new_session("bob", Some(60)).await;
    assert_eq!(time_of(&short["expires_at"]) - time_of(&short["created_at"]), chrono::Duration::seconds(60));
    let max = app.new_session("carol", Some(86_400)).await;
    assert_eq!(time_of(&max["expires_at"]) - time_of(&max["created_at"]), chrono::Duration::seconds(86_400));
}

#[tokio::test]
async fn user_sessions_list_only_active_ones_newest_first() {
    let app = TestApp::spawn().await;
    let first = app.new_session("olga", None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = app.new_session("olga", None).await;
    // Only the newest is active (the first was superseded).
    let l = app.get("/api/v1/users/olga/sessions").send().await;
    let ids: Vec<&Value> = l.json["sessions"].as_array().unwrap().iter().map(|s| &s["id"]).collect();
    assert_eq!(ids, vec![&second["id"]], "{}", l.text);
    // Two active ones at once (only possible by editing the database): newest first.
    app.exec("UPDATE sessions SET state = 'started', reason = NULL WHERE user_id = 'olga'").await;
    let l = app.get("/api/v1/users/olga/sessions").send().await;
    let ids: Vec<&Value> = l.json["sessions"].as_array().unwrap().iter().map(|s| &s["id"]).collect();
    assert_eq!(ids, vec![&second["id"], &first["id"]], "{}", l.text);
    // Another user's sessions never show up; a session past its TTL is not active.
    app.new_session("peter", None).await;
    let l = app.get("/api/v1/users/olga/sessions").send().await;
    assert_eq!(l.json["sessions"].as_array().unwrap().len(), 2);
    let gone = app.new_session("quinn", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let l = app.get("/api/v1/users/quinn/sessions").send().await;
    assert_eq!(l.json["sessions"], json!([]), "an expired session is not listed: {}", l.text);
    assert_eq!(app.get(&session_path(&gone)).send().await.json["state"], "expired");
}

#[tokio::test]
async fn a_new_session_supersedes_older_ones_and_cancels_their_challenges() {
    let app = TestApp::spawn().await;
    let old = app.new_session("sam", None).await;
    let ch = app.new_challenge("sam", Some(&old)).await;
    assert_eq!(ch["session_id"], old["id"]);
    assert_eq!(ch["status"], "pending");
    let g = app.get(&session_path(&old)).send().await;
    assert_eq!(g.json["state"], "mfa_required", "a challenge moves its session to mfa_required: {}", g.text);
    assert_eq!(g.json["challenge_id"], ch["id"]);
    // A challenge of the same user not linked to any session is ended too.
    let loose = app.new_challenge("sam", None).await;
    // Another user's flows are untouched.
    let other = app.new_session("tina", None).await;
    let other_ch = app.new_challenge("tina", Some(&other)).await;

    let audit_before = app.audit().await.len();
    let new = app.new_session("sam", None).await;
    assert_eq!(new["state"], "started");
    assert_ne!(new["id"], old["id"]);

    let g = app.get(&session_path(&old)).send().await;
    assert_eq!(g.json["state"], "superseded", "{}", g.text);
    assert_eq!(app.session_state_in_db(uuid_of(&old["id"])).await.as_deref(), Some("superseded"));
    for c in [&ch, &loose] {
        let g = app.get(&challenge_path(c)).send().await;
        assert_eq!(g.status, 200, "{}", g.text);
        assert_eq!(g.json["status"], "cancelled", "{}", g.text);
        assert_eq!(app.challenge_in_db(uuid_of(&c["id"])).await.unwrap().0, "cancelled");
    }
    assert_eq!(app.get(&session_path(&other)).send().await.json["state"], "mfa_required");
    assert_eq!(app.get(&challenge_path(&other_ch)).send().await.json["status"], "pending");
    let l = app.get("/api/v1/users/sam/sessions").send().await;
    let ids: Vec<&Value> = l.json["sessions"].as_array().unwrap().iter().map(|s| &s["id"]).collect();
    assert_eq!(ids, vec![&new["id"]]);

    // A superseded session moves no further.
    assert_invalid_transition(&transition(&app, &old, "mfa_verified").await, "superseded", "mfa_verified");

    // Audit: the supersession, the two cancellations and the creation, in one go.
    let events = app.audit().await;
    let new_events = &events[audit_before..];
    let sup: Vec<_> = new_events.iter().filter(|e| e.type_ == "session.transition").collect();
    assert_eq!(sup.len(), 1, "{new_events:?}");
    let d = details(sup[0]);
    assert_eq!(d["session_id"], old["id"]);
    assert_eq!((d["from"].as_str(), d["to"].as_str()), (Some("mfa_required"), Some("superseded")));
    assert_eq!(sup[0].user_id.as_deref(), Some("sam"));
    let cancelled: Vec<Value> = new_events
        .iter()
        .filter(|e| e.type_ == "challenge.cancelled")
        .map(|e| details(e)["challenge_id"].clone())
        .collect();
    assert_eq!(cancelled.len(), 2, "{new_events:?}");
    assert!(cancelled.contains(&ch["id"]) && cancelled.contains(&loose["id"]));
    let created: Vec<_> = new_events.iter().filter(|e| e.type_ == "session.created").collect();
    assert_eq!(created.len(), 1);
    assert_eq!(details(created[0])["session_id"], new["id"]);
}

#[tokio::test]
async fn transitions_follow_the_state_machine() {
    let app = TestApp::spawn().await;
    // started → mfa_required → (not authenticated) → mfa_verified → authenticated.
    let s = app.new_session("uma", None).await;
    let r = transition(&app, &s, "mfa_required").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["state"], "mfa_required");
    assert_eq!(r.json["id"], s["id"]);
    assert!(time_of(&r.json["updated_at"]) >= time_of(&s["updated_at"]));
    assert_invalid_transition(&transition(&app, &s, "authenticated").await, "mfa_required", "authenticated");
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "mfa_required", "a refused move changes nothing");
    assert_invalid_transition(&transition(&app, &s, "started").await, "mfa_required", "started");
    let r = app.post(&transition_path(&s)).json(json!({"to": "mfa_verified", "reason": "code ok"})).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["state"], "mfa_verified");
    assert_invalid_transition(&transition(&app, &s, "mfa_required").await, "mfa_verified", "mfa_required");
    let r = transition(&app, &s, "authenticated").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["state"], "authenticated");
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("authenticated"));
    // Terminal: nothing moves it, not even to itself or to cancelled.
    for to in STATES {
        assert_invalid_transition(&transition(&app, &s, to).await, "authenticated", to);
    }
    // An authenticated session is no longer active.
    assert_eq!(app.get("/api/v1/users/uma/sessions").send().await.json["sessions"], json!([]));

    // started → authenticated directly (no MFA needed).
    let s = app.new_session("vic", None).await;
    assert_invalid_transition(&transition(&app, &s, "mfa_verified").await, "started", "mfa_verified");
    assert_eq!(transition(&app, &s, "authenticated").await.json["state"], "authenticated");

    // Every non-terminal state may fail, be cancelled, expire or be superseded; each is terminal.
    for end in ["failed", "cancelled", "expired", "superseded"] {
        for steps in [&[][..], &["mfa_required"], &["mfa_required", "mfa_verified"]] {
            let s = app.new_session("walt", None).await;
            for step in steps {
                assert_eq!(transition(&app, &s, step).await.status, 200);
            }
            let from = steps.last().copied().unwrap_or("started");
            assert_eq!(app.get(&session_path(&s)).send().await.json["state"], from);
            let r = transition(&app, &s, end).await;
            assert_eq!(r.status, 200, "{from} → {end}: {}", r.text);
            assert_eq!(r.json["state"], end);
            for to in STATES {
                assert_invalid_transition(&transition(&app, &s, to).await, end, to);
            }
        }
    }
}

#[tokio::test]
async fn a_transition_with_a_reason_keeps_it_and_ends_the_sessions_challenges() {
    let app = TestApp::spawn().await;
    let s = app.new_session("xena", None).await;
    let ch = app.new_challenge("xena", Some(&s)).await;
    let r = app.post(&transition_path(&s)).json(json!({"to": "failed", "reason": "garmin said no"})).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["state"], "failed");
    assert_eq!(r.json["reason"], "garmin said no");
    assert_eq!(app.get(&challenge_path(&ch)).send().await.json["status"], "cancelled", "a failed flow's code is dead");
    let e = app.audit().await.into_iter().rfind(|e| e.type_ == "session.transition").unwrap();
    let d = details(&e);
    assert_eq!((d["from"].as_str(), d["to"].as_str()), (Some("mfa_required"), Some("failed")));
    assert_eq!(d["reason"], "garmin said no");
}

#[tokio::test]
async fn bad_transition_requests_are_refused() {
    let app = TestApp::spawn().await;
    let s = app.new_session("yuri", None).await;
    let p = transition_path(&s);
    app.post(&p).json(json!({"to": "logged_in"})).send().await.assert_problem(422, "validation_failed");
    app.post(&p).json(json!({"to": "STARTED"})).send().await.assert_problem(422, "validation_failed");
    app.post(&p).json(json!({})).send().await.assert_problem(422, "validation_failed");
    app.post(&p).json(json!({"to": 3})).send().await.assert_problem(422, "validation_failed");
    app.post(&p).json(json!({"to": "failed", "extra": 1})).send().await.assert_problem(422, "validation_failed");
    let r = app.post(&p).json(json!({"to": "failed", "reason": "x".repeat(201)})).send().await;
    r.assert_problem(422, "validation_failed");
    assert_eq!(r.json["field"], "reason");
    let r = app.post(&p).raw_body("application/json", "{\"to\": ").send().await;
    r.assert_problem(422, "validation_failed");
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "started", "nothing moved");
    assert!(app.audit().await.iter().all(|e| e.type_ != "session.transition"));
}

#[tokio::test]
async fn delete_cancels_and_is_idempotent() {
    let app = TestApp::spawn().await;
    let s = app.new_session("zoe", None).await;
    let ch = app.new_challenge("zoe", Some(&s)).await;
    let r = app.delete(&session_path(&s)).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.status, 200);
    assert_eq!(g.json["state"], "cancelled");
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("cancelled"));
    assert_eq!(app.get(&challenge_path(&ch)).send().await.json["status"], "cancelled");
    let audit_len = app.audit().await.len();
    let r = app.delete(&session_path(&s)).send().await;
    assert_eq!(r.status, 204, "a second DELETE is still 204: {}", r.text);
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "cancelled");
    assert!(
        app.audit().await[audit_len..].iter().all(|e| e.type_ != "session.transition"),
        "cancelling twice records one transition"
    );
    assert_invalid_transition(&transition(&app, &s, "mfa_required").await, "cancelled", "mfa_required");
}

#[tokio::test]
async fn unknown_and_malformed_session_ids() {
    let app = TestApp::spawn().await;
    let unknown = format!("/api/v1/sessions/{}", uuid::Uuid::now_v7());
    app.get(&unknown).send().await.assert_problem(404, "session_not_found");
    app.delete(&unknown).send().await.assert_problem(404, "session_not_found");
    app.post(&format!("{unknown}/transition"))
        .json(json!({"to": "cancelled"}))
        .send()
        .await
        .assert_problem(404, "session_not_found");
    for bad in ["not-a-uuid", "1234", "00000000-0000-0000-0000-00000000000g"] {
        let p = format!("/api/v1/sessions/{bad}");
        app.get(&p).send().await.assert_problem(422, "validation_failed");
        app.delete(&p).send().await.assert_problem(422, "validation_failed");
        app.post(&format!("{p}/transition"))
            .json(json!({"to": "cancelled"}))
            .send()
            .await
            .assert_problem(422, "validation_failed");
    }
}

#[tokio::test]
async fn a_session_past_its_ttl_reads_expired_before_any_sweeper() {
    let app = TestApp::spawn().await;
    let s = app.new_session("amy", Some(1)).await;
    assert_eq!(s["state"], "started");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.json["state"], "expired", "{}", g.text);
    // No sweeper ran: the row itself is unchanged, the expiry is applied when read.
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("started"));
    for to in ["mfa_required", "authenticated", "failed"] {
        assert_invalid_transition(&transition(&app, &s, to).await, "expired", to);
    }
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("started"));
    // It cannot be given a challenge either.
    let r = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "amy", "session_id": s["id"], "method": "email",
                     "destination": "a@example.com", "verifier": "service"}))
        .send()
        .await;
    assert_invalid_transition(&r, "expired", "mfa_required");
}

async fn auth_status(app: &TestApp, key: &str) -> Value {
    let r = app.get("/api/v1/users/ben/auth-status").key(key).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

#[tokio::test]
async fn auth_status_reports_mfa_pending_then_valid() {
    let app = TestApp::spawn().await;
    let reader = app.key("tokens:read").await;
    let a = auth_status(&app, &reader).await;
    assert_eq!(a["status"], "MISSING", "{a}");
    assert!(a["session"].is_null() && a["tokens"].is_null(), "{a}");

    // A flow that has only started is not waiting for MFA yet.
    let s = app.new_session("ben", None).await;
    let a = auth_status(&app, &reader).await;
    assert_eq!(a["status"], "MISSING", "{a}");
    assert_eq!(a["session"]["id"], s["id"]);

    let ch = app.new_challenge("ben", Some(&s)).await;
    let a = auth_status(&app, &reader).await;
    assert_eq!(a["user_id"], "ben");
    assert_eq!(a["status"], "MFA_PENDING", "{a}");
    assert!(a["tokens"].is_null(), "{a}");
    assert_eq!(a["session"]["id"], s["id"]);
    assert_eq!(a["session"]["state"], "mfa_required");
    assert_eq!(a["session"]["challenge_id"], ch["id"]);
    assert_eq!(a["session"]["user_id"], "ben");

    let put = app.put(&tokens_path("ben")).json(garth_body("ben")).send().await;
    assert_eq!(put.status, 201, "{}", put.text);
    let a = auth_status(&app, &reader).await;
    assert_eq!(a["status"], "VALID", "{a}");
    assert_eq!(a["tokens"]["version"], 1);
    assert_eq!(a["tokens"]["status"], "valid");
    assert!(!a.to_string().contains("SECRET"), "auth-status shows no token value: {a}");
}

#[tokio::test]
async fn logout_cancels_active_sessions_and_pending_challenges() {
    let app = TestApp::spawn().await;
    assert_eq!(app.put(&tokens_path("cleo")).json(garth_body("cleo")).send().await.status, 201);
    let s = app.new_session("cleo", None).await;
    let ch = app.new_challenge("cleo", Some(&s)).await;
    let loose = app.new_challenge("cleo", None).await;
    // An already finished session stays as it was.
    let other_user = app.new_session("dora", None).await;

    let r = app.delete(&tokens_path("cleo")).send().await;
    assert_eq!(r.status, 204, "{}", r.text);
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.json["state"], "cancelled", "{}", g.text);
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("cancelled"));
    for c in [&ch, &loose] {
        assert_eq!(app.get(&challenge_path(c)).send().await.json["status"], "cancelled");
        assert_eq!(app.challenge_in_db(uuid_of(&c["id"])).await.unwrap().0, "cancelled");
    }
    assert_eq!(app.get("/api/v1/users/cleo/sessions").send().await.json["sessions"], json!([]));
    assert_eq!(app.get(&session_path(&other_user)).send().await.json["state"], "started");
    let a = app.get("/api/v1/users/cleo/auth-status").send().await;
    assert_eq!(a.json["status"], "MISSING", "{}", a.text);
    assert!(a.json["session"].is_null());
    let t = app
        .audit()
        .await
        .into_iter()
        .filter(|e| e.type_ == "session.transition" && e.user_id.as_deref() == Some("cleo"))
        .map(|e| details(&e))
        .collect::<Vec<_>>();
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!((t[1]["from"].as_str(), t[1]["to"].as_str()), (Some("mfa_required"), Some("cancelled")));
    assert_eq!(t[1]["reason"], "logout");

    // Logout with nothing stored still ends the flows (and is 204).
    let s = app.new_session("eve", None).await;
    assert_eq!(app.delete(&tokens_path("eve")).send().await.status, 204);
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "cancelled");
}

#[tokio::test]
async fn session_changes_are_audited_without_secrets() {
    let app = TestApp::spawn().await;
    let start = app.audit().await.len();
    let r = app
        .post("/api/v1/sessions")
        .header("x-request-id", "req-sess-1")
        .json(json!({"user_id": "fay", "ttl_seconds": 600, "client": {"ip": "198.51.100.4", "user_agent": "ua"}}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s = r.json;
    let code = "Q7Z9SECRETCODE";
    let c = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "fay", "session_id": s["id"], "method": "email", "destination": "fay@example.com",
                     "verifier": "service", "code": code}))
        .send()
        .await;
    assert_eq!(c.status, 201, "{}", c.text);
    let resume = "RESUME-STATE-SECRET-garth-pickle";
    let s2 = app.new_session("fay", None).await; // supersedes the first one
    let c2 = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "fay", "session_id": s2["id"], "method": "sms", "destination": "+1 555 0100 1234",
                     "verifier": "external", "resume_state": resume}))
        .send()
        .await;
    assert_eq!(c2.status, 201, "{}", c2.text);
    assert_eq!(transition(&app, &s2, "mfa_verified").await.status, 200);
    assert_eq!(transition(&app, &s2, "authenticated").await.status, 200);
    assert_eq!(transition(&app, &s2, "cancelled").await.status, 409);

    let events = app.audit().await;
    let events = &events[start..];
    let created: Vec<_> = events.iter().filter(|e| e.type_ == "session.created").collect();
    assert_eq!(created.len(), 2);
    assert_eq!(details(created[0])["session_id"], s["id"]);
    assert_eq!(created[0].user_id.as_deref(), Some("fay"));
    assert_eq!(created[0].outcome, "success");
    assert_eq!(created[0].request_id.as_deref(), Some("req-sess-1"));
    assert!(created[0].actor.as_deref().is_some_and(|a| a.starts_with("key:")), "{:?}", created[0].actor);
    let moves: Vec<(String, String, String)> = events
        .iter()
        .filter(|e| e.type_ == "session.transition")
        .map(|e| {
            let d = details(e);
            (d["session_id"].as_str().unwrap().to_string(), d["from"].to_string(), d["to"].to_string())
        })
        .collect();
    let sid = |v: &Value| v["id"].as_str().unwrap().to_string();
    let q = |s: &str| format!("\"{s}\"");
    assert_eq!(
        moves,
        vec![
            (sid(&s), q("started"), q("mfa_required")),
            (sid(&s), q("mfa_required"), q("superseded")),
            (sid(&s2), q("started"), q("mfa_required")),
            (sid(&s2), q("mfa_required"), q("mfa_verified")),
            (sid(&s2), q("mfa_verified"), q("authenticated")),
        ],
        "one session.transition per move, none for the refused one"
    );
    for e in app.audit().await {
        let all = format!("{} {:?} {:?} {:?}", e.details, e.actor, e.request_id, e.user_id);
        for secret in [code, resume, ADMIN_KEY, "fay@example.com", "0100 1234"] {
            assert!(!all.contains(secret), "audit event {} holds {secret}: {all}", e.type_);
        }
        assert!(!e.details.contains("$argon2"), "no hash in audit: {}", e.details);
    }
}

#[tokio::test]
async fn session_requests_are_validated() {
    let app = TestApp::spawn().await;
    for ttl in [json!(0), json!(86_401), json!(-5)] {
        let r = app.post("/api/v1/sessions").json(json!({"user_id": "gil", "ttl_seconds": ttl})).send().await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], "ttl_seconds", "{}", r.text);
    }
    for user in [json!(""), json!("bad user"), json!("a/b"), json!("x".repeat(129)), json!("é")] {
        let r = app.post("/api/v1/sessions").json(json!({"user_id": user})).send().await;
        r.assert_problem(422, "validation_failed");
        assert_eq!(r.json["field"], "user_id", "{}", r.text);
    }
    let bad = [
        json!({"user_id": "gil", "admin": true}),
        json!({"user_id": "gil", "ttl_seconds": "60"}),
        json!({"user_id": 42}),
        json!({"ttl_seconds": 60}),
        json!(["gil"]),
    ];
    for body in bad {
        app.post("/api/v1/sessions").json(body).send().await.assert_problem(422, "validation_failed");
    }
    let r = app.post("/api/v1/sessions").json(json!({"user_id": "gil", "client": {"user_agent": "u\nx"}})).send().await;
    r.assert_problem(422, "validation_failed");
    let r = app.post("/api/v1/sessions").raw_body("text/plain", "{\"user_id\": \"gil\"}").send().await;
    r.assert_problem(415, "unsupported_media_type");
    app.get("/api/v1/users/bad%20user/sessions").send().await.assert_problem(422, "validation_failed");
    // Nothing was created by any of these.
    assert_eq!(app.get("/api/v1/users/gil/sessions").send().await.json["sessions"], json!([]));
    assert!(app.audit().await.iter().all(|e| e.type_ != "session.created"));
    // The longest valid user id and TTL are fine.
    let long = "u".repeat(128);
    let r = app.post("/api/v1/sessions").json(json!({"user_id": long, "ttl_seconds": 86_400})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test]
async fn sessions_need_the_sessions_scope() {
    let app = TestApp::spawn().await;
    let s = app.new_session("hal", None).await;
    let reader = app.key("tokens:read").await;
    let before = app.audit().await.len();
    let forbidden = [
        app.post("/api/v1/sessions").key(&reader).json(json!({"user_id": "hal"})).send().await,
        app.get(&session_path(&s)).key(&reader).send().await,
        app.get("/api/v1/users/hal/sessions").key(&reader).send().await,
        app.post(&transition_path(&s)).key(&reader).json(json!({"to": "cancelled"})).send().await,
        app.delete(&session_path(&s)).key(&reader).send().await,
    ];
    for r in &forbidden {
        r.assert_problem(403, "forbidden");
        assert_eq!(r.json["required_scope"], "sessions", "{}", r.text);
    }
    let denials = app.audit().await[before..].iter().filter(|e| e.type_ == "auth.denied").count();
    assert_eq!(denials, forbidden.len(), "every 403 is audited");
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "started", "nothing changed");
    app.get(&session_path(&s)).no_auth().send().await.assert_problem(401, "unauthenticated");
    app.post("/api/v1/sessions")
        .key("cdbm_not_a_real_key")
        .json(json!({"user_id": "hal"}))
        .send()
        .await
        .assert_problem(401, "unauthenticated");
    // A key with just `sessions` may do all of it.
    let key = app.key("sessions").await;
    let r = app.post("/api/v1/sessions").key(&key).json(json!({"user_id": "hal"})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.get(&session_path(&r.json)).key(&key).send().await.status, 200);
    assert_eq!(app.get("/api/v1/users/hal/sessions").key(&key).send().await.status, 200);
    assert_eq!(
        app.post(&transition_path(&r.json)).key(&key).json(json!({"to": "mfa_required"})).send().await.status,
        200
    );
    assert_eq!(app.delete(&session_path(&r.json)).key(&key).send().await.status, 204);
}

/// Terminal states are final: a session that reads `expired` keeps reading `expired`, whatever
/// happens to the user's other flows afterwards.
#[tokio::test]
async fn an_expired_session_stays_expired_when_superseded_or_logged_out() {
    let app = TestApp::spawn().await;
    let s = app.new_session("ida", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "expired");
    let before = app.audit().await.len();
    // A new login supersedes the user's active flows: this one is not active any more.
    app.new_session("ida", None).await;
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.json["state"], "expired", "an expired session became {}: {}", g.json["state"], g.text);
    // Logout cancels active flows: not this one either.
    assert_eq!(app.delete(&tokens_path("ida")).send().await.status, 204);
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.json["state"], "expired", "an expired session became {}: {}", g.json["state"], g.text);
    let sid = s["id"].as_str().unwrap();
    let moved: Vec<Value> = app.audit().await[before..]
        .iter()
        .filter(|e| e.type_ == "session.transition")
        .map(details)
        .filter(|d| d["session_id"] == sid)
        .collect();
    assert!(moved.iter().all(|d| d["to"] == "expired"), "audited as {moved:?}");
}

/// A code verified after the session's TTL ran out does not move the (expired) session on, and
/// the login flow it belonged to is not handed back as verified.
#[tokio::test]
async fn a_late_code_does_not_revive_an_expired_session() {
    let app = TestApp::spawn().await;
    let s = app.new_session("jon", Some(1)).await;
    let c = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "jon", "session_id": s["id"], "method": "email", "destination": "jon@example.com",
                     "verifier": "service", "code": "246810", "ttl_seconds": 300}))
        .send()
        .await;
    assert_eq!(c.status, 201, "{}", c.text);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "expired");
    let before = app.audit().await.len();
    let v = app.post(&format!("{}/verify", challenge_path(&c.json))).json(json!({"code": "246810"})).send().await;
    let stored = app.session_state_in_db(uuid_of(&s["id"])).await;
    let moved: Vec<Value> =
        app.audit().await[before..].iter().filter(|e| e.type_ == "session.transition").map(details).collect();
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "expired");
    assert!(
        moved.iter().all(|d| d["to"] == "expired") && stored.as_deref() != Some("mfa_verified"),
        "the expired session was moved on by a late code: stored state {stored:?}, transitions {moved:?}, verify answered {} {}",
        v.status,
        v.text
    );
    // The flow has ended: refused as expired (never 200, and never any other error).
    v.assert_problem(410, "challenge_expired");
    assert_eq!(v.json["session_state"], "expired", "{}", v.text);
}

/// A complete login: session, challenge, right code, authenticated, tokens stored.
#[tokio::test]
async fn a_complete_login_flow() {
    let app = TestApp::spawn().await;
    let s = app.new_session("kai", None).await;
    let c = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "kai", "session_id": s["id"], "method": "sms", "destination": "+15550101234",
                     "verifier": "service", "code": "135790"}))
        .send()
        .await;
    assert_eq!(c.status, 201, "{}", c.text);
    let v = app.post(&format!("{}/verify", challenge_path(&c.json))).json(json!({"code": "135790"})).send().await;
    assert_eq!(v.status, 200, "{}", v.text);
    let g = app.get(&session_path(&s)).send().await;
    assert_eq!(g.json["state"], "mfa_verified", "{}", g.text);
    assert_eq!(app.get("/api/v1/users/kai/auth-status").send().await.json["status"], "MFA_PENDING");
    assert_eq!(transition(&app, &s, "authenticated").await.json["state"], "authenticated");
    assert_eq!(app.put(&tokens_path("kai")).json(garth_body("kai")).send().await.status, 201);
    let a = app.get("/api/v1/users/kai/auth-status").send().await;
    assert_eq!(a.json["status"], "VALID");
    assert!(a.json["session"].is_null(), "an authenticated session is no longer active: {}", a.text);
    let moves: Vec<(String, String)> = app
        .audit()
        .await
        .iter()
        .filter(|e| e.type_ == "session.transition")
        .map(|e| {
            let d = details(e);
            (d["from"].as_str().unwrap().to_string(), d["to"].as_str().unwrap().to_string())
        })
        .collect();
    let want = [("started", "mfa_required"), ("mfa_required", "mfa_verified"), ("mfa_verified", "authenticated")];
    assert_eq!(moves, want.map(|(a, b)| (a.to_string(), b.to_string())));
}

/// Many logins of one user at once: exactly one stays active, the others are superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_logins_leave_exactly_one_active_session() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let app = app.clone();
        tasks.push(tokio::spawn(
            async move { app.post("/api/v1/sessions").json(json!({"user_id": "race"})).send().await },
        ));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text);
        ids.push(r.json["id"].clone());
    }
    let l = app.get("/api/v1/users/race/sessions").send().await;
    let active = l.json["sessions"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{}", l.text);
    let mut superseded = 0;
    for id in &ids {
        let g = app.get(&format!("/api/v1/sessions/{}", id.as_str().unwrap())).send().await;
        match g.json["state"].as_str() {
            Some("superseded") => superseded += 1,
            Some("started") => assert_eq!(&active[0]["id"], id),
            other => panic!("unexpected state {other:?}"),
        }
    }
    assert_eq!(superseded, 7);
}

/// Many callers moving one session at once: exactly one move happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transitions_move_a_session_once() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let s = app.new_session("duel", None).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (app, s) = (app.clone(), s.clone());
        let to = if i % 2 == 0 { "authenticated" } else { "failed" };
        tasks.push(tokio::spawn(async move { transition(&app, &s, to).await }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok.push(r.json["state"].clone()),
            409 => assert_eq!(r.json["code"], "invalid_transition", "{}", r.text),
            _ => panic!("{} {}", r.status, r.text),
        }
    }
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], ok[0]);
    let moves = app.audit().await.iter().filter(|e| e.type_ == "session.transition").count();
    assert_eq!(moves, 1);
}

/// An external challenge of `user` linked to `s`, with attempt 1 reserved (code `246810`).
async fn external_with_an_attempt(app: &TestApp, user: &str, s: &Value) -> Value {
    let c = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": user, "session_id": s["id"], "method": "email", "destination": "x@example.com",
                     "verifier": "external", "resume_state": "garth-RESUME-SECRET", "ttl_seconds": 300}))
        .send()
        .await;
    assert_eq!(c.status, 201, "{}", c.text);
    let a = app.post(&format!("{}/attempts", challenge_path(&c.json))).json(json!({"code": "246810"})).send().await;
    assert_eq!(a.status, 201, "{}", a.text);
    c.json
}

/// A late Garmin success does not revive a dead login (issue 15, finding 10). The session's TTL
/// ran out while Garmin checked the code: the `success` result is refused as `/attempts` would
/// be then (410 `challenge_expired` with `session_state`), the challenge ends (`cancelled`,
/// reason `session_expired`, resume state destroyed) and cannot be consumed, the session stays
/// `expired`. A session ended otherwise (cancelled) gives the same: nothing is verified.
#[tokio::test]
async fn a_late_garmin_success_does_not_revive_an_ended_login() {
    let app = TestApp::spawn().await;
    let s = app.new_session("lena", Some(1)).await;
    let c = external_with_an_attempt(&app, "lena", &s).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "expired");
    let before = app.audit().await.len();
    let r = app.post(&format!("{}/attempts/1/result", challenge_path(&c))).json(json!({"success": true})).send().await;
    r.assert_problem(410, "challenge_expired");
    assert_eq!(r.json["session_state"], "expired", "{}", r.text);
    let (status, resume) = app.challenge_in_db(uuid_of(&c["id"])).await.unwrap();
    assert_eq!((status.as_str(), resume), ("cancelled", None));
    assert_ne!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("mfa_verified"));
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "expired");
    let events: Vec<(String, String, Value)> =
        app.audit().await[before..].iter().map(|e| (e.type_.clone(), e.outcome.clone(), details(e))).collect();
    assert!(events.iter().all(|(t, _, _)| t != "challenge.verified"), "{events:?}");
    assert!(
        events.iter().any(|(t, o, d)| t == "challenge.cancelled" && o == "success" && d["reason"] == "session_expired"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|(t, o, d)| t == "challenge.verify"
            && o == "denied"
            && d["reason"] == "challenge_expired"
            && d["session_state"] == "expired"),
        "{events:?}"
    );
    let consume = app.post(&format!("{}/consume", challenge_path(&c))).send().await;
    consume.assert_problem(409, "challenge_not_pending");
    assert_eq!(consume.json["challenge_status"], "cancelled");

    // Cancelled by the caller while Garmin checked the code.
    let s = app.new_session("mila", None).await;
    let c = external_with_an_attempt(&app, "mila", &s).await;
    assert_eq!(app.delete(&session_path(&s)).send().await.status, 204);
    let r = app.post(&format!("{}/attempts/1/result", challenge_path(&c))).json(json!({"success": true})).send().await;
    r.assert_problem(409, "challenge_not_pending");
    assert_eq!(r.json["challenge_status"], "cancelled");
    assert_eq!(app.get(&challenge_path(&c)).send().await.json["status"], "cancelled");
    assert_eq!(app.get(&session_path(&s)).send().await.json["state"], "cancelled");
}

/// A challenge verified in time is not consumed once its login session has ended (here: its TTL
/// ran out before the caller consumed it): 410 `challenge_expired` with `session_state`, and the
/// challenge ends (`cancelled`). `/verify` and `/attempts` of a challenge of an ended login are
/// refused the same way and end it too.
#[tokio::test]
async fn a_challenge_of_an_ended_login_is_not_consumed_nor_checked() {
    let app = TestApp::spawn().await;
    let s = app.new_session("nora", Some(1)).await;
    let c = app
        .post("/api/v1/mfa/challenges")
        .json(json!({"user_id": "nora", "session_id": s["id"], "method": "email", "destination": "n@example.com",
                     "verifier": "service", "code": "135790"}))
        .send()
        .await;
    assert_eq!(c.status, 201, "{}", c.text);
    let v = app.post(&format!("{}/verify", challenge_path(&c.json))).json(json!({"code": "135790"})).send().await;
    assert_eq!(v.status, 200, "{}", v.text);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = app.post(&format!("{}/consume", challenge_path(&c.json))).send().await;
    r.assert_problem(410, "challenge_expired");
    assert_eq!(r.json["session_state"], "expired", "{}", r.text);
    assert_eq!(app.challenge_in_db(uuid_of(&c.json["id"])).await.unwrap().0, "cancelled");
    assert!(app.audit().await.iter().all(|e| e.type_ != "challenge.consumed"));
    assert!(
        app.audit().await.iter().any(|e| e.type_ == "challenge.consume"
            && e.outcome == "denied"
            && details(e)["session_state"] == "expired")
    );

    // `/verify`, `/attempts` and `/consume` of a pending challenge once the session's TTL ran out.
    for (verifier, route) in [("service", "verify"), ("external", "attempts"), ("service", "consume")] {
        let s = app.new_session("olga", Some(1)).await;
        let c = app
            .post("/api/v1/mfa/challenges")
            .json(json!({"user_id": "olga", "session_id": s["id"], "method": "email", "verifier": verifier}))
            .send()
            .await;
        assert_eq!(c.status, 201, "{}", c.text);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut req = app.post(&format!("{}/{route}", challenge_path(&c.json)));
        if route != "consume" {
            req = req.json(json!({"code": "999999"}));
        }
        let r = req.send().await;
        r.assert_problem(410, "challenge_expired");
        assert_eq!(r.json["session_state"], "expired", "{route}: {}", r.text);
        let g = app.get(&challenge_path(&c.json)).send().await;
        assert_eq!(
            (g.json["status"].as_str(), g.json["attempts"].as_i64()),
            (Some("cancelled"), Some(0)),
            "{}",
            g.text
        );
    }
}
