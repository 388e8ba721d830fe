//! A stored bundle's status (valid, access expired, re-authentication required) at a given
//! time: a leaf both the vault and the lease and long-poll code read, so that neither imports
//! the other for it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::tokens::BundleRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable as is.
    Valid,
    /// The access token is past its expiry: refresh it and write the result back.
    AccessExpired,
    /// Invalidated, destroyed or past the refresh token's expiry: the user must log in again.
    ReauthRequired,
}

pub fn status_of(row: &BundleRow, now: DateTime<Utc>) -> (TokenStatus, Option<String>) {
    if !row.has_secret {
        let reason = row.reauth_reason.clone().unwrap_or_else(|| "destroyed".into());
        return (TokenStatus::ReauthRequired, Some(reason));
    }
    if row.refresh_expires_at.is_some_and(|t| t <= now) {
        return (TokenStatus::ReauthRequired, Some("refresh_expired".into()));
    }
    if row.access_expires_at.is_some_and(|t| t <= now) {
        return (TokenStatus::AccessExpired, None);
    }
    (TokenStatus::Valid, None)
}
