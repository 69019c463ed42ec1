//! The per-request record an exchange leaves in filter state for the access log (the ledger
//! fields, and the usage anomaly when there is one).

use super::Exchange;
use crate::api::Usage;
use crate::ledger::{Fact, Record};

impl Exchange {
    /// The per-request record, as (filter state name, plain-text value) pairs.
    pub fn record(&mut self) -> Record {
        let (usage, source) = self.finish(false);
        let route = self.served.as_ref().map_or("", |(_, r)| r.as_str());
        let mut fields = record_fields(self, self.served_model(), route, &usage, source.as_str());
        if let Some(anomaly) = self.anomaly {
            fields.push(("tollgate.usage_anomaly", anomaly.as_str().into()));
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
) -> Record {
    vec![
        ("tollgate.tenant", exchange.tenant.as_str().into()),
        ("tollgate.api", exchange.kind.as_str().into()),
        ("tollgate.model", exchange.facts.model.as_str().into()),
        ("tollgate.served_model", served_model.into()),
        ("tollgate.route", route.into()),
        ("tollgate.stream", Fact::Flag(exchange.facts.stream)),
        ("tollgate.input_tokens", Fact::Count(usage.input)),
        ("tollgate.output_tokens", Fact::Count(usage.output)),
        (
            "tollgate.cached_input_tokens",
            Fact::Count(usage.cached_input),
        ),
        (
            "tollgate.cache_write_input_tokens",
            Fact::Count(usage.cache_write_input),
        ),
        ("tollgate.reasoning_tokens", Fact::Count(usage.reasoning)),
        ("tollgate.usage_source", source.into()),
    ]
}
