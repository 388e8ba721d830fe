//! `Idempotency-Key` (IETF httpapi draft) on every write.
//!
//! A write carrying the header is claimed first: a `running` row in `idempotency_keys`, unique
//! per (API key, key), inserted in its own transaction. The request then runs as usual, and its
//! answer (status, headers, body) is stored encrypted with the keyring in a second transaction
//! just after, so a retry with the same key and the same request gets that answer back without
//! acting again. The record is not written in the act's own transaction: an instance that dies
//! between the two leaves a `running` row whose lease lapses, after which a retry acts again.
//!
//! - The same key with a different request (method, path, query, body, `If-Match`,
//!   `If-None-Match`, `X-Lease-Fence`): 422 `idempotency_key_reused`.
//! - The same key while the first request still runs: 409 `idempotency_key_in_use` with
//!   `Retry-After`.
//! - Only 2xx and 4xx answers are kept (not 401/403/408/429, which say nothing about the
//!   request itself); anything else (503, 500) drops the claim, so a retry acts. The claimed
//!   request runs detached: a client going away or the request timeout does not cut it, so its
//!   answer is still kept.
//! - No secret is stored in the clear: the key as a SHA-256, the request as an HMAC under a
//!   keyring-derived key, the answer (which may hold a generated code or a resume state) as a
//!   keyring envelope bound to the API key and the key hash.

use std::time::Duration;

use axum::{
    body::{Body, HttpBody as _},
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    api::error::ApiError,
    crypto::keyring::Aad,
    services::{
        api_keys::Principal,
        idempotency::{self as records, Claim},
    },
    state::AppState,
};

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer replayed from the record (not on the first answer).
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Answers larger than this are not kept (a retry then acts again); every answer of this API is
/// far smaller.
pub const MAX_CAPTURE_BYTES: usize = 256 * 1024;

/// The label of the keyring-derived HMAC key for request fingerprints.
const HASH_LABEL: &str = "idempotency-request";

/// The headers that change what a write means, so they are part of its fingerprint.
const MEANINGFUL_HEADERS: [&str; 3] = ["if-match", "if-none-match", "x-lease-fence"];

/// Response headers not kept (recomputed, or set by outer layers on every answer).
const SKIPPED_HEADERS: [&str; 5] = ["content-length", "transfer-encoding", "connection", "date", "x-request-id"];

/// `1..=255` visible ASCII characters (the draft's sf-string, quotes included, is taken as is).
pub fn valid_key(raw: &[u8]) -> bool {
    (1..=255).contains(&raw.len()) && raw.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The methods of this API's writes; any other method (an invented `QUERY`) is left to the
/// router's 405.
fn is_write(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// Whether an answer with this status is kept and replayed.
fn replayable(status: StatusCode) -> bool {
    status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ))
}

/// The authenticated API key, or `None` (the handler's own `Auth` then answers 401/403/503).
async fn principal(state: &AppState, headers: &HeaderMap) -> Option<Principal> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let presented = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    if presented.is_empty() || presented.len() > 512 {
        return None;
    }
    state.api_keys.authenticate(presented).await.ok()
}

fn key_hash(key: &[u8]) -> Vec<u8> {
    Sha256::digest(key).to_vec()
}

/// HMAC of the request under the key derived from keyring key `key_id`; `None` if that key is
/// no longer in the ring.
fn fingerprint(state: &AppState, key_id: &str, parts: &axum::http::request::Parts, body: &[u8]) -> Option<Vec<u8>> {
    let key = state.keyring.derive(key_id, HASH_LABEL)?;
    let mut mac = <hmac::Hmac<Sha256>>::new_from_slice(key.as_slice()).ok()?;
    let mut field = |bytes: &[u8]| {
        mac.update(&(bytes.len() as u64).to_be_bytes());
        mac.update(bytes);
    };
    field(parts.method.as_str().as_bytes());
    field(parts.uri.path().as_bytes());
    field(parts.uri.query().unwrap_or("").as_bytes());
    for name in MEANINGFUL_HEADERS {
        let values: Vec<&[u8]> = parts.headers.get_all(name).iter().map(HeaderValue::as_bytes).collect();
        field(&(values.len() as u64).to_be_bytes());
        for v in values {
            field(v);
        }
    }
    field(body);
    Some(mac.finalize().into_bytes().to_vec())
}

/// A kept answer (serialised, then encrypted).
#[derive(Serialize, Deserialize)]
struct Stored {
    status: u16,
    headers: Vec<(String, String)>,
    /// Base64 (bodies are JSON here, but nothing relies on it).
    body: String,
}

fn aad(api_key_id: Uuid, key_hash: &[u8]) -> Aad {
    Aad::new(&["idempotency", &api_key_id.to_string(), &hex::encode(key_hash)])
}

fn replay(state: &AppState, api_key_id: Uuid, key_hash: &[u8], envelope: &[u8]) -> Response {
    let Ok(plain) = state.keyring.decrypt(envelope, &aad(api_key_id, key_hash)) else {
        return ApiError::DecryptFailed.into_response();
    };
    let Ok(stored) = serde_json::from_slice::<Stored>(&plain) else {
        return ApiError::Internal("a stored idempotent answer is malformed".into()).into_response();
    };
    let Ok(body) = base64::engine::general_purpose::STANDARD.decode(stored.body.as_bytes()) else {
        return ApiError::Internal("a stored idempotent answer is malformed".into()).into_response();
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in stored.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            resp.headers_mut().append(n, v);
        }
    }
    resp.headers_mut().insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    tracing::info!(status = stored.status, "idempotent retry answered from the record");
    resp
}

/// Drops the claim if the request is abandoned (timeout, client gone) before it answered.
struct ClaimGuard {
    state: AppState,
    api_key_id: Uuid,
    key_hash: Vec<u8>,
    owner: Uuid,
    armed: bool,
}

impl ClaimGuard {
    async fn release(mut self) {
        self.armed = false;
        release(&self.state, self.api_key_id, &self.key_hash, self.owner).await;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (state, api_key_id, key_hash, owner) =
                (self.state.clone(), self.api_key_id, self.key_hash.clone(), self.owner);
            rt.spawn(async move { release(&state, api_key_id, &key_hash, owner).await });
        }
    }
}

/// Claim, finish and release are the records' own operations (`services::idempotency`), each
/// in its own short transaction on the key's row only.
async fn release(state: &AppState, api_key_id: Uuid, key_hash: &[u8], owner: Uuid) {
    if let Err(e) = records::release(&state.db, api_key_id, key_hash, owner).await {
        // The claim's lease lapses on its own; until then a retry gets 409.
        tracing::warn!(error = %e, "could not drop an idempotency claim");
    }
}

/// The write operations of the API as (method, path template segments), from the OpenAPI
/// document the routes are declared with: a method a path does not take (405), or a path no
/// route has (404), passes through untouched, so its answer does not depend on the key.
fn write_operations() -> &'static [(Method, Vec<String>)] {
    static OPS: std::sync::OnceLock<Vec<(Method, Vec<String>)>> = std::sync::OnceLock::new();
    OPS.get_or_init(|| {
        let mut ops = Vec::new();
        for (path, item) in super::spec::openapi().paths.paths {
            let segments: Vec<String> = path.split('/').map(str::to_string).collect();
            for (method, op) in [
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
                (Method::PATCH, item.patch.is_some()),
                (Method::DELETE, item.delete.is_some()),
            ] {
                if op {
                    ops.push((method, segments.clone()));
                }
            }
        }
        ops
    })
}

/// Whether `method path` is one of [`write_operations`]: a `{param}` segment matches any
/// non-empty segment.
fn is_write_operation(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    write_operations().iter().any(|(m, template)| {
        m == method
            && template.len() == segments.len()
            && template
                .iter()
                .zip(&segments)
                .all(|(t, s)| if t.starts_with('{') && t.ends_with('}') { !s.is_empty() } else { t == s })
    })
}

/// The middleware: only writes under `/api/` that carry `Idempotency-Key` and whose API key
/// authenticates are touched; everything else passes through unchanged.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !is_write(req.method())
        || !req.uri().path().starts_with("/api/")
        || !req.headers().contains_key(&IDEMPOTENCY_KEY)
        || !is_write_operation(req.method(), req.uri().path())
    {
        return next.run(req).await;
    }
    let Some(principal) = principal(&state, req.headers()).await else {
        return next.run(req).await;
    };
    let mut values = req.headers().get_all(&IDEMPOTENCY_KEY).iter();
    let key = match (values.next(), values.next()) {
        (Some(v), None) if valid_key(v.as_bytes()) => v.as_bytes().to_vec(),
        _ => {
            return ApiError::field(
                "Idempotency-Key",
                "Idempotency-Key must be given once, as 1 to 255 visible ASCII characters",
            )
            .into_response();
        }
    };
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, state.settings.body_limit_bytes).await {
        Ok(b) => b,
        Err(_) => return ApiError::PayloadTooLarge.into_response(),
    };
    let api_key_id = principal.key_id;
    let key_hash = key_hash(&key);
    let hash_key_id = state.keyring.active_key_id().to_string();
    let Some(request_hash) = fingerprint(&state, &hash_key_id, &parts, &body) else {
        return ApiError::Internal("the idempotency hash key cannot be derived".into()).into_response();
    };
    let lease = state.settings.request_timeout * 2 + Duration::from_secs(5);
    let c = Claim::new(api_key_id, key_hash, request_hash, hash_key_id, lease, state.settings.idempotency_ttl);
    // Detached (and tracked, so shutdown waits for it), from the claim on: a client that goes
    // away, or the request timeout, can cut neither the step between a won claim and the write
    // (the claim would stay `running` until its lease lapsed) nor the one between the write's
    // commit and its answer being kept; a retry gets 409 until the answer is kept, and that
    // answer after.
    let tasks = state.mfa.tasks();
    let task = async move {
        // A record deleted between the failed claim and the read (released, purged) is claimed again.
        let mut won = false;
        for _ in 0..3 {
            match records::claim(&state.db, &c).await {
                Ok(true) => {
                    won = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => return ApiError::from(e).into_response(),
            }
            let row = match records::get(&state.db, api_key_id, &c.key_hash).await {
                Ok(Some(row)) => row,
                Ok(None) => continue,
                Err(e) => return ApiError::from(e).into_response(),
            };
            let same = if row.hash_key_id == c.hash_key_id {
                row.request_hash == c.request_hash
            } else {
                fingerprint(&state, &row.hash_key_id, &parts, &body).is_some_and(|h| h == row.request_hash)
            };
            if !same {
                return ApiError::coded(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different request",
                )
                .into_response();
            }
            return match row.answer {
                Some(envelope) => replay(&state, api_key_id, &c.key_hash, &envelope),
                None => ApiError::coded(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still running; retry later",
                )
                .retry_after(1)
                .into_response(),
            };
        }
        if !won {
            return ApiError::Unavailable {
                detail: "the Idempotency-Key could not be claimed; try again",
                retry_after_secs: 1,
            }
            .into_response();
        }

        run_and_keep(state.clone(), next, Request::from_parts(parts, Body::from(body)), api_key_id, c.key_hash, c.owner)
            .await
    };
    match tasks.spawn(task.instrument(tracing::Span::current())).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Internal("a request with an Idempotency-Key failed".into()).into_response(),
    }
}

/// Runs the claimed request and keeps its answer (or drops the claim when it is not kept).
async fn run_and_keep(
    state: AppState,
    next: Next,
    req: Request,
    api_key_id: Uuid,
    key_hash: Vec<u8>,
    owner: Uuid,
) -> Response {
    let guard = ClaimGuard { state: state.clone(), api_key_id, key_hash: key_hash.clone(), owner, armed: true };
    let resp = next.run(req).await;
    let status = resp.status();
    if !replayable(status) {
        guard.release().await;
        return resp;
    }
    let fits = resp.body().size_hint().upper().is_some_and(|n| n <= MAX_CAPTURE_BYTES as u64);
    if !fits {
        tracing::warn!(
            limit = MAX_CAPTURE_BYTES,
            "answer too large to keep for Idempotency-Key; a retry will act again"
        );
        guard.release().await;
        return resp;
    }
    let (resp_parts, resp_body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(resp_body, MAX_CAPTURE_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            guard.release().await;
            return ApiError::Internal("the answer body could not be read".into()).into_response();
        }
    };
    let stored = Stored {
        status: status.as_u16(),
        headers: resp_parts
            .headers
            .iter()
            .filter(|(n, _)| !SKIPPED_HEADERS.contains(&n.as_str()))
            .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: base64::engine::general_purpose::STANDARD.encode(&bytes),
    };
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(&stored).unwrap_or_default());
    let envelope = state.keyring.encrypt(&plain, &aad(api_key_id, &key_hash));
    let result = records::finish(&state.db, api_key_id, &key_hash, owner, &envelope).await;
    let mut guard = guard;
    guard.armed = false;
    match result {
        Ok(true) => {}
        Ok(false) => tracing::warn!("the Idempotency-Key claim was lost before its answer was kept"),
        Err(e) => tracing::warn!(error = %e, "could not keep the answer for an Idempotency-Key"),
    }
    Response::from_parts(resp_parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_declared_write_operations_are_keyed() {
        let user = "/api/v1/users/alice/tokens";
        assert!(is_write_operation(&Method::PUT, user));
        assert!(is_write_operation(&Method::DELETE, user));
        assert!(is_write_operation(&Method::POST, "/api/v1/users/alice/tokens/invalidate"));
        assert!(!is_write_operation(&Method::POST, user), "PUT-only route: 405 stays 405");
        assert!(!is_write_operation(&Method::PUT, "/api/v1/users/alice/tokens/invalidate"));
        assert!(!is_write_operation(&Method::PUT, "/api/v1/nope"));
        assert!(!is_write_operation(&Method::PUT, "/api/v1/users//tokens"));
        assert!(is_write_operation(&Method::POST, "/api/v1/mfa/challenges"));
    }

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(super::valid_key(b"abc-123"));
        assert!(super::valid_key(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\""));
        assert!(super::valid_key(&[b'a'; 255]));
        assert!(!super::valid_key(b""));
        assert!(!super::valid_key(&[b'a'; 256]));
        assert!(!super::valid_key(b"a b"));
        assert!(!super::valid_key("é".as_bytes()));
    }
}
