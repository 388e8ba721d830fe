//! The command line: `serve` (default), `migrate`, `keygen`, `api-key`, `rewrap`, `audit`,
//! `openapi`, `healthcheck`.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    config::Settings,
    crypto::keyring::{generate_key_b64, valid_key_id},
    domain::Scopes,
    services::{
        api_keys,
        audit::{self, AuditContext},
        keys,
    },
    startup::{self, Application},
    telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "centraldb-mfa",
    version,
    about = "Encrypted Garmin token vault, MFA challenges and audit trail for GarminSync",
    after_help = "Configuration comes from environment variables: `--help` lists them."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Parses the command line; `--help` ends with the environment variables, generated from
/// [`crate::config::ENV_VARS`] (exits on `--help`, `--version` or a usage error, like clap).
pub fn parse() -> Cli {
    let matches = Cli::command().after_long_help(crate::config::env_help()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print a new random 256-bit key (base64) for CENTRALDB_ENCRYPTION_KEYS.
    Keygen {
        /// Print it as `ID:key`, ready for CENTRALDB_ENCRYPTION_KEYS.
        #[arg(long)]
        id: Option<String>,
    },
    /// Manage API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Re-encrypt every stored ciphertext under the active (first) key, re-seal the audit chain
    /// under it, and report counts.
    Rewrap,
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print the OpenAPI document.
    Openapi,
    /// Exit 0 when /healthz on the configured listen address answers 200 (for container health checks).
    Healthcheck {
        /// Address to check instead of CENTRALDB_LISTEN.
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it once. Names are unique among active keys.
    Create {
        #[arg(long)]
        name: String,
        /// One or more of tokens:read, tokens:write, mfa, sessions, audit:read, admin.
        #[arg(long = "scope", required = true, num_args = 1..)]
        scopes: Vec<String>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by its id or the prefix `api-key list` shows.
    Revoke {
        /// The key's id (UUID) or its listed prefix (e.g. `cdbm_1a2b3c4`).
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the HMAC chains: every event, no missing position, every head. Exits 1 if one is
    /// broken (naming the first bad seq and its chain).
    Verify {
        /// Also check a signed checkpoint (JSON, as `audit checkpoint` prints it): exits 1 when
        /// an event it covers was removed, changed or rewound, or its signature does not verify.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<std::path::PathBuf>,
    },
    /// Print a signed checkpoint of every chain's head (JSON), to keep elsewhere.
    Checkpoint,
    /// Print the checkpoint public keys (Ed25519) of the keyring's keys (JSON).
    PublicKey,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

pub async fn run(cli: Cli) -> ExitCode {
    let command = cli.command.unwrap_or(Command::Serve);
    match command {
        Command::Keygen { id } => {
            let key = generate_key_b64();
            match id {
                Some(id) if !valid_key_id(&id) => {
                    return fail("--id must be 1-32 characters of letters, digits, - and _");
                }
                Some(id) => println!("{id}:{}", key.as_str()),
                None => println!("{}", key.as_str()),
            }
            return ExitCode::SUCCESS;
        }
        Command::Openapi => {
            return match crate::api::openapi().to_pretty_json() {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            };
        }
        _ => {}
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return fail(format!("configuration: {e}")),
    };
    match command {
        Command::Serve => {
            if let Err(e) = telemetry::init(settings.log_format, "info") {
                return fail(format!("configuration: {e}"));
            }
            let app = match Application::build(settings).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "start-up failed");
                    return fail(e);
                }
            };
            match app.run_until_stopped().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Healthcheck { addr } => {
            let mut addr = addr.unwrap_or(settings.listen);
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            match tokio::time::timeout(Duration::from_secs(3), probe(addr)).await {
                Ok(Ok(true)) => ExitCode::SUCCESS,
                Ok(Ok(false)) => fail("/healthz did not answer 200"),
                Ok(Err(e)) => fail(e),
                Err(_) => fail("/healthz timed out"),
            }
        }
        other => {
            // Admin commands (rewrap above all) run beside a serving process: on SQLite they wait
            // up to a minute for its writer rather than fail with "database is locked" (a loaded
            // server's group commit can keep the write lock busy for seconds; seen in CI as a
            // rewrap failing after the 5 s default).
            let mut settings = settings;
            settings.sqlite_busy_timeout = settings.sqlite_busy_timeout.max(Duration::from_secs(60));
            if let Err(e) = telemetry::init(settings.log_format, "warn") {
                return fail(format!("configuration: {e}"));
            }
            let db = match startup::open_database(&settings).await {
                Ok(db) => db,
                Err(e) => return fail(e),
            };
            let code = admin_command(other, &settings, &db).await;
            db.close().await;
            code
        }
    }
}

async fn admin_command(command: Command, settings: &Settings, db: &crate::store::Db) -> ExitCode {
    match command {
        Command::Migrate => {
            // The keyring is checked exactly as `serve` checks it: a keyring serve would refuse
            // fails here too, with the same message.
            if let Err(e) = startup::open_keyring(settings, db).await {
                return fail(e);
            }
            eprintln!("migrations applied ({})", settings.effective_database_url());
            ExitCode::SUCCESS
        }
        Command::ApiKey(ApiKeyCommand::Create { name, scopes }) => {
            let scopes = match Scopes::parse_list(&scopes.join(" ")) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            if name.trim().is_empty() || name.len() > 100 {
                return fail("--name must be 1-100 characters");
            }
            match api_keys::create_unique(db, &name, &scopes).await {
                Ok(None) => fail(format!("an active API key named '{name}' exists; choose another --name")),
                Ok(Some((id, key))) => {
                    eprintln!(
                        "created API key {id} ({name}, scopes: {}); it is shown only this once:",
                        scopes.to_stored()
                    );
                    println!("{}", key.as_str());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::ApiKey(ApiKeyCommand::List) => match api_keys::list(db).await {
            Ok(keys) => {
                println!("{:<36}  {:<12}  {:<20}  {:<30}  {:<8}  last used", "id", "prefix", "name", "scopes", "state");
                for k in keys {
                    println!(
                        "{:<36}  {:<12}  {:<20}  {:<30}  {:<8}  {}",
                        k.id,
                        k.prefix,
                        k.name,
                        k.scopes,
                        if k.revoked_at.is_some() { "revoked" } else { "active" },
                        k.last_used_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::ApiKey(ApiKeyCommand::Revoke { key }) => {
            let keys = match api_keys::list(db).await {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
            let id = match api_keys::find_for_revoke(&keys, &key) {
                Ok(id) => id,
                Err(e) => return fail(e),
            };
            match api_keys::revoke(db, id).await {
                Ok(true) => {
                    eprintln!(
                        "revoked {id} (running services stop accepting it within CENTRALDB_API_KEY_CACHE_SECS, {} s)",
                        settings.api_key_cache_ttl.as_secs()
                    );
                    ExitCode::SUCCESS
                }
                Ok(false) => fail(format!("API key {id} is already revoked")),
                Err(e) => fail(e),
            }
        }
        Command::Rewrap => {
            let ring = match startup::open_keyring(settings, db).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            match keys::rewrap(db, &ring, &AuditContext::system("cli")).await {
                Ok(r) => {
                    let audit = match &r.audit_broken {
                        None => format!("re-sealed {} audit event(s)", r.resealed),
                        Some(b) => format!("audit chain NOT re-sealed: {}", broken(b)),
                    };
                    println!(
                        "rewrapped {} ciphertext(s) under key '{}'; {} changed concurrently and were left as written; {} upgraded from the legacy (unversioned) binding; {} failed to decrypt; {audit}",
                        r.rewrapped,
                        ring.active_key_id(),
                        r.skipped_changed,
                        r.legacy_upgraded,
                        r.failed.len()
                    );
                    for u in &r.failed {
                        eprintln!("failed to decrypt the bundle of user {u}");
                    }
                    if r.failed.is_empty() && r.audit_broken.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(e) => fail(e),
            }
        }
        Command::Audit(cmd) => {
            let ring = match startup::open_keyring(settings, db).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            match cmd {
                AuditCommand::Verify { checkpoint } => {
                    let result = match checkpoint {
                        None => audit::verify(db, &ring).await,
                        Some(path) => {
                            let text = match std::fs::read_to_string(&path) {
                                Ok(t) => t,
                                Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
                            };
                            let cp: audit::Checkpoint = match serde_json::from_str(&text) {
                                Ok(c) => c,
                                Err(e) => return fail(format!("{} is not a checkpoint: {e}", path.display())),
                            };
                            audit::verify_checkpoint(db, &ring, &cp).await
                        }
                    };
                    match result {
                        Ok(r) if r.ok => {
                            match r.purged_through {
                                None => println!("audit chain ok: {} events", r.events_checked),
                                Some(p) => println!(
                                    "audit chain ok: {} events (events through seq {p} were purged by retention)",
                                    r.events_checked
                                ),
                            }
                            ExitCode::SUCCESS
                        }
                        Ok(r) => {
                            println!("audit chain {}", broken(&r));
                            ExitCode::FAILURE
                        }
                        Err(e) => fail(e),
                    }
                }
                AuditCommand::Checkpoint => match audit::checkpoint(db, &ring).await {
                    Ok(cp) => match serde_json::to_string_pretty(&cp) {
                        Ok(text) => {
                            println!("{text}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(e),
                    },
                    Err(e) => fail(e),
                },
                AuditCommand::PublicKey => {
                    match serde_json::to_string_pretty(&serde_json::json!({"keys": audit::public_keys(&ring)})) {
                        Ok(text) => {
                            println!("{text}");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(e),
                    }
                }
            }
        }
        Command::Serve | Command::Keygen { .. } | Command::Openapi | Command::Healthcheck { .. } => ExitCode::SUCCESS,
    }
}

/// `BROKEN at seq S: reason [chain C]` for a log that did not verify.
fn broken(r: &audit::VerifyReport) -> String {
    let reason = r.reason.as_deref().unwrap_or("unknown");
    let chain = match r.first_bad_chain {
        Some(audit::LEGACY_CHAIN) => " [legacy chain]".to_string(),
        Some(c) => format!(" [chain {c}]"),
        None => String::new(),
    };
    match r.first_bad_seq {
        Some(seq) => format!("BROKEN at seq {seq}: {reason}{chain}"),
        None => format!("BROKEN: {reason}{chain}"),
    }
}

/// A minimal HTTP/1.1 GET of /healthz (no client library needed in the runtime image).
async fn probe(addr: SocketAddr) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await?;
    Ok(buf[..n].starts_with(b"HTTP/1.1 200"))
}
