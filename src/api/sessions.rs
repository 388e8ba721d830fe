//! `/api/v1/sessions` and `/api/v1/users/{user_id}/sessions`.

use axum::{extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::error::{ApiError, Problem},
    domain::{UserId, mfa::SessionState},
    services::sessions::{ClientInfo, DEFAULT_TTL_SECS, MAX_TTL_SECS, SessionView},
    state::AppState,
};

use super::extract::{ApiJson, Auth, IdPath, SessionsScope, UserPath};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_session))
        .routes(routes!(get_session, cancel_session))
        .routes(routes!(transition_session))
        .routes(routes!(list_user_sessions))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// 1-128 characters of `[A-Za-z0-9._@:-]`.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")]
    pub user_id: String,
    /// Default 900, at most 86400.
    #[schema(minimum = 1, maximum = 86400)]
    #[serde(default, deserialize_with = "super::extract::integer")]
    pub ttl_seconds: Option<i64>,
    #[serde(default, deserialize_with = "super::extract::object_only")]
    pub client: Option<ClientInfoRequest>,
}

/// What the client tells about itself (stored as given, shown back; other members are ignored).
#[derive(Deserialize, ToSchema)]
pub struct ClientInfoRequest {
    /// Up to 64 characters, no control characters.
    #[schema(max_length = 64, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub ip: Option<String>,
    /// Up to 512 characters, no control characters.
    #[schema(max_length = 512, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub user_agent: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransitionRequest {
    pub to: SessionState,
    /// Up to 200 characters, no control characters.
    #[schema(max_length = 200, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")]
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub user_id: String,
    /// Active sessions, newest first.
    pub sessions: Vec<SessionView>,
}

fn short_text(field: &str, v: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    match v {
        Some(s) if s.chars().count() > max || s.chars().any(char::is_control) => {
            Err(ApiError::field(field, format!("must be at most {max} characters without control characters")))
        }
        other => Ok(other),
    }
}

/// Start a login flow
///
/// The user's other active flows end as `superseded`.
#[utoipa::path(
    post, path = "/sessions", tag = "sessions",
    request_body = CreateSessionRequest,
    responses(
        (status = 201, description = "Created: the session, `started`", body = SessionView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["sessions"]))
)]
async fn create_session(
    auth: Auth<SessionsScope>,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateSessionRequest>,
) -> Result<(StatusCode, axum::Json<SessionView>), ApiError> {
    let user = UserId::parse(&req.user_id).map_err(|m| ApiError::field("user_id", m))?;
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::field("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECS}")));
    }
    let client = match req.client {
        Some(c) => Some(ClientInfo {
            ip: short_text("client.ip", c.ip, 64)?,
            user_agent: short_text("client.user_agent", c.user_agent, 512)?,
        }),
        None => None,
    };
    let view = state.sessions.create(&auth.ctx, &user, ttl, client).await?;
    Ok((StatusCode::CREATED, axum::Json(view)))
}

/// Read a session
#[utoipa::path(
    get, path = "/sessions/{id}", tag = "sessions",
    params(("id" = uuid::Uuid, Path)),
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`session_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["sessions"]))
)]
async fn get_session(
    _auth: Auth<SessionsScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
) -> Result<axum::Json<SessionView>, ApiError> {
    Ok(axum::Json(state.sessions.get(id).await?))
}

/// Cancel a session
///
/// Its live challenges are cancelled too.
#[utoipa::path(
    delete, path = "/sessions/{id}", tag = "sessions",
    params(("id" = uuid::Uuid, Path)),
    responses(
        (status = 204, description = "Cancelled (or already cancelled)"),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`session_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_transition`: the session already ended otherwise", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` (with `field` when one is at fault)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["sessions"]))
)]
async fn cancel_session(
    auth: Auth<SessionsScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
) -> Result<StatusCode, ApiError> {
    state.sessions.cancel(&auth.ctx, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Move a session to another state
///
/// Along the state machine: `started`, `mfa_required`, `mfa_verified`, `authenticated`, or an end
/// state.
#[utoipa::path(
    post, path = "/sessions/{id}/transition", tag = "sessions",
    params(("id" = uuid::Uuid, Path)),
    request_body = TransitionRequest,
    responses(
        (status = 200, description = "Moved: the session in its new state", body = SessionView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`session_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`invalid_transition` (with `from`, `to`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["sessions"]))
)]
async fn transition_session(
    auth: Auth<SessionsScope>,
    IdPath(id): IdPath,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TransitionRequest>,
) -> Result<axum::Json<SessionView>, ApiError> {
    let reason = short_text("reason", req.reason, 200)?;
    Ok(axum::Json(state.sessions.transition(&auth.ctx, id, req.to, reason.as_deref()).await?))
}

/// List a user's active sessions
///
/// Newest first.
#[utoipa::path(
    get, path = "/users/{user_id}/sessions", tag = "sessions",
    params(("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")),
    responses(
        (status = 200, description = "The sessions (empty when there are none)", body = SessionList),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["sessions"]))
)]
async fn list_user_sessions(
    _auth: Auth<SessionsScope>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
) -> Result<axum::Json<SessionList>, ApiError> {
    let sessions = state.sessions.list_active(&user).await?;
    Ok(axum::Json(SessionList { user_id: user.to_string(), sessions }))
}
