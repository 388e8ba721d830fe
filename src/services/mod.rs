//! The rules of the service: no HTTP, no SQL text.

pub mod api_keys;
pub mod audit;
pub mod keys;
pub mod tokens;
