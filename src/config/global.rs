//! `global_budgets`: the rate-limit service global limits are leased from.

use super::ConfigError;
use super::raw::RawGlobalBudgets;
use crate::global::GlobalBudgets;

pub(super) fn build_global(raw: &RawGlobalBudgets) -> Result<GlobalBudgets, ConfigError> {
    let defaults = GlobalBudgets::default();
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    // Istio names its clusters `outbound|PORT|SUBSET|HOST`: `|` is allowed in a cluster name.
    let cluster_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|'))
    };
    if !cluster_name(&raw.cluster) {
        return Err(ConfigError::new(
            "global_budgets.cluster",
            "an Envoy cluster name: 1-255 characters of [A-Za-z0-9._|-]",
        ));
    }
    // Envoy reads a gRPC call's target as a serialized `GrpcService` when it parses as one
    // (some names do: "Hx" is a varint field), and only otherwise as a cluster name.
    if <() as prost::Message>::decode(raw.cluster.as_bytes()).is_ok() {
        return Err(ConfigError::new(
            "global_budgets.cluster",
            "Envoy would read this name as a protobuf message, not a cluster name: choose \
             another (a name starting with a lower-case letter, such as \"ratelimit\", is safe)",
        ));
    }
    let Some(target) = crate::global::rls::grpc_target(&raw.cluster) else {
        return Err(ConfigError::new(
            "global_budgets.cluster",
            "an Istio cluster name (with `|`) and its host are at most 123 bytes together",
        ));
    };
    let domain = match &raw.domain {
        None => defaults.domain,
        Some(d) if plain(d) => d.clone(),
        Some(_) => {
            return Err(ConfigError::new(
                "global_budgets.domain",
                "1-128 characters of [A-Za-z0-9._-]",
            ));
        }
    };
    let timeout_ms = match raw.timeout_ms {
        None => defaults.timeout_ms,
        Some(ms) if (1..=60_000).contains(&ms) => ms,
        Some(_) => {
            return Err(ConfigError::new(
                "global_budgets.timeout_ms",
                "must be between 1 and 60000",
            ));
        }
    };
    let replicas = match raw.replicas {
        None => defaults.replicas,
        Some(n) if (1..=10_000).contains(&n) => n,
        Some(_) => {
            return Err(ConfigError::new(
                "global_budgets.replicas",
                "must be between 1 and 10000",
            ));
        }
    };
    let share_permille = match raw.refill_share {
        None => defaults.share_permille,
        Some(share) if share > 0.0 && share <= 1.0 => ((share * 1000.0).round() as u64).max(1),
        Some(_) => {
            return Err(ConfigError::new(
                "global_budgets.refill_share",
                "must be a fraction in (0, 1], e.g. 0.1",
            ));
        }
    };
    Ok(GlobalBudgets {
        cluster: raw.cluster.clone(),
        target,
        domain,
        timeout_ms,
        replicas,
        share_permille,
    })
}
