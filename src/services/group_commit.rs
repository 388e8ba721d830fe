//! Group commit for reads: many concurrent token reads are served by one transaction, and each
//! read is answered only after that transaction, with its audit row, commits.
//!
//! A read hands a job (the user id and a `decide` function) to the one writer task here. The
//! writer takes every job that arrived while the previous batch was committing (up to
//! `MAX_BATCH`), opens a write transaction, fetches all their bundles with one statement, lets
//! each job's `decide` turn its row into the caller's answer and an audit record, and writes
//! every record (and `last_used_at`) with a few statements, then commits. So under load one
//! transaction and one fsync serve many requests, with O(1) statements per batch. If the batch
//! cannot be written, every read in it fails (503, or 507 when the disk is full) and nothing is
//! handed out unaudited.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::{
    crypto::Keyring,
    services::audit::{self, AuditContext, Outcome, PendingEvent},
    store::{self, Db, StoreError, tokens::BundleWithSecret},
};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 8192;

/// What a read's `decide` function concluded: its audit record.
pub struct Decision {
    pub type_: &'static str,
    pub outcome: Outcome,
    pub details: Value,
    /// Sets the bundle's `last_used_at` (a successful decrypting read).
    pub touch: Option<DateTime<Utc>>,
}

type Decide = Box<dyn FnOnce(Option<BundleWithSecret>) -> Decision + Send>;

struct Job {
    ctx: AuditContext,
    user_id: String,
    decide: Option<Decide>,
    done: oneshot::Sender<Result<(), StoreError>>,
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

    /// Reads `user_id`'s bundle in the next batch: `decide` gets the row (inside the
    /// transaction), keeps whatever answer it makes for the caller, and returns the audit
    /// record. Returns once that record is committed; the caller may hand out the answer only
    /// then.
    pub async fn read(
        &self,
        ctx: AuditContext,
        user_id: String,
        decide: impl FnOnce(Option<BundleWithSecret>) -> Decision + Send + 'static,
    ) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .try_send(Job { ctx, user_id, decide: Some(Box::new(decide)), done })
            .map_err(|_| StoreError::Unavailable("the audit writer queue is full".into()))?;
        match wait.await {
            Ok(result) => result,
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
        metrics::histogram!(crate::telemetry::GROUP_COMMIT_BATCH).record(batch.len() as f64);
        let result = write_batch(&db, &keyring, &mut batch).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, records = batch.len(), "could not write a batch of reads");
        }
        for job in batch.drain(..) {
            let _ = job.done.send(result.clone());
        }
    }
}

async fn write_batch(db: &Db, keyring: &Keyring, batch: &mut [Job]) -> Result<(), StoreError> {
    let mut users: Vec<&str> = batch.iter().map(|j| j.user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    // Only the batch's users are locked (in order), as their writers lock them.
    let mut tx = db.begin_write_for(&users).await?;
    let mut c = tx.conn();
    let mut rows: HashMap<String, BundleWithSecret> = store::tokens::get_many_with_secret(&mut c, &users)
        .await?
        .into_iter()
        .map(|b| (b.row.user_id.clone(), b))
        .collect();
    // Each job decides on its row; the last job of a user takes the row, earlier ones a copy.
    let mut remaining: HashMap<String, usize> = HashMap::new();
    for j in batch.iter() {
        *remaining.entry(j.user_id.clone()).or_default() += 1;
    }
    let mut decisions = Vec::with_capacity(batch.len());
    for j in batch.iter_mut() {
        let left = remaining.get_mut(&j.user_id).map(|n| {
            *n -= 1;
            *n
        });
        let row = if left == Some(0) { rows.remove(&j.user_id) } else { rows.get(&j.user_id).cloned() };
        let decision = match j.decide.take() {
            Some(decide) => decide(row),
            None => return Err(StoreError::Other("a read was decided twice".into())),
        };
        decisions.push(decision);
    }
    // One `last_used_at` per user: the latest decrypting read of theirs in this batch.
    let mut touches: HashMap<&str, DateTime<Utc>> = HashMap::new();
    for (j, d) in batch.iter().zip(&decisions) {
        if let Some(at) = d.touch {
            let t = touches.entry(j.user_id.as_str()).or_insert(at);
            *t = (*t).max(at);
        }
    }
    let touches: Vec<(&str, DateTime<Utc>)> = touches.into_iter().collect();
    let events: Vec<PendingEvent<'_>> = batch
        .iter()
        .zip(&decisions)
        .map(|(j, d)| PendingEvent {
            ctx: &j.ctx,
            type_: d.type_,
            outcome: d.outcome,
            user_id: Some(&j.user_id),
            details: d.details.to_string(),
        })
        .collect();
    store::tokens::touch_many(&mut c, &touches).await?;
    audit::record_many(&mut c, keyring, &events).await?;
    tx.commit().await
}
