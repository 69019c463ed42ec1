//! Global budgets against a slow or lying rate-limit service: refills that get no answer (the
//! service may have counted them), the backoff every worker of an Envoy shares, and answers
//! whose `remaining` exceeds the limit.

use serde_json::{Value, json};

use super::global::{call, leased, ok, serve, two_workers};
use super::*;
use crate::global::rls::{self, RateLimitResponse};
use crate::pipeline::Refilled;

/// Sends what is due and loses every call (a timeout): returns the hits they asked for.
fn lose(gw: &Gateway, host: &Fake) -> Vec<u32> {
    let (asked, _) = serve(gw, host, |_| None);
    asked.iter().map(|r| r.hits_addend).collect()
}

#[test]
fn after_a_lost_refill_only_the_need_is_asked_until_an_answer_comes() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let a = gw.config.labels.tenant_id("team-a");
    let _first = open(&gw, &host, &call(100));
    // The first refill asks a chunk; it times out, and the service may have counted it.
    assert_eq!(lose(&gw, &host), [2500]);
    assert_eq!(host.counter(Stat::GlobalUnconfirmed(a)), 2500);
    // After the backoff, a lost call asks no more than the request needs.
    host.advance(1_001);
    let _second = open(&gw, &host, &call(100));
    let asked = lose(&gw, &host);
    assert!(asked.len() == 1 && asked[0] < 200, "{asked:?}");
    assert_eq!(
        host.counter(Stat::GlobalUnconfirmed(a)),
        2500 + u64::from(asked[0])
    );
    let view: Value =
        serde_json::from_slice(&crate::view::render(&host, &gw.config, host.now_ms())).unwrap();
    let unconfirmed = &view["tenants"][0]["limits"][0]["global"]["unconfirmed"];
    assert_eq!(unconfirmed, 2500 + u64::from(asked[0]));
    // Still only the need once it answers; then chunks again.
    host.advance(2_001);
    let mut third = open(&gw, &host, &call(100));
    let (asked, woken) = serve(&gw, &host, |_| ok());
    assert!(asked[0].hits_addend < 200, "{}", asked[0].hits_addend);
    resume(&gw, &host, &mut third, woken[0].0);
    assert!(third.trace.forwarded);
    let _fourth = open(&gw, &host, &call(100));
    let (asked, _) = serve(&gw, &host, |_| ok());
    assert!(asked[0].hits_addend > 2000, "{}", asked[0].hits_addend);
}

#[test]
fn the_backoff_is_shared_by_every_worker_of_an_envoy_and_doubles() {
    let ((gw1, h1), (gw2, h2)) = two_workers();
    let mut a = open(&gw1, &h1, &call(100));
    assert_eq!(lose(&gw1, &h1).len(), 1);
    resume(&gw1, &h1, &mut a, Refilled::Unavailable);
    assert_eq!(a.trace.status(), 503);
    // The other worker does not call the failing service either.
    let t = run(&gw2, &h2, &call(100), None);
    assert_eq!(t.status(), 503);
    assert!(!gw2.refills_pending());
    // After a second one call goes out (from either worker); it fails too: two seconds now.
    let advance = |ms| {
        h1.advance(ms);
        h2.advance(ms);
    };
    advance(1_001);
    let _b = open(&gw2, &h2, &call(100));
    assert_eq!(lose(&gw2, &h2).len(), 1);
    advance(1_001);
    assert_eq!(run(&gw1, &h1, &call(100), None).status(), 503);
    assert_eq!(run(&gw2, &h2, &call(100), None).status(), 503);
    assert!(!gw1.refills_pending() && !gw2.refills_pending());
    advance(1_000);
    let mut c = open(&gw1, &h1, &call(100));
    let (asked, woken) = serve(&gw1, &h1, |_| ok());
    assert_eq!(asked.len(), 1);
    resume(&gw1, &h1, &mut c, woken[0].0);
    assert!(c.trace.forwarded);
    // An answer ends the backoff: the next failure waits one second again.
    assert_eq!(crate::budget::backoff_ms(1), 1_000);
    assert_eq!(crate::budget::backoff_ms(3), 4_000);
    assert_eq!(crate::budget::backoff_ms(40), 8_000);
}

/// An OK whose descriptor status says `remaining` of a limit (envoyproxy/ratelimit's shape).
fn ok_saying(remaining: u32) -> Option<RateLimitResponse> {
    Some(RateLimitResponse {
        statuses: vec![rls::DescriptorStatus {
            code: 1,
            current_limit: Some(rls::RateLimit {
                requests_per_unit: 10_000,
                unit: 2,
                name: String::new(),
            }),
            limit_remaining: remaining,
            duration_until_reset: None,
        }],
        ..ok().unwrap_or_default()
    })
}

#[test]
fn a_remaining_above_the_limit_is_read_as_what_the_limit_leaves() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok_saying(u32::MAX));
    resume(&gw, &host, &mut o, Refilled::Grew);
    assert!(o.trace.forwarded);
    let view: Value =
        serde_json::from_slice(&crate::view::render(&host, &gw.config, host.now_ms())).unwrap();
    // 10,000 less the 2,500 granted.
    assert_eq!(
        view["tenants"][0]["limits"][0]["global"]["global_remaining"],
        7500
    );
    // The next refill's chunk is sized from that, never past the limit.
    let _big = open(&gw, &host, &call(2_600));
    let (asked, _) = serve(&gw, &host, |_| ok_saying(u32::MAX));
    // A share of what is left (half of 7,500 over two replicas), not of 4,294,967,295.
    assert_eq!(asked[0].hits_addend, 1_875);
}

#[test]
fn a_stored_lease_of_the_previous_layout_still_reads() {
    let gw = leased(json!({}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok());
    resume(&gw, &host, &mut o, Refilled::Grew);
    let at = gw.tenant_budget("team-a").1.buckets[0].clone();
    let (bytes, _) = crate::store::SharedStore::get(&host, &at.record);
    let record = crate::record::Record::decode(bytes.as_deref());
    let mut bytes = record.bucket(at.id).unwrap().encode();
    bytes.truncate(bytes.len() - 32);
    let old = crate::budget::Bucket::decode(Some(&bytes));
    assert_eq!(old.lease.map(|l| l.granted), Some(2500));
}

#[test]
fn the_fallback_label_is_on_exactly_the_requests_the_allowance_paid_for() {
    let gw = leased(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true, "fallback": 400}]}}));
    let host = Fake::new();
    let mut labelled = Vec::new();
    // One refill is lost: the allowance pays for the request that waited.
    let mut o = open(&gw, &host, &call(100));
    let (_, woken) = serve(&gw, &host, |_| None);
    resume(&gw, &host, &mut o, woken[0].0);
    let t = close(&gw, &host, o, Some(&Upstream::chat(10, 40)));
    labelled.push((t.field("global").to_string(), 50));
    // The service is well again: every later refill is granted, through several chunks.
    host.advance(1_001);
    for _ in 0..70 {
        let mut o = open(&gw, &host, &call(100));
        while o.trace.waiting {
            let (_, woken) = serve(&gw, &host, |_| ok());
            resume(
                &gw,
                &host,
                &mut o,
                woken.first().map_or(Refilled::Grew, |w| w.0),
            );
        }
        let t = close(&gw, &host, o, Some(&Upstream::chat(10, 40)));
        labelled.push((t.field("global").to_string(), 50));
    }
    let fallback: Vec<_> = labelled.iter().filter(|(g, _)| *g == "fallback").collect();
    assert_eq!(fallback.len(), 1, "{labelled:?}");
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::GlobalFallbackAdmits(a)), 1);
}

#[test]
fn requests_the_allowance_paid_for_sum_to_at_most_the_allowance() {
    let gw = leased(json!({"tenant_defaults": {"strict": true, "limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true, "fallback": 400}]}}));
    let host = Fake::new();
    // Five in flight at once while the service is down, each reserving about 110 tokens.
    let mut first = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| None);
    resume(&gw, &host, &mut first, Refilled::Grew);
    let mut open_ones = vec![first];
    for _ in 0..4 {
        open_ones.push(open(&gw, &host, &call(100)));
    }
    let admitted: Vec<Open> = open_ones
        .into_iter()
        .filter(|o| o.trace.forwarded)
        .collect();
    // What they hold fits in the allowance: the others were refused (503).
    let (_, reserved) = bucket(&gw, &host, "team-a", "tpm");
    assert!(!admitted.is_empty() && admitted.len() < 5 && reserved <= 400);
    let mut charged = 0;
    for o in admitted {
        let t = close(&gw, &host, o, Some(&Upstream::chat(10, 20)));
        assert_eq!(t.field("global"), "fallback");
        charged += 30;
    }
    // Their charges are less than they held: the rest of the allowance pays for more.
    while charged + 30 <= 400 {
        let t = run(&gw, &host, &call(20), Some(&Upstream::chat(10, 20)));
        if t.field("global") != "fallback" {
            break;
        }
        charged += 30;
    }
    let (used, _) = bucket(&gw, &host, "team-a", "tpm");
    assert_eq!(used, charged);
    let view: Value =
        serde_json::from_slice(&crate::view::render(&host, &gw.config, host.now_ms())).unwrap();
    let lease = &view["tenants"][0]["limits"][0]["global"];
    assert_eq!(
        (&lease["fallback"], &lease["fallback_used"]),
        (&json!(400), &json!(charged))
    );
    assert!(charged > 200 && charged <= 400, "{charged}");
}

#[test]
fn a_second_outage_in_the_window_spends_what_is_left_of_the_allowance() {
    let gw = leased(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 10000, "window": "minute", "global": true, "fallback": 400}]}}));
    let host = Fake::new();
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| None);
    resume(&gw, &host, &mut o, Refilled::Grew);
    assert_eq!(
        close(&gw, &host, o, Some(&Upstream::chat(10, 40))).field("global"),
        "fallback"
    );
    host.advance(1_001);
    let mut o = open(&gw, &host, &call(100));
    serve(&gw, &host, |_| ok());
    resume(&gw, &host, &mut o, Refilled::Grew);
    close(&gw, &host, o, Some(&Upstream::chat(10, 40)));
    // Ride the chunk until a request waits for the next refill; that refill is lost.
    for _ in 0..100 {
        let mut o = open(&gw, &host, &call(100));
        if !o.trace.waiting {
            close(&gw, &host, o, Some(&Upstream::chat(10, 40)));
            continue;
        }
        let (_, woken) = serve(&gw, &host, |_| None);
        assert_eq!(woken[0].0, Refilled::Grew);
        resume(&gw, &host, &mut o, woken[0].0);
        let t = close(&gw, &host, o, Some(&Upstream::chat(10, 40)));
        assert_eq!(t.field("global"), "fallback");
        return;
    }
    panic!("no refill in 100 requests");
}
