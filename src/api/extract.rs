//! Extractors whose rejections are `ApiError`s, so every bad request gets the same problem shape.

use std::{
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
};

use axum::{
    extract::{
        ConnectInfo, FromRequest, FromRequestParts, OriginalUri, Path, Query, Request, rejection::JsonRejection,
    },
    http::{StatusCode, header::AUTHORIZATION, request::Parts},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{
    api::error::ApiError,
    domain::{Scope, UserId},
    services::{
        api_keys::{AuthError, AuthFailure, CacheHit},
        audit::AuditContext,
        refusals::{self, Verdict},
    },
    state::AppState,
    store,
};

use super::middleware::RequestId;

/// JSON body; malformed JSON or a wrong shape is a 422 problem, an oversized body a 413, a
/// missing or other content type a 415. Every body of this API is a JSON object: an array (which
/// serde would otherwise take for a struct, field by field) or a scalar is a 422.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // As `axum::Json`, but keeping the text to refuse a key given twice (serde_json would
        // silently keep the last one): the body is read only after the content type is checked.
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            other => ApiError::validation(format!("request body could not be read: {other}")),
        })?;
        let axum::Json(value) = axum::Json::<Value>::from_bytes(&bytes)?;
        if let Some(key) = crate::domain::json::duplicate_key(&bytes) {
            return Err(ApiError::field(key.clone(), format!("{key} appears twice")));
        }
        if !value.is_object() {
            return Err(ApiError::validation("request body must be a JSON object"));
        }
        serde_json::from_value(value).map(Self).map_err(|e| {
            ApiError::validation(format!("request body has the wrong shape: {}", redact_quoted(&e.to_string())))
        })
    }
}

/// `application/json` or any `application/*+json`, with any parameters (what `axum::Json` accepts).
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(mime) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
    else {
        return false;
    };
    mime.type_() == "application" && (mime.subtype() == "json" || mime.suffix().is_some_and(|s| s == "json"))
}

/// `deserialize_with` for a nested object field: an array is refused (serde would take it for
/// a struct, field by field).
pub fn object_only<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::{Deserialize, de::Error};
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Object(_)) => serde_json::from_value(v).map(Some).map_err(D::Error::custom),
        Some(_) => Err(D::Error::custom("expected a JSON object")),
    }
}

/// `deserialize_with` for an optional integer field: JSON Schema counts `30.0` as the integer
/// 30, so a number without a fractional part is accepted in either spelling.
pub fn integer<'de, D>(d: D) -> Result<Option<i64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::{Deserialize, de::Error};
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| D::Error::custom("expected an integer")),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::validation(format!("request body is not valid JSON: {}", redact_quoted(&e.body_text())))
            }
            JsonRejection::JsonDataError(e) => {
                ApiError::validation(format!("request body has the wrong shape: {}", redact_quoted(&e.body_text())))
            }
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            other => ApiError::validation(format!("request body could not be read: {}", other.status())),
        }
    }
}

/// serde messages quote the offending value (`invalid type: string "..."`, ``invalid value:
/// integer `123456` ``, ``unknown variant `x` ``); a value may be a secret, so it is never
/// echoed. The value runs from the marker to the last `, expected` (what follows is built from
/// our own types, never from the input), so quotes, backticks or that very phrase inside the
/// value cannot end it early. Only the kind of value (`string`, `integer`, ...) is kept.
fn redact_quoted(msg: &str) -> String {
    const KINDS: [&str; 10] =
        ["string", "integer", "floating", "boolean", "map", "sequence", "null", "unit", "character", "byte"];
    for marker in ["invalid type: ", "invalid value: ", "unknown variant "] {
        let Some(at) = msg.find(marker) else { continue };
        let (head, rest) = msg.split_at(at + marker.len());
        let tail = rest.rfind(", expected").map_or("", |i| &rest[i..]);
        let kind = rest.split(' ').next().filter(|k| KINDS.contains(k) && marker != "unknown variant ");
        return match kind {
            Some(kind) => format!("{head}{kind} …{tail}"),
            None => format!("{head}…{tail}"),
        };
    }
    // Anything else: drop whatever is quoted.
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        if c == '"' {
            if !in_quote {
                out.push_str("\"…\"");
            }
            in_quote = !in_quote;
        } else if !in_quote {
            out.push(c);
        }
    }
    out
}

/// Query string; a wrong value is a 422 problem.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e| ApiError::validation(format!("invalid query string: {}", redact_quoted(&e.body_text()))))
    }
}

/// The `{user_id}` path segment, validated.
pub struct UserPath(pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for UserPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::field("user_id", "user_id in the path is not valid"))?;
        UserId::parse(&raw).map(Self).map_err(|m| ApiError::field("user_id", m))
    }
}

/// A UUID from a path segment; anything else is a 422 naming `field`.
pub fn parse_uuid(field: &str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::field(field, format!("{field} must be a UUID")))
}

/// The `{id}` path segment, a UUID.
pub struct IdPath(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::field("id", "id in the path is not valid"))?;
        parse_uuid("id", &raw).map(Self)
    }
}

/// The audit context of a request: request id and peer address (the actor comes from `Auth`).
pub fn audit_context(parts: &Parts) -> AuditContext {
    AuditContext {
        actor: None,
        request_id: parts.extensions.get::<RequestId>().map(|r| r.0.clone()),
        source_ip: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string()),
    }
}

/// A scope an endpoint requires, as a type (so `Auth<TokensRead>` documents itself).
pub trait RequiredScope: Send + Sync + 'static {
    const SCOPE: Scope;
}

macro_rules! scope_marker {
    ($($name:ident => $scope:expr),* $(,)?) => {$(
        pub struct $name;
        impl RequiredScope for $name { const SCOPE: Scope = $scope; }
    )*};
}

scope_marker! {
    TokensRead => Scope::TokensRead,
    TokensWrite => Scope::TokensWrite,
    MfaScope => Scope::Mfa,
    SessionsScope => Scope::Sessions,
    AuditRead => Scope::AuditRead,
    Admin => Scope::Admin,
}

/// An authenticated caller holding scope `S`. Rejections (401/403) are audited: the first few
/// per source address and interval one by one, later ones summed (`services::refusals`); a
/// source past its refusal budget is answered 429 without a database write.
pub struct Auth<S> {
    pub ctx: AuditContext,
    _scope: PhantomData<S>,
}

impl<S: RequiredScope> FromRequestParts<AppState> for Auth<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let mut ctx = audit_context(parts);
        // Requests without a peer address (in-process callers) share one source.
        let source = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let throttled = state.refusals.throttled(source, store::now()).is_some();
        let presented = match parts.headers.get(AUTHORIZATION) {
            None => Err(AuthFailure::Missing),
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer ").or_else(|| s.strip_prefix("bearer ")))
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 512)
                .ok_or(AuthFailure::Malformed),
        };
        let result = match presented {
            // A source over its refusal budget: only a key verified before (in the cache) goes
            // on, re-checked with a query if its cache period is over (a revoked key leaves the
            // cache then); any other key is refused without a query.
            Ok(key) if throttled => match state.api_keys.cached(key) {
                CacheHit::Fresh(p) => Ok(p),
                CacheHit::Stale => state.api_keys.authenticate(key).await,
                CacheHit::Unknown => Err(AuthError::Failure(AuthFailure::Unknown)),
            },
            Ok(key) => state.api_keys.authenticate(key).await,
            Err(f) => Err(AuthError::Failure(f)),
        };
        let uri = parts.extensions.get::<OriginalUri>().map(|u| &u.0).unwrap_or(&parts.uri);
        let path: String = uri.path().chars().take(256).collect();
        if let Ok(p) = &result {
            // The request line (`request finished`) names the key, for 2xx and refusals alike.
            tracing::Span::current().record("key_id", tracing::field::display(p.key_id));
        }
        match result {
            Ok(p) if p.scopes.allows(S::SCOPE) => {
                ctx.actor = Some(format!("key:{}", p.key_id));
                Ok(Self { ctx, _scope: PhantomData })
            }
            Ok(p) => {
                ctx.actor = Some(format!("key:{}", p.key_id));
                let details = json!({"reason": "insufficient_scope", "required_scope": S::SCOPE.as_str(),
                                     "method": parts.method.as_str(), "path": path});
                Err(refuse(
                    state,
                    &ctx,
                    source,
                    "insufficient_scope",
                    details,
                    ApiError::Forbidden { required_scope: S::SCOPE.as_str() },
                )
                .await)
            }
            Err(AuthError::Failure(f)) => {
                let details = json!({"reason": f.as_str(), "method": parts.method.as_str(), "path": path});
                let err = ApiError::Unauthenticated {
                    detail: match f {
                        AuthFailure::Missing => "an API key is required: Authorization: Bearer <key>",
                        AuthFailure::Malformed => "the Authorization header must be 'Bearer <key>'",
                        AuthFailure::Unknown | AuthFailure::Revoked => "the API key is not valid",
                    },
                };
                Err(refuse(state, &ctx, source, f.as_str(), details, err).await)
            }
            Err(AuthError::Store(e)) => Err(e.into()),
        }
    }
}

/// A refused request: audited on its own, summed for its source, or (over the budget) turned
/// into a 429 with `Retry-After`. Only the first writes to the database.
async fn refuse(
    state: &AppState,
    ctx: &AuditContext,
    source: Option<IpAddr>,
    reason: &'static str,
    details: Value,
    err: ApiError,
) -> ApiError {
    match state.refusals.refuse(source, reason, store::now()) {
        Verdict::Record => {
            deny(state, ctx, details).await;
            err
        }
        Verdict::Summed => err,
        Verdict::Throttled { retry_after } => ApiError::coded(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "too many refused requests from this address; try again later",
        )
        .retry_after(retry_after),
    }
}

/// Documents the refusal budget's 429 on every operation that can refuse a caller (those with
/// a 401), unless the operation documents its own 429 already.
pub struct RefusalBudgetResponses;

impl utoipa::Modify for RefusalBudgetResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        for item in openapi.paths.paths.values_mut() {
            for op in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                let r = &mut op.responses.responses;
                if r.contains_key("401") && !r.contains_key("429") {
                    let response = ResponseBuilder::new()
                        .description(
                            "`too_many_requests`: this address is past its refusal budget \
                             (CENTRALDB_REFUSAL_BUDGET per CENTRALDB_REFUSAL_INTERVAL_SECS), with Retry-After",
                        )
                        .content(
                            "application/problem+json",
                            ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                        )
                        .build();
                    r.insert("429".to_string(), response.into());
                }
            }
        }
    }
}

/// Audits a refused request. A denial changes nothing, so when the audit row cannot be written
/// the refusal is still answered (and the failure logged).
async fn deny(state: &AppState, ctx: &AuditContext, details: serde_json::Value) {
    if let Err(e) = refusals::record_denial(&state.db, &state.keyring, ctx, details).await {
        tracing::warn!(error = %e, "could not write the audit row for a denied request");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_values_are_not_echoed() {
        let m = super::redact_quoted(r#"invalid type: string "s3cret", expected a boolean at line 1"#);
        assert!(!m.contains("s3cret"));
        assert!(m.contains("expected a boolean"));
        let m = super::redact_quoted("to: unknown variant `s3cret`, expected one of `started`, `failed` at line 1");
        assert!(!m.contains("s3cret") && m.contains("expected one of `started`"));
    }
}
