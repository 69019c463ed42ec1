//! End users inside a tenant: per-user limits in bounded slots, users from a trusted header or
//! the body, collisions counted, the ledger's pseudonym.

use serde_json::json;

use super::*;
use crate::pipeline::Refilled;

/// team-a: 100,000 tokens a day, each user 1,200 (a request here reserves ~310, is charged
/// 1,040). Users from `x-user`.
fn per_user(slots: u64, source: Value) -> Gateway {
    gateway(json!({
        "identity": {"source": "api_key", "api_keys": [
            {"sha256": sha("sk-a"), "tenant": "team-a"},
            {"sha256": sha("sk-b"), "tenant": "team-b"}],
            "user": source, "user_slots": slots},
        "tenants": {
            "team-a": {"limits": [{"name": "tpd", "tokens": 100000, "window": "day"}],
                       "user_limits": [{"name": "user-tpd", "tokens": 1200, "window": "day"}]},
            "team-b": {}
        }
    }))
}

fn header_users(slots: u64) -> Gateway {
    per_user(slots, json!({"source": "header", "header": "x-user"}))
}

fn ask(user: Option<&str>) -> Call {
    let call = Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 40,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}));
    match user {
        Some(user) => call.header("x-user", user),
        None => call,
    }
}

fn answer() -> Upstream {
    Upstream::chat(1000, 40)
}

#[test]
fn each_user_has_a_budget_of_their_own_inside_the_tenants() {
    let gw = header_users(1024);
    let host = Fake::new();
    let t = run(&gw, &host, &ask(Some("alice")), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    // The ledger names the user by a pseudonym, never the id.
    let alice = t.field("user").to_string();
    assert_eq!(alice.len(), 16);
    assert!(!alice.contains("alice"));
    // Alice's own budget refuses her next request...
    let t = run(&gw, &host, &ask(Some("alice")), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("refused_by"), "team-a/user-tpd");
    assert_eq!(t.field("user"), alice);
    // ...while Bob, and requests without a user, go on.
    let t = run(&gw, &host, &ask(Some("bob")), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_ne!(t.field("user"), alice);
    let t = run(&gw, &host, &ask(None), Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    assert_eq!(t.field("user"), "");
    // The tenant's limit counts everyone.
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (3120, 0));
    // A tenant without per-user limits is not touched by them.
    let b = Call::post(
        "/v1/chat/completions",
        Some("sk-b"),
        json!({"model": "gpt-4o-mini", "messages": []}),
    );
    assert!(run(&gw, &host, &b.header("x-user", "alice"), Some(&answer())).forwarded);
}

#[test]
fn users_in_one_slot_share_it_stricter_never_looser_and_are_counted() {
    let gw = header_users(1);
    let host = Fake::new();
    let a = gw.config.labels.tenant_id("team-a");
    let collisions = Stat::UserSlotCollisions(a);
    assert!(run(&gw, &host, &ask(Some("alice")), Some(&answer())).forwarded);
    assert_eq!(host.counter(collisions), 0);
    // One slot: Bob shares Alice's budget, so he is refused where alone he would not be.
    let t = run(&gw, &host, &ask(Some("bob")), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.field("refused_by"), "team-a/user-tpd");
    assert_eq!(host.counter(collisions), 1);
    // Alice again after Bob: the slot changed hands again.
    run(&gw, &host, &ask(Some("alice")), None);
    assert_eq!(host.counter(collisions), 2);
    run(&gw, &host, &ask(Some("alice")), None);
    assert_eq!(host.counter(collisions), 2);
}

#[test]
fn the_body_names_the_user_in_each_apis_own_field() {
    let gw = per_user(1024, json!({"source": "body", "ledger": "raw"}));
    let host = Fake::new();
    let chat = Call::chat(
        json!({"model": "gpt-4o-mini", "max_tokens": 40, "user": "u-17",
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}),
    );
    let t = run(&gw, &host, &chat, Some(&answer()));
    assert_eq!(t.field("user"), "u-17");
    let messages = Call::post(
        "/v1/messages",
        Some("sk-a"),
        json!({"model": "claude-3-5-haiku", "max_tokens": 40, "metadata": {"user_id": "u-17"},
               "messages": [{"role": "user", "content": "x".repeat(1000)}]}),
    );
    let answer = Upstream::json(
        json!({"type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 1000, "output_tokens": 40}}),
    );
    let t = run(&gw, &host, &messages, None);
    // The same user, across APIs: the second request is over u-17's 1,200.
    assert_eq!(t.status(), 429, "{:?}", t.reply_json());
    assert_eq!(t.field("user"), "u-17");
    // Not a string: no user (the body is not refused for it).
    let odd = Call::chat(json!({"model": "gpt-4o-mini", "max_tokens": 40, "user": 17,
        "messages": [{"role": "user", "content": "x".repeat(1000)}]}));
    let t = run(&gw, &host, &odd, Some(&answer));
    assert!(t.forwarded);
    assert_eq!(t.field("user"), "");
}

/// Natively only: 100,000 requests through the pipeline take seconds, minutes under node.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn a_hundred_thousand_user_ids_stay_in_the_configured_key_space() {
    let gw = header_users(64);
    let host = Fake::new();
    let bound = gw.config.shared_keys().len();
    let before = host.store.len();
    assert!(before <= bound);
    for n in 0..100_000u32 {
        let t = run(&gw, &host, &ask(Some(&format!("user-{n}"))), None);
        assert!(t.records == 1);
    }
    // No key was created that the configuration does not imply.
    assert!(host.store.len() <= bound, "{} > {bound}", host.store.len());
}

#[test]
fn a_global_per_user_limit_leases_each_user_slot_apart() {
    use super::global::{ok, serve};
    use crate::global::rls::RateLimitRequest;
    let gw = gateway(json!({
        "identity": {"source": "api_key", "api_keys": [{"sha256": sha("sk-a"), "tenant": "team-a"}],
            "user": {"source": "header", "header": "x-user"}, "user_slots": 64},
        "global_budgets": {"cluster": "rls", "domain": "tg", "replicas": 2, "refill_share": 0.5},
        "tenants": {"team-a": {"strict": true,
            "user_limits": [{"name": "user-tpd", "tokens": 2000, "window": "day", "global": true}]}}}));
    let host = Fake::new();
    let scope = |asked: &[RateLimitRequest]| {
        let entries = &asked.first().unwrap().descriptors[0].entries;
        let scope = entries.iter().find(|e| e.key == "tollgate.scope").unwrap();
        scope.value.clone()
    };
    // Alice's first request waits for her slot's lease: the service counts her slot apart.
    let mut first = open(&gw, &host, &ask(Some("alice")));
    assert!(first.trace.waiting);
    let (asked, woken) = serve(&gw, &host, |_| ok());
    let alice_slot = gw.config.users.as_ref().unwrap().user(b"alice").slot;
    assert_eq!(scope(&asked), format!("team-a:u{alice_slot}"));
    assert_eq!(woken.len(), 1);
    resume(&gw, &host, &mut first, Refilled::Grew);
    let t = close(&gw, &host, first, Some(&answer()));
    assert_eq!(t.field("decision"), "admitted");
    // Bob's requests lease his own slot's counter.
    let bob = open(&gw, &host, &ask(Some("bob")));
    assert!(bob.trace.waiting);
    let (asked, _) = serve(&gw, &host, |_| ok());
    let bob_slot = gw.config.users.as_ref().unwrap().user(b"bob").slot;
    assert_ne!(alice_slot, bob_slot, "the two ids share no slot of 64");
    assert_eq!(scope(&asked), format!("team-a:u{bob_slot}"));
}

#[test]
fn user_settings_are_checked_at_load() {
    let err = |json: Value| Config::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    let limits = json!([{"tokens": 5, "window": "day"}]);
    let e = err(json!({"identity": {"source": "header", "header": "x-t"},
        "tenants": {"a": {"user_limits": limits}}}));
    assert_eq!(e.field, "tenants.a.user_limits");
    let e = err(json!({"identity": {"source": "header", "header": "x-t",
        "user": {"source": "body"}, "user_slots": 0}}));
    assert_eq!(e.field, "identity.user_slots");
    let e = err(json!({"identity": {"source": "header", "header": "x-t",
        "user": {"source": "header"}}}));
    assert_eq!(e.field, "identity.user.header");
    let e = err(json!({"identity": {"source": "header", "header": "x-t",
        "user": {"source": "body", "ledger": "plain"}}}));
    assert_eq!(e.field, "identity.user.ledger");
    let e = err(json!({"identity": {"source": "header", "header": "x-t", "user_slots": 8}}));
    assert_eq!(e.field, "identity.user_slots");
    // A global per-user limit needs the service, as any global limit.
    let e = err(json!({"identity": {"source": "header", "header": "x-t",
        "user": {"source": "body"}},
        "tenants": {"a": {"user_limits": [{"tokens": 5, "window": "day", "global": true}]}}}));
    assert_eq!(e.field, "global_budgets");
    // The key space is bounded: 65,536 slots × (2 limits + the slot owner) × 8 tenants is
    // above 2^20 keys.
    let tenants: serde_json::Map<String, Value> = (0..8)
        .map(|i| {
            (
                format!("t{i}"),
                json!({"user_limits": [{"name": "a", "tokens": 5, "window": "day"},
                                       {"name": "b", "tokens": 5, "window": "hour"}]}),
            )
        })
        .collect();
    let e = err(json!({"identity": {"source": "header", "header": "x-t",
        "user": {"source": "body"}, "user_slots": 65536}, "tenants": tenants}));
    assert_eq!(e.field, "identity.user_slots");
    assert!(e.reason.contains("1572864"), "{}", e.reason);
}
