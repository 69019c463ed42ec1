//! Envoy stats for the filter: each [`Stat`] is defined on first use and its id kept per VM,
//! so a request's stats cost a hash of a few bytes, never a formatted name.

use std::cell::RefCell;

use hashbrown::HashMap;
use proxy_wasm::types::MetricType;

use super::hostcalls;
use crate::metrics::{Labels, Stat, StatKind, StatUpdate};

thread_local! {
    static IDS: RefCell<HashMap<Stat, u32>> = RefCell::new(HashMap::new());
}

fn id(stat: Stat, labels: &Labels) -> Option<u32> {
    IDS.with(|ids| {
        if let Some(id) = ids.borrow().get(&stat) {
            return Some(*id);
        }
        let kind = match stat.kind() {
            StatKind::Counter => MetricType::Counter,
            StatKind::Gauge => MetricType::Gauge,
            StatKind::Histogram => MetricType::Histogram,
        };
        let id = hostcalls::define_metric(kind, &stat.name(labels)).ok()?;
        ids.borrow_mut().insert(stat, id);
        Some(id)
    })
}

/// Applies one update (`Add` of 0 only defines the counter, so a first increment is a visible
/// change for Prometheus `rate()`).
pub fn apply(update: StatUpdate, labels: &Labels) {
    match update {
        StatUpdate::Add(stat, delta) => {
            if let Some(id) = id(stat, labels)
                && delta > 0
            {
                let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
        StatUpdate::Set(stat, value) | StatUpdate::Sample(stat, value) => {
            if let Some(id) = id(stat, labels) {
                let _ = hostcalls::record_metric(id, value);
            }
        }
    }
}
