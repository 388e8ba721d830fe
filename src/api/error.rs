//! `ApiError`: every failure a client can see, rendered as RFC 9457 `application/problem+json`.
//!
//! Internal causes (database, crypto) are logged once here and answered with a generic body:
//! no SQL text, key material or token value ever reaches a response.
//!
//! The services speak [`ServiceError`]; `From<ServiceError>` below is the one table that gives
//! each domain refusal its status, problem code, detail, extra members and `Retry-After`.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::{
    services::error::{BusyCause, Missing, ServiceError},
    store::StoreError,
};

/// RFC 9457 problem details, plus a stable machine-readable `code` and per-code extra members.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`urn:centraldb-mfa:problem:<code>`).
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    pub detail: String,
    /// Stable error code, e.g. `validation_failed`, `tokens_not_found`.
    pub code: String,
    /// Extra members some problems carry (`field`, `current_version`, `reason`, ...).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed: {detail}")]
    Validation { detail: String, field: Option<String> },
    #[error("unauthenticated")]
    Unauthenticated { detail: &'static str },
    #[error("forbidden")]
    Forbidden { required_scope: &'static str },
    #[error("not found: {detail}")]
    NotFound { code: &'static str, detail: String },
    #[error("reauth required: {reason}")]
    ReauthRequired { reason: String },
    #[error("version conflict")]
    VersionConflict { current_version: Option<i64>, detail: String },
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("unavailable: {detail}")]
    Unavailable { detail: &'static str, retry_after_secs: u32 },
    #[error("insufficient storage")]
    InsufficientStorage,
    /// A stored ciphertext failed to decrypt (tampered, moved, or a wrong key).
    #[error("stored data could not be decrypted")]
    DecryptFailed,
    #[error("internal error: {0}")]
    Internal(String),
    /// Any other problem with its own status and code (conflicts, limits, locks, ...).
    #[error("{}: {}", .0.code, .0.detail)]
    Coded(Box<CodedProblem>),
}

#[derive(Debug)]
pub struct CodedProblem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn validation(detail: impl Into<String>) -> Self {
        Self::Validation { detail: detail.into(), field: None }
    }
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Validation { detail: detail.into(), field: Some(field.into()) }
    }
    pub fn coded(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self::Coded(Box::new(CodedProblem {
            status,
            code,
            detail: detail.into(),
            extra: Map::new(),
            retry_after: None,
        }))
    }
    /// Adds an extra member to a `Coded` problem (ignored on other variants).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Self::Coded(p) = &mut self {
            p.extra.insert(key.to_string(), value.into());
        }
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        if let Self::Coded(p) = &mut self {
            p.retry_after = Some(secs.max(1));
        }
        self
    }
    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::NotFound { code, detail: detail.into() }
    }
    pub fn tokens_not_found() -> Self {
        Self::NotFound { code: "tokens_not_found", detail: "no token bundle is stored for this user".into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::ReauthRequired { .. } => StatusCode::GONE,
            Self::VersionConflict { .. } => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Self::DecryptFailed | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Coded(p) => p.status,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "validation_failed",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound { code, .. } => code,
            Self::ReauthRequired { .. } => "reauth_required",
            Self::VersionConflict { .. } => "version_conflict",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Unavailable { .. } => "unavailable",
            Self::InsufficientStorage => "insufficient_storage",
            Self::DecryptFailed | Self::Internal(_) => "internal_error",
            Self::Coded(p) => p.code,
        }
    }

    pub fn to_problem(&self) -> Problem {
        let status = self.status();
        let mut extra = Map::new();
        let detail = match self {
            Self::Validation { detail, field } => {
                if let Some(f) = field {
                    extra.insert("field".into(), Value::String(f.clone()));
                }
                detail.clone()
            }
            Self::Unauthenticated { detail } => (*detail).to_string(),
            Self::Forbidden { required_scope } => {
                extra.insert("required_scope".into(), Value::String((*required_scope).into()));
                format!("this API key lacks the '{required_scope}' scope")
            }
            Self::NotFound { detail, .. } => detail.clone(),
            Self::ReauthRequired { reason } => {
                extra.insert("reason".into(), Value::String(reason.clone()));
                "the stored login can no longer be used; the user must log in again".into()
            }
            Self::VersionConflict { current_version, detail } => {
                extra.insert("current_version".into(), current_version.map_or(Value::Null, Value::from));
                detail.clone()
            }
            Self::PayloadTooLarge => "the request body exceeds the size limit (CENTRALDB_BODY_LIMIT_BYTES)".into(),
            Self::UnsupportedMediaType => "the request body must be JSON (Content-Type: application/json)".into(),
            Self::MethodNotAllowed => "this method is not allowed on this resource".into(),
            Self::Unavailable { detail, .. } => (*detail).to_string(),
            Self::InsufficientStorage => "the database has no space left; try again later".into(),
            Self::DecryptFailed | Self::Internal(_) => "an internal error occurred; it has been logged".into(),
            Self::Coded(p) => {
                extra.extend(p.extra.clone());
                p.detail.clone()
            }
        };
        Problem {
            type_: format!("urn:centraldb-mfa:problem:{}", self.code()),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail,
            code: self.code().to_string(),
            extra,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => {
                Self::Unavailable { detail: "the database is unavailable; try again shortly", retry_after_secs: 1 }
            }
            StoreError::Full => Self::InsufficientStorage,
            StoreError::Other(msg) => Self::Internal(msg),
        }
    }
}

/// The HTTP answer to every refusal of a service.
impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::NotFound(Missing::Tokens) => Self::tokens_not_found(),
            ServiceError::NotFound(Missing::Session) => Self::not_found("session_not_found", "no such session"),
            ServiceError::NotFound(Missing::Challenge) => Self::not_found("challenge_not_found", "no such challenge"),
            ServiceError::NotFound(Missing::Attempt(n)) => {
                Self::not_found("attempt_not_found", format!("no attempt {n} on this challenge"))
            }
            ServiceError::VersionConflict { current_version, expected_absent } => {
                let detail = match (expected_absent, current_version) {
                    (true, _) => "a token bundle is already stored (If-None-Match: *)".to_string(),
                    (false, None) => "no token bundle is stored for this user (If-Match)".to_string(),
                    (false, Some(v)) => format!("the stored version is {v} (If-Match)"),
                };
                Self::VersionConflict { current_version, detail }
            }
            ServiceError::LeaseHeld { holder, expires_at, retry_after_secs } => {
                Self::coded(StatusCode::CONFLICT, "lease_held", "another worker holds the refresh lease for this user")
                    .with("holder", holder)
                    .with("expires_at", expires_at.map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
                    .retry_after(retry_after_secs)
            }
            ServiceError::LeaseLost => Self::coded(
                StatusCode::CONFLICT,
                "lease_lost",
                "this fence is not the live lease any more (it expired or was granted to another worker); nothing was written",
            ),
            ServiceError::ChallengeExpired { session_state: None } => {
                Self::coded(StatusCode::GONE, "challenge_expired", "the challenge has expired; start a new one")
            }
            ServiceError::ChallengeExpired { session_state: Some(state) } => Self::coded(
                StatusCode::GONE,
                "challenge_expired",
                format!("the login session of this challenge has ended ({})", state.as_str()),
            )
            .with("session_state", state.as_str()),
            ServiceError::ChallengeLocked => {
                Self::coded(StatusCode::LOCKED, "challenge_locked", "no attempts are left; start a new login")
            }
            ServiceError::ChallengeNotPending { status } => Self::coded(
                StatusCode::CONFLICT,
                "challenge_not_pending",
                format!("the challenge is {}", status.as_str()),
            )
            .with("challenge_status", status.as_str()),
            ServiceError::InvalidCode { attempts_remaining } => {
                let err = Self::coded(StatusCode::BAD_REQUEST, "invalid_code", "the code is not right");
                match attempts_remaining {
                    Some(n) => err.with("attempts_remaining", n),
                    None => err,
                }
            }
            ServiceError::DuplicateCode => Self::coded(
                StatusCode::CONFLICT,
                "duplicate_code",
                "this code was already tried on this challenge; no attempt was used",
            ),
            ServiceError::AttemptResolved { attempt } => Self::coded(
                StatusCode::CONFLICT,
                "attempt_resolved",
                format!("the result of attempt {attempt} was already recorded"),
            ),
            ServiceError::InvalidTransition { from, to } => Self::coded(
                StatusCode::CONFLICT,
                "invalid_transition",
                format!("a session cannot move from {} to {}", from.as_str(), to.as_str()),
            )
            .with("from", from.as_str())
            .with("to", to.as_str()),
            ServiceError::TooManyFailures { retry_after_secs } => Self::coded(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                "too many failed MFA attempts for this user; try again later",
            )
            .retry_after(retry_after_secs),
            ServiceError::TooManyChallenges { pending, retry_after_secs } => Self::coded(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_challenges",
                format!("this user already has {pending} pending challenges"),
            )
            .retry_after(retry_after_secs),
            ServiceError::Busy(BusyCause::CodeChecks) => {
                Self::Unavailable { detail: "too many code checks are in progress", retry_after_secs: 1 }
            }
            ServiceError::Busy(BusyCause::PendingChallenges) => Self::Unavailable {
                detail: "too many challenges are pending service-wide; try again shortly",
                retry_after_secs: 5,
            },
            ServiceError::Busy(BusyCause::VersionWaiters) => {
                Self::Unavailable { detail: "too many readers are waiting for new versions", retry_after_secs: 1 }
            }
            ServiceError::ReauthRequired { reason } => Self::ReauthRequired { reason },
            ServiceError::DecryptFailed => Self::DecryptFailed,
            ServiceError::InvalidField { field, detail } => Self::field(field, detail),
            ServiceError::Invalid(detail) => Self::validation(detail),
            ServiceError::Store(e) => e.into(),
            ServiceError::Internal(cause) => Self::Internal(cause),
        }
    }
}

/// Renders a problem+json response; used for errors and by middleware.
pub fn problem_response(status: StatusCode, problem: &Problem) -> Response {
    let body = serde_json::to_vec(problem).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    resp.extensions_mut().insert(ProblemCode(problem.code.clone()));
    resp
}

/// The problem code of an error response, for the request log line (a response extension).
#[derive(Debug, Clone)]
pub struct ProblemCode(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(cause) => tracing::error!(cause = %cause, "internal error"),
            Self::DecryptFailed => tracing::error!("stored ciphertext failed to decrypt"),
            Self::Unavailable { detail, .. } => {
                let cause = crate::telemetry::unavailable_cause(detail);
                metrics::counter!(crate::telemetry::UNAVAILABLE, "cause" => cause).increment(1);
                tracing::warn!(detail, cause, "answering 503");
            }
            _ => {}
        }
        let mut resp = problem_response(self.status(), &self.to_problem());
        let headers = resp.headers_mut();
        match &self {
            Self::Unavailable { retry_after_secs, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::InsufficientStorage => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(30u32));
            }
            Self::Coded(p) => {
                if let Some(secs) = p.retry_after {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            Self::Unauthenticated { .. } => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::mfa::{ChallengeStatus, SessionState};

    /// A refusal's domain reason (what audit details and metrics record) is the problem code the
    /// API answers it with, for every variant.
    #[test]
    fn every_service_reason_is_its_problem_code() {
        let all = vec![
            ServiceError::NotFound(Missing::Tokens),
            ServiceError::NotFound(Missing::Session),
            ServiceError::NotFound(Missing::Challenge),
            ServiceError::NotFound(Missing::Attempt(2)),
            ServiceError::VersionConflict { current_version: Some(3), expected_absent: false },
            ServiceError::LeaseHeld { holder: "w".into(), expires_at: None, retry_after_secs: 0 },
            ServiceError::LeaseLost,
            ServiceError::ChallengeExpired { session_state: None },
            ServiceError::ChallengeExpired { session_state: Some(SessionState::Expired) },
            ServiceError::ChallengeLocked,
            ServiceError::ChallengeNotPending { status: ChallengeStatus::Verified },
            ServiceError::InvalidCode { attempts_remaining: Some(1) },
            ServiceError::DuplicateCode,
            ServiceError::AttemptResolved { attempt: 1 },
            ServiceError::InvalidTransition { from: SessionState::Failed, to: SessionState::Cancelled },
            ServiceError::TooManyFailures { retry_after_secs: 9 },
            ServiceError::TooManyChallenges { pending: 3, retry_after_secs: 0 },
            ServiceError::Busy(BusyCause::CodeChecks),
            ServiceError::Busy(BusyCause::PendingChallenges),
            ServiceError::Busy(BusyCause::VersionWaiters),
            ServiceError::ReauthRequired { reason: "refresh_expired".into() },
            ServiceError::DecryptFailed,
            ServiceError::field("f", "bad"),
            ServiceError::invalid("bad"),
            ServiceError::Store(StoreError::Unavailable("x".into())),
            ServiceError::Store(StoreError::Full),
            ServiceError::Store(StoreError::Other("x".into())),
            ServiceError::Internal("x".into()),
        ];
        for e in all {
            let reason = e.reason();
            assert_eq!(ApiError::from(e).code(), reason);
        }
    }

    #[test]
    fn lease_held_carries_holder_expiry_and_retry_after() {
        let expires_at = chrono::DateTime::parse_from_rfc3339("2026-01-31T12:00:00Z").unwrap().to_utc();
        let e = ApiError::from(ServiceError::LeaseHeld {
            holder: "worker-1".into(),
            expires_at: Some(expires_at),
            retry_after_secs: 0,
        });
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let p = e.to_problem();
        assert_eq!(p.extra["holder"], "worker-1");
        assert_eq!(p.extra["expires_at"], "2026-01-31T12:00:00.000000Z");
        let resp = e.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
