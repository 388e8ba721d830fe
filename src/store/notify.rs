//! New token versions announced across processes: the PostgreSQL channel, its announcement and
//! its listener, in one place.
//!
//! A write announces `(user, version)` with `NOTIFY`, sent inside its transaction so PostgreSQL
//! delivers it at commit (and drops it on rollback). The writing process wakes its own waiters
//! itself after the commit, so the payload names the process it came from and its own listener
//! skips it: each process hears of each committed write once. SQLite has no such channel;
//! waiters there re-read the database now and then ([`recheck_interval`]).

use std::{sync::OnceLock, time::Duration};

use sqlx::postgres::PgListener;

use super::{Conn, Db, Result};

/// The PostgreSQL channel new versions are announced on (`<version> <user_id> <origin>`).
pub const CHANNEL: &str = "centraldb_token_versions";

/// This process, as named in its announcements.
fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Tells other processes (PostgreSQL `NOTIFY`, delivered at commit) that `user_id` has a new
/// version. SQLite has no such channel; its waiters poll.
pub async fn announce(c: &mut Conn<'_>, user_id: &str, version: i64) -> Result<()> {
    if let Conn::Postgres(pg) = c {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(format!("{version} {user_id} {}", origin()))
            .execute(&mut **pg)
            .await?;
    }
    Ok(())
}

/// How often a waiter re-reads the stored version in case an announcement from another process
/// was missed: SQLite has none (0.5 s), a PostgreSQL listener may be reconnecting (5 s).
pub fn recheck_interval(db: &Db) -> Duration {
    match db {
        Db::Sqlite { .. } => Duration::from_millis(500),
        Db::Postgres { .. } => Duration::from_secs(5),
    }
}

/// Versions other processes announce (PostgreSQL `LISTEN`).
pub struct Listener(PgListener);

impl Listener {
    /// Listens on [`CHANNEL`] with a connection of its own; `None` on SQLite (no channel).
    pub async fn connect(db: &Db) -> Result<Option<Self>> {
        let Db::Postgres { pool } = db else { return Ok(None) };
        let mut l = PgListener::connect_with(pool).await?;
        l.listen(CHANNEL).await?;
        Ok(Some(Self(l)))
    }

    /// The next `(user_id, version)` announced by another process. An error means the
    /// connection was lost: connect again.
    pub async fn recv(&mut self) -> Result<(String, i64)> {
        loop {
            let n = self.0.recv().await?;
            if let Some((user, version)) = parse(n.payload()) {
                return Ok((user.to_string(), version));
            }
        }
    }
}

/// `(user_id, version)` from a payload, `None` for this process's own announcements (and for
/// payloads that are not announcements). A payload without an origin is another process's.
fn parse(payload: &str) -> Option<(&str, i64)> {
    let (version, rest) = payload.split_once(' ')?;
    let version = version.parse::<i64>().ok()?;
    match rest.split_once(' ') {
        Some((_, from)) if from == origin() => None,
        Some((user, _)) => Some((user, version)),
        None => Some((rest, version)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_announcements_are_skipped_and_others_kept() {
        assert_eq!(parse(&format!("7 alice {}", origin())), None);
        assert_eq!(parse("7 alice 0123456789abcdef0123456789abcdef"), Some(("alice", 7)));
        assert_eq!(parse("8 bob"), Some(("bob", 8)));
        assert_eq!(parse("x bob"), None);
    }
}
