//! Envoy stats for the filter: metrics are defined on first use and their ids cached per VM
//! (names come from [`crate::metrics`], labels already bounded).

use std::cell::RefCell;

use hashbrown::HashMap;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

thread_local! {
    static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

fn id(kind: MetricType, name: String) -> Option<u32> {
    IDS.with(|ids| {
        if let Some(id) = ids.borrow().get(&name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, &name).ok()?;
        ids.borrow_mut().insert(name, id);
        Some(id)
    })
}

/// Creates a counter at 0 (so a first increment is a visible change for Prometheus `rate()`).
pub fn define_counter(name: String) {
    let _ = id(MetricType::Counter, name);
}

/// Adds `delta` to a counter (nothing for 0).
pub fn count(name: String, delta: u64) {
    if delta == 0 {
        return;
    }
    if let Some(id) = id(MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
    }
}

/// Sets a gauge (the cache's entries and bytes, in-flight counts). Gauges are only ever set from
/// shared counts, never moved by a delta: a VM that dies would leave its deltas behind.
pub fn gauge_set(name: String, value: u64) {
    if let Some(id) = id(MetricType::Gauge, name) {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Records one histogram sample.
pub fn sample(name: String, value: u64) {
    if let Some(id) = id(MetricType::Histogram, name) {
        let _ = hostcalls::record_metric(id, value);
    }
}
