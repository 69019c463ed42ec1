//! Model routing: the routing headers, the body's model, aliases, stickiness, downgrades.

use serde_json::json;

use super::*;

fn routing() -> Value {
    json!({
        "routing": {
            "conversation_header": "x-conversation",
            "models": {
                "gpt-4o-mini": {"route": "openai"},
                "gpt-4o": {"route": "openai"},
                "claude-3-5-haiku": {"route": "anthropic", "upstream_model": "claude-3-5-haiku-20241022"}},
            "aliases": {"fast": {"targets": [{"model": "gpt-4o-mini", "weight": 9},
                                             {"model": "gpt-4o", "weight": 1}],
                                 "downgrade_to": "gpt-4o-mini"}}},
        "tenants": {"team-a": {}, "team-b": {"downgrade_at": 0.5,
            "limits": [{"name": "tpd", "tokens": 1000, "window": "day"}]}},
        "prices": {"*": {"input": "1", "output": "1"}},
    })
}

fn ask(model: &str) -> Call {
    Call::chat(json!({"model": model, "messages": []}))
}

#[test]
fn a_routed_model_sets_the_routing_headers_and_reroutes() {
    let gw = gateway(routing());
    let host = Fake::new();
    let t = run(&gw, &host, &ask("gpt-4o"), Some(&Upstream::chat(1, 1)));
    assert_eq!(
        t.request_edit("x-tollgate-route").as_deref(),
        Some("openai")
    );
    assert_eq!(
        t.request_edit("x-tollgate-model").as_deref(),
        Some("gpt-4o")
    );
    assert!(t.rerouted);
    assert_eq!(
        t.response_edit("x-tollgate-model").as_deref(),
        Some("gpt-4o")
    );
    assert_eq!(
        (t.field("served_model"), t.field("route")),
        ("gpt-4o", "openai")
    );
    // The model needs no rewrite: the body goes as it came.
    assert_eq!(t.upstream_body, ask("gpt-4o").body);
}

#[test]
fn the_upstream_model_name_is_written_into_the_body() {
    let gw = gateway(routing());
    let host = Fake::new();
    let t = run(
        &gw,
        &host,
        &ask("claude-3-5-haiku"),
        Some(&Upstream::chat(1, 1)),
    );
    assert_eq!(t.upstream_json()["model"], "claude-3-5-haiku-20241022");
    assert_eq!(
        t.request_edit("content-length"),
        Some(t.upstream_body.len().to_string())
    );
    assert_eq!(
        (t.field("model"), t.field("served_model")),
        ("claude-3-5-haiku", "claude-3-5-haiku")
    );
}

#[test]
fn aliases_draw_by_weight_and_conversations_stick() {
    let gw = gateway(routing());
    let host = Fake::new();
    let served: Vec<String> = (0..100)
        .map(|_| {
            run(&gw, &host, &ask("fast"), Some(&Upstream::chat(1, 1)))
                .field("served_model")
                .to_string()
        })
        .collect();
    let big = served.iter().filter(|m| *m == "gpt-4o").count();
    assert!(
        (5..=15).contains(&big),
        "{big} of 100 on the weight-1 target"
    );
    let sticky: Vec<String> = (0..10)
        .map(|_| {
            let call = ask("fast").header("x-conversation", "conv-7");
            let t = run(&gw, &host, &call, Some(&Upstream::chat(1, 1)));
            assert_eq!(t.field("conversation_id"), "conv-7");
            t.field("served_model").to_string()
        })
        .collect();
    assert!(sticky.iter().all(|m| *m == sticky[0]));
}

#[test]
fn aliases_downgrade_past_the_threshold() {
    let gw = gateway(routing());
    let host = Fake::new();
    let as_b = |model: &str| {
        Call::chat(json!({"model": model, "messages": [], "max_tokens": 300}))
            .header("authorization", "Bearer sk-b")
    };
    let heavy = Upstream::chat(20, 290);
    let first = run(&gw, &host, &as_b("fast"), Some(&heavy));
    assert_eq!(first.field("usage_anomaly"), "");
    run(&gw, &host, &as_b("gpt-4o"), Some(&heavy));
    assert_eq!(bucket(&gw, &host, "team-b", "tpd"), (620, 0));
    for _ in 0..20 {
        let t = run(&gw, &host, &as_b("fast"), Some(&Upstream::chat(1, 1)));
        assert_eq!(t.field("served_model"), "gpt-4o-mini");
    }
}

#[test]
fn unknown_models_take_the_unknown_model_route_when_configured() {
    let mut config = routing();
    config["routing"]["unknown_model_route"] = json!("fallback");
    let gw = gateway(config);
    let host = Fake::new();
    let t = run(&gw, &host, &ask("llama-9"), Some(&Upstream::chat(1, 1)));
    assert_eq!(
        t.request_edit("x-tollgate-route").as_deref(),
        Some("fallback")
    );
    assert_eq!(t.field("served_model"), "llama-9");
}

#[test]
fn a_downgrade_looks_at_every_level_of_a_budget_tree() {
    // team-b's own budget is large; its parent's is past the threshold.
    let mut config = routing();
    config["tenants"] = json!({
        "org": {"limits": [{"name": "tpd", "tokens": 1000, "window": "day"}]},
        "team-a": {"parent": "org", "limits": []},
        "team-b": {"parent": "org", "downgrade_at": 0.5,
                   "limits": [{"name": "own", "tokens": 1000000, "window": "day"}]}});
    let gw = gateway(config);
    let host = Fake::new();
    let a = Call::chat(json!({"model": "gpt-4o", "messages": [], "max_tokens": 300}));
    run(&gw, &host, &a, Some(&Upstream::chat(20, 290)));
    run(&gw, &host, &a, Some(&Upstream::chat(20, 290)));
    assert_eq!(bucket(&gw, &host, "org", "tpd"), (620, 0));
    let b = Call::chat(json!({"model": "fast", "messages": [], "max_tokens": 10}))
        .header("authorization", "Bearer sk-b");
    for _ in 0..20 {
        let t = run(&gw, &host, &b, Some(&Upstream::chat(1, 1)));
        assert_eq!(t.field("served_model"), "gpt-4o-mini");
    }
}
