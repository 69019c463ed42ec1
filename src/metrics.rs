//! Metric names with bounded labels. Envoy's stats carry no tags, so labels are encoded in the
//! name (`tollgate.tenant.<t>.model.<m>.requests`) and extracted again by `stats_tags` in the
//! shipped Envoy config, giving Prometheus families such as
//! `tollgate_requests{tenant="…",model="…"}` (Envoy drops the `wasmcustom.` namespace there).
//!
//! Cardinality is bounded by the configuration: the first `max_tenant_labels` declared tenants
//! (by name) and the first `max_model_labels` configured models (routing table and price table)
//! get their own label value; every other tenant or model is `_other`.

use std::borrow::Cow;

use hashbrown::{HashMap, HashSet};

/// Shared-data keys this filter ever created (the key space is bounded by the configuration).
pub const SHARED_KEYS_CREATED: &str = "tollgate.shared_data.keys_created";

/// The label value shared by everything past the label caps.
pub const OTHER: &str = "_other";

/// Counters labelled by tenant and served model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    Requests,
    InputTokens,
    OutputTokens,
    CachedInputTokens,
    CacheWriteInputTokens,
    CostMicroUsd,
    CacheHits,
    CacheMisses,
    CacheSavedTokens,
    CacheSavedMicroUsd,
}

impl Counter {
    pub fn suffix(self) -> &'static str {
        match self {
            Counter::Requests => "requests",
            Counter::InputTokens => "input_tokens",
            Counter::OutputTokens => "output_tokens",
            Counter::CachedInputTokens => "cached_input_tokens",
            Counter::CacheWriteInputTokens => "cache_write_input_tokens",
            Counter::CostMicroUsd => "cost_micro_usd",
            Counter::CacheHits => "cache_hits",
            Counter::CacheMisses => "cache_misses",
            Counter::CacheSavedTokens => "cache_saved_tokens",
            Counter::CacheSavedMicroUsd => "cache_saved_micro_usd",
        }
    }
}

/// Histograms labelled by tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Histogram {
    TokensPerRequest,
    CostMicroUsdPerRequest,
    TimeToFirstTokenMs,
}

impl Histogram {
    pub fn suffix(self) -> &'static str {
        match self {
            Histogram::TokensPerRequest => "tokens_per_request",
            Histogram::CostMicroUsdPerRequest => "cost_micro_usd_per_request",
            Histogram::TimeToFirstTokenMs => "time_to_first_token_ms",
        }
    }
}

/// A label value's index in [`Labels`] (computed once per request; stats are keyed by it).
pub type LabelId = u16;

/// The id of `_other`: everything past the label caps.
pub const OTHER_ID: LabelId = LabelId::MAX;

/// The id of `_unknown` (tenant labels only): refused before a tenant was known.
pub const UNKNOWN_ID: LabelId = LabelId::MAX - 1;

/// The label values that get their own series.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    tenants: HashMap<String, LabelId>,
    tenant_values: Vec<String>,
    /// Tenant label ids whose value no other kept tenant sanitises to (`a.b` and `a_b` share).
    exclusive: HashSet<LabelId>,
    models: HashMap<String, LabelId>,
    model_values: Vec<String>,
    /// The names of limits (bounded by the configuration), for the lease and budget gauges.
    limits: HashMap<String, LabelId>,
    limit_values: Vec<String>,
    /// The conversation cost thresholds' label values (`0_50`), by index.
    thresholds: Vec<String>,
}

/// The first `max` of `names` (at most 10,000), sorted: their ids and sanitised values.
fn first_labels(
    names: &mut dyn Iterator<Item = &String>,
    max: usize,
) -> (HashMap<String, LabelId>, Vec<String>) {
    let mut all: Vec<&String> = names.collect();
    all.sort();
    all.dedup();
    let kept = all.into_iter().take(max.min(usize::from(UNKNOWN_ID)));
    let mut ids = HashMap::new();
    let mut values = Vec::new();
    for (i, name) in kept.enumerate() {
        ids.insert(name.clone(), LabelId::try_from(i).unwrap_or(OTHER_ID));
        values.push(sanitize(name).into_owned());
    }
    (ids, values)
}

impl Labels {
    /// `tenants` and `models` in any order; the first `max_*` of each, sorted by name, keep
    /// their names (at most 10,000 each: the configuration caps them).
    pub fn new<'a>(
        tenants: impl Iterator<Item = &'a String>,
        models: impl Iterator<Item = &'a String>,
        max_tenant_labels: usize,
        max_model_labels: usize,
    ) -> Labels {
        let mut tenants = tenants;
        let mut models = models;
        let (tenants, tenant_values) = first_labels(&mut tenants, max_tenant_labels);
        let (models, model_values) = first_labels(&mut models, max_model_labels);
        let exclusive = (0..tenant_values.len())
            .filter(|&i| {
                let value = tenant_values.get(i);
                tenant_values.iter().filter(|v| Some(*v) == value).count() == 1
            })
            .filter_map(|i| LabelId::try_from(i).ok())
            .collect();
        Labels {
            tenants,
            tenant_values,
            exclusive,
            models,
            model_values,
            limits: HashMap::new(),
            limit_values: Vec::new(),
            thresholds: Vec::new(),
        }
    }

    /// The conversation cost thresholds' label values, by index.
    pub fn with_thresholds(mut self, values: &[String]) -> Labels {
        self.thresholds = values.iter().map(|v| sanitize(v).into_owned()).collect();
        self
    }

    pub fn threshold_value(&self, index: u8) -> &str {
        self.thresholds
            .get(usize::from(index))
            .map_or(OTHER, String::as_str)
    }

    /// The limits' names, each a `limit` label value (lease and budget gauges).
    pub fn with_limits<'a>(mut self, mut names: impl Iterator<Item = &'a String>) -> Labels {
        (self.limits, self.limit_values) = first_labels(&mut names, usize::MAX);
        self
    }

    pub fn limit_id(&self, name: &str) -> LabelId {
        self.limits.get(name).copied().unwrap_or(OTHER_ID)
    }

    pub fn limit_value(&self, id: LabelId) -> &str {
        self.limit_values
            .get(usize::from(id))
            .map_or(OTHER, String::as_str)
    }

    /// The tenant label values (sanitised), `_other` included.
    pub fn tenant_values(&self) -> impl Iterator<Item = Cow<'_, str>> {
        self.tenant_values
            .iter()
            .map(|t| Cow::Borrowed(t.as_str()))
            .chain(std::iter::once(Cow::Borrowed(OTHER)))
    }

    /// Every tenant label id, `_other` included.
    pub fn tenant_ids(&self) -> impl Iterator<Item = LabelId> + use<> {
        let count = LabelId::try_from(self.tenant_values.len()).unwrap_or(0);
        (0..count).chain(std::iter::once(OTHER_ID))
    }

    pub fn tenant<'a>(&self, name: &'a str) -> Cow<'a, str> {
        if self.tenants.contains_key(name) {
            sanitize(name)
        } else {
            Cow::Borrowed(OTHER)
        }
    }

    pub fn model<'a>(&self, name: &'a str) -> Cow<'a, str> {
        if self.models.contains_key(name) {
            sanitize(name)
        } else {
            Cow::Borrowed(OTHER)
        }
    }

    /// Whether the label stands for one tenant only (its own name, no other sanitised onto it).
    pub fn is_exclusive(&self, id: LabelId) -> bool {
        self.exclusive.contains(&id)
    }

    pub fn tenant_id(&self, name: &str) -> LabelId {
        self.tenants.get(name).copied().unwrap_or(OTHER_ID)
    }

    pub fn model_id(&self, name: &str) -> LabelId {
        self.models.get(name).copied().unwrap_or(OTHER_ID)
    }

    /// The value of a tenant label id (`_other`, `_unknown` included).
    pub fn tenant_value(&self, id: LabelId) -> &str {
        match id {
            UNKNOWN_ID => UNKNOWN_TENANT,
            _ => self
                .tenant_values
                .get(usize::from(id))
                .map_or(OTHER, String::as_str),
        }
    }

    pub fn model_value(&self, id: LabelId) -> &str {
        self.model_values
            .get(usize::from(id))
            .map_or(OTHER, String::as_str)
    }
}

/// One stat, by kind and label ids: cheap to hash, so the skin keeps Envoy's metric id per
/// stat and formats a name only the first time ([`Stat::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    Counter(Counter, LabelId, LabelId),
    Histogram(Histogram, LabelId),
    Denials(LabelId, &'static str),
    InFlight(LabelId),
    UsageAnomalies(LabelId),
    CacheStores,
    CacheEvictions,
    CacheEntries,
    CacheBytes,
    SharedKeysCreated,
    /// Refills of global leases by outcome: `granted`, `refused`, `unavailable`.
    GlobalRefills(LabelId, &'static str),
    /// Requests admitted from a fallback allowance (the rate-limit service was unreachable).
    GlobalFallbackAdmits(LabelId),
    /// Hits asked by refills sent but never answered (failed or timed out): the service may
    /// have counted them without granting them.
    GlobalUnconfirmed(LabelId),
    /// A global limit's lease on this Envoy as of its last refill, by tenant and limit:
    /// `granted` this window, or the service's `remaining` (tokens, or micro-USD).
    GlobalLease(LabelId, LabelId, &'static str),
    /// A limit's use this window as of its last settlement, by the tenant whose budget it is
    /// and the limit (tokens, or micro-USD): set for tenants in a budget tree, at every level.
    BudgetUsed(LabelId, LabelId),
    /// Requests a shadow limit would have refused (they were admitted), by the tenant whose
    /// budget it is and the limit.
    ShadowRefusals(LabelId, LabelId),
    /// Requests whose user slot was last used by another user (`identity.user_slots`).
    UserSlotCollisions(LabelId),
    /// Conversations started.
    ConversationsStarted(LabelId),
    /// Conversations active within `conversations.idle_seconds` (gauge, from a shared count).
    ConversationsActive(LabelId),
    /// Conversations whose running cost crossed cost threshold `index`.
    ConversationsOver(LabelId, u8),
    /// A limit's `alert_at` threshold (thousandths) crossed, once per window per Envoy, by the
    /// tenant whose budget it is and the limit.
    BudgetAlerts(LabelId, LabelId, u16),
    /// Alert webhook events (`alerts`), per Envoy: calls sent, events delivered, failed for
    /// good, dropped (the outbox was full).
    Webhooks(Webhook),
}

/// What became of alert webhook events ([`Stat::Webhooks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Webhook {
    Sent,
    Delivered,
    Failed,
    Dropped,
}

/// How a stat is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatKind {
    Counter,
    Gauge,
    Histogram,
}

impl Stat {
    pub fn kind(self) -> StatKind {
        match self {
            Stat::Histogram(..) => StatKind::Histogram,
            Stat::InFlight(_)
            | Stat::CacheEntries
            | Stat::CacheBytes
            | Stat::GlobalLease(..)
            | Stat::BudgetUsed(..)
            | Stat::ConversationsActive(_) => StatKind::Gauge,
            _ => StatKind::Counter,
        }
    }

    /// The stat's name in Envoy (labels encoded for `stats_tags`).
    pub fn name(self, labels: &Labels) -> String {
        match self {
            Stat::Counter(c, t, m) => {
                counter_name(c, labels.tenant_value(t), labels.model_value(m))
            }
            Stat::Histogram(h, t) => histogram_name(h, labels.tenant_value(t)),
            Stat::Denials(t, reason) => denial_name(labels.tenant_value(t), reason),
            Stat::InFlight(t) => in_flight_name(labels.tenant_value(t)),
            Stat::UsageAnomalies(t) => usage_anomalies_name(labels.tenant_value(t)),
            Stat::CacheStores => "tollgate.cache.stores".to_string(),
            Stat::CacheEvictions => "tollgate.cache.evictions".to_string(),
            Stat::CacheEntries => "tollgate.cache.entries".to_string(),
            Stat::CacheBytes => "tollgate.cache.bytes".to_string(),
            Stat::SharedKeysCreated => SHARED_KEYS_CREATED.to_string(),
            Stat::GlobalRefills(t, outcome) => format!(
                "tollgate.tenant.{}.reason.{outcome}.global_refills",
                labels.tenant_value(t)
            ),
            Stat::GlobalFallbackAdmits(t) => format!(
                "tollgate.tenant.{}.global_fallback_admits",
                labels.tenant_value(t)
            ),
            Stat::GlobalUnconfirmed(t) => format!(
                "tollgate.tenant.{}.global_unconfirmed",
                labels.tenant_value(t)
            ),
            Stat::GlobalLease(t, l, gauge) => format!(
                "tollgate.tenant.{}.limit.{}.global_{gauge}",
                labels.tenant_value(t),
                labels.limit_value(l)
            ),
            Stat::BudgetUsed(t, l) => format!(
                "tollgate.tenant.{}.limit.{}.budget_used",
                labels.tenant_value(t),
                labels.limit_value(l)
            ),
            Stat::BudgetAlerts(t, l, permille) => format!(
                "tollgate.tenant.{}.limit.{}.threshold.{}.budget_alerts",
                labels.tenant_value(t),
                labels.limit_value(l),
                crate::alerts::label(permille)
            ),
            Stat::ConversationsStarted(t) => format!(
                "tollgate.tenant.{}.conversations_started",
                labels.tenant_value(t)
            ),
            Stat::ConversationsActive(t) => format!(
                "tollgate.tenant.{}.conversations_active",
                labels.tenant_value(t)
            ),
            Stat::ConversationsOver(t, i) => format!(
                "tollgate.tenant.{}.threshold.{}.conversations_over",
                labels.tenant_value(t),
                labels.threshold_value(i)
            ),
            Stat::UserSlotCollisions(t) => format!(
                "tollgate.tenant.{}.user_slot_collisions",
                labels.tenant_value(t)
            ),
            Stat::Webhooks(outcome) => match outcome {
                Webhook::Sent => "tollgate.alert_webhooks.sent",
                Webhook::Delivered => "tollgate.alert_webhooks.delivered",
                Webhook::Failed => "tollgate.alert_webhooks.failed",
                Webhook::Dropped => "tollgate.alert_webhooks.dropped",
            }
            .to_string(),
            Stat::ShadowRefusals(t, l) => format!(
                "tollgate.tenant.{}.limit.{}.shadow_refusals",
                labels.tenant_value(t),
                labels.limit_value(l)
            ),
        }
    }
}

/// Envoy's metric id of each stat, defined on first use and kept per VM, so a request's stats
/// cost a hash of a few bytes, never a formatted name.
#[derive(Debug, Default)]
pub struct StatIds(std::cell::RefCell<hashbrown::HashMap<Stat, u32>>);

impl StatIds {
    /// The metric `update` acts on, defined with `define(kind, name)` the first time, and the
    /// value to add (`Ok`) or record (`Err`); `None` when it cannot be defined or there is
    /// nothing to add (an `Add` of 0 only defines it).
    pub fn resolve(
        &self,
        update: StatUpdate,
        labels: &Labels,
        define: impl FnOnce(StatKind, &str) -> Option<u32>,
    ) -> Option<(u32, Result<i64, u64>)> {
        let (stat, value) = match update {
            StatUpdate::Add(stat, delta) => (stat, Ok(i64::try_from(delta).unwrap_or(i64::MAX))),
            StatUpdate::Set(stat, value) | StatUpdate::Sample(stat, value) => (stat, Err(value)),
        };
        let known = self.0.borrow().get(&stat).copied();
        let id = match known {
            Some(id) => id,
            None => {
                let id = define(stat.kind(), &stat.name(labels))?;
                self.0.borrow_mut().insert(stat, id);
                id
            }
        };
        (value != Ok(0)).then_some((id, value))
    }
}

/// What to do with a stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatUpdate {
    /// Add to a counter (0: define it, so a first increment is visible to `rate()`).
    Add(Stat, u64),
    /// Set a gauge (from a shared count, never by a delta: a dead VM would leave its deltas).
    Set(Stat, u64),
    /// Record a histogram sample.
    Sample(Stat, u64),
}

/// A label value safe inside a dotted stat name: anything but `[A-Za-z0-9_-]` becomes `_`
/// (`gpt-4.1` → `gpt-4_1`).
pub fn sanitize(value: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !value.is_empty() && value.chars().all(ok) {
        Cow::Borrowed(value)
    } else if value.is_empty() {
        Cow::Borrowed("_")
    } else {
        Cow::Owned(value.chars().map(|c| if ok(c) { c } else { '_' }).collect())
    }
}

pub fn counter_name(counter: Counter, tenant: &str, model: &str) -> String {
    format!(
        "tollgate.tenant.{tenant}.model.{model}.{}",
        counter.suffix()
    )
}

/// Every refusal reason a denial counter can carry (`reply::LocalReply::reason`).
pub const DENIAL_REASONS: [&str; 8] = [
    "unauthenticated",
    "bad_request",
    "model_not_found",
    "too_large",
    "model_not_allowed",
    "rate_limited",
    "quota_exceeded",
    "internal",
];

/// The tenant label of requests refused before a tenant was known.
pub const UNKNOWN_TENANT: &str = "_unknown";

pub fn denial_name(tenant: &str, reason: &str) -> String {
    format!("tollgate.tenant.{tenant}.reason.{reason}.denials")
}

pub fn in_flight_name(tenant: &str) -> String {
    format!("tollgate.tenant.{tenant}.in_flight")
}

/// Responses whose usage was clamped, foreign-shaped or unreadable (`exchange::UsageAnomaly`).
pub fn usage_anomalies_name(tenant: &str) -> String {
    format!("tollgate.tenant.{tenant}.usage_anomalies")
}

pub fn histogram_name(histogram: Histogram, tenant: &str) -> String {
    format!("tollgate.tenant.{tenant}.{}", histogram.suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_capped_with_other() {
        let tenants: Vec<String> = (0..1000).map(|i| format!("t{i:04}")).collect();
        let models = ["gpt-4.1".to_string(), "claude".to_string()];
        let labels = Labels::new(tenants.iter(), models.iter(), 50, 1);
        let distinct: HashSet<String> = tenants
            .iter()
            .map(|t| labels.tenant(t).into_owned())
            .collect();
        assert_eq!(distinct.len(), 51);
        assert!(
            distinct.contains(OTHER) && distinct.contains("t0000") && !distinct.contains("t0050")
        );
        assert_eq!(labels.model("claude"), "claude");
        assert_eq!(labels.model("gpt-4.1"), OTHER);
        assert_eq!(labels.tenant("undeclared"), OTHER);
    }

    #[test]
    fn names_encode_labels_for_stats_tags() {
        assert_eq!(sanitize("gpt-4.1"), "gpt-4_1");
        assert_eq!(sanitize("meta-llama/Llama 3"), "meta-llama_Llama_3");
        assert_eq!(
            counter_name(Counter::CostMicroUsd, "team-a", "gpt-4o"),
            "tollgate.tenant.team-a.model.gpt-4o.cost_micro_usd"
        );
        assert_eq!(
            denial_name("t", "rate_limited"),
            "tollgate.tenant.t.reason.rate_limited.denials"
        );
        assert_eq!(
            usage_anomalies_name("t"),
            "tollgate.tenant.t.usage_anomalies"
        );
        assert_eq!(
            histogram_name(Histogram::TimeToFirstTokenMs, "t"),
            "tollgate.tenant.t.time_to_first_token_ms"
        );
    }
}
