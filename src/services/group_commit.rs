//! Group commit for reads: the audit row (and `last_used_at`) of many concurrent reads are
//! written in one transaction, and each read is answered only after that transaction commits.
//!
//! A read changes nothing but the audit trail, so it does not need a write transaction of its
//! own: it reads on a pooled connection, hands its audit record to the one writer task here,
//! and waits. The writer takes every record that arrived while the previous batch was
//! committing (up to `MAX_BATCH`), so under load one fsync serves many requests. If the batch
//! cannot be written, every read in it fails (503) and nothing is handed out unaudited.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    crypto::Keyring,
    services::audit::{self, AuditContext, Outcome, PendingEvent},
    store::{self, Db, StoreError},
};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 8192;

/// One read's audit record.
pub struct ReadRecord {
    pub ctx: AuditContext,
    pub type_: &'static str,
    pub outcome: Outcome,
    pub user_id: String,
    pub details: Value,
    /// Sets the bundle's `last_used_at` (a successful decrypting read).
    pub touch: Option<DateTime<Utc>>,
}

struct Job {
    record: ReadRecord,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct ReadAudit {
    tx: mpsc::Sender<Job>,
}

impl ReadAudit {
    /// Starts the writer task (it ends when every handle is dropped).
    pub fn start(db: Db, keyring: Arc<Keyring>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(db, keyring, rx));
        Self { tx }
    }

    /// Writes the record (with others) and returns once it is committed.
    pub async fn record(&self, record: ReadRecord) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .try_send(Job { record, done })
            .map_err(|_| StoreError::Unavailable("the audit writer queue is full".into()))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e)),
            Err(_) => Err(StoreError::Other("the audit writer stopped".into())),
        }
    }
}

async fn writer(db: Db, keyring: Arc<Keyring>, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let result = write_batch(&db, &keyring, &batch).await.map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::warn!(error = %e, records = batch.len(), "could not write a batch of read audit records");
        }
        for job in batch.drain(..) {
            let _ = job.done.send(result.clone());
        }
    }
}

async fn write_batch(db: &Db, keyring: &Keyring, batch: &[Job]) -> Result<(), StoreError> {
    // One `last_used_at` per user: the latest read of theirs in this batch.
    let mut touches: Vec<(&str, DateTime<Utc>)> = Vec::new();
    for r in batch.iter().map(|j| &j.record) {
        let Some(at) = r.touch else { continue };
        match touches.iter_mut().find(|(u, _)| *u == r.user_id) {
            Some((_, t)) => *t = (*t).max(at),
            None => touches.push((&r.user_id, at)),
        }
    }
    let events: Vec<PendingEvent<'_>> = batch
        .iter()
        .map(|j| PendingEvent {
            ctx: &j.record.ctx,
            type_: j.record.type_,
            outcome: j.record.outcome,
            user_id: Some(&j.record.user_id),
            details: j.record.details.to_string(),
        })
        .collect();
    let mut tx = db.begin_write().await?;
    let mut c = tx.conn();
    store::tokens::touch_many(&mut c, &touches).await?;
    audit::record_many(&mut c, keyring, &events).await?;
    tx.commit().await
}
