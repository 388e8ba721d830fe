//! Logging (JSON or pretty, to stderr), the Prometheus recorder and the metric catalogue
//! (every family's name, HELP text, unit and closed label set).

use std::{io::IsTerminal, sync::OnceLock};

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, filter::filter_fn, fmt, prelude::*};

use crate::config::LogFormat;

/// The log levels a bare `RUST_LOG` directive may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The filter `RUST_LOG` asks for, or `default_filter` when it is unset or empty. An invalid
/// value is an error naming the variable: a typo must not silently change (or silence) logging.
/// Stricter than `tracing-subscriber`: a bare directive must be a level (`info`), so `RUST_LOG=inof`
/// is refused instead of meaning "trace for the target `inof`, nothing else"; a target takes
/// `target=level` (`centraldb_mfa=debug,sqlx=warn`).
pub fn filter_from_env(default_filter: &str) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Err(std::env::VarError::NotPresent) => Ok(EnvFilter::new(default_filter)),
        Err(std::env::VarError::NotUnicode(_)) => Err("RUST_LOG: is not valid UTF-8".into()),
        Ok(v) if v.trim().is_empty() => Ok(EnvFilter::new(default_filter)),
        Ok(v) => parse_filter(&v),
    }
}

/// Parses a `RUST_LOG` value (see [`filter_from_env`]).
pub fn parse_filter(spec: &str) -> Result<EnvFilter, String> {
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=')
            && !directive.contains('[')
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "RUST_LOG: '{directive}' is not a level ({}) nor a target=level directive",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::builder().parse(spec).map_err(|e| format!("RUST_LOG: '{spec}' is not a valid filter: {e}"))
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset; an invalid
/// `RUST_LOG` is an error (nothing is installed). The pretty format colours its output only when
/// stderr is a terminal (never escape codes in a file or a pipe).
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), String> {
    let filter = filter_from_env(default_filter)?;
    let registry = tracing_subscriber::registry().with(filter).with(filter_fn(|meta| !leaks_secrets(meta)));
    let _ = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true).with_span_list(false).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init(),
    };
    Ok(())
}

/// Events that would print a secret whatever the log level (`RUST_LOG` cannot turn them on):
/// sqlx's PostgreSQL URL parser warns about every query parameter it does not know *with its
/// value*, and `sslpassword` (libpq's, unknown to sqlx) is one.
fn leaks_secrets(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "sqlx_postgres::options::parse"
}

// ---- metric names: every family is described (HELP, unit) in [`CATALOGUE`] ---------------------

pub const HTTP_DURATION: &str = "http_request_duration_seconds";
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Long-poll readers waiting for a newer token version, set at each scrape.
pub const LONGPOLL_WAITERS: &str = "centraldb_longpoll_waiters";
pub const LONGPOLL_WAITERS_LIMIT: &str = "centraldb_longpoll_waiters_limit";
pub const LONGPOLL_DURATION: &str = "centraldb_longpoll_duration_seconds";
pub const UNAVAILABLE: &str = "centraldb_unavailable_responses_total";
pub const DB_POOL_CONNECTIONS: &str = "centraldb_db_pool_connections";
pub const DB_POOL_MAX: &str = "centraldb_db_pool_max_connections";
pub const DB_ACQUIRE: &str = "centraldb_db_acquire_seconds";
pub const DB_ACQUIRE_TIMEOUTS: &str = "centraldb_db_acquire_timeouts_total";
pub const GROUP_COMMIT_BATCH: &str = "centraldb_sqlite_group_commit_batch_size";
pub const ARGON2_ADMITTED: &str = "centraldb_argon2_admitted";
pub const ARGON2_CAPACITY: &str = "centraldb_argon2_capacity";
pub const ARGON2_REJECTIONS: &str = "centraldb_argon2_rejections_total";
pub const ARGON2_HASH: &str = "centraldb_argon2_hash_seconds";
pub const SWEEPER_RUNS: &str = "centraldb_sweeper_runs_total";
pub const SWEEPER_ITEMS: &str = "centraldb_sweeper_items_total";
pub const SWEEPER_LAST_SUCCESS: &str = "centraldb_sweeper_last_success_timestamp_seconds";
pub const AUDIT_EVENTS: &str = "centraldb_audit_events_total";
pub const LEASE_EVENTS: &str = "centraldb_lease_events_total";
pub const MFA_OUTCOMES: &str = "centraldb_mfa_outcomes_total";
pub const TOKEN_BUNDLES: &str = "centraldb_token_bundles";
pub const BUILD_INFO: &str = "centraldb_build_info";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START: &str = "process_start_time_seconds";

/// The closed label sets (every label value the code can produce, listed once so the series
/// exist at zero from the start and a dashboard never sees a family appear late).
pub const UNAVAILABLE_CAUSES: [&str; 7] =
    ["request_timeout", "database", "argon2_queue", "mfa_pending_limit", "longpoll_waiters", "idempotency", "other"];
pub const DB_ACQUIRE_KINDS: [&str; 2] = ["read", "write"];
pub const SWEEPER_KINDS: [&str; 6] =
    ["challenges_expired", "sessions_expired", "tokens_expired", "leases_expired", "purged", "audit_purged"];
pub const LEASE_EVENT_KINDS: [&str; 5] = ["granted", "renewed", "refused", "released", "lost"];
pub const AUDIT_OUTCOMES: [&str; 2] = ["written", "failed"];

/// The `cause` label of a 503, from its (static) detail text; `other` for one not listed.
pub fn unavailable_cause(detail: &str) -> &'static str {
    match detail {
        "the request timed out; try again" => "request_timeout",
        "the database is unavailable; try again shortly" | "the database is not reachable" => "database",
        "too many code checks are in progress" => "argon2_queue",
        "too many challenges are pending service-wide; try again shortly" => "mfa_pending_limit",
        "too many readers are waiting for new versions" => "longpoll_waiters",
        "the Idempotency-Key could not be claimed; try again" => "idempotency",
        _ => "other",
    }
}

/// Counts `n` audit events written (or that failed to be written), at the audit call boundary.
pub fn audit_events(ok: bool, n: usize) {
    metrics::counter!(AUDIT_EVENTS, "outcome" => if ok { "written" } else { "failed" }).increment(n as u64);
}

/// Counts a lease event (`granted`, `renewed`, `refused`, `released`, `lost`).
pub fn lease_event(event: &'static str) {
    metrics::counter!(LEASE_EVENTS, "event" => event).increment(1);
}

/// The kind of a metric family, for [`CATALOGUE`].
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family: name, kind, unit and HELP text ([`describe`] registers them in this order).
const CATALOGUE: [(&str, Kind, Unit, &str); 28] = [
    (HTTP_REQUESTS, Kind::Counter, Unit::Count, "HTTP requests answered, by method, route template and status"),
    (
        HTTP_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "HTTP request latency in seconds, by method and route template (long polls excluded: see centraldb_longpoll_duration_seconds)",
    ),
    (
        LONGPOLL_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Duration in seconds of long-poll token reads (GET tokens with newer_than and wait_seconds), up to their wait",
    ),
    (LONGPOLL_WAITERS, Kind::Gauge, Unit::Count, "Long-poll readers waiting right now"),
    (
        LONGPOLL_WAITERS_LIMIT,
        Kind::Gauge,
        Unit::Count,
        "Long-poll readers allowed at once (CENTRALDB_MAX_WAITERS); past it, 503",
    ),
    (UNAVAILABLE, Kind::Counter, Unit::Count, "503 responses by cause"),
    (DB_POOL_CONNECTIONS, Kind::Gauge, Unit::Count, "Database pool connections by state (in_use, idle)"),
    (DB_POOL_MAX, Kind::Gauge, Unit::Count, "Database pool size limit (CENTRALDB_DB_MAX_CONNECTIONS)"),
    (
        DB_ACQUIRE,
        Kind::Histogram,
        Unit::Seconds,
        "Wait in seconds for a database connection (read) or the write transaction (write)",
    ),
    (
        DB_ACQUIRE_TIMEOUTS,
        Kind::Counter,
        Unit::Count,
        "Database connection or write-lock waits that timed out (CENTRALDB_DB_ACQUIRE_TIMEOUT_MS)",
    ),
    (
        GROUP_COMMIT_BATCH,
        Kind::Histogram,
        Unit::Count,
        "SQLite group commit: token reads recorded per batch (one transaction)",
    ),
    (ARGON2_ADMITTED, Kind::Gauge, Unit::Count, "argon2 computations running or queued right now"),
    (
        ARGON2_CAPACITY,
        Kind::Gauge,
        Unit::Count,
        "argon2 computations allowed at once, running plus queued (workers + queue)",
    ),
    (
        ARGON2_REJECTIONS,
        Kind::Counter,
        Unit::Count,
        "argon2 computations refused because the queue was full (answered 503)",
    ),
    (ARGON2_HASH, Kind::Histogram, Unit::Seconds, "argon2 computation time in seconds (on a worker thread)"),
    (SWEEPER_RUNS, Kind::Counter, Unit::Count, "Expiry sweeper passes by outcome (ok, error)"),
    (SWEEPER_ITEMS, Kind::Counter, Unit::Count, "Items the sweeper expired or purged, by kind"),
    (SWEEPER_LAST_SUCCESS, Kind::Gauge, Unit::Seconds, "Unix time in seconds of the last successful sweeper pass"),
    (AUDIT_EVENTS, Kind::Counter, Unit::Count, "Audit events written, and writes that failed"),
    (LEASE_EVENTS, Kind::Counter, Unit::Count, "Refresh lease events (granted, renewed, refused, released, lost)"),
    (
        MFA_OUTCOMES,
        Kind::Counter,
        Unit::Count,
        "MFA code checks by verifier (service, external) and outcome (verified or the problem code)",
    ),
    (
        TOKEN_BUNDLES,
        Kind::Gauge,
        Unit::Count,
        "Stored token bundles by the encryption key id they are under (set at each scrape)",
    ),
    (BUILD_INFO, Kind::Gauge, Unit::Count, "Always 1; the labels name the running version"),
    (PROCESS_RSS, Kind::Gauge, Unit::Bytes, "Resident memory of the process in bytes"),
    (
        PROCESS_CPU,
        Kind::Gauge,
        Unit::Seconds,
        "User and system CPU time of the process in seconds (only grows; a gauge for its fraction)",
    ),
    (PROCESS_OPEN_FDS, Kind::Gauge, Unit::Count, "Open file descriptors"),
    (PROCESS_MAX_FDS, Kind::Gauge, Unit::Count, "File descriptor limit (soft)"),
    (PROCESS_START, Kind::Gauge, Unit::Seconds, "Unix time in seconds the process started"),
];

/// Describes every family of [`CATALOGUE`] (HELP and unit) and creates the label-less and
/// closed-set series at zero, so every family is present from the first scrape.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, kind, unit, help) in CATALOGUE {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }

    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for cause in UNAVAILABLE_CAUSES {
        metrics::counter!(UNAVAILABLE, "cause" => cause).absolute(0);
    }
    for kind in DB_ACQUIRE_KINDS {
        metrics::counter!(DB_ACQUIRE_TIMEOUTS, "kind" => kind).absolute(0);
    }
    for kind in SWEEPER_KINDS {
        metrics::counter!(SWEEPER_ITEMS, "kind" => kind).absolute(0);
    }
    for outcome in ["ok", "error"] {
        metrics::counter!(SWEEPER_RUNS, "outcome" => outcome).absolute(0);
    }
    for event in LEASE_EVENT_KINDS {
        metrics::counter!(LEASE_EVENTS, "event" => event).absolute(0);
    }
    for outcome in AUDIT_OUTCOMES {
        metrics::counter!(AUDIT_EVENTS, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(ARGON2_REJECTIONS).absolute(0);
    metrics::gauge!(ARGON2_ADMITTED).increment(0.0);
    metrics::gauge!(SWEEPER_LAST_SUCCESS).increment(0.0);
    if let Some(start) = process::start_time() {
        metrics::gauge!(PROCESS_START).set(start);
    }
}

/// Sets the gauges that are read at scrape time: process figures (Linux `/proc`).
pub fn scrape_process() {
    let p = process::sample();
    if let Some(v) = p.rss_bytes {
        metrics::gauge!(PROCESS_RSS).set(v);
    }
    if let Some(v) = p.cpu_seconds {
        // The standard name, exposed as a gauge: the metrics crate's counters are whole numbers
        // and CPU seconds need their fraction. It only grows, so `rate()` works on it as usual.
        metrics::gauge!(PROCESS_CPU).set(v);
    }
    if let Some(v) = p.open_fds {
        metrics::gauge!(PROCESS_OPEN_FDS).set(v);
    }
    if let Some(v) = p.max_fds {
        metrics::gauge!(PROCESS_MAX_FDS).set(v);
    }
}

/// Process figures from Linux `/proc/self` (absent elsewhere: the gauges are then not set).
mod process {
    /// `/proc` reports CPU times in USER_HZ, which Linux fixes at 100 for user space.
    const USER_HZ: f64 = 100.0;

    #[derive(Default)]
    pub struct Sample {
        pub rss_bytes: Option<f64>,
        pub cpu_seconds: Option<f64>,
        pub open_fds: Option<f64>,
        pub max_fds: Option<f64>,
    }

    /// Fields of `/proc/self/stat` after the command name (which may hold spaces).
    fn stat_fields() -> Option<Vec<String>> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after = stat.get(stat.rfind(')')? + 1..)?;
        Some(after.split_whitespace().map(str::to_string).collect())
    }

    pub fn sample() -> Sample {
        let rss_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024.0)
        });
        // utime and stime are fields 14 and 15 of stat; fields[0] is field 3 (state).
        let cpu_seconds = stat_fields().and_then(|f| {
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / USER_HZ)
        });
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        });
        Sample { rss_bytes, cpu_seconds, open_fds, max_fds }
    }

    /// Unix time the process started: boot time plus the start tick (field 22 of stat).
    pub fn start_time() -> Option<f64> {
        let ticks: f64 = stat_fields()?.get(19)?.parse().ok()?;
        let btime: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find(|l| l.starts_with("btime "))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(btime + ticks / USER_HZ)
    }
}

/// The process-wide Prometheus recorder (installed once; every app in the process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_string()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(DB_ACQUIRE.to_string()), &seconds))
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(ARGON2_HASH.to_string()),
                        &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(LONGPOLL_DURATION.to_string()),
                        &[0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(GROUP_COMMIT_BATCH.to_string()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test harness); then ours
            // still renders, just without the macros' data.
            let installed = metrics::set_global_recorder(recorder).is_ok();
            if installed {
                describe();
            }
            handle
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 503 the code can produce has a named cause (not `other`): the detail texts of the
    /// `ApiError::Unavailable` literals in the sources are all in [`unavailable_cause`].
    #[test]
    fn every_503_has_a_named_cause() {
        let sources = [
            include_str!("api/error.rs"),
            include_str!("api/middleware.rs"),
            include_str!("api/ops.rs"),
            include_str!("api/idempotency.rs"),
        ];
        let mut found = 0;
        for src in sources {
            for part in src.split("Unavailable {").skip(1) {
                let Some(rest) = part.trim_start().strip_prefix("detail: \"") else { continue };
                let detail = &rest[..rest.find('"').unwrap()];
                assert_ne!(unavailable_cause(detail), "other", "no cause for '{detail}'");
                found += 1;
            }
        }
        assert!(found >= 6, "found {found} literals");
    }

    /// The catalogue names each family once.
    #[test]
    fn every_family_is_described_once() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|(name, ..)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
    }

    #[test]
    fn rust_log_typos_are_refused_and_valid_filters_accepted() {
        for bad in ["inof", "debgu", "sqlx=loud", "a=b=c"] {
            let e = parse_filter(bad).unwrap_err();
            assert!(e.starts_with("RUST_LOG: "), "{e}");
        }
        for good in ["info", "WARN", "info,centraldb_mfa=debug", "sqlx=warn", "off", "trace,hyper=info"] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
    }
}
