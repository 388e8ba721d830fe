//! Realistic examples for the OpenAPI document, so Swagger UI's "Try it out" sends bodies the
//! service accepts (far-future expiries, real-looking ids) and every answer shows a real shape.
//!
//! One table keyed by component schema name, attached as the media-type `example` of every
//! request and response body that references the schema; the token PUT body gets one named
//! example per form the libraries write (the README's terms); every problem+json response gets
//! the problem its description names first, rendered by `ApiError` itself so the texts are the
//! ones the service sends. Dates are fixed and far in the future (2029-12-31 / 2030-01-01), so
//! an example never stores an expired bundle. `scripts/spec-check.py` validates each example against
//! its schema.

use base64::Engine;
use serde_json::{Value, json};
use utoipa::openapi::{
    Content, OpenApi, RefOr,
    example::ExampleBuilder,
    path::{Operation, PathItem},
};

use crate::api::error::ApiError;

/// 2030-01-01T00:00:00Z: the access expiry of every token example.
const ACCESS_EXPIRES_AT: i64 = 1_893_456_000;
/// 2031-01-01T00:00:00Z: the refresh expiry of every token example.
const REFRESH_EXPIRES_AT: i64 = 1_924_992_000;
const USER: &str = "alice";
const SESSION_ID: &str = "3f6a2c1e-8b7d-4e52-9c1a-5d0e7b4f2a18";
const CHALLENGE_ID: &str = "9b2e4d71-0c3a-4f8e-a5b6-17d3e9c02f4b";
/// A JWT whose `exp` is [`ACCESS_EXPIRES_AT`] (garminconnect reads expiries from `exp`).
const DI_TOKEN: &str = "eyJhbGciOiJub25lIn0.eyJleHAiOjE4OTM0NTYwMDB9.sig";
/// A JWT whose `exp` is [`REFRESH_EXPIRES_AT`].
const DI_REFRESH_TOKEN: &str = "eyJhbGciOiJub25lIn0.eyJleHAiOjE5MjQ5OTIwMDB9.sig";

fn oauth1() -> Value {
    json!({
        "oauth_token": "f3c1a9e2-5b7d-4c8e-9a1f-2d6b8e0c4a73",
        "oauth_token_secret": "Zk9yV2xEcG1Tb0RhM0xpZ2h0",
        "mfa_token": null,
        "mfa_expiration_timestamp": null,
        "domain": "garmin.com"
    })
}

fn oauth2() -> Value {
    json!({
        "scope": "CONNECT_READ CONNECT_WRITE",
        "jti": "6b1f2a0e-93c4-4d7b-8e15-a2c9f0b7d364",
        "token_type": "Bearer",
        "access_token": "eyJhbGciOiJSUzI1NiJ9.eyJzY29wZSI6WyJDT05ORUNUX1JFQUQiXX0.c2lnbmF0dXJl",
        "refresh_token": "eyJyZWZyZXNoVG9rZW5WYWx1ZSI6IjdkMmUifQ",
        "expires_in": 86400,
        "expires_at": ACCESS_EXPIRES_AT,
        "refresh_token_expires_in": 2_592_000,
        "refresh_token_expires_at": REFRESH_EXPIRES_AT
    })
}

fn garth_ng_oauth2() -> Value {
    let mut token = oauth2();
    if let Some(t) = token.as_object_mut() {
        t.insert("client_id".into(), json!("GARMIN_CONNECT_MOBILE_ANDROID_DI"));
    }
    token
}

fn di_tokens() -> Value {
    json!({
        "di_token": DI_TOKEN,
        "di_refresh_token": DI_REFRESH_TOKEN,
        "di_client_id": "GARMIN_CONNECT_MOBILE_ANDROID_DI_2025Q2"
    })
}

/// What `garth.Client.dumps()` returns for these tokens: base64 of the JSON array.
fn garth_dump(tokens: &[Value]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Value::Array(tokens.to_vec()).to_string())
}

fn metadata(kind: &str, version: i64) -> Value {
    json!({
        "user_id": USER,
        "kind": kind,
        "version": version,
        "status": "valid",
        "access_expires_at": "2030-01-01T00:00:00Z",
        "refresh_expires_at": "2031-01-01T00:00:00Z",
        "refreshable": true,
        "created_at": "2029-12-31T09:00:00Z",
        "updated_at": "2029-12-31T09:00:00Z",
        "last_used_at": null
    })
}

fn session() -> Value {
    json!({
        "id": SESSION_ID,
        "user_id": USER,
        "state": "mfa_required",
        "challenge_id": CHALLENGE_ID,
        "client": {"ip": "203.0.113.24", "user_agent": "GarminSync/2.4 (Android 14)"},
        "reason": null,
        "created_at": "2029-12-31T09:00:00Z",
        "updated_at": "2029-12-31T09:00:05Z",
        "expires_at": "2029-12-31T09:15:00Z"
    })
}

fn audit_event(seq: i64, kind: &str, user: Option<&str>) -> Value {
    json!({
        "seq": seq,
        "id": format!("5c0d8e3a-2f71-4b96-8d4e-0a1b2c3d4e{seq:02}"),
        "at": "2029-12-31T09:00:00Z",
        "type": kind,
        "outcome": "success",
        "actor": "key:7f3a9c2e",
        "user_id": user,
        "request_id": "01JH7Q4K8X2M5N9P3R6T0V1W4Y",
        "source_ip": "10.0.4.17",
        "details": {"version": 1}
    })
}

/// The example of a component schema, as used in request and response bodies.
fn schema_example(name: &str) -> Option<Value> {
    Some(match name {
        "TokenMetadata" => metadata("garth", 1),
        "TokenBundleResponse" => {
            let mut body = metadata("garth", 1);
            if let Some(b) = body.as_object_mut() {
                b.insert("last_used_at".into(), json!("2029-12-31T09:00:00Z"));
                b.insert("oauth1_token".into(), oauth1());
                b.insert("oauth2_token".into(), oauth2());
            }
            body
        }
        "InvalidateRequest" => json!({"reason": "Garmin rejected the refresh token (401)"}),
        "AuthStatus" => json!({"user_id": USER, "status": "VALID", "tokens": metadata("garth", 1), "session": null}),
        "LeaseRequest" => json!({"holder": "sync-worker-3", "ttl_seconds": 60}),
        "LeaseView" => json!({
            "lease_id": "d4e8a1b2-6c3f-4a97-b0e5-8f2d1c7a9e36",
            "fence": 7,
            "holder": "sync-worker-3",
            "expires_at": "2029-12-31T09:01:00Z",
            "version": 1
        }),
        "CreateSessionRequest" => json!({
            "user_id": USER,
            "client": {"ip": "203.0.113.24", "user_agent": "GarminSync/2.4 (Android 14)"},
            "ttl_seconds": 900
        }),
        "SessionView" => session(),
        "SessionList" => json!({"user_id": USER, "sessions": [session()]}),
        "TransitionRequest" => json!({"to": "mfa_required"}),
        // No `session_id`: the example works on its own in "Try it out".
        "CreateChallengeRequest" => json!({
            "user_id": USER,
            "method": "email",
            "verifier": "service",
            "code": "482913",
            "destination": "a***e@example.com",
            "ttl_seconds": 300,
            "max_attempts": 5
        }),
        "ChallengeView" => json!({
            "id": CHALLENGE_ID,
            "user_id": USER,
            "session_id": SESSION_ID,
            "method": "email",
            "verifier": "service",
            "status": "pending",
            "destination": "a***e@example.com",
            "attempts": 0,
            "max_attempts": 5,
            "expires_at": "2029-12-31T09:05:00Z",
            "created_at": "2029-12-31T09:00:00Z",
            "verified_at": null,
            "consumed_at": null
        }),
        "CodeRequest" => json!({"code": "482913"}),
        "Verified" => json!({"status": "verified", "verified_at": "2029-12-31T09:01:30Z", "resume_state": null}),
        "AttemptReserved" => json!({
            "attempt": 1,
            "attempts_remaining": 4,
            "resume_state": "eyJzaWduaW5fcGFyYW1zIjp7fSwiY2xpZW50X3N0YXRlIjp7fX0"
        }),
        "AttemptResultRequest" => json!({"success": true}),
        "AuditEvent" => audit_event(42, "token.stored", Some(USER)),
        "AuditEventsPage" => json!({
            "events": [audit_event(41, "session.created", Some(USER)), audit_event(42, "token.stored", Some(USER))],
            "next_after": 42
        }),
        "VerifyReport" => {
            json!({"ok": true, "events_checked": 1842, "first_bad_seq": null, "reason": null, "purged_through": null})
        }
        "Checkpoint" => json!({
            "version": 1,
            "at": "2029-12-31T09:00:00Z",
            "key_id": "k2030a",
            "partitions": 256,
            "heads": [
                {"chain": 17, "pos": 3, "seq": 42, "hmac": "5be1c0a3f1d94e0b8a27c6e4d3f2a1b09e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"},
                {"chain": 203, "pos": 1, "seq": 40, "hmac": "0d4c7b2a9e8f1c3b5a6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b"}
            ],
            "signature": "8c1f3e5a7b9d2c4e6f8a0b1c3d5e7f9a2b4c6d8e0f1a3b5c7d9e2f4a6b8c0d1e3f5a7b9c1d3e5f7a9b2c4d6e8f0a1b3c5d7e9f2a4b6c8d0e1f3a5b7c9d1e3f50a"
        }),
        "PublicKeys" => json!({"keys": [{
            "key_id": "k2030a",
            "algorithm": "Ed25519",
            "public_key": "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
        }]}),
        "Health" => json!({"status": "ok"}),
        "Readiness" => json!({"status": "ready", "database": "postgres", "active_key_id": "k2030a"}),
        _ => return None,
    })
}

/// The token PUT body: one named example per form, the README's names, garth pair first (the
/// one Swagger UI preselects).
fn put_tokens_examples() -> Vec<(&'static str, &'static str, Value)> {
    let mut di = di_tokens();
    if let Some(d) = di.as_object_mut() {
        d.insert("kind".into(), json!("garminconnect"));
    }
    vec![
        (
            "garth pair",
            "garth 0.8.0: the OAuth1 + OAuth2 token pair",
            json!({"kind": "garth", "oauth1_token": oauth1(), "oauth2_token": oauth2()}),
        ),
        (
            "garth dump",
            "garth 0.8.0: the string garth.Client.dumps() returns",
            json!({"kind": "garth", "garth_dump": garth_dump(&[oauth1(), oauth2()])}),
        ),
        ("garminconnect DI tokens", "python-garminconnect 0.3: the DI token set", di),
        (
            "garth-ng",
            "garth-ng 1.1.0: the OAuth2 token alone",
            json!({"kind": "garth", "oauth2_token": garth_ng_oauth2()}),
        ),
        (
            "garth-ng dump",
            "garth-ng 1.1.0: the string Client.dumps() returns (one-element form)",
            json!({"kind": "garth", "garth_dump": garth_dump(&[garth_ng_oauth2()])}),
        ),
        (
            "garminconnect dump",
            "python-garminconnect 0.3: the string Client.dumps() returns",
            json!({"kind": "garminconnect", "garminconnect_dump": di_tokens().to_string()}),
        ),
    ]
}

/// The problem a response's description names first (its first backticked word), else the
/// usual one for the status.
fn problem_example(status: &str, description: &str, scope: Option<&str>) -> Option<Value> {
    let named = description
        .split('`')
        .nth(1)
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    let code = match (named, status) {
        (Some(code), _) => code,
        (None, "401") => "unauthenticated",
        (None, "403") => "forbidden",
        (None, "413") => "payload_too_large",
        (None, "415") => "unsupported_media_type",
        (None, "422") => "validation_failed",
        (None, "500") => "internal_error",
        (None, "503") => "unavailable",
        (None, "507") => "insufficient_storage",
        _ => return None,
    };
    let error = match code {
        "unauthenticated" => ApiError::Unauthenticated { detail: "the API key is not valid" },
        "forbidden" => ApiError::Forbidden {
            required_scope: match scope {
                Some("tokens:read") => "tokens:read",
                Some("tokens:write") => "tokens:write",
                Some("mfa") => "mfa",
                Some("sessions") => "sessions",
                Some("audit:read") => "audit:read",
                _ => "admin",
            },
        },
        "tokens_not_found" => ApiError::tokens_not_found(),
        "challenge_not_found" => ApiError::not_found("challenge_not_found", "no such challenge"),
        "session_not_found" => ApiError::not_found("session_not_found", "no such session"),
        "attempt_not_found" => ApiError::not_found("attempt_not_found", "no attempt 2 on this challenge"),
        "reauth_required" => ApiError::ReauthRequired { reason: "Garmin rejected the refresh token (401)".into() },
        "version_conflict" => {
            ApiError::VersionConflict { current_version: Some(2), detail: "the stored version is 2 (If-Match)".into() }
        }
        "payload_too_large" => ApiError::PayloadTooLarge,
        "unsupported_media_type" => ApiError::UnsupportedMediaType,
        "validation_failed" => ApiError::field("user_id", "user_id must be at most 128 characters"),
        "internal_error" => ApiError::DecryptFailed,
        "unavailable" => {
            ApiError::Unavailable { detail: "the database is unavailable; try again shortly", retry_after_secs: 1 }
        }
        "insufficient_storage" => ApiError::InsufficientStorage,
        other => coded_example(CODED.iter().copied().find(|c| *c == other)?)?,
    };
    let problem = error.to_problem();
    if problem.status.to_string() != status {
        return None;
    }
    serde_json::to_value(problem).ok()
}

const CODED: [&str; 14] = [
    "lease_held",
    "lease_lost",
    "invalid_transition",
    "challenge_not_pending",
    "attempt_resolved",
    "duplicate_code",
    "idempotency_key_in_use",
    "idempotency_key_reused",
    "challenge_expired",
    "challenge_locked",
    "invalid_code",
    "too_many_challenges",
    "too_many_failures",
    "too_many_requests",
];

/// The service's own coded problems (status, detail and extra members as sent).
fn coded_example(code: &'static str) -> Option<ApiError> {
    use axum::http::StatusCode as S;
    Some(match code {
        "lease_held" => ApiError::coded(S::CONFLICT, code, "another worker holds the refresh lease for this user")
            .with("holder", "sync-worker-3")
            .with("expires_at", "2029-12-31T09:01:00Z"),
        "lease_lost" => ApiError::coded(
            S::CONFLICT,
            code,
            "this fence is not the live lease any more (it expired or was granted to another worker); nothing was written",
        ),
        "invalid_transition" => {
            ApiError::coded(S::CONFLICT, code, "a session cannot move from authenticated to mfa_required")
                .with("from", "authenticated")
                .with("to", "mfa_required")
        }
        "challenge_not_pending" => {
            ApiError::coded(S::CONFLICT, code, "the challenge is consumed").with("challenge_status", "consumed")
        }
        "attempt_resolved" => ApiError::coded(S::CONFLICT, code, "the result of attempt 1 was already recorded"),
        "duplicate_code" => {
            ApiError::coded(S::CONFLICT, code, "this code was already tried on this challenge; no attempt was used")
        }
        "idempotency_key_in_use" => {
            ApiError::coded(S::CONFLICT, code, "a request with this Idempotency-Key is still running; retry later")
        }
        "idempotency_key_reused" => {
            ApiError::coded(S::UNPROCESSABLE_ENTITY, code, "this Idempotency-Key was used for a different request")
        }
        "challenge_expired" => ApiError::coded(S::GONE, code, "the challenge has expired"),
        "challenge_locked" => ApiError::coded(S::LOCKED, code, "no attempts are left"),
        "invalid_code" => ApiError::coded(S::BAD_REQUEST, code, "the code is not right").with("attempts_remaining", 3),
        "too_many_challenges" => {
            ApiError::coded(S::TOO_MANY_REQUESTS, code, "this user already has 3 pending challenges")
        }
        "too_many_failures" => {
            ApiError::coded(S::TOO_MANY_REQUESTS, code, "too many failed MFA attempts for this user; try again later")
        }
        "too_many_requests" => {
            ApiError::coded(S::TOO_MANY_REQUESTS, code, "too many refused requests from this address; try again later")
        }
        _ => return None,
    })
}

fn ref_name(content: &Content) -> Option<String> {
    match content.schema.as_ref()? {
        RefOr::Ref(r) => r.ref_location.rsplit('/').next().map(str::to_string),
        // `Option<T>` bodies: `oneOf: [null, T]`
        RefOr::T(utoipa::openapi::Schema::OneOf(one_of)) => one_of.items.iter().find_map(|item| match item {
            RefOr::Ref(r) => r.ref_location.rsplit('/').next().map(str::to_string),
            RefOr::T(_) => None,
        }),
        RefOr::T(_) => None,
    }
}

/// The scope an operation's security requirement names, if any.
fn scope(op: &Operation) -> Option<String> {
    let security = serde_json::to_value(op.security.as_ref()?).ok()?;
    security.get(0)?.get("bearer")?.get(0)?.as_str().map(str::to_string)
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
}

/// Puts the examples in (after every other modifier, so the responses they add get one too).
pub struct Examples;

impl utoipa::Modify for Examples {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in operations(item) {
                let scope = scope(op);
                if let Some(RefOr::T(body)) = op.request_body.as_mut() {
                    for content in body.content.values_mut() {
                        let RefOr::T(content) = content else { continue };
                        if content.example.is_some() || !content.examples.is_empty() {
                            continue;
                        }
                        match ref_name(content).as_deref() {
                            Some("PutTokensRequest") => {
                                for (name, summary, value) in put_tokens_examples() {
                                    let example = ExampleBuilder::new().summary(summary).value(Some(value)).build();
                                    content.examples.insert(name.to_string(), RefOr::T(example));
                                }
                            }
                            Some(name) => content.example = schema_example(name),
                            None => {}
                        }
                    }
                }
                for (status, response) in op.responses.responses.iter_mut() {
                    let RefOr::T(response) = response else { continue };
                    let description = response.description.clone();
                    for (media, content) in response.content.iter_mut() {
                        let RefOr::T(content) = content else { continue };
                        if content.example.is_some() || !content.examples.is_empty() {
                            continue;
                        }
                        content.example = if media == "application/problem+json" {
                            problem_example(status, &description, scope.as_deref())
                        } else {
                            ref_name(content).and_then(|name| schema_example(&name))
                        };
                    }
                }
            }
        }
    }
}
