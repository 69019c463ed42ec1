//! `GeminiStreamReader` (both formats) and `JsonArrayElements` on arbitrary input, split
//! arbitrarily. Checks:
//!
//! - never panics; `buffered_bytes()` within its documented bound after every feed (`3 * max`
//!   for SSE, `max` for the JSON array), 0 after `finish` for the array;
//! - the global allocator's peak during a run, above what was live before it, stays under
//!   `12 * max + 16 KiB` (buffers of at most `max` bytes each, their capacity doubling, a moving
//!   `realloc`, and serde_json's scratch for one chunk), whatever the input's length;
//! - the result does not depend on the chunking (whole, fuzz-chosen cuts, 1-byte pieces);
//! - JSON-array mode agrees with a one-shot model: when the body is a valid JSON array whose
//!   elements all fit in `max`, the usage is the last value of each count field over the
//!   elements' valid `usageMetadata` objects, read from a `serde_json::Value` parse.
//!
//! - a whole (non-streaming) body: `read_body_usage` (backward scan) agrees with
//!   `read_response` (full parse) whenever the latter accepts the body, and never panics.
//!
//! Input layout: byte 0 = mode (bit 0: 0 = SSE, 1 = JSON array; bit 1: 0 = raw bytes, 1 = each
//! byte picks a token from `TOKENS`); byte 1 = `max` choice; byte 2 = number of cuts (mod 32);
//! then that many cut bytes (position = byte/255 of the body); the rest is the body.
#![no_main]

use std::sync::atomic::Ordering;

#[path = "common/cuts.rs"]
mod cuts;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::api::Usage;
use tollgate::api::gemini::{GeminiStreamReader, StreamFormat, read_body_usage, read_response};

#[path = "common/counting.rs"]
mod counting;
use counting::{LIVE, PEAK};

// ---- input -----------------------------------------------------------------------------------

const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    "\"",
    "\\",
    "\\\"",
    " ",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\n\r\n",
    "\r\r",
    "data: ",
    "data:",
    "event: x\n",
    ": ping\n",
    "\u{FEFF}",
    "null",
    "true",
    "0",
    "7",
    "-1",
    "2.5",
    "1e3",
    "18446744073709551615",
    "18446744073709551616",
    "\"x\"",
    "\"x\":",
    "\"usageMetadata\":",
    "\"usageMetadata\":null",
    "\"promptTokenCount\":",
    "\"candidatesTokenCount\":",
    "\"thoughtsTokenCount\":",
    "\"cachedContentTokenCount\":",
    "\"toolUsePromptTokenCount\":",
    "\"totalTokenCount\":",
    "\"candidates\":[",
    "\"finishReason\":\"STOP\"",
    "\"promptFeedback\":{\"blockReason\":\"SAFETY\"}",
    "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hi\"}]}}],",
    "{\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":4,\"thoughtsTokenCount\":2}}",
    "\"text\":\"]}\\\"[{\"",
    "é",
    "\u{1F600}",
];

const MAX_CHOICES: [usize; 8] = [0, 1, 16, 64, 200, 700, 4096, 64 * 1024];

type Outcome = (Option<Usage>, bool, bool, u64, bool, bool, bool, bool);

fn run(format: StreamFormat, max: usize, pieces: &[&[u8]]) -> Outcome {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let held = match format {
        StreamFormat::Sse => max.saturating_mul(3),
        StreamFormat::JsonArray => max,
    };
    let mut r = GeminiStreamReader::new(format, max);
    for p in pieces {
        r.feed(p);
        assert!(
            r.buffered_bytes() <= held,
            "buffered {} > {held}",
            r.buffered_bytes()
        );
    }
    r.finish();
    if format == StreamFormat::JsonArray {
        assert_eq!(r.buffered_bytes(), 0, "finish leaves nothing buffered");
    }
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    let limit = max.saturating_mul(12).saturating_add(16 * 1024);
    assert!(peak <= limit, "memory bound: peak {peak} B > {limit} B");
    (
        r.usage(),
        r.completed(),
        r.blocked(),
        r.observed_output(),
        r.overflowed(),
        r.invalid_usage(),
        r.foreign_usage(),
        r.malformed(),
    )
}

const FIELDS: [&str; 5] = [
    "promptTokenCount",
    "toolUsePromptTokenCount",
    "cachedContentTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
];

/// The one-shot model: `None` when the body is not a JSON array (or uses spellings whose
/// duplicate order a `Value` loses); else the usage expected.
fn model(body: &[u8], max: usize) -> Option<Option<Usage>> {
    if body.windows(6).any(|w| w == b"_count" || w == b"_metad") {
        return None;
    }
    let elements: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(body).ok()?;
    if elements.iter().any(|e| e.get().len() > max) {
        return None;
    }
    let mut last: [Option<u64>; 5] = [None; 5];
    let mut any = false;
    for element in elements {
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(element.get()) else {
            continue;
        };
        let meta = match obj.get("usageMetadata") {
            Some(Value::Object(meta)) => meta,
            _ => continue,
        };
        let mut fields: [Option<u64>; 5] = [None; 5];
        let mut valid = true;
        for (slot, name) in fields.iter_mut().zip(FIELDS) {
            match meta.get(name) {
                None | Some(Value::Null) => {}
                Some(v) => match v.as_u64() {
                    Some(n) => *slot = Some(n),
                    None => valid = false,
                },
            }
        }
        if !valid || fields.iter().all(Option::is_none) {
            continue;
        }
        any = true;
        for (l, f) in last.iter_mut().zip(fields) {
            if f.is_some() {
                *l = f;
            }
        }
    }
    if !any {
        return Some(None);
    }
    let n = |v: Option<u64>| v.unwrap_or(0);
    let [prompt, tool, cached, candidates, thoughts] = last;
    let input = n(prompt).saturating_add(n(tool));
    let output = n(candidates).saturating_add(n(thoughts));
    Some(Some(Usage {
        input,
        output,
        cached_input: n(cached).min(input),
        cache_write_input: 0,
        reasoning: n(thoughts).min(output),
    }))
}

fuzz_target!(|data: &[u8]| {
    let [mode, cap, ncuts, rest @ ..] = data else {
        return;
    };
    let format = if mode & 1 == 0 {
        StreamFormat::Sse
    } else {
        StreamFormat::JsonArray
    };
    let max = MAX_CHOICES[usize::from(cap % 8)];
    let ncuts = usize::from(ncuts % 32).min(rest.len());
    let (cut_bytes, body) = rest.split_at(ncuts);
    let body: Vec<u8> = if mode & 2 == 0 {
        body.to_vec()
    } else {
        body.iter()
            .flat_map(|b| TOKENS[usize::from(*b) % TOKENS.len()].bytes())
            .collect()
    };
    let pieces = cuts::pieces(&body, cut_bytes);

    let whole = run(format, max, &[&body]);
    assert_eq!(
        whole,
        run(format, max, &pieces),
        "chunking changed the result"
    );
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        whole,
        run(format, max, &bytewise),
        "1-byte pieces changed the result"
    );
    let scanned = read_body_usage(&body);
    if let Some(facts) = read_response(&body)
        && !body.windows(6).any(|w| w == b"_metad")
    {
        assert_eq!(scanned, facts.reading(), "backward scan vs full parse");
    }
    if format == StreamFormat::JsonArray
        && let Some(want) = model(&body, max)
    {
        assert_eq!(whole.0, want, "one-shot model");
    }
});
