//! Tenants' configuration: declared tenant names, and each tenant's policy (`tenant_defaults`
//! under its own fields: limits, concurrency, output tokens, models, aliases, downgrade).

use std::collections::BTreeMap;

use hashbrown::HashMap;

use crate::admission::{TenantKeys, TenantPolicy};
use crate::budget::{GlobalLimit, Limit, Unit};
use crate::cost;
use crate::holdings;
use crate::routing::ModelRoute;
use crate::window;

use super::ConfigError;
use super::raw::{RawLimit, RawPolicy};
use super::routing::aliases;

/// A declared tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub policy: TenantPolicy,
    pub keys: TenantKeys,
}

/// Refuses a tenant name that is not plain (see [`check_tenant_name`]).
pub(super) fn check_tenant_names(tenants: &BTreeMap<String, RawPolicy>) -> Result<(), ConfigError> {
    for name in tenants.keys() {
        check_tenant_name(name)
            .map_err(|reason| ConfigError::new(format!("tenants.{name}"), reason))?;
    }
    Ok(())
}

/// The policy of undeclared tenants (`tenant_defaults`) and every declared tenant's, each with
/// the reservation epoch `reservation_ttl_ms` implies.
pub(super) fn build_tenants(
    raw_defaults: &RawPolicy,
    raw_tenants: &BTreeMap<String, RawPolicy>,
    reservation_ttl_ms: u64,
    models: Option<&HashMap<String, ModelRoute>>,
) -> Result<(TenantPolicy, HashMap<String, Tenant>), ConfigError> {
    let base = TenantPolicy {
        reservation_epoch_ms: holdings::epoch_ms_for_ttl(reservation_ttl_ms),
        ..TenantPolicy::default()
    };
    let own_defaults = policy("tenant_defaults", raw_defaults, &base, models)?;
    // Each tenant's own policy first: an ancestor contributes its own limits, not its own
    // ancestors' twice.
    let mut own = BTreeMap::new();
    for (name, raw) in raw_tenants {
        let policy = policy(&format!("tenants.{name}"), raw, &own_defaults, models)?;
        own.insert(name.as_str(), policy);
    }
    let mut tenants = HashMap::with_capacity(raw_tenants.len());
    for (name, raw) in raw_tenants {
        let at = format!("tenants.{name}.parent");
        let ancestors = ancestors(&at, Some(name), raw.parent.as_deref(), raw_tenants)?;
        let Some(policy) = own.get(name.as_str()) else {
            continue;
        };
        let policy = under(policy.clone(), &ancestors, &own);
        let keys = TenantKeys::new(name, &policy);
        tenants.insert(name.clone(), Tenant { policy, keys });
    }
    // Undeclared tenants may have a parent too (`tenant_defaults.parent`); declared tenants
    // name their own.
    let ancestors = ancestors(
        "tenant_defaults.parent",
        None,
        raw_defaults.parent.as_deref(),
        raw_tenants,
    )?;
    let defaults = under(own_defaults, &ancestors, &own);
    Ok((defaults, tenants))
}

/// A budget tree has at most this many levels (a tenant and three ancestors: key → team →
/// department → organisation).
pub const MAX_TREE_LEVELS: usize = 4;

/// The ancestors of `tenant` (`None`: the undeclared tenants), nearest first, from `parent`:
/// each a declared tenant, no cycle, at most [`MAX_TREE_LEVELS`] levels.
fn ancestors(
    at: &str,
    tenant: Option<&String>,
    parent: Option<&str>,
    raw_tenants: &BTreeMap<String, RawPolicy>,
) -> Result<Vec<String>, ConfigError> {
    let mut chain: Vec<String> = Vec::new();
    let mut next = parent;
    while let Some(name) = next {
        let Some(raw) = raw_tenants.get(name) else {
            return Err(ConfigError::new(
                at,
                format!("\"{name}\" is not a declared tenant (a parent must be one of `tenants`)"),
            ));
        };
        if tenant.is_some_and(|t| t == name) || chain.iter().any(|c| c == name) {
            return Err(ConfigError::new(
                at,
                format!("parents form a cycle through \"{name}\""),
            ));
        }
        chain.push(name.to_string());
        if chain.len() >= MAX_TREE_LEVELS {
            return Err(ConfigError::new(
                at,
                format!(
                    "the budget tree is deeper than {MAX_TREE_LEVELS} levels (a tenant and at most {} ancestors)",
                    MAX_TREE_LEVELS - 1
                ),
            ));
        }
        next = raw.parent.as_deref();
    }
    Ok(chain)
}

/// `policy` under its ancestors: their own limits join its own (each owned by its ancestor, so
/// in the ancestor's bucket), and strict mode holds if any level asks for it.
fn under(
    mut policy: TenantPolicy,
    ancestors: &[String],
    own: &BTreeMap<&str, TenantPolicy>,
) -> TenantPolicy {
    for name in ancestors {
        let Some(above) = own.get(name.as_str()) else {
            continue;
        };
        policy.strict |= above.strict;
        policy.limits.extend(above.limits.iter().map(|l| Limit {
            owner: Some(name.clone()),
            ..l.clone()
        }));
    }
    policy.ancestors = ancestors.to_vec();
    policy
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
        // The base's user limits stay unless `user_limits` replaces them too.
        let per_user: Vec<Limit> = out.limits.iter().filter(|l| l.per_user).cloned().collect();
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
        for limit in per_user {
            if out.limits.iter().all(|o| o.name != limit.name) {
                out.limits.push(limit);
            }
        }
    }
    if let Some(limits) = &raw.user_limits {
        // A tenant's own list replaces the base's user limits (kept after its limits).
        out.limits.retain(|l| !l.per_user);
        for (i, l) in limits.iter().enumerate() {
            let at = field(&format!("user_limits[{i}]"));
            let mut limit = limit(&at, l)?;
            if out.limits.iter().any(|o| o.name == limit.name) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "a limit is already named \"{}\"; give each a distinct name",
                        limit.name
                    ),
                ));
            }
            if !limit.alert_at.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.alert_at"),
                    "per-user limits have no alerts (one per user would flood them)",
                ));
            }
            limit.per_user = true;
            out.limits.push(limit);
        }
    }
    if let Some(c) = &raw.conversation_limits {
        let at = |name: &str| field(&format!("conversation_limits.{name}"));
        let positive = |name: &str, v: Option<u64>| match v {
            Some(0) => Err(ConfigError::new(at(name), "must be greater than 0")),
            v => Ok(v),
        };
        let pico_usd = match &c.usd {
            Some(usd) => Some(cost::parse_usd(usd).map_err(|r| ConfigError::new(at("usd"), r))?),
            None => None,
        };
        if pico_usd == Some(0) {
            return Err(ConfigError::new(at("usd"), "must be greater than 0"));
        }
        out.conversation = Some(crate::conversation::ConversationLimits {
            max_requests: positive("max_requests", c.max_requests)?,
            tokens: positive("tokens", c.tokens)?,
            pico_usd,
            max_age_ms: positive("max_age_seconds", c.max_age_seconds)?
                .map(|s| s.saturating_mul(1000)),
        });
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
    if let Some(n) = positive("max_choices", raw.max_choices)? {
        out.max_choices = Some(n);
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
    let unit_name = unit.as_str();
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
    let mut alert_at: Vec<u16> = Vec::new();
    for (i, &fraction) in raw.alert_at.iter().flatten().enumerate() {
        let at = format!("{at}.alert_at[{i}]");
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(ConfigError::new(
                at,
                "must be a fraction in (0, 1], e.g. 0.8",
            ));
        }
        // Thousandths: integer comparisons on the request path.
        let permille = (fraction * 1000.0).round() as u16;
        if alert_at.last().is_some_and(|&last| permille <= last) {
            return Err(ConfigError::new(at, "thresholds are in ascending order"));
        }
        alert_at.push(permille.max(1));
    }
    if alert_at.len() > crate::alerts::MAX_THRESHOLDS {
        return Err(ConfigError::new(
            format!("{at}.alert_at"),
            format!("at most {} thresholds", crate::alerts::MAX_THRESHOLDS),
        ));
    }
    let shadow = match raw.mode.as_deref() {
        None | Some("enforce") => false,
        Some("shadow") if raw.global => {
            return Err(ConfigError::new(
                format!("{at}.mode"),
                "a global limit cannot be a shadow (roll it out as a local shadow limit first)",
            ));
        }
        Some("shadow") => true,
        Some(_) => {
            return Err(ConfigError::new(
                format!("{at}.mode"),
                "must be \"enforce\" or \"shadow\"",
            ));
        }
    };
    let fallback = match (&raw.fallback, unit) {
        (None, _) => None,
        (Some(_), _) if !raw.global => {
            return Err(ConfigError::new(
                format!("{at}.fallback"),
                "only a `global` limit has a fallback allowance",
            ));
        }
        (Some(serde_json::Value::Number(n)), Unit::Tokens) => {
            Some(n.as_u64().ok_or_else(|| {
                ConfigError::new(format!("{at}.fallback"), "must be a whole number of tokens")
            })?)
        }
        (Some(serde_json::Value::String(usd)), Unit::PicoUsd) => {
            Some(cost::parse_usd(usd).map_err(|r| ConfigError::new(format!("{at}.fallback"), r))?)
        }
        (Some(_), Unit::Tokens) => {
            return Err(ConfigError::new(
                format!("{at}.fallback"),
                "a tokens limit's fallback is a number of tokens",
            ));
        }
        (Some(_), Unit::PicoUsd) => {
            return Err(ConfigError::new(
                format!("{at}.fallback"),
                "a USD limit's fallback is a decimal string such as \"1.00\"",
            ));
        }
    };
    Ok(Limit {
        name,
        unit,
        amount,
        window,
        model: raw.model.clone(),
        global: raw.global.then_some(GlobalLimit { fallback }),
        owner: None,
        shadow,
        per_user: false,
        alert_at,
    })
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;

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
}

#[cfg(test)]
mod tree_tests {
    use crate::config::Config;
    use crate::config::tests::err;

    fn config(tenants: &str) -> String {
        format!(r#"{{"identity":{{"source":"header","header":"x-t"}},"tenants":{tenants}}}"#)
    }

    #[test]
    fn a_tenant_carries_every_ancestors_limits_in_the_ancestors_buckets() {
        let cfg = Config::from_json(
            config(
                r#"{"org":{"limits":[{"name":"usd","usd":"100","window":"month"}],"strict":true},
                    "team":{"parent":"org","limits":[{"name":"tpd","tokens":1000,"window":"day"}]},
                    "key":{"parent":"team","limits":[{"name":"tpm","tokens":100,"window":"minute"}]}}"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let key = cfg.tenants.get("key").unwrap();
        let names: Vec<(&str, Option<&str>)> = key
            .policy
            .limits
            .iter()
            .map(|l| (l.name.as_str(), l.owner.as_deref()))
            .collect();
        assert_eq!(
            names,
            [("tpm", None), ("tpd", Some("team")), ("usd", Some("org"))]
        );
        let records = |keys: &crate::keys::TenantKeys| -> Vec<String> {
            keys.buckets.iter().map(|at| at.record.clone()).collect()
        };
        assert_eq!(records(&key.keys), ["tg:r3:key", "tg:r3:team", "tg:r3:org"]);
        assert_eq!(key.policy.ancestors, ["team", "org"]);
        // Strict mode at any level holds for every tenant under it.
        assert!(key.policy.strict);
        let org = cfg.tenants.get("org").unwrap();
        assert!(org.policy.ancestors.is_empty());
        assert_eq!(records(&org.keys), ["tg:r3:org"]);
        assert_eq!(org.keys.buckets[0].id, key.keys.buckets[2].id);
        // Each bucket is one key, however many tenants share it.
        let keys = cfg.shared_keys();
        let mut unique = keys.clone();
        unique.dedup();
        assert_eq!(keys, unique);
        assert_eq!(keys.iter().filter(|k| *k == "tg:r3:org").count(), 1);
    }

    #[test]
    fn unknown_parents_cycles_and_deep_trees_are_refused_naming_the_field() {
        let e = err(&config(r#"{"a":{"parent":"nobody"}}"#));
        assert_eq!(e.field, "tenants.a.parent");
        assert!(e.reason.contains("not a declared tenant"), "{}", e.reason);
        let e = err(&config(r#"{"a":{"parent":"a"}}"#));
        assert_eq!(e.field, "tenants.a.parent");
        assert!(e.reason.contains("cycle"), "{}", e.reason);
        let e = err(&config(
            r#"{"a":{"parent":"b"},"b":{"parent":"c"},"c":{"parent":"b"}}"#,
        ));
        assert_eq!(e.field, "tenants.a.parent");
        assert!(e.reason.contains("cycle"), "{}", e.reason);
        // Four levels are fine, five are not.
        let four = r#"{"l1":{"parent":"l2"},"l2":{"parent":"l3"},"l3":{"parent":"l4"},"l4":{}}"#;
        assert!(Config::from_json(config(four).as_bytes()).is_ok());
        let five = r#"{"l1":{"parent":"l2"},"l2":{"parent":"l3"},"l3":{"parent":"l4"},"l4":{"parent":"l5"},"l5":{}}"#;
        let e = err(&config(five));
        assert_eq!(e.field, "tenants.l1.parent");
        assert!(e.reason.contains("deeper than 4"), "{}", e.reason);
        let e = err(
            r#"{"identity":{"source":"header","header":"x-t"},"tenant_defaults":{"parent":"x"}}"#,
        );
        assert_eq!(e.field, "tenant_defaults.parent");
    }

    #[test]
    fn undeclared_tenants_may_share_a_parent() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"x-t","accept_undeclared":true},
                 "tenant_defaults":{"parent":"public","limits":[{"name":"tpm","tokens":10,"window":"minute"}]},
                 "tenants":{"public":{"limits":[{"name":"tpd","tokens":1000,"window":"day"}]}}}"#,
        )
        .unwrap();
        let keys = cfg.undeclared_keys("someone");
        assert_eq!(keys.buckets.len(), 2);
        assert!(keys.buckets[0].record.starts_with("tg:r3:~"));
        assert_eq!(keys.buckets[1].record, "tg:r3:public");
        // The parent does not inherit the defaults' parent (nor is it its own parent).
        assert!(
            cfg.tenants
                .get("public")
                .unwrap()
                .policy
                .ancestors
                .is_empty()
        );
    }
}
