//! Every request Tollgate answers itself: status, error shape, record, denial counter.

use serde_json::json;

use super::*;
use crate::metrics::{OTHER_ID, UNKNOWN_ID};

fn chat_body() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
}

#[test]
fn other_paths_and_methods_pass_through_untouched() {
    let gw = gateway(json!({}));
    let host = Fake::new();
    for call in [
        Call::post("/v1/models", Some("sk-a"), chat_body()),
        Call::chat(chat_body()).header(":method", "GET"),
        Call::post("/healthz", None, json!({})),
    ] {
        let t = run(&gw, &host, &call, Some(&Upstream::chat(1, 1)));
        assert!(t.passed && t.request_edits.is_empty() && t.reply.is_none());
        // The ledger records its head only: no tenant, no decision, no usage.
        assert_eq!(t.records, 1);
        let names: Vec<&str> = t.record.keys().map(String::as_str).collect();
        assert_eq!(names, ["tollgate.method", "tollgate.path"]);
    }
    // A Gemini `?key=` never reaches the ledger, even on a request Tollgate passes through.
    let get = Call::post(
        "/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSecret&alt=sse",
        None,
        json!({}),
    )
    .header(":method", "GET")
    .header("x-request-id", "client \"id\"");
    let t = run(&gw, &host, &get, Some(&Upstream::chat(1, 1)));
    assert!(
        !t.field("path").contains("AIzaSecret"),
        "{}",
        t.field("path")
    );
    assert_eq!(t.field("client_request_id"), "client \"id\"");
    assert!(host.store.is_empty() || host.stats.borrow().is_empty());
}

#[test]
fn unknown_keys_get_401_in_the_api_family_shape() {
    let gw = gateway(json!({}));
    let host = Fake::new();
    let openai = run(
        &gw,
        &host,
        &Call::post("/v1/chat/completions", Some("sk-x"), chat_body()),
        None,
    );
    assert_eq!(openai.status(), 401);
    assert_eq!(openai.reply_json()["error"]["code"], "invalid_api_key");
    assert_eq!(openai.field("decision"), "unauthenticated");
    assert_eq!(openai.field("tenant"), "");
    let anthropic = run(
        &gw,
        &host,
        &Call::post("/v1/messages", None, chat_body()),
        None,
    );
    assert_eq!(anthropic.status(), 401);
    assert_eq!(anthropic.reply_json()["type"], "error");
    assert_eq!(
        anthropic.reply_json()["error"]["type"],
        "authentication_error"
    );
    assert_eq!(
        host.counter(Stat::Denials(UNKNOWN_ID, "unauthenticated")),
        2
    );
    assert_eq!(openai.records + anthropic.records, 2);
}

#[test]
fn bodies_over_the_cap_get_413_by_header_or_by_size() {
    let gw = gateway(json!({"limits": {"max_request_body_bytes": 64}}));
    let host = Fake::new();
    let big =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(100)}]});
    let declared = Call::chat(big.clone()).header("content-length", "200");
    let t = run(&gw, &host, &declared, None);
    assert_eq!((t.status(), t.field("decision")), (413, "too_large"));
    assert_eq!(t.field("tenant"), "team-a");
    // No content-length (chunked): the body's size decides.
    let t = run(&gw, &host, &Call::chat(big), None);
    assert_eq!((t.status(), t.field("decision")), (413, "too_large"));
    let a = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::Denials(a, "too_large")), 2);
}

#[test]
fn malformed_and_missing_bodies_get_400() {
    let gw = gateway(json!({}));
    let host = Fake::new();
    for body in [&b"{not json"[..], b"[]", b"{\"messages\": []}"] {
        let t = run(&gw, &host, &Call::chat(json!({})).raw_body(body), None);
        assert_eq!(
            (t.status(), t.field("decision")),
            (400, "bad_request"),
            "{body:?}"
        );
        assert_eq!(t.reply_json()["error"]["type"], "invalid_request_error");
    }
    let t = run(&gw, &host, &Call::chat(json!({})).raw_body(b""), None);
    assert_eq!(t.status(), 400);
    assert!(
        t.reply_json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no body")
    );
    // Nothing was reserved.
    assert!(host.gauge(Stat::InFlight(OTHER_ID)).is_none());
}

#[test]
fn unknown_models_get_model_not_found_with_routing() {
    let gw = gateway(json!({"routing": {"models": {"gpt-4o-mini": {"route": "openai"}}}}));
    let host = Fake::new();
    let t = run(
        &gw,
        &host,
        &Call::chat(json!({"model": "gpt-9", "messages": []})),
        None,
    );
    assert_eq!((t.status(), t.field("decision")), (400, "model_not_found"));
    assert_eq!(t.reply_json()["error"]["code"], "model_not_found");
    assert_eq!(t.field("model"), "gpt-9");
}

#[test]
fn models_outside_the_allow_list_get_403_and_caps_400() {
    let gw =
        gateway(json!({"tenant_defaults": {"models": ["gpt-4o-mini"], "max_output_tokens": 100}}));
    let host = Fake::new();
    let t = run(
        &gw,
        &host,
        &Call::chat(json!({"model": "gpt-4o", "messages": []})),
        None,
    );
    assert_eq!(
        (t.status(), t.field("decision")),
        (403, "model_not_allowed")
    );
    let t = run(
        &gw,
        &host,
        &Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 500})),
        None,
    );
    assert_eq!((t.status(), t.field("decision")), (400, "bad_request"));
    assert_eq!(t.reply_json()["error"]["param"], "max_completion_tokens");
}

#[test]
fn spent_token_budgets_get_429_with_retry_after() {
    let gw = gateway(json!({"tenant_defaults": {"limits": [
        {"name": "tpm", "tokens": 100, "window": "minute"}]}}));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 500}));
    let t = run(&gw, &host, &call, None);
    assert_eq!((t.status(), t.field("decision")), (429, "rate_limited"));
    assert_eq!(t.reply_json()["error"]["type"], "tokens");
    let retry: u64 = t.reply_header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (0, 0));
}

#[test]
fn spent_usd_budgets_get_429_that_sdks_do_not_retry() {
    let gw = gateway(json!({"tenant_defaults": {"limits": [
        {"name": "usd", "usd": "0.000001", "window": "day"}]}}));
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 500}));
    let t = run(&gw, &host, &call, None);
    assert_eq!((t.status(), t.field("decision")), (429, "quota_exceeded"));
    assert_eq!(t.reply_header("x-should-retry").as_deref(), Some("false"));
    assert_eq!(t.reply_json()["error"]["code"], "insufficient_quota");
}

#[test]
fn the_usage_view_answers_its_token_and_only_get() {
    let gw = gateway(json!({"usage_view": {"path": "/tollgate/usage",
        "admin_token_sha256": sha("admin")}}));
    let host = Fake::new();
    let get = |token: &str, method: &str| {
        let call = Call::post("/tollgate/usage?x=1", None, json!({}))
            .header(":method", method)
            .header("authorization", &format!("Bearer {token}"));
        run(&gw, &host, &call, None)
    };
    let ok = get("admin", "GET");
    assert_eq!(ok.status(), 200);
    let view: Value = serde_json::from_slice(&ok.reply.as_ref().unwrap().body).unwrap();
    assert!(view["tenants"].is_array() || view["tenants"].is_object());
    assert_eq!(ok.field("decision"), "usage_view");
    assert_eq!(get("nope", "GET").status(), 401);
    let post = get("admin", "POST");
    assert_eq!(
        (post.status(), post.reply_header("allow").as_deref()),
        (405, Some("GET"))
    );
}

#[test]
fn the_usage_view_reads_the_bearer_scheme_case_insensitively() {
    let gw = gateway(json!({"usage_view": {"path": "/tollgate/usage",
        "admin_token_sha256": sha("admin")}}));
    let host = Fake::new();
    let get = |authorization: &str| {
        let call = Call::post("/tollgate/usage", None, json!({}))
            .header(":method", "GET")
            .header("authorization", authorization);
        run(&gw, &host, &call, None).status()
    };
    for ok in [
        "Bearer admin",
        "bearer admin",
        "BEARER admin",
        "bEaReR  admin ",
    ] {
        assert_eq!(get(ok), 200, "{ok:?}");
    }
    for refused in [
        "Basic admin",
        "Bearer",
        "bearer nope",
        "Bearer: admin",
        "admin",
    ] {
        assert_eq!(get(refused), 401, "{refused:?}");
    }
}

#[test]
fn the_client_routing_header_is_dropped_and_identity_asked_for() {
    let gw = gateway(json!({}));
    let host = Fake::new();
    let call = Call::chat(chat_body()).header("x-tollgate-route", "evil");
    let t = run(&gw, &host, &call, Some(&Upstream::chat(1, 1)));
    assert!(t.forwarded);
    assert!(
        t.request_edits
            .contains(&("x-tollgate-route".to_string(), None))
    );
    assert_eq!(
        t.request_edit("accept-encoding").as_deref(),
        Some("identity")
    );
}

#[test]
fn a_vm_buffers_at_most_its_cap_of_request_bytes() {
    let limits = json!({"max_request_body_bytes": 100, "max_buffered_request_bytes": 250});
    let gw = gateway(json!({ "limits": limits }));
    let host = Fake::new();
    let call = Call::chat(chat_body());
    let started = || {
        let mut request = Request::new();
        let headers = Headers(call.headers.clone());
        let effects = request.on_request_headers(&gw, &host, headers, false);
        assert!(effects.pause && effects.reply.is_none());
        request
    };
    let unread = || -> Vec<u8> { panic!("the body is read once, at its end") };
    let (mut a, mut b, mut c) = (started(), started(), started());
    assert!(
        a.on_request_body(&gw, &host, 100, false, unread)
            .reply
            .is_none()
    );
    assert!(
        b.on_request_body(&gw, &host, 90, false, unread)
            .reply
            .is_none()
    );
    assert_eq!(Request::buffered_bytes(&gw), 190);
    // 60 more would pass 250: refused with 429 in the API's shape, retry soon.
    let refused = c.on_request_body(&gw, &host, 61, false, unread);
    let reply = refused.reply.unwrap();
    assert_eq!((reply.status, reply.reason), (429, "rate_limited"));
    let error: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert!(reply.headers.contains(&("retry-after", "1".to_string())));
    assert_eq!(Request::buffered_bytes(&gw), 190);
    // A body that reaches its end is read and forwarded: Envoy holds it until the upstream
    // answers, then its bytes are given back.
    let body = serde_json::to_vec(&chat_body()).unwrap();
    let len = body.len() as u64;
    let done = a.on_request_body(&gw, &host, body.len(), true, || body);
    assert!(done.reply.is_none() && !done.pause);
    assert_eq!(Request::buffered_bytes(&gw), 90 + len);
    let head = Headers(vec![(":status".into(), b"200".to_vec())]);
    a.on_response_headers(&gw, &host, head, false);
    assert_eq!(Request::buffered_bytes(&gw), 90);
    let mut d = started();
    assert!(
        d.on_request_body(&gw, &host, 100, false, unread)
            .reply
            .is_none()
    );
    assert_eq!(Request::buffered_bytes(&gw), 190);
    // A request that goes away (client reset) gives its bytes back.
    drop(b);
    drop(d);
    assert_eq!(Request::buffered_bytes(&gw), 0);
    c.on_log(&gw, &host);
    let a_label = gw.config.labels.tenant_id("team-a");
    assert_eq!(host.counter(Stat::Denials(a_label, "rate_limited")), 1);
}
