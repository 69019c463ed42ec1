//! `UsageChunkStripper` on arbitrary bytes, split arbitrarily. Checks its documented contract
//! (module docs of `src/api/strip.rs`):
//!
//! - never panics; `held_bytes() <= max_event_bytes` after every push, 0 after `finish`;
//! - a `Cow::Borrowed` result is a contiguous sub-slice of the chunk pushed;
//! - the concatenated output does not depend on the chunking (whole, fuzz-chosen cuts, 1-byte);
//! - the output is the input minus exactly the removed events, where events and the
//!   `max_event_bytes` pass-through rule follow a byte-by-byte model of the documented grammar
//!   written here (not the stripper's incremental code). The model asks a fresh stripper to judge
//!   each *complete* event alone (the docs: a complete event is judged on its own bytes), and
//!   that judgement is itself checked against the documented rules with a `serde_json::Value`
//!   parse: every removed event satisfies rules 1-3; every kept, judged event whose JSON is
//!   unambiguous (no escapes, no duplicate deciding keys) fails one of them;
//! - nothing is removed ⇔ `stripped()` is false, and then the output equals the input.
//!
//! Input layout: byte 0 = mode (bit 0: 0 = raw bytes, 1 = each byte picks an SSE/JSON token);
//! byte 1 = `max_event_bytes` choice; byte 2 = number of cuts (mod 32); then that many cut bytes
//! (position = byte/255 of the body); the rest is the body.
#![no_main]

use std::borrow::Cow;

#[path = "common/cuts.rs"]
mod cuts;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::api::strip::UsageChunkStripper;

const TOKENS: &[&str] = &[
    "data: ",
    "data:",
    "data",
    "event: ",
    "event: message",
    "event: usage",
    "event:",
    ": keep-alive",
    ":",
    "id: 1",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\n\r\n",
    "\r\r",
    "\u{FEFF}",
    " ",
    "[DONE]",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "\\",
    "\\\"usage\\\":{",
    "null",
    "1",
    "{\"choices\":[],",
    "{\"choices\":[{}],",
    "{\"choices\":null,",
    "\"choices\":[]",
    "\"usage\":{\"prompt_tokens\":1}}",
    "\"usage\":null}",
    "\"usage\" : {}}",
    "\"usage\":5}",
    "\"usage\":",
    "\"object\":\"chat.completion.chunk\",",
    "\"object\":\"response\",",
    "\"object\":null,",
    "\"\\u0075sage\":{}",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\n",
    "data: \"usage\":{\"prompt_tokens\":3}}\n\n",
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
    "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n",
    "data: [DONE]\n\n",
    "é",
    "\u{1F600}",
];

const MAX_CHOICES: [usize; 8] = [0, 1, 8, 40, 100, 700, 4096, 64 * 1024];

/// Runs the stripper over `chunks`, checking the per-push invariants; (output, stripped,
/// pass_through).
fn run(max: usize, chunks: &[&[u8]]) -> (Vec<u8>, bool, bool) {
    let mut s = UsageChunkStripper::new(max);
    let mut out = Vec::new();
    for c in chunks {
        let got = s.push(c);
        if let Cow::Borrowed(b) = &got {
            let base = c.as_ptr() as usize;
            let at = b.as_ptr() as usize;
            assert!(
                b.is_empty() || (at >= base && at + b.len() <= base + c.len()),
                "borrowed output is not a sub-slice of the chunk"
            );
        }
        out.extend_from_slice(&got);
        assert!(s.held_bytes() <= max, "held {} > max {max}", s.held_bytes());
    }
    out.extend_from_slice(&s.finish());
    assert_eq!(s.held_bytes(), 0, "finish leaves nothing held");
    (out, s.stripped(), s.pass_through())
}

/// How the stripper judges one complete event on its own.
fn judged_usage(event: &[u8]) -> bool {
    let mut s = UsageChunkStripper::new(usize::MAX);
    let out = s.push(event);
    let removed = out.is_empty();
    drop(out);
    assert_eq!(
        removed,
        s.stripped(),
        "a complete event is forwarded whole or removed"
    );
    assert_eq!(s.held_bytes(), 0, "a complete event is not held");
    s.stripped()
}

/// Documented model, byte by byte over the whole stream: (expected output, anything removed,
/// pass-through reached, the judged events with their verdicts).
fn model(s: &[u8], max: usize) -> (Vec<u8>, bool, bool, Vec<(&[u8], bool)>) {
    let mut out = Vec::new();
    let mut judged = Vec::new();
    let mut stripped = false;
    let (mut start, mut i) = (0, 0);
    let mut line_has_bytes = false;
    while i < s.len() {
        let b = s[i];
        if b != b'\n' && b != b'\r' {
            line_has_bytes = true;
            i += 1;
            // Held back and over the cap: pass-through from this event's start.
            if i - start > max {
                out.extend_from_slice(&s[start..]);
                return (out, stripped, true, judged);
            }
            continue;
        }
        // Size: from the event's first byte to the first byte of the terminator, inclusive.
        let size = i + 1 - start;
        i += 1;
        if b == b'\r' && s.get(i) == Some(&b'\n') {
            i += 1;
        }
        if line_has_bytes {
            line_has_bytes = false;
            if i - start > max {
                // What is held (up to here) is already over the cap; so is the event's size.
                out.extend_from_slice(&s[start..]);
                return (out, stripped, true, judged);
            }
            continue;
        }
        if size > max {
            out.extend_from_slice(&s[start..]);
            return (out, stripped, true, judged);
        }
        let event = &s[start..i];
        let usage = judged_usage(event);
        judged.push((event, usage));
        if usage {
            stripped = true;
        } else {
            out.extend_from_slice(event);
        }
        start = i;
    }
    // An incomplete last event: held (if within the cap), then forwarded by finish.
    out.extend_from_slice(&s[start..]);
    (out, stripped, false, judged)
}

/// The event's lines, without terminators.
fn lines(mut rest: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    while !rest.is_empty() {
        match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            None => {
                v.push(rest);
                break;
            }
            Some(p) => {
                v.push(&rest[..p]);
                let crlf = rest[p] == b'\r' && rest.get(p + 1) == Some(&b'\n');
                rest = &rest[p + if crlf { 2 } else { 1 }..];
            }
        }
    }
    v
}

/// Rule 2 and the data of rule 3, re-implemented from the docs: Some(data) for the default type.
fn default_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    let mut event_type: &[u8] = b"";
    for line in lines(event) {
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => continue,
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field == b"data" {
            match &mut data {
                None => data = Some(value.to_vec()),
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(value);
                }
            }
        } else if field == b"event" {
            event_type = value;
        }
    }
    (event_type.is_empty() || event_type == b"message")
        .then_some(data)
        .flatten()
}

/// Rule 1: `"usage"`, JSON whitespace, `:`, JSON whitespace, not `null`.
fn rule1(bytes: &[u8]) -> bool {
    let ws = |s: &[u8]| {
        let n = s
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .count();
        s[n..].to_vec()
    };
    (0..bytes.len()).any(|i| {
        let Some(after) = bytes[i..].strip_prefix(b"\"usage\"") else {
            return false;
        };
        let after = ws(after);
        let Some(value) = after.strip_prefix(b":") else {
            return false;
        };
        !ws(value).starts_with(b"null")
    })
}

/// Rules 1-3 with a full `Value` parse, and whether the event is ambiguous for such a parse
/// (escapes or repeated deciding keys, where a `Value` — last duplicate wins — and the stripper's
/// probe may differ: RFC 8259 leaves duplicate member names to the receiver, and the documented
/// rules do not say which one counts).
fn contract_says_usage(event: &[u8]) -> (bool, bool) {
    let count = |pat: &[u8]| event.windows(pat.len()).filter(|w| *w == pat).count();
    let ambiguous = event.contains(&b'\\')
        || count(b"\"usage\"") > 1
        || count(b"\"choices\"") > 1
        || count(b"\"object\"") > 1;
    let verdict = rule1(event)
        && default_data(event).is_some_and(|data| {
            matches!(serde_json::from_slice::<Value>(&data), Ok(Value::Object(m))
                if m.get("choices").is_some_and(|c| c.as_array().is_some_and(Vec::is_empty))
                && m.get("usage").is_some_and(Value::is_object)
                && m.get("object").is_none_or(|o| o.is_null() || o == "chat.completion.chunk"))
        });
    (verdict, ambiguous)
}

fuzz_target!(|data: &[u8]| {
    let [mode, cap, ncuts, rest @ ..] = data else {
        return;
    };
    let max = match cap >> 3 {
        0 => usize::from(*cap),
        _ => MAX_CHOICES[usize::from(cap & 7)],
    };
    let ncuts = usize::from(ncuts % 32).min(rest.len());
    let (cut_bytes, body) = rest.split_at(ncuts);
    let body: Vec<u8> = if mode & 1 == 0 {
        body.to_vec()
    } else {
        body.iter()
            .flat_map(|b| TOKENS[usize::from(*b) % TOKENS.len()].bytes())
            .collect()
    };
    let chunks = cuts::pieces(&body, cut_bytes);

    let whole = run(max, &[&body]);
    let split = run(max, &chunks);
    assert_eq!(whole, split, "chunking changed the output");
    if body.len() <= 4096 {
        let bytewise: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(
            whole,
            run(max, &bytewise),
            "1-byte chunks changed the output"
        );
    }

    let (want, want_stripped, want_pass, judged) = model(&body, max);
    assert_eq!(whole.0, want, "output differs from the documented model");
    assert_eq!(whole.1, want_stripped, "stripped() differs from the model");
    assert_eq!(whole.2, want_pass, "pass_through() differs from the model");
    if !whole.1 {
        assert_eq!(whole.0, body, "nothing removed, yet the output differs");
    }
    for (event, removed) in judged {
        // As documented above: a removed event meets the rules; a kept one fails them unless
        // it is ambiguous (then either verdict is allowed).
        let (says, ambiguous) = contract_says_usage(event);
        if removed {
            assert!(says, "removed an event the rules do not match: {event:?}");
        } else if !ambiguous {
            assert!(!says, "kept an unambiguous usage chunk: {event:?}");
        }
    }
});
