//! Envoy stats: each update defines its metric once per VM ([`StatIds`]), then adds or records.

use proxy_wasm::types::MetricType;

use super::hostcalls;
use crate::metrics::{Labels, StatIds, StatKind, StatUpdate};

thread_local!(static IDS: StatIds = StatIds::default());

pub fn apply(update: StatUpdate, labels: &Labels) {
    let define = |kind, name: &str| {
        let kind = match kind {
            StatKind::Counter => MetricType::Counter,
            StatKind::Gauge => MetricType::Gauge,
            StatKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    };
    let _ = match IDS.with(|ids| ids.resolve(update, labels, define)) {
        Some((id, Ok(delta))) => hostcalls::increment_metric(id, delta),
        Some((id, Err(value))) => hostcalls::record_metric(id, value),
        None => Ok(()),
    };
}
