//! Operations routes (no auth): `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    api::error::{ApiError, Problem},
    state::AppState,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz)).routes(routes!(metrics))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub status: &'static str,
    /// `sqlite` or `postgres`.
    pub database: &'static str,
    /// The key id new ciphertexts are written under.
    pub active_key_id: String,
}

/// Liveness probe
///
/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is up", body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// Readiness probe
///
/// The database answers and the keyring is loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready: the database answers", body = Readiness),
    (status = 503, description = "`unavailable`: the database is not reachable (with Retry-After)", body = Problem, content_type = "application/problem+json"),
))]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<Readiness>, ApiError> {
    let unavailable = || ApiError::Unavailable { detail: "the database is not reachable", retry_after_secs: 1 };
    match tokio::time::timeout(Duration::from_secs(2), state.db.ping()).await {
        Ok(Ok(())) => Ok(axum::Json(Readiness {
            status: "ready",
            database: state.db.backend(),
            active_key_id: state.keyring.active_key_id().to_string(),
        })),
        _ => Err(unavailable()),
    }
}

/// Sets `centraldb_token_bundles{key_id}`: one series per key of the keyring (zero when no bundle
/// is under it; a key still in use after a rotation shows until `rewrap`), plus `other` for ids
/// the keyring does not name, so the label set is the configured key ids. A slow database
/// leaves the previous figures (bounded to 1 s, so a scrape never hangs on it).
async fn bundles_per_key(state: &AppState) {
    let query = crate::services::keys::bundles_per_key(&state.db);
    let Ok(Ok(rows)) = tokio::time::timeout(Duration::from_secs(1), query).await else { return };
    let ids = state.keyring.key_ids();
    let mut other = 0i64;
    for id in &ids {
        let n = rows.iter().find(|(k, _)| k == id).map_or(0, |(_, n)| *n);
        metrics::gauge!(crate::telemetry::TOKEN_BUNDLES, "key_id" => id.to_string()).set(n as f64);
    }
    for (k, n) in &rows {
        if !ids.iter().any(|id| id == k) {
            other += n;
        }
    }
    metrics::gauge!(crate::telemetry::TOKEN_BUNDLES, "key_id" => "other").set(other as f64);
}

/// Prometheus metrics
///
/// The Prometheus text exposition format (version 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain",
        example = "# HELP centraldb_longpoll_waiters Long-poll readers (GET tokens with newer_than and wait_seconds) waiting right now\n# TYPE centraldb_longpoll_waiters gauge\ncentraldb_longpoll_waiters 0\n")
))]
async fn metrics(State(state): State<AppState>) -> Response {
    use crate::telemetry as t;
    metrics::gauge!(t::LONGPOLL_WAITERS).set(state.notifier.waiting() as f64);
    metrics::gauge!(t::LONGPOLL_WAITERS_LIMIT).set(state.settings.max_waiters as f64);
    let (in_use, idle, max) = state.db.pool_stats();
    metrics::gauge!(t::DB_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!(t::DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    metrics::gauge!(t::DB_POOL_MAX).set(f64::from(max));
    metrics::gauge!(t::ARGON2_CAPACITY)
        .set((state.settings.argon2_workers.max(1) + state.settings.argon2_queue) as f64);
    bundles_per_key(&state).await;
    t::scrape_process();
    let mut resp = state.metrics.render().into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    resp
}
