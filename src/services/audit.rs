//! The audit writer: one event per security-relevant act, in the act's own transaction.
//!
//! Details are built by the callers from non-secret facts only (ids, kinds, versions, reasons);
//! nothing here ever receives a token, code, key or resume state.

use serde_json::Value;
use uuid::Uuid;

use crate::store::{self, Conn, audit::NewAuditEvent};

/// Who did it and from where: filled in by the HTTP layer (or the CLI).
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    /// The API key id (`key:<uuid>`), or `cli`, `system`.
    pub actor: Option<String>,
    pub request_id: Option<String>,
    pub source_ip: Option<String>,
}

impl AuditContext {
    pub fn system(actor: &str) -> Self {
        Self { actor: Some(actor.to_string()), ..Self::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// Writes one audit event through `c` (normally inside the act's transaction).
pub async fn record(
    c: &mut Conn<'_>,
    ctx: &AuditContext,
    type_: &str,
    outcome: Outcome,
    user_id: Option<&str>,
    details: Value,
) -> store::Result<i64> {
    let details = details.to_string();
    store::audit::insert(
        c,
        &NewAuditEvent {
            id: Uuid::now_v7(),
            at: store::now(),
            type_,
            outcome: outcome.as_str(),
            user_id,
            actor: ctx.actor.as_deref(),
            request_id: ctx.request_id.as_deref(),
            source_ip: ctx.source_ip.as_deref(),
            details: &details,
        },
    )
    .await
}
