//! Budget trees: a request fits its tenant's limits and every ancestor's, is reserved and
//! settled at every level exactly once, and a refusal names the level that refused.

use serde_json::json;

use super::*;
use crate::pipeline::Refilled;

/// `org` ← `team` ← `team-a`, `team-c`; `org` ← `team-b`. Keys `sk-a`, `sk-b`, `sk-c`.
fn tree() -> Gateway {
    gateway(json!({
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha("sk-a"), "tenant": "team-a"},
            {"sha256": sha("sk-b"), "tenant": "team-b"},
            {"sha256": sha("sk-c"), "tenant": "team-c"}]},
        "tenants": {
            "org": {"limits": [{"name": "tpd", "tokens": 3300, "window": "day"},
                               {"name": "usd", "usd": "1.00", "window": "month"}]},
            "team": {"parent": "org", "limits": [{"name": "tpd", "tokens": 2300, "window": "day"}]},
            "team-a": {"parent": "team", "limits": [{"name": "tpd", "tokens": 1300, "window": "day"}]},
            "team-c": {"parent": "team", "limits": []},
            "team-b": {"parent": "org", "limits": []}
        }
    }))
}

/// A chat request of about 1,080 bytes: a reservation of about 310 tokens, an input of up to
/// its bytes.
fn ask(key: &str) -> Call {
    Call::post(
        "/v1/chat/completions",
        Some(key),
        json!({"model": "gpt-4o-mini", "max_tokens": 40,
               "messages": [{"role": "user", "content": "x".repeat(1000)}]}),
    )
}

/// What each admitted request is charged: 1,040 tokens.
fn answer() -> Upstream {
    Upstream::chat(1000, 40)
}

#[test]
fn each_level_refuses_in_turn_and_every_level_is_settled_once() {
    let gw = tree();
    let host = Fake::new();
    let labels = &gw.config.labels;
    // team-a spends 1,040 of its own 1,300: charged at every level.
    let t = run(&gw, &host, &ask("sk-a"), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (1040, 0));
    assert_eq!(bucket(&gw, &host, "team", "tpd"), (1040, 0));
    assert_eq!(bucket(&gw, &host, "org", "tpd"), (1040, 0));
    // Each level's use is a gauge under the level's own label.
    let tpd = labels.limit_id("tpd");
    for level in ["team-a", "team", "org"] {
        let stat = Stat::BudgetUsed(labels.tenant_id(level), tpd);
        assert_eq!(host.gauge(stat), Some(1040), "{level}");
    }
    // team-a's own limit refuses it next.
    let t = run(&gw, &host, &ask("sk-a"), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("refused_by"), "team-a/tpd");
    // team-c has no limit of its own: its team's limit refuses it once spent.
    let t = run(&gw, &host, &ask("sk-c"), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_eq!(bucket(&gw, &host, "team", "tpd"), (2080, 0));
    let t = run(&gw, &host, &ask("sk-c"), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("refused_by"), "team/tpd");
    assert!(
        t.reply_json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("of 'team'")
    );
    // team-b sits directly under org: org's limit refuses it once spent.
    let t = run(&gw, &host, &ask("sk-b"), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_eq!(bucket(&gw, &host, "org", "tpd"), (3120, 0));
    assert_eq!(bucket(&gw, &host, "team", "tpd"), (2080, 0));
    let t = run(&gw, &host, &ask("sk-b"), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("refused_by"), "org/tpd");
    // Refused requests held nothing anywhere.
    for (tenant, used) in [("team-a", 1040), ("team", 2080), ("org", 3120)] {
        assert_eq!(bucket(&gw, &host, tenant, "tpd"), (used, 0), "{tenant}");
    }
    // The org's USD budget counts every descendant's cost.
    let (usd_used, usd_held) = bucket(&gw, &host, "org", "usd");
    assert!(usd_used > 0 && usd_held == 0);
}

#[test]
fn a_reservation_is_held_at_every_level_while_in_flight_and_released_on_abort() {
    let gw = tree();
    let host = Fake::new();
    let open = open(&gw, &host, &ask("sk-a"));
    for level in ["team-a", "team", "org"] {
        let (used, reserved) = bucket(&gw, &host, level, "tpd");
        assert!(used == 0 && reserved >= 300, "{level}: {reserved}");
    }
    // The upstream resets before any usage: what is charged is charged at every level once.
    let t = close(
        &gw,
        &host,
        open,
        Some(&answer().cut(0, "upstream_reset_before_response_started")),
    );
    assert_eq!(t.records, 1);
    let (a, _) = bucket(&gw, &host, "team-a", "tpd");
    for level in ["team", "org"] {
        assert_eq!(bucket(&gw, &host, level, "tpd"), (a, 0), "{level}");
    }
    assert_eq!(bucket(&gw, &host, "team-a", "tpd").1, 0);
}

#[test]
fn strict_mode_of_an_ancestor_holds_for_its_descendants() {
    let gw = gateway(json!({
        "tenants": {"org": {"strict": true, "limits": []},
                    "team-a": {"parent": "org", "default_output_tokens": 64,
                               "limits": [{"name": "tpd", "tokens": 100000, "window": "day"}]},
                    "team-b": {}}
    }));
    let host = Fake::new();
    // No max tokens asked: strict mode injects the reserve so the bound holds.
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": []}));
    let t = run(&gw, &host, &call, Some(&Upstream::chat(5, 5)));
    assert_eq!(t.upstream_json()["max_completion_tokens"], 64);
}

#[test]
fn a_parents_global_limit_is_one_counter_shared_by_its_children() {
    use super::global::{call, ok, serve};
    let gw = gateway(json!({
        "global_budgets": {"cluster": "rls", "domain": "tg", "replicas": 2, "refill_share": 0.5},
        "tenants": {
            "org": {"limits": [{"name": "tpm", "tokens": 10000, "window": "minute", "global": true}]},
            "team-a": {"parent": "org", "limits": []},
            "team-b": {"parent": "org", "limits": []}
        }
    }));
    let host = Fake::new();
    let mut first = open(&gw, &host, &call(100));
    assert!(first.trace.waiting);
    let (asked, _) = serve(&gw, &host, |_| ok());
    assert_eq!(asked.len(), 1);
    let entries: Vec<(&str, &str)> = asked[0].descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    // The org's counter, whichever child asked.
    assert_eq!(
        entries[..3],
        [
            ("tollgate.policy", "org"),
            ("tollgate.limit", "tpm"),
            ("tollgate.scope", "org")
        ]
    );
    resume(&gw, &host, &mut first, Refilled::Grew);
    close(&gw, &host, first, Some(&Upstream::chat(10, 20)));
    // team-b rides the same lease: no refill of its own.
    let b = Call::post(
        "/v1/chat/completions",
        Some("sk-b"),
        json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100}),
    );
    let t = run(&gw, &host, &b, Some(&Upstream::chat(10, 20)));
    assert!(t.forwarded && !t.waiting);
    assert!(gw.refills_due(host.now_ms()).is_empty());
    assert_eq!(bucket(&gw, &host, "org", "tpm"), (60, 0));
    // The service's limits list the org's counter once.
    let limits = crate::global::limits::limitador(&gw.config);
    assert_eq!(limits.matches("name: \"org/tpm\"").count(), 1);
    assert!(!limits.contains("team-a/"));
}

#[test]
fn a_shadow_limit_is_counted_and_reported_but_never_refuses() {
    let gw = gateway(json!({
        "tenant_defaults": {"clamp_min_output_tokens": 1, "limits": [
            {"name": "tpd", "tokens": 100000, "window": "day"},
            {"name": "tpd-next", "tokens": 1200, "window": "day", "mode": "shadow"}]}
    }));
    let host = Fake::new();
    let labels = &gw.config.labels;
    let a = labels.tenant_id("team-a");
    let shadow = Stat::ShadowRefusals(a, labels.limit_id("tpd-next"));
    // Within both: nothing to say.
    let t = run(&gw, &host, &ask("sk-a"), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_eq!(t.field("shadow_refusal"), "");
    // Past the shadow limit: admitted, unclamped, said in the ledger and counted.
    let t = run(&gw, &host, &ask("sk-a"), Some(&answer()));
    assert!(t.forwarded && t.reply.is_none());
    assert_eq!(t.field("shadow_refusal"), "team-a/tpd-next");
    assert_eq!(t.upstream_json()["max_tokens"], 40);
    assert_eq!(host.counter(shadow), 1);
    // Its use is counted like any limit's, past its amount.
    assert_eq!(bucket(&gw, &host, "team-a", "tpd-next"), (2080, 0));
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (2080, 0));
    // The rate-limit headers follow the enforced limit only.
    let t = run(&gw, &host, &ask("sk-a"), Some(&answer()));
    assert_eq!(
        t.response_edit("x-ratelimit-limit-tokens").as_deref(),
        Some("100000")
    );
    assert_eq!(host.counter(shadow), 2);
}

#[test]
fn limit_modes_are_checked_at_load() {
    let err = |json: &str| crate::config::Config::from_json(json.as_bytes()).unwrap_err();
    let e = err(
        r#"{"identity":{"source":"header","header":"x-t"},"tenant_defaults":{"limits":[{"tokens":5,"window":"day","mode":"loud"}]}}"#,
    );
    assert_eq!(e.field, "tenant_defaults.limits[0].mode");
    let e = err(
        r#"{"identity":{"source":"header","header":"x-t"},"global_budgets":{"cluster":"rls"},"tenant_defaults":{"limits":[{"tokens":5,"window":"day","mode":"shadow","global":true}]}}"#,
    );
    assert_eq!(e.field, "tenant_defaults.limits[0].mode");
}
