//! The plugin configuration: raw JSON (serde) turned into a validated [`Config`] once, in
//! `on_configure`. Every error names the field it is about, so Envoy's log says what to fix.
//!
//! This module owns [`Config`], [`ConfigError`], the order the sections are checked in (which
//! error wins when several fields are wrong) and the small sections (`prices`, `usage_view`,
//! `metrics`); `identity`, `limits`, `tenants`, `routing` and `cache` build the others from the
//! serde structs of `raw`.

mod alerts;
mod cache;
mod conversations;
mod global;
mod identity;
mod limits;
mod raw;
mod routing;
mod tenants;

use std::fmt;

use hashbrown::HashMap;

use crate::admission::{TenantKeys, TenantPolicy};
use crate::cost::{self, Price};
use crate::metrics::Labels;
use crate::routing::Routing;
use crate::tenant::{Identity, KeyDigest};

pub use cache::{Cache, CachePolicy, CacheRule};
pub use limits::Limits;
pub use tenants::Tenant;

use raw::RawConfig;

/// A configuration error: the dotted path of the offending field and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid tollgate configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

/// The validated configuration the filter runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub identity: Identity,
    pub limits: Limits,
    /// Declared tenants: their policy (own fields over `tenant_defaults`) and shared-data keys.
    pub tenants: HashMap<String, Tenant>,
    /// The policy of undeclared tenants (`identity.accept_undeclared`), from `tenant_defaults`.
    pub undeclared_policy: TenantPolicy,
    /// Undeclared tenants share this many budget slots (by hash of the name).
    pub undeclared_slots: u64,
    /// USD per token by model (`*`: any other model).
    pub prices: HashMap<String, Price>,
    /// The usage view: a path answered with every tenant's budgets, guarded by a token digest.
    pub usage_view: Option<UsageView>,
    /// Model routing (`None`: models pass through unrouted).
    pub routing: Option<Routing>,
    /// End users inside tenants (`identity.user`): their source and budget slots.
    pub users: Option<crate::user::Users>,
    /// Conversations: their header, slots and cost thresholds (`None`: not tracked).
    pub conversations: Option<crate::conversation::Conversations>,
    /// Metric label values (bounded by the configuration).
    pub labels: Labels,
    /// The response cache (`None`: off).
    pub cache: Option<Cache>,
    /// The rate-limit service that `global` limits are leased from (`None`: none is).
    pub global: Option<crate::global::GlobalBudgets>,
    /// Where budget alert events are POSTed (`None`: they are only counted).
    pub alerts: Option<crate::webhook::Webhooks>,
}

/// `usage_view`: where and for whom.
#[derive(Debug, Clone)]
pub struct UsageView {
    pub path: String,
    pub token: KeyDigest,
}

impl Config {
    /// The price of `model`, or the `*` price.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model).or_else(|| self.prices.get("*"))
    }

    /// Every shared-data key the configuration implies (created in `on_configure`).
    pub fn shared_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cache
            .as_ref()
            .map(|c| crate::cache::all_keys(&c.table))
            .unwrap_or_default();
        keys.extend(
            self.tenants
                .values()
                .flat_map(|t| t.keys.all().map(str::to_string)),
        );
        keys.extend(
            self.labels
                .tenant_values()
                .map(|label| crate::admission::in_flight_key(&label)),
        );
        if self.identity.accept_undeclared {
            for slot in 0..self.undeclared_slots {
                let k = TenantKeys::new(&undeclared_scope(slot), &self.undeclared_policy);
                keys.extend(k.all().map(str::to_string));
            }
        }
        // Per-user limits: every user slot's buckets and its owner key.
        if let Some(users) = &self.users {
            for (scope, policy) in self.scopes_where(has_per_user) {
                let scope_keys = TenantKeys::new(&scope, policy);
                for slot in 0..users.slots {
                    if let Some(k) = scope_keys.for_user(policy, slot) {
                        let per_user = policy.limits.iter().zip(k.buckets);
                        keys.extend(per_user.filter(|(l, _)| l.per_user).map(|(_, b)| b.record));
                    }
                    keys.push(crate::user::slot_owner_key(&scope, slot));
                }
            }
        }
        // Budget alerts: one key per alerting limit, in the scope that owns it.
        let alerting = |p: &TenantPolicy| p.limits.iter().any(|l| !l.alert_at.is_empty());
        for (scope, policy) in self.scopes_where(alerting) {
            keys.extend(
                policy
                    .limits
                    .iter()
                    .filter(|l| !l.alert_at.is_empty())
                    .map(|l| crate::alerts::key(l.owner.as_deref().unwrap_or(&scope), &l.name)),
            );
        }
        // Conversations: every slot and the active count of each tracked scope.
        if let Some(c) = &self.conversations {
            for (scope, _) in self.scopes_where(|p| p.conversation.is_some()) {
                keys.extend((0..c.slots).map(|slot| crate::conversation::slot_key(&scope, slot)));
                keys.push(crate::conversation::active_key(&scope));
            }
        }
        // An ancestor's buckets are in every descendant's keys too.
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Every budget record the configuration implies: the scopes' own, and each user slot's
    /// with per-user limits.
    pub fn budget_records(&self) -> std::collections::BTreeMap<String, crate::keys::RecordPlan> {
        let mut plans = std::collections::BTreeMap::new();
        for (scope, policy) in self.scopes_where(|_| true) {
            let keys = TenantKeys::new(&scope, policy);
            keys.plan_records(policy, &mut plans);
            let slots = self.users.as_ref().map_or(0, |u| u.slots);
            for slot in 0..slots {
                if let Some(user) = keys.for_user(policy, slot) {
                    user.plan_records(policy, &mut plans);
                }
            }
        }
        plans
    }

    /// Every budget scope whose policy `wanted`, with its policy: the declared tenants, and
    /// the undeclared tenants' slots (with `identity.accept_undeclared`).
    fn scopes_where(&self, wanted: impl Fn(&TenantPolicy) -> bool) -> Vec<(String, &TenantPolicy)> {
        let mut scopes: Vec<(String, &TenantPolicy)> = self
            .tenants
            .iter()
            .filter(|(_, t)| wanted(&t.policy))
            .map(|(name, t)| (name.clone(), &t.policy))
            .collect();
        let undeclared = &self.undeclared_policy;
        if self.identity.accept_undeclared && wanted(undeclared) {
            scopes.extend(
                (0..self.undeclared_slots).map(|slot| (undeclared_scope(slot), undeclared)),
            );
        }
        scopes
    }

    /// The header naming a request's conversation: `conversations.header`, else
    /// `routing.conversation_header` (sticky routing and the ledger use it too).
    pub fn conversation_header(&self) -> Option<&str> {
        self.conversations
            .as_ref()
            .map(|c| c.header.as_str())
            .or_else(|| self.routing.as_ref()?.conversation_header.as_deref())
    }

    /// How many shared-data keys the per-user limits imply (before they are listed).
    fn user_key_count(&self) -> u64 {
        let Some(users) = &self.users else {
            return 0;
        };
        self.scopes_where(has_per_user)
            .iter()
            .map(|(_, p)| {
                let limits = p.limits.iter().filter(|l| l.per_user).count();
                let per_slot = u64::try_from(limits).unwrap_or(u64::MAX).saturating_add(1);
                per_slot.saturating_mul(users.slots)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The budget scope of an undeclared tenant: one of `undeclared_slots` slots. Two tenants in
    /// one slot share their budgets (stricter for both, never looser).
    pub fn undeclared_keys(&self, tenant: &str) -> TenantKeys {
        let digest = KeyDigest::of_key(tenant.as_bytes());
        let slot = digest.prefix_u64() % self.undeclared_slots.max(1);
        TenantKeys::new(&undeclared_scope(slot), &self.undeclared_policy)
    }
}

fn undeclared_scope(slot: u64) -> String {
    format!("~{slot}")
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return ConfigError::new("(root)", format!("not valid JSON: {inner}"));
            }
            let field = if path == "." {
                "(root)".to_string()
            } else {
                path
            };
            ConfigError::new(field, strip_position(&inner.to_string()))
        })?;
        de.end()
            .map_err(|err| ConfigError::new("(root)", strip_position(&err.to_string())))?;
        Config::try_from(raw)
    }
}

/// serde_json appends " at line L column C"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        tenants::check_tenant_names(&raw.tenants)?;
        let raw_undeclared_slots = raw.identity.undeclared_slots;
        let users = identity::build_users(raw.identity.user.as_ref(), raw.identity.user_slots)?;
        let identity = identity::build_identity(raw.identity, &raw.tenants)?;
        let limits = limits::build_limits(&raw.limits)?;
        let mut prices = HashMap::with_capacity(raw.prices.len());
        for (model, p) in &raw.prices {
            let field = |name: &str| format!("prices.{model}.{name}");
            let parse = |name: &str, v: &str| {
                cost::parse_usd_per_million(v).map_err(|r| ConfigError::new(field(name), r))
            };
            let optional =
                |name: &str, v: &Option<String>| v.as_deref().map(|v| parse(name, v)).transpose();
            prices.insert(
                model.clone(),
                Price::new(
                    parse("input", &p.input)?,
                    parse("output", &p.output)?,
                    optional("cached_input", &p.cached_input)?,
                    optional("cache_write_input", &p.cache_write_input)?,
                ),
            );
        }

        let routing = raw
            .routing
            .as_ref()
            .map(routing::build_routing)
            .transpose()?;
        let models = routing.as_ref().map(|r| &r.models);
        let reservation_ttl_ms = limits::reservation_ttl_ms(&raw.limits)?;
        let (defaults, tenants) = tenants::build_tenants(
            &raw.tenant_defaults,
            &raw.tenants,
            reservation_ttl_ms,
            models,
        )?;
        let undeclared_slots = identity::undeclared_slots(raw_undeclared_slots)?;
        let usage_view = match raw.usage_view {
            None => None,
            Some(v) => {
                if !v.path.starts_with('/') || v.path.len() < 2 {
                    return Err(ConfigError::new(
                        "usage_view.path",
                        "must be an absolute path such as \"/tollgate/usage\"",
                    ));
                }
                let token = KeyDigest::from_hex(&v.admin_token_sha256).ok_or_else(|| {
                    ConfigError::new(
                        "usage_view.admin_token_sha256",
                        "must be 64 hexadecimal characters (the SHA-256 of the admin token)",
                    )
                })?;
                Some(UsageView {
                    path: v.path,
                    token,
                })
            }
        };
        let label_cap = |field: &str, value: Option<u64>, default: usize| match value {
            None => Ok(default),
            Some(n) if (1..=10_000).contains(&n) => Ok(usize::try_from(n).unwrap_or(default)),
            Some(_) => Err(ConfigError::new(field, "must be between 1 and 10000")),
        };
        let max_tenants = label_cap(
            "metrics.max_tenant_labels",
            raw.metrics.max_tenant_labels,
            100,
        )?;
        let max_models = label_cap("metrics.max_model_labels", raw.metrics.max_model_labels, 50)?;
        let model_names: Vec<&String> = routing
            .as_ref()
            .map(|r| r.models.keys().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .chain(prices.keys().filter(|m| m.as_str() != "*"))
            .collect();
        let limit_names = tenants
            .values()
            .map(|t| &t.policy)
            .chain([&defaults])
            .flat_map(|p| p.limits.iter())
            .map(|l| &l.name);
        let labels = Labels::new(
            tenants.keys(),
            model_names.into_iter(),
            max_tenants,
            max_models,
        )
        .with_limits(limit_names);
        let cache = raw.cache.as_ref().map(cache::build_cache).transpose()?;
        let global = raw
            .global_budgets
            .as_ref()
            .map(global::build_global)
            .transpose()?;
        let any_global = {
            let mut policies = tenants.values().map(|t| &t.policy).chain([&defaults]);
            policies.any(|p| p.limits.iter().any(|l| l.global.is_some()))
        };
        if global.is_none() && any_global {
            return Err(ConfigError::new(
                "global_budgets",
                "a limit is marked `global`: name the rate-limit service's cluster here",
            ));
        }
        let per_user = tenants
            .iter()
            .map(|(name, t)| (format!("tenants.{name}.user_limits"), &t.policy))
            .chain([("tenant_defaults.user_limits".to_string(), &defaults)])
            .find(|(_, p)| p.limits.iter().any(|l| l.per_user));
        if let (Some((at, _)), None) = (&per_user, &users) {
            return Err(ConfigError::new(
                at.as_str(),
                "needs `identity.user` (where the end user comes from)",
            ));
        }
        let limited = tenants
            .iter()
            .map(|(name, t)| (format!("tenants.{name}.conversation_limits"), &t.policy))
            .chain([("tenant_defaults.conversation_limits".to_string(), &defaults)])
            .find(|(_, p)| p.conversation.is_some())
            .map(|(at, _)| at);
        let conversations = conversations::build_conversations(
            raw.conversations.as_ref(),
            routing
                .as_ref()
                .and_then(|r| r.conversation_header.as_deref()),
            limited.as_deref(),
        )?;
        let labels = match &conversations {
            Some(c) => labels.with_thresholds(&c.threshold_labels),
            None => labels,
        };
        let alerts = raw.alerts.as_ref().map(alerts::build_alerts).transpose()?;
        let config = Config {
            alerts,
            global,
            identity,
            limits,
            tenants,
            labels,
            cache,
            undeclared_policy: defaults,
            undeclared_slots,
            prices,
            usage_view,
            routing,
            users,
            conversations,
        };
        let tracked = config.scopes_where(|p| p.conversation.is_some()).len();
        let conversation_keys = u64::try_from(tracked).unwrap_or(u64::MAX)
            * config.conversations.as_ref().map_or(0, |c| c.slots + 1);
        if conversation_keys > MAX_USER_KEYS {
            return Err(ConfigError::new(
                "conversations.slots",
                format!(
                    "the tracked conversations would create {conversation_keys} shared-data keys, above {MAX_USER_KEYS}: fewer slots (or no conversation_limits for undeclared tenants)"
                ),
            ));
        }
        let user_keys = config.user_key_count();
        if user_keys > MAX_USER_KEYS {
            return Err(ConfigError::new(
                "identity.user_slots",
                format!(
                    "the per-user limits would create {user_keys} shared-data keys, above {MAX_USER_KEYS}: fewer slots or fewer per-user limits"
                ),
            ));
        }
        Ok(config)
    }
}

/// A policy with per-user limits.
fn has_per_user(policy: &TenantPolicy) -> bool {
    policy.limits.iter().any(|l| l.per_user)
}

/// At most this many shared-data keys for per-user budgets (slots × per-user limits, and one
/// slot owner per slot, over every tenant scope).
pub const MAX_USER_KEYS: u64 = 1 << 20;

fn check_header_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err("must be a header name of [A-Za-z0-9_-]".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantSource;

    /// The error a configuration the test expects refused gets (shared by the sections' tests).
    pub(super) fn err(json: &str) -> ConfigError {
        Config::from_json(json.as_bytes()).expect_err("must be refused")
    }

    #[test]
    fn minimal_header_config() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"X-Tenant"},"tenants":{"a":{}}}"#,
        )
        .unwrap();
        assert!(matches!(cfg.identity.source, TenantSource::Header(ref h) if h == "x-tenant"));
        assert_eq!(cfg.limits, Limits::default());
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, &str); 9] = [
            (
                r#"{"identity":{"source":"header","header":7}}"#,
                "identity.header",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"bogus":1}"#,
                "bogus",
            ),
            (
                r#"{"identity":{"source":"header","header":"x","colour":1}}"#,
                "identity.colour",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"limits":{"max_request_body_bytes":-5}}"#,
                "limits.max_request_body_bytes",
            ),
            (r#"{"tenants":{}}"#, "(root)"),
            (r#"{"identity":{"source":"header"}}"#, "identity.header"),
            (
                r#"{"identity":{"source":"api_key","api_keys":[{"sha256":"abc","tenant":"a"}]},"tenants":{"a":{}}}"#,
                "identity.api_keys[0].sha256",
            ),
            (
                r#"{"identity":{"source":"carrier_pigeon"}}"#,
                "identity.source",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"limits":{"max_sse_line_bytes":0}}"#,
                "limits.max_sse_line_bytes",
            ),
        ];
        for (json, field) in cases {
            let e = err(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn unknown_field_is_named_in_the_reason() {
        let e = err(r#"{"identity":{"source":"header","header":"x"},"bogus":1}"#);
        assert!(e.reason.contains("bogus"), "{e}");
    }

    #[test]
    fn not_json_is_refused_not_panicking() {
        for bytes in [&b""[..], b"{", b"[]", b"null", b"\xff\xfe", b"{} trailing"] {
            assert!(Config::from_json(bytes).is_err());
        }
    }
}
