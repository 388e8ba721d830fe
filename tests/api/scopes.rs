//! Every scope against every `/api/v1` operation: allowed (the operation's exact success status)
//! where the scope is the operation's own or `admin`, refused everywhere else with 403
//! `forbidden` naming the required scope, one `auth.denied` event from the caller's address and
//! nothing else written. The operations are taken from the running code's OpenAPI document, so
//! a new route without a row in [`ROUTES`] fails the test.

use std::net::{Ipv4Addr, SocketAddr};

use axum::http::Method;
use centraldb_mfa::{domain::Scopes, services::api_keys};
use serde_json::{Value, json};

use crate::helpers::*;

const SCOPES: [&str; 6] = ["tokens:read", "tokens:write", "mfa", "sessions", "audit:read", "admin"];

/// One operation: method, path template, the scope it requires (API.md), its success status,
/// and whether that success writes audit events.
struct Route {
    method: &'static str,
    path: &'static str,
    scope: &'static str,
    ok: u16,
    audited: bool,
}

const fn route(method: &'static str, path: &'static str, scope: &'static str, ok: u16, audited: bool) -> Route {
    Route { method, path, scope, ok, audited }
}

const CH: &str = "/api/v1/mfa/challenges";

const ROUTES: [Route; 24] = [
    route("GET", "/api/v1/audit/events", "audit:read", 200, false),
    route("GET", "/api/v1/audit/verify", "admin", 200, false),
    route("GET", "/api/v1/audit/checkpoint", "audit:read", 200, false),
    route("GET", "/api/v1/audit/public-key", "audit:read", 200, false),
    route("POST", "/api/v1/mfa/challenges", "mfa", 201, true),
    route("GET", "/api/v1/mfa/challenges/{id}", "mfa", 200, false),
    route("DELETE", "/api/v1/mfa/challenges/{id}", "mfa", 204, true),
    route("POST", "/api/v1/mfa/challenges/{id}/attempts", "mfa", 201, true),
    route("POST", "/api/v1/mfa/challenges/{id}/attempts/{n}/result", "mfa", 200, true),
    route("POST", "/api/v1/mfa/challenges/{id}/consume", "mfa", 200, true),
    route("POST", "/api/v1/mfa/challenges/{id}/verify", "mfa", 200, true),
    route("POST", "/api/v1/sessions", "sessions", 201, true),
    route("GET", "/api/v1/sessions/{id}", "sessions", 200, false),
    route("DELETE", "/api/v1/sessions/{id}", "sessions", 204, true),
    route("POST", "/api/v1/sessions/{id}/transition", "sessions", 200, true),
    route("GET", "/api/v1/users/{user_id}/auth-status", "tokens:read", 200, true),
    route("GET", "/api/v1/users/{user_id}/sessions", "sessions", 200, false),
    route("GET", "/api/v1/users/{user_id}/tokens", "tokens:read", 200, true),
    route("PUT", "/api/v1/users/{user_id}/tokens", "tokens:write", 201, true),
    route("DELETE", "/api/v1/users/{user_id}/tokens", "tokens:write", 204, true),
    route("POST", "/api/v1/users/{user_id}/tokens/invalidate", "tokens:write", 204, true),
    route("POST", "/api/v1/users/{user_id}/tokens/lease", "tokens:write", 201, true),
    route("DELETE", "/api/v1/users/{user_id}/tokens/lease", "tokens:write", 204, true),
    route("GET", "/api/v1/users/{user_id}/tokens/metadata", "tokens:read", 200, true),
];

/// A request ready to send for one operation, with whatever it needs already in place.
struct Prepared {
    uri: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

/// Creates (with the admin key) what `route` needs to succeed for `user`, and builds the request.
async fn prepare(app: &TestApp, route: &Route, user: &str) -> Prepared {
    let id_of = |r: &TestResponse| r.json["id"].as_str().unwrap_or_else(|| panic!("no id: {}", r.text)).to_string();
    let challenge = |verifier: &str| {
        let mut body =
            json!({"user_id": user, "method": "email", "destination": "j@example.com", "verifier": verifier});
        match verifier {
            "service" => body["code"] = json!("123456"),
            _ => body["resume_state"] = json!("RESUME-STATE-SECRET"),
        }
        body
    };
    let new = |uri: String| Prepared { uri, body: None, headers: Vec::new() };
    let tokens = tokens_path(user);
    let put_tokens = async {
        let r = app.put(&tokens).json(garth_body(user)).send().await;
        assert_eq!(r.status, 201, "{}", r.text);
    };
    let session_id = |s: Value| s["id"].as_str().unwrap().to_string();
    match route.path {
        "/api/v1/audit/events" => new(format!("{}?limit=5", route.path)),
        "/api/v1/audit/verify" | "/api/v1/audit/checkpoint" | "/api/v1/audit/public-key" => new(route.path.to_string()),
        "/api/v1/mfa/challenges" => Prepared { body: Some(challenge("service")), ..new(CH.into()) },
        "/api/v1/mfa/challenges/{id}" => {
            let c = app.post(CH).json(challenge("service")).send().await;
            assert_eq!(c.status, 201, "{}", c.text);
            new(format!("{CH}/{}", id_of(&c)))
        }
        "/api/v1/mfa/challenges/{id}/attempts" => {
            let c = app.post(CH).json(challenge("external")).send().await;
            assert_eq!(c.status, 201, "{}", c.text);
            Prepared { body: Some(json!({"code": "654321"})), ..new(format!("{CH}/{}/attempts", id_of(&c))) }
        }
        "/api/v1/mfa/challenges/{id}/attempts/{n}/result" => {
            let c = app.post(CH).json(challenge("external")).send().await;
            assert_eq!(c.status, 201, "{}", c.text);
            let id = id_of(&c);
            let a = app.post(&format!("{CH}/{id}/attempts")).json(json!({"code": "654321"})).send().await;
            assert_eq!(a.status, 201, "{}", a.text);
            Prepared { body: Some(json!({"success": true})), ..new(format!("{CH}/{id}/attempts/1/result")) }
        }
        "/api/v1/mfa/challenges/{id}/consume" => {
            let c = app.post(CH).json(challenge("service")).send().await;
            assert_eq!(c.status, 201, "{}", c.text);
            let id = id_of(&c);
            let v = app.post(&format!("{CH}/{id}/verify")).json(json!({"code": "123456"})).send().await;
            assert_eq!(v.status, 200, "{}", v.text);
            new(format!("{CH}/{id}/consume"))
        }
        "/api/v1/mfa/challenges/{id}/verify" => {
            let c = app.post(CH).json(challenge("service")).send().await;
            assert_eq!(c.status, 201, "{}", c.text);
            Prepared { body: Some(json!({"code": "123456"})), ..new(format!("{CH}/{}/verify", id_of(&c))) }
        }
        "/api/v1/sessions" => Prepared { body: Some(json!({"user_id": user})), ..new(route.path.into()) },
        "/api/v1/sessions/{id}" => new(format!("/api/v1/sessions/{}", session_id(app.new_session(user, None).await))),
        "/api/v1/sessions/{id}/transition" => Prepared {
            body: Some(json!({"to": "authenticated"})),
            ..new(format!("/api/v1/sessions/{}/transition", session_id(app.new_session(user, None).await)))
        },
        "/api/v1/users/{user_id}/auth-status" => new(format!("/api/v1/users/{user}/auth-status")),
        "/api/v1/users/{user_id}/sessions" => {
            app.new_session(user, None).await;
            new(format!("/api/v1/users/{user}/sessions"))
        }
        "/api/v1/users/{user_id}/tokens" if route.method == "PUT" => {
            Prepared { body: Some(garth_body(user)), ..new(tokens.clone()) }
        }
        "/api/v1/users/{user_id}/tokens" => {
            put_tokens.await;
            new(tokens.clone())
        }
        "/api/v1/users/{user_id}/tokens/invalidate" => {
            put_tokens.await;
            Prepared { body: Some(json!({"reason": "scope test"})), ..new(format!("{tokens}/invalidate")) }
        }
        "/api/v1/users/{user_id}/tokens/lease" if route.method == "POST" => {
            put_tokens.await;
            Prepared { body: Some(json!({"holder": "worker-1"})), ..new(format!("{tokens}/lease")) }
        }
        "/api/v1/users/{user_id}/tokens/lease" => {
            put_tokens.await;
            let l = app.post(&format!("{tokens}/lease")).json(json!({"holder": "worker-1"})).send().await;
            assert_eq!(l.status, 201, "{}", l.text);
            Prepared { headers: vec![("x-lease-fence", l.json["fence"].to_string())], ..new(format!("{tokens}/lease")) }
        }
        "/api/v1/users/{user_id}/tokens/metadata" => {
            put_tokens.await;
            new(format!("{tokens}/metadata"))
        }
        other => panic!("no fixture for {} {other}", route.method),
    }
}

/// The `/api/v1` operations of the running code's OpenAPI document, with their declared scope.
fn documented_operations() -> Vec<(String, String, Vec<String>)> {
    let doc = serde_json::to_value(centraldb_mfa::api::openapi()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !path.starts_with("/api/v1") || !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let scopes = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["bearer"].as_array())
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            out.push((method.to_uppercase(), path.clone(), scopes));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn the_route_table_covers_every_documented_operation() {
    let mut table: Vec<(String, String)> = ROUTES.iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    table.sort();
    let documented = documented_operations();
    let ops: Vec<(String, String)> = documented.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    assert_eq!(ops, table, "every /api/v1 operation needs a row in scopes::ROUTES (and every row an operation)");
    for (m, p, scopes) in documented {
        let row = ROUTES.iter().find(|r| r.method == m && r.path == p).unwrap();
        assert_eq!(scopes, vec![row.scope.to_string()], "{m} {p}: the documented scope");
    }
}

#[tokio::test]
async fn every_scope_is_allowed_on_its_routes_and_refused_on_every_other() {
    let app = TestApp::spawn().await;
    let mut keys = Vec::new();
    for s in SCOPES {
        let (id, key) = api_keys::create(app.db(), s, &Scopes::parse_list(s).unwrap()).await.unwrap();
        keys.push((s, format!("key:{id}"), secret(&key).to_string()));
    }
    for (ri, route) in ROUTES.iter().enumerate() {
        for (si, (scope, actor, key)) in keys.iter().enumerate() {
            let case = format!("{scope} on {} {}", route.method, route.path);
            let user = format!("sc-{ri}-{si}");
            let prepared = prepare(&app, route, &user).await;
            let peer = SocketAddr::from((Ipv4Addr::new(10, 200, ri as u8, si as u8 + 1), 40_000 + ri as u16));
            let before = app.audit().await.len();
            let mut req = app.request(Method::from_bytes(route.method.as_bytes()).unwrap(), &prepared.uri);
            req = req.key(key).peer(peer);
            for (k, v) in &prepared.headers {
                req = req.header(k, v);
            }
            if let Some(body) = prepared.body {
                req = req.json(body);
            }
            let r = req.send().await;
            let new = app.audit().await.split_off(before);
            let allowed = *scope == route.scope || *scope == "admin";
            if allowed {
                assert_eq!(r.status.as_u16(), route.ok, "{case}: {}", r.text);
                assert_eq!(!new.is_empty(), route.audited, "{case}: audited {new:?}");
                for e in &new {
                    assert_eq!(e.outcome, "success", "{case}: {e:?}");
                    assert_eq!(e.source_ip.as_deref(), Some(peer.ip().to_string().as_str()), "{case}: {e:?}");
                    assert_eq!(e.actor.as_deref(), Some(actor.as_str()), "{case}: {e:?}");
                }
            } else {
                assert_eq!(r.status, 403, "{case}: {}", r.text);
                r.assert_problem(403, "forbidden");
                assert_eq!(r.json["required_scope"], route.scope, "{case}");
                assert_eq!(new.len(), 1, "{case}: a refusal writes its denial and nothing else: {new:?}");
                let e = &new[0];
                assert_eq!((e.type_.as_str(), e.outcome.as_str()), ("auth.denied", "denied"), "{case}");
                assert_eq!(e.source_ip.as_deref(), Some(peer.ip().to_string().as_str()), "{case}");
                assert_eq!(e.actor.as_deref(), Some(actor.as_str()), "{case}");
                let d = details(e);
                assert_eq!(d["reason"], "insufficient_scope", "{case}");
                assert_eq!(d["required_scope"], route.scope, "{case}");
                assert_eq!(d["method"], route.method, "{case}");
                assert_eq!(d["path"], prepared.uri.split('?').next().unwrap(), "{case}");
            }
        }
    }
}
