//! Issue 18 A.4, the class made impossible: for any request body, the output strict mode
//! reserves is at least what a permissive upstream may generate from the body it receives, and
//! a response that generated that much is charged that much.

use proptest::prelude::*;
use serde_json::json;

use super::*;

/// A count as pydantic's lax mode coerces it (vLLM's request models): integers, integral
/// floats and numeric strings, booleans as 0 and 1. `None`: the upstream refuses the request.
fn lax_count(v: &Value) -> Option<Option<u64>> {
    let n = match v {
        Value::Null => return Some(None),
        Value::Bool(b) => Some(u64::from(*b)),
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64),
        _ => None,
    };
    n.map(Some)
}

/// The most output tokens a permissive upstream may generate for `body` (OpenAI's and vLLM's
/// readings): the caps in every spelling the API has, 0 or null meaning no cap (vLLM's
/// `max_completion_tokens or max_tokens`), both given meaning either; `n` and `best_of` outputs
/// (0 read as 1); a predicted output's tokens on top. `Some(None)`: no cap at all; `None`: the
/// upstream refuses the body.
fn permissive_output(path: &str, body: &[u8]) -> Option<Option<u64>> {
    // The last of duplicate keys wins, as in Python's json.
    let doc: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    let count = |k: &str| doc.get(k).map_or(Some(None), lax_count);
    let caps: &[&str] = match path {
        "/v1/chat/completions" => &["max_completion_tokens", "max_tokens"],
        "/v1/responses" => &["max_output_tokens"],
        _ => &["max_tokens"],
    };
    let mut per_output = None;
    for cap in caps {
        if let Some(c) = count(cap)?.filter(|&c| c > 0) {
            per_output = per_output.max(Some(c));
        }
    }
    let outputs = count("n")?
        .unwrap_or(1)
        .max(count("best_of")?.unwrap_or(1))
        .max(1);
    // Predicted outputs are a Chat Completions feature.
    let predicted = match doc.get("prediction") {
        Some(p) if !p.is_null() && path == "/v1/chat/completions" => {
            serde_json::to_vec(p).ok()?.len() as u64
        }
        _ => 0,
    };
    Some(per_output.map(|p| p.saturating_mul(outputs).saturating_add(predicted)))
}

fn answer(path: &str, output: u64) -> Upstream {
    match path {
        "/v1/chat/completions" => Upstream::chat(1, output),
        "/v1/responses" => Upstream::json(json!({"object": "response", "status": "completed",
            "usage": {"input_tokens": 1, "output_tokens": output, "total_tokens": 1 + output}})),
        _ => Upstream::json(
            json!({"type": "message", "role": "assistant", "content": [],
            "usage": {"input_tokens": 1, "output_tokens": output}}),
        ),
    }
}

const KEYS: &[&str] = &[
    "n",
    "\\u006e",
    "best_of",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "prediction",
];

const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "7",
    "100",
    "5000",
    "null",
    "\"20\"",
    "\" 3 \"",
    "20.0",
    "20.5",
    "-3",
    "true",
    "false",
    "1e2",
    "[1]",
    "{}",
    "18446744073709551615",
    "18446744073709551616",
    r#"{"type":"content","content":"abcdefgh"}"#,
];

fn body_with(fields: &[(usize, usize)]) -> Vec<u8> {
    let mut body =
        String::from(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]"#);
    for &(k, v) in fields {
        body.push_str(&format!(
            r#","{}":{}"#,
            KEYS[k % KEYS.len()],
            VALUES[v % VALUES.len()]
        ));
    }
    body.push('}');
    body.into_bytes()
}

fn strict_gateway() -> Gateway {
    gateway(json!({"tenant_defaults": {
        "strict": true,
        "default_output_tokens": 64,
        "limits": [{"name": "big", "tokens": 1_000_000_000_000u64, "window": "day"}]}}))
}

/// One body through the pipeline: when forwarded, what the upstream may generate from the body
/// it got fits the output reserved, and is what gets charged.
fn check(path: &str, body: &[u8]) -> Result<(), TestCaseError> {
    let permissive = |sent: &[u8]| permissive_output(path, sent);
    check_with(path, body, permissive, |generated| answer(path, generated))
}

/// [`check`] for an API read by `permissive` and answered by `answer`.
fn check_with(
    path: &str,
    body: &[u8],
    permissive: impl Fn(&[u8]) -> Option<Option<u64>>,
    answer: impl Fn(u64) -> Upstream,
) -> Result<(), TestCaseError> {
    let gw = strict_gateway();
    let host = Fake::new();
    let call = Call::post(path, Some("sk-a"), json!({})).raw_body(body);
    let open = open(&gw, &host, &call);
    if !open.trace.forwarded {
        let status = open.trace.status();
        prop_assert!(status == 400 || status == 429, "status {status}");
        return Ok(());
    }
    let Some(generated) = permissive(&open.trace.upstream_body) else {
        return Ok(()); // the upstream refuses what it got: nothing is generated
    };
    let upstream = String::from_utf8_lossy(&open.trace.upstream_body).into_owned();
    let Some(generated) = generated else {
        return Err(TestCaseError::fail(format!(
            "no output cap went upstream: {upstream}"
        )));
    };
    let (_, reserved) = bucket(&gw, &host, "team-a", "big");
    let output_reserved = reserved - body.len() as u64;
    prop_assert!(
        generated <= output_reserved,
        "{generated} may be generated, {output_reserved} reserved: {upstream}"
    );
    let t = close(&gw, &host, open, Some(&answer(generated)));
    // Usage past `limits.max_reported_tokens` is absurd by configuration: charged at it.
    let charged = generated.min(gw.config.limits.max_reported_tokens);
    prop_assert_eq!(
        t.field("output_tokens"),
        charged.to_string(),
        "{}",
        upstream
    );
    Ok(())
}

const PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/responses", "/v1/messages"];

proptest! {
    // A fixed seed: the same 2,000 bodies on every run (a failure found by a new seed is a bug to
    // pin in `the_reported_bodies`, never a flaky run).
    #![proptest_config(ProptestConfig {
        cases: 2000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(18),
        ..ProptestConfig::default()
    })]
    #[test]
    fn strict_reserves_all_a_permissive_upstream_may_generate(
        path in 0usize..3,
        fields in proptest::collection::vec((0usize..KEYS.len(), 0usize..VALUES.len()), 0..5),
    ) {
        check(PATHS[path], &body_with(&fields))?;
    }
}

/// The repros of issue 18 A.1–A.3, as the permissive model reads them.
#[test]
fn the_reported_bodies() {
    for body in [
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":100,"n":20}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"max_completion_tokens":0}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"max_completion_tokens":0,"max_tokens":5000}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":100,"n":"20"}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":100,"n":20.0}"#,
        // Found by another seed: more than `max_reported_tokens` may be generated.
        r#"{"model":"gpt-4o-mini","messages":[],"max_tokens":5000,"n":5000}"#,
    ] {
        check("/v1/chat/completions", body.as_bytes()).unwrap();
    }
}

/// An upstream that ignores the max tokens strict mode injected is charged no more than it
/// (flagged `clamped`): the tenant's limit holds whatever the upstream does.
#[test]
fn output_past_the_injected_cap_is_charged_at_it() {
    let gw = strict_gateway();
    let host = Fake::new();
    let call = Call::chat(json!({"model": "gpt-4o-mini", "messages": [], "n": 2}));
    let open = open(&gw, &host, &call);
    assert_eq!(open.trace.upstream_json()["max_completion_tokens"], 64);
    let t = close(&gw, &host, open, Some(&Upstream::chat(1, 10_000)));
    assert_eq!(t.field("output_tokens"), "128");
    assert_eq!(t.field("usage_anomaly"), "clamped");
}

// ---------------------------------------------------------------------------------------------
// Gemini and Vertex (issue 20): `generationConfig.maxOutputTokens` per candidate times
// `candidateCount`, in both spellings of each name, as Google's protobuf JSON parser reads them
// (numeric strings and integral floats accepted, 0 meaning the model's default, i.e. no cap).

const GEMINI: &str = "/v1beta/models/gemini-2.5-flash:generateContent";
const GEMINI_CONFIGS: &[&str] = &["generationConfig", "generation_config"];
const GEMINI_KEYS: &[&str] = &[
    "maxOutputTokens",
    "max_output_tokens",
    "candidateCount",
    "candidate_count",
];

fn gemini_body(fields: &[(usize, usize, usize)]) -> Vec<u8> {
    let mut configs: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for &(c, k, v) in fields {
        if let Some(config) = configs.get_mut(c % 2) {
            config.push(format!(
                r#""{}":{}"#,
                GEMINI_KEYS[k % GEMINI_KEYS.len()],
                VALUES[v % VALUES.len()]
            ));
        }
    }
    let mut body = String::from(r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]"#);
    for (name, members) in GEMINI_CONFIGS.iter().zip(configs.iter()) {
        if !members.is_empty() {
            body.push_str(&format!(r#","{name}":{{{}}}"#, members.join(",")));
        }
    }
    body.push('}');
    body.into_bytes()
}

/// The most a permissive Gemini upstream may generate for `body`: every spelling read, the
/// largest cap and count winning. `Some(None)`: no cap; `None`: refused.
fn gemini_permissive_output(body: &[u8]) -> Option<Option<u64>> {
    let doc: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    let (mut cap, mut candidates) = (None, 1u64);
    for name in GEMINI_CONFIGS {
        let Some(config) = doc.get(*name) else {
            continue;
        };
        let config = match config {
            Value::Null => continue,
            Value::Object(c) => c,
            _ => return None,
        };
        for key in ["maxOutputTokens", "max_output_tokens"] {
            if let Some(v) = config.get(key) {
                cap = cap.max(lax_count(v)?.filter(|&c| c > 0));
            }
        }
        for key in ["candidateCount", "candidate_count"] {
            if let Some(v) = config.get(key) {
                candidates = candidates.max(lax_count(v)?.unwrap_or(1));
            }
        }
    }
    Some(cap.map(|c| c.saturating_mul(candidates.max(1))))
}

fn check_gemini(body: &[u8]) -> Result<(), TestCaseError> {
    check_with(GEMINI, body, gemini_permissive_output, |generated| {
        Upstream::json(json!({"candidates": [],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": generated}}))
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(20),
        ..ProptestConfig::default()
    })]
    #[test]
    fn strict_reserves_all_gemini_may_generate(
        fields in proptest::collection::vec(
            (0usize..2, 0usize..GEMINI_KEYS.len(), 0usize..VALUES.len()), 0..5),
    ) {
        check_gemini(&gemini_body(&fields))?;
    }
}

#[test]
fn gemini_candidates_multiply_the_reserve() {
    for body in [
        r#"{"contents":[],"generationConfig":{"candidateCount":8}}"#,
        r#"{"contents":[],"generationConfig":{"candidateCount":2,"maxOutputTokens":100},"generation_config":{"candidate_count":3}}"#,
        r#"{"contents":[],"generation_config":{"max_output_tokens":50,"candidate_count":4}}"#,
    ] {
        check_gemini(body.as_bytes()).unwrap();
    }
}
