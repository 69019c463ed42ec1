//! The configuration as the operator writes it: the serde `Raw*` structs, unvalidated. The
//! sibling modules turn them into the validated types; only they read these fields.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) identity: RawIdentity,
    #[serde(default)]
    pub(super) tenants: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    pub(super) tenant_defaults: RawPolicy,
    #[serde(default)]
    pub(super) prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) usage_view: Option<RawUsageView>,
    pub(super) routing: Option<RawRouting>,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    pub(super) cache: Option<RawCache>,
    pub(super) global_budgets: Option<RawGlobalBudgets>,
    pub(super) conversations: Option<RawConversations>,
    pub(super) alerts: Option<RawAlerts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    pub(super) cluster: String,
    pub(super) path: Option<String>,
    pub(super) authority: Option<String>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) retries: Option<u64>,
    pub(super) max_in_flight: Option<u64>,
    pub(super) max_queued: Option<u64>,
    pub(super) replica: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConversations {
    pub(super) header: Option<String>,
    pub(super) slots: Option<u64>,
    pub(super) idle_seconds: Option<u64>,
    pub(super) cost_thresholds_usd: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConversationLimits {
    pub(super) max_requests: Option<u64>,
    pub(super) tokens: Option<u64>,
    pub(super) usd: Option<String>,
    pub(super) max_age_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobalBudgets {
    pub(super) cluster: String,
    pub(super) domain: Option<String>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) replicas: Option<u64>,
    pub(super) refill_share: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawCachePolicy {
    Always,
    Deterministic,
    Never,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) max_entries: Option<u64>,
    pub(super) max_bytes: Option<u64>,
    pub(super) max_entry_bytes: Option<u64>,
    pub(super) ttl_seconds: Option<u64>,
    pub(super) ways: Option<u64>,
    pub(super) max_entries_per_scope: Option<u64>,
    pub(super) max_bytes_per_scope: Option<u64>,
    pub(super) policy: Option<RawCachePolicy>,
    #[serde(default)]
    pub(super) models: BTreeMap<String, RawCacheRule>,
    #[serde(default)]
    pub(super) charge_hits: bool,
    #[serde(default)]
    pub(super) key_headers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCacheRule {
    pub(super) policy: Option<RawCachePolicy>,
    pub(super) ttl_seconds: Option<u64>,
    pub(super) scope: Option<RawScope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawScope {
    Tenant,
    Global,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) max_tenant_labels: Option<u64>,
    pub(super) max_model_labels: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) limits: Option<Vec<RawLimit>>,
    pub(super) max_concurrent: Option<u64>,
    pub(super) max_output_tokens: Option<u64>,
    pub(super) max_choices: Option<u64>,
    pub(super) default_output_tokens: Option<u64>,
    pub(super) models: Option<Vec<String>>,
    pub(super) clamp_min_output_tokens: Option<u64>,
    pub(super) strict: Option<bool>,
    pub(super) aliases: Option<BTreeMap<String, RawAlias>>,
    pub(super) downgrade_at: Option<f64>,
    /// Another declared tenant whose limits every request of this one must fit too.
    pub(super) parent: Option<String>,
    /// Limits that apply to each end user of the tenant apart (`identity.user`).
    pub(super) user_limits: Option<Vec<RawLimit>>,
    /// Limits per conversation (`conversations`); `{}` tracks conversations without limits.
    pub(super) conversation_limits: Option<RawConversationLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) header: Option<String>,
    pub(super) model_header: Option<String>,
    pub(super) conversation_header: Option<String>,
    pub(super) models: BTreeMap<String, RawModelRoute>,
    #[serde(default)]
    pub(super) aliases: BTreeMap<String, RawAlias>,
    pub(super) unknown_model_route: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelRoute {
    pub(super) route: String,
    pub(super) upstream_model: Option<String>,
    /// The API family the model is served through: `openai`, `anthropic`, `google`, `bedrock`.
    pub(super) api: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlias {
    pub(super) targets: Vec<RawTarget>,
    pub(super) downgrade_to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) model: String,
    pub(super) weight: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) name: Option<String>,
    pub(super) tokens: Option<u64>,
    pub(super) usd: Option<String>,
    pub(super) window: String,
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) global: bool,
    /// A token count, or a USD decimal string, as the limit's own amount.
    pub(super) fallback: Option<serde_json::Value>,
    /// `enforce` (the default) or `shadow`: counted and reported, never refusing.
    pub(super) mode: Option<String>,
    /// Fractions of the amount whose crossing is counted (and alerted), ascending.
    pub(super) alert_at: Option<Vec<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub(super) input: String,
    pub(super) output: String,
    pub(super) cached_input: Option<String>,
    pub(super) cache_write_input: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUsageView {
    pub(super) path: String,
    pub(super) admin_token_sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawSource {
    Header,
    ApiKey,
    Metadata,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
    pub(super) source: RawSource,
    pub(super) header: Option<String>,
    pub(super) metadata_path: Option<Vec<String>>,
    #[serde(default)]
    pub(super) api_keys: Vec<RawApiKey>,
    pub(super) default_tenant: Option<String>,
    #[serde(default)]
    pub(super) accept_undeclared: bool,
    pub(super) undeclared_slots: Option<u64>,
    /// Where the end user inside a tenant comes from (`user_limits`).
    pub(super) user: Option<RawUser>,
    /// Budget slots per tenant scope that users hash to.
    pub(super) user_slots: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    pub(super) source: RawUserSource,
    pub(super) header: Option<String>,
    pub(super) metadata_path: Option<Vec<String>>,
    /// `hash` (default) or `raw`.
    pub(super) ledger: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) enum RawUserSource {
    Header,
    Metadata,
    Body,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiKey {
    pub(super) sha256: String,
    pub(super) tenant: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_request_body_bytes: Option<u64>,
    pub(super) max_buffered_request_bytes: Option<u64>,
    pub(super) max_response_buffer_bytes: Option<u64>,
    pub(super) max_sse_line_bytes: Option<u64>,
    pub(super) max_decoded_response_bytes: Option<u64>,
    pub(super) max_reported_tokens: Option<u64>,
    /// How long an unsettled reservation or concurrency slot lives (its VM died).
    pub(super) reservation_ttl_seconds: Option<u64>,
}
