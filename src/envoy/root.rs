//! The root context: validates the plugin configuration once and hands it to each request.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::host::{self, EnvoyHost};
use super::http::TollgateHttp;
use crate::config::Config;
use crate::metrics::{DENIAL_REASONS, Stat, StatUpdate, UNKNOWN_ID};
use crate::pipeline::{Gateway, Host};
use crate::store;

#[derive(Default)]
pub struct TollgateRoot {
    gateway: Option<Rc<Gateway>>,
}

impl Context for TollgateRoot {}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration(plugin_configuration_size).unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                error!("{err}");
                return false;
            }
        };
        let host = EnvoyHost {
            labels: &config.labels,
        };
        host.stat(StatUpdate::Add(Stat::SharedKeysCreated, 0));
        // Create every budget key before traffic: a key created by two workers at once could
        // lose a reservation; an existing key is never touched.
        let keys = config.shared_keys();
        let created = keys
            .iter()
            .filter(|key| store::ensure(&host, key, store::FRESH))
            .count();
        info!(
            "tollgate configured: {} tenants, {} shared-data keys ({created} created)",
            config.tenants.len(),
            keys.len()
        );
        // Denial counters exist from the start, at 0, for every tenant label.
        let labels = config.labels.tenant_ids();
        for label in labels {
            for reason in DENIAL_REASONS {
                host.stat(StatUpdate::Add(Stat::Denials(label, reason), 0));
            }
        }
        host.stat(StatUpdate::Add(
            Stat::Denials(UNKNOWN_ID, "unauthenticated"),
            0,
        ));
        // Workers configure within the same clock tick: the clock alone gave two workers one
        // name. std's hasher keys come from WASI `random_get` (Envoy's RNG).
        let random = RandomState::new().build_hasher().finish();
        let worker = format!("{:08x}", (random ^ host::now_nanos()) as u32);
        self.gateway = Some(Rc::new(Gateway::new(config, host::now_ms(), worker)));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning `None` would make the SDK panic: a missing configuration passes traffic through.
        Some(Box::new(TollgateHttp::new(self.gateway.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
