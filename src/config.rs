//! The plugin configuration: raw JSON (serde) turned into a validated [`Config`] once, in
//! `on_configure`. Every error names the field it is about, so Envoy's log says what to fix.

use std::collections::BTreeMap;
use std::fmt;

use hashbrown::HashMap;
use serde::Deserialize;

use crate::admission::{DEFAULT_RESERVATION_TTL_MS, TenantKeys, TenantPolicy};
use crate::budget::{Limit, Unit};
use crate::cost::{self, Price};
use crate::holdings;
use crate::metrics::Labels;
use crate::routing::{Alias, ModelRoute, Routing, Target, UnknownModel};
use crate::tenant::{Identity, KeyDigest, TenantSource};
use crate::window;

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
    /// Metric label values (bounded by the configuration).
    pub labels: Labels,
    /// The response cache (`None`: off).
    pub cache: Option<Cache>,
}

/// Which requests of a model the cache may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Every request (embeddings' default).
    Always,
    /// Requests that ask for deterministic output (`temperature: 0`, `top_p: 0`, `top_k: 1`).
    Deterministic,
    Never,
}

/// Per-model cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRule {
    pub policy: Option<CachePolicy>,
    pub ttl_ms: Option<u64>,
    /// Entries shared by every tenant (`"global"`) instead of one tenant's.
    pub global: bool,
}

/// The response cache configuration.
#[derive(Debug, Clone)]
pub struct Cache {
    pub table: crate::cache::CacheConfig,
    /// Chat, responses and messages (embeddings are `Always` unless a rule says otherwise).
    pub policy: CachePolicy,
    pub models: HashMap<String, CacheRule>,
    /// Hits count against budgets (their reported usage) instead of being free.
    pub charge_hits: bool,
    /// Request headers in the key: [`crate::cache::KEY_HEADERS`] plus `cache.key_headers`,
    /// lowercase, sorted, unique.
    pub key_headers: Vec<String>,
}

impl Cache {
    /// The policy, TTL and scope of `model` for `kind`.
    pub fn rule(&self, kind: crate::api::ApiKind, model: &str) -> (CachePolicy, u64, bool) {
        let rule = self.models.get(model);
        let default = if kind == crate::api::ApiKind::Embeddings {
            CachePolicy::Always
        } else {
            self.policy
        };
        (
            rule.and_then(|r| r.policy).unwrap_or(default),
            rule.and_then(|r| r.ttl_ms).unwrap_or(self.table.ttl_ms),
            rule.is_some_and(|r| r.global),
        )
    }
}

/// A declared tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub policy: TenantPolicy,
    pub keys: TenantKeys,
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
        keys
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

/// Size limits that keep every request's memory bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request bodies above this are refused with 413 before they are buffered further.
    pub max_request_body_bytes: u64,
    /// JSON response bytes kept to read usage at the end; past it only a tail window is kept.
    pub max_response_buffer_bytes: u64,
    /// Longest SSE line (or event data) kept; longer ones are dropped and flagged.
    pub max_sse_line_bytes: u64,
    /// Decoded bytes read from one compressed (gzip/deflate) response; past it decoding stops
    /// and usage falls back (a decompression bomb costs at most this much work).
    pub max_decoded_response_bytes: u64,
    /// The most tokens one response may claim per field when the request gives no tighter bound
    /// (output: the request's max tokens; input: body bytes + this); more is charged at the bound
    /// and counted as a usage anomaly.
    pub max_reported_tokens: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body_bytes: 4 * 1024 * 1024,
            max_response_buffer_bytes: 1024 * 1024,
            max_sse_line_bytes: 1024 * 1024,
            max_decoded_response_bytes: 64 * 1024 * 1024,
            max_reported_tokens: 2_000_000,
        }
    }
}

// ---- raw, as written by the operator ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: RawIdentity,
    #[serde(default)]
    tenants: BTreeMap<String, RawPolicy>,
    #[serde(default)]
    tenant_defaults: RawPolicy,
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    limits: RawLimits,
    usage_view: Option<RawUsageView>,
    routing: Option<RawRouting>,
    #[serde(default)]
    metrics: RawMetrics,
    cache: Option<RawCache>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawCachePolicy {
    Always,
    Deterministic,
    Never,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
    max_entry_bytes: Option<u64>,
    ttl_seconds: Option<u64>,
    ways: Option<u64>,
    policy: Option<RawCachePolicy>,
    #[serde(default)]
    models: BTreeMap<String, RawCacheRule>,
    #[serde(default)]
    charge_hits: bool,
    #[serde(default)]
    key_headers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheRule {
    policy: Option<RawCachePolicy>,
    ttl_seconds: Option<u64>,
    scope: Option<RawScope>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawScope {
    Tenant,
    Global,
}

fn cache_policy(raw: &RawCachePolicy) -> CachePolicy {
    match raw {
        RawCachePolicy::Always => CachePolicy::Always,
        RawCachePolicy::Deterministic => CachePolicy::Deterministic,
        RawCachePolicy::Never => CachePolicy::Never,
    }
}

fn build_cache(raw: &RawCache) -> Result<Cache, ConfigError> {
    let bounded = |field: &str, value: Option<u64>, default: u64, max: u64| match value {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(_) => Err(ConfigError::new(
            format!("cache.{field}"),
            format!("must be between 1 and {max}"),
        )),
    };
    let max_entries = bounded("max_entries", raw.max_entries, 256, 65_536)?;
    let max_bytes = bounded("max_bytes", raw.max_bytes, 4 * 1024 * 1024, 1 << 32)?;
    let max_entry_bytes = bounded(
        "max_entry_bytes",
        raw.max_entry_bytes,
        256 * 1024,
        64 * 1024 * 1024,
    )?;
    if max_entry_bytes > max_bytes {
        return Err(ConfigError::new(
            "cache.max_entry_bytes",
            "must not exceed cache.max_bytes",
        ));
    }
    let ttl = bounded("ttl_seconds", raw.ttl_seconds, 300, 30 * 86_400)?;
    let ways = bounded("ways", raw.ways, 4, 16)?;
    let mut models = HashMap::with_capacity(raw.models.len());
    for (model, rule) in &raw.models {
        let ttl_ms = match rule.ttl_seconds {
            None => None,
            Some(t) if (1..=30 * 86_400).contains(&t) => Some(t * 1000),
            Some(_) => {
                return Err(ConfigError::new(
                    format!("cache.models.{model}.ttl_seconds"),
                    "must be between 1 and 2592000",
                ));
            }
        };
        models.insert(
            model.clone(),
            CacheRule {
                policy: rule.policy.as_ref().map(cache_policy),
                ttl_ms,
                global: matches!(rule.scope, Some(RawScope::Global)),
            },
        );
    }
    if raw.key_headers.len() > MAX_EXTRA_KEY_HEADERS {
        return Err(ConfigError::new(
            "cache.key_headers",
            format!("at most {MAX_EXTRA_KEY_HEADERS} headers"),
        ));
    }
    let mut key_headers: Vec<String> = crate::cache::KEY_HEADERS
        .iter()
        .map(|h| (*h).to_string())
        .collect();
    for (i, name) in raw.key_headers.iter().enumerate() {
        let name = check_header_name(name)
            .map_err(|reason| ConfigError::new(format!("cache.key_headers[{i}]"), reason))?;
        key_headers.push(name);
    }
    key_headers.sort();
    key_headers.dedup();
    Ok(Cache {
        table: crate::cache::CacheConfig {
            max_entries: u32::try_from(max_entries).unwrap_or(u32::MAX),
            max_bytes,
            max_entry_bytes,
            ttl_ms: ttl * 1000,
            ways: u32::try_from(ways).unwrap_or(4),
        },
        policy: raw
            .policy
            .as_ref()
            .map_or(CachePolicy::Deterministic, cache_policy),
        models,
        charge_hits: raw.charge_hits,
        key_headers,
    })
}

/// Headers `cache.key_headers` may add to the built-in ones.
const MAX_EXTRA_KEY_HEADERS: usize = 16;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    max_tenant_labels: Option<u64>,
    max_model_labels: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    limits: Option<Vec<RawLimit>>,
    max_concurrent: Option<u64>,
    max_output_tokens: Option<u64>,
    default_output_tokens: Option<u64>,
    models: Option<Vec<String>>,
    clamp_min_output_tokens: Option<u64>,
    strict: Option<bool>,
    aliases: Option<BTreeMap<String, RawAlias>>,
    downgrade_at: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    header: Option<String>,
    model_header: Option<String>,
    conversation_header: Option<String>,
    models: BTreeMap<String, RawModelRoute>,
    #[serde(default)]
    aliases: BTreeMap<String, RawAlias>,
    unknown_model_route: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelRoute {
    route: String,
    upstream_model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlias {
    targets: Vec<RawTarget>,
    downgrade_to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    model: String,
    weight: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: Option<String>,
    tokens: Option<u64>,
    usd: Option<String>,
    window: String,
    model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: String,
    output: String,
    cached_input: Option<String>,
    cache_write_input: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsageView {
    path: String,
    admin_token_sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawSource {
    Header,
    ApiKey,
    Metadata,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: RawSource,
    header: Option<String>,
    metadata_path: Option<Vec<String>>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    default_tenant: Option<String>,
    #[serde(default)]
    accept_undeclared: bool,
    undeclared_slots: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    sha256: String,
    tenant: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_body_bytes: Option<u64>,
    max_response_buffer_bytes: Option<u64>,
    max_sse_line_bytes: Option<u64>,
    max_decoded_response_bytes: Option<u64>,
    max_reported_tokens: Option<u64>,
    /// How long an unsettled reservation or concurrency slot lives (its VM died).
    reservation_ttl_seconds: Option<u64>,
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
        for name in raw.tenants.keys() {
            check_tenant_name(name)
                .map_err(|reason| ConfigError::new(format!("tenants.{name}"), reason))?;
        }
        let declared = |name: &str| raw.tenants.contains_key(name);
        let id = raw.identity;
        let source = match id.source {
            RawSource::Header => {
                let header = id.header.ok_or_else(|| {
                    ConfigError::new("identity.header", "required when source is \"header\"")
                })?;
                TenantSource::Header(
                    check_header_name(&header)
                        .map_err(|r| ConfigError::new("identity.header", r))?,
                )
            }
            RawSource::Metadata => {
                let path = id.metadata_path.ok_or_else(|| {
                    ConfigError::new(
                        "identity.metadata_path",
                        "required when source is \"metadata\"",
                    )
                })?;
                if path.is_empty() || path.iter().any(String::is_empty) {
                    return Err(ConfigError::new(
                        "identity.metadata_path",
                        "must be a non-empty list of non-empty property path segments",
                    ));
                }
                TenantSource::Metadata(path)
            }
            RawSource::ApiKey => {
                if id.api_keys.is_empty() {
                    return Err(ConfigError::new(
                        "identity.api_keys",
                        "at least one key digest is required when source is \"api_key\"",
                    ));
                }
                let mut keys = HashMap::with_capacity(id.api_keys.len());
                for (i, key) in id.api_keys.iter().enumerate() {
                    let digest = KeyDigest::from_hex(&key.sha256).ok_or_else(|| {
                        ConfigError::new(
                            format!("identity.api_keys[{i}].sha256"),
                            "must be 64 hexadecimal characters (the SHA-256 of the key, never the key)",
                        )
                    })?;
                    if !declared(&key.tenant) {
                        return Err(ConfigError::new(
                            format!("identity.api_keys[{i}].tenant"),
                            format!("tenant \"{}\" is not declared under `tenants`", key.tenant),
                        ));
                    }
                    if keys.insert(digest, key.tenant.clone()).is_some() {
                        return Err(ConfigError::new(
                            format!("identity.api_keys[{i}].sha256"),
                            "the same digest is listed twice",
                        ));
                    }
                }
                TenantSource::ApiKey(keys)
            }
        };
        if let Some(default) = &id.default_tenant
            && !declared(default)
        {
            return Err(ConfigError::new(
                "identity.default_tenant",
                format!("tenant \"{default}\" is not declared under `tenants`"),
            ));
        }
        if id.accept_undeclared && matches!(source, TenantSource::ApiKey(_)) {
            return Err(ConfigError::new(
                "identity.accept_undeclared",
                "only applies to the \"header\" and \"metadata\" sources",
            ));
        }
        let identity = Identity {
            source,
            tenants: raw.tenants.keys().cloned().collect(),
            default_tenant: id.default_tenant,
            accept_undeclared: id.accept_undeclared,
        };

        let defaults = Limits::default();
        let limits = Limits {
            max_request_body_bytes: positive(
                "limits.max_request_body_bytes",
                raw.limits.max_request_body_bytes,
                defaults.max_request_body_bytes,
            )?,
            max_response_buffer_bytes: positive(
                "limits.max_response_buffer_bytes",
                raw.limits.max_response_buffer_bytes,
                defaults.max_response_buffer_bytes,
            )?,
            max_sse_line_bytes: positive(
                "limits.max_sse_line_bytes",
                raw.limits.max_sse_line_bytes,
                defaults.max_sse_line_bytes,
            )?,
            max_decoded_response_bytes: positive(
                "limits.max_decoded_response_bytes",
                raw.limits.max_decoded_response_bytes,
                defaults.max_decoded_response_bytes,
            )?,
            max_reported_tokens: match raw.limits.max_reported_tokens {
                None => defaults.max_reported_tokens,
                Some(v) if (1..=u64::from(u32::MAX)).contains(&v) => v,
                Some(_) => {
                    return Err(ConfigError::new(
                        "limits.max_reported_tokens",
                        "must be between 1 and 4294967295",
                    ));
                }
            },
        };
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

        let routing = raw.routing.as_ref().map(build_routing).transpose()?;
        let models = routing.as_ref().map(|r| &r.models);
        let reservation_ttl_ms = match raw.limits.reservation_ttl_seconds {
            None => DEFAULT_RESERVATION_TTL_MS,
            Some(s) if (7..=86_400).contains(&s) => s * 1000,
            Some(_) => {
                return Err(ConfigError::new(
                    "limits.reservation_ttl_seconds",
                    "must be between 7 and 86400 (keep it above the route timeout)",
                ));
            }
        };
        let base = TenantPolicy {
            reservation_epoch_ms: holdings::epoch_ms_for_ttl(reservation_ttl_ms),
            ..TenantPolicy::default()
        };
        let defaults = policy("tenant_defaults", &raw.tenant_defaults, &base, models)?;
        let mut tenants = HashMap::with_capacity(raw.tenants.len());
        for (name, own) in &raw.tenants {
            let policy = policy(&format!("tenants.{name}"), own, &defaults, models)?;
            let keys = TenantKeys::new(name, &policy);
            tenants.insert(name.clone(), Tenant { policy, keys });
        }
        let undeclared_slots = match id.undeclared_slots {
            None => 1024,
            Some(n) if (1..=65536).contains(&n) => n,
            Some(_) => {
                return Err(ConfigError::new(
                    "identity.undeclared_slots",
                    "must be between 1 and 65536",
                ));
            }
        };
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
        let labels = Labels::new(
            tenants.keys(),
            model_names.into_iter(),
            max_tenants,
            max_models,
        );
        let cache = raw.cache.as_ref().map(build_cache).transpose()?;
        Ok(Config {
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
        })
    }
}

fn build_routing(raw: &RawRouting) -> Result<Routing, ConfigError> {
    let header_field = |name: &str, value: &Option<String>, default: &str| match value {
        None => Ok(default.to_string()),
        Some(h) => check_header_name(h).map_err(|r| ConfigError::new(format!("routing.{name}"), r)),
    };
    if raw.models.is_empty() {
        return Err(ConfigError::new(
            "routing.models",
            "name at least one model",
        ));
    }
    let mut models = HashMap::with_capacity(raw.models.len());
    for (name, m) in &raw.models {
        if m.route.is_empty() {
            return Err(ConfigError::new(
                format!("routing.models.{name}.route"),
                "must not be empty",
            ));
        }
        models.insert(
            name.clone(),
            ModelRoute {
                route: m.route.clone(),
                upstream_model: m.upstream_model.clone().unwrap_or_else(|| name.clone()),
            },
        );
    }
    let aliases = aliases("routing.aliases", &raw.aliases, &models)?;
    Ok(Routing {
        header: header_field("header", &raw.header, "x-tollgate-route")?,
        model_header: header_field("model_header", &raw.model_header, "x-tollgate-model")?,
        conversation_header: raw
            .conversation_header
            .as_ref()
            .map(|h| {
                check_header_name(h).map_err(|r| ConfigError::new("routing.conversation_header", r))
            })
            .transpose()?,
        models,
        aliases,
        unknown: match &raw.unknown_model_route {
            None => UnknownModel::Reject,
            Some(route) if route.is_empty() => {
                return Err(ConfigError::new(
                    "routing.unknown_model_route",
                    "must not be empty",
                ));
            }
            Some(route) => UnknownModel::Route(route.clone()),
        },
    })
}

fn aliases(
    at: &str,
    raw: &BTreeMap<String, RawAlias>,
    models: &HashMap<String, ModelRoute>,
) -> Result<HashMap<String, Alias>, ConfigError> {
    let mut out = HashMap::with_capacity(raw.len());
    for (name, a) in raw {
        let at = format!("{at}.{name}");
        if models.contains_key(name) {
            return Err(ConfigError::new(
                at,
                "an alias cannot have the name of a model",
            ));
        }
        if a.targets.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.targets"),
                "name at least one target",
            ));
        }
        let known = |field: String, model: &str| {
            if models.contains_key(model) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("\"{model}\" is not a model of routing.models"),
                ))
            }
        };
        let mut targets = Vec::with_capacity(a.targets.len());
        for (i, t) in a.targets.iter().enumerate() {
            known(format!("{at}.targets[{i}].model"), &t.model)?;
            let weight = t.weight.unwrap_or(1);
            if weight == 0 || weight > 1_000_000 {
                return Err(ConfigError::new(
                    format!("{at}.targets[{i}].weight"),
                    "must be between 1 and 1000000",
                ));
            }
            targets.push(Target {
                model: t.model.clone(),
                weight,
            });
        }
        if let Some(cheaper) = &a.downgrade_to {
            known(format!("{at}.downgrade_to"), cheaper)?;
        }
        out.insert(
            name.clone(),
            Alias {
                targets,
                downgrade_to: a.downgrade_to.clone(),
            },
        );
    }
    Ok(out)
}

/// A tenant's policy: its own fields over `base` (a list such as `limits` replaces the base's).
fn policy(
    at: &str,
    raw: &RawPolicy,
    base: &TenantPolicy,
    models: Option<&HashMap<String, ModelRoute>>,
) -> Result<TenantPolicy, ConfigError> {
    let field = |name: &str| format!("{at}.{name}");
    let mut out = base.clone();
    if let Some(own) = &raw.aliases {
        let Some(models) = models else {
            return Err(ConfigError::new(
                field("aliases"),
                "needs a `routing` section",
            ));
        };
        out.aliases = aliases(&field("aliases"), own, models)?;
    }
    if let Some(at) = raw.downgrade_at {
        if !(at > 0.0 && at <= 1.0) {
            return Err(ConfigError::new(
                field("downgrade_at"),
                "must be a fraction in (0, 1], e.g. 0.8",
            ));
        }
        // Thousandths: integer comparisons on the request path.
        out.downgrade_at_permille = Some((at * 1000.0).round() as u64);
    }
    if let Some(limits) = &raw.limits {
        out.limits = Vec::with_capacity(limits.len());
        for (i, l) in limits.iter().enumerate() {
            let at = field(&format!("limits[{i}]"));
            let limit = limit(&at, l)?;
            if out.limits.iter().any(|o| o.name == limit.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "two limits are named \"{}\"; give each a distinct name",
                        limit.name
                    ),
                ));
            }
            out.limits.push(limit);
        }
    }
    let positive = |name: &str, v: Option<u64>| match v {
        Some(0) => Err(ConfigError::new(field(name), "must be greater than 0")),
        v => Ok(v),
    };
    if let Some(n) = positive("max_concurrent", raw.max_concurrent)? {
        out.max_concurrent = Some(n);
    }
    if let Some(n) = positive("max_output_tokens", raw.max_output_tokens)? {
        out.max_output_tokens = Some(n);
    }
    if let Some(n) = positive("default_output_tokens", raw.default_output_tokens)? {
        out.default_output_tokens = n;
    }
    if let Some(n) = positive("clamp_min_output_tokens", raw.clamp_min_output_tokens)? {
        out.clamp_min_output_tokens = Some(n);
    }
    if let Some(models) = &raw.models {
        if models.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                field("models"),
                "model names must not be empty",
            ));
        }
        out.models = Some(models.iter().cloned().collect());
    }
    if let Some(strict) = raw.strict {
        out.strict = strict;
    }
    Ok(out)
}

fn limit(at: &str, raw: &RawLimit) -> Result<Limit, ConfigError> {
    let window =
        window::parse(&raw.window).map_err(|r| ConfigError::new(format!("{at}.window"), r))?;
    let (unit, amount) = match (raw.tokens, &raw.usd) {
        (Some(0), None) => {
            return Err(ConfigError::new(
                format!("{at}.tokens"),
                "must be greater than 0",
            ));
        }
        (Some(tokens), None) => (Unit::Tokens, tokens),
        (None, Some(usd)) => (
            Unit::PicoUsd,
            cost::parse_usd(usd).map_err(|r| ConfigError::new(format!("{at}.usd"), r))?,
        ),
        _ => {
            return Err(ConfigError::new(
                at,
                "give exactly one of `tokens` (a count) or `usd` (a decimal string such as \"25.00\")",
            ));
        }
    };
    let unit_name = match unit {
        Unit::Tokens => "tokens",
        Unit::PicoUsd => "usd",
    };
    let name = match &raw.name {
        Some(n)
            if !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            n.clone()
        }
        Some(_) => {
            return Err(ConfigError::new(
                format!("{at}.name"),
                "names are [A-Za-z0-9._-]+",
            ));
        }
        None => match &raw.model {
            Some(model) => format!("{unit_name}-{}-{model}", window.as_str()),
            None => format!("{unit_name}-{}", window.as_str()),
        },
    };
    Ok(Limit {
        name,
        unit,
        amount,
        window,
        model: raw.model.clone(),
    })
}

fn positive(field: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(v) if v > u64::from(u32::MAX) => Err(ConfigError::new(field, "must be below 4 GiB")),
        Some(v) => Ok(v),
    }
}

/// Tenant names end up in metric names, access logs and shared-data keys: keep them plain.
fn check_tenant_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("tenant names are 1-64 characters of [A-Za-z0-9._-]".to_string())
    }
}

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

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn err(json: &str) -> ConfigError {
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
    fn reservation_ttl_sets_every_policys_epoch() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"x-t"},"tenants":{"a":{}},"limits":{"reservation_ttl_seconds":70}}"#,
        )
        .unwrap();
        let epoch = cfg.tenants.get("a").map(|t| t.policy.reservation_epoch_ms);
        assert_eq!(epoch, Some(10_000));
        assert_eq!(cfg.undeclared_policy.reservation_epoch_ms, 10_000);
        let e = err(
            r#"{"identity":{"source":"header","header":"x-t"},"limits":{"reservation_ttl_seconds":6}}"#,
        );
        assert_eq!(e.field, "limits.reservation_ttl_seconds");
    }

    #[test]
    fn api_key_config() {
        let json = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{DIGEST}","tenant":"a"}}]}},"tenants":{{"a":{{}}}}}}"#
        );
        let cfg = Config::from_json(json.as_bytes()).unwrap();
        assert!(matches!(cfg.identity.source, TenantSource::ApiKey(ref k) if k.len() == 1));
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
    fn undeclared_tenants_are_refused() {
        let json = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{DIGEST}","tenant":"ghost"}}]}}}}"#
        );
        assert_eq!(err(&json).field, "identity.api_keys[0].tenant");
        let e = err(r#"{"identity":{"source":"header","header":"x","default_tenant":"nobody"}}"#);
        assert_eq!(e.field, "identity.default_tenant");
        assert_eq!(
            err(r#"{"identity":{"source":"header","header":"x"},"tenants":{"a b":{}}}"#).field,
            "tenants.a b"
        );
    }

    #[test]
    fn cache_key_headers_add_to_the_built_in_ones() {
        let base = r#"{"identity":{"source":"header","header":"x"},"cache":"#;
        let cfg = |cache: &str| Config::from_json(format!("{base}{cache}}}").as_bytes());
        let default = cfg("{}").unwrap().cache.unwrap().key_headers;
        assert_eq!(default, crate::cache::KEY_HEADERS);
        let extra = cfg(r#"{"key_headers":["X-Variant","openai-beta","x-variant"]}"#)
            .unwrap()
            .cache
            .unwrap()
            .key_headers;
        let mut want: Vec<&str> = crate::cache::KEY_HEADERS.to_vec();
        want.push("x-variant");
        want.sort_unstable();
        assert_eq!(extra, want);
        for bad in [r#"[""]"#, r#"[":path"]"#, r#"["a b"]"#, r#"[7]"#] {
            let e = cfg(&format!(r#"{{"key_headers":{bad}}}"#)).expect_err(bad);
            assert!(e.field.starts_with("cache.key_headers"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("\"x-{i}\"")).collect();
        let e = cfg(&format!(r#"{{"key_headers":[{}]}}"#, many.join(","))).unwrap_err();
        assert_eq!(e.field, "cache.key_headers");
    }

    #[test]
    fn not_json_is_refused_not_panicking() {
        for bytes in [&b""[..], b"{", b"[]", b"null", b"\xff\xfe", b"{} trailing"] {
            assert!(Config::from_json(bytes).is_err());
        }
    }

    #[test]
    fn response_limits_are_read_and_checked() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"x"},"limits":{"max_decoded_response_bytes":1000,"max_reported_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(cfg.limits.max_decoded_response_bytes, 1000);
        assert_eq!(cfg.limits.max_reported_tokens, 5);
        for bad in [
            r#""max_reported_tokens":0"#,
            r#""max_reported_tokens":4294967296"#,
        ] {
            let e = err(&format!(
                r#"{{"identity":{{"source":"header","header":"x"}},"limits":{{{bad}}}}}"#
            ));
            assert_eq!(e.field, "limits.max_reported_tokens");
        }
        let e = err(
            r#"{"identity":{"source":"header","header":"x"},"limits":{"max_decoded_response_bytes":0}}"#,
        );
        assert_eq!(e.field, "limits.max_decoded_response_bytes");
    }
}
