//! `alerts`: where budget alert events are POSTed (`alert_at` crossings) and the bounds on
//! sending them.

use super::ConfigError;
use super::raw::RawAlerts;
use crate::webhook::Webhooks;

/// A bounded integer field: `default` when absent, else within `range`.
fn bounded(
    value: Option<u64>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    field: &str,
) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) if range.contains(&v) => Ok(v),
        Some(_) => Err(ConfigError::new(
            format!("alerts.{field}"),
            format!("must be between {} and {}", range.start(), range.end()),
        )),
    }
}

pub(super) fn build_alerts(raw: &RawAlerts) -> Result<Webhooks, ConfigError> {
    // Istio names its clusters `outbound|PORT|SUBSET|HOST`: `|` is allowed in a cluster name.
    let cluster_ok = (1..=255).contains(&raw.cluster.len())
        && (raw.cluster.bytes())
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|'));
    if !cluster_ok {
        return Err(ConfigError::new(
            "alerts.cluster",
            "an Envoy cluster name: 1-255 characters of [A-Za-z0-9._|-]",
        ));
    }
    let path = raw.path.clone().unwrap_or_else(|| "/".to_string());
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || path.len() > 1024 || !printable(&path) {
        return Err(ConfigError::new(
            "alerts.path",
            "a request path: starts with `/`, at most 1024 printable ASCII characters",
        ));
    }
    let authority = raw.authority.clone().unwrap_or_else(|| raw.cluster.clone());
    if authority.is_empty() || authority.len() > 255 || !printable(&authority) {
        return Err(ConfigError::new(
            "alerts.authority",
            "a host name: 1-255 printable ASCII characters",
        ));
    }
    let replica = match &raw.replica {
        Some(r) if r.is_empty() || r.len() > 128 || !printable(r) => {
            return Err(ConfigError::new(
                "alerts.replica",
                "1-128 printable ASCII characters",
            ));
        }
        r => r.clone(),
    };
    Ok(Webhooks {
        cluster: raw.cluster.clone(),
        path,
        authority,
        timeout_ms: bounded(raw.timeout_ms, 2_000, 1..=60_000, "timeout_ms")?,
        retries: bounded(raw.retries, 3, 0..=10, "retries")? as u8,
        max_in_flight: bounded(raw.max_in_flight, 4, 1..=64, "max_in_flight")? as usize,
        max_queued: bounded(raw.max_queued, 256, 1..=4096, "max_queued")? as usize,
        replica,
    })
}
