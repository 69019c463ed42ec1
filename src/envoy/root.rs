//! The root context: validates the plugin configuration once and hands it to each request.

use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use super::host::{self, EnvoyHost};
use super::http::{self, TollgateHttp};
use crate::config::Config;
use crate::pipeline::{Gateway, Host as _, Refilled};
use crate::webhook::Webhooks;

pub struct TollgateRoot {
    gateway: Option<Rc<Gateway>>,
    id: u32,
}

impl TollgateRoot {
    pub fn new(id: u32) -> TollgateRoot {
        TollgateRoot { gateway: None, id }
    }

    /// Resumes the requests each ended refill held, each in its own context, then comes back
    /// to the root's.
    fn wake(&self, gateway: &Gateway, ended: Vec<(Refilled, Vec<u32>)>) {
        for (refilled, waiters) in ended {
            waiters
                .into_iter()
                .for_each(|id| http::resume(gateway, id, refilled));
        }
        let _ = host::set_context(self.id);
    }
}

impl Context for TollgateRoot {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(gateway) = self.gateway.clone() else {
            return;
        };
        let read = || host::buffer(BufferType::GrpcReceiveBuffer, response_size);
        let body = (status_code == 0).then(read).flatten();
        let ended = gateway.refill_reply(&EnvoyHost::new(&gateway), token_id, body.as_deref());
        self.wake(&gateway, ended);
    }

    fn on_http_call_response(&mut self, token_id: u32, headers: usize, _: usize, _: usize) {
        if let Some(gateway) = self.gateway.clone() {
            let host = EnvoyHost::new(&gateway);
            let status = (headers > 0).then(host::http_call_status).flatten();
            gateway.webhook_answered(&host, token_id, Webhooks::status(status.as_deref()));
            host::tick(gateway.tick_period(host.now_ms()));
        }
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

    /// Sends the refills requests wait for and the webhook events due (from here, so every
    /// answer finds the root), fails refills whose answer is overdue, resumes their requests.
    fn on_tick(&mut self) {
        let Some(gateway) = self.gateway.clone() else {
            return host::tick(0);
        };
        let host = EnvoyHost::new(&gateway);
        self.wake(&gateway, gateway.on_tick(&host));
        host::tick(gateway.tick_period(host.now_ms()));
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
