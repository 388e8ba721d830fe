//! The partition chain heads as rows (`PartHead`) and a SQLite group's cache of them
//! (`ChainCache`): the heads and the last seq its writers advanced, with the undo log that lets a
//! rolled-back savepoint take back exactly its own changes, and the statements that write the
//! cache to `audit_heads` and `audit_seq`. A leaf of `store`: the group committer (`group`) and
//! the audit log (`audit`, which re-exports `PartHead`) both use it, and it uses neither.

use std::collections::HashMap;

/// The head of one partition chain: the position, seq and HMAC of its last event (0, 0 and zeros
/// when empty), the retention anchor (the last purged event of the chain), and the head's MAC.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PartHead {
    pub chain_id: i64,
    pub last_pos: i64,
    pub last_seq: i64,
    pub last_hmac: Vec<u8>,
    pub anchor_pos: i64,
    pub anchor_seq: i64,
    pub anchor_hmac: Vec<u8>,
    pub head_key_id: Option<String>,
    pub head_mac: Option<Vec<u8>>,
}

impl PartHead {
    /// As migration 0008 created it: nothing ever written, nothing purged.
    pub fn is_pristine(&self) -> bool {
        self.last_pos == 0 && self.last_seq == 0 && self.anchor_pos == 0 && self.anchor_seq == 0
    }
}

enum Undo {
    Head(i64, Option<PartHead>),
    Seq(Option<i64>),
}

/// A SQLite group's cache of the partition heads it advanced and of the last seq handed out
/// (the group holds SQLite's write lock, so nobody else appends meanwhile); written to the rows
/// by the committer just before `COMMIT`. Every change is logged so that a writer whose
/// savepoint is rolled back undoes exactly its own changes.
#[derive(Default)]
pub struct ChainCache {
    pub(super) heads: HashMap<i64, PartHead>,
    pub(super) last_seq: Option<i64>,
    undo: Vec<Undo>,
}

impl ChainCache {
    /// A new savepoint starts: what it changes from here on can be undone.
    pub(super) fn savepoint(&mut self) {
        self.undo.clear();
    }

    /// The savepoint was rolled back: undo its changes.
    pub(super) fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Head(id, Some(h)) => {
                    self.heads.insert(id, h);
                }
                Undo::Head(id, None) => {
                    self.heads.remove(&id);
                }
                Undo::Seq(s) => self.last_seq = s,
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.heads.clear();
        self.last_seq = None;
        self.undo.clear();
    }

    pub(super) fn set_head(&mut self, h: PartHead) {
        let id = h.chain_id;
        let old = self.heads.insert(id, h);
        self.undo.push(Undo::Head(id, old));
    }

    pub(super) fn set_seq(&mut self, s: i64) {
        let old = self.last_seq.replace(s);
        self.undo.push(Undo::Seq(old));
    }

    /// Empties the cache (logging it), returning what was in it.
    pub(super) fn take_all(&mut self) -> (Vec<PartHead>, Option<i64>) {
        let heads: Vec<PartHead> = self.heads.drain().map(|(_, h)| h).collect();
        for h in &heads {
            self.undo.push(Undo::Head(h.chain_id, Some(h.clone())));
        }
        let seq = self.last_seq.take();
        if seq.is_some() {
            self.undo.push(Undo::Seq(seq));
        }
        (heads, seq)
    }
}

/// Writes one partition head row (bound with [`bind_part_head`]).
pub(super) const WRITE_PART_HEAD: &str = "UPDATE audit_heads SET last_pos = $2, last_seq = $3, last_hmac = $4, anchor_pos = $5, \
     anchor_seq = $6, anchor_hmac = $7, head_key_id = $8, head_mac = $9 WHERE chain_id = $1";
const WRITE_SEQ_SQLITE: &str = "UPDATE audit_seq SET last_seq = $1 WHERE id = 1";

macro_rules! bind_part_head {
    ($q:expr, $h:expr) => {
        $q.bind($h.chain_id)
            .bind($h.last_pos)
            .bind($h.last_seq)
            .bind(&$h.last_hmac)
            .bind($h.anchor_pos)
            .bind($h.anchor_seq)
            .bind(&$h.anchor_hmac)
            .bind($h.head_key_id.as_deref())
            .bind($h.head_mac.as_deref())
    };
}
pub(super) use bind_part_head;

/// Writes cached heads and a cached seq to their rows.
pub(super) async fn write_cache_rows(
    conn: &mut sqlx::SqliteConnection,
    heads: &[PartHead],
    seq: Option<i64>,
) -> sqlx::Result<()> {
    for h in heads {
        bind_part_head!(sqlx::query(WRITE_PART_HEAD), h).execute(&mut *conn).await?;
    }
    if let Some(s) = seq {
        sqlx::query(WRITE_SEQ_SQLITE).bind(s).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Writes a SQLite group's cache to the rows (the committer, just before `COMMIT`).
pub(super) async fn write_cache(conn: &mut sqlx::SqliteConnection, cache: &mut ChainCache) -> sqlx::Result<()> {
    let (heads, seq) = cache.take_all();
    cache.undo.clear();
    write_cache_rows(conn, &heads, seq).await
}
