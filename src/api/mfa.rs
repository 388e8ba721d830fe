//! `/api/v1/mfa/challenges`.

use axum::{extract::State, http::StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::{
    api::error::{ApiError, Problem},
    domain::{
        UserId,
        mfa::{Method, Verifier, mask_destination, validate_code},
    },
    services::mfa::{
        AttemptReserved, ChallengeView, DEFAULT_MAX_ATTEMPTS, DEFAULT_TTL_SECS, MAX_MAX_ATTEMPTS,
        MAX_RESUME_STATE_BYTES, MAX_TTL_SECS, NewChallenge, Verified,
    },
    state::AppState,
};

use super::extract::{ApiJson, Auth, IdPath, MfaScope, parse_uuid};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_challenge))
        .routes(routes!(get_challenge, cancel_challenge))
        .routes(routes!(verify_challenge))
        .routes(routes!(reserve_attempt))
        .routes(routes!(attempt_result))
        .routes(routes!(consume_challenge))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChallengeRequest {
    /// 1-128 characters of `[A-Za-z0-9._@:-]`.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")]
    pub user_id: String,
    /// Links the challenge to a login session (which moves `started` → `mfa_required`).
    pub session_id: Option<Uuid>,
    pub method: Method,
    /// Stored and returned masked only: an e-mail address (any method), a phone number of 4-20
    /// digits (not `email`), or a device name (`totp`, `push`); 1-254 characters.
    #[schema(min_length = 1, max_length = 254)]
    pub destination: Option<String>,
    pub verifier: Verifier,
    /// `service` only: the code to expect (4-16 letters or digits); absent → 6 random digits,
    /// returned once in the response.
    #[schema(value_type = Option<String>, pattern = r"^[A-Za-z0-9]{4,16}$")]
    pub code: Option<String>,
    /// Default 300, at most 600.
    #[schema(minimum = 1, maximum = 600)]
    #[serde(default, deserialize_with = "super::extract::integer")]
    pub ttl_seconds: Option<i64>,
    /// Default 5, at most 10.
    #[schema(minimum = 1, maximum = 10)]
    #[serde(default, deserialize_with = "super::extract::integer")]
    pub max_attempts: Option<i64>,
    /// Opaque login state to hand back on verification (up to 16 KiB of UTF-8), encrypted at rest.
    #[schema(max_length = 16384)]
    pub resume_state: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    /// The code the user typed: 4-16 letters or digits.
    #[schema(value_type = String, pattern = r"^[A-Za-z0-9]{4,16}$")]
    pub code: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptResultRequest {
    /// Whether Garmin accepted the code.
    pub success: bool,
}

fn code_of(raw: String) -> Result<Zeroizing<String>, ApiError> {
    let code = Zeroizing::new(raw);
    validate_code(&code).map_err(|m| ApiError::field("code", m))?;
    Ok(code)
}

/// Start an MFA challenge
///
/// The code is checked here (`verifier: service`, stored as an argon2id hash) or by Garmin
/// (`verifier: external`, with garth's `resume_state`).
#[utoipa::path(
    post, path = "/mfa/challenges", tag = "mfa",
    request_body = CreateChallengeRequest,
    responses(
        (status = 201, description = "Created: the challenge, pending", body = ChallengeView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`session_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_transition` (the session cannot take a challenge)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`too_many_challenges` or `too_many_failures`, with Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn create_challenge(
    auth: Auth<MfaScope>,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateChallengeRequest>,
) -> Result<(StatusCode, axum::Json<ChallengeView>), ApiError> {
    let user = UserId::parse(&req.user_id).map_err(|m| ApiError::field("user_id", m))?;
    let ttl_secs = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
        return Err(ApiError::field("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECS}")));
    }
    let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_MAX_ATTEMPTS).contains(&max_attempts) {
        return Err(ApiError::field("max_attempts", format!("must be between 1 and {MAX_MAX_ATTEMPTS}")));
    }
    let destination = req
        .destination
        .as_deref()
        .map(|d| mask_destination(req.method, d))
        .transpose()
        .map_err(|m| ApiError::field("destination", m))?;
    let code = match (req.verifier, req.code) {
        (Verifier::External, Some(_)) => {
            return Err(ApiError::field("code", "Garmin checks the code of an external challenge: do not send one"));
        }
        (_, None) => None,
        (Verifier::Service, Some(c)) => Some(code_of(c)?),
    };
    let resume_state = req.resume_state.map(Zeroizing::new);
    if resume_state.as_ref().is_some_and(|r| r.len() > MAX_RESUME_STATE_BYTES) {
        return Err(ApiError::field("resume_state", "must be at most 16 KiB"));
    }
    let view = state
        .mfa
        .create(
            &auth.ctx,
            NewChallenge {
                user,
                session_id: req.session_id,
                method: req.method,
                verifier: req.verifier,
                destination,
                code,
                ttl_secs,
                max_attempts,
                resume_state,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(view)))
}

/// Read a challenge
///
/// Never its code, hash or resume state.
#[utoipa::path(
    get, path = "/mfa/challenges/{id}", tag = "mfa",
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "The challenge", body = ChallengeView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn get_challenge(
    _auth: Auth<MfaScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
) -> Result<axum::Json<ChallengeView>, ApiError> {
    Ok(axum::Json(state.mfa.get(id).await?))
}

/// Cancel a challenge
///
/// A pending or verified challenge becomes `cancelled`.
#[utoipa::path(
    delete, path = "/mfa/challenges/{id}", tag = "mfa",
    params(("id" = Uuid, Path)),
    responses(
        (status = 204, description = "Cancelled (or already cancelled)"),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`challenge_not_pending`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`challenge_expired`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (with `field` when one is at fault)", body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "`challenge_locked`: no attempts are left", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn cancel_challenge(
    auth: Auth<MfaScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
) -> Result<StatusCode, ApiError> {
    state.mfa.cancel(&auth.ctx, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Check a code (service verifier)
///
/// Once an attempt is reserved, the check and its outcome (failure counted, audit, session moved)
/// complete even if the client goes away. A request that finds every attempt taken by checks
/// still running waits for them and answers for the outcome (409 when one of them verified it).
#[utoipa::path(
    post, path = "/mfa/challenges/{id}/verify", tag = "mfa",
    params(("id" = Uuid, Path)),
    request_body = CodeRequest,
    responses(
        (status = 200, description = "Verified: the code is right", body = Verified),
        (status = 400, description = "`invalid_code` with `attempts_remaining`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`challenge_not_pending` with `challenge_status`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`challenge_expired`: the challenge has expired; or the challenge's login session has ended (with `session_state`; the challenge is then cancelled)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "`challenge_locked`: the challenge failed (no attempts left, and no check still running)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: too many code checks are in progress (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn verify_challenge(
    auth: Auth<MfaScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CodeRequest>,
) -> Result<axum::Json<Verified>, ApiError> {
    let code = code_of(req.code)?;
    Ok(axum::Json(state.mfa.verify(&auth.ctx, id, code).await?))
}

/// Reserve an attempt (Garmin verifier)
///
/// Reserves one attempt at a Garmin-checked challenge and returns garth's resume state.
#[utoipa::path(
    post, path = "/mfa/challenges/{id}/attempts", tag = "mfa",
    params(("id" = Uuid, Path)),
    request_body = CodeRequest,
    responses(
        (status = 201, description = "Reserved: the attempt number and the resume state", body = AttemptReserved),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`duplicate_code` (no attempt used) or `challenge_not_pending`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`challenge_expired`: the challenge has expired; or the challenge's login session has ended (with `session_state`; the challenge is then cancelled)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "`challenge_locked`: no attempts are left", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn reserve_attempt(
    auth: Auth<MfaScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CodeRequest>,
) -> Result<(StatusCode, axum::Json<AttemptReserved>), ApiError> {
    let code = code_of(req.code)?;
    Ok((StatusCode::CREATED, axum::Json(state.mfa.attempt(&auth.ctx, id, code).await?)))
}

/// Record Garmin's answer to an attempt
///
/// A `success` for a challenge whose login session has ended (past its TTL, failed, cancelled,
/// superseded, authenticated) verifies nothing: 410 `challenge_expired` with `session_state`, and
/// the challenge is cancelled.
#[utoipa::path(
    post, path = "/mfa/challenges/{id}/attempts/{n}/result", tag = "mfa",
    params(("id" = Uuid, Path), ("n" = i64, Path, minimum = 1, description = "The attempt number (from 1)")),
    request_body = AttemptResultRequest,
    responses(
        (status = 200, description = "Recorded: the challenge after the result", body = ChallengeView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found` or `attempt_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`attempt_resolved` or `challenge_not_pending`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`challenge_expired`: the challenge has expired; or, for a `success` result, the challenge's login session has ended (with `session_state`; the result is recorded, the challenge is cancelled, not verified)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "`challenge_locked`: no attempts are left", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn attempt_result(
    auth: Auth<MfaScope>,
    axum::extract::Path((id, n)): axum::extract::Path<(String, String)>,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<AttemptResultRequest>,
) -> Result<axum::Json<ChallengeView>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let n: i64 =
        n.parse().ok().filter(|n| *n >= 1).ok_or_else(|| ApiError::field("n", "must be a positive integer"))?;
    Ok(axum::Json(state.mfa.attempt_result(&auth.ctx, id, n, req.success).await?))
}

/// Consume a verified challenge
///
/// `verified` becomes `consumed`, exactly once.
#[utoipa::path(
    post, path = "/mfa/challenges/{id}/consume", tag = "mfa",
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "Consumed: the challenge, now `consumed`", body = ChallengeView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`challenge_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`challenge_not_pending`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`challenge_expired`: the challenge has expired; or the challenge's login session has ended (with `session_state`; the challenge is then cancelled)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (with `field` when one is at fault)", body = Problem, content_type = "application/problem+json"),
        (status = 423, description = "`challenge_locked`: no attempts are left", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["mfa"]))
)]
async fn consume_challenge(
    auth: Auth<MfaScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
) -> Result<axum::Json<ChallengeView>, ApiError> {
    Ok(axum::Json(state.mfa.consume(&auth.ctx, id).await?))
}
