//! `api::rewrite::apply` (the request body edits: max tokens, `include_usage`, model) on
//! arbitrary bodies and on JSON objects built from the input. Never panics; and whenever the body
//! is a JSON object (what the filter guarantees: it parsed the body first), the result exists,
//! parses as a JSON object and equals the input with exactly the edits applied, compared as
//! `serde_json::Value`s:
//! - `max_tokens` → the API's field (chat: `max_tokens` when the client used it,
//!   `max_completion_tokens` when it used that or not `max_tokens`, both when it used both;
//!   responses: `max_output_tokens`;
//!   messages: `max_tokens`); embeddings: none (see `EMBEDDINGS_MAX_TOKENS_DROPS_OTHER_EDITS`);
//! - `include_usage` → `stream_options` is an object (replaced if it was not) with
//!   `include_usage: true`, its other members kept;
//! - `model` → the top-level `model` is that string;
//! - every other top-level member unchanged.
//!
//! The Gemini, Vertex and Bedrock kinds get only `max_tokens` edits in the filter
//! (`plan.rs` injects `include_usage` for chat streams only; `pipeline/admit.rs` edits the body's
//! model only when the path names none, and these name it in the path), so their oracle runs
//! with those two edits off (the edits the input asks for still run, for "never panics"). For
//! them, whenever `read_request` accepts the body (what the filter checks first) and the cap is
//! at least 1, the rewritten body exists, is a JSON object that `read_request` accepts again
//! with the same model and stream flag and no more choices (duplicate Gemini config keys: the
//! last one is kept), and it carries the cap:
//! - `RawPredict`, `Invoke` (Anthropic bodies): `max_tokens` is the cap;
//! - `Converse`: `inferenceConfig` is an object (replaced if it was not) whose `maxTokens` is the
//!   cap, its other members kept; in an `additionalModelRequestFields` object, every member of
//!   `CONVERSE_ADDITIONAL_CAPS` is the cap and the others are kept;
//! - `GenerateContent`: when the plan would rewrite (no max, or one above the cap), the
//!   max-output figure read back is at most the cap (every `generationConfig`/
//!   `generation_config` spelling of `maxOutputTokens`/`max_output_tokens` is lowered, one is
//!   added when there is none), and no top-level member but those configs changes;
//! - `EmbedContent`, `CountTokens`: nothing to edit; the body is unchanged as a JSON value;
//! and every other top-level member is unchanged.
//!
//! Input layout: byte 0 = kind (bits 0-1 and 6-7: index = bits 0-1 + 4 × bits 6-7, mod
//! `KINDS.len()`), mode (bit 2: 0 = raw body, 1 = a JSON object built
//! from `KEYS`/`VALUES`/`SPACES`), edits (bit 3: max_tokens, bit 4: include_usage, bit 5:
//! model); bytes 1-8 = max_tokens (u64 LE); byte 9 = model choice; the rest is the body (or the
//! builder's choices).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use tollgate::api::ApiKind;
use tollgate::api::dialect::{Call, PathModel};
use tollgate::api::dialect::CONVERSE_ADDITIONAL_CAPS;
use tollgate::api::request::read_request;
use tollgate::api::rewrite::{Edits, apply};

const KINDS: [ApiKind; 10] = ApiKind::ALL;

/// The kinds that name the model in the path.
fn path_model(kind: ApiKind) -> bool {
    !matches!(
        kind,
        ApiKind::ChatCompletions | ApiKind::Responses | ApiKind::Embeddings | ApiKind::Messages
    )
}

const GEMINI_CONFIGS: [&str; 2] = ["generationConfig", "generation_config"];

/// Embeddings has no max-tokens field. Until issue 20, `rewrite` returned the body re-serialised
/// as soon as `max_tokens` was set, *without the other edits* (model, include_usage); it now
/// applies them (the `true` oracle failed within seconds on the dialect rewrite), so this is
/// `false`. Set it back to `true` only if that old behaviour returns.
const EMBEDDINGS_MAX_TOKENS_DROPS_OTHER_EDITS: bool = false;

const MODELS: &[&str] = &[
    "gpt-4o",
    "",
    "m\"q\\",
    "é ✓ \u{1F600}",
    "\u{0}\u{1f}",
    "claude-3-5-sonnet-20241022",
    "a/b:c@d",
    "</script>",
];

const KEYS: &[&str] = &[
    "\"model\"",
    "\"model\"",
    "\"max_tokens\"",
    "\"max_completion_tokens\"",
    "\"max_output_tokens\"",
    "\"stream\"",
    "\"stream_options\"",
    "\"messages\"",
    "\"input\"",
    "\"temperature\"",
    "\"mod\\u0065l\"",
    "\"model \"",
    "\"\"",
    "\"include_usage\"",
    "\"x\"",
    "\"é\"",
    "\"generationConfig\"",
    "\"generation_config\"",
    "\"maxOutputTokens\"",
    "\"candidateCount\"",
    "\"inferenceConfig\"",
    "\"maxTokens\"",
    "\"additionalModelRequestFields\"",
    "\"max_gen_len\"",
    "\"anthropic_version\"",
    "\"contents\"",
];

const VALUES: &[&str] = &[
    "\"m\"",
    "\"gpt-4o\"",
    "\"with \\\"quotes\\\" and \\\\ and \\u00e9\"",
    "\"}\"",
    "\"model\"",
    "null",
    "true",
    "false",
    "0",
    "7",
    "-1",
    "2.5",
    "1e300",
    "-0.0",
    "0.1",
    "1.7976931348623157e308",
    "5e-324",
    "18446744073709551615",
    "18446744073709551616",
    "[]",
    "{}",
    "[1,{\"model\":\"inner\"},\"]\"]",
    "{\"include_usage\":false,\"x\":1}",
    "{\"model\":{\"model\":[]}}",
    "[{\"role\":\"user\",\"content\":\"hi\"}]",
    "{\"maxOutputTokens\":100}",
    "{\"max_output_tokens\":50000,\"candidateCount\":2}",
    "{\"maxOutputTokens\":3,\"max_output_tokens\":90000,\"temperature\":0}",
    "{\"maxOutputTokens\":null,\"thinkingConfig\":{\"thinking_budget\":1024}}",
    "{\"maxOutputTokens\":\"20\"}",
    "{\"candidate_count\":3}",
    "{\"maxTokens\":50,\"temperature\":0.5}",
    "{\"maxTokens\":0}",
    "{\"stopSequences\":[\"x\"]}",
    "\"bedrock-2023-05-31\"",
    "[{\"role\":\"user\",\"parts\":[{\"text\":\"hi\"}]}]",
];

const SPACES: &[&str] = &["", " ", "\n", "\t", "\r\n  "];

/// A JSON object text built from choice bytes (keys may repeat; spacing varies).
fn build(choices: &[u8]) -> Vec<u8> {
    let mut out = String::from("{");
    for (n, pair) in choices.chunks(3).enumerate() {
        let [k, v, s] = [0, 1, 2].map(|i| usize::from(pair.get(i).copied().unwrap_or(0)));
        if n > 0 {
            out.push(',');
        }
        out.push_str(SPACES[s % SPACES.len()]);
        out.push_str(KEYS[k % KEYS.len()]);
        out.push_str(SPACES[(s / 8) % SPACES.len()]);
        out.push(':');
        out.push_str(SPACES[(s / 64) % SPACES.len()]);
        out.push_str(VALUES[v % VALUES.len()]);
    }
    out.push_str(SPACES[choices.len() % SPACES.len()]);
    out.push('}');
    out.into_bytes()
}

/// The fields `max_tokens` goes to, per the documented rule. Chat: `max_tokens` when the client
/// sent it, `max_completion_tokens` when it sent that or not `max_tokens` (both when it sent
/// both: servers disagree on which wins, so both are capped).
fn max_fields(kind: ApiKind, doc: &Map<String, Value>) -> Vec<&'static str> {
    match kind {
        ApiKind::ChatCompletions => {
            let legacy = doc.contains_key("max_tokens");
            let mut fields = Vec::new();
            if legacy {
                fields.push("max_tokens");
            }
            if !legacy || doc.contains_key("max_completion_tokens") {
                fields.push("max_completion_tokens");
            }
            fields
        }
        ApiKind::Responses => vec!["max_output_tokens"],
        ApiKind::Messages | ApiKind::RawPredict | ApiKind::Invoke => vec!["max_tokens"],
        _ => Vec::new(),
    }
}

/// The oracle for the kinds that name the model in the path (see the module docs).
fn check_path_kind(kind: ApiKind, body: &[u8], input: &Map<String, Value>, cap: u64) {
    let edits = Edits {
        max_tokens: (!kind.generates_nothing()).then_some(cap),
        ..Edits::default()
    };
    let call = Call {
        kind,
        stream: false,
        model: Some(PathModel {
            start: 0,
            end: 0,
            name: Some("m".to_string()),
        }),
    };
    let Ok(before) = read_request(&call, body) else {
        return; // refused before any rewrite
    };
    // The plan never edits a foreign Invoke body (no `anthropic_version`): strict mode and
    // per-request caps refuse it, since its cap cannot be read back.
    if cap == 0 || before.foreign_body {
        return;
    }
    let Some(got) = apply(kind, body, &edits) else {
        panic!("no rewrite of an accepted {kind:?} body: {}", String::from_utf8_lossy(body));
    };
    let doc: Map<String, Value> = match serde_json::from_slice(&got) {
        Ok(v) => v,
        Err(e) => panic!("{kind:?} output is not a JSON object ({e}): {}", String::from_utf8_lossy(&got)),
    };
    let after = match read_request(&call, &got) {
        Ok(f) => f,
        Err(e) => panic!(
            "{kind:?} rewrite (cap {cap}) refused on read-back: {e:?}\n body: {}\n  got: {}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&got)
        ),
    };
    // Duplicate config keys: the re-serialisation keeps the last, so a `candidateCount` read
    // from an earlier one may be gone (fewer candidates than reserved: safe), never more.
    assert!(
        after.model == before.model
            && after.stream == before.stream
            && after.choices <= before.choices,
        "{kind:?} rewrite changed the request's facts: {before:?} → {after:?}\n body: {}\n  got: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&got)
    );
    let carries = match kind {
        _ if kind.generates_nothing() => after.max_tokens == before.max_tokens,
        // The plan rewrites only an absent max (strict) or one above the cap (clamp); then
        // every spelling ends at or under the cap. (With duplicate config keys the last one
        // wins the re-serialisation, so the figure read back may be under the cap, never over.)
        ApiKind::GenerateContent if before.max_tokens.is_none_or(|m| m > cap) => {
            after.max_tokens.is_some_and(|m| m <= cap)
        }
        ApiKind::GenerateContent => true,
        _ => after.max_tokens == Some(cap),
    };
    assert!(
        carries,
        "{kind:?} rewrite (cap {cap}) does not carry the cap: {:?} → {:?}\n body: {}\n  got: {}",
        before.max_tokens,
        after.max_tokens,
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&got)
    );
    // Member by member: only the API's own field changes.
    let edited: &[&str] = match kind {
        ApiKind::RawPredict | ApiKind::Invoke => &["max_tokens"],
        ApiKind::Converse => &["inferenceConfig", "additionalModelRequestFields"],
        ApiKind::GenerateContent => &GEMINI_CONFIGS,
        _ => &[],
    };
    for (key, value) in input {
        if !edited.contains(&key.as_str()) {
            assert!(
                doc.get(key).is_some_and(|v| same(v, value)),
                "{kind:?} rewrite changed member {key:?}"
            );
        }
    }
    for key in doc.keys() {
        assert!(
            input.contains_key(key) || edited.contains(&key.as_str()),
            "{kind:?} rewrite added member {key:?}"
        );
    }
    match kind {
        ApiKind::RawPredict | ApiKind::Invoke => {
            assert_eq!(doc.get("max_tokens"), Some(&Value::from(cap)));
        }
        ApiKind::Converse => {
            // The model-specific caps passed through are lowered with it; nothing else there.
            if let Some(old) = input.get("additionalModelRequestFields") {
                let new = doc.get("additionalModelRequestFields");
                match (old, new) {
                    (Value::Object(old), Some(Value::Object(new))) => {
                        assert_eq!(old.len(), new.len(), "additionalModelRequestFields gained members");
                        for (k, v) in old {
                            let want = if CONVERSE_ADDITIONAL_CAPS.contains(&k.as_str()) {
                                Value::from(cap)
                            } else {
                                v.clone()
                            };
                            assert!(
                                new.get(k).is_some_and(|n| same(n, &want)),
                                "additionalModelRequestFields.{k}: {:?}, want {want}",
                                new.get(k)
                            );
                        }
                    }
                    (old, new) => assert!(
                        new.is_some_and(|n| same(n, old)),
                        "additionalModelRequestFields changed"
                    ),
                }
            }
            let Some(Value::Object(config)) = doc.get("inferenceConfig") else {
                panic!("no inferenceConfig object after the rewrite");
            };
            assert_eq!(config.get("maxTokens"), Some(&Value::from(cap)));
            if let Some(Value::Object(old)) = input.get("inferenceConfig") {
                for (k, v) in old {
                    if k != "maxTokens" {
                        assert!(
                            config.get(k).is_some_and(|n| same(n, v)),
                            "inferenceConfig.{k} changed"
                        );
                    }
                }
                assert_eq!(
                    config.len(),
                    old.len() + usize::from(!old.contains_key("maxTokens")),
                    "inferenceConfig gained members"
                );
            }
        }
        _ => {}
    }
}

/// `Value` equality where floats may differ in the last place: without serde_json's
/// `float_roundtrip` feature, parse(print(x)) can be one ULP off.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && same(vx, vy))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<10>() else {
        return;
    };
    let flags = head[0];
    let kind = KINDS[usize::from((flags & 3) | (flags >> 6) << 2) % KINDS.len()];
    let mut max = [0u8; 8];
    max.copy_from_slice(&head[1..9]);
    // Mostly small caps, sometimes the whole u64 range.
    let max = u64::from_le_bytes(max);
    let max = if max >> 63 == 0 { max % 100_000 } else { max };
    let edits = Edits {
        max_tokens: (flags & 8 != 0).then_some(max),
        include_usage: flags & 16 != 0,
        model: (flags & 32 != 0).then(|| MODELS[usize::from(head[9]) % MODELS.len()].to_string()),
    };
    let body: Vec<u8> = if flags & 4 == 0 {
        rest.to_vec()
    } else {
        build(rest)
    };

    let got = apply(kind, &body, &edits);
    let Ok(input) = serde_json::from_slice::<Map<String, Value>>(&body) else {
        return; // Not a JSON object: only "no panic" is promised.
    };
    if path_model(kind) {
        check_path_kind(kind, &body, &input, max);
        return;
    }
    let Some(got) = got else {
        panic!("no result for a JSON object body");
    };
    let got: Value = match serde_json::from_slice(&got) {
        Ok(v) => v,
        Err(e) => panic!(
            "output is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&got)
        ),
    };

    let mut want = input.clone();
    let embeddings_early = kind == ApiKind::Embeddings
        && edits.max_tokens.is_some()
        && EMBEDDINGS_MAX_TOKENS_DROPS_OTHER_EDITS;
    if !embeddings_early {
        if let Some(n) = edits.max_tokens {
            for field in max_fields(kind, &input) {
                want.insert(field.to_string(), Value::from(n));
            }
        }
        if edits.include_usage {
            let options = want
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !options.is_object() {
                *options = Value::Object(Map::new());
            }
            if let Value::Object(o) = options {
                o.insert("include_usage".to_string(), Value::Bool(true));
            }
        }
        if let Some(m) = &edits.model {
            want.insert("model".to_string(), Value::String(m.clone()));
        }
    }
    let want = Value::Object(want);
    assert!(
        same(&got, &want),
        "edits {edits:?} on {kind:?}\n body: {}\n  got: {got}\n want: {want}",
        String::from_utf8_lossy(&body)
    );
});
