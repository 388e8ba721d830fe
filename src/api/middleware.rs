//! Request id, metrics, request timeout and the problem+json fallbacks.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::{IntoResponse, Response},
};

use tracing::Instrument;

use crate::{error::ApiError, state::AppState, telemetry};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id: the caller's `X-Request-Id` when it is sane, else a new UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn acceptable_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        .then(|| s.to_string())
}

/// Outermost layer: assigns the request id, opens the request span, echoes the id back.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(acceptable_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().chars().take(256).collect());
    let span = tracing::info_span!("request", method = %req.method(), path = %path, request_id = %id);
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.in_scope(|| {
        tracing::info!(status, latency_ms = start.elapsed().as_secs_f64() * 1000.0, "request finished");
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

/// Request counts and latency histograms per route template and status.
pub async fn track_metrics(req: Request, next: Next) -> Response {
    let path =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let labels = [("method", method), ("path", path), ("status", resp.status().as_u16().to_string())];
    metrics::counter!(telemetry::HTTP_REQUESTS, &labels).increment(1);
    metrics::histogram!(telemetry::HTTP_DURATION, &labels[..2]).record(start.elapsed().as_secs_f64());
    resp
}

/// Bounds every request by `CENTRALDB_REQUEST_TIMEOUT_SECS`; past it, 503 `unavailable`. A
/// long-poll (`wait_seconds`) gets its wait on top.
pub async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut limit = state.settings.request_timeout;
    if req.uri().query().is_some_and(|q| q.contains("wait_seconds=")) {
        limit += std::time::Duration::from_secs(crate::services::leases::MAX_WAIT_SECS);
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            ApiError::Unavailable { detail: "the request timed out; try again", retry_after_secs: 1 }.into_response()
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound { code: "not_found", detail: "no such resource".into() }
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
