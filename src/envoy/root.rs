//! The root context: validates the plugin configuration once and hands it to each request.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::host::{self, EnvoyHost};
use super::http::TollgateHttp;
use crate::config::Config;
use crate::pipeline::Gateway;

#[derive(Default)]
pub struct TollgateRoot {
    gateway: Option<Rc<Gateway>>,
}

impl Context for TollgateRoot {}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let bytes = host::buffer(BufferType::PluginConfiguration, plugin_configuration_size);
        let bytes = bytes.unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                error!("{err}");
                return false;
            }
        };
        // Workers configure within the same clock tick: the clock alone gave two workers one
        // name. std's hasher keys come from WASI `random_get` (Envoy's RNG).
        let now = host::now();
        let random = RandomState::new().build_hasher().finish() ^ now.as_nanos() as u64;
        let seed = u64::try_from(now.as_millis()).unwrap_or(0);
        let gateway = Gateway::new(config, seed, format!("{:08x}", random as u32));
        let (keys, created) = gateway.prepare(&EnvoyHost::new(&gateway));
        info!(
            "tollgate configured: {} tenants, {keys} shared-data keys ({created} created)",
            gateway.config.tenants.len()
        );
        self.gateway = Some(Rc::new(gateway));
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
