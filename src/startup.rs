//! Building the application: data folder, database, migrations, keyring checks, first-run keys,
//! the bound listener, and serving until SIGINT/SIGTERM.

use std::{io::Write, net::SocketAddr, path::Path, time::Duration};

use tokio::net::TcpListener;

use crate::{
    api,
    config::Settings,
    services::{
        api_keys,
        keys::{self, KeyError, KeySource},
    },
    state::AppState,
    store::{Db, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("data folder {path}: {error}")]
    DataDir { path: String, error: std::io::Error },
    #[error("database ({url}): {error}")]
    Database { url: String, error: StoreError },
    #[error("encryption keys: {0}")]
    Keys(String),
    #[error("API keys: {0}")]
    ApiKeys(String),
    #[error("settings: {0}")]
    Settings(String),
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
}

/// Writes a file only its owner can read (0600), replacing any earlier content.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts.open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut f = opts.open(path)?;
        f.write_all(contents)?;
        f.sync_all()
    }
}

fn ensure_data_dir(settings: &Settings) -> Result<(), StartupError> {
    let path = &settings.data_dir;
    let err = |error| StartupError::DataDir { path: path.display().to_string(), error };
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    Ok(())
}

/// Connects and migrates; used by `serve`, `migrate` and the other CLI commands.
pub async fn open_database(settings: &Settings) -> Result<Db, StartupError> {
    let url = settings.effective_database_url();
    // The data folder holds the SQLite file, the generated key and the first-run admin key.
    ensure_data_dir(settings)?;
    let db_err = |error| StartupError::Database { url: url.redacted(), error };
    let db = Db::connect(settings).await.map_err(db_err)?;
    db.migrate().await.map_err(db_err)?;
    Ok(db)
}

/// Loads the keyring and checks it against the stored data (nothing is written if it fails).
pub async fn open_keyring(settings: &Settings, db: &Db) -> Result<crate::crypto::Keyring, StartupError> {
    let key_err = |e: KeyError| StartupError::Keys(e.to_string());
    let (ring, source) = keys::load_keyring(settings, db).await.map_err(key_err)?;
    keys::verify_keyring(db, &ring).await.map_err(key_err)?;
    match source {
        KeySource::Generated(path) => tracing::warn!(
            path = %path.display(),
            "no encryption key configured: generated one into the data folder. Back it up: \
             without it the stored tokens cannot be read. For production set CENTRALDB_ENCRYPTION_KEYS."
        ),
        KeySource::File(path) => {
            tracing::info!(path = %path.display(), "encryption key loaded from the data folder")
        }
        KeySource::Environment => {
            tracing::info!(key_ids = ?ring.key_ids(), "encryption keys loaded from the environment")
        }
    }
    Ok(ring)
}

/// Everything `serve` needs before it binds: database, keys, bootstrap API keys.
pub async fn build_state(settings: Settings) -> Result<AppState, StartupError> {
    let db = open_database(&settings).await?;
    let ring = open_keyring(&settings, &db).await?;
    if let Some(key) = &settings.bootstrap_admin_key {
        use secrecy::ExposeSecret;
        api_keys::ensure_bootstrap(&db, key.expose_secret()).await.map_err(|e| StartupError::ApiKeys(e.to_string()))?;
    } else if let Some(path) =
        api_keys::ensure_first_admin(&db, &settings.data_dir).await.map_err(StartupError::ApiKeys)?
    {
        tracing::warn!(path = %path.display(), "no API key existed: created an admin API key and wrote it to this file (mode 0600)");
    }
    AppState::new(db, ring, settings).map_err(StartupError::Settings)
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Builds the state and binds the listener (port 0 picks a free port).
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let addr = settings.listen;
        let state = build_state(settings).await?;
        let listener = TcpListener::bind(addr).await.map_err(|error| StartupError::Listen { addr, error })?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until SIGINT/SIGTERM, lets in-flight requests finish, then closes the pool.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self { listener, state } = self;
        let db = state.db.clone();
        let metrics = state.metrics.clone();
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, database = db.backend(), "centraldb-mfa listening");
        }
        // One signal stops both the HTTP server (after in-flight requests) and the sweeper.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut sweeper_stop = stop_rx.clone();
        let sweeper = tokio::spawn(crate::sweeper::run(state.clone(), async move {
            let _ = sweeper_stop.wait_for(|stopped| *stopped).await;
        }));
        let mut listener_stop = stop_rx.clone();
        let version_listener = tokio::spawn(state.notifier.clone().listen_postgres(db.clone(), async move {
            let _ = listener_stop.wait_for(|stopped| *stopped).await;
        }));
        let notifier = state.notifier.clone();
        let state_max_connections = state.settings.max_connections;
        let app = api::app(state);
        let max_connections = state_max_connections;
        let listener = axum::serve::ListenerExt::tap_io(
            crate::listener::LimitedListener::new(listener, max_connections),
            |io: &mut crate::listener::LimitedStream| {
                let _ = io.stream.set_nodelay(true);
            },
        );
        let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
                // Long-polling readers answer 304 now instead of holding up the shutdown.
                notifier.close();
            })
            .await;
        let _ = sweeper.await;
        let _ = version_listener.await;
        upkeep.abort();
        db.close().await;
        tracing::info!("stopped");
        result
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
