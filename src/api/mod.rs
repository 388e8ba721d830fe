//! The HTTP surface: one router per resource, assembled with its OpenAPI document.

pub mod audit;
pub mod error;
pub mod examples;
pub mod extract;
pub mod idempotency;
pub mod leases;
pub mod mfa;
pub mod middleware;
pub mod ops;
pub mod sessions;
pub mod spec;
pub mod tokens;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderName, HeaderValue, header},
};
use tower::ServiceBuilder;
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa_swagger_ui::SwaggerUi;

pub use self::spec::openapi;
use self::spec::parts;
use crate::state::AppState;

/// The whole application router, ready to serve (tests drive it with `oneshot`).
pub fn app(state: AppState) -> Router {
    let (router, openapi) = parts();
    let body_limit = state.settings.body_limit_bytes;
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(middleware::not_found)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::layer))
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(middleware::request_context))
                .layer(axum::middleware::from_fn(middleware::track_metrics))
                .layer(SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
                .layer(SetResponseHeaderLayer::overriding(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ))
                .layer(SetResponseHeaderLayer::if_not_present(
                    HeaderName::from_static("x-frame-options"),
                    HeaderValue::from_static("DENY"),
                ))
                .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::timeout))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}
