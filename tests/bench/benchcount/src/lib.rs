//! Host calls and allocations per request, for `make bench` only.
//!
//! A filter registers [`Counting`] as its `#[global_allocator]`, calls [`host_call`] before each
//! of its host calls and [`flush`] once per request (in `on_log`). The counts since the last
//! flush are added to the Envoy counters `tollgate.bench.host_calls` and
//! `tollgate.bench.allocations` (`wasmcustom.tollgate.bench.*` in `/stats`); the flush's own host
//! calls and allocations are left out.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

const HOST_CALLS_METRIC: &str = "tollgate.bench.host_calls";
const ALLOCATIONS_METRIC: &str = "tollgate.bench.allocations";

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static HOST_CALLS: Cell<u64> = const { Cell::new(0) };
    /// The allocation count at the end of the last flush.
    static FLUSHED_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Host calls by SDK function since the last flush, with each name's counter id once defined.
    static BY_NAME: std::cell::RefCell<Vec<(&'static str, u64, Option<u32>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The two counters' ids, once defined.
    static IDS: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
}

/// [`System`], counting every allocation and reallocation (`alloc`, `alloc_zeroed`, `realloc`).
pub struct Counting;

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counter is an atomic and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Counts one host call (wasm to Envoy).
pub fn host_call() {
    HOST_CALLS.with(|calls| calls.set(calls.get().saturating_add(1)));
}

/// Counts one host call, by the SDK function's name too: each name's count goes to the counter
/// `tollgate.bench.calls.<name>` at the flush, so the bench can show where the calls go.
pub fn host_call_named(name: &'static str) {
    host_call();
    BY_NAME.with(|by_name| {
        let mut by_name = by_name.borrow_mut();
        match by_name.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, count, _)) => *count += 1,
            None => by_name.push((name, 1, None)),
        }
    });
}

/// Adds the host calls and allocations counted since the last flush to the Envoy counters.
pub fn flush() {
    let allocations = ALLOCATIONS
        .load(Ordering::Relaxed)
        .saturating_sub(FLUSHED_ALLOCATIONS.with(Cell::get));
    let calls = HOST_CALLS.with(|c| c.replace(0));
    if let Some((calls_id, allocations_id)) = ids() {
        let _ = hostcalls::increment_metric(calls_id, i64::try_from(calls).unwrap_or(i64::MAX));
        let _ = hostcalls::increment_metric(
            allocations_id,
            i64::try_from(allocations).unwrap_or(i64::MAX),
        );
    }
    BY_NAME.with(|by_name| {
        for (name, count, id) in by_name.borrow_mut().iter_mut() {
            if id.is_none() {
                let metric = format!("tollgate.bench.calls.{name}");
                *id = hostcalls::define_metric(MetricType::Counter, &metric).ok();
            }
            if let Some(id) = id {
                let _ = hostcalls::increment_metric(*id, i64::try_from(*count).unwrap_or(i64::MAX));
            }
            *count = 0;
        }
    });
    // Read last, so whatever this flush allocated is not counted against the next request.
    FLUSHED_ALLOCATIONS.with(|f| f.set(ALLOCATIONS.load(Ordering::Relaxed)));
}

fn ids() -> Option<(u32, u32)> {
    if let Some(ids) = IDS.with(Cell::get) {
        return Some(ids);
    }
    let calls = hostcalls::define_metric(MetricType::Counter, HOST_CALLS_METRIC).ok()?;
    let allocations = hostcalls::define_metric(MetricType::Counter, ALLOCATIONS_METRIC).ok()?;
    IDS.with(|i| i.set(Some((calls, allocations))));
    Some((calls, allocations))
}

/// The SDK's host calls Tollgate makes, each counted: a bench build imports this module in
/// place of `proxy_wasm::hostcalls`, so the filter's code is the same in both builds.
pub mod counted {
    use std::time::SystemTime;

    use proxy_wasm::hostcalls as sdk;
    use proxy_wasm::types::{BufferType, Bytes, MapType, MetricType, Status};

    use super::host_call_named;

    pub fn get_map_bytes(map: MapType) -> Result<Vec<(String, Bytes)>, Status> {
        host_call_named("get_map_bytes");
        sdk::get_map_bytes(map)
    }

    pub fn set_map_bytes(map: MapType, pairs: Vec<(&str, &[u8])>) -> Result<(), Status> {
        host_call_named("set_map_bytes");
        sdk::set_map_bytes(map, pairs)
    }

    pub fn get_map_value_bytes(map: MapType, key: &str) -> Result<Option<Bytes>, Status> {
        host_call_named("get_map_value_bytes");
        sdk::get_map_value_bytes(map, key)
    }

    pub fn set_map_value_bytes(map: MapType, key: &str, value: Option<&[u8]>) -> Result<(), Status> {
        host_call_named("set_map_value_bytes");
        sdk::set_map_value_bytes(map, key, value)
    }

    pub fn get_buffer(kind: BufferType, start: usize, size: usize) -> Result<Option<Bytes>, Status> {
        host_call_named("get_buffer");
        sdk::get_buffer(kind, start, size)
    }

    pub fn set_buffer(kind: BufferType, start: usize, size: usize, value: &[u8]) -> Result<(), Status> {
        host_call_named("set_buffer");
        sdk::set_buffer(kind, start, size, value)
    }

    pub fn set_property(path: Vec<&str>, value: Option<&[u8]>) -> Result<(), Status> {
        host_call_named("set_property");
        sdk::set_property(path, value)
    }

    pub fn get_property(path: Vec<&str>) -> Result<Option<Bytes>, Status> {
        host_call_named("get_property");
        sdk::get_property(path)
    }

    pub fn send_http_response(
        status: u32,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
    ) -> Result<(), Status> {
        host_call_named("send_http_response");
        sdk::send_http_response(status, headers, body)
    }

    pub fn call_foreign_function(name: &str, args: Option<&[u8]>) -> Result<Option<Bytes>, Status> {
        host_call_named("call_foreign_function");
        sdk::call_foreign_function(name, args)
    }

    pub fn get_current_time() -> Result<SystemTime, Status> {
        host_call_named("get_current_time");
        sdk::get_current_time()
    }

    pub fn get_shared_data(key: &str) -> Result<(Option<Bytes>, Option<u32>), Status> {
        host_call_named("get_shared_data");
        sdk::get_shared_data(key)
    }

    pub fn set_shared_data(key: &str, value: Option<&[u8]>, cas: Option<u32>) -> Result<(), Status> {
        host_call_named("set_shared_data");
        sdk::set_shared_data(key, value, cas)
    }

    pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
        host_call_named("define_metric");
        sdk::define_metric(kind, name)
    }

    pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
        host_call_named("increment_metric");
        sdk::increment_metric(id, offset)
    }

    pub fn dispatch_grpc_call(
        upstream: &str,
        service: &str,
        method: &str,
        metadata: Vec<(&str, &[u8])>,
        message: Option<&[u8]>,
        timeout: std::time::Duration,
    ) -> Result<u32, Status> {
        host_call_named("dispatch_grpc_call");
        sdk::dispatch_grpc_call(upstream, service, method, metadata, message, timeout)
    }

    pub fn dispatch_http_call(
        upstream: &str,
        headers: Vec<(&str, &str)>,
        body: Option<&[u8]>,
        trailers: Vec<(&str, &str)>,
        timeout: std::time::Duration,
    ) -> Result<u32, Status> {
        host_call_named("dispatch_http_call");
        sdk::dispatch_http_call(upstream, headers, body, trailers, timeout)
    }

    pub fn set_tick_period(period: std::time::Duration) -> Result<(), Status> {
        host_call_named("set_tick_period");
        sdk::set_tick_period(period)
    }

    pub fn set_effective_context(context_id: u32) -> Result<(), Status> {
        host_call_named("set_effective_context");
        sdk::set_effective_context(context_id)
    }

    pub fn resume_http_request() -> Result<(), Status> {
        host_call_named("resume_http_request");
        sdk::resume_http_request()
    }

    pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
        host_call_named("record_metric");
        sdk::record_metric(id, value)
    }
}
