//! The only SQL in the service. Two backends, one code path.
//!
//! Every query is written once, with `$n` placeholders (SQLite accepts them) and `RETURNING`
//! (both have it), and run through [`Conn`], which holds either a SQLite or a PostgreSQL
//! connection. Timestamps are always bound from the service (never SQL `now()`), truncated to
//! microseconds, so both backends store and compare the same instants.
//!
//! SQLite allows one writer at a time: write transactions start with `BEGIN IMMEDIATE` (so a
//! read never has to upgrade to a write lock and fail) and queue on an in-process mutex first,
//! so the busy timeout only matters across processes. On PostgreSQL, `begin_write_for(users)`
//! serialises only writers of the same users (advisory locks; the audit log is partitioned, so
//! no common row either): token reads and writes, leases, sessions, MFA challenges and the
//! sweeper's expiries use it, and run at once for different users. `begin_write` still takes
//! one common lock (the old audit head row) for the rare writers that act on no one user (API
//! key changes, refusal summaries, retention purges, rewrap). Single-row statements with no
//! audit event (`Idempotency-Key` records, `last_used_at`) use `begin_write_for(&[])`: no lock.
//!
//! Lock order, the same for every writer, so none can deadlock: (1) the common lock, if taken;
//! (2) user locks, in sorted order (a writer that holds the common lock takes none); (3) the
//! pending-challenge cap lock ([`PENDING_CAP_LOCK`], challenge creation only); (4) rows of its
//! users; (5) audit chain heads, in chain order. A user writer's row locks after (5) are rows of
//! its own users, which only holders of the same user lock write (the common-lock writers touch
//! only rows no user writer waits for: terminal rows, keys, resume states one row at a time).

use std::{str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::{
    PgConnection, Postgres, Sqlite, SqliteConnection,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

pub use error::{Result, StoreError};

use crate::config::{DatabaseUrl, Settings, SqliteSync};

/// A connection of either backend; every store function takes one.
pub enum Conn<'c> {
    /// A SQLite connection; inside a grouped write transaction, with the group's cached audit
    /// chain heads (see `group`): `None` outside one.
    Sqlite(&'c mut SqliteConnection, Option<&'c mut chain_cache::ChainCache>),
    Postgres(&'c mut PgConnection),
    /// A write transaction that no longer has a connection (never handed out in practice).
    Closed,
}

/// Runs the same expression against whichever backend `$conn` holds. Inside, `$c` is a
/// `&mut SqliteConnection` or `&mut PgConnection`, so the SQL and binds are written once.
macro_rules! dispatch {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::Conn::Sqlite(inner, _) => {
                let $c = &mut **inner;
                $body
            }
            $crate::store::Conn::Postgres(inner) => {
                let $c = &mut **inner;
                $body
            }
            $crate::store::Conn::Closed => Err(sqlx::Error::PoolClosed),
        }
    };
}

pub mod api_keys;
pub mod audit;
mod chain_cache;
pub mod challenges;
mod error;
mod group;
pub mod idempotency;
pub mod keys;
pub mod leases;
pub mod notify;
pub mod sessions;
pub mod tokens;
mod wal;

/// Serialises transactions that touch the same `key` (a user id) until commit. PostgreSQL: a
/// transaction-scoped advisory lock, so it holds across processes. SQLite: write transactions
/// are serialised already, so nothing to do. The same lock as [`Db::begin_write_for`] takes.
pub async fn lock(c: &mut Conn<'_>, key: &str) -> Result<()> {
    if let Conn::Postgres(pg) = c {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind(key).execute(&mut **pg).await?;
    }
    Ok(())
}

/// Takes the user lock ([`lock`]) of the user that the row `id` of `table` (`challenges` or
/// `sessions`) belongs to, in one round trip; nothing when there is no such row. A row's
/// `user_id` never changes, so once this returns, every writer of that row holds the same lock.
/// Call it first in a transaction begun with `begin_write_for(&[])`, before any row lock.
pub async fn lock_owner(c: &mut Conn<'_>, table: Owned, id: uuid::Uuid) -> Result<()> {
    if let Conn::Postgres(pg) = c {
        let sql = match table {
            Owned::Challenge => {
                "SELECT pg_advisory_xact_lock(hashtextextended(user_id, 0)) FROM challenges WHERE id = $1"
            }
            Owned::Session => "SELECT pg_advisory_xact_lock(hashtextextended(user_id, 0)) FROM sessions WHERE id = $1",
        };
        sqlx::query(sql).bind(id).execute(&mut **pg).await?;
    }
    Ok(())
}

/// The tables whose rows [`lock_owner`] finds the user of.
#[derive(Debug, Clone, Copy)]
pub enum Owned {
    Challenge,
    Session,
}

/// The fixed key of the lock that orders challenge creations around the service-wide
/// pending-challenge cap (see `services::mfa`): taken after the user lock, before any row or
/// audit head lock, and never followed by a user lock.
pub const PENDING_CAP_LOCK: &str = "centraldb:pending-challenge-cap";

/// The current instant at the precision both databases store (microseconds).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Creates a new SQLite database file readable by its owner only (SQLite gives the -wal and
/// -shm files the same mode). An existing file is left as it is.
fn create_private_file(path: &std::path::Path) {
    if path.as_os_str().is_empty() || path.to_string_lossy().starts_with(':') || path.exists() {
        return;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    // Best effort: if this fails, SQLite creates the file itself and reports any real problem.
    let _ = opts.open(path);
}

/// Starting a transaction is not safe to cancel in sqlx 0.9: a caller dropped while `BEGIN` is
/// in flight (a request timeout, a client gone) can return the connection to the pool inside an
/// open transaction (sqlx issue #4393), which on PostgreSQL could then hold the audit head lock
/// forever. So `BEGIN` runs in a task of its own: a cancelled caller merely stops waiting, the
/// task finishes, and a transaction nobody claims is dropped and rolled back as usual.
pub(crate) async fn begin_sqlite(
    pool: &SqlitePool,
    statement: &'static str,
) -> Result<sqlx::Transaction<'static, Sqlite>> {
    let pool = pool.clone();
    tokio::spawn(async move { pool.begin_with(statement).await })
        .await
        .map_err(|e| StoreError::Other(format!("transaction start task failed: {e}")))?
        .map_err(StoreError::from)
}

/// As [`begin_sqlite`], optionally running one statement (a lock) right after `BEGIN`.
pub(crate) async fn begin_postgres(
    pool: &PgPool,
    statement: &'static str,
    then: Option<&'static str>,
) -> Result<sqlx::Transaction<'static, Postgres>> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut tx = pool.begin_with(statement).await?;
        if let Some(sql) = then {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        Ok::<_, sqlx::Error>(tx)
    })
    .await
    .map_err(|e| StoreError::Other(format!("transaction start task failed: {e}")))?
    .map_err(StoreError::from)
}

/// The lock `begin_write` takes on PostgreSQL: the legacy audit chain head row.
const GLOBAL_WRITE_LOCK: &str = "SELECT last_seq FROM audit_chain WHERE id = 1 FOR UPDATE";

/// Records the wait for a connection (`read`) or the write transaction (`write`), and counts
/// the waits that timed out.
fn acquired(kind: &'static str, start: std::time::Instant, err: Option<&StoreError>) {
    use crate::telemetry::{DB_ACQUIRE, DB_ACQUIRE_TIMEOUTS};
    metrics::histogram!(DB_ACQUIRE, "kind" => kind).record(start.elapsed().as_secs_f64());
    if let Some(StoreError::Unavailable(m)) = err
        && m.contains("timed out")
    {
        metrics::counter!(DB_ACQUIRE_TIMEOUTS, "kind" => kind).increment(1);
    }
}

#[derive(Clone)]
pub enum Db {
    Sqlite {
        pool: SqlitePool,
        writer: Arc<group::SqliteWriter>,
        acquire_timeout: Duration,
        wal: Arc<wal::Checkpointer>,
    },
    Postgres {
        pool: PgPool,
    },
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite { .. } => "Db::Sqlite",
            Self::Postgres { .. } => "Db::Postgres",
        })
    }
}

enum TxKind {
    /// A savepoint in SQLite's shared (group-committed) write transaction.
    Sqlite(group::GroupTx),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

/// A write transaction. Dropped without `commit`, it rolls back.
pub struct WriteTx {
    tx: TxKind,
}

impl WriteTx {
    pub fn conn(&mut self) -> Conn<'_> {
        match &mut self.tx {
            TxKind::Sqlite(g) => match g.parts() {
                Some((c, head)) => Conn::Sqlite(c, Some(head)),
                // Unreachable: a GroupTx holds its connection until commit or drop.
                None => Conn::Closed,
            },
            TxKind::Postgres(t) => Conn::Postgres(&mut *t),
        }
    }

    /// Commits (on SQLite: once the group commit holding this write is durable).
    pub async fn commit(self) -> Result<()> {
        match self.tx {
            TxKind::Sqlite(g) => g.commit().await?,
            TxKind::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }
}

/// A pooled connection for reads outside a transaction.
pub enum ReadConn {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl ReadConn {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(c) => Conn::Sqlite(&mut *c, None),
            Self::Postgres(c) => Conn::Postgres(&mut *c),
        }
    }
}

impl Db {
    /// Connects to the configured database (creating the SQLite file if needed).
    pub async fn connect(settings: &Settings) -> Result<Self> {
        let url = settings.effective_database_url();
        Self::connect_url(&url, settings).await
    }

    pub async fn connect_url(url: &DatabaseUrl, settings: &Settings) -> Result<Self> {
        let acquire_timeout = settings.db_acquire_timeout;
        if url.is_postgres() {
            let opts = PgConnectOptions::from_str(url.expose())
                .map_err(|e| StoreError::Other(format!("invalid CENTRALDB_DATABASE_URL: {e}")))?;
            let pool = PgPoolOptions::new()
                .max_connections(settings.db_max_connections.unwrap_or(16))
                .min_connections(1)
                .acquire_timeout(acquire_timeout)
                .test_before_acquire(false)
                .connect_with(opts)
                .await?;
            Ok(Self::Postgres { pool })
        } else {
            let sync = match settings.sqlite_synchronous {
                SqliteSync::Full => SqliteSynchronous::Full,
                SqliteSync::Normal => SqliteSynchronous::Normal,
            };
            let opts = SqliteConnectOptions::from_str(url.expose())
                .map_err(|e| StoreError::Other(format!("invalid CENTRALDB_DATABASE_URL: {e}")))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sync)
                .foreign_keys(true)
                .busy_timeout(settings.sqlite_busy_timeout)
                .pragma("secure_delete", "ON")
                // Savepoint journals (every grouped write is a savepoint) in memory, not a temp
                // file opened and unlinked per transaction.
                .pragma("temp_store", "MEMORY")
                // Reads straight from a shared memory map instead of `pread` copies into each
                // connection's cache, when configured (issue 16: ~20% of CPU went to the copies).
                .pragma("mmap_size", (settings.sqlite_mmap_mib * 1024 * 1024).to_string())
                .pragma("cache_size", format!("-{}", settings.sqlite_cache_mib * 1024));
            create_private_file(opts.get_filename());
            let pool = SqlitePoolOptions::new()
                .max_connections(settings.db_max_connections.unwrap_or(8))
                .min_connections(1)
                .acquire_timeout(acquire_timeout)
                .test_before_acquire(false)
                .connect_with(opts)
                .await?;
            let writer = group::SqliteWriter::start(pool.clone());
            let wal = wal::Checkpointer::start(pool.clone(), writer.clone());
            Ok(Self::Sqlite { pool, writer, acquire_timeout, wal })
        }
    }

    /// Whether several service instances may share this database (PostgreSQL), so that what one
    /// instance keeps in its own data folder (a generated encryption key) would not reach the
    /// others. A SQLite file belongs to one data folder.
    pub fn shared_by_instances(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    pub async fn migrate(&self) -> Result<()> {
        match self {
            Self::Sqlite { pool, .. } => sqlx::migrate!("migrations/sqlite").run(pool).await?,
            Self::Postgres { pool } => sqlx::migrate!("migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    pub async fn begin_write(&self) -> Result<WriteTx> {
        let start = std::time::Instant::now();
        let tx = self.begin_write_untimed().await;
        acquired("write", start, tx.as_ref().err());
        tx
    }

    /// Pool figures for `/metrics`: connections in use, idle, and the pool's limit.
    pub fn pool_stats(&self) -> (u32, u32, u32) {
        let (size, idle, max) = match self {
            Self::Sqlite { pool, .. } => (pool.size(), pool.num_idle(), pool.options().get_max_connections()),
            Self::Postgres { pool } => (pool.size(), pool.num_idle(), pool.options().get_max_connections()),
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        (size - idle, idle, max)
    }

    async fn begin_write_untimed(&self) -> Result<WriteTx> {
        match self {
            Self::Sqlite { writer, acquire_timeout, .. } => {
                Ok(WriteTx { tx: TxKind::Sqlite(writer.begin(*acquire_timeout).await?) })
            }
            // The general write transaction still takes the old audit chain head row as a lock
            // of its own (no event is chained on it any more: see `begin_write_for`), for the
            // rare writers that act on no one user (API keys, refusal summaries, retention,
            // rewrap). Every per-user path (tokens, leases, sessions, MFA, sweeper expiries)
            // uses `begin_write_for` instead; see the lock order at the top of this file.
            Self::Postgres { pool } => {
                Ok(WriteTx { tx: TxKind::Postgres(begin_postgres(pool, "BEGIN", Some(GLOBAL_WRITE_LOCK)).await?) })
            }
        }
    }

    /// A write transaction that serialises only with transactions about the same `keys` (user
    /// ids): PostgreSQL takes their advisory locks (`lock`), in sorted order, and no common lock,
    /// so writers of different users run at once (the audit log is partitioned: each locks only
    /// the heads of its own chains). SQLite: as `begin_write` (one writer anyway).
    pub async fn begin_write_for(&self, keys: &[&str]) -> Result<WriteTx> {
        let start = std::time::Instant::now();
        let tx = self.begin_write_for_untimed(keys).await;
        acquired("write", start, tx.as_ref().err());
        tx
    }

    async fn begin_write_for_untimed(&self, keys: &[&str]) -> Result<WriteTx> {
        match self {
            Self::Sqlite { .. } => self.begin_write_untimed().await,
            Self::Postgres { pool } => {
                let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
                keys.sort_unstable();
                keys.dedup();
                let pool = pool.clone();
                let tx = tokio::spawn(async move {
                    let mut tx = pool.begin_with("BEGIN").await?;
                    if keys.is_empty() {
                        return Ok::<_, sqlx::Error>(tx);
                    }
                    sqlx::query(
                        "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) \
                         FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS s",
                    )
                    .bind(keys)
                    .execute(&mut *tx)
                    .await?;
                    Ok::<_, sqlx::Error>(tx)
                })
                .await
                .map_err(|e| StoreError::Other(format!("transaction start task failed: {e}")))?
                .map_err(StoreError::from)?;
                Ok(WriteTx { tx: TxKind::Postgres(tx) })
            }
        }
    }

    pub async fn read(&self) -> Result<ReadConn> {
        let start = std::time::Instant::now();
        let conn: Result<ReadConn> = match self {
            Self::Sqlite { pool, .. } => pool.acquire().await.map(ReadConn::Sqlite).map_err(Into::into),
            Self::Postgres { pool } => pool.acquire().await.map(ReadConn::Postgres).map_err(Into::into),
        };
        acquired("read", start, conn.as_ref().err());
        conn
    }

    /// After a destroy (logout, invalidation, expiry), once committed: on SQLite, checkpoints
    /// and truncates the write-ahead log soon, so the destroyed ciphertext leaves the `-wal`
    /// file too (see `wal`). Returns at once; PostgreSQL has nothing to do.
    pub fn checkpoint_soon(&self) {
        if let Self::Sqlite { wal, .. } = self {
            wal.request();
        }
    }

    /// One round trip; used by `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        let mut rc = self.read().await?;
        let mut c = rc.conn();
        dispatch!(&mut c, |c| sqlx::query("SELECT 1").execute(c).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite { pool, .. } => pool.close().await,
            Self::Postgres { pool } => pool.close().await,
        }
    }
}
