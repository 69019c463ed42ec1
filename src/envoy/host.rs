//! Every host call the filter makes, with Envoy's statuses mapped at the seam. The SDK's
//! `hostcalls` panic on statuses they do not expect; each wrapper is only called in phases where
//! Envoy answers `Ok`/`NotFound`, and otherwise returns what the caller treats as "not there".

use super::hostcalls;
use proxy_wasm::types::{BufferType, Bytes, MapType, Status};

use crate::global::GlobalBudgets;
use crate::metrics::{Labels, Stat, StatUpdate};
use crate::pipeline::{Callouts, Gateway, Headers, Host};
use crate::reply::LocalReply;
use crate::store::{SharedStore, Versioned};
use crate::webhook::Webhooks;

/// The request's (or the response's) header map and body buffer.
fn of(request: bool) -> (MapType, BufferType) {
    match request {
        true => (MapType::HttpRequestHeaders, BufferType::HttpRequestBody),
        false => (MapType::HttpResponseHeaders, BufferType::HttpResponseBody),
    }
}

/// Every request (or response) header, pseudo-headers included, in one host call.
pub fn headers(request: bool) -> Headers {
    Headers(hostcalls::get_map_bytes(of(request).0).unwrap_or_default())
}

/// Replaces the whole request (or response) header map, in one host call.
pub fn set_headers(request: bool, headers: &Headers) -> Result<(), Status> {
    let pairs = headers.0.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
    hostcalls::set_map_bytes(of(request).0, pairs.collect())
}

/// Replaces, adds or (with `None`) removes a request (or response) header.
pub fn set_header(request: bool, name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(of(request).0, name, value)
}

/// The buffered request body, or the current response chunk (`size` as announced).
pub fn body(request: bool, size: usize) -> Vec<u8> {
    buffer(of(request).1, size).unwrap_or_default()
}

/// Replaces the buffered request body, or the current response chunk.
pub fn set_body(request: bool, size: usize, body: &[u8]) -> Result<(), Status> {
    hostcalls::set_buffer(of(request).1, 0, size, body)
}

/// A buffer's first `size` bytes (the plugin configuration, in `on_configure`).
pub fn buffer(kind: BufferType, size: usize) -> Option<Bytes> {
    let read = || hostcalls::get_buffer(kind, 0, size).ok();
    (size > 0).then(read).flatten().flatten()
}

/// Writes filter state `wasm.<name>` (printable with `%FILTER_STATE(wasm.<name>:PLAIN)%`).
pub fn set_record_field(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_property(vec![name], Some(value))
}

/// Answers the request locally (`extra`: headers whose names come from the configuration).
pub fn send_reply(reply: &LocalReply, extra: &[(&str, Option<Vec<u8>>)]) -> Result<(), Status> {
    hostcalls::send_http_response(reply.status, reply.header_pairs(extra), Some(&reply.body))
}

/// Makes Envoy match the route table again (after the routing header was set).
pub fn clear_route_cache() -> Result<(), Status> {
    hostcalls::call_foreign_function("clear_route_cache", None).map(|_| ())
}

/// The `:status` of the HTTP call being answered (in `on_http_call_response`).
pub fn http_call_status() -> Option<Bytes> {
    let map = MapType::HttpCallResponseHeaders;
    hostcalls::get_map_value_bytes(map, ":status")
        .ok()
        .flatten()
}

/// The root's timer: every `ms` milliseconds (0: off).
pub fn tick(ms: u64) {
    let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(ms));
}

/// Makes context `id` the one later host calls act on (`Err`: it is gone).
pub fn set_context(id: u32) -> Result<(), Status> {
    hostcalls::set_effective_context(id)
}

/// Lets a paused request go on upstream.
pub fn resume_request() {
    let _ = hostcalls::resume_http_request();
}

/// Time since the Unix epoch by Envoy's clock (zero if unavailable).
pub fn now() -> std::time::Duration {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default()
}

/// The pipeline's host: Envoy's shared data (per `vm_id`, shared by all workers), its clock,
/// properties and stats.
pub struct EnvoyHost<'a> {
    labels: &'a Labels,
}

impl<'a> EnvoyHost<'a> {
    pub fn new(gateway: &'a Gateway) -> EnvoyHost<'a> {
        let labels = &gateway.config.labels;
        EnvoyHost { labels }
    }
}

impl SharedStore for EnvoyHost<'_> {
    fn get(&self, key: &str) -> Versioned {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => (value, cas.unwrap_or(0)),
            Err(_) => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), ()> {
        hostcalls::set_shared_data(key, Some(value), (cas != 0).then_some(cas)).map_err(|_| ())
    }

    fn created(&self, _key: &str) {
        self.stat(StatUpdate::Add(Stat::SharedKeysCreated, 1));
    }
}

/// Calls out from the root context, so the answers come back there.
impl Callouts for EnvoyHost<'_> {
    fn grpc(&self, global: &GlobalBudgets, message: &[u8]) -> Option<u32> {
        let timeout = std::time::Duration::from_millis(global.timeout_ms.max(1));
        let ((service, method), target) = (global.protocol().method(), &global.target);
        hostcalls::dispatch_grpc_call(target, service, method, vec![], Some(message), timeout).ok()
    }

    fn post(&self, hooks: &Webhooks, body: &[u8]) -> Option<u32> {
        let timeout = std::time::Duration::from_millis(hooks.timeout_ms);
        let (cluster, headers) = (&hooks.cluster, hooks.headers());
        hostcalls::dispatch_http_call(cluster, headers, Some(body), vec![], timeout).ok()
    }
}

impl Host for EnvoyHost<'_> {
    fn now_ms(&self) -> u64 {
        u64::try_from(now().as_millis()).unwrap_or(u64::MAX)
    }

    fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        let path = path.iter().map(String::as_str).collect();
        hostcalls::get_property(path).ok().flatten()
    }

    fn stat(&self, update: StatUpdate) {
        super::metrics::apply(update, self.labels);
    }
}
