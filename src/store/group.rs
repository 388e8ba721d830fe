//! Group commit for SQLite writes.
//!
//! SQLite has one writer at a time, and with `synchronous=FULL` every commit costs an fsync.
//! So write transactions here are savepoints on one shared transaction: a writer takes the
//! writer lock, runs its statements inside `SAVEPOINT sp_N`, releases it (or rolls back to it),
//! and then waits for the committer task, which commits everything released so far with one
//! fsync and answers each waiter. Under load many writers share a commit; alone, a writer pays
//! about what it did before. A writer is answered only after its work is durable, and a writer
//! that fails (or is cancelled) undoes exactly its own savepoint.
//!
//! If SQLite rolls the whole transaction back by itself (disk full, I/O error), the group is
//! poisoned: everyone waiting on it is told it failed, and the connection is discarded.
//!
//! **The audit chain heads are cached per group.** While the group transaction is open this
//! process holds SQLite's write lock, so nobody else can append to the audit log. The first
//! event of a group in a chain reads that chain's head row (and the first one the seq counter);
//! later events chain from `Group::cache` in memory and write no head row; the committer writes
//! the touched heads and the counter once, just before `COMMIT`. A writer whose savepoint is
//! rolled back undoes exactly its own changes to the cache (`ChainCache` logs them). Code that
//! reads or writes the head rows directly first flushes the cache (`store::audit`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::{Sqlite, SqlitePool, pool::PoolConnection};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, oneshot};

use super::{
    chain_cache::{self, ChainCache},
    error::{Result, StoreError},
};

#[derive(Default)]
pub struct Group {
    /// The connection holding the open group transaction, if one is open.
    conn: Option<PoolConnection<Sqlite>>,
    /// Writers whose savepoints are released and who wait for the commit.
    waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Set when the open transaction can no longer be trusted (SQLite rolled it back).
    poisoned: bool,
    /// The audit chain heads and seq counter as this group's writers have advanced them;
    /// written to the rows before `COMMIT`.
    cache: ChainCache,
}

pub struct SqliteWriter {
    pool: SqlitePool,
    group: Arc<Mutex<Group>>,
    kick: Arc<Notify>,
    counter: AtomicU64,
}

/// A writer's hold on the group transaction, inside its own savepoint.
pub struct GroupTx {
    guard: Option<OwnedMutexGuard<Group>>,
    savepoint: String,
    kick: Arc<Notify>,
}

fn sql_err(e: sqlx::Error) -> StoreError {
    StoreError::from(e)
}

/// A failed RELEASE or COMMIT: the writers are told the database is unavailable (503), except
/// when the disk is full, which they report as such (507).
fn commit_err(what: &str, e: sqlx::Error) -> StoreError {
    let text = format!("{what}: {e}");
    match StoreError::from(e) {
        StoreError::Full => StoreError::Full,
        _ => StoreError::Unavailable(text),
    }
}

impl SqliteWriter {
    /// Creates the writer and starts its committer task.
    pub fn start(pool: SqlitePool) -> Arc<Self> {
        let writer = Arc::new(Self {
            pool,
            group: Arc::new(Mutex::new(Group::default())),
            kick: Arc::new(Notify::new()),
            counter: AtomicU64::new(0),
        });
        tokio::spawn(committer(writer.group.clone(), writer.kick.clone()));
        writer
    }

    pub async fn begin(&self, acquire_timeout: Duration) -> Result<GroupTx> {
        let guard = tokio::time::timeout(acquire_timeout, self.group.clone().lock_owned())
            .await
            .map_err(|_| StoreError::Unavailable("timed out waiting for the SQLite writer".into()))?;
        let savepoint = format!("sp_{}", self.counter.fetch_add(1, Ordering::Relaxed));
        // Opening the group and the savepoint runs in a task of its own, so a caller cancelled
        // here cannot leave the connection half-way: the task finishes and hands the guard back
        // (or drops it, leaving at most an empty savepoint, which the commit discards).
        let pool = self.pool.clone();
        let sp = savepoint.clone();
        let guard = tokio::spawn(async move {
            let mut guard = guard;
            if guard.poisoned {
                discard(&mut guard, "the previous write transaction was rolled back by the database");
            }
            if guard.conn.is_none() {
                let mut conn = pool.acquire().await.map_err(sql_err)?;
                sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await.map_err(sql_err)?;
                guard.conn = Some(conn);
            }
            let conn = guard.conn.as_mut().ok_or_else(|| StoreError::Other("no group connection".into()))?;
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!("SAVEPOINT {sp}"))).execute(&mut **conn).await {
                guard.poisoned = true;
                return Err(sql_err(e));
            }
            Ok(guard)
        })
        .await
        .map_err(|e| StoreError::Other(format!("write start task failed: {e}")))??;
        let mut guard = guard;
        guard.cache.savepoint();
        Ok(GroupTx { guard: Some(guard), savepoint, kick: self.kick.clone() })
    }
}

impl SqliteWriter {
    /// Runs `PRAGMA wal_checkpoint(TRUNCATE)` on `conn` at a moment no group transaction is
    /// open, holding the writer lock so that no in-process writer starts meanwhile (see
    /// `store::wal`). `Ok(true)` when the log was checkpointed in full and truncated, `Ok(false)`
    /// when readers or writers kept it busy.
    pub async fn checkpoint_truncate(&self, conn: &mut sqlx::SqliteConnection) -> Result<bool> {
        // A group may be open, its commit pending: queue again behind the committer, a few times.
        for _ in 0..50 {
            let g = self.group.lock().await;
            if g.conn.is_none() {
                let (busy, _, _): (i64, i64, i64) =
                    sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&mut *conn).await.map_err(sql_err)?;
                return Ok(busy == 0);
            }
            drop(g);
            tokio::task::yield_now().await;
        }
        Ok(false)
    }
}

/// Fails every waiter and drops the group connection (closing it: its state is unknown).
fn discard(group: &mut Group, why: &str) {
    for w in group.waiters.drain(..) {
        let _ = w.send(Err(StoreError::Unavailable(why.to_string())));
    }
    if let Some(conn) = group.conn.take() {
        let _ = conn.detach();
    }
    group.poisoned = false;
    group.cache.clear();
}

impl GroupTx {
    /// The group connection and the group's cached audit chain heads.
    pub fn parts(&mut self) -> Option<(&mut sqlx::SqliteConnection, &mut ChainCache)> {
        let g = &mut **self.guard.as_mut()?;
        let conn = g.conn.as_deref_mut()?;
        Some((conn, &mut g.cache))
    }

    /// Releases the savepoint and waits until the group commit has made it durable.
    pub async fn commit(mut self) -> Result<()> {
        let Some(mut guard) = self.guard.take() else {
            return Err(StoreError::Other("write transaction already finished".into()));
        };
        let sp = self.savepoint.clone();
        let (tx, rx) = oneshot::channel();
        // RELEASE runs in its own task too: cancelled here, the release still completes (or
        // the group is poisoned), and the commit outcome is simply not awaited.
        let kick = self.kick.clone();
        tokio::spawn(async move {
            let released = match guard.conn.as_mut() {
                Some(conn) => sqlx::query(sqlx::AssertSqlSafe(format!("RELEASE {sp}"))).execute(&mut **conn).await,
                None => Err(sqlx::Error::PoolClosed),
            };
            match released {
                Ok(_) => guard.waiters.push(tx),
                Err(e) => {
                    guard.poisoned = true;
                    let _ = tx.send(Err(commit_err("could not release the write", e)));
                }
            }
            drop(guard);
            kick.notify_one();
        })
        .await
        .map_err(|e| StoreError::Other(format!("write release task failed: {e}")))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Other("the SQLite committer stopped".into())),
        }
    }
}

impl Drop for GroupTx {
    /// Not committed: undo exactly this writer's savepoint (in a task, since drop cannot wait).
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        let sp = std::mem::take(&mut self.savepoint);
        let kick = self.kick.clone();
        // The savepoint's events are gone, so is what they did to the cached heads.
        guard.cache.rollback();
        let undo = async move {
            if let Some(conn) = guard.conn.as_mut() {
                let sql = format!("ROLLBACK TO {sp}; RELEASE {sp}");
                if sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut **conn).await.is_err() {
                    // The savepoint is gone: SQLite rolled the whole transaction back.
                    guard.poisoned = true;
                }
            }
            drop(guard);
            kick.notify_one();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(undo);
            }
            Err(_) => tracing::error!("write transaction dropped outside a runtime; its group is abandoned"),
        }
    }
}

/// Commits whatever has been released, whenever writers wait for it.
async fn committer(group: Arc<Mutex<Group>>, kick: Arc<Notify>) {
    loop {
        kick.notified().await;
        // The lock is fair: writers queued before us add their savepoints first, so they ride
        // along in this commit.
        let mut g = group.lock().await;
        if g.poisoned {
            discard(&mut g, "the write transaction was rolled back by the database");
            continue;
        }
        if g.waiters.is_empty() {
            // Every savepoint was rolled back (failed or cancelled writers): end the open
            // transaction too, so the SQLite write lock and the connection are given back now,
            // not at the next successful write (other processes could not write meanwhile, and
            // shutdown waited for the connection). We hold the group lock, so no writer is
            // inside a savepoint.
            g.cache.clear();
            if let Some(mut conn) = g.conn.take()
                && sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err()
            {
                let _ = conn.detach();
            }
            continue;
        }
        let Some(mut conn) = g.conn.take() else {
            discard(&mut g, "no write transaction was open");
            continue;
        };
        // The chain heads as the group's writers left them, in the same transaction.
        let result = chain_cache::write_cache(&mut conn, &mut g.cache).await;
        let result = match result {
            Ok(()) => sqlx::query("COMMIT").execute(&mut *conn).await,
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(_) => {
                drop(conn);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, writers = g.waiters.len(), "group commit failed");
                let _ = conn.detach();
                Err(commit_err("the database could not commit", e))
            }
        };
        for w in g.waiters.drain(..) {
            let _ = w.send(outcome.clone());
        }
    }
}
