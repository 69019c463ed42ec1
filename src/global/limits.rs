//! The rate-limit service's limits, written from the plugin configuration (its one source of
//! truth): Limitador's limits file and envoyproxy/ratelimit's configuration, one counter per
//! (policy, global limit), each budget scope and window counted apart. `tollgate-limits`
//! (`src/bin/`) prints them; the e2e suite serves what it writes.

use std::fmt::Write as _;

use crate::budget::{Limit, Unit};
use crate::config::Config;
use crate::window::Window;

use super::hit_size;

/// Every global limit: (policy, limit), the policy being a declared tenant, or `~` for the
/// undeclared tenants' policy (with `identity.accept_undeclared`). Sorted by tenant.
fn global_limits(config: &Config) -> Vec<(&str, &Limit)> {
    let mut tenants: Vec<(&String, _)> = config.tenants.iter().collect();
    tenants.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<(&str, &Limit)> = tenants
        .into_iter()
        .flat_map(|(name, t)| t.policy.limits.iter().map(move |l| (name.as_str(), l)))
        .collect();
    if config.identity.accept_undeclared {
        out.extend(config.undeclared_policy.limits.iter().map(|l| ("~", l)));
    }
    // An ancestor's limit is listed once, under the ancestor.
    out.retain(|(_, l)| l.global.is_some() && l.owner.is_none());
    out
}

/// The limit's amount in the service's hits (tokens, or whole micro-dollars, rounded down).
fn hits(limit: &Limit) -> u64 {
    limit.amount / hit_size(limit.unit)
}

/// Limitador's limits file (YAML, `limitador-server --limits-file`): one limit per (policy,
/// global limit) in the RLS domain's namespace, its counter per budget scope and window.
pub fn limitador(config: &Config) -> String {
    let domain = config
        .global
        .as_ref()
        .map_or("tollgate", |g| g.domain.as_str());
    let mut out = String::from(
        "# Limitador limits for Tollgate's global budgets, written by tollgate-limits from the\n\
         # plugin configuration: do not edit, regenerate.\n---\n",
    );
    for (policy, limit) in global_limits(config) {
        let unit = match limit.unit {
            Unit::Tokens => "tokens",
            Unit::PicoUsd => "micro-USD",
        };
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            "- namespace: {domain}\n  name: \"{policy}/{name}\"\n  # {unit} per {window}\n  \
             max_value: {max}\n  seconds: {seconds}\n  conditions:\n  \
             - \"descriptors[0]['tollgate.policy'] == '{policy}'\"\n  \
             - \"descriptors[0]['tollgate.limit'] == '{name}'\"\n  variables:\n  \
             - \"descriptors[0]['tollgate.scope']\"\n  \
             - \"descriptors[0]['tollgate.window']\"\n",
            name = limit.name,
            window = limit.window.as_str(),
            max = hits(limit),
            seconds = limit.window.max_seconds(),
        );
    }
    out
}

/// envoyproxy/ratelimit's unit for a window: the shortest unit at least as long (its units
/// are aligned to the epoch; MONTH is 30 days, so a calendar month takes YEAR).
fn ratelimit_unit(window: Window) -> &'static str {
    match window.max_seconds() {
        0..=1 => "second",
        2..=60 => "minute",
        61..=3_600 => "hour",
        3_601..=86_400 => "day",
        86_401..=604_800 => "week",
        604_801..=2_592_000 => "month",
        _ => "year",
    }
}

/// envoyproxy/ratelimit's configuration (YAML, one file per domain): nested descriptors
/// policy → limit → scope → window. `Err` names a limit above its `uint32` requests_per_unit.
pub fn ratelimit(config: &Config) -> Result<String, String> {
    let domain = config
        .global
        .as_ref()
        .map_or("tollgate", |g| g.domain.as_str());
    let mut out = format!(
        "# envoyproxy/ratelimit configuration for Tollgate's global budgets, written by\n\
         # tollgate-limits from the plugin configuration: do not edit, regenerate.\n\
         domain: {domain}\ndescriptors:\n"
    );
    let limits = global_limits(config);
    let mut policies: Vec<&str> = limits.iter().map(|(p, _)| *p).collect();
    policies.dedup();
    for policy in policies {
        let _ = write!(
            out,
            "  - key: tollgate.policy\n    value: \"{policy}\"\n    descriptors:\n"
        );
        for (_, limit) in limits.iter().filter(|(p, _)| *p == policy) {
            let per_unit = u32::try_from(hits(limit)).map_err(|_| {
                format!(
                    "{policy}/{}: {} is more than envoyproxy/ratelimit's requests_per_unit \
                     (a uint32) can hold",
                    limit.name,
                    hits(limit)
                )
            })?;
            let _ = write!(
                out,
                "      - key: tollgate.limit\n        value: \"{name}\"\n        descriptors:\n\
                 \x20         - key: tollgate.scope\n            descriptors:\n\
                 \x20             - key: tollgate.window\n                rate_limit:\n\
                 \x20                 unit: {unit}\n                  requests_per_unit: {per_unit}\n",
                name = limit.name,
                unit = ratelimit_unit(limit.window),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    const TWO: &str = r#"{"identity": {"source": "header", "header": "x-t", "accept_undeclared": true},
        "global_budgets": {"cluster": "ratelimit", "domain": "tg"},
        "tenants": {"b": {}, "a": {"limits": [
            {"name": "tpm", "tokens": 5000, "window": "minute", "global": true},
            {"name": "local", "tokens": 5, "window": "minute"},
            {"name": "usd-month", "usd": "25.50", "window": "month", "global": true}]}},
        "tenant_defaults": {"limits": [{"tokens": 100, "window": "hour", "global": true}]}}"#;

    #[test]
    fn limitador_limits_name_every_global_limit() {
        let text = limitador(&config(TWO));
        let expected = "\
- namespace: tg
  name: \"a/tpm\"
  # tokens per minute
  max_value: 5000
  seconds: 60
  conditions:
  - \"descriptors[0]['tollgate.policy'] == 'a'\"
  - \"descriptors[0]['tollgate.limit'] == 'tpm'\"
  variables:
  - \"descriptors[0]['tollgate.scope']\"
  - \"descriptors[0]['tollgate.window']\"
";
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("name: \"a/usd-month\"\n  # micro-USD per month\n  max_value: 25500000\n  seconds: 2678400"));
        assert!(text.contains("name: \"b/tokens-hour\""));
        assert!(text.contains("name: \"~/tokens-hour\""));
        assert!(!text.contains("local"));
        let order: Vec<usize> = ["\"a/tpm\"", "\"a/usd-month\"", "\"b/", "\"~/"]
            .iter()
            .map(|n| text.find(n).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]));
    }

    /// The shipped examples are what the generator writes (`make limits-examples` rewrites
    /// them).
    #[test]
    fn the_shipped_examples_do_not_drift() {
        let config =
            Config::from_json(include_bytes!("../../examples/global/plugin.json")).unwrap();
        let stale = "examples/global is stale: run `make limits-examples`";
        assert_eq!(
            limitador(&config),
            include_str!("../../examples/global/limitador-limits.yaml"),
            "{stale}"
        );
        assert_eq!(
            ratelimit(&config).unwrap(),
            include_str!("../../examples/global/ratelimit-config.yaml"),
            "{stale}"
        );
    }

    #[test]
    fn ratelimit_config_nests_policy_limit_scope_window() {
        let text = ratelimit(&config(TWO)).unwrap();
        assert!(text.starts_with("# envoyproxy/ratelimit"));
        assert!(text.contains("domain: tg\n"));
        assert!(text.contains(
            "      - key: tollgate.limit\n        value: \"tpm\"\n        descriptors:\n          - key: tollgate.scope\n            descriptors:\n              - key: tollgate.window\n                rate_limit:\n                  unit: minute\n                  requests_per_unit: 5000\n"
        ));
        assert!(text.contains("unit: year\n                  requests_per_unit: 25500000"));
        assert_eq!(ratelimit_unit(Window::Seconds(90)), "hour");
        assert_eq!(ratelimit_unit(Window::Day), "day");
        let big = config(
            r#"{"identity": {"source": "header", "header": "x-t"},
            "global_budgets": {"cluster": "ratelimit"},
            "tenants": {"a": {"limits": [{"tokens": 5000000000, "window": "month", "global": true}]}}}"#,
        );
        assert!(ratelimit(&big).unwrap_err().contains("a/tokens-month"));
        assert!(limitador(&big).contains("max_value: 5000000000"));
    }
}
