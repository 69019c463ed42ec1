//! Two workers (two VMs of one Envoy process) interleaving on one shared store.

use serde_json::json;

use super::*;
use crate::metrics::Webhook;

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

#[test]
fn budget_alerts_are_counted_once_per_threshold_per_window_across_workers() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({"tenant_defaults": {"limits": [
        {"name": "tpd", "tokens": 10_000, "window": "day", "alert_at": [0.5, 0.8, 1.0]},
        {"name": "next", "tokens": 5_000, "window": "day", "mode": "shadow", "alert_at": [0.5]}]}}));
    let labels = &gw1.config.labels;
    let a = labels.tenant_id("team-a");
    let (tpd, next) = (labels.limit_id("tpd"), labels.limit_id("next"));
    let alerts = |permille| {
        h1.counter(Stat::BudgetAlerts(a, tpd, permille))
            + h2.counter(Stat::BudgetAlerts(a, tpd, permille))
    };
    // Each request is charged 1,020 tokens; the workers take turns.
    let big = Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}));
    for n in 0..12u64 {
        let (gw, host) = if n % 2 == 0 { (&gw1, &h1) } else { (&gw2, &h2) };
        let t = run(gw, host, &big, Some(&Upstream::chat(1000, 20)));
        if t.reply.is_some() {
            break;
        }
    }
    assert_eq!((alerts(500), alerts(800), alerts(1000)), (1, 1, 1));
    // The shadow limit alerts too (it is reported, never refusing).
    let shadow =
        h1.counter(Stat::BudgetAlerts(a, next, 500)) + h2.counter(Stat::BudgetAlerts(a, next, 500));
    assert_eq!(shadow, 1);
    assert_eq!(
        Stat::BudgetAlerts(a, tpd, 800).name(labels),
        "tollgate.tenant.team-a.limit.tpd.threshold.80.budget_alerts"
    );
    // The next day's window crosses anew.
    h1.advance(86_400_000);
    h2.advance(86_400_000);
    for _ in 0..6 {
        run(&gw1, &h1, &big, Some(&Upstream::chat(1000, 20)));
    }
    assert_eq!(alerts(500), 2);
}

#[test]
fn alert_webhooks_are_posted_once_per_crossing_from_the_root_with_bounded_retries() {
    let ((gw1, h1), (gw2, h2)) = two_workers(json!({
        "alerts": {"cluster": "alerts", "retries": 1, "replica": "envoy-1"},
        "tenant_defaults": {"limits": [
            {"name": "tpd", "tokens": 10_000, "window": "day", "alert_at": [0.5, 0.8, 1.0]}]}}));
    let big = Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}));
    let mut timers = 0;
    for n in 0..12u64 {
        let (gw, host) = if n % 2 == 0 { (&gw1, &h1) } else { (&gw2, &h2) };
        let t = run(gw, host, &big, Some(&Upstream::chat(1000, 20)));
        timers += usize::from(gw.take_timer());
        // Never on the request's path: the events wait for the root's timer.
        assert!(host.posts.borrow().is_empty());
        if t.reply.is_some() {
            break;
        }
    }
    assert!(timers >= 1);
    for (gw, host) in [(&gw1, &h1), (&gw2, &h2)] {
        assert!(gw.tick_period(host.now_ms()) >= 1);
        assert!(gw.on_tick(host).is_empty());
    }
    let posts: Vec<(u32, Vec<u8>, usize)> = [&h1, &h2]
        .iter()
        .enumerate()
        .flat_map(|(w, h)| {
            h.posts
                .borrow()
                .iter()
                .map(|(t, b)| (*t, b.clone(), w))
                .collect::<Vec<_>>()
        })
        .collect();
    let events: Vec<Value> = posts
        .iter()
        .map(|(_, b, _)| serde_json::from_slice(b).unwrap())
        .collect();
    let mut thresholds: Vec<f64> = events
        .iter()
        .map(|e| e["threshold"].as_f64().unwrap())
        .collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(
        thresholds,
        vec![0.5, 0.8, 1.0],
        "once per crossing across both workers"
    );
    for e in &events {
        assert_eq!(
            (e["version"].as_u64(), e["tenant"].as_str()),
            (Some(1), Some("team-a"))
        );
        assert_eq!(
            (e["limit"].as_str(), e["replica"].as_str()),
            (Some("tpd"), Some("envoy-1"))
        );
        assert!(e["used"].as_f64().unwrap() >= e["threshold"].as_f64().unwrap() * 10_000.0);
        assert_eq!(e["resets_at"], "2026-11-29T00:00:00Z");
    }
    // The receiver fails every call: each event is tried twice (one retry), then given up.
    for (token, _, w) in &posts {
        let (gw, host) = if *w == 0 { (&gw1, &h1) } else { (&gw2, &h2) };
        gw.webhook_answered(host, *token, Some(503));
    }
    for (gw, host) in [(&gw1, &h1), (&gw2, &h2)] {
        gw.on_tick(host);
        host.advance(499);
        gw.on_tick(host);
        assert_eq!(
            host.posts.borrow().len(),
            host.counter(Stat::Webhooks(Webhook::Sent)) as usize
        );
        host.advance(1);
        gw.on_tick(host);
        let retried: Vec<u32> = host.posts.borrow().iter().map(|(t, _)| *t).collect();
        for token in retried {
            gw.webhook_answered(host, token, None);
        }
        assert_eq!(gw.tick_period(host.now_ms()), 0, "nothing left to send");
    }
    let count = |w| h1.counter(Stat::Webhooks(w)) + h2.counter(Stat::Webhooks(w));
    assert_eq!((count(Webhook::Sent), count(Webhook::Failed)), (6, 3));
    assert_eq!(count(Webhook::Delivered), 0);
}

#[test]
fn alert_webhooks_are_dropped_beyond_the_bound_and_fail_without_a_cluster() {
    let gw = gateway(json!({
        "alerts": {"cluster": "missing", "retries": 0, "max_queued": 2},
        "tenant_defaults": {"limits": [{"name": "tpd", "tokens": 1000, "window": "day",
            "alert_at": [0.1, 0.2, 0.3, 1.0]}]}}));
    let host = Fake::new();
    let big = Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 20,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}));
    run(&gw, &host, &big, Some(&Upstream::chat(1000, 20)));
    assert_eq!(host.counter(Stat::Webhooks(Webhook::Dropped)), 2);
    gw.on_tick(&host);
    assert_eq!(host.counter(Stat::Webhooks(Webhook::Failed)), 2);
    let (l, limits) = (&gw.config.labels, &gw.config.labels);
    let stat = Stat::BudgetAlerts(l.tenant_id("team-a"), limits.limit_id("tpd"), 1000);
    assert_eq!(host.counter(stat), 1, "counted even so");
}

#[test]
fn alert_webhook_settings_are_checked_at_load() {
    let err = |alerts: Value| {
        let json = json!({"identity": {"source": "header", "header": "x-t"}, "alerts": alerts});
        Config::from_json(&serde_json::to_vec(&json).unwrap())
            .unwrap_err()
            .field
    };
    assert_eq!(err(json!({"cluster": ""})), "alerts.cluster");
    assert_eq!(err(json!({"cluster": "a", "path": "x"})), "alerts.path");
    assert_eq!(
        err(json!({"cluster": "a", "retries": 11})),
        "alerts.retries"
    );
    assert_eq!(
        err(json!({"cluster": "a", "max_in_flight": 0})),
        "alerts.max_in_flight"
    );
    assert_eq!(
        err(json!({"cluster": "a", "max_queued": 5000})),
        "alerts.max_queued"
    );
    assert_eq!(
        err(json!({"cluster": "a", "timeout_ms": 0})),
        "alerts.timeout_ms"
    );
}

#[test]
fn alert_thresholds_are_checked_at_load() {
    let err = |limit: Value| {
        let json = json!({"identity": {"source": "header", "header": "x-t"},
            "tenant_defaults": {"limits": [limit]}});
        Config::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err()
    };
    let e = err(json!({"tokens": 5, "window": "day", "alert_at": [0.8, 0.5]}));
    assert_eq!(e.field, "tenant_defaults.limits[0].alert_at[1]");
    let e = err(json!({"tokens": 5, "window": "day", "alert_at": [1.5]}));
    assert_eq!(e.field, "tenant_defaults.limits[0].alert_at[0]");
    let e = err(
        json!({"tokens": 5, "window": "day", "alert_at": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}),
    );
    assert_eq!(e.field, "tenant_defaults.limits[0].alert_at");
}

#[test]
fn an_upgrade_keeps_the_windows_usage_from_the_per_bucket_keys_of_earlier_builds() {
    let limits = json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 1000, "window": "minute"},
        {"name": "usd", "usd": "1", "window": "day"}]}});
    let ((a, first), (b, second)) = two_workers(limits);
    // What the earlier build left under the same vm_id: team-a used 900 tokens this minute, with
    // 50 still reserved by a request of the old code.
    let (policy, _) = a.tenant_budget("team-a");
    let mut old = crate::budget::Bucket::decode(None).at(&policy.limits[0], T0, policy.epoch(T0));
    old.used = 900;
    old.held.hold(50);
    first
        .store
        .set("tg:b2:team-a:tpm", &old.encode(), 0)
        .unwrap();
    a.prepare(&first);
    b.prepare(&second);
    assert_eq!(bucket(&a, &first, "team-a", "tpm"), (900, 0));
    assert_eq!(bucket(&b, &second, "team-a", "usd"), (0, 0));
    // The upgraded workers go on from there: 100 tokens left, and the old code's settlement
    // (into the old key) is not counted twice.
    assert_eq!(
        run(&a, &first, &call(200), Some(&Upstream::chat(10, 20))).status(),
        429
    );
    let t = run(&b, &second, &call(60), Some(&Upstream::chat(10, 20)));
    assert!(t.forwarded);
    assert_eq!(bucket(&a, &first, "team-a", "tpm"), (930, 0));
    assert_eq!(bucket(&a, &first, "team-b", "tpm"), (0, 0));
}
