//! Destroyed secrets must leave SQLite's write-ahead log soon.
//!
//! `secure_delete` zeroes what a delete frees, but in WAL mode every page a write touched also
//! stays, as it was, in the `-wal` file until the log is rewound, which can take hundreds of
//! writes. So after a destroy (logout, invalidation, expiry) a task runs
//! `PRAGMA wal_checkpoint(TRUNCATE)`: the pages, now without the ciphertext, are copied into the
//! database file and the log is cut to zero bytes. A checkpoint runs while no group transaction
//! is open and holds the in-process writer lock meanwhile; readers still reading an older
//! snapshot (or another process) can keep it busy for a moment, so it waits at most
//! [`BUSY_WAIT`] each time and is retried, with a growing pause, until it succeeds. Requests
//! that arrive while one runs are coalesced into one more run.

use std::{sync::Arc, time::Duration};

use sqlx::{ConnectOptions, SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use super::group::SqliteWriter;

/// How long one checkpoint attempt waits for readers (and other processes) to let go.
pub const BUSY_WAIT: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(1);

pub struct Checkpointer {
    wanted: Arc<Notify>,
}

impl Checkpointer {
    /// Starts the checkpoint task; it ends when the pool is closed.
    pub fn start(pool: SqlitePool, writer: Arc<SqliteWriter>) -> Arc<Self> {
        let wanted = Arc::new(Notify::new());
        tokio::spawn(run(pool, writer, wanted.clone()));
        Arc::new(Self { wanted })
    }

    /// Asks for a checkpoint soon (returns at once).
    pub fn request(&self) {
        self.wanted.notify_one();
    }
}

async fn run(pool: SqlitePool, writer: Arc<SqliteWriter>, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        // A connection of its own, with a short busy timeout (the checkpoint holds the writer
        // lock while it waits, so it must not wait long); closed once the run is done.
        let mut conn: Option<SqliteConnection> = None;
        let mut pause = Duration::from_millis(10);
        let mut attempts = 0u32;
        loop {
            if pool.is_closed() {
                return;
            }
            attempts += 1;
            let done = match conn.as_mut() {
                Some(c) => writer.checkpoint_truncate(c).await,
                None => match pool.connect_options().as_ref().clone().busy_timeout(BUSY_WAIT).connect().await {
                    Ok(c) => writer.checkpoint_truncate(conn.insert(c)).await,
                    Err(e) => Err(e.into()),
                },
            };
            match done {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    // A broken connection is replaced on the next attempt.
                    conn = None;
                    tracing::debug!(error = %e, "WAL checkpoint failed; retrying");
                }
            }
            if attempts.is_multiple_of(20) {
                tracing::warn!(attempts, "WAL checkpoint after a destroy keeps being blocked; retrying");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}
