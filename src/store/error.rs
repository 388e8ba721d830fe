//! The store's error and result types: what can go wrong talking to either database, sorted
//! into the few kinds callers answer differently (unavailable, disk full, anything else). A leaf:
//! every file of `store` may use it, and it uses none of them (`store` re-exports both).

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is too busy right now (answer 503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The disk under the database is full (answer 507).
    #[error("database disk is full")]
    Full,
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) | E::WorkerCrashed => {
                Self::Unavailable(e.to_string())
            }
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                // SQLite: primary result code is the low byte of the extended code.
                if let Ok(n) = code.parse::<i64>() {
                    match n & 0xff {
                        5 | 6 => return Self::Unavailable(e.to_string()), // BUSY, LOCKED
                        13 => return Self::Full,                          // FULL
                        _ => {}
                    }
                }
                // PostgreSQL SQLSTATEs.
                if code == "53100" {
                    Self::Full
                } else if code.starts_with("08") || code.starts_with("57P") || code == "53300" {
                    Self::Unavailable(e.to_string())
                } else {
                    Self::Other(e.to_string())
                }
            }
            _ => Self::Other(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Other(format!("migration failed: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
