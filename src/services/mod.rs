//! The rules of the service: no HTTP, no SQL text.

pub mod api_keys;
pub mod audit;
pub mod code_hasher;
pub mod error;
pub mod group_commit;
pub mod idempotency;
pub mod keys;
pub mod leases;
pub mod mfa;
pub mod refusals;
pub mod retention;
pub mod sessions;
pub mod token_status;
pub mod tokens;
