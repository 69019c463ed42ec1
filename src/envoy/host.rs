//! Every host call the filter makes, with Envoy's statuses mapped at the seam.
//!
//! The SDK's `hostcalls` panic on statuses they do not expect; each wrapper here is only called
//! in the phases where Envoy answers `Ok`/`NotFound` for it (headers in their own callbacks,
//! bodies with the size Envoy just announced, properties from HTTP contexts), and otherwise
//! returns a value the caller treats as "not available".

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, Bytes, MapType, Status};

use crate::metrics::{Labels, Stat, StatUpdate};
use crate::pipeline::Host;
use crate::reply::LocalReply;
use crate::store::{SharedStore, Versioned};

/// Every request header (pseudo-headers included), in one host call: cheaper than several
/// single reads when a handful of them is needed (the cache key).
pub fn request_headers() -> Vec<(String, Bytes)> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
}

/// A response header, as bytes (`None` when absent).
pub fn response_header(name: &str) -> Option<Bytes> {
    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Replaces (or, with `None`, removes) a request header.
pub fn set_request_header(name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value)
}

/// The request body Envoy has buffered so far (`size` as announced by the callback).
pub fn request_body(size: usize) -> Option<Bytes> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
}

/// The response body chunk of the current callback.
pub fn response_body(size: usize) -> Option<Bytes> {
    if size == 0 {
        return None;
    }
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
}

/// The plugin configuration bytes, in `on_configure`.
pub fn plugin_configuration(size: usize) -> Option<Bytes> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        .ok()
        .flatten()
}

/// An Envoy property (`metadata.…`, `filter_state.…`, `request.…`).
pub fn property(path: &[String]) -> Option<Bytes> {
    hostcalls::get_property(path.iter().map(String::as_str).collect())
        .ok()
        .flatten()
}

/// Writes filter state `wasm.<name>` (printable with `%FILTER_STATE(wasm.<name>:PLAIN)%`).
pub fn set_record_field(name: &str, value: &[u8]) -> Result<(), Status> {
    hostcalls::set_property(vec![name], Some(value))
}

/// Answers the request locally (`extra`: headers whose names come from the configuration).
pub fn send_reply(reply: &LocalReply, extra: &[(&str, Option<Vec<u8>>)]) -> Result<(), Status> {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .chain(extra.iter().filter_map(|(name, value)| {
            Some((*name, std::str::from_utf8(value.as_deref()?).ok()?))
        }))
        .collect();
    hostcalls::send_http_response(reply.status, headers, Some(&reply.body))
}

/// Replaces the buffered request body (the whole of it, `size` as announced).
pub fn set_request_body(size: usize, body: &[u8]) -> Result<(), Status> {
    hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body)
}

/// Replaces the current response body chunk.
pub fn set_response_body(size: usize, body: &[u8]) -> Result<(), Status> {
    hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, body)
}

/// Replaces, adds or (with `None`) removes a response header, in the response headers callback.
pub fn set_response_header(name: &str, value: Option<&[u8]>) -> Result<(), Status> {
    hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, value)
}

/// Nanoseconds since the Unix epoch, by Envoy's clock.
pub fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch, by Envoy's clock.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The pipeline's host: Envoy's proxy-wasm shared data (per `vm_id`, shared by all workers),
/// its clock, properties and stats.
pub struct EnvoyHost<'a> {
    pub labels: &'a Labels,
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

impl Host for EnvoyHost<'_> {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn property(&self, path: &[String]) -> Option<Vec<u8>> {
        property(path)
    }

    fn stat(&self, update: StatUpdate) {
        super::metrics::apply(update, self.labels);
    }
}

/// Makes Envoy match the route table again (after the routing header was set).
pub fn clear_route_cache() -> Result<(), Status> {
    hostcalls::call_foreign_function("clear_route_cache", None).map(|_| ())
}
