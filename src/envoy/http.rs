//! Envoy's HTTP callbacks, mapped onto the pipeline: each callback gathers what the core needs,
//! hands it to [`Request`] and executes the [`Effects`] it returns.

use std::rc::Rc;

use log::warn;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{self, EnvoyHost};
use crate::pipeline::{Effects, Gateway, Headers, Request, ResponseHead};

pub struct TollgateHttp {
    gateway: Option<Rc<Gateway>>,
    request: Request,
    /// Test builds only (`--features test-trap`): the request asked this VM to die mid-exchange.
    #[cfg(feature = "test-trap")]
    trap: bool,
}

/// Which way the effects apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

impl TollgateHttp {
    pub fn new(gateway: Option<Rc<Gateway>>) -> TollgateHttp {
        TollgateHttp {
            gateway,
            request: Request::new(),
            #[cfg(feature = "test-trap")]
            trap: false,
        }
    }

    /// Executes what the pipeline decided; a request whose edits Envoy refused is answered 500.
    fn apply(
        &mut self,
        gateway: &Gateway,
        effects: Effects<'_>,
        side: Side,
        size: usize,
    ) -> Action {
        let mut failed = false;
        if let Some(reply) = &effects.reply {
            if let Err(status) = host::send_reply(reply, &effects.headers) {
                warn!("tollgate could not send its local reply: {status:?}");
            }
        } else {
            for (name, value) in &effects.headers {
                let result = match side {
                    Side::Request => host::set_request_header(name, value.as_deref()),
                    Side::Response => host::set_response_header(name, value.as_deref()),
                };
                if let Err(status) = result {
                    warn!("tollgate could not set {name}: {status:?}");
                    failed |= *name == "content-length";
                }
            }
        }
        if let Some(body) = &effects.body {
            let result = match side {
                Side::Request => host::set_request_body(size, body),
                Side::Response => host::set_response_body(size, body),
            };
            if let Err(status) = result {
                warn!("tollgate could not replace a body: {status:?}");
                failed |= side == Side::Request;
            }
        }
        if effects.clear_route_cache
            && let Err(status) = host::clear_route_cache()
        {
            warn!("tollgate could not route the request: {status:?}");
        }
        for (name, value) in &effects.record {
            if let Err(status) = host::set_record_field(name, value.as_bytes()) {
                warn!("tollgate could not write {name}: {status:?}");
            }
        }
        if failed {
            let host = EnvoyHost {
                labels: &gateway.config.labels,
            };
            let refused = self.request.forward_failed(gateway, &host);
            return self.apply(gateway, refused, side, size);
        }
        if effects.pause {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

impl Context for TollgateHttp {}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            return Action::Continue;
        };
        let headers = Headers(host::request_headers());
        #[cfg(feature = "test-trap")]
        {
            self.trap = headers.get("x-tollgate-test-trap").is_some();
        }
        let host = EnvoyHost {
            labels: &gateway.config.labels,
        };
        let effects = self
            .request
            .on_request_headers(&gateway, &host, headers, end_of_stream);
        self.apply(&gateway, effects, Side::Request, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            return Action::Continue;
        };
        let host = EnvoyHost {
            labels: &gateway.config.labels,
        };
        let read = || host::request_body(body_size).unwrap_or_default();
        let effects = self
            .request
            .on_request_body(&gateway, &host, body_size, end_of_stream, read);
        self.apply(&gateway, effects, Side::Request, body_size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            return Action::Continue;
        };
        if !self.request.is_active() {
            return Action::Continue;
        }
        // Kills this VM while the request holds its reservation and concurrency slot, as a
        // decompression bomb once did: the e2e suite proves that nothing stays held.
        #[cfg(feature = "test-trap")]
        #[allow(clippy::panic)]
        if self.trap {
            panic!("tollgate test trap: this VM dies mid-exchange");
        }
        let status = host::response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        let content_type = host::response_header("content-type");
        let content_encoding = host::response_header("content-encoding");
        let head = ResponseHead {
            status,
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
        };
        let host = EnvoyHost {
            labels: &gateway.config.labels,
        };
        let effects = self
            .request
            .on_response_headers(&gateway, &host, head, end_of_stream);
        self.apply(&gateway, effects, Side::Response, 0)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            return Action::Continue;
        };
        if !self.request.is_active() {
            return Action::Continue;
        }
        let chunk = if self.request.wants_response_body() {
            host::response_body(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let host = EnvoyHost {
            labels: &gateway.config.labels,
        };
        let effects =
            self.request
                .on_response_body(&gateway, &host, body_size, &chunk, end_of_stream);
        self.apply(&gateway, effects, Side::Response, body_size)
    }

    fn on_log(&mut self) {
        let Some(gateway) = self.gateway.clone() else {
            return;
        };
        let host = EnvoyHost {
            labels: &gateway.config.labels,
        };
        let effects = self.request.on_log(&gateway, &host);
        self.apply(&gateway, effects, Side::Response, 0);
    }
}
