//! The root context: validates the plugin configuration once and hands it to each request.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host::{self, EnvoyStore};
use super::http::TollgateHttp;
use super::metrics;
use crate::config::Config;
use crate::store;

pub struct TollgateRoot {
    config: Option<Rc<Config>>,
    /// The weighted-draw sequence of this worker (seeded by the clock so workers differ).
    draws: Rc<Cell<u64>>,
    /// Names this VM (one per worker) in the ledger's `worker` field.
    worker: Rc<str>,
}

impl Default for TollgateRoot {
    fn default() -> Self {
        TollgateRoot {
            config: None,
            draws: Rc::new(Cell::new(0)),
            worker: Rc::from(""),
        }
    }
}

impl Context for TollgateRoot {}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size).unwrap_or_default();
        match Config::from_json(&bytes) {
            Ok(config) => {
                metrics::define_counter(crate::metrics::SHARED_KEYS_CREATED.to_string());
                self.draws.set(host::now_ms());
                // Workers configure within the same clock tick: the clock alone gave two workers
                // one name. std's hasher keys come from WASI `random_get` (Envoy's RNG).
                let random = RandomState::new().build_hasher().finish();
                self.worker = Rc::from(format!("{:08x}", (random ^ host::now_nanos()) as u32));
                // Create every budget key before traffic: a key created by two workers at once
                // could lose a reservation; an existing key is never touched.
                let keys = config.shared_keys();
                let created = keys
                    .iter()
                    .filter(|key| store::ensure(&EnvoyStore, key, store::FRESH))
                    .count();
                info!(
                    "tollgate configured: {} tenants, {} shared-data keys ({created} created)",
                    config.tenants.len(),
                    keys.len()
                );
                // Denial counters exist from the start, at 0, for every tenant label.
                for tenant in config.labels.tenant_values() {
                    for reason in crate::metrics::DENIAL_REASONS {
                        metrics::define_counter(crate::metrics::denial_name(&tenant, reason));
                    }
                }
                metrics::define_counter(crate::metrics::denial_name(
                    crate::metrics::UNKNOWN_TENANT,
                    "unauthenticated",
                ));
                self.config = Some(Rc::new(config));
                true
            }
            Err(err) => {
                error!("{err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning `None` would make the SDK panic: a missing configuration passes traffic through.
        Some(Box::new(TollgateHttp::new(
            self.config.clone(),
            self.draws.clone(),
            self.worker.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
