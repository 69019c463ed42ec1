//! Who is asking: a trusted header, Envoy metadata, undeclared tenants, the default tenant;
//! and the other APIs (Responses, Embeddings) through the same pipeline.

use serde_json::json;

use super::*;

fn chat() -> Value {
    json!({"model": "gpt-4o-mini", "messages": [], "max_tokens": 10})
}

#[test]
fn a_trusted_header_names_the_tenant() {
    let gw = gateway(json!({"identity": {"source": "header", "header": "x-tenant"}}));
    let host = Fake::new();
    let call = Call::post("/v1/chat/completions", None, chat()).header("x-tenant", "team-b");
    let t = run(&gw, &host, &call, Some(&Upstream::chat(1, 1)));
    assert_eq!(t.field("tenant"), "team-b");
    let stranger = Call::post("/v1/chat/completions", None, chat()).header("x-tenant", "nobody");
    assert_eq!(run(&gw, &host, &stranger, None).status(), 401);
}

#[test]
fn metadata_from_an_earlier_filter_names_the_tenant() {
    let path = [
        "metadata",
        "filter_metadata",
        "envoy.filters.http.jwt_authn",
        "jwt_payload",
        "tenant",
    ];
    let gw = gateway(json!({"identity": {"source": "metadata", "metadata_path": path}}));
    let host = Fake::new();
    let call = Call::post("/v1/chat/completions", None, chat());
    assert_eq!(
        run(&gw, &host, &call, None).status(),
        401,
        "no metadata, no tenant"
    );
    let key: Vec<String> = path.iter().map(|p| p.to_string()).collect();
    host.properties
        .borrow_mut()
        .push((key.clone(), b"team-a".to_vec()));
    let open = open(&gw, &host, &call);
    assert!(open.trace.forwarded);
    let t = close(&gw, &host, open, Some(&Upstream::chat(1, 1)));
    assert_eq!(t.field("tenant"), "team-a");
}

#[test]
fn undeclared_tenants_share_bounded_budget_slots() {
    let gw = gateway(json!({
        "identity": {"source": "header", "header": "x-tenant", "accept_undeclared": true,
                     "undeclared_slots": 4},
        "tenant_defaults": {"limits": [{"name": "tpm", "tokens": 1000, "window": "minute"}]}}));
    let host = Fake::new();
    for i in 0..20 {
        let call =
            Call::post("/v1/chat/completions", None, chat()).header("x-tenant", &format!("u{i}"));
        let t = run(&gw, &host, &call, Some(&Upstream::chat(1, 1)));
        assert_eq!(t.field("tenant"), format!("u{i}"));
    }
    assert!(
        host.store.len() <= 4 + 1,
        "{} keys for 20 tenants",
        host.store.len()
    );
    let bad = Call::post("/v1/chat/completions", None, chat()).header("x-tenant", "no spaces");
    assert_eq!(run(&gw, &host, &bad, None).status(), 401);
}

#[test]
fn the_default_tenant_takes_unknown_keys() {
    let mut config = json!({});
    config["identity"] = json!({"source": "api_key", "default_tenant": "team-b",
        "api_keys": [{"sha256": sha("sk-a"), "tenant": "team-a"}]});
    let gw = gateway(config);
    let host = Fake::new();
    let call = Call::post("/v1/chat/completions", Some("sk-unknown"), chat());
    assert_eq!(
        run(&gw, &host, &call, Some(&Upstream::chat(1, 1))).field("tenant"),
        "team-b"
    );
}

#[test]
fn responses_and_embeddings_are_read_in_their_own_shapes() {
    let gw = gateway(
        json!({"tenant_defaults": {"limits": [{"name": "tpm", "tokens": 100_000, "window": "minute"}]}}),
    );
    let host = Fake::new();
    let responses = Call::post(
        "/v1/responses",
        Some("sk-a"),
        json!({"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 20}),
    );
    let answer = Upstream::json(json!({"object": "response", "output": [],
        "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}));
    let t = run(&gw, &host, &responses, Some(&answer));
    assert_eq!(
        (
            t.field("api"),
            t.field("input_tokens"),
            t.field("output_tokens")
        ),
        ("responses", "5", "7")
    );
    let embeddings = Call::post(
        "/v1/embeddings",
        Some("sk-a"),
        json!({"model": "text-embedding-3-small", "input": "hi"}),
    );
    let answer = Upstream::json(json!({"object": "list", "data": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 3}}));
    let t = run(&gw, &host, &embeddings, Some(&answer));
    assert_eq!(
        (
            t.field("api"),
            t.field("input_tokens"),
            t.field("output_tokens")
        ),
        ("embeddings", "3", "0")
    );
    assert_eq!(bucket(&gw, &host, "team-a", "tpm"), (15, 0));
}
