//! `audit_events`, `audit_heads` (one head per partition chain), `audit_seq` and the legacy
//! `audit_chain`: an append-only log, each row written inside the transaction of the act it
//! records, chained by HMAC (the rules live in `services::audit`).

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Sqlite};
use uuid::Uuid;

pub use super::chain_cache::PartHead;
use super::{
    Conn, Db,
    chain_cache::{WRITE_PART_HEAD, bind_part_head, write_cache_rows},
    error::{Result, StoreError},
};

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
    /// The partition chain and the position in it (`None`: an event of the legacy chain).
    pub chain_id: Option<i64>,
    pub pos: Option<i64>,
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
    pub chain_id: Option<i64>,
    pub pos: Option<i64>,
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

/// The id of the legacy chain's head row (`audit_chain`), MACed into its head.
pub const CHAIN_ID: i64 = 1;

/// The number of partition chains (fixed by migration 0008 and recorded in `audit_partitions`;
/// start-up refuses a database that records another number).
pub const PARTITIONS: i64 = 256;

macro_rules! part_head_columns {
    () => {
        "chain_id, last_pos, last_seq, last_hmac, anchor_pos, anchor_seq, anchor_hmac, head_key_id, head_mac"
    };
}
const LOCK_PART_HEADS_PG: &str =
    concat!("SELECT ", part_head_columns!(), " FROM audit_heads WHERE chain_id = ANY($1) ORDER BY chain_id FOR UPDATE");
const READ_PART_HEADS_SQLITE: &str = concat!(
    "SELECT ",
    part_head_columns!(),
    " FROM audit_heads WHERE chain_id IN (SELECT value FROM json_each($1)) ORDER BY chain_id"
);
const LOCK_ALL_PART_HEADS_PG: &str =
    concat!("SELECT ", part_head_columns!(), " FROM audit_heads ORDER BY chain_id FOR UPDATE");
const READ_ALL_PART_HEADS: &str = concat!("SELECT ", part_head_columns!(), " FROM audit_heads ORDER BY chain_id");
const NEXT_SEQS_PG: &str = "SELECT nextval('audit_seq') AS s FROM generate_series(1, $1) ORDER BY s";
const ADVANCE_SEQ_SQLITE: &str = "UPDATE audit_seq SET last_seq = last_seq + $1 WHERE id = 1 RETURNING last_seq";
const READ_SEQ_SQLITE: &str = "SELECT last_seq FROM audit_seq WHERE id = 1";
const PARTITIONS_RECORDED: &str = "SELECT partitions FROM audit_partitions WHERE id = 1";
const PART_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    ", chain_id, pos, chain_key_id, hmac FROM audit_events WHERE chain_id IS NOT NULL ",
    "AND (chain_id > $1 OR (chain_id = $1 AND pos > $2)) ORDER BY chain_id, pos LIMIT $3"
);
const PART_KEY_AFTER: &str = "SELECT chain_id, pos, seq FROM audit_events WHERE chain_id IS NOT NULL \
     AND (chain_id > $1 OR (chain_id = $1 AND pos > $2)) ORDER BY chain_id, pos LIMIT 1";
const CHAIN_EVENTS: &str = concat!(
    "SELECT ",
    event_columns!(),
    ", chain_id, pos, chain_key_id, hmac FROM audit_events WHERE chain_id = $1 AND pos > $2 ORDER BY pos LIMIT $3"
);
const EVENT_AT: &str = "SELECT seq, hmac FROM audit_events WHERE chain_id = $1 AND pos = $2";
const LEGACY_EVENT_AT: &str = "SELECT seq, hmac FROM audit_events WHERE chain_id IS NULL AND seq = $1";
const DELETE_CHAIN_THROUGH: &str = "DELETE FROM audit_events WHERE chain_id = $1 AND pos <= $2";
/// The first seq after `$1` that no event has (a gap: a removed event, a rolled-back write, a purge).
const HOLE_AFTER: &str = "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM audit_events WHERE seq = $1 + 1) THEN $1 + 1 ELSE \
     (SELECT MIN(a.seq) + 1 FROM audit_events a WHERE a.seq > $1 \
      AND NOT EXISTS (SELECT 1 FROM audit_events b WHERE b.seq = a.seq + 1)) END";
const COUNT_BELOW: &str = "SELECT COUNT(*) FROM audit_events WHERE seq < $1";
const COUNT_ALL: &str = "SELECT COUNT(*) FROM audit_events";
const MIN_SEQ_NOT_UNDER: &str = "SELECT MIN(seq) FROM audit_events WHERE chain_key_id <> $1";

macro_rules! head_columns {
    () => {
        "last_seq, last_hmac, anchor_seq, anchor_hmac, head_key_id, head_mac"
    };
}
const LOCK_HEAD: &str = concat!("UPDATE audit_chain SET last_seq = last_seq WHERE id = 1 RETURNING ", head_columns!());
const READ_HEAD: &str = concat!("SELECT ", head_columns!(), " FROM audit_chain WHERE id = 1");
/// Writes the whole head (also the SQLite group commit's cached head, before `COMMIT`).
const WRITE_HEAD: &str = "UPDATE audit_chain SET last_seq = $1, last_hmac = $2, anchor_seq = $3, anchor_hmac = $4, \
     head_key_id = $5, head_mac = $6 WHERE id = 1";
const DELETE_THROUGH: &str = "DELETE FROM audit_events WHERE chain_id IS NULL AND seq <= $1";
const INSERT: &str = concat!(
    "INSERT INTO audit_events (",
    event_columns!(),
    ", chain_id, pos, chain_key_id, hmac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
);
const LIST_AFTER: &str =
    concat!("SELECT ", event_columns!(), " FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
const CHAIN_PAGE: &str = concat!(
    "SELECT ",
    event_columns!(),
    ", chain_id, pos, chain_key_id, hmac FROM audit_events WHERE chain_id IS NULL AND seq > $1 ORDER BY seq LIMIT $2"
);
const NEXT_SEQ: &str = "SELECT MIN(seq) FROM audit_events WHERE chain_id IS NULL AND seq > $1";
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
     UNION SELECT head_key_id FROM audit_chain WHERE head_key_id IS NOT NULL \
     UNION SELECT DISTINCT head_key_id FROM audit_heads WHERE head_key_id IS NOT NULL";

fn head_missing() -> StoreError {
    StoreError::Other("the audit chain head (audit_chain row 1) is missing".into())
}

/// Writes a SQLite group's cached heads and seq to their rows and forgets them, so that code
/// reading or writing the rows directly sees the true state (logged: a rollback restores them).
async fn flush_cache(c: &mut Conn<'_>) -> Result<()> {
    if let Conn::Sqlite(conn, Some(cache)) = c {
        let (heads, seq) = cache.take_all();
        write_cache_rows(conn, &heads, seq).await?;
    }
    Ok(())
}

fn part_head_missing(ids: &[i64]) -> StoreError {
    StoreError::Other(format!("an audit chain head (audit_heads) is missing among chains {ids:?}"))
}

/// The heads of chains `ids` (sorted, distinct), locked for the rest of the write transaction
/// (PostgreSQL: `FOR UPDATE`, in chain order; a SQLite group: from its cache, reading rows it
/// has not cached yet). Fails if one is missing.
pub async fn lock_part_heads(c: &mut Conn<'_>, ids: &[i64]) -> Result<Vec<PartHead>> {
    let heads: Vec<PartHead> = match c {
        Conn::Sqlite(conn, Some(cache)) => {
            let missing: Vec<i64> = ids.iter().copied().filter(|id| !cache.heads.contains_key(id)).collect();
            if !missing.is_empty() {
                let json = serde_json::to_string(&missing).map_err(|e| StoreError::Other(e.to_string()))?;
                let read: Vec<PartHead> =
                    sqlx::query_as(READ_PART_HEADS_SQLITE).bind(json).fetch_all(&mut **conn).await?;
                for h in read {
                    cache.set_head(h);
                }
            }
            ids.iter().filter_map(|id| cache.heads.get(id).cloned()).collect()
        }
        Conn::Sqlite(conn, None) => {
            let json = serde_json::to_string(ids).map_err(|e| StoreError::Other(e.to_string()))?;
            sqlx::query_as(READ_PART_HEADS_SQLITE).bind(json).fetch_all(&mut **conn).await?
        }
        Conn::Postgres(pg) => sqlx::query_as(LOCK_PART_HEADS_PG).bind(ids).fetch_all(&mut **pg).await?,
        Conn::Closed => return Err(sqlx::Error::PoolClosed.into()),
    };
    if heads.len() == ids.len() { Ok(heads) } else { Err(part_head_missing(ids)) }
}

/// Every partition head, in chain order; locked in a write transaction on PostgreSQL (`lock`),
/// which stops every writer until commit (rewrap, retention purge, start-up sealing only).
pub async fn all_part_heads(c: &mut Conn<'_>, lock: bool) -> Result<Vec<PartHead>> {
    flush_cache(c).await?;
    let sql = if lock { LOCK_ALL_PART_HEADS_PG } else { READ_ALL_PART_HEADS };
    Ok(match c {
        Conn::Postgres(pg) => sqlx::query_as(sql).fetch_all(&mut **pg).await?,
        other => dispatch!(other, |c| sqlx::query_as(READ_ALL_PART_HEADS).fetch_all(c).await)?,
    })
}

/// Writes partition heads (their MACs computed by the caller): into a SQLite group's cache, or
/// to the rows.
pub async fn write_part_heads(c: &mut Conn<'_>, heads: Vec<PartHead>) -> Result<()> {
    if let Conn::Sqlite(_, Some(cache)) = c {
        for h in heads {
            cache.set_head(h);
        }
        return Ok(());
    }
    for h in &heads {
        let n = dispatch!(c, |c| bind_part_head!(sqlx::query(WRITE_PART_HEAD), h)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        if n != 1 {
            return Err(part_head_missing(&[h.chain_id]));
        }
    }
    Ok(())
}

/// PostgreSQL in one round trip: the heads of chains `ids` locked (`FOR UPDATE`, in chain
/// order), then `n` new seqs drawn. The seqs are drawn only once every head is locked (the
/// `WHERE` of `s` reads all of `h` first), so within a chain seq still grows with the position.
const LOCK_PART_HEADS_THEN_SEQS_PG: &str = concat!(
    "WITH h AS MATERIALIZED (SELECT ",
    part_head_columns!(),
    " FROM audit_heads WHERE chain_id = ANY($1) ORDER BY chain_id FOR UPDATE), ",
    "s AS MATERIALIZED (SELECT nextval('audit_seq') AS seq FROM generate_series(1, $2) ",
    "WHERE (SELECT count(*) FROM h) = cardinality($1::bigint[])) ",
    "SELECT h.*, ARRAY(SELECT seq FROM s ORDER BY seq) AS seqs FROM h ORDER BY chain_id"
);

/// The heads of chains `ids` (sorted, distinct), locked as [`lock_part_heads`] does, and then
/// `n` new global seqs as [`next_seqs`] draws them: on PostgreSQL in one statement, elsewhere
/// in the two. Fails if a head is missing (no seq is drawn then on PostgreSQL).
pub async fn lock_part_heads_then_seqs(c: &mut Conn<'_>, ids: &[i64], n: i64) -> Result<(Vec<PartHead>, Vec<i64>)> {
    let Conn::Postgres(pg) = c else {
        let heads = lock_part_heads(c, ids).await?;
        return Ok((heads, next_seqs(c, n).await?));
    };
    use sqlx::{FromRow, Row};
    let rows = sqlx::query(LOCK_PART_HEADS_THEN_SEQS_PG).bind(ids).bind(n).fetch_all(&mut **pg).await?;
    let mut heads = Vec::with_capacity(rows.len());
    let mut seqs: Vec<i64> = Vec::new();
    for row in &rows {
        heads.push(PartHead::from_row(row)?);
        seqs = row.try_get("seqs")?;
    }
    if heads.len() != ids.len() {
        return Err(part_head_missing(ids));
    }
    Ok((heads, seqs))
}

/// `n` new global seqs, ascending (PostgreSQL: `nextval`, not held to commit, so concurrent
/// writers may interleave and a rollback leaves a gap; SQLite: `audit_seq`, cached per group).
pub async fn next_seqs(c: &mut Conn<'_>, n: i64) -> Result<Vec<i64>> {
    match c {
        Conn::Postgres(pg) => Ok(sqlx::query_scalar(NEXT_SEQS_PG).bind(n).fetch_all(&mut **pg).await?),
        Conn::Sqlite(conn, Some(cache)) => {
            let last = match cache.last_seq {
                Some(s) => s,
                None => sqlx::query_scalar(READ_SEQ_SQLITE)
                    .fetch_optional(&mut **conn)
                    .await?
                    .ok_or_else(|| StoreError::Other("the audit seq counter (audit_seq) is missing".into()))?,
            };
            cache.set_seq(last + n);
            Ok((last + 1..=last + n).collect())
        }
        Conn::Sqlite(conn, None) => {
            let last: i64 = sqlx::query_scalar(ADVANCE_SEQ_SQLITE)
                .bind(n)
                .fetch_optional(&mut **conn)
                .await?
                .ok_or_else(|| StoreError::Other("the audit seq counter (audit_seq) is missing".into()))?;
            Ok((last - n + 1..=last).collect())
        }
        Conn::Closed => Err(sqlx::Error::PoolClosed.into()),
    }
}

/// The number of partition chains the database was migrated with.
pub async fn recorded_partitions(c: &mut Conn<'_>) -> Result<Option<i64>> {
    Ok(dispatch!(c, |c| sqlx::query_scalar(PARTITIONS_RECORDED).fetch_optional(c).await)?)
}

/// Partition events in (chain_id, pos) order after (`chain`, `pos`).
pub async fn part_page(c: &mut Conn<'_>, chain: i64, pos: i64, limit: i64) -> Result<Vec<ChainedRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(PART_PAGE).bind(chain).bind(pos).bind(limit).fetch_all(c).await)?)
}

/// The key of the next partition event after (`chain`, `pos`) (works on a malformed row).
pub async fn part_key_after(c: &mut Conn<'_>, chain: i64, pos: i64) -> Result<Option<(i64, i64, i64)>> {
    Ok(dispatch!(c, |c| sqlx::query_as(PART_KEY_AFTER).bind(chain).bind(pos).fetch_optional(c).await)?)
}

/// Events of one chain after position `pos`, in order.
pub async fn chain_events(c: &mut Conn<'_>, chain: i64, pos: i64, limit: i64) -> Result<Vec<ChainedRow>> {
    Ok(dispatch!(c, |c| sqlx::query_as(CHAIN_EVENTS).bind(chain).bind(pos).bind(limit).fetch_all(c).await)?)
}

/// The seq and HMAC of the event at (`chain`, `pos`); `chain` < 0: the legacy event at seq `pos`.
pub async fn event_at(c: &mut Conn<'_>, chain: i64, pos: i64) -> Result<Option<(i64, Vec<u8>)>> {
    Ok(if chain < 0 {
        dispatch!(c, |c| sqlx::query_as(LEGACY_EVENT_AT).bind(pos).fetch_optional(c).await)?
    } else {
        dispatch!(c, |c| sqlx::query_as(EVENT_AT).bind(chain).bind(pos).fetch_optional(c).await)?
    })
}

/// Deletes a chain's events through position `pos` (retention). Returns how many went.
pub async fn delete_chain_through(c: &mut Conn<'_>, chain: i64, pos: i64) -> Result<u64> {
    Ok(dispatch!(c, |c| sqlx::query(DELETE_CHAIN_THROUGH)
        .bind(chain)
        .bind(pos)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?)
}

/// The oldest `limit` events by seq: their seq, time and chain (the retention purge's look-ahead).
pub async fn oldest(c: &mut Conn<'_>, limit: i64) -> Result<Vec<(i64, DateTime<Utc>, Option<i64>)>> {
    const SQL: &str = "SELECT seq, at, chain_id FROM audit_events ORDER BY seq LIMIT $1";
    Ok(dispatch!(c, |c| sqlx::query_as(SQL).bind(limit).fetch_all(c).await)?)
}

/// The first seq after `seq` that no event has.
pub async fn hole_after(c: &mut Conn<'_>, seq: i64) -> Result<i64> {
    let v: Option<i64> = dispatch!(c, |c| sqlx::query_scalar(HOLE_AFTER).bind(seq).fetch_one(c).await)?;
    Ok(v.unwrap_or(seq + 1))
}

/// How many events have a seq below `seq` (`None`: all of them).
pub async fn count_below(c: &mut Conn<'_>, seq: Option<i64>) -> Result<i64> {
    Ok(match seq {
        Some(s) => dispatch!(c, |c| sqlx::query_scalar(COUNT_BELOW).bind(s).fetch_one(c).await)?,
        None => dispatch!(c, |c| sqlx::query_scalar(COUNT_ALL).fetch_one(c).await)?,
    })
}

/// The smallest seq of an event sealed under another key than `key_id`.
pub async fn min_seq_not_under(c: &mut Conn<'_>, key_id: &str) -> Result<Option<i64>> {
    Ok(dispatch!(c, |c| sqlx::query_scalar(MIN_SEQ_NOT_UNDER).bind(key_id).fetch_one(c).await)?)
}

/// The head, locked for the rest of the transaction (no event can be appended meanwhile).
pub async fn lock_head(c: &mut Conn<'_>) -> Result<Option<ChainHead>> {
    Ok(dispatch!(c, |c| sqlx::query_as(LOCK_HEAD).fetch_optional(c).await)?)
}

pub async fn read_head(c: &mut Conn<'_>) -> Result<Option<ChainHead>> {
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
    let n = dispatch!(c, |c| bind_head!(sqlx::query(WRITE_HEAD), head).execute(c).await.map(|r| r.rows_affected()))?;
    if n == 1 { Ok(()) } else { Err(head_missing()) }
}

/// Deletes every legacy event up to and including `seq` (the retention purge; the caller moves the
/// head's anchor in the same transaction). Returns how many rows went.
pub async fn delete_through(c: &mut Conn<'_>, seq: i64) -> Result<u64> {
    Ok(dispatch!(c, |c| sqlx::query(DELETE_THROUGH).bind(seq).execute(c).await.map(|r| r.rows_affected()))?)
}

/// Binds a sealed event's 14 columns, in `INSERT`'s order (`event_columns!()`, chain id,
/// position, chain key id, HMAC).
macro_rules! bind_event {
    ($q:expr, $e:expr) => {
        $q.bind($e.seq)
            .bind($e.id)
            .bind($e.at)
            .bind($e.type_)
            .bind($e.outcome)
            .bind($e.user_id)
            .bind($e.actor)
            .bind($e.request_id)
            .bind($e.source_ip)
            .bind($e.details)
            .bind($e.chain_id)
            .bind($e.pos)
            .bind($e.chain_key_id)
            .bind($e.hmac)
    };
}

/// Rows per multi-row INSERT: a batch is cut into chunks of these sizes, so only three
/// statements are ever prepared (each at most 64 × 14 = 896 parameters).
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
                        let p: Vec<String> = (1..=14).map(|i| format!("${}", r * 14 + i)).collect();
                        format!("({})", p.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO audit_events ({}, chain_id, pos, chain_key_id, hmac) VALUES {}",
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
                q = bind_event!(q, e);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
        rest = tail;
    }
    Ok(())
}

/// PostgreSQL: one event inserted and its chain's head written, in one statement (a
/// data-modifying `WITH` runs to completion whatever the outer statement reads).
static INSERT_ONE_WRITE_HEAD_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ins AS (INSERT INTO audit_events ({}, chain_id, pos, chain_key_id, hmac) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)) \
         UPDATE audit_heads SET last_pos = $16, last_seq = $17, last_hmac = $18, anchor_pos = $19, \
         anchor_seq = $20, anchor_hmac = $21, head_key_id = $22, head_mac = $23 WHERE chain_id = $15",
        event_columns!()
    )
});

/// Inserts sealed events and writes their chains' heads ([`insert_many`] then
/// [`write_part_heads`]); on PostgreSQL one event of one chain (the common act) is one
/// statement instead of two.
pub async fn append(c: &mut Conn<'_>, events: &[NewAuditEvent<'_>], heads: Vec<PartHead>) -> Result<()> {
    if let (Conn::Postgres(pg), [e], [h]) = (&mut *c, events, heads.as_slice()) {
        let q = bind_event!(sqlx::query(sqlx::AssertSqlSafe(INSERT_ONE_WRITE_HEAD_PG.as_str())), e);
        let n = bind_part_head!(q, h).execute(&mut **pg).await?.rows_affected();
        return if n == 1 { Ok(()) } else { Err(part_head_missing(&[h.chain_id])) };
    }
    insert_many(c, events).await?;
    write_part_heads(c, heads).await
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
