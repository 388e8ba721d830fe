//! Request id, metrics, request timeout and the problem+json fallbacks.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    http::{HeaderName, HeaderValue, Method},
    middleware::Next,
    response::{IntoResponse, Response},
};

use tracing::Instrument;

use crate::{
    api::error::{ApiError, ProblemCode},
    services::leases::MAX_WAIT_SECS,
    state::AppState,
    telemetry,
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id: the caller's `X-Request-Id` when it is sane, else a new UUIDv7.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn acceptable_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
        .then(|| s.to_string())
}

/// Routes polled by probes and scrapers: their request lines are logged at DEBUG, not INFO.
const QUIET_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Outermost layer: assigns the request id, opens the request span, echoes the id back, and logs
/// one line per request: `status`, `latency_ms`, and on a 4xx/5xx the problem `code`. The span
/// carries the method, route, request id, client address (`client`) and, once the API key is
/// verified, its `key_id`. Probes and scrapes ([`QUIET_PATHS`]) log at DEBUG, 5xx at WARN.
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
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string());
    let client = client.unwrap_or_else(|| "in-process".into());
    let quiet = QUIET_PATHS.contains(&path.as_str());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %path,
        request_id = %id,
        client = %client,
        key_id = tracing::field::Empty,
    );
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    let code = resp.extensions().get::<ProblemCode>().map(|c| c.0.as_str());
    span.in_scope(|| {
        let status = status.as_u16();
        if status >= 500 {
            tracing::warn!(status, latency_ms, code, "request finished");
        } else if status >= 400 {
            tracing::info!(status, latency_ms, code, "request finished");
        } else if quiet {
            tracing::debug!(status, latency_ms, "request finished");
        } else {
            tracing::info!(status, latency_ms, "request finished");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

/// The `method` label: one of the standard methods or `other`. HTTP lets a client invent any
/// method token (hyper passes them through), so the raw method would let anyone create
/// unbounded label values, each a new time series kept forever.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Request counts and latency histograms per method, route template and status. Every label
/// comes from a closed set, whatever the client sends: the methods of [`method_label`], the
/// route templates of this router plus `unmatched` (never the raw path), and the status code.
pub async fn track_metrics(req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let path = path.unwrap_or_else(|| "unmatched".into());
    let method = method_label(req.method());
    // A long poll (up to 30 s by design) gets its own histogram, not the token GET's latency.
    let long_poll = !long_poll_wait(&req).is_zero();
    let start = Instant::now();
    let resp = next.run(req).await;
    let labels = [("method", method.to_string()), ("path", path), ("status", resp.status().as_u16().to_string())];
    metrics::counter!(telemetry::HTTP_REQUESTS, &labels).increment(1);
    if long_poll {
        metrics::histogram!(telemetry::LONGPOLL_DURATION).record(start.elapsed().as_secs_f64());
    } else {
        metrics::histogram!(telemetry::HTTP_DURATION, &labels[..2]).record(start.elapsed().as_secs_f64());
    }
    resp
}

/// The route of the only long-poll: `GET` of a user's tokens with `newer_than` and `wait_seconds`.
const LONG_POLL_ROUTE: &str = "/api/v1/users/{user_id}/tokens";

#[derive(serde::Deserialize)]
struct LongPollQuery {
    newer_than: Option<i64>,
    wait_seconds: Option<u64>,
}

/// The wait a request may add to the request timeout: only the long-poll `GET` of a user's
/// tokens that asks for one (`newer_than` and `wait_seconds`), and at most the wait it asked
/// for, bounded by [`MAX_WAIT_SECS`]. Any other request, with or without `wait_seconds` in its
/// query, gets none. A query the handler will refuse (unparseable, duplicated) gets none either.
fn long_poll_wait(req: &Request) -> Duration {
    let is_long_poll_route = req.method() == Method::GET
        && req.extensions().get::<MatchedPath>().is_some_and(|p| p.as_str() == LONG_POLL_ROUTE);
    if !is_long_poll_route {
        return Duration::ZERO;
    }
    match axum::extract::Query::<LongPollQuery>::try_from_uri(req.uri()) {
        Ok(axum::extract::Query(LongPollQuery { newer_than: Some(_), wait_seconds: Some(wait) })) => {
            Duration::from_secs(wait.min(MAX_WAIT_SECS))
        }
        _ => Duration::ZERO,
    }
}

/// Bounds every request by `CENTRALDB_REQUEST_TIMEOUT_SECS`; past it, 503 `unavailable`. The
/// long-poll gets the wait it asked for on top (see [`long_poll_wait`]), nothing else does.
pub async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.settings.request_timeout + long_poll_wait(&req);
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
