//! Gemini, Vertex and Bedrock through the whole pipeline: the model from the path, keys from
//! `x-goog-api-key` and `?key=`, each provider's usage, strict mode's edits, routing in the
//! path, refusals in each API's own shape.

use serde_json::json;

use super::*;

fn metered(extra: Value) -> Gateway {
    let mut base = json!({
        "tenant_defaults": {"limits": [{"name": "tpd", "tokens": 1_000_000, "window": "day"}]},
        "prices": {"*": {"input": "1", "output": "1"}},
    });
    if let (Some(b), Value::Object(extra)) = (base.as_object_mut(), extra) {
        b.extend(extra);
    }
    gateway(base)
}

fn gemini(path: &str, body: Value) -> Call {
    Call::post(path, None, body).header("x-goog-api-key", "sk-a")
}

const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

fn gemini_answer(usage: Value) -> Value {
    json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]},
                            "finishReason": "STOP", "index": 0}],
           "usageMetadata": usage, "modelVersion": "gemini-2.5-flash", "responseId": "r1"})
}

fn raw(content_type: &'static str, chunks: Vec<Vec<u8>>) -> Upstream {
    Upstream {
        status: 200,
        content_type,
        chunks,
        complete: true,
        details: None,
    }
}

fn charged(t: &Trace) -> (u64, u64) {
    (
        t.field("input_tokens").parse().unwrap(),
        t.field("output_tokens").parse().unwrap(),
    )
}

#[test]
fn gemini_is_charged_as_google_bills_thoughts_and_tool_prompts_included() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hello ".repeat(100)}]}]});
    let usage = json!({"promptTokenCount": 100, "cachedContentTokenCount": 40,
        "toolUsePromptTokenCount": 7, "candidatesTokenCount": 20, "thoughtsTokenCount": 30,
        "totalTokenCount": 157});
    let t = run(
        &gw,
        &host,
        &gemini(GENERATE, body),
        Some(&Upstream::json(gemini_answer(usage))),
    );
    assert!(t.forwarded);
    assert_eq!(t.field("api"), "generate_content");
    assert_eq!(t.field("model"), "gemini-2.5-flash");
    assert_eq!(t.field("usage_source"), "reported");
    assert_eq!(charged(&t), (107, 50));
    assert_eq!(t.field("cached_input_tokens"), "40");
    assert_eq!(t.field("reasoning_tokens"), "30");
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (157, 0));
}

#[test]
fn a_query_key_identifies_and_is_cut_from_the_path_even_when_refused() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let body = json!({"contents": []});
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=sk-b";
    let call = Call::post(path, None, body.clone());
    let t = open(&gw, &host, &call);
    assert!(t.trace.forwarded);
    assert_eq!(
        t.trace.request_path.as_deref(),
        Some(&b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"[..])
    );
    let t = close(&gw, &host, t, None);
    assert_eq!(t.field("tenant"), "team-b");
    // An unknown key: 401 in Google's shape, and the key is cut all the same.
    let call = Call::post(
        "/v1/models/m:generateContent?key=sk-nobody",
        None,
        body.clone(),
    );
    let t = run(&gw, &host, &call, None);
    assert_eq!(t.status(), 401);
    assert_eq!(t.reply_json()["error"]["status"], "UNAUTHENTICATED");
    assert_eq!(t.reply_json()["error"]["code"], 401);
    assert_eq!(
        t.request_path.as_deref(),
        Some(&b"/v1/models/m:generateContent"[..])
    );
    // Two different keys (header and query): refused, never one of them picked.
    let call = Call::post("/v1/models/m:generateContent?key=sk-b", None, body)
        .header("x-goog-api-key", "sk-a");
    assert_eq!(run(&gw, &host, &call, None).status(), 401);
}

#[test]
fn gemini_streams_keep_the_last_running_total_in_both_formats() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let body = json!({"contents": []});
    let chunk = |out: u64| {
        gemini_answer(json!({"promptTokenCount": 10, "candidatesTokenCount": out,
                             "totalTokenCount": 10 + out}))
    };
    // SSE with CRLF line ends, a running total on every chunk: the last one counts, not the sum.
    let sse: Vec<Vec<u8>> = [3, 6, 9]
        .iter()
        .map(|out| format!("data: {}\r\n\r\n", chunk(*out)).into_bytes())
        .collect();
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let t = run(
        &gw,
        &host,
        &gemini(path, body.clone()),
        Some(&raw("text/event-stream", sse)),
    );
    assert_eq!(t.field("usage_source"), "reported");
    assert_eq!(charged(&t), (10, 9));
    assert_eq!(t.field("stream"), "true");
    // Without `alt=sse`: one JSON array, streamed in pieces cut anywhere.
    let array = format!("[{},\r\n{}]", chunk(4), chunk(8)).into_bytes();
    let pieces: Vec<Vec<u8>> = array.chunks(7).map(<[u8]>::to_vec).collect();
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
    let t = run(
        &gw,
        &host,
        &gemini(path, body),
        Some(&raw("application/json", pieces)),
    );
    assert_eq!(charged(&t), (10, 8));
}

#[test]
fn strict_mode_caps_gemini_output_per_candidate() {
    let gw = metered(
        json!({"tenant_defaults": {"strict": true, "default_output_tokens": 300,
        "limits": [{"name": "tpd", "tokens": 1_000_000, "window": "day"}]}}),
    );
    let host = Fake::new();
    let body = json!({"contents": [], "generationConfig": {"candidateCount": 2}});
    let t = open(&gw, &host, &gemini(GENERATE, body));
    assert!(t.trace.forwarded);
    assert_eq!(
        t.trace.upstream_json()["generationConfig"],
        json!({"candidateCount": 2, "maxOutputTokens": 300})
    );
    let (_, reserved) = bucket(&gw, &host, "team-a", "tpd");
    assert!(reserved >= 600, "two candidates of 300: {reserved}");
    close(&gw, &host, t, None);
    // A zero or a string count is refused in Google's shape, naming the field.
    let body = json!({"contents": [], "generationConfig": {"maxOutputTokens": 0}});
    let t = run(&gw, &host, &gemini(GENERATE, body), None);
    assert_eq!(t.status(), 400);
    assert_eq!(t.reply_json()["error"]["status"], "INVALID_ARGUMENT");
}

#[test]
fn count_tokens_is_admitted_and_never_charged() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let path = "/v1beta/models/gemini-2.5-flash:countTokens";
    let answer = Upstream::json(json!({"totalTokens": 31}));
    let t = run(
        &gw,
        &host,
        &gemini(path, json!({"contents": []})),
        Some(&answer),
    );
    assert!(t.forwarded);
    assert_eq!(t.field("api"), "count_tokens");
    assert_eq!(charged(&t), (0, 0));
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (0, 0));
}

const CONVERSE: &str = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse";

fn bedrock(path: &str, body: Value) -> Call {
    Call::post(path, Some("sk-a"), body)
}

#[test]
fn converse_charges_cache_tokens_and_strict_mode_sets_inference_config() {
    let gw = metered(
        json!({"tenant_defaults": {"strict": true, "default_output_tokens": 200,
        "limits": [{"name": "tpd", "tokens": 1_000_000, "window": "day"}]}}),
    );
    let host = Fake::new();
    let body = json!({"messages": [{"role": "user", "content": [{"text": "hi ".repeat(500)}]}],
                      "inferenceConfig": {"temperature": 0.5}});
    let answer = Upstream::json(json!({
        "output": {"message": {"role": "assistant", "content": [{"text": "hello"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 5, "outputTokens": 9, "totalTokens": 1014,
                  "cacheReadInputTokens": 600, "cacheWriteInputTokens": 400},
        "metrics": {"latencyMs": 100}}));
    let t = open(&gw, &host, &bedrock(CONVERSE, body));
    assert_eq!(
        t.trace.upstream_json()["inferenceConfig"],
        json!({"temperature": 0.5, "maxTokens": 200})
    );
    let t = close(&gw, &host, t, Some(&answer));
    assert_eq!(t.field("api"), "converse");
    assert_eq!(t.field("model"), "anthropic.claude-3-5-haiku-20241022-v1:0");
    assert_eq!(charged(&t), (1005, 9));
    assert_eq!(t.field("cached_input_tokens"), "600");
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/eventstream/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).unwrap()
}

#[test]
fn bedrock_event_streams_are_read_as_they_pass() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let stream = fixture("converse_stream.bin");
    let pieces: Vec<Vec<u8>> = stream.chunks(13).map(<[u8]>::to_vec).collect();
    let path = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-sonnet-4/converse-stream";
    let t = run(
        &gw,
        &host,
        &bedrock(path, body_of()),
        Some(&raw("application/vnd.amazon.eventstream", pieces)),
    );
    assert_eq!(t.field("usage_source"), "reported");
    assert_eq!(charged(&t), (25 + 3000 + 1200, 12));
    assert_eq!(
        t.field("model"),
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4"
    );
    // Invoke: the chunks' base64 Anthropic events.
    let path = "/model/arn:aws:bedrock:us-east-1:1:application-inference-profile/abc/invoke-with-response-stream";
    let body = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "z".repeat(5000)}]});
    let invoke = raw(
        "application/vnd.amazon.eventstream",
        vec![fixture("invoke_stream.bin")],
    );
    let t = run(&gw, &host, &bedrock(path, body), Some(&invoke));
    assert_eq!(t.field("api"), "invoke");
    assert_eq!(charged(&t), (25 + 3000 + 1200, 15));
    // A throttling exception inside the 200 stream: a failed answer, only what passed charged.
    let throttled = raw(
        "application/vnd.amazon.eventstream",
        vec![fixture("converse_throttled.bin")],
    );
    let t = run(
        &gw,
        &host,
        &bedrock(
            CONVERSE.replace("converse", "converse-stream").as_str(),
            body_of(),
        ),
        Some(&throttled),
    );
    assert_eq!(t.field("usage_anomaly"), "stream_exception");
    assert_eq!(t.field("usage_source"), "observed");
    // A corrupt frame: reading stops, the anomaly says why, nothing traps.
    let mut corrupt = fixture("converse_stream.bin");
    if let Some(b) = corrupt.get_mut(40) {
        *b ^= 0xff;
    }
    let t = run(
        &gw,
        &host,
        &bedrock(&CONVERSE.replace("converse", "converse-stream"), body_of()),
        Some(&raw("application/vnd.amazon.eventstream", vec![corrupt])),
    );
    assert!(
        t.field("usage_anomaly").starts_with("eventstream_"),
        "{}",
        t.field("usage_anomaly")
    );
}

/// A Converse body large enough for the cache tokens the fixtures report.
fn body_of() -> Value {
    json!({"messages": [{"role": "user", "content": [{"text": "y".repeat(5000)}]}]})
}

#[test]
fn routing_rewrites_the_model_in_the_path_not_the_body() {
    let gw = metered(json!({"routing": {"models": {
        "haiku": {"route": "bedrock", "upstream_model": "arn:aws:bedrock:us-east-1:1:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0"},
        "gemini-2.5-flash": {"route": "google"}}}}));
    let host = Fake::new();
    let body = json!({"messages": []});
    let t = run(
        &gw,
        &host,
        &bedrock("/model/haiku/converse?x=1", body.clone()),
        Some(&Upstream::json(
            json!({"usage": {"inputTokens": 1, "outputTokens": 1}}),
        )),
    );
    assert_eq!(
        t.request_edit(":path").as_deref(),
        Some(
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse?x=1"
        )
    );
    assert_eq!(t.upstream_json(), body);
    assert_eq!(
        t.request_edit("x-tollgate-route").as_deref(),
        Some("bedrock")
    );
    // A Bedrock ARN that arrived with a raw `/` (Envoy unescapes `%2F`) goes out encoded.
    let raw_slash = "/model/arn:aws:bedrock:us-east-1:1:application-inference-profile/abc/converse";
    let gw2 = metered(json!({}));
    let t = run(
        &gw2,
        &host,
        &bedrock(raw_slash, json!({"messages": []})),
        None,
    );
    assert_eq!(
        t.request_edit(":path").as_deref(),
        Some(
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Aapplication-inference-profile%2Fabc/converse"
        )
    );
    // Same upstream name: the path stays as the client sent it.
    let t = run(&gw, &host, &gemini(GENERATE, json!({"contents": []})), None);
    assert_eq!(t.request_edit(":path"), None);
    // An unknown model in the path: refused in the API's shape.
    let t = run(&gw, &host, &bedrock("/model/nope/converse", body), None);
    assert_eq!(t.status(), 400);
    assert_eq!(
        t.reply_header("x-amzn-errortype").as_deref(),
        Some("ValidationException")
    );
}

#[test]
fn spent_budgets_refuse_in_each_apis_shape_without_retry_loops() {
    let gw = metered(
        json!({"tenant_defaults": {"limits": [{"name": "monthly", "usd": "0.015", "window": "month"}]},
        "prices": {"*": {"input": "1", "output": "1"}}}),
    );
    let host = Fake::new();
    // Spend it.
    let big = json!({"contents": [{"parts": [{"text": "x".repeat(40_000)}]}],
                     "generationConfig": {"maxOutputTokens": 10}});
    let answer = gemini_answer(json!({"promptTokenCount": 20_000, "candidatesTokenCount": 10}));
    let t = run(
        &gw,
        &host,
        &gemini(GENERATE, big),
        Some(&Upstream::json(answer)),
    );
    assert!(t.forwarded, "{:?}", t.reply);
    let t = run(
        &gw,
        &host,
        &bedrock(CONVERSE, json!({"messages": []})),
        None,
    );
    assert_eq!(t.status(), 400);
    assert_eq!(
        t.reply_header("x-amzn-errortype").as_deref(),
        Some("ServiceQuotaExceededException")
    );
    assert!(t.reply_json()["message"].is_string());
    let t = run(&gw, &host, &gemini(GENERATE, json!({"contents": []})), None);
    assert_eq!(t.status(), 429);
    assert_eq!(t.reply_json()["error"]["status"], "RESOURCE_EXHAUSTED");
}

#[test]
fn claude_on_vertex_reads_the_anthropic_body_with_the_model_in_the_path() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let path = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict";
    let body = json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 50, "messages": []});
    let answer = Upstream::json(json!({"type": "message", "content": [],
        "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 5}}));
    let t = run(&gw, &host, &gemini(path, body), Some(&answer));
    assert_eq!(t.field("api"), "raw_predict");
    assert_eq!(t.field("model"), "claude-sonnet-4@20250514");
    assert_eq!(charged(&t), (15, 20));
    // Its body needs no `model`, but an undecodable one in the path is refused.
    let bad = "/v1/projects/p/locations/l/publishers/anthropic/models/%ff:rawPredict";
    let t = run(
        &gw,
        &host,
        &gemini(bad, json!({"max_tokens": 5, "messages": []})),
        None,
    );
    assert_eq!(t.status(), 400);
}

#[test]
fn routing_stays_within_one_api_family() {
    let routing = |aliases: Value| {
        json!({"routing": {"models": {
            "gpt-4o": {"route": "openai", "api": "openai"},
            "gemini-2.5-flash": {"route": "google", "api": "google"},
            "gemini-2.5-pro": {"route": "google", "api": "google"}},
            "aliases": aliases}})
    };
    let mixed = json!({"fast": {"targets": [{"model": "gemini-2.5-flash"}, {"model": "gpt-4o"}]}});
    let json = serde_json::to_vec(&{
        let mut base = json!({"identity": {"source": "header", "header": "x-tenant"}});
        base.as_object_mut()
            .unwrap()
            .extend(routing(mixed).as_object().unwrap().clone());
        base
    })
    .unwrap();
    let err = crate::config::Config::from_json(&json).unwrap_err();
    assert_eq!(err.field, "routing.aliases.fast.targets[1].model");
    let bad = json!({"x": {"targets": [{"model": "gemini-2.5-flash"}], "downgrade_to": "gpt-4o"}});
    let json = serde_json::to_vec(&{
        let mut base = json!({"identity": {"source": "header", "header": "x-tenant"}});
        base.as_object_mut()
            .unwrap()
            .extend(routing(bad).as_object().unwrap().clone());
        base
    })
    .unwrap();
    assert_eq!(
        crate::config::Config::from_json(&json).unwrap_err().field,
        "routing.aliases.x.downgrade_to"
    );
    // Within one family: fine; a request of another family is refused.
    let ok =
        json!({"gem": {"targets": [{"model": "gemini-2.5-flash"}, {"model": "gemini-2.5-pro"}]}});
    let gw = metered(routing(ok));
    let host = Fake::new();
    let t = run(
        &gw,
        &host,
        &Call::chat(json!({"model": "gem", "messages": []})),
        None,
    );
    assert_eq!(t.status(), 400);
    assert_eq!(t.reply_json()["error"]["param"], "model");
    let t = run(
        &gw,
        &host,
        &gemini(
            "/v1beta/models/gem:generateContent",
            json!({"contents": []}),
        ),
        None,
    );
    assert!(t.forwarded);
    assert!(
        t.request_edit(":path")
            .unwrap()
            .starts_with("/v1beta/models/gemini-2.5-")
    );
}

#[test]
fn gemini_streams_cut_short_are_settled_once_by_what_passed() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let body = json!({"contents": [{"parts": [{"text": "q".repeat(2000)}]}],
                      "generationConfig": {"maxOutputTokens": 500}});
    // Chunks with text but usage only at the end: a client leaving after two is charged the
    // two chunks it saw (observed), never the reservation, and the bucket holds nothing.
    let chunk = |text: &str| json!({"candidates": [{"content": {"parts": [{"text": text}]}}]});
    let mut events: Vec<Vec<u8>> = ["a", "b", "c"]
        .iter()
        .map(|t| format!("data: {}\r\n\r\n", chunk(t)).into_bytes())
        .collect();
    let last = gemini_answer(json!({"promptTokenCount": 400, "candidatesTokenCount": 30}));
    events.push(format!("data: {last}\r\n\r\n").into_bytes());
    let stream = raw("text/event-stream", events);
    let left = stream.clone().cut(2, "downstream_remote_disconnect");
    let t = run(&gw, &host, &gemini(path, body.clone()), Some(&left));
    assert_eq!(t.records, 1);
    assert_eq!(t.field("usage_source"), "observed");
    assert_eq!(t.field("output_tokens"), "2");
    let (used, reserved) = bucket(&gw, &host, "team-a", "tpd");
    assert_eq!(reserved, 0);
    // An upstream reset before any chunk: refunded.
    let reset = stream.clone().cut(
        0,
        "upstream_reset_before_response_started{connection_termination}",
    );
    let t = run(&gw, &host, &gemini(path, body.clone()), Some(&reset));
    assert_eq!(t.field("usage_source"), "refunded");
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (used, 0));
    // The whole stream: the last running total.
    let t = run(&gw, &host, &gemini(path, body), Some(&stream));
    assert_eq!(charged(&t), (400, 30));
    assert_eq!(bucket(&gw, &host, "team-a", "tpd"), (used + 430, 0));
}

#[test]
fn bedrock_token_count_headers_are_the_fallback_of_a_body_without_usage() {
    let gw = metered(json!({}));
    let host = Fake::new();
    let body = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "w".repeat(3000)}]});
    let path = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/invoke";
    let mut open = open(&gw, &host, &bedrock(path, body));
    let headers = Headers(vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        ("x-amzn-bedrock-input-token-count".into(), b"700".to_vec()),
        ("x-amzn-bedrock-output-token-count".into(), b"42".to_vec()),
    ]);
    let effects = open.request.on_response_headers(&gw, &host, headers, false);
    open.trace.take(effects);
    let answer = br#"{"type":"message","content":[{"type":"text","text":"hi"}]}"#;
    let effects = open
        .request
        .on_response_body(&gw, &host, answer.len(), answer, true);
    open.trace.take(effects);
    let t = close(&gw, &host, open, None);
    assert_eq!(t.field("usage_source"), "reported");
    assert_eq!(charged(&t), (700, 42));
}

#[test]
fn the_cache_keys_the_path_so_a_stream_never_gets_a_json_answer() {
    let gw = metered(json!({"cache": {"policy": "always"}}));
    let host = Fake::new();
    let body = json!({"contents": [{"parts": [{"text": "capital of France? ".repeat(20)}]}]});
    let answer = Upstream::json(gemini_answer(
        json!({"promptTokenCount": 50, "candidatesTokenCount": 5}),
    ));
    let miss = run(&gw, &host, &gemini(GENERATE, body.clone()), Some(&answer));
    assert_eq!(miss.field("cache"), "miss");
    let hit = run(&gw, &host, &gemini(GENERATE, body.clone()), None);
    assert_eq!(hit.field("cache"), "hit");
    assert_eq!(hit.field("api"), "generate_content");
    // The same body on the streaming path, or for another model: not the stored answer.
    let stream = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    let other = "/v1beta/models/gemini-2.5-pro:generateContent";
    for path in [stream, other] {
        let t = run(&gw, &host, &gemini(path, body.clone()), Some(&answer));
        assert_eq!(t.field("cache"), "miss", "{path}");
    }
    // The query key is not part of the key (it is cut first): the same tenant hits.
    let keyed = Call::post(&format!("{GENERATE}?key=sk-a"), None, body);
    assert_eq!(run(&gw, &host, &keyed, None).field("cache"), "hit");
}

#[test]
fn converse_model_specific_caps_are_read_and_lowered_with_inference_config() {
    let gw = metered(
        json!({"tenant_defaults": {"strict": true, "max_output_tokens": 100,
        "clamp_min_output_tokens": 1,
        "limits": [{"name": "tpd", "tokens": 1_000_000, "window": "day"}]}}),
    );
    let host = Fake::new();
    // Claude's own `max_tokens` passed through: read as the cap, lowered with maxTokens.
    let body = json!({"messages": [], "inferenceConfig": {"maxTokens": 50},
                      "additionalModelRequestFields": {"max_tokens": 100_000, "top_k": 5}});
    let t = open(&gw, &host, &bedrock(CONVERSE, body));
    assert!(t.trace.forwarded);
    let sent = t.trace.upstream_json();
    assert_eq!(sent["inferenceConfig"]["maxTokens"], 100);
    assert_eq!(
        sent["additionalModelRequestFields"],
        json!({"max_tokens": 100, "top_k": 5})
    );
    close(&gw, &host, t, None);
    // 0 or a string is refused, naming the field.
    for bad in [json!(0), json!("20"), json!(-1)] {
        let body = json!({"messages": [], "additionalModelRequestFields": {"max_gen_len": bad}});
        let t = run(&gw, &host, &bedrock(CONVERSE, body), None);
        assert_eq!(t.status(), 400, "{bad}");
        assert_eq!(
            t.reply_header("x-amzn-errortype").as_deref(),
            Some("ValidationException")
        );
    }
}

#[test]
fn invoke_bodies_of_other_model_families_pass_unedited_or_are_refused_by_caps() {
    let body = json!({"prompt": "hi", "max_gen_len": 64, "temperature": 0.5});
    let path = "/model/meta.llama3-70b-instruct-v1%3A0/invoke";
    // No cap to apply: forwarded as sent (no `max_tokens` Bedrock would reject), usage from the
    // token-count headers.
    let gw = metered(json!({}));
    let host = Fake::new();
    let t = open(&gw, &host, &bedrock(path, body.clone()));
    assert!(t.trace.forwarded);
    assert_eq!(t.trace.upstream_json(), body);
    close(&gw, &host, t, None);
    // Strict mode or a per-request cap cannot be applied to it: refused, naming Converse.
    let strict = metered(json!({"tenant_defaults": {"strict": true,
        "limits": [{"name": "tpd", "tokens": 1_000_000, "window": "day"}]}}));
    let t = run(&strict, &host, &bedrock(path, body), None);
    assert_eq!(t.status(), 400);
    assert!(
        t.reply_json()["message"]
            .as_str()
            .unwrap()
            .contains("Converse")
    );
}

#[test]
fn greedy_gemini_requests_are_cached_under_the_deterministic_policy() {
    let gw = metered(json!({"cache": {"policy": "deterministic"}}));
    let host = Fake::new();
    let answer = Upstream::json(gemini_answer(
        json!({"promptTokenCount": 5, "candidatesTokenCount": 5}),
    ));
    let ask = |temperature: f64| {
        gemini(
            GENERATE,
            json!({"contents": [{"parts": [{"text": "2+2? ".repeat(10)}]}],
                                "generationConfig": {"temperature": temperature}}),
        )
    };
    assert_eq!(
        run(&gw, &host, &ask(0.0), Some(&answer)).field("cache"),
        "miss"
    );
    assert_eq!(run(&gw, &host, &ask(0.0), None).field("cache"), "hit");
    assert_eq!(
        run(&gw, &host, &ask(0.7), Some(&answer)).field("cache"),
        "bypass"
    );
}

#[test]
fn greedy_converse_requests_are_cached_under_the_deterministic_policy() {
    let gw = metered(json!({"cache": {"policy": "deterministic"}}));
    let host = Fake::new();
    let answer = Upstream::json(json!({
        "output": {"message": {"role": "assistant", "content": [{"text": "4"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 5, "outputTokens": 1, "totalTokens": 6}}));
    let ask = |config: Value, extra: Value| {
        bedrock(
            CONVERSE,
            json!({"messages": [{"role": "user", "content": [{"text": "2+2? ".repeat(10)}]}],
                   "inferenceConfig": config, "additionalModelRequestFields": extra}),
        )
    };
    for (config, extra) in [
        (json!({"temperature": 0}), json!({})),
        (json!({"topP": 0.0}), json!({})),
        (json!({"temperature": 0.9}), json!({"top_k": 1})),
    ] {
        let greedy = ask(config, extra);
        assert_eq!(
            run(&gw, &host, &greedy, Some(&answer)).field("cache"),
            "miss"
        );
        assert_eq!(run(&gw, &host, &greedy, None).field("cache"), "hit");
    }
    for (config, extra) in [
        (json!({"temperature": 0.7}), json!({})),
        (json!({"temperature": "0"}), json!({"top_k": 2})),
    ] {
        assert_eq!(
            run(&gw, &host, &ask(config, extra), Some(&answer)).field("cache"),
            "bypass"
        );
    }
}
