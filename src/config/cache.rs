//! The response cache's configuration: the `cache` section (sizes, TTLs, per-model rules, key
//! headers) validated into [`Cache`], and the rule lookup the request path asks.

use hashbrown::HashMap;

use super::raw::{RawCache, RawCachePolicy, RawScope};
use super::{ConfigError, check_header_name};

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
        let default = if kind.generates_nothing() {
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

fn cache_policy(raw: &RawCachePolicy) -> CachePolicy {
    match raw {
        RawCachePolicy::Always => CachePolicy::Always,
        RawCachePolicy::Deterministic => CachePolicy::Deterministic,
        RawCachePolicy::Never => CachePolicy::Never,
    }
}

pub(super) fn build_cache(raw: &RawCache) -> Result<Cache, ConfigError> {
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
    let max_entries_per_scope = bounded(
        "max_entries_per_scope",
        raw.max_entries_per_scope,
        max_entries,
        max_entries,
    )?;
    let max_bytes_per_scope = bounded(
        "max_bytes_per_scope",
        raw.max_bytes_per_scope,
        max_bytes,
        max_bytes,
    )?;
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
            max_entries_per_scope: u32::try_from(max_entries_per_scope).unwrap_or(u32::MAX),
            max_bytes_per_scope,
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

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
    fn per_scope_caps_default_to_the_table_and_stay_within_it() {
        let base = r#"{"identity":{"source":"header","header":"x"},"cache":"#;
        let cfg = |cache: &str| Config::from_json(format!("{base}{cache}}}").as_bytes());
        let caps = |cache: &str| {
            let table = cfg(cache).unwrap().cache.unwrap().table;
            (table.max_entries_per_scope, table.max_bytes_per_scope)
        };
        assert_eq!(
            caps(r#"{"max_entries":32,"max_bytes":300000}"#),
            (32, 300000)
        );
        let set = r#"{"max_entries_per_scope":8,"max_bytes_per_scope":1024}"#;
        assert_eq!(caps(set), (8, 1024));
        for (bad, field) in [
            (
                r#"{"max_entries_per_scope":0}"#,
                "cache.max_entries_per_scope",
            ),
            (
                r#"{"max_entries":8,"max_entries_per_scope":9}"#,
                "cache.max_entries_per_scope",
            ),
            (
                r#"{"max_bytes":4096,"max_entry_bytes":4096,"max_bytes_per_scope":4097}"#,
                "cache.max_bytes_per_scope",
            ),
            (r#"{"max_bytes_per_scope":-1}"#, "cache.max_bytes_per_scope"),
        ] {
            assert_eq!(cfg(bad).expect_err(bad).field, field, "{bad}");
        }
    }
}
