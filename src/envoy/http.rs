//! Envoy's HTTP callbacks: each gathers its inputs, runs a [`Request`] step, executes [`Effects`].

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use hashbrown::HashMap;
use log::warn;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{self, EnvoyHost};
use crate::pipeline::{Effects, Gateway, Refilled, Request};

thread_local! {
    /// Requests waiting for a global lease's refill, by context id: the root resumes them.
    static PARKED: RefCell<HashMap<u32, Weak<RefCell<Request>>>> = RefCell::new(HashMap::new());
}

pub struct TollgateHttp {
    gateway: Option<Rc<Gateway>>,
    request: Rc<RefCell<Request>>,
    id: u32,
}

impl TollgateHttp {
    pub fn new(gateway: Option<Rc<Gateway>>, id: u32) -> TollgateHttp {
        let request = Rc::new(RefCell::new(Request::with_ticket(id)));
        TollgateHttp {
            gateway,
            request,
            id,
        }
    }

    /// Runs one pipeline step with the host, then executes its effects (on the request or the
    /// response; `size`: the callback's body buffer).
    fn step(
        &mut self,
        (request, size): (bool, usize),
        run: impl for<'g> FnOnce(&mut Request, &'g Gateway, &EnvoyHost<'g>) -> Effects<'g>,
    ) -> Action {
        let (Some(gateway), Ok(mut req)) = (self.gateway.clone(), self.request.try_borrow_mut())
        else {
            return Action::Continue;
        };
        let host = EnvoyHost::new(&gateway);
        let effects = run(&mut req, &gateway, &host);
        execute(
            &gateway,
            &host,
            (&self.request, &mut req, self.id),
            effects,
            (request, size),
        )
    }
}

/// Executes a step's effects. Envoy refusing the request's edits releases what the request
/// holds and answers 500; a request that waits for a refill is parked for the root to resume.
fn execute(
    gateway: &Gateway,
    host: &EnvoyHost<'_>,
    (cell, req, id): (&Rc<RefCell<Request>>, &mut Request, u32),
    effects: Effects<'_>,
    (request, size): (bool, usize),
) -> Action {
    if !apply(&effects, request, size) {
        let refused = req.forward_failed(gateway, host);
        apply(&refused, request, size);
        return Action::Pause;
    }
    if effects.wait {
        PARKED.with(|p| p.borrow_mut().insert(id, Rc::downgrade(cell)));
    }
    if effects.wait || gateway.take_timer() {
        host::tick(1);
    }
    match effects.pause {
        true => Action::Pause,
        false => Action::Continue,
    }
}

/// A refill the request `id` waited for ended: admits it again in its own context, and lets
/// it go upstream when admitted.
pub fn resume(gateway: &Gateway, id: u32, refilled: Refilled) {
    let Some(cell) = PARKED
        .with(|p| p.borrow_mut().remove(&id))
        .and_then(|w| w.upgrade())
    else {
        return;
    };
    let (Ok(()), Ok(mut req)) = (host::set_context(id), cell.try_borrow_mut()) else {
        return;
    };
    let host = EnvoyHost::new(gateway);
    let size = req.parked_body_len();
    let effects = req.resume(gateway, &host, refilled);
    if execute(gateway, &host, (&cell, &mut req, id), effects, (true, size)) == Action::Continue {
        host::resume_request();
    }
}
/// Executes the effects in order; `false` when the request body or length was not replaced.
fn apply(effects: &Effects<'_>, request: bool, size: usize) -> bool {
    let mut ok = true;
    // Before a reply too: a refusal's request headers are what its access-log line prints.
    if let Some(map) = &effects.header_map
        && let Err(status) = host::set_headers(request, map)
    {
        warn!("tollgate could not set the headers: {status:?}");
        ok &= !(request && effects.body.is_some());
    }
    if let Some(reply) = &effects.reply {
        if let Err(status) = host::send_reply(reply, &effects.headers) {
            warn!("tollgate could not send its local reply: {status:?}");
        }
    } else if effects.header_map.is_none() {
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
    if !effects.record.is_empty() {
        let ledger = crate::ledger::encode(&effects.record);
        if let Err(status) = host::set_record_field("tollgate.ledger", ledger.as_bytes()) {
            warn!("tollgate could not write the ledger record: {status:?}");
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
        if !self.request.try_borrow().is_ok_and(|r| r.is_active()) {
            return Action::Continue;
        }
        let headers = host::headers(false);
        self.step((false, 0), |request, gateway, host| {
            request.on_response_headers(gateway, host, headers, end_of_stream)
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let wanted = match self.request.try_borrow() {
            Ok(r) if r.is_active() => r.wants_response_body(),
            _ => return Action::Continue,
        };
        let chunk = host::body(false, if wanted { size } else { 0 });
        self.step((false, size), |request, gateway, host| {
            request.on_response_body(gateway, host, size, &chunk, end_of_stream)
        })
    }

    fn on_log(&mut self) {
        #[cfg(feature = "bench-count")]
        benchcount::flush();
        PARKED.with(|p| p.borrow_mut().remove(&self.id));
        self.step((false, 0), |request, gateway, host| {
            request.on_log(gateway, host)
        });
    }
}
