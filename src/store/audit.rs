//! `audit_events` and `audit_chain`: an append-only log, each row written inside the
//! transaction of the act it records, chained by HMAC (the rules live in `services::audit`).

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Sqlite};
use uuid::Uuid;

use super::{Conn, Db, Result, StoreError};

/// The columns of an event as the API shows it (never the chain columns).
macro_rules! event_columns {
    () => {
        "seq, id, at, type, outcome, user_id, actor, request_id, source_ip, details"
    };
}

/// One audit event as stored. `details` is JSON text and never holds a secret.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub id: Uuid,
    pub at: DateTime<Utc>,
    #[sqlx(rename = "type")]
    pub type_: String,
    pub outcome: String,
    pub user_id: Option<String>,
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
    pub details: String,
}

/// An event with its place in the chain: the key id its HMAC is under, and the HMAC.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChainedRow {
    #[sqlx(flatten)]
    pub event: AuditRow,
    pub chain_key_id: String,
    pub hmac: Vec<u8>,
}

pub struct NewAuditEvent<'a> {
    pub seq: i64,
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub type_: &'a str,
    pub outcome: &'a str,
    pub user_id: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub source_ip: Option<&'a str>,
    pub details: &'a str,
    pub chain_key_id: &'a str,
    pub hmac: &'a [u8],
}

/// The chain head: the last `seq` handed out and the HMAC of that event (32 zero bytes at 0),
/// the retention anchor (the last purged event and its HMAC, which the oldest retained event
/// chains from; 0 and zeros before any purge), and the head's own MAC under `head_key_id`
/// (`None` on a database not yet sealed since the migration that added it).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChainHead {
    pub last_seq: i64,
    pub last_hmac: Vec<u8>,
    pub anchor_seq: i64,
    pub anchor_hmac: Vec<u8>,
    pub head_key_id: Option<String>,
    pub head_mac: Option<Vec<u8>>,
}

/// The id of the one chain there is today (the head row's id; a partitioned log would have one
/// head per chain, each MACed with its id).
pub const CHAIN_ID: i64 = 1;

macro_rules! head_columns {
    () => {
        "last_seq, last_hmac, anchor_seq, anchor_hmac, head_key_id, head_mac"
    };
}
const ADVANCE_HEAD_BY: &str =
    concat!("UPDATE audit_chain SET last_seq = last_seq + $1 WHERE id = 1 RETURNING ", head_columns!());
const LOCK_HEAD: &str = concat!("UPDATE audit_chain SET last_seq = last_seq WHERE id = 1 RETURNING ", head_columns!());
const READ_HEAD: &str = concat!("SELECT ", head_columns!(), " FROM audit_chain WHERE id = 1");
/// Writes the whole head (also the SQLite group commit's cached head, before `COMMIT`).
const WRITE_HEAD: &str = "UPDATE audit_chain SET last_seq = $1, last_hmac = $2, anchor_seq = $3, anchor_hmac = $4, \
     head_key_id = $5, head_mac = $6 WHERE id = 1";
const DELETE_THROUGH: &str = "DELETE FROM audit_events WHERE seq <= $1";
const INSERT: &str = concat!(
    "INSERT INTO audit_events (",
    event_columns!(),
    ", chain_key_id, hmac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
);
const LIST_AFTER: &str =
    concat!("SELECT ", event_columns!(), " FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
const CHAIN_PAGE: &str =
    concat!("SELECT ", event_columns!(), ", chain_key_id, hmac FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
const NEXT_SEQ: &str = "SELECT MIN(seq) FROM audit_events WHERE seq > $1";
const RESEAL: &str = "UPDATE audit_events SET chain_key_id = $2, hmac = $3 WHERE seq = $1";
const QUERY: &str = concat!(
    "SELECT ",
    event_columns!(),
    " FROM audit_events WHERE seq > $1 ",
    "AND ($2 IS NULL OR user_id = $2) ",
    "AND ($3 IS NULL OR type = $3) ",
    "AND ($4 IS NULL OR outcome = $4) ",
    "AND ($5 IS NULL OR at >= $5) ",
    "AND ($6 IS NULL OR at < $6) ",
    "ORDER BY seq LIMIT $7"
);
/// The distinct chain key ids by a loose index scan (one index probe per key id, not a full scan).
/// The head's MAC key id is one of them.
const CHAIN_KEY_IDS: &str = "WITH RECURSIVE k(id) AS ( \
         SELECT MIN(chain_key_id) FROM audit_events \
         UNION ALL \
         SELECT (SELECT MIN(chain_key_id) FROM audit_events WHERE chain_key_id > k.id) FROM k WHERE k.id IS NOT NULL \
     ) SELECT id FROM k WHERE id IS NOT NULL \
     UNION SELECT head_key_id FROM audit_chain WHERE head_key_id IS NOT NULL";

fn head_missing() -> StoreError {
    StoreError::Other("the audit chain head (audit_chain row 1) is missing".into())
}

/// Hands out the next `n` seqs at once: returns the last of them and the HMAC of the event
/// before the first (the head as it was).
pub async fn advance_head_by(c: &mut Conn<'_>, n: i64) -> Result<ChainHead> {
    flush_cached_head(c).await?;
    let head: Option<ChainHead> = dispatch!(c, |c| sqlx::query_as(ADVANCE_HEAD_BY).bind(n).fetch_optional(c).await)?;
    head.ok_or_else(head_missing)
}

/// Inside a SQLite group transaction: the group's cached head, reading the head row into the
/// cache first if nothing cached it yet. `None` outside one (the caller uses the row).
pub async fn cached_head(c: &mut Conn<'_>) -> Result<Option<ChainHead>> {
    let Conn::Sqlite(conn, Some(cache)) = c else { return Ok(None) };
    if cache.is_none() {
        let head: Option<ChainHead> = sqlx::query_as(READ_HEAD).fetch_optional(&mut **conn).await?;
        **cache = Some(head.ok_or_else(head_missing)?);
    }
    Ok(cache.clone())
}

/// Records the head after events were appended from [`cached_head`] (no row is written).
pub fn set_cached_head(c: &mut Conn<'_>, head: ChainHead) {
    if let Conn::Sqlite(_, Some(cache)) = c {
        **cache = Some(head);
    }
}

/// Writes a SQLite group's cached head to the head row and forgets it, so that code reading or
/// writing the row directly sees the true head.
async fn flush_cached_head(c: &mut Conn<'_>) -> Result<()> {
    if let Conn::Sqlite(conn, Some(cache)) = c
        && let Some(h) = cache.take()
    {
        write_cached_head(conn, &h).await?;
    }
    Ok(())
}

/// The head, locked for the rest of the transaction (no event can be appended meanwhile).
pub async fn lock_head(c: &mut Conn<'_>) -> Result<Option<ChainHead>> {
    flush_cached_head(c).await?;
    Ok(dispatch!(c, |c| sqlx::query_as(LOCK_HEAD).fetch_optional(c).await)?)
}

pub async fn read_head(c: &mut Conn<'_>) -> Result<Option<ChainHead>> {
    flush_cached_head(c).await?;
    Ok(dispatch!(c, |c| sqlx::query_as(READ_HEAD).fetch_optional(c).await)?)
}

macro_rules! bind_head {
    ($q:expr, $h:expr) => {
        $q.bind($h.last_seq)
            .bind(&$h.last_hmac)
            .bind($h.anchor_seq)
            .bind(&$h.anchor_hmac)
            .bind($h.head_key_id.as_deref())
            .bind($h.head_mac.as_deref())
    };
}

/// Writes the whole head row (its MAC computed by the caller).
pub async fn write_head(c: &mut Conn<'_>, head: &ChainHead) -> Result<()> {
    if let Conn::Sqlite(_, Some(cache)) = c {
        **cache = None;
    }
    let n = dispatch!(c, |c| bind_head!(sqlx::query(WRITE_HEAD), head).execute(c).await.map(|r| r.rows_affected()))?;
    if n == 1 { Ok(()) } else { Err(head_missing()) }
}

/// Writes a SQLite group's cached head (the committer, just before `COMMIT`).
pub(super) async fn write_cached_head(conn: &mut sqlx::SqliteConnection, head: &ChainHead) -> sqlx::Result<()> {
    bind_head!(sqlx::query(WRITE_HEAD), head).execute(conn).await.map(|_| ())
}

/// Deletes every event up to and including `seq` (the retention purge; the caller moves the
/// head's anchor in the same transaction). Returns how many rows went.
pub async fn delete_through(c: &mut Conn<'_>, seq: i64) -> Result<u64> {
    Ok(dispatch!(c, |c| sqlx::query(DELETE_THROUGH).bind(seq).execute(c).await.map(|r| r.rows_affected()))?)
}

/// Rows per multi-row INSERT: a batch is cut into chunks of these sizes, so only three
/// statements are ever prepared (each at most 64 × 12 = 768 parameters).
const INSERT_CHUNKS: [usize; 3] = [64, 8, 1];

/// `INSERT ... VALUES (...), (...)` for `rows` events, built once per chunk size.
fn insert_rows_sql(rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        INSERT_CHUNKS
            .iter()
            .map(|&n| {
                let values: Vec<String> = (0..n)
                    .map(|r| {
                        let p: Vec<String> = (1..=12).map(|i| format!("${}", r * 12 + i)).collect();
                        format!("({})", p.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO audit_events ({}, chain_key_id, hmac) VALUES {}",
                    event_columns!(),
                    values.join(", ")
                )
            })
            .collect()
    });
    let i = INSERT_CHUNKS.iter().position(|&n| n == rows).unwrap_or(INSERT_CHUNKS.len() - 1);
    all.get(i).map_or(INSERT, String::as_str)
}

/// Inserts many events with a few multi-row statements.
pub async fn insert_many(c: &mut Conn<'_>, events: &[NewAuditEvent<'_>]) -> Result<()> {
    let mut rest = events;
    while !rest.is_empty() {
        let size = INSERT_CHUNKS.iter().copied().find(|&n| n <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        let sql = insert_rows_sql(size);
        dispatch!(c, |c| {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for e in chunk {
                q = q
                    .bind(e.seq)
                    .bind(e.id)
                    .bind(e.at)
                    .bind(e.type_)
                    .bind(e.outcome)
                    .bind(e.user_id)
                    .bind(e.actor)
                    .bind(e.request_id)
                    .bind(e.source_ip)
                    .bind(e.details)
                    .bind(e.chain_key_id)
                    .bind(e.hmac);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
        rest = tail;
    }
    Ok(())
}

/// Events in `seq` order after `after_seq` (tests and tools).
pub async fn list_after(c: &mut Conn<'_>, after_seq: i64, limit: i64) -> Result<Vec<AuditRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(LIST_AFTER).bind(after_seq).bind(limit).fetch_all(c).await)?)
}

/// Events with their chain columns, in `seq` order after `after_seq`.
pub async fn chain_page(c: &mut Conn<'_>, after_seq: i64, limit: i64) -> Result<Vec<ChainedRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(CHAIN_PAGE).bind(after_seq).bind(limit).fetch_all(c).await)?)
}

/// The smallest `seq` after `after_seq` (reads the key only, so it works on a malformed row).
pub async fn next_seq(c: &mut Conn<'_>, after_seq: i64) -> Result<Option<i64>> {
    Ok(dispatch!(c, |c| sqlx::query_scalar(NEXT_SEQ).bind(after_seq).fetch_one(c).await)?)
}

/// Replaces an event's seal (re-sealing after a key rotation).
pub async fn reseal(c: &mut Conn<'_>, seq: i64, chain_key_id: &str, hmac: &[u8]) -> Result<()> {
    dispatch!(c, |c| sqlx::query(RESEAL)
        .bind(seq)
        .bind(chain_key_id)
        .bind(hmac)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// The key ids the chain is sealed under.
pub async fn chain_key_ids(c: &mut Conn<'_>) -> Result<Vec<String>> {
    Ok(dispatch!(c, |c| sqlx::query_scalar(CHAIN_KEY_IDS).fetch_all(c).await)?)
}

/// What `GET /audit/events` asks for; `None` filters match everything.
#[derive(Debug, Default)]
pub struct EventFilter<'a> {
    pub after: i64,
    pub user_id: Option<&'a str>,
    pub type_: Option<&'a str>,
    pub outcome: Option<&'a str>,
    /// Inclusive.
    pub since: Option<DateTime<Utc>>,
    /// Exclusive.
    pub until: Option<DateTime<Utc>>,
    pub limit: i64,
}

pub async fn query(c: &mut Conn<'_>, f: &EventFilter<'_>) -> Result<Vec<AuditRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(QUERY)
        .bind(f.after)
        .bind(f.user_id)
        .bind(f.type_)
        .bind(f.outcome)
        .bind(f.since)
        .bind(f.until)
        .bind(f.limit)
        .fetch_all(c)
        .await)?)
}

enum SnapshotTx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

/// A read-only transaction that sees one consistent state of the log from its first read on
/// (SQLite WAL read transaction; PostgreSQL `REPEATABLE READ READ ONLY`), so a verification
/// running beside writers and a re-seal never sees half of either.
pub struct Snapshot(SnapshotTx);

impl Snapshot {
    pub async fn begin(db: &Db) -> Result<Self> {
        Ok(Self(match db {
            Db::Sqlite { pool, .. } => SnapshotTx::Sqlite(super::begin_sqlite(pool, "BEGIN").await?),
            Db::Postgres { pool } => SnapshotTx::Postgres(
                super::begin_postgres(pool, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", None).await?,
            ),
        }))
    }

    pub fn conn(&mut self) -> Conn<'_> {
        match &mut self.0 {
            SnapshotTx::Sqlite(t) => Conn::Sqlite(&mut *t, None),
            SnapshotTx::Postgres(t) => Conn::Postgres(&mut *t),
        }
    }

    pub async fn end(self) -> Result<()> {
        match self.0 {
            SnapshotTx::Sqlite(t) => t.rollback().await?,
            SnapshotTx::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}
