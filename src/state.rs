//! Shared application state, passed to handlers with `with_state`.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    config::Settings,
    crypto::Keyring,
    services::{
        api_keys::ApiKeys,
        code_hasher::CodeHasher,
        leases::{Leases, VersionNotifier},
        mfa::Mfa,
        refusals::Refusals,
        sessions::Sessions,
        tokens::Vault,
    },
    store::Db,
};

/// Cloned for every request, so it is one `Arc` (one atomic increment, not one per service).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every handler shares (reached through [`AppState`]).
pub struct Shared {
    pub db: Db,
    pub keyring: Arc<Keyring>,
    pub settings: Arc<Settings>,
    pub api_keys: Arc<ApiKeys>,
    pub vault: Vault,
    pub mfa: Mfa,
    pub sessions: Sessions,
    pub leases: Leases,
    pub notifier: VersionNotifier,
    pub metrics: PrometheusHandle,
    /// Refused requests per source address (aggregated audit, 429 past the budget).
    pub refusals: Refusals,
}

impl AppState {
    /// Fails only on settings that cannot work (argon2 parameters out of range).
    pub fn new(db: Db, keyring: Keyring, settings: Settings) -> Result<Self, String> {
        let keyring = Arc::new(keyring);
        let api_keys = Arc::new(ApiKeys::new(db.clone(), settings.api_key_cache_ttl));
        let hasher = CodeHasher::new(settings.argon2, settings.argon2_workers, settings.argon2_queue)?;
        let notifier = VersionNotifier::new(settings.max_waiters);
        Ok(Self(Arc::new(Shared {
            vault: Vault::new(db.clone(), keyring.clone(), notifier.clone()),
            leases: Leases::new(db.clone(), keyring.clone()),
            notifier,
            mfa: Mfa::new(db.clone(), keyring.clone(), hasher, settings.mfa.clone()),
            sessions: Sessions::new(db.clone(), keyring.clone()),
            db,
            keyring,
            refusals: Refusals::new(settings.refusals),
            settings: Arc::new(settings),
            api_keys,
            metrics: crate::telemetry::metrics_handle(),
        })))
    }
}
