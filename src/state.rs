//! Shared application state, passed to handlers with `with_state`.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::{
    config::Settings,
    crypto::Keyring,
    services::{api_keys::ApiKeys, tokens::Vault},
    store::Db,
};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub keyring: Arc<Keyring>,
    pub settings: Arc<Settings>,
    pub api_keys: Arc<ApiKeys>,
    pub vault: Vault,
    pub metrics: PrometheusHandle,
}

impl AppState {
    pub fn new(db: Db, keyring: Keyring, settings: Settings) -> Self {
        let keyring = Arc::new(keyring);
        let api_keys = Arc::new(ApiKeys::new(db.clone(), settings.api_key_cache_ttl));
        Self {
            vault: Vault::new(db.clone(), keyring.clone()),
            db,
            keyring,
            settings: Arc::new(settings),
            api_keys,
            metrics: crate::telemetry::metrics_handle(),
        }
    }
}
