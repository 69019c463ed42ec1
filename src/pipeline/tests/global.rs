//! Global budgets: leases refilled from the rate-limit service, requests waiting for a refill,
//! refusals, the service unreachable (deny or fallback), windows turning.

use prost::Message;
use serde_json::{Value, json};

use super::*;
use crate::global::rls::{self, RateLimitRequest, RateLimitResponse};
use crate::pipeline::{Refilled, Unanswered};

/// team-a and team-b with one global token limit of 10,000 a minute; two replicas, a refill
/// takes half of what is left over the two: 2,500 tokens while nothing is known.
pub(super) fn leased(extra: Value) -> Gateway {
    let mut base = json!({
        "global_budgets": {"cluster": "rls", "domain": "tg", "replicas": 2, "refill_share": 0.5},
        "tenant_defaults": {"limits": [
            {"name": "tpm", "tokens": 10000, "window": "minute", "global": true}]},
    });
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    gateway(base)
}

pub(super) fn call(max_tokens: u64) -> Call {
    Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": max_tokens}))
}

/// The rate-limit service: answers every refill that is due with `answer` (`None`: the call
/// failed), and returns the requests it got and the tickets to resume with their outcome.
pub(super) fn serve(
    gw: &Gateway,
    host: &Fake,
    answer: impl Fn(&RateLimitRequest) -> Option<RateLimitResponse>,
) -> (Vec<RateLimitRequest>, Vec<(Refilled, Vec<u32>)>) {
    let mut asked = Vec::new();
    let mut woken = Vec::new();
    for call in gw.refills_due(host.now_ms()) {
        let request = RateLimitRequest::decode(call.message.as_slice()).unwrap();
        let bytes = answer(&request).map(|r| r.encode_to_vec());
        let answer = bytes.as_deref().ok_or(Unanswered::Lost);
        woken.push(gw.refill_answered(host, &call.key, answer, host.now_ms()));
        asked.push(request);
    }
    (asked, woken)
}

pub(super) fn ok() -> Option<RateLimitResponse> {
    Some(RateLimitResponse {
        overall_code: 1,
        statuses: vec![],
        response_headers_to_add: vec![],
    })
}

pub(super) fn over_limit() -> Option<RateLimitResponse> {
    Some(RateLimitResponse {
        overall_code: 2,
        ..ok().unwrap()
    })
}

fn entries(request: &RateLimitRequest) -> Vec<(String, String)> {
    request.descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

#[test]
fn the_first_request_waits_for_a_refill_and_the_next_ones_ride_the_lease() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut first = open(&gw, &host, &call(100));
    assert!(first.trace.waiting && !first.trace.forwarded && first.trace.reply.is_none());
    assert!(gw.refills_pending());
    let (asked, woken) = serve(&gw, &host, |_| ok());
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].domain, "tg");
    assert_eq!(asked[0].hits_addend, 2500);
    assert_eq!(
        entries(&asked[0]),
        [
            ("tollgate.policy", "team-a"),
            ("tollgate.limit", "tpm"),
            ("tollgate.scope", "team-a"),
            ("tollgate.window", "2026-11-28T10:00"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert_eq!(woken, [(Refilled::Grew, vec![first.ticket])]);
    assert!(!gw.refills_pending());
    resume(&gw, &host, &mut first, Refilled::Grew);
    assert!(first.trace.forwarded);
    let done = close(&gw, &host, first, Some(&Upstream::chat(10, 20)));
    assert_eq!(done.field("global"), "lease");
    // The lease (2,500) covers the next requests without a call.
    for _ in 0..5 {
        let t = run(&gw, &host, &call(100), Some(&Upstream::chat(10, 20)));
        assert!(t.forwarded && !t.waiting);
    }
    assert!(gw.refills_due(host.now_ms()).is_empty());
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (180, 0));
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::GlobalRefills(a, "granted")), 1);
}

#[test]
fn requests_short_at_once_share_one_refill() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut waiting: Vec<Open> = (0..3).map(|_| open(&gw, &host, &call(100))).collect();
    assert!(waiting.iter().all(|o| o.trace.waiting));
    let (asked, woken) = serve(&gw, &host, |_| ok());
    assert_eq!(asked.len(), 1, "one refill for the three");
    let tickets: Vec<u32> = waiting.iter().map(|o| o.ticket).collect();
    assert_eq!(woken, [(Refilled::Grew, tickets)]);
    for o in &mut waiting {
        resume(&gw, &host, o, Refilled::Grew);
        assert!(o.trace.forwarded);
    }
}

#[test]
fn a_refused_refill_is_a_429_and_the_window_asks_no_more_for_that_much() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let (_, woken) = serve(&gw, &host, |_| over_limit());
    assert_eq!(woken[0].0, Refilled::Refused);
    resume(&gw, &host, &mut o, Refilled::Refused);
    // Asked again for no more than the need (the service said less than 2,500 is left).
    assert!(o.trace.waiting);
    let (asked, woken) = serve(&gw, &host, |_| over_limit());
    assert!(asked[0].hits_addend < 2500);
    resume(&gw, &host, &mut o, woken[0].0);
    assert_eq!(o.trace.status(), 429);
    assert_eq!(o.trace.reply_json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(o.trace.reply_header("retry-after").as_deref(), Some("60"));
    // A request as large is refused at once for the rest of the window; a smaller one asks.
    let t = run(&gw, &host, &call(100), None);
    assert_eq!(t.status(), 429);
    assert!(gw.refills_due(host.now_ms()).is_empty());
    let small = open(&gw, &host, &call(1));
    assert!(small.trace.waiting);
    // The next window starts with a fresh lease and asks again.
    host.advance(60_000);
    let (_, woken) = serve(&gw, &host, |_| ok());
    assert_eq!(woken.len(), 1);
    let t = open(&gw, &host, &call(100));
    assert!(t.trace.waiting);
}

#[test]
fn when_the_service_cannot_be_asked_the_request_gets_a_503_in_its_apis_shape() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let (_, woken) = serve(&gw, &host, |_| None);
    assert_eq!(woken[0].0, Refilled::Unavailable);
    resume(&gw, &host, &mut o, Refilled::Unavailable);
    assert_eq!(o.trace.status(), 503);
    assert_eq!(
        o.trace.reply_json()["error"]["code"],
        "budget_service_unavailable"
    );
    assert_eq!(o.trace.reply_header("retry-after").as_deref(), Some("1"));
    let done = close(&gw, &host, o, None);
    assert_eq!(done.field("decision"), "budget_unavailable");
    // For a second the limit is decided without calling: 503 at once.
    let t = run(&gw, &host, &call(100), None);
    assert_eq!(t.status(), 503);
    assert!(!gw.refills_pending());
    // Then it asks again, and recovers.
    host.advance(1_001);
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok());
    resume(&gw, &host, &mut o, Refilled::Grew);
    assert!(o.trace.forwarded);
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::GlobalRefills(a, "unavailable")), 1);
}

#[test]
fn a_fallback_allowance_admits_without_the_service_once_per_window() {
    let gw = leased(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true, "fallback": 400}]}}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let (_, woken) = serve(&gw, &host, |_| None);
    assert_eq!(woken[0].0, Refilled::Grew);
    resume(&gw, &host, &mut o, Refilled::Grew);
    assert!(o.trace.forwarded);
    let done = close(&gw, &host, o, Some(&Upstream::chat(10, 100)));
    assert_eq!(done.field("global"), "fallback");
    // Decided without the service until the allowance is spent: 400 tokens, then 503.
    let t = run(&gw, &host, &call(100), Some(&Upstream::chat(10, 100)));
    assert_eq!(t.field("global"), "fallback");
    let t = run(&gw, &host, &call(300), None);
    assert_eq!(t.status(), 503);
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::GlobalFallbackAdmits(a)), 2);
}

#[test]
fn strict_mode_never_charges_more_than_the_service_granted() {
    let gw = leased(json!({"tenant_defaults": {"strict": true, "limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true}]}}));
    let host = Fake::new();
    let mut granted = 0u64;
    let mut charged = 0u64;
    for i in 0..40 {
        let mut o = open(&gw, &host, &call(300));
        while o.trace.waiting {
            let (asked, woken) = serve(&gw, &host, |_| ok());
            granted += asked.iter().map(|r| u64::from(r.hits_addend)).sum::<u64>();
            let outcome = woken.first().map_or(Refilled::Grew, |w| w.0);
            resume(&gw, &host, &mut o, outcome);
        }
        let t = close(&gw, &host, o, Some(&Upstream::chat(20, 150 + i)));
        charged += t.field("input_tokens").parse::<u64>().unwrap()
            + t.field("output_tokens").parse::<u64>().unwrap();
        let (used, reserved) = bucket(&gw, &host, "team-a", "tpm");
        assert_eq!((used, reserved), (charged, 0));
        assert!(charged <= granted, "charged {charged} of {granted} granted");
    }
    assert!(granted < 10_000);
}

#[test]
fn a_settlement_after_the_window_turned_is_charged_to_the_window_that_paid_for_it() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok());
    resume(&gw, &host, &mut o, Refilled::Grew);
    host.advance(60_000);
    close(&gw, &host, o, Some(&Upstream::chat(10, 20)));
    // The new window's bucket: nothing used, nothing held, an empty lease.
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
}

#[test]
fn a_client_that_leaves_while_waiting_is_recorded_once_and_holds_nothing() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let o = open(&gw, &host, &call(100));
    let t = close(&gw, &host, o, None);
    assert_eq!((t.records, t.field("decision")), (1, "client_aborted"));
    // The refill still goes out and grows the lease for the next requests.
    let (_, woken) = serve(&gw, &host, |_| ok());
    assert_eq!(woken[0].0, Refilled::Grew);
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
    let t = run(&gw, &host, &call(100), None);
    assert!(t.forwarded);
}

#[test]
fn local_limits_beside_a_global_one_are_unchanged() {
    let gw = leased(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true},
        {"name": "local", "tokens": 150, "window": "minute"}]}}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok());
    resume(&gw, &host, &mut o, Refilled::Grew);
    close(&gw, &host, o, Some(&Upstream::chat(10, 100)));
    let t = run(&gw, &host, &call(100), None);
    assert_eq!(t.status(), 429);
    assert!(
        t.reply_json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'local'")
    );
}

#[test]
fn a_global_limit_needs_the_service_configured() {
    let raw = json!({
        "identity": {"source": "header", "header": "x-t"},
        "tenant_defaults": {"limits": [{"tokens": 5, "window": "minute", "global": true}]}});
    let e = Config::from_json(&serde_json::to_vec(&raw).unwrap()).unwrap_err();
    assert_eq!(e.field, "global_budgets");
    let raw = json!({
        "identity": {"source": "header", "header": "x-t"},
        "tenant_defaults": {"limits": [{"tokens": 5, "window": "minute", "fallback": 3}]}});
    let e = Config::from_json(&serde_json::to_vec(&raw).unwrap()).unwrap_err();
    assert_eq!(e.field, "tenant_defaults.limits[0].fallback");
    let _ = rls::SERVICE;
}

#[test]
fn a_cluster_name_envoy_would_read_as_a_grpc_service_is_refused() {
    let with = |cluster: &str| {
        let raw = json!({
            "identity": {"source": "header", "header": "x-t"},
            "global_budgets": {"cluster": cluster}});
        Config::from_json(&serde_json::to_vec(&raw).unwrap()).map(|c| c.global.unwrap().cluster)
    };
    assert_eq!(with("ratelimit").unwrap(), "ratelimit");
    assert_eq!(with("rls").unwrap(), "rls");
    // Istio's cluster for a Service port.
    let istio = "outbound|8081||limitador.tollgate-budgets.svc.cluster.local";
    assert_eq!(with(istio).unwrap(), istio);
    assert_eq!(with("Hx").unwrap_err().field, "global_budgets.cluster");
    assert_eq!(
        with("rate limit").unwrap_err().field,
        "global_budgets.cluster"
    );
}

#[test]
fn the_usage_view_shows_the_lease() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let answer = || {
        Some(RateLimitResponse {
            response_headers_to_add: vec![rls::HeaderValue {
                key: "X-RateLimit-Remaining".into(),
                value: "7500".into(),
            }],
            ..ok().unwrap()
        })
    };
    serve(&gw, &host, |_| answer());
    resume(&gw, &host, &mut o, Refilled::Grew);
    let view: Value =
        serde_json::from_slice(&crate::view::render(&host, &gw.config, host.now_ms())).unwrap();
    let limit = &view["tenants"][0]["limits"][0];
    assert_eq!(view["tenants"][0]["tenant"], "team-a");
    assert_eq!(limit["global"]["granted"], 2500);
    assert_eq!(limit["global"]["global_remaining"], 7500);
    assert_eq!(limit["global"]["fallback"], 0);
    assert!(limit["global"]["used"].as_u64().unwrap() > 100);
    // The same, as of the refill, in the lease gauges.
    let (a, tpm) = (
        gw.config.labels.tenant_id("team-a"),
        gw.config.labels.limit_id("tpm"),
    );
    assert_eq!(gw.config.labels.limit_value(tpm), "tpm");
    assert_eq!(host.gauge(Stat::GlobalLease(a, tpm, "granted")), Some(2500));
    assert_eq!(
        host.gauge(Stat::GlobalLease(a, tpm, "remaining")),
        Some(7500)
    );
    assert_eq!(
        Stat::GlobalLease(a, tpm, "remaining").name(&gw.config.labels),
        "tollgate.tenant.team-a.limit.tpm.global_remaining"
    );
    // Local limits show no lease.
    assert!(view["tenants"][1]["limits"][0].get("global").is_some());
    let local =
        gateway(json!({"tenant_defaults": {"limits": [{"tokens": 5, "window": "minute"}]}}));
    let view: Value =
        serde_json::from_slice(&crate::view::render(&host, &local.config, host.now_ms())).unwrap();
    assert!(view["tenants"][0]["limits"][0].get("global").is_none());
}

#[test]
fn a_refusal_that_says_what_is_left_refuses_more_than_that_without_a_call() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let refused_with = |left: &str| {
        Some(RateLimitResponse {
            response_headers_to_add: vec![rls::HeaderValue {
                key: "X-RateLimit-Remaining".into(),
                value: left.into(),
            }],
            ..over_limit().unwrap()
        })
    };
    let (asked, _) = serve(&gw, &host, |_| refused_with("60"));
    assert_eq!(asked.len(), 1);
    resume(&gw, &host, &mut o, Refilled::Refused);
    // The request needs more than the 60 left: refused at once.
    assert_eq!(o.trace.status(), 429);
    assert!(!gw.refills_pending());
    let t = run(&gw, &host, &call(100), None);
    assert_eq!(t.status(), 429);
    assert!(!gw.refills_pending());
    // A request that fits in what is left asks for it.
    let small = open(
        &gw,
        &host,
        &Call::chat(json!({"model": "m", "max_tokens": 1})),
    );
    assert!(small.trace.waiting);
    let (asked, _) = serve(&gw, &host, |_| ok());
    assert!(asked[0].hits_addend <= 60, "{}", asked[0].hits_addend);
}

pub(super) fn two_workers() -> ((Gateway, Fake), (Gateway, Fake)) {
    let extra = json!({
        "global_budgets": {"cluster": "rls", "domain": "tg", "replicas": 2, "refill_share": 0.5},
        "tenant_defaults": {"limits": [
            {"name": "tpm", "tokens": 10000, "window": "minute", "global": true}]},
    });
    let first = Fake::new();
    let second = Fake::sharing(first.store.clone());
    let a = Gateway::new(config(extra.clone()), 0, "w1".to_string());
    let b = Gateway::new(config(extra), 1, "w2".to_string());
    ((a, first), (b, second))
}

#[test]
fn one_refill_per_lease_across_the_workers_of_an_envoy() {
    let ((gw1, h1), (gw2, h2)) = two_workers();
    let mut a = open(&gw1, &h1, &call(100));
    let mut b = open(&gw2, &h2, &call(100));
    assert!(a.trace.waiting && b.trace.waiting);
    // Only the first worker asks; the second watches the lease.
    assert!(gw2.refills_due(h2.now_ms()).is_empty());
    assert!(gw2.refills_pending());
    assert!(gw2.refills_watched(&h2, h2.now_ms()).is_empty());
    let (asked, woken) = serve(&gw1, &h1, |_| ok());
    assert_eq!(asked.len(), 1);
    resume(&gw1, &h1, &mut a, woken[0].0);
    assert!(a.trace.forwarded);
    // The claim is gone: the second worker's request is admitted from the grown lease.
    assert_eq!(gw2.refills_watched(&h2, h2.now_ms()), vec![vec![b.ticket]]);
    assert!(!gw2.refills_pending());
    resume(&gw2, &h2, &mut b, Refilled::Grew);
    assert!(b.trace.forwarded);
}

#[test]
fn a_claim_left_by_a_dead_worker_expires() {
    let ((gw1, h1), (gw2, h2)) = two_workers();
    let _dead = open(&gw1, &h1, &call(100));
    let _ = gw1.refills_due(h1.now_ms()); // sent, never answered: the VM died
    let mut b = open(&gw2, &h2, &call(100));
    assert!(b.trace.waiting);
    h2.advance(1_000);
    assert!(gw2.refills_watched(&h2, h2.now_ms()).is_empty());
    // The claim lasts the call's timeout (250 ms) and a second.
    h2.advance(300);
    assert_eq!(gw2.refills_watched(&h2, h2.now_ms()), vec![vec![b.ticket]]);
    resume(&gw2, &h2, &mut b, Refilled::Grew);
    assert!(b.trace.waiting, "it asks itself now");
    let (asked, woken) = serve(&gw2, &h2, |_| ok());
    assert_eq!(asked.len(), 1);
    resume(&gw2, &h2, &mut b, woken[0].0);
    assert!(b.trace.forwarded);
}

#[test]
fn a_grant_answered_after_the_window_turned_is_not_counted_in_the_new_window() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    let calls = gw.refills_due(host.now_ms());
    host.advance(60_000);
    let bytes = ok().unwrap().encode_to_vec();
    let (refilled, _) = gw.refill_answered(&host, &calls[0].key, Ok(&bytes), host.now_ms());
    assert_eq!(refilled, Refilled::Grew);
    // Admitted again in the new window: its lease is empty, so it asks again, for this window.
    resume(&gw, &host, &mut o, refilled);
    assert!(o.trace.waiting);
    let (asked, _) = serve(&gw, &host, |_| ok());
    assert_eq!(entries(&asked[0])[3].1, "2026-11-28T10:01");
}
