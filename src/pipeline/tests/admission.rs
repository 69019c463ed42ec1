//! Admitted requests: what goes upstream, what the client sees, what is charged.

use serde_json::json;

use super::*;
use crate::metrics::Counter;

fn tpm(tokens: u64) -> Value {
    json!({"tenant_defaults": {"limits": [{"name": "tpm", "tokens": tokens, "window": "minute"}]}})
}

#[test]
fn an_admitted_chat_is_forwarded_charged_and_recorded() {
    let gw = gateway(tpm(10_000));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100}));
    let open = open(&gw, &host, &call);
    assert!(open.trace.forwarded && open.trace.request_edits.len() == 2);
    // Reserved while in flight: the prompt estimate plus max tokens.
    let (used, reserved) = bucket(&gw, &host, "team-a", "tpm");
    assert_eq!(used, 0);
    assert!(reserved > 100);
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.gauge(Stat::InFlight(a)), Some(1));
    let t = close(&gw, &host, open, Some(&Upstream::chat(12, 30)));
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (42, 0));
    assert_eq!(host.gauge(Stat::InFlight(a)), Some(0));
    assert_eq!(t.records, 1);
    for (field, value) in [
        ("tenant", "team-a"),
        ("api", "chat_completions"),
        ("model", "gpt-4o-mini"),
        ("input_tokens", "12"),
        ("output_tokens", "30"),
        ("usage_source", "reported"),
        ("decision", "admitted"),
        ("stream", "false"),
        ("worker", "w1"),
        ("llm_cost_usd", "0.000020"),
    ] {
        assert_eq!(t.field(field), value, "{field}");
    }
    assert_eq!(
        t.response_edit("x-ratelimit-limit-tokens").as_deref(),
        Some("10000")
    );
    assert_eq!(
        t.response_edit("x-ratelimit-remaining-tokens")
            .map(|r| r.parse::<u64>().unwrap() < 10_000),
        Some(true)
    );
    let m = gw.config.labels.model_id("gpt-4o-mini");
    assert_eq!(host.counter(Stat::Counter(Counter::Requests, a, m)), 1);
    assert_eq!(host.counter(Stat::Counter(Counter::InputTokens, a, m)), 12);
    assert_eq!(host.counter(Stat::Counter(Counter::CostMicroUsd, a, m)), 20);
    // The body went upstream unchanged.
    assert_eq!(t.upstream_body, call.body);
    assert!(t.client_body.starts_with(b"{"));
}

#[test]
fn anthropic_messages_get_anthropic_rate_limit_headers() {
    let gw = gateway(tpm(10_000));
    let host = Fake::new();
    let call = Call::post(
        "/v1/messages",
        None,
        json!({"model": "claude-3-5-haiku",
        "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .header("x-api-key", "sk-b");
    let answer = Upstream::json(
        json!({"type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 7, "output_tokens": 3}}),
    );
    let t = run(&gw, &host, &call, Some(&answer));
    assert_eq!((t.field("tenant"), t.field("api")), ("team-b", "messages"));
    assert_eq!(
        t.response_edit("anthropic-ratelimit-tokens-limit")
            .as_deref(),
        Some("10000")
    );
    assert!(
        t.response_edit("anthropic-ratelimit-tokens-reset")
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(bucket(&gw, &host, "team-b", "tpm"), (10, 0));
}

#[test]
fn clamp_mode_lowers_max_tokens_to_what_is_left() {
    let mut extra = tpm(600);
    extra["tenant_defaults"]["clamp_min_output_tokens"] = json!(10);
    let gw = gateway(extra);
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 5000}));
    let t = run(&gw, &host, &call, Some(&Upstream::chat(10, 20)));
    assert!(t.forwarded);
    let sent = t.upstream_json()["max_tokens"].as_u64().unwrap();
    assert!((10..600).contains(&sent), "{sent}");
    assert_eq!(
        t.request_edit("content-length"),
        Some(t.upstream_body.len().to_string())
    );
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (30, 0));
}

#[test]
fn strict_mode_injects_max_tokens_and_never_passes_the_limit() {
    let mut extra = tpm(2_000);
    extra["tenant_defaults"]["strict"] = json!(true);
    extra["tenant_defaults"]["default_output_tokens"] = json!(300);
    let gw = gateway(extra);
    let host = Fake::new();
    let call = Call::chat(
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}),
    );
    let mut admitted = 0;
    for _ in 0..20 {
        let t = run(&gw, &host, &call, Some(&Upstream::chat(40, 300)));
        if t.forwarded {
            admitted += 1;
            assert_eq!(
                t.upstream_json()["max_completion_tokens"]
                    .as_u64()
                    .or(t.upstream_json()["max_tokens"].as_u64()),
                Some(300)
            );
        } else {
            assert_eq!(t.status(), 429);
        }
    }
    let (used, reserved) = bucket(&gw, &host, "team-a", "tpm");
    assert_eq!(reserved, 0);
    assert!(
        used <= 2_000 && admitted >= 4,
        "used {used}, admitted {admitted}"
    );
    assert_eq!(used, admitted * 340);
}

#[test]
fn include_usage_is_injected_and_hidden_from_the_client() {
    let gw = gateway(tpm(10_000));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "stream": true}));
    let chunk = |delta: Value, usage: Value| {
        json!({"id": "c", "object": "chat.completion.chunk",
        "choices": delta, "usage": usage})
    };
    let stream = Upstream::sse(&[
        chunk(
            json!([{"index": 0, "delta": {"content": "hel"}}]),
            Value::Null,
        ),
        chunk(
            json!([{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]),
            Value::Null,
        ),
        chunk(
            json!([]),
            json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}),
        ),
    ]);
    let t = run(&gw, &host, &call, Some(&stream));
    assert_eq!(t.upstream_json()["stream_options"]["include_usage"], true);
    let client = String::from_utf8(t.client_body.clone()).unwrap();
    assert!(client.contains("hel") && client.contains("[DONE]"));
    assert!(!client.contains("prompt_tokens"), "{client}");
    assert_eq!(
        t.response_edits.iter().find(|(n, _)| n == "content-length"),
        Some(&("content-length".to_string(), None))
    );
    assert_eq!(
        (t.field("input_tokens"), t.field("output_tokens")),
        ("9", "2")
    );
    assert_eq!(t.field("stream"), "true");
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(
        host.samples(Stat::Histogram(
            crate::metrics::Histogram::TimeToFirstTokenMs,
            a
        )),
        vec![0]
    );
}

#[test]
fn the_concurrency_limit_holds_until_settlement() {
    let gw = gateway(json!({"tenant_defaults": {"max_concurrent": 1}}));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": []}));
    let first = open(&gw, &host, &call);
    assert!(first.trace.forwarded);
    let second = run(&gw, &host, &call, None);
    assert_eq!(
        (second.status(), second.field("decision")),
        (429, "rate_limited")
    );
    assert_eq!(second.reply_json()["error"]["type"], "requests");
    close(&gw, &host, first, Some(&Upstream::chat(1, 1)));
    assert!(run(&gw, &host, &call, Some(&Upstream::chat(1, 1))).forwarded);
}
