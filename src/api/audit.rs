//! `/api/v1/audit/events`, `/api/v1/audit/verify`, `/api/v1/audit/checkpoint` and
//! `/api/v1/audit/public-key`. Reading the audit log is not itself audited (refused requests
//! are: the `Auth` extractor records them).

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::error::{ApiError, Problem},
    domain::UserId,
    services::audit::{self, AuditEvent, Checkpoint, EventQuery, Outcome, PublicKey, VerifyReport},
    state::AppState,
};

use super::extract::{Admin, ApiQuery, AuditRead, Auth};

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(verify_chain))
        .routes(routes!(get_checkpoint))
        .routes(routes!(public_keys))
}

/// Query of `GET /audit/events`. Every filter is optional; they combine with AND.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this user's events.
    #[param(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._@:-]+$")]
    pub user_id: Option<String>,
    /// Only events of this type, e.g. `token.read`, `auth.denied`.
    #[serde(rename = "type")]
    #[param(min_length = 1, max_length = 100, pattern = r"^[A-Za-z0-9._:-]+$")]
    pub type_: Option<String>,
    /// Only events with this outcome: `success`, `failure`, `denied` or `error`.
    #[param(value_type = Option<AuditOutcome>, inline)]
    pub outcome: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<String>,
    /// Only events before this time (RFC 3339; exclusive).
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 1000, default = 100)]
    pub limit: Option<String>,
    /// Cursor: only events with a `seq` greater than this (pass the previous page's `next_after`).
    #[param(value_type = Option<i64>, minimum = 0)]
    pub after: Option<String>,
}

/// Documentation only: the outcomes an event can have.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub enum AuditOutcome {
    Success,
    Failure,
    Denied,
    Error,
}

/// A page of events, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventsPage {
    pub events: Vec<AuditEvent>,
    /// The `after` of the next page when this page is full; `null` when there is no more.
    pub next_after: Option<i64>,
}

fn parse_time(field: &'static str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::field(field, format!("{field} must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")))
    })
    .transpose()
}

fn parse_int(
    field: &'static str,
    v: Option<&str>,
    range: std::ops::RangeInclusive<i64>,
    what: &str,
) -> Result<Option<i64>, ApiError> {
    v.map(|s| {
        s.parse::<i64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| ApiError::field(field, format!("{field} must be {what}")))
    })
    .transpose()
}

/// List audit events
///
/// Oldest first, with optional filters and a `seq` cursor.
#[utoipa::path(
    get, path = "/audit/events", tag = "audit",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events; `next_after` is the cursor of the next page", body = AuditEventsPage),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`validation_failed` naming the `field`", body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["audit:read"]))
)]
async fn list_events(
    _auth: Auth<AuditRead>,
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<AuditEventsPage>, ApiError> {
    let user_id = q.user_id.as_deref().map(UserId::parse).transpose().map_err(|m| ApiError::field("user_id", m))?;
    if let Some(t) = q.type_.as_deref()
        && (t.is_empty()
            || t.len() > 100
            || !t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(ApiError::field("type", "type must be 1-100 characters of letters, digits, '.', '_', ':' and '-'"));
    }
    let outcome = q
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o)
                .ok_or_else(|| ApiError::field("outcome", "outcome must be one of success, failure, denied, error"))
        })
        .transpose()?;
    let since = parse_time("since", q.since.as_deref())?;
    let until = parse_time("until", q.until.as_deref())?;
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(ApiError::field("until", "until must be later than since"));
    }
    let limit =
        parse_int("limit", q.limit.as_deref(), 1..=MAX_LIMIT, "an integer from 1 to 1000")?.unwrap_or(DEFAULT_LIMIT);
    let after = parse_int("after", q.after.as_deref(), 0..=i64::MAX, "a non-negative integer (a seq)")?.unwrap_or(0);
    let query = EventQuery { after, user: user_id.as_ref(), type_: q.type_.as_deref(), outcome, since, until, limit };
    let events = audit::events(&state.db, &query).await?;
    let next_after = if events.len() as i64 == limit { events.last().map(|e| e.seq) } else { None };
    Ok(Json(AuditEventsPage { events, next_after }))
}

/// Verify the audit log
///
/// Checks the audit log's HMAC chains: every event's seal, positions without gaps in each chain,
/// and every chain head. Finds edited, deleted (including from the end), inserted and reordered
/// events, naming the first bad seq and its chain.
#[utoipa::path(
    get, path = "/audit/verify", tag = "audit",
    responses(
        (status = 200, description = "The result; `ok: false` names `first_bad_seq` (when an event is at fault) and the `reason`", body = VerifyReport),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
async fn verify_chain(_auth: Auth<Admin>, State(state): State<AppState>) -> Result<Json<VerifyReport>, ApiError> {
    Ok(Json(audit::verify(&state.db, &state.keyring).await?))
}

/// Get a signed checkpoint of the audit chains
///
/// Every chain's head (chain, position, seq, HMAC) and the time, signed with Ed25519 under a key
/// derived from the active keyring key. Keep it elsewhere; `audit verify --checkpoint FILE` later
/// finds any event it covers that was removed, changed or rewound, even if every head was
/// rewritten consistently.
#[utoipa::path(
    get, path = "/audit/checkpoint", tag = "audit",
    responses(
        (status = 200, description = "The signed checkpoint", body = Checkpoint),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 503, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["audit:read"]))
)]
async fn get_checkpoint(_auth: Auth<AuditRead>, State(state): State<AppState>) -> Result<Json<Checkpoint>, ApiError> {
    Ok(Json(audit::checkpoint(&state.db, &state.keyring).await?))
}

/// The checkpoint verification keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublicKeys {
    /// One per keyring key, the active one first.
    pub keys: Vec<PublicKey>,
}

/// Get the checkpoint public keys
///
/// The Ed25519 public keys checkpoints are signed with, by key id (the active key first).
#[utoipa::path(
    get, path = "/audit/public-key", tag = "audit",
    responses(
        (status = 200, description = "The public keys", body = PublicKeys),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["audit:read"]))
)]
async fn public_keys(_auth: Auth<AuditRead>, State(state): State<AppState>) -> Json<PublicKeys> {
    Json(PublicKeys { keys: audit::public_keys(&state.keyring) })
}
