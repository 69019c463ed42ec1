//! `usage_from_json` on arbitrary input, for every `ApiKind`: never panics, and on valid JSON
//! objects agrees with a reference built on a full `serde_json::Value` parse (the last top-level
//! usage member, re-serialised alone: `usageMetadata` for `GenerateContent` and `EmbedContent`,
//! `usage` for the others); tails (suffixes) of the body give the same answer or None.
//! `CountTokens` is never charged: always None.
//!
//! Input layout: byte 0 = mode (bit 0: 0 = raw bytes, 1 = each byte picks a JSON token from
//! `TOKENS`); the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::api::ApiKind;
use tollgate::api::usage::usage_from_json;

const KINDS: [ApiKind; 10] = ApiKind::ALL;

/// The top-level member holding `kind`'s usage.
fn usage_key(kind: ApiKind) -> &'static str {
    match kind {
        ApiKind::GenerateContent | ApiKind::EmbedContent => "usageMetadata",
        _ => "usage",
    }
}

const TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\\"", "\\\\", " ", "\n", "null", "true", "0", "7",
    "-1", "2.5", "1e3", "18446744073709551615", "18446744073709551616", "\"usage\"", "\"usage\":",
    "\"usage\":null", "\"x\"", "\"x\":", "\"prompt_tokens\":", "\"completion_tokens\":",
    "\"input_tokens\":", "\"output_tokens\":", "\"cache_read_input_tokens\":",
    "\"cache_creation_input_tokens\":", "\"prompt_tokens_details\":", "\"cached_tokens\":",
    "\"completion_tokens_details\":", "\"reasoning_tokens\":", "\"input_tokens_details\":",
    "\"output_tokens_details\":", "\"text\":\"He said \\\"usage\\\": 5\"", "é",
    "\"usageMetadata\":", "\"usageMetadata\":null", "\"promptTokenCount\":",
    "\"candidatesTokenCount\":", "\"thoughtsTokenCount\":", "\"cachedContentTokenCount\":",
    "\"toolUsePromptTokenCount\":", "\"totalTokenCount\":", "\"promptTokensDetails\":",
    "\"inputTokens\":", "\"outputTokens\":", "\"cacheReadInputTokens\":",
    "\"cacheWriteInputTokens\":", "\"totalTokens\":",
    "\"text\":\"\\\"usageMetadata\\\":{\\\"promptTokenCount\\\":9}\"",
];

/// Whether the body may spell a key with `\u` escapes of ASCII letters (those of "usage" and
/// "usageMetadata"), which the fast paths deliberately do not decode (documented).
fn may_escape_usage_letters(body: &[u8]) -> bool {
    body.windows(5).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && w[2] == b'0'
            && w[3] == b'0'
            && matches!(w[4], b'4' | b'5' | b'6' | b'7')
    })
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let body: Vec<u8> = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        rest.iter()
            .flat_map(|b| TOKENS[usize::from(*b) % TOKENS.len()].bytes())
            .collect()
    };
    let parsed = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) if !may_escape_usage_letters(&body) => Some(map),
        _ => None,
    };
    for kind in KINDS {
        let got = usage_from_json(kind, &body);
        if kind == ApiKind::CountTokens {
            assert_eq!(got, None, "a token count charged");
            continue;
        }
        let key = usage_key(kind);
        let reference_doc = parsed.as_ref().map(|map| {
            map.get(key).map(|u| {
                let mut alone = serde_json::Map::new();
                alone.insert(key.to_string(), u.clone());
                serde_json::to_vec(&alone).unwrap_or_default()
            })
        });
        if let Some(reference_doc) = &reference_doc {
            let want = reference_doc.as_ref().and_then(|doc| usage_from_json(kind, doc));
            assert_eq!(got, want, "{kind:?}: fast path disagrees with a full parse");
            // Every start for small bodies; about 256 evenly spread ones for big ones.
            let step = (body.len() / 256).max(1);
            for start in (1..body.len()).step_by(step) {
                let tail = usage_from_json(kind, &body[start..]);
                assert!(tail.is_none() || tail == want, "{kind:?}: tail from {start} misread");
            }
        }
    }
});
