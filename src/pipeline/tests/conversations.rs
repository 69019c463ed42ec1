//! Conversations that cannot run away: steps, tokens, dollars and age per conversation, the
//! ledger's step and running cost, the conversation metrics.

use serde_json::json;

use super::*;

fn agents(limits: Value) -> Gateway {
    gateway(json!({
        "conversations": {"header": "x-conversation-id", "idle_seconds": 60,
                          "cost_thresholds_usd": ["0.0001", "0.0003"]},
        "tenant_defaults": {"conversation_limits": limits,
            "limits": [{"name": "tpd", "tokens": 1000000, "window": "day"}]}
    }))
}

fn step(conversation: &str) -> Call {
    Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 40,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}))
    .header("x-conversation-id", conversation)
}

/// 1,000 input and 40 output tokens of gpt-4o-mini: $0.000174.
fn answer() -> Upstream {
    Upstream::chat(1000, 40)
}

#[test]
fn a_runaway_loop_is_stopped_and_another_conversation_goes_on() {
    let gw = agents(json!({"max_requests": 5}));
    let host = Fake::new();
    let a = gw.config.labels.tenant_id("team-a");
    for n in 1..=5 {
        let t = run(&gw, &host, &step("loop"), Some(&answer()));
        assert_eq!(t.field("decision"), "admitted");
        assert_eq!(t.field("conversation_step"), n.to_string());
        assert_eq!(t.field("conversation_id"), "loop");
    }
    let t = run(&gw, &host, &step("loop"), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("decision"), "conversation_budget_exceeded");
    assert_eq!(t.field("refused_by"), "team-a/conversation.max_requests");
    assert_eq!(
        t.reply_json()["error"]["code"],
        "conversation_budget_exceeded"
    );
    assert_eq!(t.reply_header("x-should-retry").as_deref(), Some("false"));
    assert_eq!(t.reply_header("retry-after"), None);
    // Its budgets were released: only the five steps are charged.
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (5 * 1040, 0));
    // Another conversation of the tenant, and requests without one, go on.
    let t = run(&gw, &host, &step("other"), Some(&answer()));
    assert_eq!(t.field("conversation_step"), "1");
    let plain = Call::chat(json!({"model": "gpt-4o-mini", "messages": []}));
    assert!(run(&gw, &host, &plain, Some(&answer())).forwarded);
    assert_eq!(host.counter(Stat::ConversationsStarted(a)), 2);
    assert_eq!(host.gauge(Stat::ConversationsActive(a)), Some(2));
}

#[test]
fn dollars_and_age_stop_a_conversation_and_costs_are_counted_once_per_threshold() {
    let gw = agents(json!({"usd": "0.0004", "max_age_seconds": 3600}));
    let host = Fake::new();
    let a = gw.config.labels.tenant_id("team-a");
    let t = run(&gw, &host, &step("c"), Some(&answer()));
    assert_eq!(t.field("conversation_cost_usd"), "0.000174");
    assert_eq!(host.counter(Stat::ConversationsOver(a, 0)), 1);
    let t = run(&gw, &host, &step("c"), Some(&answer()));
    assert_eq!(t.field("conversation_cost_usd"), "0.000348");
    assert_eq!(host.counter(Stat::ConversationsOver(a, 0)), 1);
    assert_eq!(host.counter(Stat::ConversationsOver(a, 1)), 1);
    // The third would pass $0.0004 (what it reserves counts): refused.
    let t = run(&gw, &host, &step("c"), None);
    assert_eq!(t.field("refused_by"), "team-a/conversation.usd");
    // A young conversation ages out after an hour of steps, though active.
    let gw = agents(json!({"max_age_seconds": 120}));
    let host = Fake::new();
    for _ in 0..3 {
        assert!(run(&gw, &host, &step("old"), Some(&answer())).forwarded);
        host.advance(50_000);
    }
    let t = run(&gw, &host, &step("old"), None);
    assert_eq!(t.field("refused_by"), "team-a/conversation.max_age_seconds");
    // Idle past idle_seconds: the same id starts a new conversation.
    host.advance(61_000);
    let t = run(&gw, &host, &step("old"), Some(&answer()));
    assert_eq!(t.field("conversation_step"), "1");
}

#[test]
fn a_conversation_header_alone_tracks_and_the_old_routing_field_still_works() {
    // `routing.conversation_header` names the header when `conversations` does not.
    let gw = gateway(json!({
        "routing": {"conversation_header": "x-conversation-id",
                    "models": {"gpt-4o-mini": {"route": "openai"}}},
        "tenant_defaults": {"conversation_limits": {"max_requests": 1}}
    }));
    let host = Fake::new();
    assert!(run(&gw, &host, &step("one"), Some(&answer())).forwarded);
    assert_eq!(run(&gw, &host, &step("one"), None).status(), 429);
    // No header anywhere: refused at load, naming the field.
    let e = Config::from_json(
        br#"{"identity":{"source":"header","header":"x-t"},"tenants":{"a":{"conversation_limits":{"tokens":5}}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "tenants.a.conversation_limits");
    let e = Config::from_json(
        br#"{"identity":{"source":"header","header":"x-t"},"conversations":{"header":"x-c","cost_thresholds_usd":["1.00","0.50"]}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "conversations.cost_thresholds_usd[1]");
}
