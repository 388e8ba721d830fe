use crate::helpers::*;

#[tokio::test]
async fn health_ready_metrics_docs() {
    let app = TestApp::spawn().await;
    let h = app.get("/healthz").no_auth().send().await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json["status"], "ok");
    assert!(h.header("x-request-id").is_some_and(|v| v.len() >= 32), "a request id is generated");
    assert_eq!(h.header("x-content-type-options"), Some("nosniff"));
    let r = app.get("/readyz").no_auth().send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["active_key_id"], "k1");
    app.get(&tokens_path("m")).send().await;
    let m = app.get("/metrics").no_auth().send().await;
    assert_eq!(m.status, 200);
    assert!(m.text.contains("http_requests_total"), "{}", m.text);
    assert!(m.text.contains("http_request_duration_seconds_bucket"), "latency is a histogram");
    assert!(m.text.contains("path=\"/api/v1/users/{user_id}/tokens\""), "labels use the route template");
    let d = app.get("/docs/").no_auth().send().await;
    assert_eq!(d.status, 200);
    assert!(d.text.contains("swagger"), "Swagger UI served from the binary");
    let o = app.get("/openapi.json").no_auth().send().await;
    assert_eq!(o.status, 200);
    assert!(o.json["paths"]["/api/v1/users/{user_id}/tokens"].is_object());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = TestApp::spawn().await;
    app.get("/nope").no_auth().send().await.assert_problem(404, "not_found");
    app.get("/api/v1/nope").send().await.assert_problem(404, "not_found");
    app.request(axum::http::Method::PATCH, &tokens_path("x")).send().await.assert_problem(405, "method_not_allowed");
}

#[tokio::test]
async fn an_odd_request_id_is_replaced() {
    let app = TestApp::spawn().await;
    let r = app.get("/healthz").header("x-request-id", "bad id with spaces").send().await;
    assert_ne!(r.header("x-request-id"), Some("bad id with spaces"));
}

/// The committed `openapi.json` is what the code generates. Regenerate with
/// `cargo run -- openapi > openapi.json`.
#[test]
fn openapi_json_is_up_to_date() {
    let generated: serde_json::Value =
        serde_json::from_str(&centraldb_mfa::api::openapi().to_pretty_json().unwrap()).unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap())
            .unwrap();
    assert!(generated == committed, "openapi.json is stale: run `cargo run -- openapi > openapi.json`");
}

/// Every string enum in the OpenAPI document lists the values the service really reads and
/// writes (they were once documented by their Rust names, `MfaRequired` for `mfa_required`).
#[test]
fn openapi_enums_use_the_wire_names() {
    use centraldb_mfa::domain::mfa::{ChallengeStatus, Method, SessionState, Verifier};
    let doc: serde_json::Value =
        serde_json::from_str(&centraldb_mfa::api::openapi().to_pretty_json().unwrap()).unwrap();
    let values = |name: &str| -> Vec<String> {
        doc["components"]["schemas"][name]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no enum"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str, documented: &[String]) {
        for v in documented {
            let parsed: T = serde_json::from_value(serde_json::json!(v))
                .unwrap_or_else(|e| panic!("{name}: documented value {v:?} is not accepted: {e}"));
            assert_eq!(serde_json::to_value(&parsed).unwrap(), serde_json::json!(v), "{name}");
        }
    }
    let states = values("SessionState");
    assert!(states.contains(&"mfa_required".to_string()), "{states:?}");
    assert_eq!(states.len(), 8);
    round_trip::<SessionState>("SessionState", &states);
    round_trip::<ChallengeStatus>("ChallengeStatus", &values("ChallengeStatus"));
    round_trip::<Method>("Method", &values("Method"));
    round_trip::<Verifier>("Verifier", &values("Verifier"));
}

/// Issue 15 finding 1: HTTP lets a client invent any method token, and the raw method was a
/// metrics label, so each invented method added series to `/metrics` that were never evicted.
/// Every label is now from a closed set: invented methods count as `other`.
#[tokio::test]
async fn invented_methods_are_counted_as_other_in_metrics() {
    const METHODS: [&str; 10] =
        ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "other"];
    let app = TestApp::spawn().await;
    for i in 0..200 {
        let method = axum::http::Method::from_bytes(format!("Y{i:07}AAAA").as_bytes()).unwrap();
        let uri = if i % 2 == 0 { "/nope".to_string() } else { tokens_path("m") };
        let r = app.request(method, &uri).no_auth().send().await;
        assert!([404, 405].contains(&r.status.as_u16()), "{}: {}", r.status, r.text);
    }
    let m = app.get("/metrics").no_auth().send().await;
    assert_eq!(m.status, 200);
    assert!(!m.text.contains("Y0000"), "an invented method became a label");
    assert!(m.text.contains("method=\"other\""), "{}", m.text);
    for label in m.text.split("method=\"").skip(1) {
        let value = label.split('"').next().unwrap();
        assert!(METHODS.contains(&value), "method label {value:?} is not from the closed set");
    }
    for label in m.text.split("path=\"").skip(1) {
        let value = label.split('"').next().unwrap();
        assert!(value == "unmatched" || value.starts_with('/'), "path label {value:?}");
        assert_ne!(value, "/nope", "a raw path became a label");
    }
}

/// The generated document: every response described (OpenAPI requires it), every request and
/// response body with an example (Swagger UI's "Try it out" sends it), summaries one line of plain
/// text. `scripts/spec-check` also validates each example against its schema.
#[test]
fn openapi_responses_are_described_and_bodies_have_examples() {
    let doc = serde_json::to_value(centraldb_mfa::api::openapi()).unwrap();
    let mut missing = Vec::new();
    let has_example = |content: &serde_json::Value| {
        content.as_object().unwrap().values().all(|c| c.get("example").is_some() || c.get("examples").is_some())
    };
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let summary = op["summary"].as_str().unwrap_or("");
            if summary.is_empty() || summary.contains(['\n', '`', '*']) || summary.ends_with('.') {
                missing.push(format!("{method} {path}: summary {summary:?}"));
            }
            if let Some(content) = op.get("requestBody").map(|b| &b["content"])
                && !has_example(content)
            {
                missing.push(format!("{method} {path}: request body without example"));
            }
            for (status, response) in op["responses"].as_object().unwrap() {
                if response["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(format!("{method} {path} {status}: no description"));
                }
                if let Some(content) = response.get("content")
                    && !has_example(content)
                {
                    missing.push(format!("{method} {path} {status}: body without example"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

/// What "Try it out" sends works: each named example of the token PUT body (one per form the
/// libraries write) stores a usable bundle (201, `valid`, expiries in the future; it once stored
/// a bundle that had expired in 1970), and the other request examples chain into a real flow.
#[tokio::test]
async fn openapi_request_examples_are_accepted() {
    let doc = serde_json::to_value(centraldb_mfa::api::openapi()).unwrap();
    let request_example = |path: &str, method: &str| -> serde_json::Value {
        doc["paths"][path][method]["requestBody"]["content"]["application/json"]["example"].clone()
    };
    let app = TestApp::spawn().await;
    let examples = doc["paths"]["/api/v1/users/{user_id}/tokens"]["put"]["requestBody"]["content"]["application/json"]
        ["examples"]
        .as_object()
        .unwrap();
    let names: Vec<&str> = examples.keys().map(String::as_str).collect();
    for name in
        ["garth pair", "garth dump", "garth-ng", "garth-ng dump", "garminconnect DI tokens", "garminconnect dump"]
    {
        assert!(names.contains(&name), "no example {name:?} in {names:?}");
    }
    for (i, (name, example)) in examples.iter().enumerate() {
        let user = format!("example-{i}");
        let put = app.put(&tokens_path(&user)).json(example["value"].clone()).send().await;
        assert_eq!(put.status, 201, "{name}: {}", put.text);
        assert_eq!(put.json["status"], "valid", "{name}: {}", put.text);
        assert_eq!(put.json["access_expires_at"], "2030-01-01T00:00:00Z", "{name}");
        let get = app.get(&tokens_path(&user)).send().await;
        assert_eq!(get.status, 200, "{name}: {}", get.text);
        assert_eq!(get.json["status"], "valid", "{name}");
    }

    let user_tokens = tokens_path("alice");
    let pair = examples["garth pair"]["value"].clone();
    assert_eq!(app.put(&user_tokens).json(pair).send().await.status, 201);
    let lease = app
        .post(&format!("{user_tokens}/lease"))
        .json(request_example("/api/v1/users/{user_id}/tokens/lease", "post"))
        .send()
        .await;
    assert_eq!(lease.status, 201, "{}", lease.text);
    let session = app.post("/api/v1/sessions").json(request_example("/api/v1/sessions", "post")).send().await;
    assert_eq!(session.status, 201, "{}", session.text);
    let id = session.json["id"].as_str().unwrap().to_string();
    let moved = app
        .post(&format!("/api/v1/sessions/{id}/transition"))
        .json(request_example("/api/v1/sessions/{id}/transition", "post"))
        .send()
        .await;
    assert_eq!(moved.status, 200, "{}", moved.text);
    let challenge =
        app.post("/api/v1/mfa/challenges").json(request_example("/api/v1/mfa/challenges", "post")).send().await;
    assert_eq!(challenge.status, 201, "{}", challenge.text);
    let cid = challenge.json["id"].as_str().unwrap().to_string();
    let verified = app
        .post(&format!("/api/v1/mfa/challenges/{cid}/verify"))
        .json(request_example("/api/v1/mfa/challenges/{id}/verify", "post"))
        .send()
        .await;
    assert_eq!(verified.status, 200, "the code example is the challenge example's code: {}", verified.text);
    assert_eq!(verified.json["status"], "verified");
}
