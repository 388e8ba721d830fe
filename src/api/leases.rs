//! `/api/v1/users/{user_id}/tokens/lease`: one refresh at a time per user.

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::error::{ApiError, Problem},
    services::leases::{DEFAULT_TTL_SECS, LeaseView, MAX_TTL_SECS},
    state::AppState,
};

use super::{
    extract::{ApiJson, Auth, TokensWrite, UserPath},
    tokens::lease_fence,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(acquire_lease, release_lease))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Who asks (a worker name), 1-128 characters (surrounding whitespace is trimmed), no control
    /// characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub holder: String,
    /// 1-300, default 30.
    #[schema(minimum = 1, maximum = 300)]
    #[serde(default, deserialize_with = "super::extract::integer")]
    pub ttl_seconds: Option<i64>,
}

/// Acquire the refresh lease
///
/// Or get your own live lease back, extended, never shortened.
#[utoipa::path(
    post, path = "/users/{user_id}/tokens/lease", tag = "tokens",
    params(("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")),
    request_body = LeaseRequest,
    responses(
        (status = 201, description = "Granted", body = LeaseView),
        (status = 200, description = "The same holder's live lease, extended", body = LeaseView),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`tokens_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`reauth_required` (with `reason`): the bundle was invalidated or is past its refresh expiry, so there is nothing to refresh", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`lease_held` with `holder`, `expires_at` and Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`: the body exceeds CENTRALDB_BODY_LIMIT_BYTES", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported_media_type`: the body is not `Content-Type: application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:write"]))
)]
async fn acquire_lease(
    auth: Auth<TokensWrite>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<(StatusCode, axum::Json<LeaseView>), ApiError> {
    let holder = req.holder.trim();
    if holder.is_empty() || holder.chars().count() > 128 || holder.chars().any(char::is_control) {
        return Err(ApiError::field("holder", "must be 1-128 characters without control characters"));
    }
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::field("ttl_seconds", format!("must be between 1 and {MAX_TTL_SECS}")));
    }
    let (lease, created) = state.leases.acquire(&auth.ctx, &user, holder, ttl).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, axum::Json(lease)))
}

/// Release the refresh lease early
#[utoipa::path(
    delete, path = "/users/{user_id}/tokens/lease", tag = "tokens",
    params(
        ("user_id" = String, Path, description = "1-128 characters of [A-Za-z0-9._@:-]", min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$"),
        ("X-Lease-Fence" = i64, Header, minimum = 1, description = "The lease's fence")
    ),
    responses(
        (status = 204, description = "Released"),
        (status = 401, description = "`unauthenticated`: no API key, a malformed Authorization header or an unknown/revoked key (with `WWW-Authenticate: Bearer`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the API key lacks the scope (with `required_scope`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`lease_lost`: that fence is not the live lease", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: the database is unreachable or the request timed out (with Retry-After)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "`insufficient_storage`: the database has no space left (with Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["tokens:write"]))
)]
async fn release_lease(
    auth: Auth<TokensWrite>,
    UserPath(user): UserPath,
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let fence = lease_fence(&headers)?.ok_or_else(|| ApiError::field("x-lease-fence", "is required"))?;
    state.leases.release(&auth.ctx, &user, fence).await?;
    Ok(StatusCode::NO_CONTENT)
}
