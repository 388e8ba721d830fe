//! Domain types, parsed once at the edge so the inside never re-validates.

pub mod json;
pub mod mfa;
pub mod scopes;
pub mod tokens;
pub mod user_id;

pub use scopes::{Scope, Scopes};
pub use tokens::{BundleKind, TokenBundle};
pub use user_id::UserId;
