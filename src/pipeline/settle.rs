//! The end of an exchange: settle the reservation exactly once, store a qualifying response in
//! the cache, count the usage and write the ledger record.

use super::cache_step::CacheStatus;
use super::conversation_step;
use super::{Active, Effects, Gateway, Host, Request, State};
use crate::api::Usage;
use crate::cache;
use crate::cost;
use crate::ledger::{Fact, Record};
use crate::metrics::{Counter, Histogram, Stat, StatUpdate, UNKNOWN_ID};

impl Request {
    /// The exchange is over (Envoy's `on_log`): aborted streams and upstream resets never saw
    /// the end of their response and are settled here. The record, unless already written.
    pub fn on_log<'g, H: Host + ?Sized>(&mut self, gateway: &'g Gateway, host: &H) -> Effects<'g> {
        let upstream_failed = !self.recorded
            && self.is_active()
            && host
                .property(&["response".to_string(), "code_details".to_string()])
                .is_some_and(|d| d.windows(8).any(|w| w == b"upstream"));
        Effects {
            record: self.finalize(gateway, host, upstream_failed),
            ..Effects::default()
        }
    }

    /// Settles the reservation and returns the per-request record, once (later calls: empty).
    pub(super) fn finalize<H: Host + ?Sized>(
        &mut self,
        gateway: &Gateway,
        host: &H,
        upstream_failed: bool,
    ) -> crate::ledger::Record {
        if self.recorded {
            return Vec::new();
        }
        let mut fields = match &mut self.state {
            // Not read (or its client left before the body's end): the head is all there is.
            State::PassThrough | State::AwaitingBody { .. } => Vec::new(),
            State::Active(active) => settle(gateway, host, active, upstream_failed),
            State::Refused {
                kind,
                tenant,
                model,
                reason,
                by,
            } => {
                let mut fields: Record = vec![
                    ("tollgate.api", kind.as_str().into()),
                    ("tollgate.decision", (*reason).into()),
                ];
                let label = tenant.as_ref().map_or(UNKNOWN_ID, |(_, label)| *label);
                if let Some((tenant, _)) = tenant {
                    fields.push(("tollgate.tenant", tenant.clone().into()));
                }
                if let Some(model) = model {
                    fields.push(("tollgate.model", model.clone().into()));
                }
                if let Some(by) = by {
                    fields.push(("tollgate.refused_by", by.clone().into()));
                }
                host.stat(StatUpdate::Add(Stat::Denials(label, reason), 1));
                fields
            }
            State::Answered(fields) => std::mem::take(fields),
            // The client left while its global lease was being refilled: nothing was held,
            // and the request is not resumed.
            State::Waiting(parked) => {
                let fields: Record = vec![
                    ("tollgate.api", parked.kind.as_str().into()),
                    ("tollgate.decision", "client_aborted".into()),
                    ("tollgate.tenant", parked.tenant.clone().into()),
                ];
                self.state = State::PassThrough;
                fields
            }
        };
        self.recorded = true;
        if !fields.is_empty() {
            fields.push(("tollgate.worker", gateway.worker.as_str().into()));
        }
        if let Some(user) = self.user.take()
            && !fields.is_empty()
        {
            fields.push(("tollgate.user", user.into()));
        }
        let mut record = std::mem::take(&mut self.seen);
        record.append(&mut fields);
        record
    }
}

/// Settles an admitted exchange: the usage it is charged, its metrics, its cache entry, the
/// release of its reservation and slots; returns its record.
fn settle<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    active: &mut Active,
    upstream_failed: bool,
) -> crate::ledger::Record {
    let config = &gateway.config;
    let (charged, _) = active.exchange.finish(upstream_failed);
    let price = config.price(active.exchange.served_model());
    let billed_micro = price.map(|p| cost::billed_micro_usd(p.cost(&charged)));
    let now = host.now_ms();
    let model = config.labels.model_id(active.exchange.served_model());
    count_usage(host, active.label, model, &charged, billed_micro);
    let billed_micro = billed_micro.unwrap_or(0);
    if active.exchange.usage_anomaly().is_some() {
        host.stat(StatUpdate::Add(Stat::UsageAnomalies(active.label), 1));
    }
    store_in_cache(gateway, host, active, model, now);
    active.release(gateway, host, &charged, now);
    let mut fields = active.exchange.record();
    if let Some(in_conversation) = &active.in_conversation {
        let epoch = gateway.tenant_budget(&active.exchange.tenant).0.epoch(now);
        fields.extend(conversation_step::settle(
            gateway,
            host,
            in_conversation,
            active.label,
            (&charged, price),
            (now, epoch),
        ));
    }
    fields.push(("tollgate.decision", "admitted".into()));
    fields.push((
        "tollgate.llm_cost_usd",
        Fact::Usd(cost::format_micro_usd(billed_micro)),
    ));
    if !matches!(active.cache, CacheStatus::Off) {
        fields.push(("tollgate.cache", active.cache.as_str().into()));
    }
    if let Some(global) = active.global {
        fields.push(("tollgate.global", global.into()));
    }
    if let Some(shadow) = &active.admitted.shadow_refusal {
        fields.push(("tollgate.shadow_refusal", shadow.clone().into()));
    }
    if let Some(conversation) = &active.conversation {
        fields.push(("tollgate.conversation_id", conversation.clone().into()));
    }
    fields
}

/// Stores a finished miss (or refresh) in the cache when the response qualifies.
fn store_in_cache<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    active: &mut Active,
    model: crate::metrics::LabelId,
    now: u64,
) {
    let (Some(cache), CacheStatus::Miss(_, key, ttl) | CacheStatus::Refresh(_, key, ttl)) =
        (&gateway.config.cache, &active.cache)
    else {
        return;
    };
    if matches!(active.cache, CacheStatus::Miss(..)) {
        let stat = Stat::Counter(Counter::CacheMisses, active.label, model);
        host.stat(StatUpdate::Add(stat, 1));
    }
    let Some((status, content_type, body)) = active.exchange.take_capture() else {
        return;
    };
    let table = cache::CacheConfig {
        ttl_ms: *ttl,
        ..cache.table
    };
    let outcome = cache::insert(host, &table, key, status, &content_type, &body, now);
    if let cache::StoreOutcome::Stored { evicted } = outcome {
        host.stat(StatUpdate::Add(Stat::CacheStores, 1));
        if evicted {
            host.stat(StatUpdate::Add(Stat::CacheEvictions, 1));
        }
        let stats = cache::stats(host);
        host.stat(StatUpdate::Set(
            Stat::CacheEntries,
            u64::from(stats.entries),
        ));
        host.stat(StatUpdate::Set(Stat::CacheBytes, stats.bytes_held));
    } else {
        log::debug!("tollgate did not cache a response: {outcome:?}");
    }
}

/// The usage metrics of one finished exchange: counters that grow, and the cost histogram for
/// a model with a price (`billed_micro`; a model without one has no cost to sample).
fn count_usage<H: Host + ?Sized>(
    host: &H,
    tenant: crate::metrics::LabelId,
    model: crate::metrics::LabelId,
    charged: &Usage,
    billed_micro: Option<u64>,
) {
    for (counter, value) in [
        (Counter::Requests, 1),
        (Counter::InputTokens, charged.input),
        (Counter::OutputTokens, charged.output),
        (Counter::CachedInputTokens, charged.cached_input),
        (Counter::CacheWriteInputTokens, charged.cache_write_input),
        (Counter::CostMicroUsd, billed_micro.unwrap_or(0)),
    ] {
        if value > 0 {
            host.stat(StatUpdate::Add(
                Stat::Counter(counter, tenant, model),
                value,
            ));
        }
    }
    let tokens = charged.input.saturating_add(charged.output);
    host.stat(StatUpdate::Sample(
        Stat::Histogram(Histogram::TokensPerRequest, tenant),
        tokens,
    ));
    if let Some(billed_micro) = billed_micro {
        host.stat(StatUpdate::Sample(
            Stat::Histogram(Histogram::CostMicroUsdPerRequest, tenant),
            billed_micro,
        ));
    }
}
