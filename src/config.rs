//! Typed settings from the environment (and `.env`), with `*_FILE` variants for secrets.
//!
//! Every variable has a default (see `.env.example`); a bad value is a start-up error that names
//! the variable.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};

/// A configuration problem, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self { var: var.to_string(), message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteSync {
    Full,
    Normal,
}

/// A database URL whose `Debug`/`Display` never show the password.
#[derive(Clone)]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(SecretString::from(url.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
    pub fn is_postgres(&self) -> bool {
        let u = self.expose();
        u.starts_with("postgres://") || u.starts_with("postgresql://")
    }
    pub fn is_sqlite(&self) -> bool {
        self.expose().starts_with("sqlite:")
    }
    /// The URL as it may be printed or logged: the userinfo password, every query parameter
    /// not known to be harmless (`password`, `sslpassword`, an inline `sslkey`, anything
    /// unknown) and any fragment are replaced by `***`. A URL whose userinfo cannot be told
    /// apart from its query (an `@` only after the `?`) prints as `scheme://***`.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

/// Query parameters of sqlx/libpq connection URLs whose values carry no secret (both
/// spellings, lower case). Everything else is redacted: an allowlist, so a parameter added to
/// sqlx or libpq later (or misspelt) is hidden until someone decides it is harmless.
const HARMLESS_URL_PARAMS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
    "mode",
    "cache",
    "immutable",
    "vfs",
];

/// Percent-decodes a query key (and `+` as space), as sqlx's URL parser does, so
/// `pass%77ord` is recognised as `password`.
fn decode_query_key(raw: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (key, value) = match pair.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (pair, None),
            };
            let decoded = decode_query_key(key);
            let plain_key = !key.is_empty()
                && key.len() <= 64
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-[]".contains(&b));
            let harmless = HARMLESS_URL_PARAMS.contains(&decoded.as_str());
            match value {
                Some(v) if harmless => format!("{key}={v}"),
                None if harmless => key.to_string(),
                Some(_) if plain_key => format!("{key}=***"),
                // A bare key or one that is not a plain name may itself be a secret (`?hunter2`).
                _ => "***".to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// See [`DatabaseUrl::redacted`].
fn redact_url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        // `sqlite:file.db?...`: no authority, but a query may still follow.
        return match u.split_once('?') {
            Some((head, query)) => format!("{head}?{}", redact_query(query.split('#').next().unwrap_or(""))),
            None => u.split('#').next().unwrap_or("").to_string(),
        };
    };
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((b, _)) => (b, "#***"),
        None => (rest, ""),
    };
    let (before_query, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    if before_query.find('@').is_none() && query.is_some_and(|q| q.contains('@')) {
        // `postgres://user:pa?ss@host/db`: the password may run into what looks like the query.
        return format!("{scheme}://***");
    }
    // The userinfo ends at the last `@` before the query: a password may hold `/` or `@`.
    let shown = match before_query.rfind('@') {
        Some(at) => {
            let (userinfo, host_and_path) = (&before_query[..at], &before_query[at + 1..]);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***@{host_and_path}"),
                None => format!("{userinfo}@{host_and_path}"),
            }
        }
        None => before_query.to_string(),
    };
    match query {
        Some(q) => format!("{scheme}://{shown}?{}{fragment}", redact_query(q)),
        None => format!("{scheme}://{shown}{fragment}"),
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// One environment variable: its name, its default (as shown) and what it does. `--help` prints
/// this table, and a test checks it names exactly the variables [`Settings::from_lookup`] reads
/// (and that `.env.example` shows each), so the help cannot drift from the code.
pub struct EnvVar {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

const fn var(name: &'static str, default: &'static str, help: &'static str) -> EnvVar {
    EnvVar { name, default, help }
}

/// Every variable the service reads (`*_FILE` variants included), in `.env.example` order.
pub const ENV_VARS: &[EnvVar] = &[
    var("CENTRALDB_DATA_DIR", "./data", "folder of the SQLite file, generated encryption.key and admin-api-key"),
    var("CENTRALDB_DATABASE_URL", "sqlite://<data>/centraldb-mfa.db", "sqlite:..., postgres://... or postgresql://..."),
    var("CENTRALDB_DATABASE_URL_FILE", "", "file holding the database URL (instead of CENTRALDB_DATABASE_URL)"),
    var("CENTRALDB_LISTEN", "127.0.0.1:8080", "address and port of the HTTP server"),
    var(
        "CENTRALDB_ENCRYPTION_KEYS",
        "SQLite: generated; PostgreSQL: required",
        "keyring id:base64key[,...]; the first encrypts",
    ),
    var("CENTRALDB_ENCRYPTION_KEYS_FILE", "", "file holding the keyring (instead of CENTRALDB_ENCRYPTION_KEYS)"),
    var("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "", "admin API key accepted as given (32-256 printable characters)"),
    var("CENTRALDB_BOOTSTRAP_ADMIN_KEY_FILE", "", "file holding the bootstrap admin key"),
    var(
        "RUST_LOG",
        "info (serve), warn (other commands)",
        "log filter: a level or target=level list; invalid is an error",
    ),
    var("CENTRALDB_LOG_FORMAT", "pretty", "json or pretty (colours only when stderr is a terminal)"),
    var("CENTRALDB_REQUEST_TIMEOUT_SECS", "10", "per-request time limit (503 past it)"),
    var("CENTRALDB_BODY_LIMIT_BYTES", "65536", "largest request body (413 past it)"),
    var("CENTRALDB_DB_MAX_CONNECTIONS", "8 SQLite, 16 PostgreSQL", "database connection pool size"),
    var("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS", "3000", "wait for a pooled connection before 503"),
    var("CENTRALDB_SQLITE_BUSY_TIMEOUT_MS", "5000", "SQLite: wait on a database locked by another process"),
    var("CENTRALDB_SQLITE_SYNCHRONOUS", "full", "SQLite: full or normal"),
    var("CENTRALDB_SQLITE_MMAP_MIB", "0", "SQLite mmap_size in MiB (0: off)"),
    var("CENTRALDB_SQLITE_CACHE_MIB", "2", "SQLite page cache per pooled connection, in MiB"),
    var(
        "CENTRALDB_API_KEY_CACHE_SECS",
        "1",
        "how long a verified API key is cached (bounds how late a revocation bites)",
    ),
    var("CENTRALDB_IDEMPOTENCY_TTL_SECS", "86400", "how long an Idempotency-Key and its answer are kept"),
    var("CENTRALDB_ARGON2_MEMORY_KIB", "19456", "argon2id memory for MFA codes"),
    var("CENTRALDB_ARGON2_ITERATIONS", "2", "argon2id time cost"),
    var("CENTRALDB_ARGON2_PARALLELISM", "1", "argon2id lanes"),
    var("CENTRALDB_ARGON2_WORKERS", "number of cores", "argon2 computations at once"),
    var("CENTRALDB_ARGON2_QUEUE", "64", "argon2 computations that may wait (503 past it)"),
    var("CENTRALDB_MFA_MAX_PENDING_PER_USER", "3", "pending challenges per user (429 past it)"),
    var("CENTRALDB_MFA_FAILURE_BUDGET", "100", "failed code checks per user and window"),
    var("CENTRALDB_MFA_FAILURE_WINDOW_SECS", "86400", "window of the failure budget"),
    var("CENTRALDB_MFA_MAX_PENDING_GLOBAL", "100000", "pending challenges service-wide (503 past it)"),
    var("CENTRALDB_MFA_CONSUME_WINDOW_SECS", "300", "how long a verified challenge stays consumable"),
    var("CENTRALDB_SWEEP_INTERVAL_SECS", "30", "seconds between expiry sweeper passes"),
    var("CENTRALDB_RETENTION_SECS", "604800", "how long ended challenges and sessions are kept"),
    var("CENTRALDB_AUDIT_RETENTION_DAYS", "365", "audit events older than this are purged (0 keeps all)"),
    var(
        "CENTRALDB_AUDIT_CHECKPOINT_INTERVAL_SECS",
        "3600",
        "seconds between signed audit checkpoints in the log (0: off)",
    ),
    var("CENTRALDB_REFUSAL_INTERVAL_SECS", "60", "per-source window for refused requests"),
    var("CENTRALDB_REFUSAL_AUDIT_INDIVIDUAL", "10", "refusals per source and window audited one by one"),
    var("CENTRALDB_REFUSAL_BUDGET", "1000", "refusals per source and window before 429"),
    var("CENTRALDB_REFUSAL_MAX_SOURCES", "10000", "source addresses tracked at once"),
    var("CENTRALDB_MAX_WAITERS", "1000", "long-poll readers at once (503 past it)"),
    var("CENTRALDB_MAX_CONNECTIONS", "16384", "open client connections at most"),
];

/// The environment section of `--help`, generated from [`ENV_VARS`].
pub fn env_help() -> String {
    let mut out = String::from(
        "Environment (also read from ./.env; an empty value counts as unset; a bad value stops start-up naming the variable):\n",
    );
    for v in ENV_VARS {
        let default = if v.default.is_empty() { "unset".to_string() } else { v.default.to_string() };
        out.push_str(&format!("  {}\n      {} [default: {default}]\n", v.name, v.help));
    }
    out
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// `None` means the default SQLite file in the data folder.
    pub database_url: Option<DatabaseUrl>,
    pub listen: SocketAddr,
    /// Raw keyring specification (`id:base64key,...`); parsed by `crypto::Keyring`.
    pub encryption_keys: Option<SecretString>,
    pub bootstrap_admin_key: Option<SecretString>,
    pub log_format: LogFormat,
    pub request_timeout: Duration,
    pub body_limit_bytes: usize,
    pub db_max_connections: Option<u32>,
    pub db_acquire_timeout: Duration,
    pub sqlite_busy_timeout: Duration,
    pub sqlite_synchronous: SqliteSync,
    /// SQLite `mmap_size` in MiB (0: reads go through `pread` into each connection's cache).
    pub sqlite_mmap_mib: u64,
    /// SQLite page cache per connection, in MiB.
    pub sqlite_cache_mib: u64,
    pub api_key_cache_ttl: Duration,
    pub argon2: Argon2Settings,
    /// Concurrent argon2 computations (default: the number of cores).
    pub argon2_workers: usize,
    /// argon2 computations allowed to wait for a worker; past that, 503.
    pub argon2_queue: usize,
    pub mfa: MfaLimits,
    pub sweep_interval: Duration,
    /// How long terminal challenges and sessions are kept before the sweeper deletes them.
    pub retention: Duration,
    /// Readers that may long-poll for a new token version at once; past that, 503.
    pub max_waiters: usize,
    /// How long an `Idempotency-Key` and its answer are kept (per API key).
    pub idempotency_ttl: Duration,
    /// Open client connections at most; more wait in the kernel backlog.
    pub max_connections: usize,
    /// Refused requests per source: individual audit rows, budget, window, table size.
    pub refusals: RefusalLimits,
    /// Audit events older than this are purged by the sweeper; `None` keeps them forever.
    pub audit_retention: Option<Duration>,
    /// How often the sweeper logs a signed audit checkpoint; `None` never.
    pub audit_checkpoint_interval: Option<Duration>,
}

/// argon2id cost of one-time code hashes (`services::code_hasher`).
#[derive(Debug, Clone, Copy)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Settings {
    /// OWASP's minimum for argon2id: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

/// Limits of MFA challenges (`services::mfa`).
#[derive(Debug, Clone)]
pub struct MfaLimits {
    pub max_pending_per_user: i64,
    pub failure_budget: i64,
    pub failure_window: Duration,
    pub max_pending_global: i64,
    /// How long a verified challenge stays consumable.
    pub consume_window: Duration,
}

impl Default for MfaLimits {
    fn default() -> Self {
        Self {
            max_pending_per_user: 3,
            failure_budget: 100,
            failure_window: Duration::from_secs(86_400),
            max_pending_global: 100_000,
            consume_window: Duration::from_secs(300),
        }
    }
}

/// Settings of the refusal limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalLimits {
    /// The per-source window.
    pub interval: Duration,
    /// Refusals audited one by one per source and window.
    pub individual: u32,
    /// Refusals per source and window answered 401/403; later ones get 429.
    pub budget: u32,
    /// Sources tracked at once.
    pub max_sources: usize,
}

impl Default for RefusalLimits {
    fn default() -> Self {
        Self { interval: Duration::from_secs(60), individual: 10, budget: 1000, max_sources: 10_000 }
    }
}

pub const DEFAULT_SQLITE_FILE: &str = "centraldb-mfa.db";

impl Settings {
    /// Reads `.env` (when present) and then the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::new(".env", format!("cannot be read: {e}"))),
        }
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Builds settings from any variable lookup (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let secret = |k: &str| -> Result<Option<String>, ConfigError> {
            let file_var = format!("{k}_FILE");
            match (get(k), get(&file_var)) {
                (Some(_), Some(_)) => Err(ConfigError::new(k, format!("set either {k} or {file_var}, not both"))),
                (Some(v), None) => Ok(Some(v)),
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_string()))
                    .map_err(|e| ConfigError::new(&file_var, format!("cannot read {path}: {e}"))),
                (None, None) => Ok(None),
            }
        };
        fn parse<T: FromStr>(var: &str, raw: Option<String>, default: T, what: &str) -> Result<T, ConfigError> {
            match raw {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|_| ConfigError::new(var, format!("'{v}' is not {what}"))),
            }
        }

        let data_dir = PathBuf::from(get("CENTRALDB_DATA_DIR").unwrap_or_else(|| "./data".into()));
        let database_url = secret("CENTRALDB_DATABASE_URL")?.map(DatabaseUrl::new);
        if let Some(url) = &database_url
            && !url.is_postgres()
            && !url.is_sqlite()
        {
            return Err(ConfigError::new(
                "CENTRALDB_DATABASE_URL",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        let listen = parse(
            "CENTRALDB_LISTEN",
            get("CENTRALDB_LISTEN"),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            "a socket address like 127.0.0.1:8080",
        )?;
        let encryption_keys = secret("CENTRALDB_ENCRYPTION_KEYS")?.map(SecretString::from);
        // Refused here, before the database is opened, so a refused start-up changes nothing.
        if let Some(why) = encryption_keys.as_ref().and_then(crate::crypto::keyring::weak_key_in_spec) {
            return Err(ConfigError::new("CENTRALDB_ENCRYPTION_KEYS", why));
        }
        let bootstrap_admin_key = match secret("CENTRALDB_BOOTSTRAP_ADMIN_KEY")? {
            Some(k) if k.len() < 32 => {
                return Err(ConfigError::new(
                    "CENTRALDB_BOOTSTRAP_ADMIN_KEY",
                    "must be at least 32 characters (generate one with `centraldb-mfa keygen`)",
                ));
            }
            Some(k) if k.len() > 256 || k.chars().any(|c| !c.is_ascii_graphic()) => {
                return Err(ConfigError::new(
                    "CENTRALDB_BOOTSTRAP_ADMIN_KEY",
                    "must be at most 256 printable ASCII characters without spaces",
                ));
            }
            Some(k) if crate::crypto::keyring::weak_text_key(&k).is_some() => {
                let why = crate::crypto::keyring::weak_text_key(&k).unwrap_or_default();
                return Err(ConfigError::new(
                    "CENTRALDB_BOOTSTRAP_ADMIN_KEY",
                    format!("is not random ({why}); generate one with `centraldb-mfa keygen`"),
                ));
            }
            other => other.map(SecretString::from),
        };
        let log_format = match get("CENTRALDB_LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new("CENTRALDB_LOG_FORMAT", format!("'{other}' is not one of json, pretty")));
            }
        };
        let sqlite_synchronous = match get("CENTRALDB_SQLITE_SYNCHRONOUS").as_deref().map(str::trim) {
            None | Some("full") => SqliteSync::Full,
            Some("normal") => SqliteSync::Normal,
            Some(other) => {
                return Err(ConfigError::new(
                    "CENTRALDB_SQLITE_SYNCHRONOUS",
                    format!("'{other}' is not one of full, normal"),
                ));
            }
        };
        let positive = |var: &str, v: u64| {
            if v == 0 { Err(ConfigError::new(var, "must be greater than 0")) } else { Ok(v) }
        };
        let request_timeout = Duration::from_secs(positive(
            "CENTRALDB_REQUEST_TIMEOUT_SECS",
            parse(
                "CENTRALDB_REQUEST_TIMEOUT_SECS",
                get("CENTRALDB_REQUEST_TIMEOUT_SECS"),
                10u64,
                "a whole number of seconds",
            )?,
        )?);
        let body_limit_bytes = positive(
            "CENTRALDB_BODY_LIMIT_BYTES",
            parse(
                "CENTRALDB_BODY_LIMIT_BYTES",
                get("CENTRALDB_BODY_LIMIT_BYTES"),
                65_536u64,
                "a whole number of bytes",
            )?,
        )? as usize;
        let db_max_connections = match get("CENTRALDB_DB_MAX_CONNECTIONS") {
            None => None,
            Some(v) => Some(
                positive(
                    "CENTRALDB_DB_MAX_CONNECTIONS",
                    parse("CENTRALDB_DB_MAX_CONNECTIONS", Some(v), 0u64, "a whole number")?,
                )?
                .min(1024) as u32,
            ),
        };
        let db_acquire_timeout = Duration::from_millis(positive(
            "CENTRALDB_DB_ACQUIRE_TIMEOUT_MS",
            parse(
                "CENTRALDB_DB_ACQUIRE_TIMEOUT_MS",
                get("CENTRALDB_DB_ACQUIRE_TIMEOUT_MS"),
                3_000u64,
                "a whole number of milliseconds",
            )?,
        )?);
        let sqlite_busy_timeout = Duration::from_millis(parse(
            "CENTRALDB_SQLITE_BUSY_TIMEOUT_MS",
            get("CENTRALDB_SQLITE_BUSY_TIMEOUT_MS"),
            5_000u64,
            "a whole number of milliseconds",
        )?);
        let api_key_cache_ttl = Duration::from_secs(parse(
            "CENTRALDB_API_KEY_CACHE_SECS",
            get("CENTRALDB_API_KEY_CACHE_SECS"),
            1u64,
            "a whole number of seconds",
        )?);

        let num = |var: &str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
            let v = parse(var, get(var), default, "a whole number")?;
            if (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(ConfigError::new(var, format!("must be between {min} and {max}")))
            }
        };
        let sqlite_mmap_mib = num("CENTRALDB_SQLITE_MMAP_MIB", 0, 0, 65_536)?;
        let sqlite_cache_mib = num("CENTRALDB_SQLITE_CACHE_MIB", 2, 1, 4_096)?;
        let cores = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(2);
        let argon2 = Argon2Settings {
            memory_kib: num("CENTRALDB_ARGON2_MEMORY_KIB", 19 * 1024, 8, 4 * 1024 * 1024)? as u32,
            iterations: num("CENTRALDB_ARGON2_ITERATIONS", 2, 1, 100)? as u32,
            parallelism: num("CENTRALDB_ARGON2_PARALLELISM", 1, 1, 64)? as u32,
        };
        let argon2_workers = num("CENTRALDB_ARGON2_WORKERS", cores, 1, 1024)? as usize;
        let argon2_queue = num("CENTRALDB_ARGON2_QUEUE", 64, 0, 100_000)? as usize;
        let mfa = MfaLimits {
            max_pending_per_user: num("CENTRALDB_MFA_MAX_PENDING_PER_USER", 3, 1, 100)? as i64,
            failure_budget: num("CENTRALDB_MFA_FAILURE_BUDGET", 100, 1, 1_000_000)? as i64,
            failure_window: Duration::from_secs(num("CENTRALDB_MFA_FAILURE_WINDOW_SECS", 86_400, 60, 30 * 86_400)?),
            max_pending_global: num("CENTRALDB_MFA_MAX_PENDING_GLOBAL", 100_000, 1, 100_000_000)? as i64,
            consume_window: Duration::from_secs(num("CENTRALDB_MFA_CONSUME_WINDOW_SECS", 300, 10, 3600)?),
        };
        let sweep_interval = Duration::from_secs(num("CENTRALDB_SWEEP_INTERVAL_SECS", 30, 1, 86_400)?);
        let retention = Duration::from_secs(num("CENTRALDB_RETENTION_SECS", 7 * 86_400, 0, 3650 * 86_400)?);

        let max_waiters = num("CENTRALDB_MAX_WAITERS", 1000, 1, 1_000_000)? as usize;
        let idempotency_ttl = Duration::from_secs(num("CENTRALDB_IDEMPOTENCY_TTL_SECS", 86_400, 1, 30 * 86_400)?);
        let max_connections = num("CENTRALDB_MAX_CONNECTIONS", 16_384, 1, 1_000_000)? as usize;
        let refusals = RefusalLimits {
            interval: Duration::from_secs(num("CENTRALDB_REFUSAL_INTERVAL_SECS", 60, 1, 3600)?),
            individual: num("CENTRALDB_REFUSAL_AUDIT_INDIVIDUAL", 10, 0, 1000)? as u32,
            budget: num("CENTRALDB_REFUSAL_BUDGET", 1000, 1, 10_000_000)? as u32,
            max_sources: num("CENTRALDB_REFUSAL_MAX_SOURCES", 10_000, 1, 1_000_000)? as usize,
        };
        let audit_retention = match num("CENTRALDB_AUDIT_RETENTION_DAYS", 365, 0, 36_500)? {
            0 => None,
            days => Some(Duration::from_secs(days * 86_400)),
        };
        let audit_checkpoint_interval = match num("CENTRALDB_AUDIT_CHECKPOINT_INTERVAL_SECS", 3600, 0, 31 * 86_400)? {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        };

        Ok(Self {
            data_dir,
            database_url,
            listen,
            encryption_keys,
            bootstrap_admin_key,
            log_format,
            request_timeout,
            body_limit_bytes,
            db_max_connections,
            db_acquire_timeout,
            sqlite_busy_timeout,
            sqlite_synchronous,
            sqlite_mmap_mib,
            sqlite_cache_mib,
            api_key_cache_ttl,
            argon2,
            argon2_workers,
            argon2_queue,
            mfa,
            sweep_interval,
            retention,
            max_waiters,
            max_connections,
            refusals,
            audit_retention,
            audit_checkpoint_interval,
            idempotency_ttl,
        })
    }

    /// The configured URL, or the default SQLite file in the data folder.
    pub fn effective_database_url(&self) -> DatabaseUrl {
        match &self.database_url {
            Some(u) => u.clone(),
            None => DatabaseUrl::new(format!("sqlite://{}", self.data_dir.join(DEFAULT_SQLITE_FILE).display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    /// `--help` (generated from `ENV_VARS`) names exactly the variables the settings read, and
    /// `.env.example` shows each of them.
    #[test]
    fn the_help_table_names_every_variable_read() {
        let read = std::sync::Mutex::new(std::collections::BTreeSet::new());
        settings_with(|k| {
            read.lock().unwrap().insert(k.to_string());
            None
        });
        let mut read = read.into_inner().unwrap();
        read.insert("RUST_LOG".to_string()); // read by telemetry::init
        let table: std::collections::BTreeSet<String> = ENV_VARS.iter().map(|v| v.name.to_string()).collect();
        assert_eq!(table, read);
        let example = include_str!("../.env.example");
        for v in ENV_VARS {
            assert!(example.contains(&format!("#{}=", v.name)), "{} missing from .env.example", v.name);
            assert!(env_help().contains(v.name));
        }
    }

    fn settings_with(get: impl Fn(&str) -> Option<String>) {
        Settings::from_lookup(get).unwrap();
    }

    #[test]
    fn defaults_apply() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.body_limit_bytes, 65_536);
        assert_eq!(s.effective_database_url().expose(), "sqlite://./data/centraldb-mfa.db");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = settings(&[("CENTRALDB_LISTEN", "nope")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_LISTEN");
        let e = settings(&[("CENTRALDB_LOG_FORMAT", "xml")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_LOG_FORMAT");
        let e = settings(&[("CENTRALDB_DATABASE_URL", "mysql://x")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_DATABASE_URL");
        let e = settings(&[("CENTRALDB_BOOTSTRAP_ADMIN_KEY", "short")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_BOOTSTRAP_ADMIN_KEY");
        let e = settings(&[("CENTRALDB_REQUEST_TIMEOUT_SECS", "0")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_REQUEST_TIMEOUT_SECS");
    }

    #[test]
    fn file_variants_are_read_and_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "k1:abc\n").unwrap();
        let p = path.to_str().unwrap();
        let s = settings(&[("CENTRALDB_ENCRYPTION_KEYS_FILE", p)]).unwrap();
        assert_eq!(s.encryption_keys.unwrap().expose_secret(), "k1:abc");
        let e = settings(&[("CENTRALDB_ENCRYPTION_KEYS_FILE", p), ("CENTRALDB_ENCRYPTION_KEYS", "x")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_ENCRYPTION_KEYS");
        let e = settings(&[("CENTRALDB_ENCRYPTION_KEYS_FILE", "/nonexistent/x")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_ENCRYPTION_KEYS_FILE");
    }

    #[test]
    fn database_url_hides_every_credential() {
        let cases = [
            (
                "postgres://u:SECRET@h:5432/db?password=SECRET&sslpassword=SECRET&sslmode=require",
                "postgres://u:***@h:5432/db?password=***&sslpassword=***&sslmode=require",
            ),
            ("postgres://u@h/db?Pass%77ord=SECRET&SECRET&a%zz=SECRET", "postgres://u@h/db?***&***&***"),
            ("postgres://u:pa/SECRET@SECRET@h/db?application_name=x", "postgres://u:***@h/db?application_name=x"),
            ("postgres://u:pa?SECRET@h/db", "postgres://***"),
            ("postgres://h/db?sslkey=-----BEGIN%20SECRET#SECRET", "postgres://h/db?sslkey=***#***"),
            ("sqlite://./data/x.db?mode=rwc&password=SECRET", "sqlite://./data/x.db?mode=rwc&password=***"),
            ("sqlite:x.db?password=SECRET", "sqlite:x.db?password=***"),
            ("postgres://u@h/db", "postgres://u@h/db"),
        ];
        for (url, shown) in cases {
            let u = DatabaseUrl::new(url);
            assert_eq!(u.redacted(), shown);
            assert!(!format!("{u} {u:?}").contains("SECRET"), "{url}");
        }
    }

    #[test]
    fn weak_bootstrap_keys_are_refused_and_random_ones_accepted() {
        for weak in
            ["a".repeat(32), "ab".repeat(16), "0123456789".repeat(4), "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ".into()]
        {
            let e = settings(&[("CENTRALDB_BOOTSTRAP_ADMIN_KEY", &weak)]).unwrap_err();
            assert_eq!(e.var, "CENTRALDB_BOOTSTRAP_ADMIN_KEY");
            assert!(e.message.contains("not random") && !e.message.contains(&weak), "{e}");
        }
        for _ in 0..2000 {
            let raw: [u8; 16] = rand::random();
            let decimal: String = rand::random::<[u8; 32]>().iter().map(|b| char::from(b'0' + b % 10)).collect();
            for key in [hex::encode(raw), decimal, crate::crypto::keyring::generate_key_b64().to_string()] {
                assert!(crate::crypto::keyring::weak_text_key(&key).is_none(), "{key}");
            }
        }
        let e =
            settings(&[("CENTRALDB_ENCRYPTION_KEYS", "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")]).unwrap_err();
        assert_eq!(e.var, "CENTRALDB_ENCRYPTION_KEYS");
        assert!(e.message.contains("'k1' is not random"), "{e}");
    }

    #[test]
    fn database_url_hides_password() {
        let u = DatabaseUrl::new("postgres://user:hunter2@db:5432/x");
        assert_eq!(format!("{u:?}"), "DatabaseUrl(postgres://user:***@db:5432/x)");
        assert!(!u.to_string().contains("hunter2"));
    }
}
