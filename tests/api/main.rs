//! The integration suite, compiled into one test binary. Runs on SQLite by default and on
//! PostgreSQL with `CENTRALDB_TEST_BACKEND=postgres` (see `./scripts/test`).

mod audit;
mod audit_chain;
mod auth;
mod binary;
mod helpers;
mod idempotency;
mod leases;
mod limits;
mod locks;
mod mfa;
mod ops;
mod outage;
mod scopes;
mod sessions;
mod sweeper;
mod tokens;
