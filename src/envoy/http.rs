//! Envoy's HTTP callbacks: each gathers its inputs, runs a [`Request`] step, executes [`Effects`].

use std::rc::Rc;

use log::warn;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{self, EnvoyHost};
use crate::pipeline::{Effects, Gateway, Request};

pub struct TollgateHttp {
    gateway: Option<Rc<Gateway>>,
    request: Request,
}

impl TollgateHttp {
    pub fn new(gateway: Option<Rc<Gateway>>) -> TollgateHttp {
        TollgateHttp {
            gateway,
            request: Request::new(),
        }
    }

    /// Runs one pipeline step with the host, then executes its effects (on the request or the
    /// response; `size`: the callback's body buffer).
    fn step(
        &mut self,
        (request, size): (bool, usize),
        run: impl for<'g> FnOnce(&mut Request, &'g Gateway, &EnvoyHost<'g>) -> Effects<'g>,
    ) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            return Action::Continue;
        };
        let host = EnvoyHost::new(&gateway);
        let effects = run(&mut self.request, &gateway, &host);
        if apply(&effects, request, size) {
            return match effects.pause {
                true => Action::Pause,
                false => Action::Continue,
            };
        }
        // Envoy refused the request's edits: release what it holds and answer 500.
        let refused = self.request.forward_failed(&gateway, &host);
        apply(&refused, request, size);
        Action::Pause
    }
}

/// Executes the effects in order; `false` when the request body or length was not replaced.
fn apply(effects: &Effects<'_>, request: bool, size: usize) -> bool {
    let mut ok = true;
    if let Some(reply) = &effects.reply {
        if let Err(status) = host::send_reply(reply, &effects.headers) {
            warn!("tollgate could not send its local reply: {status:?}");
        }
    } else if let Some(map) = &effects.header_map {
        if let Err(status) = host::set_headers(request, map) {
            warn!("tollgate could not set the headers: {status:?}");
            ok &= !(request && effects.body.is_some());
        }
    } else {
        for (name, value) in &effects.headers {
            if let Err(status) = host::set_header(request, name, value.as_deref()) {
                warn!("tollgate could not set {name}: {status:?}");
                ok &= *name != "content-length";
            }
        }
    }
    if let Some(body) = &effects.body
        && let Err(status) = host::set_body(request, size, body)
    {
        warn!("tollgate could not replace a body: {status:?}");
        ok &= !request;
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
    ok
}

impl Context for TollgateHttp {}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = host::headers(true);
        self.step((true, 0), |request, gateway, host| {
            request.on_request_headers(gateway, host, headers, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.step((true, size), |request, gateway, host| {
            let read = || host::body(true, size);
            request.on_request_body(gateway, host, size, end_of_stream, read)
        })
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if !self.request.is_active() {
            return Action::Continue;
        }
        let headers = host::headers(false);
        self.step((false, 0), |request, gateway, host| {
            request.on_response_headers(gateway, host, headers, end_of_stream)
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.request.is_active() {
            return Action::Continue;
        }
        let wanted = self.request.wants_response_body();
        let chunk = host::body(false, if wanted { size } else { 0 });
        self.step((false, size), |request, gateway, host| {
            request.on_response_body(gateway, host, size, &chunk, end_of_stream)
        })
    }

    fn on_log(&mut self) {
        #[cfg(feature = "bench-count")]
        benchcount::flush();
        self.step((false, 0), |request, gateway, host| {
            request.on_log(gateway, host)
        });
    }
}
