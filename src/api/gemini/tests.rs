//! Gemini's request facts, edit, usage and both stream readers, on real-shaped fixtures fed
//! whole, split at every byte offset, byte by byte and at random points.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use super::fixtures::STREAMS;
use super::*;
use crate::api::Usage;
use crate::api::testing::split_at_cuts;
use crate::api::usage::Reading;

/// The three SSE line endings Google's front ends and proxies use.
const ENDINGS: [&str; 3] = ["\n", "\r\n", "\r"];

fn sse(chunks: &[&str], eol: &str) -> Vec<u8> {
    let mut out = String::new();
    for c in chunks {
        out.push_str("data: ");
        out.push_str(c);
        out.push_str(eol);
        out.push_str(eol);
    }
    out.into_bytes()
}

/// The JSON-array stream as Google sends it: `[{…}\r\n,{…}\r\n]`.
fn array(chunks: &[&str]) -> Vec<u8> {
    format!("[{}]", chunks.join("\r\n,")).into_bytes()
}

type Outcome = (Option<Usage>, bool, bool, u64, bool, bool);

fn read(format: StreamFormat, max: usize, pieces: &[&[u8]]) -> Outcome {
    let mut r = GeminiStreamReader::new(format, max);
    for p in pieces {
        r.feed(p);
        assert!(r.buffered_bytes() <= 3 * max, "memory bound");
    }
    r.finish();
    (
        r.usage(),
        r.completed(),
        r.blocked(),
        r.observed_output(),
        r.overflowed(),
        r.invalid_usage(),
    )
}

fn streams() -> Vec<(StreamFormat, Vec<u8>, Usage, bool)> {
    let mut all = Vec::new();
    for (name, chunks, input, output, cached_input, reasoning) in STREAMS {
        let want = Usage {
            input,
            output,
            cached_input,
            cache_write_input: 0,
            reasoning,
        };
        let blocked = name == "BLOCKED";
        for eol in ENDINGS {
            all.push((StreamFormat::Sse, sse(chunks, eol), want, blocked));
        }
        all.push((StreamFormat::JsonArray, array(chunks), want, blocked));
    }
    all
}

#[test]
fn fixtures_read_as_google_bills_them() {
    for (format, body, want, blocked) in streams() {
        let (usage, completed, was_blocked, _, overflowed, invalid) = read(format, 4096, &[&body]);
        assert_eq!(
            usage,
            Some(want),
            "{format:?} {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(was_blocked, blocked);
        assert!(!overflowed && !invalid);
        // A blocked prompt has no candidate, so no finishReason; the array still closes.
        assert_eq!(completed, !blocked || format == StreamFormat::JsonArray);
    }
}

#[test]
fn every_split_point_gives_the_same_result() {
    for (format, body, _, _) in streams() {
        let whole = read(format, 4096, &[&body]);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(
                read(format, 4096, &[a, b]),
                whole,
                "{format:?} cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(read(format, 4096, &bytes), whole, "{format:?} byte by byte");
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        rng_seed: RngSeed::Fixed(20),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn random_splits_and_bounds_agree_with_one_shot(
        which in 0usize..64,
        cuts in proptest::collection::vec(0usize..4096, 0..12),
        max in prop_oneof![Just(4096usize), 1usize..700],
    ) {
        let all = streams();
        let (format, body, _, _) = &all[which % all.len()];
        let pieces = split_at_cuts(body, &cuts);
        prop_assert_eq!(read(*format, max, &pieces), read(*format, max, &[body]));
    }
}

#[test]
fn running_totals_are_never_added() {
    // Usage on every chunk: the last value of each field, not the sum of three chunks.
    let (_, chunks, ..) = STREAMS[0];
    let (usage, ..) = read(StreamFormat::JsonArray, 4096, &[&array(chunks)]);
    assert_eq!(usage.map(|u| (u.input, u.output)), Some((2117, 421)));
    // A field missing from a later chunk keeps its earlier value.
    let body = array(&[
        r#"{"usageMetadata":{"promptTokenCount":10,"thoughtsTokenCount":4}}"#,
        r#"{"usageMetadata":{"candidatesTokenCount":6,"thoughtsTokenCount":null}}"#,
    ]);
    let (usage, ..) = read(StreamFormat::JsonArray, 4096, &[&body]);
    assert_eq!(
        usage,
        Some(Usage {
            input: 10,
            output: 10,
            reasoning: 4,
            ..Usage::default()
        })
    );
}

#[test]
fn invalid_and_foreign_usage_is_flagged_and_the_earlier_kept() {
    let body = sse(
        &[
            r#"{"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":2}}"#,
            r#"{"usageMetadata":{"promptTokenCount":-1,"candidatesTokenCount":99}}"#,
            r#"{"usageMetadata":{"candidatesTokenCount":"5"}}"#,
            r#"{"usageMetadata":[1]}"#,
            r#"{"usageMetadata":{"totalTokenCount":500}}"#,
            r#"{"usage":{"prompt_tokens":7}}"#,
        ],
        "\n",
    );
    let mut r = GeminiStreamReader::new(StreamFormat::Sse, 4096);
    r.feed(&body);
    r.finish();
    assert_eq!(r.usage().map(|u| (u.input, u.output)), Some((10, 2)));
    assert!(r.invalid_usage() && r.foreign_usage() && !r.malformed());
    for (json, want) in [
        (
            &br#"{"usageMetadata":{"promptTokenCount":1.5}}"#[..],
            Reading::Invalid,
        ),
        (br#"{"usageMetadata":{}}"#, Reading::Foreign),
        (br#"{"usageMetadata":null}"#, Reading::Absent),
        (br#"{"candidates":[]}"#, Reading::Absent),
    ] {
        assert_eq!(read_response(json).map(|f| f.reading()), Some(want));
    }
    assert_eq!(read_response(b"[]"), None);
    assert_eq!(read_response(br#"{"a":1} x"#), None);
}

#[test]
fn whole_responses_blocked_prompts_and_snake_case() {
    let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9},"modelVersion":"gemini-2.5-pro"}"#;
    let facts = read_response(blocked).unwrap();
    assert!(facts.blocked && !facts.finished);
    assert_eq!(facts.reading().usage().map(|u| u.input), Some(9));
    let unspecified = br#"{"promptFeedback":{"blockReason":"BLOCK_REASON_UNSPECIFIED"}}"#;
    assert!(!read_response(unspecified).unwrap().blocked);
    let snake = br#"{"usage_metadata":{"prompt_token_count":3,"candidates_token_count":4,"thoughts_token_count":5,"cached_content_token_count":9}}"#;
    assert_eq!(
        read_response(snake).unwrap().reading().usage(),
        Some(Usage {
            input: 3,
            output: 9,
            cached_input: 3,
            cache_write_input: 0,
            reasoning: 5,
        })
    );
    let max = format!(
        r#"{{"usageMetadata":{{"promptTokenCount":{m},"toolUsePromptTokenCount":{m},"candidatesTokenCount":{m},"thoughtsTokenCount":1}}}}"#,
        m = u64::MAX
    );
    let u = read_response(max.as_bytes())
        .unwrap()
        .reading()
        .usage()
        .unwrap();
    assert_eq!((u.input, u.output, u.reasoning), (u64::MAX, u64::MAX, 1));
}

#[test]
fn an_element_over_the_bound_is_skipped_and_the_next_read() {
    let big = format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{}"}}]}}}}],"usageMetadata":{{"promptTokenCount":1000}}}}"#,
        "x\\\"]}".repeat(100)
    );
    let small = r#"{"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1}}"#;
    for format in [StreamFormat::JsonArray, StreamFormat::Sse] {
        let body = match format {
            StreamFormat::JsonArray => array(&[&big, small]),
            StreamFormat::Sse => sse(&[&big, small], "\r\n"),
        };
        let (usage, _, _, _, overflowed, _) = read(format, 200, &[&body]);
        assert!(overflowed, "{format:?}");
        assert_eq!(
            usage.map(|u| (u.input, u.output)),
            Some((5, 1)),
            "{format:?}"
        );
        let bytes: Vec<&[u8]> = body.chunks(7).collect();
        assert_eq!(read(format, 200, &bytes), read(format, 200, &[&body]));
    }
}

#[test]
fn array_splitter_structure() {
    let mut seen = Vec::new();
    let mut s = JsonArrayElements::new(64);
    s.feed(
        br#" [ {"a":"]}\\"} , [1,{"b":2}] ,7, "{[\"", {"c":"\"}"} ] "#,
        &mut |e| seen.push(String::from_utf8(e.to_vec()).unwrap()),
    );
    assert_eq!(
        seen,
        [r#"{"a":"]}\\"}"#, r#"[1,{"b":2}]"#, r#"{"c":"\"}"}"#]
    );
    assert!(s.closed() && s.stray() && !s.overflowed());
    assert_eq!(s.buffered_bytes(), 0);
    // A cut element is dropped at the end.
    let mut s = JsonArrayElements::new(64);
    let mut n = 0;
    s.feed(br#"[{"a":1},{"b":"#, &mut |_| n += 1);
    s.finish();
    assert_eq!((n, s.buffered_bytes(), s.closed()), (1, 0, false));
}

// ---------------------------------------------------------------------------------------------
// Requests.

#[test]
fn reads_both_spellings_and_the_largest() {
    let facts = |body: &str| generation_facts(body.as_bytes());
    assert_eq!(
        facts(r#"{"contents":[],"generationConfig":{"maxOutputTokens":100,"candidateCount":3}}"#),
        Ok(GenerationFacts {
            max_output_tokens: Some(100),
            candidates: 3,
            greedy: false
        })
    );
    assert_eq!(
        facts(r#"{"generation_config":{"max_output_tokens":50,"thinking_config":{"thinking_budget":9}}}"#)
            .unwrap()
            .max_output_tokens,
        Some(50)
    );
    let both = r#"{"generationConfig":{"maxOutputTokens":10,"max_output_tokens":70,"candidateCount":2},"generation_config":{"candidate_count":4,"maxOutputTokens":20}}"#;
    assert_eq!(
        facts(both),
        Ok(GenerationFacts {
            max_output_tokens: Some(70),
            candidates: 4,
            greedy: false
        })
    );
    assert_eq!(
        facts(r#"{"generationConfig":{"maxOutputTokens":10,"maxOutputTokens":5}}"#)
            .unwrap()
            .max_output_tokens,
        Some(10)
    );
    assert_eq!(
        facts(r#"{"maxOutputTokens":5,"generationConfig":null}"#),
        Ok(GenerationFacts {
            max_output_tokens: None,
            candidates: 1,
            greedy: false
        })
    );
}

#[test]
fn greedy_decoding_is_read_in_either_spelling_with_one_candidate() {
    let greedy = |body: &str| generation_facts(body.as_bytes()).unwrap().greedy;
    assert!(greedy(r#"{"generationConfig":{"temperature":0}}"#));
    assert!(greedy(
        r#"{"generation_config":{"top_k":1,"temperature":0.7}}"#
    ));
    assert!(greedy(
        r#"{"generationConfig":{"topP":0.0,"candidateCount":1}}"#
    ));
    assert!(!greedy(
        r#"{"generationConfig":{"temperature":0,"candidateCount":2}}"#
    ));
    assert!(!greedy(
        r#"{"generationConfig":{"temperature":0.2,"topK":40}}"#
    ));
    assert!(!greedy(r#"{"generationConfig":{"temperature":"0"}}"#));
    assert!(!greedy(r#"{"temperature":0,"contents":[]}"#));
}

#[test]
fn counts_that_are_not_positive_integers_are_refused() {
    for (body, param) in [
        (
            r#"{"generationConfig":{"maxOutputTokens":0}}"#,
            "generationConfig.maxOutputTokens",
        ),
        (
            r#"{"generationConfig":{"candidateCount":0}}"#,
            "generationConfig.candidateCount",
        ),
        (
            r#"{"generationConfig":{"candidateCount":"2"}}"#,
            "generationConfig.candidateCount",
        ),
        (
            r#"{"generationConfig":{"maxOutputTokens":20.0}}"#,
            "generationConfig.maxOutputTokens",
        ),
        (
            r#"{"generation_config":{"max_output_tokens":-1}}"#,
            "generation_config.max_output_tokens",
        ),
        (
            r#"{"generationConfig":{"candidateCount":true}}"#,
            "generationConfig.candidateCount",
        ),
        (r#"{"generationConfig":[1]}"#, "generationConfig"),
        (r#"{"generationConfig":"x"}"#, "generationConfig"),
    ] {
        let err = generation_facts(body.as_bytes()).unwrap_err();
        assert_eq!(err.param.as_deref(), Some(param), "{body}");
    }
    for body in ["", "[]", "{", r#"{"a":1}x"#] {
        assert_eq!(
            generation_facts(body.as_bytes()).unwrap_err().param,
            None,
            "{body}"
        );
    }
}

#[test]
fn the_edit_sets_or_lowers_in_the_spelling_used() {
    let edit = |body: &str, cap| -> serde_json::Value {
        serde_json::from_slice(&set_max_output_tokens(body.as_bytes(), cap).unwrap()).unwrap()
    };
    let v = edit(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#, 64);
    assert_eq!(
        v["generationConfig"],
        serde_json::json!({"maxOutputTokens": 64})
    );
    assert_eq!(v["contents"][0]["parts"][0]["text"], "hi");
    let v = edit(
        r#"{"generationConfig":{"maxOutputTokens":10,"temperature":0}}"#,
        64,
    );
    assert_eq!(v["generationConfig"]["maxOutputTokens"], 10);
    assert_eq!(v["generationConfig"]["temperature"], 0);
    let v = edit(r#"{"generation_config":{"max_output_tokens":100}}"#, 64);
    assert_eq!(
        v["generation_config"],
        serde_json::json!({"max_output_tokens": 64})
    );
    assert!(v.get("generationConfig").is_none());
    let v = edit(
        r#"{"generationConfig":null,"generation_config":{"candidate_count":2}}"#,
        8,
    );
    assert_eq!(v["generationConfig"]["maxOutputTokens"], 8);
    assert_eq!(v["generation_config"]["maxOutputTokens"], 8);
    assert_eq!(set_max_output_tokens(b"[]", 8), None);
    assert_eq!(set_max_output_tokens(br#"{"generationConfig":3}"#, 8), None);
}

/// The most a permissive Google front end may generate for a body: the largest cap it can read
/// (either spelling of either config; absent: unbounded) times the largest candidate count.
fn permissive_output(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    let (mut cap, mut n): (Option<u64>, u64) = (None, 1);
    let mut capped_everywhere = true;
    let mut any_config = false;
    for config in ["generationConfig", "generation_config"] {
        let Some(c) = v.get(config).filter(|c| c.is_object()) else {
            continue;
        };
        any_config = true;
        let here = ["maxOutputTokens", "max_output_tokens"]
            .iter()
            .filter_map(|k| c.get(*k).and_then(|x| x.as_u64()))
            .max();
        capped_everywhere &= here.is_some();
        cap = cap.max(here);
        for k in ["candidateCount", "candidate_count"] {
            n = n.max(c.get(k).and_then(|x| x.as_u64()).unwrap_or(1));
        }
    }
    match cap {
        Some(cap) if any_config && capped_everywhere => cap.saturating_mul(n),
        _ => u64::MAX,
    }
}

fn arb_count() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..5000).prop_map(|n| n.to_string()),
        Just("null".to_string()),
    ]
}

fn arb_config() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            prop_oneof![
                Just("maxOutputTokens"),
                Just("max_output_tokens"),
                Just("candidateCount"),
                Just("candidate_count"),
                Just("temperature"),
            ],
            arb_count(),
        ),
        0..5,
    )
    .prop_map(|members| {
        let inner: Vec<String> = members
            .iter()
            .map(|(k, v)| format!(r#""{k}":{v}"#))
            .collect();
        format!("{{{}}}", inner.join(","))
    })
}

proptest! {
    #![proptest_config(Config {
        cases: 512,
        rng_seed: RngSeed::Fixed(2020),
        failure_persistence: None,
        ..Config::default()
    })]

    /// Strict mode's bound: the cap it sends (the body's own if smaller) times the candidates read
    /// from the body covers what a permissive upstream may generate from the edited body.
    #[test]
    fn strict_bound_covers_a_permissive_upstream(
        configs in proptest::collection::vec(
            (prop_oneof![Just("generationConfig"), Just("generation_config")],
             prop_oneof![arb_config(), Just("null".to_string())]),
            0..3,
        ),
        cap in 1u64..4000,
    ) {
        let members: Vec<String> = configs.iter().map(|(k, v)| format!(r#""{k}":{v}"#)).collect();
        let body = format!(r#"{{"contents":[{{"parts":[{{"text":"hi"}}]}}],{}}}"#, members.join(","))
            .replace(",}", "}");
        let facts = generation_facts(body.as_bytes()).unwrap();
        let sent = facts.max_output_tokens.map_or(cap, |m| m.min(cap));
        let edited = set_max_output_tokens(body.as_bytes(), sent).unwrap();
        let bound = sent.saturating_mul(facts.candidates);
        prop_assert!(permissive_output(&edited) <= bound, "{} -> {}", body, String::from_utf8_lossy(&edited));
    }
}

#[test]
fn whole_bodies_and_their_tails() {
    // A non-streaming body is the stream's chunks merged; the last chunk of each fixture holds
    // the final totals (the SEPARATE one: a usage-only chunk).
    for (name, chunks, input, output, cached_input, reasoning) in STREAMS {
        let body = chunks[chunks.len() - 1].as_bytes();
        let last = read_response(body).unwrap().usage.unwrap();
        let want = Reading::Usage(last.normalise());
        if name != "LAST" {
            assert_eq!(
                want.usage()
                    .map(|u| (u.input, u.output, u.cached_input, u.reasoning)),
                Some((input, output, cached_input, reasoning)),
                "{name}"
            );
        }
        assert_eq!(read_body_usage(body), want, "{name}");
        let key = body
            .windows(15)
            .rposition(|w| w == b"\"usageMetadata\"")
            .unwrap();
        for start in 0..body.len() {
            let got = read_body_usage(&body[start..]);
            if start <= key {
                assert_eq!(got, want, "{name} from {start}");
            } else {
                assert_eq!(got, Reading::Absent, "{name} from {start}");
            }
        }
    }
    // The scan falls back to a full parse when it cannot vouch; both spellings.
    assert_eq!(
        read_body_usage(br#"{"usageMetadata":{"promptTokenCount":4},"x":nope}"#),
        Reading::Absent
    );
    assert_eq!(
        read_body_usage(br#"{"usage_metadata":{"prompt_token_count":4}}"#)
            .usage()
            .map(|u| u.input),
        Some(4)
    );
    assert_eq!(
        read_body_usage(br#"{"usageMetadata":{"promptTokenCount":"4"}}"#),
        Reading::Invalid
    );
    assert_eq!(read_body_usage(br#"{"candidates":[]}"#), Reading::Absent);
}
