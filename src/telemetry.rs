//! Logging (JSON or pretty, to stderr) and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, filter::filter_fn, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter).with(filter_fn(|meta| !leaks_secrets(meta)));
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true).with_span_list(false).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().with_writer(std::io::stderr)).try_init(),
    };
}

/// Events that would print a secret whatever the log level (`RUST_LOG` cannot turn them on):
/// sqlx's PostgreSQL URL parser warns about every query parameter it does not know *with its
/// value*, and `sslpassword` (libpq's, unknown to sqlx) is one.
fn leaks_secrets(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "sqlx_postgres::options::parse"
}

pub const HTTP_DURATION: &str = "http_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Long-poll readers waiting for a newer token version, set at each scrape.
pub const LONGPOLL_WAITERS: &str = "centraldb_longpoll_waiters";

/// The process-wide Prometheus recorder (installed once; every app in the process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(HTTP_DURATION.to_string()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test harness); then ours
            // still renders, just without the macros' data.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
