//! The expiry sweeper, driven with `sweep_once(&state, now)` and a `now` in the future instead of
//! sleeping: expiry of challenges, sessions and token bundles, its audit rows, concurrent passes
//! and retention.

use centraldb_mfa::{
    store::{self, Db},
    sweeper::{SweepReport, sweep_once},
};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

fn in_hours(h: i64) -> DateTime<Utc> {
    store::now() + Duration::hours(h)
}

fn in_days(d: i64) -> DateTime<Utc> {
    store::now() + Duration::days(d)
}

/// `SELECT COUNT(*) ... WHERE <col> = $1` on either backend.
async fn count_where(app: &TestApp, sql: &str, id: Uuid) -> i64 {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match app.db() {
        Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.unwrap(),
        Db::Postgres { pool } => sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.unwrap(),
    }
}

/// An externally verified challenge holding a resume state, linked to `session` when given.
async fn external_challenge(app: &TestApp, user: &str, session: Option<&Value>, ttl: i64) -> Value {
    let mut body = json!({"user_id": user, "method": "email", "destination": "x@example.com", "verifier": "external",
                          "resume_state": format!("RESUME-{user}-SECRET"), "ttl_seconds": ttl});
    if let Some(s) = session {
        body["session_id"] = s["id"].clone();
    }
    let r = app.post("/api/v1/mfa/challenges").json(body).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json
}

/// A garth bundle whose refresh token expired a minute ago.
async fn put_dead_bundle(app: &TestApp, user: &str) {
    let oauth2 = oauth2_with(user, future(-120), future(-60));
    let body = json!({"kind": "garth", "oauth1_token": oauth1(user), "oauth2_token": oauth2});
    let r = app.put(&tokens_path(user)).json(body).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["status"], "reauth_required", "{}", r.text);
}

fn events_of<'a>(events: &'a [store::audit::AuditRow], type_: &str) -> Vec<&'a store::audit::AuditRow> {
    events.iter().filter(|e| e.type_ == type_).collect()
}

/// `(session_id, from, to)` of every `session.transition` event.
fn moves(events: &[store::audit::AuditRow]) -> Vec<(String, String, String)> {
    events_of(events, "session.transition")
        .into_iter()
        .map(|e| {
            let d = details(e);
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (s("session_id"), s("from"), s("to"))
        })
        .collect()
}

#[tokio::test]
async fn due_challenges_sessions_and_bundles_expire() {
    let app = TestApp::spawn().await;
    // ann: a login waiting for a code that will never come.
    let s_ann = app.new_session("ann", None).await;
    let c_ann = external_challenge(&app, "ann", Some(&s_ann), 300).await;
    let (status, resume) = app.challenge_in_db(uuid_of(&c_ann["id"])).await.unwrap();
    assert_eq!(status, "pending");
    assert!(resume.is_some(), "the resume state is stored (encrypted) while pending");
    // bob: a session that simply times out.
    let s_bob = app.new_session("bob", Some(60)).await;
    // cat: a bundle past its refresh expiry.
    put_dead_bundle(&app, "cat").await;
    assert!(app.ciphertext("cat").await.is_some());
    // Not due: a long session, a healthy bundle.
    let s_dan = app.new_session("dan", Some(86_400)).await;
    assert_eq!(app.put(&tokens_path("dan")).json(garth_body("dan")).send().await.status, 201);
    let dan_ct = app.ciphertext("dan").await;

    let before = app.audit().await.len();
    let report = sweep_once(&app.state, in_hours(1)).await.unwrap();
    let events = app.audit().await;
    let new = &events[before..];

    // The challenge: expired in the database, its resume state destroyed, audited once.
    let (status, resume) = app.challenge_in_db(uuid_of(&c_ann["id"])).await.unwrap();
    assert_eq!(status, "expired");
    assert!(resume.is_none(), "the resume state is destroyed");
    let expired = events_of(new, "challenge.expired");
    assert_eq!(expired.len(), 1, "{new:?}");
    assert_eq!(details(expired[0])["challenge_id"], c_ann["id"]);
    assert_eq!(details(expired[0])["session_id"], s_ann["id"]);
    assert_eq!(expired[0].user_id.as_deref(), Some("ann"));
    assert_eq!(expired[0].actor.as_deref(), Some("sweeper"));
    assert_eq!(
        app.get(&format!("/api/v1/mfa/challenges/{}", c_ann["id"].as_str().unwrap())).send().await.json["status"],
        "expired"
    );

    // Its session, and the timed-out one: expired, one transition each.
    assert_eq!(app.session_state_in_db(uuid_of(&s_ann["id"])).await.as_deref(), Some("expired"));
    assert_eq!(app.session_state_in_db(uuid_of(&s_bob["id"])).await.as_deref(), Some("expired"));
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let mut m = moves(new);
    m.sort();
    let mut want = vec![
        (id(&s_ann), "mfa_required".to_string(), "expired".to_string()),
        (id(&s_bob), "started".to_string(), "expired".to_string()),
    ];
    want.sort();
    assert_eq!(m, want);

    // The dead bundle: ciphertext gone, `token.expired` once, GET says reauth.
    assert_eq!(app.ciphertext("cat").await, None);
    let t = events_of(new, "token.expired");
    assert_eq!(t.len(), 1, "{new:?}");
    assert_eq!(t[0].user_id.as_deref(), Some("cat"));
    let g = app.get(&tokens_path("cat")).send().await;
    g.assert_problem(410, "reauth_required");
    assert!(!g.text.contains("SECRET"));

    // Nothing else moved.
    assert_eq!(app.session_state_in_db(uuid_of(&s_dan["id"])).await.as_deref(), Some("started"));
    assert_eq!(app.ciphertext("dan").await, dan_ct);
    assert_eq!(app.get(&tokens_path("dan")).send().await.status, 200);
    assert!(events_of(new, "retention.purged").is_empty());
    let types: Vec<&str> = new.iter().map(|e| e.type_.as_str()).collect();
    assert_eq!(types.len(), 4, "exactly the four expiries were audited: {types:?}");
    for e in new {
        assert_eq!(e.outcome, "success");
        assert!(!e.details.contains("SECRET"), "no secret in {}: {}", e.type_, e.details);
    }

    assert_eq!(report.challenges_expired, 1, "{report:?}");
    assert_eq!(report.tokens_expired, 1, "{report:?}");
    assert_eq!(report.purged, 0, "{report:?}");
    assert_eq!(report.sessions_expired, 2, "the timed-out session and the one whose challenge expired: {report:?}");
}

/// The report counts every session the pass expired, also one that expired because its
/// challenge did (it wrote a `session.transition` to `expired` for it).
#[tokio::test]
async fn the_report_counts_every_session_the_pass_expired() {
    let app = TestApp::spawn().await;
    // A long session whose only challenge expires: the session ends with it.
    let s = app.new_session("gus", Some(86_400)).await;
    external_challenge(&app, "gus", Some(&s), 60).await;
    // A short session without a challenge.
    let t = app.new_session("hank", Some(60)).await;
    let before = app.audit().await.len();
    let report = sweep_once(&app.state, in_hours(1)).await.unwrap();
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("expired"));
    assert_eq!(app.session_state_in_db(uuid_of(&t["id"])).await.as_deref(), Some("expired"));
    let expired_moves = moves(&app.audit().await[before..]).into_iter().filter(|m| m.2 == "expired").count();
    assert_eq!(expired_moves, 2);
    assert_eq!(
        report,
        SweepReport {
            challenges_expired: 1,
            sessions_expired: 2,
            tokens_expired: 0,
            purged: 0,
            ..SweepReport::default()
        },
        "two sessions were expired by this pass (two session.transition → expired rows)"
    );
}

#[tokio::test]
async fn a_session_past_its_ttl_cancels_its_live_challenge() {
    let app = TestApp::spawn().await;
    // The session ends before its challenge would.
    let s = app.new_session("ivy", Some(60)).await;
    let c = external_challenge(&app, "ivy", Some(&s), 600).await;
    let before = app.audit().await.len();
    let report = sweep_once(&app.state, store::now() + Duration::seconds(120)).await.unwrap();
    assert_eq!(
        report,
        SweepReport {
            challenges_expired: 0,
            sessions_expired: 1,
            tokens_expired: 0,
            purged: 0,
            ..SweepReport::default()
        }
    );
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("expired"));
    let (status, resume) = app.challenge_in_db(uuid_of(&c["id"])).await.unwrap();
    assert_eq!(status, "cancelled", "the challenge of an expired session cannot be used any more");
    assert!(resume.is_none());
    let new = &app.audit().await[before..];
    assert_eq!(moves(new), vec![(s["id"].as_str().unwrap().to_string(), "mfa_required".into(), "expired".into())]);
    assert_eq!(events_of(new, "challenge.cancelled").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_audit_each_expiry_once() {
    let app = TestApp::spawn().await;
    let mut challenges = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..4 {
        let s = app.new_session(&format!("cs{i}"), None).await;
        challenges.push(external_challenge(&app, &format!("cs{i}"), Some(&s), 300).await);
        sessions.push(s);
        sessions.push(app.new_session(&format!("ts{i}"), Some(60)).await);
        put_dead_bundle(&app, &format!("tb{i}")).await;
    }
    let before = app.audit().await.len();
    let now = in_hours(1);
    // Two passes on two worker threads at once, as two instances would.
    let (sa, sb) = (app.state.clone(), app.state.clone());
    let (a, b) = tokio::join!(
        tokio::spawn(async move { sweep_once(&sa, now).await }),
        tokio::spawn(async move { sweep_once(&sb, now).await })
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    let new = &app.audit().await[before..];

    let mut ch: Vec<String> =
        events_of(new, "challenge.expired").iter().map(|e| details(e)["challenge_id"].to_string()).collect();
    ch.sort();
    let mut want: Vec<String> = challenges.iter().map(|c| c["id"].to_string()).collect();
    want.sort();
    assert_eq!(ch, want, "one challenge.expired per challenge");
    let mut ss: Vec<String> = moves(new).into_iter().map(|m| m.0).collect();
    ss.sort();
    let mut want: Vec<String> = sessions.iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    want.sort();
    assert_eq!(ss, want, "one session.transition per session");
    let mut tb: Vec<String> = events_of(new, "token.expired").iter().map(|e| e.user_id.clone().unwrap()).collect();
    tb.sort();
    assert_eq!(tb, vec!["tb0", "tb1", "tb2", "tb3"], "one token.expired per bundle");
    assert_eq!(new.len(), 4 + 8 + 4, "nothing else was written: {new:?}");
    assert_eq!(a.challenges_expired + b.challenges_expired, 4, "{a:?} {b:?}");
    assert_eq!(a.tokens_expired + b.tokens_expired, 4, "{a:?} {b:?}");
    for s in &sessions {
        assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("expired"));
    }
    for i in 0..4 {
        assert_eq!(app.ciphertext(&format!("tb{i}")).await, None);
    }
    // The audit chain is intact after the race.
    let v = centraldb_mfa::services::audit::verify(app.db(), &app.state.keyring).await.unwrap();
    assert!(v.ok, "{:?}", v.reason);
    assert_eq!(v.events_checked as usize, app.audit().await.len());
}

#[tokio::test]
async fn retention_purges_terminal_records_once() {
    let app = TestApp::spawn().await;
    // Ended now: a cancelled session and its cancelled challenge (with a reserved attempt).
    let old = app.new_session("jo", None).await;
    let old_c = external_challenge(&app, "jo", Some(&old), 300).await;
    let old_cid = uuid_of(&old_c["id"]);
    let r =
        app.post(&format!("/api/v1/mfa/challenges/{old_cid}/attempts")).json(json!({"code": "123456"})).send().await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.delete(&format!("/api/v1/sessions/{}", old["id"].as_str().unwrap())).send().await.status, 204);
    assert_eq!(app.challenge_in_db(old_cid).await.unwrap().0, "cancelled");
    let attempts_sql = "SELECT COUNT(*) FROM challenge_attempts WHERE challenge_id = $1";
    assert_eq!(count_where(&app, attempts_sql, old_cid).await, 1);
    // Still live: another user's session and challenge.
    let live = app.new_session("kim", None).await;
    let live_c = external_challenge(&app, "kim", Some(&live), 300).await;

    // Six days on: the live ones expire (now terminal, as of day 6); nothing is old enough to purge.
    let before = app.audit().await.len();
    let r6 = sweep_once(&app.state, in_days(6)).await.unwrap();
    assert_eq!(
        r6,
        SweepReport {
            challenges_expired: 1,
            sessions_expired: 1,
            tokens_expired: 0,
            purged: 0,
            ..SweepReport::default()
        }
    );
    assert!(events_of(&app.audit().await[before..], "retention.purged").is_empty());
    assert!(app.session_state_in_db(uuid_of(&old["id"])).await.is_some());

    // Eight days on: the records that ended today are older than the 7-day retention.
    let before = app.audit().await.len();
    let r8 = sweep_once(&app.state, in_days(8)).await.unwrap();
    assert_eq!(
        r8,
        SweepReport {
            challenges_expired: 0,
            sessions_expired: 0,
            tokens_expired: 0,
            purged: 2,
            ..SweepReport::default()
        }
    );
    assert_eq!(app.session_state_in_db(uuid_of(&old["id"])).await, None);
    assert_eq!(app.challenge_in_db(old_cid).await, None);
    assert_eq!(count_where(&app, attempts_sql, old_cid).await, 0, "the challenge's attempts go with it");
    app.get(&format!("/api/v1/sessions/{}", old["id"].as_str().unwrap()))
        .send()
        .await
        .assert_problem(404, "session_not_found");
    app.get(&format!("/api/v1/mfa/challenges/{old_cid}")).send().await.assert_problem(404, "challenge_not_found");
    // The ones that ended on day 6 are kept.
    assert_eq!(app.session_state_in_db(uuid_of(&live["id"])).await.as_deref(), Some("expired"));
    assert_eq!(app.challenge_in_db(uuid_of(&live_c["id"])).await.unwrap().0, "expired");
    let new = &app.audit().await[before..];
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].type_, "retention.purged");
    assert_eq!(new[0].user_id, None);
    let d = details(&new[0]);
    assert_eq!((d["challenges"].as_i64(), d["sessions"].as_i64()), (Some(1), Some(1)), "{d}");

    // The same pass again: nothing to do, nothing written.
    let before = app.audit().await.len();
    assert_eq!(sweep_once(&app.state, in_days(8)).await.unwrap(), SweepReport::default());
    assert_eq!(app.audit().await.len(), before);

    // Fourteen days on, the rest goes too.
    let r14 = sweep_once(&app.state, in_days(14)).await.unwrap();
    assert_eq!(r14.purged, 2, "{r14:?}");
    assert_eq!(app.session_state_in_db(uuid_of(&live["id"])).await, None);
    assert_eq!(app.challenge_in_db(uuid_of(&live_c["id"])).await, None);
    assert_eq!(events_of(&app.audit().await, "retention.purged").len(), 2);
}

#[tokio::test]
async fn a_pass_with_nothing_due_is_silent() {
    let app = TestApp::spawn().await;
    // An empty database.
    assert_eq!(sweep_once(&app.state, store::now()).await.unwrap(), SweepReport::default());
    assert_eq!(app.audit().await.len(), 0, "{:?}", app.audit().await);
    // Live records that are not due yet.
    let s = app.new_session("lou", None).await;
    let c = external_challenge(&app, "lou", Some(&s), 300).await;
    assert_eq!(app.put(&tokens_path("lou")).json(garth_body("lou")).send().await.status, 201);
    let before = app.audit().await.len();
    assert_eq!(sweep_once(&app.state, store::now()).await.unwrap(), SweepReport::default());
    assert_eq!(app.audit().await.len(), before);
    assert_eq!(app.session_state_in_db(uuid_of(&s["id"])).await.as_deref(), Some("mfa_required"));
    assert_eq!(app.challenge_in_db(uuid_of(&c["id"])).await.unwrap().0, "pending");
    assert!(app.ciphertext("lou").await.is_some());
    // After a pass that did work, the next one with the same clock finds nothing.
    let later = in_hours(1);
    let first = sweep_once(&app.state, later).await.unwrap();
    assert_eq!(first.challenges_expired, 1, "{first:?}");
    let before = app.audit().await.len();
    assert_eq!(sweep_once(&app.state, later).await.unwrap(), SweepReport::default());
    assert_eq!(app.audit().await.len(), before, "a second pass writes no audit rows");
}
