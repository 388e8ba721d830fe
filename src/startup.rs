//! Building the application: data folder, database, migrations, keyring checks, first-run keys,
//! the bound listener, and serving until SIGINT/SIGTERM.

use std::{net::SocketAddr, time::Duration};

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
    // A database from before the audit head MAC gets its head sealed once (if its chain verifies).
    crate::services::audit::seal_unsealed_head(db, &ring)
        .await
        .map_err(|error| StartupError::Database { url: settings.effective_database_url().redacted(), error })?;
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
        let final_state = state.clone();
        let sweeper = tokio::spawn(crate::sweeper::run(state.clone(), async move {
            let _ = sweeper_stop.wait_for(|stopped| *stopped).await;
        }));
        let mut listener_stop = stop_rx.clone();
        let version_listener = tokio::spawn(state.notifier.clone().listen_postgres(db.clone(), async move {
            let _ = listener_stop.wait_for(|stopped| *stopped).await;
        }));
        let notifier = state.notifier.clone();
        let limits = HttpLimits { header_read_timeout: state.settings.request_timeout, ..HttpLimits::default() };
        let max_connections = state.settings.max_connections;
        let mfa_tasks = state.mfa.tasks();
        let app = api::app(state);
        let listener = crate::listener::LimitedListener::new(listener, max_connections);
        let result = serve(listener, app, limits, async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            // Long-polling readers answer 304 now instead of holding up the shutdown.
            notifier.close();
        })
        .await;
        // MFA writes run detached from their requests (a client that went away still has its
        // attempt checked and recorded): let them finish before the pool closes.
        mfa_tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), mfa_tasks.wait()).await.is_err() {
            tracing::error!(running = mfa_tasks.len(), "MFA writes still running 10 s after shutdown began");
        }
        let _ = sweeper.await;
        // Refusals answered while the last requests finished, after the sweeper's own flush.
        if let Err(e) = crate::sweeper::flush_refusals(&final_state, crate::store::now(), true).await {
            tracing::warn!(error = %e, "could not write refusal summaries at shutdown");
        }
        drop(final_state);
        let _ = version_listener.await;
        upkeep.abort();
        // Every request has finished; a connection still checked out now would never come back.
        if tokio::time::timeout(Duration::from_secs(5), db.close()).await.is_err() {
            tracing::error!("the database pool did not close within 5 s: a connection was still in use");
        }
        tracing::info!("stopped");
        result
    }
}

/// Limits of the HTTP/1.1 connection layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A client must send a request's whole header block within this time after it starts
    /// reading one (slow clients, slowloris); else the connection is closed.
    pub header_read_timeout: Duration,
    /// The largest request line plus header block: larger gets 431.
    pub max_header_bytes: usize,
    /// More header fields than this gets 431.
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_header_bytes: 32 * 1024, max_headers: 64 }
    }
}

/// Serves HTTP/1.1 on the listener until `shutdown` resolves, then lets every connection finish
/// its request in flight (idle ones close at once) and returns. Like `axum::serve`, plus the
/// connection limits of [`HttpLimits`], which `axum::serve` cannot set (without a timer hyper
/// has no header read timeout at all, and it buffers headers up to ~400 KiB).
pub async fn serve(
    mut listener: crate::listener::LimitedListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    use axum::{body::Body, extract::ConnectInfo, serve::Listener};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        // The read buffer (hyper's minimum is 8 KiB): bounds the memory a connection can pin.
        .max_buf_size((2 * limits.max_header_bytes).max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    // Connections hold a receiver each; shutdown is announced by dropping the sender, and the
    // serve loop waits until every receiver is gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let _ = io.stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(Body::new))
        });
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut stop_rx = stop_rx.clone();
        let done_rx = done_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = stop_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
            }
            drop(done_rx);
        });
    }
    drop(listener);
    drop(stop_rx);
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
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
