//! The per-request record an exchange leaves in filter state for the access log (the ledger
//! fields, and the usage anomaly when there is one).

use super::Exchange;
use crate::api::Usage;

impl Exchange {
    /// The per-request record, as (filter state name, plain-text value) pairs.
    pub fn record(&mut self) -> Vec<(&'static str, String)> {
        let (usage, source) = self.finish(false);
        let route = self.served.as_ref().map_or("", |(_, r)| r.as_str());
        let mut fields = record_fields(self, self.served_model(), route, &usage, source.as_str());
        if let Some(anomaly) = self.anomaly {
            fields.push(("tollgate.usage_anomaly", anomaly.as_str().to_string()));
        }
        fields
    }
}

/// The ledger fields of a request that was read and answered (by the upstream or the cache):
/// who, which API and model, and the usage it is charged, from `source`.
pub fn record_fields(
    exchange: &Exchange,
    served_model: &str,
    route: &str,
    usage: &Usage,
    source: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("tollgate.tenant", exchange.tenant.clone()),
        ("tollgate.api", exchange.kind.as_str().to_string()),
        ("tollgate.model", exchange.facts.model.clone()),
        ("tollgate.served_model", served_model.to_string()),
        ("tollgate.route", route.to_string()),
        ("tollgate.stream", exchange.facts.stream.to_string()),
        ("tollgate.input_tokens", usage.input.to_string()),
        ("tollgate.output_tokens", usage.output.to_string()),
        (
            "tollgate.cached_input_tokens",
            usage.cached_input.to_string(),
        ),
        (
            "tollgate.cache_write_input_tokens",
            usage.cache_write_input.to_string(),
        ),
        ("tollgate.reasoning_tokens", usage.reasoning.to_string()),
        ("tollgate.usage_source", source.to_string()),
    ]
}
