//! Two workers (two VMs of one Envoy process) interleaving on one shared store.

use serde_json::json;

use super::*;

fn two_workers(extra: Value) -> ((Gateway, Fake), (Gateway, Fake)) {
    let first = Fake::new();
    let second = Fake::sharing(first.store.clone());
    let a = Gateway::new(config(extra.clone()), 0, "w1".to_string());
    let b = Gateway::new(config(extra), 1, "w2".to_string());
    ((a, first), (b, second))
}

fn call(max_tokens: u64) -> Call {
    Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": max_tokens}))
}

#[test]
fn interleaved_exchanges_settle_exactly_on_one_store() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 1_000_000, "window": "minute"}]}}));
    let mut charged = 0u64;
    let mut pending = Vec::new();
    for round in 0..30u64 {
        // Open on one worker, close on whichever round says: crossing settlements.
        let (gw, host) = if round % 2 == 0 {
            (&gw1, &h1)
        } else {
            (&gw2, &h2)
        };
        pending.push((round, open(gw, host, &call(50))));
        if round % 3 == 2 {
            for (r, open) in pending.drain(..).rev() {
                let (gw, host) = if r % 2 == 0 { (&gw1, &h1) } else { (&gw2, &h2) };
                let t = close(gw, host, open, Some(&Upstream::chat(r + 1, r % 7)));
                assert_eq!(t.field("worker"), if r % 2 == 0 { "w1" } else { "w2" });
                charged += t.field("input_tokens").parse::<u64>().unwrap()
                    + t.field("output_tokens").parse::<u64>().unwrap();
            }
        }
    }
    assert!(pending.is_empty());
    assert_eq!(bucket(&gw1, &h1, "team-a", "tpm"), (charged, 0));
    assert_eq!(bucket(&gw2, &h2, "team-a", "tpm"), (charged, 0));
}

#[test]
fn limits_hold_across_workers() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({"tenant_defaults": {"max_concurrent": 2,
        "limits": [{"name": "tpm", "tokens": 1_000, "window": "minute"}]}}));
    let first = open(&gw1, &h1, &call(300));
    let second = open(&gw2, &h2, &call(300));
    assert!(first.trace.forwarded && second.trace.forwarded);
    // The concurrency limit counts both workers' requests.
    let third = run(&gw1, &h1, &call(10), None);
    assert_eq!(
        (third.status(), third.reply_json()["error"]["type"].as_str()),
        (429, Some("requests"))
    );
    close(&gw2, &h2, second, Some(&Upstream::chat(10, 290)));
    // The token limit counts what the other worker reserved and used: 300 used, ~310 held.
    let big = run(&gw2, &h2, &call(600), None);
    assert_eq!(
        (big.status(), big.reply_json()["error"]["type"].as_str()),
        (429, Some("tokens"))
    );
    close(&gw1, &h1, first, Some(&Upstream::chat(10, 10)));
    assert_eq!(bucket(&gw1, &h1, "team-a", "tpm"), (320, 0));
    let fits = run(&gw2, &h2, &call(600), Some(&Upstream::chat(10, 10)));
    assert!(fits.forwarded);
}

#[test]
fn the_in_flight_gauge_is_the_shared_count() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({}));
    let a = gw1.config.labels.tenant_id("team-a");
    let first = open(&gw1, &h1, &call(5));
    let second = open(&gw2, &h2, &call(5));
    assert_eq!(
        (h1.gauge(Stat::InFlight(a)), h2.gauge(Stat::InFlight(a))),
        (Some(1), Some(2))
    );
    close(&gw1, &h1, first, Some(&Upstream::chat(1, 1)));
    assert_eq!(h1.gauge(Stat::InFlight(a)), Some(1));
    close(&gw2, &h2, second, Some(&Upstream::chat(1, 1)));
    assert_eq!(h2.gauge(Stat::InFlight(a)), Some(0));
}

#[test]
fn with_a_concurrency_limit_the_gauge_is_the_slot_count() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({"tenant_defaults": {"max_concurrent": 5}}));
    let a = gw1.config.labels.tenant_id("team-a");
    let first = open(&gw1, &h1, &call(5));
    let second = open(&gw2, &h2, &call(5));
    assert_eq!(
        (h1.gauge(Stat::InFlight(a)), h2.gauge(Stat::InFlight(a))),
        (Some(1), Some(2))
    );
    close(&gw2, &h2, second, Some(&Upstream::chat(1, 1)));
    assert_eq!(h2.gauge(Stat::InFlight(a)), Some(1));
    close(&gw1, &h1, first, Some(&Upstream::chat(1, 1)));
    assert_eq!(h1.gauge(Stat::InFlight(a)), Some(0));
    // No second count was kept: the label's shared in-flight key was never written.
    let key = crate::admission::in_flight_key("team-a");
    assert_eq!(h1.store.get(&key).0, None);
}
