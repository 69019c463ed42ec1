//! Bench builds only (feature `bench-count`, never shipped): host calls and allocations per
//! request, reported as two Envoy counters that `make bench` divides by the requests served.
//!
//! Every wrapper in `host` and `metrics` calls [`host_call`] before its host call; the allocator
//! (`countalloc`, a crate of its own: its `unsafe impl GlobalAlloc` cannot live under this
//! crate's `unsafe_code = "forbid"`) counts allocations. [`flush`], called once per request from
//! `on_log`, adds what was counted since the last flush; its own host calls and allocations are
//! left out.

use std::cell::Cell;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[global_allocator]
static ALLOCATOR: countalloc::Counting = countalloc::Counting;

const HOST_CALLS_METRIC: &str = "tollgate.bench.host_calls";
const ALLOCATIONS_METRIC: &str = "tollgate.bench.allocations";

thread_local! {
    static HOST_CALLS: Cell<u64> = const { Cell::new(0) };
    /// The allocation count at the end of the last flush.
    static FLUSHED_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// The two counters' ids, once defined.
    static IDS: Cell<Option<(u32, u32)>> = const { Cell::new(None) };
}

/// Counts one host call (wasm to Envoy).
pub fn host_call() {
    HOST_CALLS.with(|calls| calls.set(calls.get().saturating_add(1)));
}

/// Adds the host calls and allocations counted since the last flush to the Envoy counters.
pub fn flush() {
    let allocations = countalloc::allocations().saturating_sub(FLUSHED_ALLOCATIONS.with(Cell::get));
    let calls = HOST_CALLS.with(|c| c.replace(0));
    if let Some((calls_id, allocations_id)) = ids() {
        let _ = hostcalls::increment_metric(calls_id, i64::try_from(calls).unwrap_or(i64::MAX));
        let _ = hostcalls::increment_metric(
            allocations_id,
            i64::try_from(allocations).unwrap_or(i64::MAX),
        );
    }
    // Read last, so whatever this flush allocated is not counted against the next request.
    FLUSHED_ALLOCATIONS.with(|f| f.set(countalloc::allocations()));
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
