//! Locating a usage object in a JSON body without parsing the whole body: a backward structural
//! scan from the closing `}` (with a full-parse fallback), and the forward scan that reads an SSE
//! event's top-level `"type"`.
//!
//! # How the usage object is found
//!
//! Bodies can be hundreds of kilobytes of generated text (or thousands of embedding floats), and
//! the usage object is small and, for every API we read, serialised at the *end* of the top-level
//! object (OpenAI: `…,"usage":{…},"service_tier":…,"system_fingerprint":…}`; Responses:
//! `…,"usage":{…},"user":…,"metadata":{…}}`; Anthropic: `…,"stop_sequence":null,"usage":{…}}`).
//! So instead of parsing the whole document we scan it **backwards** from its closing `}` with a
//! tiny structural state machine (strings, nesting depth) until we meet a `"usage"` string that is
//! followed by `:` (so it is an object key) at nesting depth 1 (so it is a key of the top-level
//! object), and deserialise only the value that follows it.
//!
//! Scanning backwards is exact for valid JSON: outside strings there are no backslashes, and a `"`
//! closes (seen backwards: opens) a string iff it is preceded by an even number of backslashes.
//! Checking the depth means a `"usage"` key nested anywhere else — an Anthropic `tool_use` input,
//! a JSON schema property in echoed Responses `tools`, a Responses `metadata` entry, text such as
//! `He said \"usage\": 5` inside a string — is never taken for the real one, whatever the field
//! order. The cost is proportional to the distance between the usage key and the end of the body
//! (a few hundred bytes for OpenAI and Anthropic), not to the body size.
//!
//! When the scan sees something that cannot be valid JSON (a byte that cannot appear outside a
//! string, unbalanced brackets, a document that does not end with `}`, …) it gives up and we fall
//! back to a streaming serde parse of the whole body that visits only the path to `usage` and skips
//! everything else ([`IgnoredAny`](serde::de::IgnoredAny)); that parse validates the document, so a malformed or truncated
//! body yields `None`. When the scan reaches the top-level `{` without meeting the key, the body has
//! no usage and `None` is returned without the full parse.
//!
//! Because the scan never needs the beginning of the document, a *tail* of the body (what the
//! filter keeps of an over-long response) works as well as the whole body.
//!
//! Limits (documented, deliberate): the fast path does not validate grammar, only the byte classes
//! and nesting it walks through, and only between the usage key and the end (so e.g. a trailing
//! comma there is accepted). A body cut short (missing its end) exactly after a `}` that closes a
//! nested object holding a `"usage"` key would be misread as having that usage: pass bodies that
//! ended normally (an aborted response's partial body is read forward instead, by
//! `read_cut_json_usage`). A key spelt with escapes (`"us\u0061ge"`) is not recognised by the
//! fast path (no provider does that).

use super::parse::{parse_usage_full, parse_usage_value};
use super::shape::RawUsage;

/// The usage object at `path` (object keys from the top level, e.g. `["response", "usage"]`) of
/// the JSON document `body`. `None` if absent, `null`, invalid, or if `body` is not JSON.
///
/// The fast path checks the nesting depth (`path.len()`) and the last key only, not the names of
/// the intermediate keys: callers must only use nested paths whose parent is the only
/// object-valued member at that level (true of the SSE events that use it, see `sse.rs`).
pub(crate) fn usage_at(body: &[u8], path: &[&str]) -> Option<RawUsage> {
    let key = path.last()?;
    let depth = u32::try_from(path.len()).ok()?;
    match locate_key_backward(body, key.as_bytes(), depth) {
        Locate::Found(value) => parse_usage_value(value),
        Locate::Absent => None,
        Locate::Unsure => parse_usage_full(body, path),
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Strips leading JSON whitespace.
pub(crate) fn trim_ws_start(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_ws(*first) {
            break;
        }
        s = rest;
    }
    s
}

/// Strips leading and trailing JSON whitespace.
pub(crate) fn trim_ws(s: &[u8]) -> &[u8] {
    let mut s = trim_ws_start(s);
    while let [rest @ .., last] = s {
        if !is_ws(*last) {
            break;
        }
        s = rest;
    }
    s
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Locate<'a> {
    /// The key was found; the slice starts at its value.
    Found(&'a [u8]),
    /// The whole top-level object was scanned and has no such key at that depth.
    Absent,
    /// The document is not something the scan can vouch for.
    Unsure,
}

/// Scans `json` backwards for the last object key `key` at nesting depth `target_depth`
/// (1 = member of the top-level object). See the module documentation.
pub(crate) fn locate_key_backward<'a>(json: &'a [u8], key: &[u8], target_depth: u32) -> Locate<'a> {
    let doc = trim_ws(json);
    let Some((b'}', _)) = doc.split_last() else {
        return Locate::Unsure;
    };
    let mut depth: u32 = 0;
    let mut i = doc.len();
    // The significant byte that follows position `i` in the document, and where it is.
    let mut next: Option<(usize, u8)> = None;
    while let Some(pos) = i.checked_sub(1) {
        i = pos;
        let Some(&b) = doc.get(i) else {
            return Locate::Unsure;
        };
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => continue,
            b'}' | b']' => depth = depth.saturating_add(1),
            b'{' | b'[' => {
                let Some(d) = depth.checked_sub(1) else {
                    return Locate::Unsure;
                };
                depth = d;
                if depth == 0 {
                    // Back at the top-level opening brace: nothing but whitespace may precede it.
                    let only_ws = doc.get(..i).is_some_and(|p| p.iter().all(|c| is_ws(*c)));
                    return if b == b'{' && only_ws {
                        Locate::Absent
                    } else {
                        Locate::Unsure
                    };
                }
            }
            b'"' => {
                // Outside strings a quote is never escaped in valid JSON.
                if escaped(doc, i) {
                    return Locate::Unsure;
                }
                let Some(open) = opening_quote(doc, i) else {
                    return Locate::Unsure;
                };
                if depth == target_depth
                    && let Some((colon, b':')) = next
                    && doc.get(open.saturating_add(1)..i) == Some(key)
                {
                    let value = doc.get(colon.saturating_add(1)..).unwrap_or_default();
                    return Locate::Found(trim_ws_start(value));
                }
                i = open;
            }
            b'0'..=b'9'
            | b'-'
            | b'+'
            | b'.'
            | b'e'
            | b'E'
            | b't'
            | b'r'
            | b'u'
            | b'f'
            | b'a'
            | b'l'
            | b's'
            | b'n'
            | b','
            | b':' => {}
            _ => return Locate::Unsure,
        }
        next = Some((i, b));
    }
    Locate::Unsure
}

/// Whether the byte at `pos` is preceded by an odd number of backslashes.
fn escaped(s: &[u8], pos: usize) -> bool {
    s.get(..pos)
        .is_some_and(|p| p.iter().rev().take_while(|b| **b == b'\\').count() % 2 == 1)
}

/// The position of the quote opening the string whose closing quote is at `close`.
fn opening_quote(s: &[u8], close: usize) -> Option<usize> {
    let mut end = close;
    loop {
        let q = s.get(..end)?.iter().rposition(|b| *b == b'"')?;
        if !escaped(s, q) {
            return Some(q);
        }
        end = q;
    }
}

/// The raw (still escaped) contents of the string value of the top-level member `key` of the JSON
/// object `json`, found by a forward structural scan that stops at the first match. Used to read
/// an SSE event's `"type"`, which every provider sends as the first member, so this typically
/// reads a few dozen bytes. `None` if absent, not a string, or not scannable.
pub(crate) fn top_level_string<'a>(json: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut rest = trim_ws_start(json).strip_prefix(b"{")?;
    let mut depth: u32 = 1;
    loop {
        let (&b, tail) = rest.split_first()?;
        match b {
            b'"' => {
                let (content, after) = split_string(tail)?;
                rest = after;
                if depth == 1
                    && let Some(value) = trim_ws_start(after).strip_prefix(b":")
                {
                    if content == key {
                        let value = trim_ws_start(value).strip_prefix(b"\"")?;
                        return split_string(value).map(|(s, _)| s);
                    }
                    rest = value;
                }
            }
            b'{' | b'[' => {
                depth = depth.saturating_add(1);
                rest = tail;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return None;
                }
                rest = tail;
            }
            _ => rest = tail,
        }
    }
}

/// Splits `s`, which starts just after an opening quote, into the string's raw contents and the
/// bytes after its closing quote.
fn split_string(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut from = 0usize;
    loop {
        let at = from.saturating_add(
            s.get(from..)?
                .iter()
                .position(|b| *b == b'"' || *b == b'\\')?,
        );
        match s.get(at)? {
            b'\\' => from = at.saturating_add(2),
            _ => return Some((s.get(..at)?, s.get(at.saturating_add(1)..)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::api::usage::fixtures::{MESSAGES, RESPONSES, fixtures};
    use crate::api::usage::parse::{parse_usage_full, parse_usage_prefix};
    use crate::api::usage::usage_from_json;
    use proptest::prelude::*;

    #[test]
    fn realistic_bodies() {
        for (kind, body, want) in fixtures() {
            // The fixtures are valid JSON.
            serde_json::from_str::<serde_json::Value>(body).unwrap();
            assert_eq!(
                usage_from_json(kind, body.as_bytes()),
                Some(want),
                "{kind:?}"
            );
            // The fast path finds them (no fallback needed).
            assert!(matches!(
                locate_key_backward(body.as_bytes(), b"usage", 1),
                Locate::Found(v) if v.starts_with(b"{")
            ));
            // The fallback agrees.
            assert_eq!(
                parse_usage_full(body.as_bytes(), &["usage"]).and_then(|r| {
                    use crate::api::dialect::*;
                    match kind {
                        ApiKind::ChatCompletions => chat_usage(&r),
                        ApiKind::Responses => responses_usage(&r),
                        ApiKind::Embeddings => embeddings_usage(&r),
                        _ => anthropic_usage(&r),
                    }
                }),
                Some(want)
            );
        }
    }

    #[test]
    fn usage_first_and_nested_usage_later() {
        // A provider that serialises usage first; nested "usage" keys after it must not win.
        let body = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4},"choices":[{"message":{"content":"x","tool_calls":[{"function":{"arguments":"{\"usage\":{\"prompt_tokens\":9}}"}}]}}],"extra":{"usage":{"prompt_tokens":77}},"list":[{"usage":{"prompt_tokens":88}}]}"#;
        let got = usage_from_json(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!((got.input, got.output), (3, 4));
    }

    #[test]
    fn duplicate_usage_keys_last_wins() {
        let body = br#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, body)
                .unwrap()
                .input,
            2
        );
        let body = br#"{"usage":{"prompt_tokens":1,"prompt_tokens":7}}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, body)
                .unwrap()
                .input,
            7
        );
    }

    #[test]
    fn malformed_bodies() {
        let k = ApiKind::ChatCompletions;
        for bad in [
            "",
            " ",
            "null",
            "[]",
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            r#"{"usage":{"prompt_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":1}} {"a":1}"#,
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"usage":{"prompt_tokens":1}]"#,
            r#"{"usage":{"prompt_tokens":1}},"#,
            r#"{"a":"\"","usage":{"prompt_tokens":1},"b":"x\"}"#,
            "{\"usage\":{\"prompt_tokens\":1}}\u{0}",
            "{\"usage\":{\"prompt_tokens\":1}}\u{0}}",
        ] {
            assert_eq!(usage_from_json(k, bad.as_bytes()), None, "{bad:?}");
        }
        // Garbage the backward scan walks through sends it to the fallback's full parse.
        assert_eq!(
            usage_from_json(k, br#"{"usage":{"prompt_tokens":1},"a": nope}"#),
            None
        );
        assert_eq!(
            usage_from_json(k, br#"{"usage":{"prompt_tokens":1},"a":"x"y"}"#),
            None
        );
        assert_eq!(
            usage_from_json(k, br#"{"usage":{"prompt_tokens":1},"a":'x'}"#),
            None
        );
        // Garbage before the usage key is not looked at (documented: tails must work).
        assert_eq!(
            usage_from_json(k, br#"{"a":x"usage":{"prompt_tokens":1}}"#).map(|u| u.input),
            Some(1)
        );
    }

    #[test]
    fn tails_of_realistic_bodies() {
        // Every suffix that still holds the whole `"usage":…` member gives the usage; shorter ones
        // give None.
        for (kind, body, want) in fixtures() {
            let body = body.as_bytes();
            let Locate::Found(value) = locate_key_backward(body, b"usage", 1) else {
                panic!("fixture without usage");
            };
            let value_start = body.len() - value.len();
            let key = body[..value_start]
                .windows(7)
                .rposition(|w| w == b"\"usage\"")
                .unwrap();
            for start in 0..body.len() {
                let got = usage_from_json(kind, &body[start..]);
                if start <= key {
                    assert_eq!(got, Some(want), "{kind:?} from {start}");
                } else {
                    assert_eq!(got, None, "{kind:?} from {start}");
                }
            }
        }
        // A tail that starts inside a string holding escaped quotes.
        let tail = br#"d "usage": {"prompt_tokens": 5}" ok"}}],"usage":{"prompt_tokens":2}}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, tail)
                .unwrap()
                .input,
            2
        );
        let tail = br#"d "usage": {"prompt_tokens": 5}" ok"}}],"n":{"prompt_tokens":2}}"#;
        assert_eq!(usage_from_json(ApiKind::ChatCompletions, tail), None);
        // Grammar is not checked between the key and the end (documented).
        let body = br#"{"usage":{"prompt_tokens":1},}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, body)
                .unwrap()
                .input,
            1
        );
    }

    #[test]
    fn strict_prefixes_of_realistic_bodies_yield_none() {
        // MESSAGES and RESPONSES are excluded: a tool input / tool schema holds a nested "usage"
        // object, and a body cut right after it is exactly the documented limit of the fast path.
        for (kind, body, _) in fixtures() {
            if matches!(kind, ApiKind::Messages | ApiKind::Responses) {
                continue;
            }
            let body = body.trim_end().as_bytes();
            for cut in 0..body.len() {
                assert_eq!(
                    usage_from_json(kind, &body[..cut]),
                    None,
                    "{kind:?} cut at {cut}"
                );
            }
        }
        // RESPONSES' nested "usage" is a schema (`{"type":"integer"}`): no usage fields, so
        // not even that cut is misread.
        for (body, expected) in [(MESSAGES, 1), (RESPONSES, 0)] {
            let body = body.as_bytes();
            let mut misread = 0;
            for cut in 0..body.len() {
                misread += usize::from(usage_from_json(ApiKind::Messages, &body[..cut]).is_some());
            }
            assert_eq!(
                misread, expected,
                "exactly the cut after the nested usage object"
            );
        }
    }

    #[test]
    fn escapes_and_backslashes_around_keys() {
        let k = ApiKind::ChatCompletions;
        // A string ending in an escaped backslash right before a real key.
        let body = br#"{"a":"x\\","usage":{"prompt_tokens":4}}"#;
        assert_eq!(usage_from_json(k, body).unwrap().input, 4);
        // A string value that merely spells "usage" followed by a colon-like text.
        let body = br#"{"usage":{"prompt_tokens":4},"note":"\"usage\":{\"prompt_tokens\":9}"}"#;
        assert_eq!(usage_from_json(k, body).unwrap().input, 4);
        // "usage" as a value, not a key.
        let body = br#"{"kind":"usage","n":1}"#;
        assert_eq!(usage_from_json(k, body), None);
        // Non-ASCII text.
        let body = "{\"text\":\"héllo \u{1F600} \\u00e9\",\"usage\":{\"prompt_tokens\":2}}";
        assert_eq!(usage_from_json(k, body.as_bytes()).unwrap().input, 2);
    }

    #[test]
    fn nested_paths() {
        let event = br#"{"type":"response.completed","sequence_number":9,"response":{"id":"r","output":[{"content":[{"text":"\"usage\":1"}]}],"usage":{"input_tokens":5,"output_tokens":6},"metadata":{"usage":"x"}}}"#;
        let raw = usage_at(event, &["response", "usage"]).unwrap();
        assert_eq!((raw.input_tokens, raw.output_tokens), (Some(5), Some(6)));
        // Fallback path agrees (and handles a null parent).
        assert_eq!(parse_usage_full(event, &["response", "usage"]), Some(raw));
        assert_eq!(
            parse_usage_full(br#"{"response":null}"#, &["response", "usage"]),
            None
        );
        assert_eq!(
            usage_at(br#"{"response":null}"#, &["response", "usage"]),
            None
        );
        assert_eq!(
            usage_at(br#"{"response":{"usage":null}}"#, &["response", "usage"]),
            None
        );
    }

    #[test]
    fn top_level_string_reads_the_type() {
        let ev = br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#;
        assert_eq!(
            top_level_string(ev, b"type"),
            Some(&b"content_block_delta"[..])
        );
        let ev = br#" {"delta":{"type":"inner"},"list":[{"type":"x"}],"type" : "outer"}"#;
        assert_eq!(top_level_string(ev, b"type"), Some(&b"outer"[..]));
        assert_eq!(top_level_string(br#"{"a":{"type":"x"}}"#, b"type"), None);
        assert_eq!(top_level_string(br#"{"type":1}"#, b"type"), None);
        assert_eq!(
            top_level_string(br#"{"type":"a\"b"}"#, b"type"),
            Some(&br#"a\"b"#[..])
        );
        assert_eq!(
            top_level_string(br#"{"x":"type","type":"y"}"#, b"type"),
            Some(&b"y"[..])
        );
        assert_eq!(top_level_string(br#"{"type":"unterminated"#, b"type"), None);
        assert_eq!(top_level_string(b"[DONE]", b"type"), None);
    }

    fn json_fragment() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                "\"",
                "\\",
                " ",
                "\n",
                "usage",
                "\"usage\"",
                "\"usage\":",
                "null",
                "1",
                "-1",
                "2.5",
                "\"prompt_tokens\"",
                "\"input_tokens\"",
                "\"cached_tokens\"",
                "\"prompt_tokens_details\"",
                "\"x\"",
                "true",
                "é",
            ]),
            0..40,
        )
        .prop_map(|v| v.concat())
    }

    /// Arbitrary JSON documents whose keys come from the usage vocabulary.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0u64..2000).prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-5i64..0).prop_map(Value::from),
            prop::sample::select(vec![0.5f64, 2.0, -1.25]).prop_map(Value::from),
            "[a-z\"\\:{} ]{0,12}".prop_map(Value::String),
            Just(Value::String("\"usage\": {\"prompt_tokens\": 5}".into())),
        ];
        let key = prop::sample::select(vec![
            "usage",
            "usage",
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "prompt_tokens_details",
            "cached_tokens",
            "response",
            "message",
            "x",
            "usage ",
        ]);
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|members| {
                    Value::Object(
                        members
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                (
                    prop::sample::select(vec!["usage", "usage", "id", "choices", "usage_x"]),
                    json_value(),
                ),
                0..6,
            ),
            any::<bool>(),
        )
            .prop_map(|(members, pretty)| {
                // One top-level usage at most: with duplicates, an invalid earlier value fails the
                // full parse while the fast path reads the last one only (both fine, but they
                // differ). Other keys may repeat.
                let mut seen_usage = false;
                let mut doc = String::from("{");
                for (i, (k, v)) in members.iter().enumerate() {
                    let k = if *k == "usage" && std::mem::replace(&mut seen_usage, true) {
                        "usage_dup"
                    } else {
                        k
                    };
                    if i > 0 {
                        doc.push_str(if pretty { ",\n  " } else { "," });
                    }
                    // Duplicate keys are kept on purpose (a map would merge them).
                    doc.push_str(&format!("{k:?}:"));
                    if pretty {
                        doc.push(' ');
                        doc.push_str(&serde_json::to_string_pretty(v).unwrap());
                    } else {
                        doc.push_str(&serde_json::to_string(v).unwrap());
                    }
                }
                doc.push_str(if pretty { "\n}\n" } else { "}" });
                doc
            })
    }

    /// Named so that `cargo test --lib proptest` (the Makefile's fallback fuzzing) selects them.
    mod proptests {
        use super::*;

        proptest! {
            /// On valid documents the backward scan agrees with a full parse, and every tail gives
            /// either the same answer or None.
            #[test]
            fn fast_path_agrees_on_valid_documents(doc in json_object()) {
                let bytes = doc.as_bytes();
                let full = parse_usage_full(bytes, &["usage"]);
                prop_assert_eq!(usage_at(bytes, &["usage"]), full, "{}", doc);
                for start in 1..bytes.len() {
                    let tail = usage_at(&bytes[start..], &["usage"]);
                    prop_assert!(tail.is_none() || tail == full, "{} from {}", doc, start);
                }
            }

            /// A cut body never gives a usage the whole body does not have: every prefix reads
            /// as no usage or as the whole body's (duplicate-free) top-level usage.
            #[test]
            fn cut_bodies_never_invent_a_usage(doc in json_object()) {
                let bytes = doc.as_bytes();
                let full = parse_usage_full(bytes, &["usage"]);
                prop_assert_eq!(parse_usage_prefix(bytes), full, "{}", doc);
                for cut in 0..bytes.len() {
                    let got = parse_usage_prefix(&bytes[..cut]);
                    prop_assert!(got.is_none() || got == full, "{} cut at {}", doc, cut);
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                for (kind, _, _) in fixtures() {
                    let _ = usage_from_json(kind, &bytes);
                }
                let _ = usage_at(&bytes, &["response", "usage"]);
                let _ = top_level_string(&bytes, b"type");
            }

            #[test]
            fn json_like_fragments_never_panic(s in json_fragment()) {
                for (kind, _, _) in fixtures() {
                    let _ = usage_from_json(kind, s.as_bytes());
                }
                let _ = usage_at(s.as_bytes(), &["message", "usage"]);
                let _ = top_level_string(s.as_bytes(), b"type");
            }

            /// On valid JSON the fast path agrees with a full parse.
            #[test]
            fn fast_path_agrees_with_full_parse(s in json_fragment(), prefix in json_fragment()) {
                for candidate in [s.clone(), format!("{{{prefix}{s}}}"), format!("{{\"a\":[{s}],\"usage\":{s}}}")] {
                    let bytes = candidate.as_bytes();
                    if serde_json::from_slice::<serde_json::Value>(bytes).is_ok() {
                        let full = if trim_ws_start(bytes).first() == Some(&b'{') {
                            parse_usage_full(bytes, &["usage"])
                        } else {
                            None
                        };
                        prop_assert_eq!(usage_at(bytes, &["usage"]), full, "{}", candidate);
                    }
                }
            }

            /// Realistic bodies with arbitrary text in a content string still give their usage.
            #[test]
            fn arbitrary_content_text(text in ".{0,200}") {
                let content = serde_json::to_string(&text).unwrap();
                let body = format!(r#"{{"choices":[{{"message":{{"content":{content}}}}}],"usage":{{"prompt_tokens":3}},"tail":{content}}}"#);
                prop_assert_eq!(
                    usage_from_json(ApiKind::ChatCompletions, body.as_bytes()).map(|u| u.input),
                    Some(3)
                );
            }
        }
    }
}
