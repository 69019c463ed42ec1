//! The naive filter: the work Tollgate does at its simplest, written the obvious way. It holds
//! the request headers, buffers the request body and parses it with serde_json, sets the route
//! header Envoy's route table matches (`x-tollgate-route: openai`, Tollgate's route for the
//! bench's model) and clears the route cache, does one shared-data compare-and-swap, increments
//! one counter, then buffers and parses the response body (JSON, or each SSE `data:` line).
//! Loaded with `allow_on_headers_stop_iteration: true`, like Tollgate.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use serde_json::Value;

const ROUTE_HEADER: &str = "x-tollgate-route";
const ROUTE: &[u8] = b"openai";
const SHARED_KEY: &str = "naive.requests";

struct NaiveRoot {
    counter: Option<u32>,
}

impl Context for NaiveRoot {}

impl RootContext for NaiveRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        self.counter = hostcalls::define_metric(MetricType::Counter, "naive.requests").ok();
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Naive {
            counter: self.counter,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Naive {
    counter: Option<u32>,
}

impl Context for Naive {}

impl HttpContext for Naive {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        // Hold the headers until the body is read: the route header depends on it.
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        count::host_call();
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if request.get("model").and_then(Value::as_str).is_some() {
            count::host_call();
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                ROUTE_HEADER,
                Some(ROUTE),
            );
            count::host_call();
            let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        }
        count::host_call();
        let (value, cas) = hostcalls::get_shared_data(SHARED_KEY).unwrap_or((None, None));
        let requests: u64 = value
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        count::host_call();
        let _ = hostcalls::set_shared_data(
            SHARED_KEY,
            Some(requests.wrapping_add(1).to_string().as_bytes()),
            cas,
        );
        if let Some(id) = self.counter {
            count::host_call();
            let _ = hostcalls::increment_metric(id, 1);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        count::host_call();
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut parsed = 0usize;
        if serde_json::from_slice::<Value>(&body).is_ok() {
            parsed += 1;
        } else {
            for line in body.split(|b| *b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data: ")
                    && data != b"[DONE]"
                    && serde_json::from_slice::<Value>(data).is_ok()
                {
                    parsed += 1;
                }
            }
        }
        // The parse is the point: keep its result so it is not optimised away.
        std::hint::black_box(parsed);
        Action::Continue
    }

    fn on_log(&mut self) {
        count::flush();
    }
}

/// Host calls and allocations per request (feature `count`), as Tollgate's `bench-count`.
#[cfg(feature = "count")]
mod count {
    #[global_allocator]
    static ALLOCATOR: benchcount::Counting = benchcount::Counting;

    pub use benchcount::{flush, host_call};
}

#[cfg(not(feature = "count"))]
mod count {
    pub fn host_call() {}
    pub fn flush() {}
}

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(NaiveRoot { counter: None }));
}}
