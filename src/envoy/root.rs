//! The root context: validates the plugin configuration once and hands it to each request.

use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::host::{self, EnvoyHost};
use super::http::TollgateHttp;
use crate::config::Config;
use crate::pipeline::{Gateway, Host as _, Refilled, Unanswered};

pub struct TollgateRoot {
    gateway: Option<Rc<Gateway>>,
    id: u32,
}

impl TollgateRoot {
    pub fn new(id: u32) -> TollgateRoot {
        TollgateRoot { gateway: None, id }
    }

    /// A refill ended (or why it has no answer): applies it and resumes the requests that waited.
    fn answered(&self, gateway: &Gateway, key: &str, body: Result<&[u8], Unanswered>) {
        let host = EnvoyHost::new(gateway);
        let (refilled, waiters) = gateway.refill_answered(&host, key, body, host.now_ms());
        self.wake(gateway, waiters, refilled);
    }

    /// Resumes each waiting request in its own context, then comes back to the root's.
    fn wake(&self, gateway: &Gateway, waiters: Vec<u32>, refilled: Refilled) {
        for id in waiters {
            super::http::resume(gateway, id, refilled);
        }
        let _ = host::set_context(self.id);
    }
}

impl Context for TollgateRoot {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some((gateway, key)) =
            (self.gateway.clone()).and_then(|g| Some((g.clone(), g.refill_of(token_id)?)))
        else {
            return;
        };
        let body = (status_code == 0)
            .then(|| host::buffer(BufferType::GrpcReceiveBuffer, response_size))
            .flatten();
        self.answered(&gateway, &key, body.as_deref().ok_or(Unanswered::Lost));
    }
}

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
        let now = host::now();
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(0);
        let gateway = Gateway::for_worker(config, now_ms, now.as_nanos() as u64);
        let (keys, created) = gateway.prepare(&EnvoyHost::new(&gateway));
        info!(
            "tollgate configured: {} tenants, {keys} shared-data keys ({created} created)",
            gateway.config.tenants.len()
        );
        self.gateway = Some(Rc::new(gateway));
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning `None` would make the SDK panic: a missing configuration passes traffic through.
        Some(Box::new(TollgateHttp::new(
            self.gateway.clone(),
            context_id,
        )))
    }

    /// Sends the refills requests wait for (from here, so every answer finds the root), and
    /// fails those whose answer is overdue.
    fn on_tick(&mut self) {
        let Some(gateway) = self.gateway.clone() else {
            return host::tick(false);
        };
        let Some(global) = &gateway.config.global else {
            return host::tick(false);
        };
        let now = EnvoyHost::new(&gateway).now_ms();
        for call in gateway.refills_due(now) {
            match host::dispatch_refill(global, &call.message) {
                Ok(token) => gateway.refill_sent(call.key, token),
                Err(_) => self.answered(&gateway, &call.key, Err(Unanswered::NotSent)),
            }
        }
        for key in gateway.refills_overdue(now) {
            self.answered(&gateway, &key, Err(Unanswered::Lost));
        }
        for waiters in gateway.refills_watched(&EnvoyHost::new(&gateway), now) {
            self.wake(&gateway, waiters, Refilled::Grew);
        }
        if !gateway.refills_pending() {
            host::tick(false);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
