//! The response cache in the pipeline: bypass, miss and store, hit, refresh, charged hits.

use serde_json::json;

use super::*;
use crate::metrics::Counter;

fn cached(extra: Value) -> Gateway {
    let mut config = json!({
        "cache": {"policy": "deterministic"},
        "tenant_defaults": {"limits": [{"name": "tpm", "tokens": 100_000, "window": "minute"}]},
    });
    if let (Some(c), Value::Object(extra)) = (config["cache"].as_object_mut(), extra) {
        c.extend(extra);
    }
    gateway(config)
}

fn ask(temperature: f64) -> Call {
    Call::chat(
        json!({"model": "gpt-4o-mini", "temperature": temperature, "max_tokens": 50,
        "messages": [{"role": "user", "content": "capital of France?"}]}),
    )
}

#[test]
fn a_miss_is_stored_and_the_repeat_is_answered_from_the_cache() {
    let gw = cached(json!({}));
    let host = Fake::new();
    let answer = Upstream::chat(20, 5);
    let miss = run(&gw, &host, &ask(0.0), Some(&answer));
    assert_eq!(
        miss.response_edit("x-tollgate-cache").as_deref(),
        Some("miss")
    );
    assert_eq!(miss.field("cache"), "miss");
    assert_eq!(host.counter(Stat::CacheStores), 1);
    assert_eq!(host.gauge(Stat::CacheEntries), Some(1));
    let used = bucket(&gw, &host, "team-a", "tpm");
    let hit = run(&gw, &host, &ask(0.0), Some(&answer));
    assert!(!hit.forwarded);
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.reply.as_ref().unwrap().body, answer.chunks[0]);
    assert_eq!(hit.reply_header("x-tollgate-cache").as_deref(), Some("hit"));
    assert_eq!(hit.reply_header("age").as_deref(), Some("0"));
    assert_eq!(
        hit.reply_header("content-type").as_deref(),
        Some("application/json")
    );
    for (field, value) in [
        ("cache", "hit"),
        ("decision", "admitted"),
        ("input_tokens", "0"),
        ("usage_source", "cache"),
        ("llm_cost_usd", "0.000000"),
        ("tenant", "team-a"),
    ] {
        assert_eq!(hit.field(field), value, "{field}");
    }
    assert_eq!(hit.records, 1);
    // Hits are free: the budget did not move.
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), used);
    let (a, m) = (
        gw.config.labels.tenant_id("team-a"),
        gw.config.labels.model_id("gpt-4o-mini"),
    );
    assert_eq!(host.counter(Stat::Counter(Counter::CacheHits, a, m)), 1);
    assert_eq!(
        host.counter(Stat::Counter(Counter::CacheSavedTokens, a, m)),
        25
    );
    assert_eq!(host.counter(Stat::Counter(Counter::CacheMisses, a, m)), 1);
    assert_eq!(host.counter(Stat::Counter(Counter::Requests, a, m)), 2);
}

#[test]
fn sampling_requests_and_no_store_bypass_the_cache() {
    let gw = cached(json!({}));
    let host = Fake::new();
    let answer = Upstream::chat(20, 5);
    let warm = ask(0.7);
    for call in [
        warm.clone(),
        warm,
        ask(0.0).header("cache-control", "no-store"),
    ] {
        let t = run(&gw, &host, &call, Some(&answer));
        assert!(t.forwarded);
        assert_eq!(t.field("cache"), "bypass");
        assert_eq!(
            t.response_edit("x-tollgate-cache").as_deref(),
            Some("bypass")
        );
    }
    assert_eq!(host.counter(Stat::CacheStores), 0);
}

#[test]
fn no_cache_refreshes_the_entry_without_reading_it() {
    let gw = cached(json!({}));
    let host = Fake::new();
    run(&gw, &host, &ask(0.0), Some(&Upstream::chat(20, 5)));
    host.advance(1);
    let refresh = run(
        &gw,
        &host,
        &ask(0.0).header("cache-control", "no-cache"),
        Some(&Upstream::chat(20, 6)),
    );
    assert!(refresh.forwarded);
    assert_eq!(refresh.field("cache"), "store");
}

#[test]
fn other_key_headers_max_tokens_and_tenants_miss() {
    let gw = cached(json!({}));
    let host = Fake::new();
    let answer = Upstream::chat(20, 5);
    run(&gw, &host, &ask(0.0), Some(&answer));
    let other_max = Call::chat(
        json!({"model": "gpt-4o-mini", "temperature": 0, "max_tokens": 51,
        "messages": [{"role": "user", "content": "capital of France?"}]}),
    );
    for call in [
        ask(0.0).header("openai-organization", "org-2"),
        other_max,
        ask(0.0).header("authorization", "Bearer sk-b"),
        ask(0.0).header(":path", "/v1/chat/completions?api-version=2"),
    ] {
        let t = run(&gw, &host, &call, Some(&answer));
        assert_eq!(t.field("cache"), "miss");
    }
    assert_eq!(
        run(&gw, &host, &ask(0.0), Some(&answer)).field("cache"),
        "hit"
    );
}

#[test]
fn charged_hits_count_against_the_budget() {
    let gw = cached(json!({"charge_hits": true}));
    let host = Fake::new();
    let answer = Upstream::chat(20, 5);
    run(&gw, &host, &ask(0.0), Some(&answer));
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (25, 0));
    let hit = run(&gw, &host, &ask(0.0), Some(&answer));
    assert_eq!(
        (hit.field("cache"), hit.field("input_tokens")),
        ("hit", "20")
    );
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (50, 0));
}

#[test]
fn streams_are_stored_and_replayed_byte_for_byte() {
    let gw = cached(json!({}));
    let host = Fake::new();
    let call = Call::chat(
        json!({"model": "gpt-4o-mini", "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}, "messages": []}),
    );
    let stream = Upstream::sse(&[
        json!({"choices": [{"index": 0, "delta": {"content": "Paris"}}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}),
    ]);
    let miss = run(&gw, &host, &call, Some(&stream));
    let hit = run(&gw, &host, &call, Some(&stream));
    assert_eq!(hit.field("cache"), "hit");
    assert_eq!(hit.reply.as_ref().unwrap().body, miss.client_body);
    assert_eq!(
        hit.reply_header("content-type").as_deref(),
        Some("text/event-stream")
    );
}
