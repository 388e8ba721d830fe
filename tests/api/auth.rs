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
