//! Settlement: exactly once, whatever way the exchange ends.

use serde_json::json;

use super::*;
use crate::metrics::Counter;

fn metered() -> Gateway {
    gateway(
        json!({"tenant_defaults": {"limits": [{"name": "tpm", "tokens": 100_000, "window": "minute"}]},
                   "limits": {"reservation_ttl_seconds": 7}}),
    )
}

fn stream_call() -> Call {
    Call::chat(
        json!({"model": "gpt-4o-mini", "messages": [], "stream": true, "max_tokens": 100,
        "stream_options": {"include_usage": true}}),
    )
}

fn deltas(n: usize) -> Upstream {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"choices": [{"index": 0, "delta": {"content": format!("w{i}")}}]}))
        .collect();
    Upstream::sse(&events)
}

#[test]
fn a_client_that_leaves_mid_stream_is_charged_what_it_saw() {
    let gw = metered();
    let host = Fake::new();
    let t = run(
        &gw,
        &host,
        &stream_call(),
        Some(&deltas(5).cut(3, "downstream_remote_disconnect")),
    );
    assert_eq!(t.records, 1);
    assert_eq!(t.field("usage_source"), "observed");
    assert_eq!(t.field("output_tokens"), "3");
    let charged: u64 = t.field("input_tokens").parse::<u64>().unwrap() + 3;
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (charged, 0));
}

#[test]
fn upstream_failures_before_output_are_refunded() {
    let gw = metered();
    let host = Fake::new();
    let reset = deltas(2).cut(
        0,
        "upstream_reset_before_response_started{connection_termination}",
    );
    let t = run(&gw, &host, &stream_call(), Some(&reset));
    assert_eq!(
        (t.field("usage_source"), t.field("input_tokens")),
        ("refunded", "0")
    );
    let error = Upstream::json(json!({"error": {"message": "boom"}})).status(500);
    let t = run(&gw, &host, &stream_call(), Some(&error));
    assert_eq!(t.field("usage_source"), "refunded");
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
    assert_eq!(
        host.gauge(Stat::InFlight(gw.config.labels.tenant_id("team-a"))),
        Some(0)
    );
}

#[test]
fn an_answer_without_usage_is_charged_its_reservation() {
    let gw = metered();
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100}));
    let t = run(
        &gw,
        &host,
        &call,
        Some(&Upstream::json(json!({"choices": []}))),
    );
    assert_eq!(t.field("usage_source"), "reservation");
    assert_eq!(t.field("output_tokens"), "100");
    let (used, reserved) = bucket(&gw, &host, "team-a", "tpm");
    assert_eq!((reserved, used > 100), (0, true));
}

#[test]
fn absurd_usage_is_clamped_and_counted_as_an_anomaly() {
    let gw = metered();
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100}));
    let t = run(
        &gw,
        &host,
        &call,
        Some(&Upstream::chat(u64::MAX / 4, u64::MAX / 4)),
    );
    assert_eq!(t.field("usage_anomaly"), "clamped");
    assert_eq!(t.field("output_tokens"), "100");
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::UsageAnomalies(a)), 1);
    let (used, _) = bucket(&gw, &host, "team-a", "tpm");
    assert!(used < 200 + call.body.len() as u64);
}

#[test]
fn a_body_the_host_cannot_replace_is_refused_and_released() {
    let gw = gateway(json!({"tenant_defaults": {"max_concurrent": 1, "limits": [
        {"name": "tpm", "tokens": 100_000, "window": "minute"}]}}));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "stream": true}));
    let mut open = open(&gw, &host, &call);
    assert!(
        open.trace.forwarded,
        "include_usage is injected: the body is replaced"
    );
    let refused = open.request.forward_failed(&gw, &host);
    assert_eq!(refused.reply.as_ref().map(|r| r.status), Some(500));
    open.trace.forwarded = false;
    open.trace.take(refused);
    let t = close(&gw, &host, open, None);
    assert_eq!((t.records, t.field("decision")), (1, "internal"));
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
    assert!(
        run(&gw, &host, &call, Some(&Upstream::chat(1, 1))).forwarded,
        "the slot was released"
    );
}

#[test]
fn what_a_dead_vm_held_expires_after_the_ttl() {
    let gw = gateway(json!({"tenant_defaults": {"max_concurrent": 1, "limits": [
        {"name": "tpm", "tokens": 1000, "window": "day"}]}, "limits": {"reservation_ttl_seconds": 7}}));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 900}));
    // The VM dies with the request in flight: nothing ever settles it.
    let dead = open(&gw, &host, &call);
    assert!(dead.trace.forwarded);
    drop(dead);
    assert_eq!(run(&gw, &host, &call, None).status(), 429);
    host.advance(8_001);
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
    let t = run(&gw, &host, &call, Some(&Upstream::chat(5, 5)));
    assert!(t.forwarded);
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (10, 0));
}

#[test]
fn every_path_records_once_and_counts_requests_once() {
    let gw = metered();
    let host = Fake::new();
    let outcomes = [
        Some(Upstream::chat(3, 4)),
        Some(deltas(3)),
        Some(deltas(3).cut(1, "downstream_remote_disconnect")),
        Some(Upstream::chat(1, 1).status(429)),
        None,
    ];
    for up in &outcomes {
        let t = run(&gw, &host, &stream_call(), up.as_ref());
        assert_eq!(t.records, 1);
    }
    let (a, m) = (
        gw.config.labels.tenant_id("team-a"),
        gw.config.labels.model_id("gpt-4o-mini"),
    );
    assert_eq!(host.counter(Stat::Counter(Counter::Requests, a, m)), 5);
    assert_eq!(bucket(&gw, &host, "team-a", "tpm").1, 0);
}
