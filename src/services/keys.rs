//! Loading, checking and rotating the encryption keyring.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde_json::json;

use crate::{
    config::Settings,
    crypto::{Aad, Keyring, keyring::generate_key_b64},
    services::audit::{self, AuditContext, Outcome, VerifyReport},
    store::{self, Db, StoreError},
};

pub const KEY_FILE: &str = "encryption.key";
const KEY_CHECK_PLAINTEXT: &[u8] = b"centraldb-mfa key check v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where the keyring came from, for the start-up log.
#[derive(Debug, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    File(PathBuf),
    Generated(PathBuf),
}

/// The keyring from `CENTRALDB_ENCRYPTION_KEYS`, or on SQLite from `<data>/encryption.key`,
/// generating that file on first run. Refuses to generate a key when the database already holds
/// data encrypted under some other key.
pub async fn load_keyring(settings: &Settings, db: &Db) -> Result<(Keyring, KeySource), KeyError> {
    if let Some(spec) = &settings.encryption_keys {
        let ring = Keyring::parse(spec).map_err(|e| KeyError::Config(format!("CENTRALDB_ENCRYPTION_KEYS: {e}")))?;
        return Ok((ring, KeySource::Environment));
    }
    if db.shared_by_instances() {
        return Err(KeyError::Config(
            "CENTRALDB_ENCRYPTION_KEYS: required with PostgreSQL (generate one with `centraldb-mfa keygen`)".into(),
        ));
    }
    let path = settings.data_dir.join(KEY_FILE);
    if path.exists() {
        let spec = std::fs::read_to_string(&path)
            .map_err(|e| KeyError::Config(format!("{}: cannot be read: {e}", path.display())))?;
        let ring = Keyring::parse(&SecretString::from(spec.trim().to_string()))
            .map_err(|e| KeyError::Config(format!("{}: {e}", path.display())))?;
        return Ok((ring, KeySource::File(path)));
    }
    let used = key_ids_known(db).await?;
    if !used.is_empty() {
        return Err(KeyError::Config(format!(
            "no encryption key configured and {} is missing, but the database holds data under key id(s) {}; \
             restore the key file or set CENTRALDB_ENCRYPTION_KEYS",
            path.display(),
            used.join(", ")
        )));
    }
    let spec = format!("k1:{}", generate_key_b64().as_str());
    crate::private_file::write(&path, format!("{spec}\n").as_bytes())
        .map_err(|e| KeyError::Config(format!("{}: cannot be written: {e}", path.display())))?;
    let ring =
        Keyring::parse(&SecretString::from(spec)).map_err(|e| KeyError::Config(format!("generated key: {e}")))?;
    Ok((ring, KeySource::Generated(path)))
}

async fn key_ids_known(db: &Db) -> Result<Vec<String>, StoreError> {
    let mut c = db.read().await?;
    let mut ids: Vec<String> = store::keys::all(&mut c.conn()).await?.into_iter().map(|(id, _)| id).collect();
    ids.extend(store::tokens::key_ids_in_use(&mut c.conn()).await?);
    ids.extend(store::challenges::resume_key_ids(&mut c.conn()).await?);
    ids.extend(store::audit::chain_key_ids(&mut c.conn()).await?);
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// How many token bundles are stored under each key id (`(key_id, count)`), read outside any
/// write transaction: the metrics' view of a rotation's progress.
pub async fn bundles_per_key(db: &Db) -> Result<Vec<(String, i64)>, StoreError> {
    let mut c = db.read().await?;
    store::keys::bundles_per_key(&mut c.conn()).await
}

/// Checks, before anything is written, that every key in the ring that has been used here is the
/// same key, and that every key id the data is encrypted under, and the audit chain is sealed
/// under, is in the ring. Then records a check value for the active key, and upgrades token
/// bundles still bound the legacy way ([`upgrade_legacy_bundles`]).
pub async fn verify_keyring(db: &Db, ring: &Keyring) -> Result<(), KeyError> {
    let (checks, in_use, chain_ids) = {
        let mut c = db.read().await?;
        (
            store::keys::all(&mut c.conn()).await?,
            {
                let mut ids = store::tokens::key_ids_in_use(&mut c.conn()).await?;
                ids.extend(store::challenges::resume_key_ids(&mut c.conn()).await?);
                ids.sort();
                ids.dedup();
                ids
            },
            store::audit::chain_key_ids(&mut c.conn()).await?,
        )
    };
    for (id, envelope) in &checks {
        if ring.has_key(id) && ring.decrypt(envelope, &Aad::key_check(id)).is_err() {
            return Err(KeyError::Config(format!(
                "encryption key '{id}' cannot decrypt the data written under key id '{id}' (wrong key for this database?)"
            )));
        }
    }
    let missing: Vec<&String> = in_use.iter().filter(|id| !ring.has_key(id)).collect();
    if !missing.is_empty() {
        return Err(KeyError::Config(format!(
            "stored data is encrypted under key id(s) {} which the keyring does not contain (have: {})",
            missing.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", "),
            ring.key_ids().join(", ")
        )));
    }
    let missing: Vec<&String> = chain_ids.iter().filter(|id| !ring.has_key(id)).collect();
    if !missing.is_empty() {
        return Err(KeyError::Config(format!(
            "the audit log is sealed under key id(s) {} which the keyring does not contain (have: {}), so it \
             could not be verified; put the key back (`centraldb-mfa rewrap` with it present re-seals the log \
             under the active key, after which it can go)",
            missing.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", "),
            ring.key_ids().join(", ")
        )));
    }
    let active = ring.active_key_id();
    if !checks.iter().any(|(id, _)| id == active)
        && let Some(env) = ring.encrypt_with_key_id(active, KEY_CHECK_PLAINTEXT, &Aad::key_check(active))
    {
        let mut tx = db.begin_write().await?;
        store::keys::insert_if_missing(&mut tx.conn(), active, &env, store::now()).await?;
        tx.commit().await?;
    }
    let upgraded = upgrade_legacy_bundles(db, ring).await?;
    if upgraded.legacy_upgraded > 0 || !upgraded.failed.is_empty() {
        tracing::info!(
            upgraded = upgraded.legacy_upgraded,
            failed = upgraded.failed.len(),
            "token bundles re-encrypted with the per-write associated data"
        );
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    /// Of those, bundles that had the legacy associated data (no write id).
    pub legacy_upgraded: u64,
    /// Rows that changed while being rewrapped (already rewritten by a concurrent write).
    pub skipped_changed: u64,
    /// Rows that failed to decrypt (user ids listed; never their contents).
    pub failed: Vec<String>,
    /// Audit events re-sealed under the active key.
    pub resealed: u64,
    /// Set when the audit chain did not verify; it was then left exactly as it was.
    pub audit_broken: Option<VerifyReport>,
}

/// Re-encrypts every stored ciphertext not under the active key, and every token bundle still
/// bound the legacy way (user and kind only) with a version and a fresh write id. Each row is swapped by
/// compare-and-set, so a concurrent write is never overwritten. Then verifies the audit chain and
/// re-seals it under the active key (refused, and reported, if it does not verify).
pub async fn rewrap(db: &Db, ring: &Keyring, ctx: &AuditContext) -> Result<RewrapReport, StoreError> {
    let active = ring.active_key_id().to_string();
    let mut report = RewrapReport::default();
    rewrap_bundles(db, ring, false, &mut report).await?;
    // MFA resume states (live for minutes, but they must not be stranded either).
    let mut after = uuid::Uuid::nil();
    loop {
        let page = {
            let mut c = db.read().await?;
            store::challenges::rewrap_page(&mut c.conn(), &active, after, 200).await?
        };
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (id, old) in page {
            let aad = crate::services::mfa::resume_aad(id);
            let Ok(plain) = ring.decrypt(&old, &aad) else {
                report.failed.push(format!("challenge {id}"));
                continue;
            };
            let new = ring.encrypt(&plain, &aad);
            let mut tx = db.begin_write().await?;
            if store::challenges::rewrap_one(&mut tx.conn(), id, &old, &active, &new).await? {
                report.rewrapped += 1;
            } else {
                report.skipped_changed += 1;
            }
            tx.commit().await?;
        }
    }
    let sealed = audit::reseal(db, ring).await?;
    report.resealed = sealed.resealed;
    if !sealed.verified.ok {
        report.audit_broken = Some(sealed.verified);
    }
    let mut tx = db.begin_write().await?;
    audit::record(
        &mut tx.conn(),
        ring,
        ctx,
        "key.rewrap",
        if report.failed.is_empty() && report.audit_broken.is_none() { Outcome::Success } else { Outcome::Failure },
        None,
        json!({"active_key_id": active, "rewrapped": report.rewrapped, "legacy_upgraded": report.legacy_upgraded,
               "skipped_changed": report.skipped_changed, "failed": report.failed.len(),
               "audit_resealed": report.resealed, "audit_chain_ok": report.audit_broken.is_none(),
               "audit_first_bad_seq": report.audit_broken.as_ref().and_then(|r| r.first_bad_seq)}),
    )
    .await?;
    tx.commit().await?;
    Ok(report)
}

/// Re-encrypts token bundles under the active key with the per-write binding (version + a fresh
/// write id): those still bound the legacy way, and (unless `legacy_only`) those under another
/// key. Each row is swapped by compare-and-set, so a concurrent write is never overwritten.
async fn rewrap_bundles(
    db: &Db,
    ring: &Keyring,
    legacy_only: bool,
    report: &mut RewrapReport,
) -> Result<(), StoreError> {
    let active = ring.active_key_id().to_string();
    let mut after = String::new();
    loop {
        let page = {
            let mut c = db.read().await?;
            store::tokens::rewrap_page(&mut c.conn(), &active, legacy_only, &after, 200).await?
        };
        let Some(last) = page.last() else { break };
        after = last.user_id.clone();
        for cand in page {
            let aad = match cand.write_id {
                Some(id) => Aad::token_bundle_write(&cand.user_id, &cand.kind, cand.version, &id.to_string()),
                None => Aad::token_bundle(&cand.user_id, &cand.kind),
            };
            let Ok(plain) = ring.decrypt(&cand.ciphertext, &aad) else {
                report.failed.push(cand.user_id);
                continue;
            };
            let write_id = uuid::Uuid::new_v4();
            let aad = Aad::token_bundle_write(&cand.user_id, &cand.kind, cand.version, &write_id.to_string());
            let new = ring.encrypt(&plain, &aad);
            let mut tx = db.begin_write().await?;
            if store::tokens::rewrap_one(&mut tx.conn(), &cand.user_id, &cand.ciphertext, &active, &new, write_id)
                .await?
            {
                report.rewrapped += 1;
                report.legacy_upgraded += u64::from(cand.write_id.is_none());
            } else {
                report.skipped_changed += 1;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Upgrades token bundles written before write ids existed (legacy associated data: user and
/// kind only) to the per-write binding; run at every start-up after the keyring checks, so reads
/// never accept the legacy binding. Audited (`token.upgraded`, with the user ids) when it did
/// anything.
pub async fn upgrade_legacy_bundles(db: &Db, ring: &Keyring) -> Result<RewrapReport, StoreError> {
    let mut report = RewrapReport::default();
    rewrap_bundles(db, ring, true, &mut report).await?;
    if report.rewrapped + report.skipped_changed > 0 || !report.failed.is_empty() {
        let mut tx = db.begin_write().await?;
        audit::record(
            &mut tx.conn(),
            ring,
            &AuditContext::system("startup"),
            "token.upgraded",
            if report.failed.is_empty() { Outcome::Success } else { Outcome::Failure },
            None,
            json!({"legacy_upgraded": report.legacy_upgraded, "skipped_changed": report.skipped_changed,
                   "failed": report.failed}),
        )
        .await?;
        tx.commit().await?;
    }
    Ok(report)
}

/// Path of the generated key file for a data folder.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}
