//! Removes the synthetic usage chunk from a streamed Chat Completions response.
//!
//! When a client streams without `stream_options.include_usage`, Tollgate asks the upstream for
//! usage anyway (it needs it for budgets) and must hide the resulting usage chunk, so that the
//! client receives byte for byte the stream it would have received: the upstream's stream minus
//! that one event, every other byte (line endings, comments, keep-alives) untouched.
//!
//! # Events
//!
//! The body is cut into *events* the way an SSE parser sees them (WHATWG HTML, "Interpreting an
//! event stream"): lines end in `"\r\n"`, `"\n"` or `"\r"` (a `"\r"` ending one chunk and a `"\n"`
//! starting the next are one line break), and an event is every line up to and including the next
//! empty line — its bytes run from its first byte to the end of that empty line's terminator. An
//! empty line with no line before it (extra blank lines) is an event of its own and is forwarded.
//!
//! An event is the **usage chunk**, and is removed with its terminating empty line, when:
//!
//! 1. its bytes contain `"usage"`, optional JSON whitespace, `:`, optional JSON whitespace and then
//!    something other than `null` (a byte scan; this is the fast path: chunks carrying
//!    `"usage":null`, and text containing `\"usage\"` — escaped inside a JSON string — fail it);
//! 2. its event type is the default one (no `event:` field, or `event: message`);
//! 3. its data (the `data:` lines, one leading space stripped, joined with `"\n"`) is a JSON object
//!    whose `choices` is an empty array, whose `usage` is an object, and whose `object`, if
//!    present, is `"chat.completion.chunk"`.
//!
//! Every event that matches is removed (a stream answering one request carries one usage chunk).
//! Anything else is forwarded verbatim: the Azure `prompt_filter_results` chunk (empty `choices`,
//! no usage), chunks with `"usage":null`, `[DONE]`, comments, events that are not JSON, and
//! objects that repeat a key (their meaning is ambiguous, so the event is forwarded). A leading
//! UTF-8 BOM is not stripped before field names, so a usage chunk that is the very first event of a
//! BOM-prefixed stream is not recognised (it is forwarded; no provider sends one first).
//!
//! # Holding back and pass-through
//!
//! A complete event can be judged at once, so complete events are forwarded (or removed) as soon
//! as they arrive; the incomplete event at the end of a chunk is held back until its empty line
//! arrives, or [`UsageChunkStripper::finish`] forwards it as is. An event's *size* is counted from
//! its first byte up to and including the first byte of its terminating empty line's terminator.
//! As soon as an event is known to be larger than `max_event_bytes` (while held back or when it
//! completes) the stripper switches to **pass-through**: that event and everything after it are
//! forwarded verbatim and nothing more is removed. So at most `max_event_bytes + 1` bytes are ever
//! held, and which events are removed depends only on the stream, never on how it is split into
//! chunks. Bytes are never dropped except those of removed usage chunks.

use std::borrow::Cow;
use std::fmt;
use std::mem;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::usage::trim_ws_start;

/// Streaming filter that removes the usage chunk from a Chat Completions event stream. See the
/// module documentation.
#[derive(Debug, Clone)]
pub struct UsageChunkStripper {
    max_event_bytes: usize,
    /// The bytes of the incomplete event at the end of the stream so far (at most
    /// `max_event_bytes`; empty between events and in pass-through).
    held: Vec<u8>,
    /// The current (unterminated) line of the held event has at least one byte.
    line_has_bytes: bool,
    /// The last byte seen was a `"\r"` line terminator: a `"\n"` opening the next chunk belongs to
    /// it.
    pending_cr: PendingCr,
    pass_through: bool,
    stripped: bool,
}

/// What a `"\n"` opening the next chunk belongs to, when the last chunk ended with a `"\r"`
/// terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingCr {
    /// The last chunk did not end with a `"\r"` terminator.
    None,
    /// A line of the held event: the `"\n"` is part of the held event.
    InEvent,
    /// The empty line that ended a forwarded event: forward the `"\n"`.
    EventKept,
    /// The empty line that ended a removed usage chunk: drop the `"\n"` too.
    EventStripped,
}

impl UsageChunkStripper {
    /// `max_event_bytes` bounds the bytes held back (see the module documentation); it must exceed
    /// the largest usage chunk (a few hundred bytes) for the chunk to be removed.
    pub fn new(max_event_bytes: usize) -> Self {
        UsageChunkStripper {
            max_event_bytes,
            held: Vec::new(),
            line_has_bytes: false,
            pending_cr: PendingCr::None,
            pass_through: false,
            stripped: false,
        }
    }

    /// Takes the next response body chunk (split anywhere: mid-line, mid-`"\r\n"`, mid-UTF-8) and
    /// returns the bytes to forward to the client now: every event completed by this chunk except
    /// the usage chunk, verbatim, preceded by the held-back start of the first one. The incomplete
    /// event at the end of the chunk is held back.
    ///
    /// `Cow::Borrowed` is always a contiguous sub-slice of `chunk`; the chunk is forwarded
    /// unchanged exactly when the result is borrowed and as long as `chunk` (then the caller need
    /// not rewrite the body). That is the common case: nothing held before, the chunk ends at an
    /// event boundary and holds no usage chunk (or pass-through is on).
    pub fn push<'a>(&mut self, chunk: &'a [u8]) -> Cow<'a, [u8]> {
        if self.pass_through || chunk.is_empty() {
            return Cow::Borrowed(chunk);
        }
        let mut out = Output::new(chunk);
        let opens_with_lf = chunk.first() == Some(&b'\n');
        // Where the current event starts in `chunk` (the held bytes, if any, come before it).
        let mut start = 0;
        // Where scanning starts: past a "\n" that completes the previous chunk's final "\r".
        let mut i = 0;
        if opens_with_lf {
            match mem::replace(&mut self.pending_cr, PendingCr::None) {
                PendingCr::EventKept => {
                    out.slice(0, 1);
                    (start, i) = (1, 1);
                }
                PendingCr::EventStripped => (start, i) = (1, 1),
                // The "\n" ends a line of the held event (not an empty line) and is part of it.
                PendingCr::InEvent => i = 1,
                PendingCr::None => {}
            }
        } else {
            self.pending_cr = PendingCr::None;
        }
        let mut line_has_bytes = self.line_has_bytes;
        while let Some(offset) = chunk
            .get(i..)
            .and_then(|rest| rest.iter().position(|b| *b == b'\n' || *b == b'\r'))
        {
            let pos = i.saturating_add(offset);
            let Some(&terminator) = chunk.get(pos) else {
                break;
            };
            if offset > 0 {
                line_has_bytes = true;
            }
            i = pos.saturating_add(1);
            let cr_at_end = terminator == b'\r' && i == chunk.len();
            if terminator == b'\r' && chunk.get(i) == Some(&b'\n') {
                i = i.saturating_add(1);
            }
            if line_has_bytes {
                // The end of a line of the current event.
                line_has_bytes = false;
                if cr_at_end {
                    self.pending_cr = PendingCr::InEvent;
                }
                continue;
            }
            // An empty line: the event `held + chunk[start..i]` is complete.
            let size = self
                .held
                .len()
                .saturating_add(pos.saturating_add(1).saturating_sub(start));
            if size > self.max_event_bytes {
                self.pending_cr = PendingCr::None;
                return self.enter_pass_through(out, start);
            }
            let event = chunk.get(start..i).unwrap_or_default();
            let strip = if self.held.is_empty() {
                let strip = is_usage_event(event);
                if !strip {
                    out.slice(start, i);
                }
                strip
            } else {
                self.held.extend_from_slice(event);
                let strip = is_usage_event(&self.held);
                if !strip {
                    out.bytes(&self.held);
                }
                self.held.clear();
                strip
            };
            self.stripped |= strip;
            if cr_at_end {
                self.pending_cr = if strip {
                    PendingCr::EventStripped
                } else {
                    PendingCr::EventKept
                };
            }
            start = i;
        }
        // The start of the next event, if any, is held back.
        let rest = chunk.get(start..).unwrap_or_default();
        if i < chunk.len() {
            line_has_bytes = true;
        }
        if !rest.is_empty() {
            if self.held.len().saturating_add(rest.len()) > self.max_event_bytes {
                self.pending_cr = PendingCr::None;
                return self.enter_pass_through(out, start);
            }
            self.held.extend_from_slice(rest);
        }
        self.line_has_bytes = line_has_bytes;
        out.into_cow()
    }

    /// End of stream: returns whatever is held back (an incomplete last event is forwarded as is,
    /// even if it looks like a usage chunk) and resets the line state.
    pub fn finish(&mut self) -> Vec<u8> {
        self.line_has_bytes = false;
        self.pending_cr = PendingCr::None;
        mem::take(&mut self.held)
    }

    /// Whether a usage chunk was removed.
    pub fn stripped(&self) -> bool {
        self.stripped
    }

    /// Whether an event exceeded `max_event_bytes`, so that everything from it on is forwarded
    /// verbatim (a usage chunk after it is not removed).
    pub fn pass_through(&self) -> bool {
        self.pass_through
    }

    /// Bytes currently held back (at most `max_event_bytes`).
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Forwards the held bytes and `chunk[start..]`, and everything after.
    fn enter_pass_through<'a>(&mut self, mut out: Output<'a>, start: usize) -> Cow<'a, [u8]> {
        self.pass_through = true;
        self.line_has_bytes = false;
        out.bytes(&self.held);
        self.held = Vec::new();
        out.slice(start, out.chunk.len());
        out.into_cow()
    }
}

/// The bytes forwarded for one chunk: a sub-slice of it until something is dropped or held bytes
/// are forwarded, then an owned copy.
struct Output<'a> {
    chunk: &'a [u8],
    state: OutState,
}

enum OutState {
    Empty,
    Slice(usize, usize),
    Owned(Vec<u8>),
}

impl<'a> Output<'a> {
    fn new(chunk: &'a [u8]) -> Self {
        Output {
            chunk,
            state: OutState::Empty,
        }
    }

    /// Appends `chunk[from..to]`.
    fn slice(&mut self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        let chunk = self.chunk;
        let part = chunk.get(from..to).unwrap_or_default();
        match &mut self.state {
            OutState::Empty => self.state = OutState::Slice(from, to),
            OutState::Slice(_, end) if *end == from => *end = to,
            OutState::Slice(s, e) => {
                let mut v = Vec::with_capacity(chunk.len());
                v.extend_from_slice(chunk.get(*s..*e).unwrap_or_default());
                v.extend_from_slice(part);
                self.state = OutState::Owned(v);
            }
            OutState::Owned(v) => v.extend_from_slice(part),
        }
    }

    /// Appends bytes that are not (at this place) in the chunk.
    fn bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let chunk = self.chunk;
        match &mut self.state {
            OutState::Empty => {
                let mut v = Vec::with_capacity(bytes.len().saturating_add(chunk.len()));
                v.extend_from_slice(bytes);
                self.state = OutState::Owned(v);
            }
            OutState::Slice(s, e) => {
                let mut v = Vec::with_capacity(bytes.len().saturating_add(chunk.len()));
                v.extend_from_slice(chunk.get(*s..*e).unwrap_or_default());
                v.extend_from_slice(bytes);
                self.state = OutState::Owned(v);
            }
            OutState::Owned(v) => v.extend_from_slice(bytes),
        }
    }

    fn into_cow(self) -> Cow<'a, [u8]> {
        match self.state {
            OutState::Empty => Cow::Borrowed(&[]),
            OutState::Slice(s, e) => Cow::Borrowed(self.chunk.get(s..e).unwrap_or_default()),
            OutState::Owned(v) => Cow::Owned(v),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Recognising the usage chunk.

/// Whether a complete event (its bytes, terminators included) is the usage chunk.
fn is_usage_event(event: &[u8]) -> bool {
    has_non_null_usage_member(event)
        && default_event_data(event).is_some_and(|data| is_usage_chunk_json(&data))
}

fn skip_json_ws(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t' | b'\r' | b'\n', rest @ ..] = s {
        s = rest;
    }
    s
}

/// Byte scan: `"usage"`, whitespace, `:`, whitespace and not `null`.
fn has_non_null_usage_member(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while let Some(quote) = rest.iter().position(|b| *b == b'"') {
        rest = rest.get(quote.saturating_add(1)..).unwrap_or_default();
        let Some(after_key) = rest.strip_prefix(b"usage\"") else {
            continue;
        };
        let Some(value) = skip_json_ws(after_key).strip_prefix(b":") else {
            continue;
        };
        if !skip_json_ws(value).starts_with(b"null") {
            return true;
        }
    }
    false
}

/// The lines of an event, without their terminators (`"\r\n"`, `"\n"` or `"\r"`).
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(pos) = self.rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
            return Some(mem::take(&mut self.rest));
        };
        let (line, tail) = self.rest.split_at_checked(pos)?;
        let after = tail.get(1..).unwrap_or_default();
        self.rest = match tail.first() {
            Some(b'\r') => after.strip_prefix(b"\n").unwrap_or(after),
            _ => after,
        };
        Some(line)
    }
}

/// The data of an event of the default type (`None` for another type or no data line).
fn default_event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    let mut event_type: &[u8] = b"";
    for line in (Lines { rest: event }) {
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => continue,
            Some(colon) => {
                let value = line.get(colon.saturating_add(1)..).unwrap_or_default();
                (
                    line.get(..colon).unwrap_or_default(),
                    value.strip_prefix(b" ").unwrap_or(value),
                )
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                data = Some(match data {
                    None => Cow::Borrowed(value),
                    Some(previous) => {
                        let mut joined = previous.into_owned();
                        joined.push(b'\n');
                        joined.extend_from_slice(value);
                        Cow::Owned(joined)
                    }
                });
            }
            b"event" => event_type = value,
            _ => {}
        }
    }
    if event_type.is_empty() || event_type == b"message" {
        data
    } else {
        None
    }
}

/// The members of a chunk that decide whether it is the usage chunk; others are skipped.
#[derive(Deserialize)]
struct ChunkProbe {
    object: Option<String>,
    choices: Option<Vec<IgnoredAny>>,
    usage: Option<JsonObject>,
}

/// Any JSON object, contents skipped (arrays, strings, numbers are rejected).
struct JsonObject;

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = JsonObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(JsonObject)
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Whether event data is a chat completion chunk with empty `choices` and an object `usage`.
fn is_usage_chunk_json(data: &[u8]) -> bool {
    // serde would also read a struct from an array; only an object is a chunk.
    if !trim_ws_start(data).starts_with(b"{") {
        return false;
    }
    match serde_json::from_slice::<ChunkProbe>(data) {
        Ok(probe) => {
            probe.choices.is_some_and(|c| c.is_empty())
                && probe.usage.is_some()
                && probe
                    .object
                    .is_none_or(|object| object == "chat.completion.chunk")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testing::split_at_cuts;
    use proptest::prelude::*;

    const ROLE: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Qz"}"#,
        "\n\n"
    );
    const CONTENT: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x1"}"#,
        "\n\n"
    );
    /// Content whose text holds an escaped `"usage": {` (and non-ASCII, to split mid-UTF-8).
    const CONTENT_ESCAPED_USAGE: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"! \"usage\": {\"prompt_tokens\": 99} é ✓"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n"
    );
    const COMMENT: &str = ": keep-alive\n\n";
    const FINISH: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        "\n\n"
    );
    const USAGE: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[],"usage":{"prompt_tokens":1234,"completion_tokens":37,"total_tokens":1271,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"dGk"}"#,
        "\n\n"
    );
    const DONE: &str = "data: [DONE]\n\n";
    /// Azure's first chunk: empty choices, no usage.
    const AZURE_FILTER: &str = concat!(
        r#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"}}}]}"#,
        "\n\n"
    );
    /// Python-style spacing; usage chunk split over two data lines.
    const USAGE_SPACED_MULTILINE: &str = concat!(
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [], "#,
        "\n",
        r#"data: "usage" : {"prompt_tokens": 3, "completion_tokens": 4}}"#,
        "\n\n"
    );

    /// (events, index of the usage event) for the realistic fixtures.
    fn fixtures() -> Vec<(Vec<&'static str>, Option<usize>)> {
        vec![
            (
                vec![
                    ROLE,
                    CONTENT,
                    CONTENT_ESCAPED_USAGE,
                    COMMENT,
                    CONTENT,
                    FINISH,
                    USAGE,
                    DONE,
                ],
                Some(6),
            ),
            (
                vec![
                    AZURE_FILTER,
                    ROLE,
                    CONTENT,
                    FINISH,
                    USAGE_SPACED_MULTILINE,
                    DONE,
                ],
                Some(4),
            ),
            (
                vec![AZURE_FILTER, ROLE, CONTENT_ESCAPED_USAGE, FINISH, DONE],
                None,
            ),
        ]
    }

    /// (input, expected output) per fixture and line ending.
    fn cases() -> Vec<(Vec<u8>, Vec<u8>, bool)> {
        let mut out = Vec::new();
        for (events, usage_at) in fixtures() {
            for ending in ["\n", "\r\n", "\r"] {
                let events: Vec<String> = events.iter().map(|e| e.replace('\n', ending)).collect();
                let input = events.concat();
                let expected: String = events
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != usage_at)
                    .map(|(_, e)| e.as_str())
                    .collect();
                out.push((
                    input.into_bytes(),
                    expected.into_bytes(),
                    usage_at.is_some(),
                ));
            }
        }
        out
    }

    /// Runs the stripper over `chunks`; checks the holding bound after each push.
    fn run(max: usize, chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut s = UsageChunkStripper::new(max);
        let mut out = Vec::new();
        for c in chunks {
            let got = s.push(c);
            if let Cow::Borrowed(b) = &got {
                // A borrowed result is a sub-slice of the chunk.
                let base = c.as_ptr() as usize;
                let at = b.as_ptr() as usize;
                assert!(b.is_empty() || (at >= base && at + b.len() <= base + c.len()));
            }
            out.extend_from_slice(&got);
            assert!(s.held_bytes() <= max);
        }
        out.extend_from_slice(&s.finish());
        assert_eq!(s.held_bytes(), 0);
        (out, s.stripped())
    }

    /// Non-incremental model: the whole stream at once, byte by byte.
    fn reference(s: &[u8], max: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut stripped = false;
        let mut start = 0;
        let mut i = 0;
        let mut line_has_bytes = false;
        while i < s.len() {
            let b = s[i];
            if b != b'\n' && b != b'\r' {
                line_has_bytes = true;
                i += 1;
                continue;
            }
            let size = i + 1 - start;
            i += 1;
            if b == b'\r' && s.get(i) == Some(&b'\n') {
                i += 1;
            }
            if line_has_bytes {
                line_has_bytes = false;
                continue;
            }
            if size > max {
                out.extend_from_slice(&s[start..]);
                return (out, stripped);
            }
            let event = &s[start..i];
            if is_usage_event(event) {
                stripped = true;
            } else {
                out.extend_from_slice(event);
            }
            start = i;
        }
        out.extend_from_slice(&s[start..]);
        (out, stripped)
    }

    #[test]
    fn realistic_streams_lose_exactly_the_usage_chunk() {
        for (input, expected, has_usage) in cases() {
            let (got, stripped) = run(4096, &[&input]);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&expected)
            );
            assert_eq!(stripped, has_usage);
            assert_eq!(reference(&input, 4096), (expected, has_usage));
        }
    }

    #[test]
    fn whole_events_without_usage_are_borrowed_unchanged() {
        let mut s = UsageChunkStripper::new(4096);
        for event in [ROLE, CONTENT, AZURE_FILTER, COMMENT, FINISH] {
            let input = format!("{event}{event}");
            let got = s.push(input.as_bytes());
            assert!(matches!(got, Cow::Borrowed(b) if b.len() == input.len()));
        }
        // Incomplete tail: the borrowed prefix is forwarded, the rest held.
        let input = format!("{CONTENT}data: {{\"choi");
        let got = s.push(input.as_bytes());
        assert_eq!(&*got, CONTENT.as_bytes());
        assert!(matches!(got, Cow::Borrowed(_)));
        assert_eq!(s.held_bytes(), 12);
        // Usage chunk followed by [DONE] in one chunk: owned, usage removed.
        let mut s = UsageChunkStripper::new(4096);
        let input = format!("{FINISH}{USAGE}{DONE}");
        assert_eq!(
            &*s.push(input.as_bytes()),
            format!("{FINISH}{DONE}").as_bytes()
        );
        assert!(s.stripped());
        assert!(s.finish().is_empty());
        // Usage chunk first in the chunk: the rest stays borrowed.
        let mut s = UsageChunkStripper::new(4096);
        let input = format!("{USAGE}{DONE}");
        let got = s.push(input.as_bytes());
        assert!(matches!(got, Cow::Borrowed(b) if b == DONE.as_bytes()));
    }

    #[test]
    fn what_is_and_is_not_the_usage_chunk() {
        for (event, want) in [
            (USAGE, true),
            (USAGE_SPACED_MULTILINE, true),
            (
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n",
                true,
            ),
            (
                "event: message\r\ndata:{\"choices\":[],\"usage\":{}}\r\n\r\n",
                true,
            ),
            (
                ": c\nid: 1\ndata: {\"choices\":[],\"usage\":{\"a\":1}}\n\n",
                true,
            ),
            (AZURE_FILTER, false),
            (CONTENT_ESCAPED_USAGE, false),
            (ROLE, false),
            (DONE, false),
            (COMMENT, false),
            ("data: {\"choices\":[],\"usage\":null}\n\n", false),
            ("data: {\"choices\":[],\"usage\" : null}\n\n", false),
            ("data: {\"choices\":[],\"usage\":5}\n\n", false),
            ("data: {\"choices\":[],\"usage\":[]}\n\n", false),
            ("data: {\"usage\":{\"prompt_tokens\":1}}\n\n", false),
            (
                "data: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\n\n",
                false,
            ),
            (
                "data: {\"choices\":[{\"index\":0}],\"usage\":{\"prompt_tokens\":1}}\n\n",
                false,
            ),
            (
                "data: {\"object\":\"response\",\"choices\":[],\"usage\":{}}\n\n",
                false,
            ),
            (
                "event: usage\ndata: {\"choices\":[],\"usage\":{}}\n\n",
                false,
            ),
            ("data: [\"chat.completion.chunk\",[],{}]\n\n", false),
            ("data: {\"choices\":[],\"usage\":{}\n\n", false),
            ("data: {\"choices\":[],\"usage\":{}} x\n\n", false),
            (": {\"choices\":[],\"usage\":{}}\n\n", false),
            ("\n", false),
        ] {
            assert_eq!(is_usage_event(event.as_bytes()), want, "{event:?}");
        }
    }

    #[test]
    fn cr_at_chunk_end() {
        // A "\r" ending a line inside the held event, "\n" in the next chunk: one line break.
        let usage = "data: {\"choices\":[],\r\ndata: \"usage\":{\"prompt_tokens\":3}}\r\n\r\n";
        let input = format!("{usage}{DONE}");
        for cut in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(cut);
            assert_eq!(
                run(4096, &[a, b]),
                (DONE.as_bytes().to_vec(), true),
                "{cut}"
            );
        }
        // The "\n" after the "\r" ending a removed event is removed with it.
        let mut s = UsageChunkStripper::new(4096);
        let cut = usage.len() - 1;
        assert!(s.push(&usage.as_bytes()[..cut]).is_empty());
        assert!(s.stripped());
        assert_eq!(&*s.push(format!("\n{DONE}").as_bytes()), DONE.as_bytes());
        // …and forwarded after a kept event.
        let kept = FINISH.replace('\n', "\r\n");
        let mut s = UsageChunkStripper::new(4096);
        let got = s.push(&kept.as_bytes()[..kept.len() - 1]);
        assert_eq!(&*got, &kept.as_bytes()[..kept.len() - 1]);
        let got = s.push(b"\n");
        assert!(matches!(got, Cow::Borrowed(b"\n")));
        assert_eq!(s.held_bytes(), 0);
        // "\r\r" is an empty line; a "\r" then a non-"\n" chunk start is no pending break.
        let mut s = UsageChunkStripper::new(4096);
        assert!(s.push(b"data: {\"choices\":[],\"usage\":{}}\r").is_empty());
        assert!(s.push(b"\r").is_empty());
        assert!(s.stripped());
        assert_eq!(&*s.push(b"data: x\r"), b"");
        assert_eq!(&*s.push(b"\r"), b"data: x\r\r");
        assert_eq!(&*s.push(b"\r\n"), b"\r\n");
    }

    #[test]
    fn finish_forwards_an_incomplete_event_as_is() {
        let usage_unterminated = USAGE.trim_end();
        let input = format!("{FINISH}{usage_unterminated}\n");
        assert_eq!(
            run(4096, &[input.as_bytes()]),
            (input.as_bytes().to_vec(), false)
        );
        let mut s = UsageChunkStripper::new(4096);
        assert_eq!(&*s.push(b"data: [DO"), b"");
        assert_eq!(s.finish(), b"data: [DO");
        assert!(s.finish().is_empty());
    }

    #[test]
    fn oversized_event_switches_to_pass_through() {
        let input = format!("{ROLE}{USAGE}{DONE}");
        // Cap below the usage chunk: nothing removed, whatever the split.
        let max = USAGE.len() - 1;
        for cut in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(cut);
            assert_eq!(
                run(max, &[a, b]),
                (input.as_bytes().to_vec(), false),
                "{cut}"
            );
        }
        // Exactly the usage chunk's size (up to the first byte of its empty line's terminator, so
        // "\r\n\r\n" counts one byte less than "\n\n") fits.
        for ending in ["\n", "\r\n"] {
            let usage = USAGE.replace('\n', ending);
            let input = format!("{ROLE}{USAGE}{DONE}").replace('\n', ending);
            let expected = format!("{ROLE}{DONE}").replace('\n', ending).into_bytes();
            let max = usage.len() + 1 - ending.len();
            for cut in 0..=input.len() {
                let (a, b) = input.as_bytes().split_at(cut);
                assert_eq!(run(max, &[a, b]), (expected.clone(), true), "{cut}");
                assert_eq!(run(max - 1, &[a, b]), (input.clone().into_bytes(), false));
            }
        }
        // Pass-through returns later chunks as they are.
        let mut s = UsageChunkStripper::new(8);
        assert_eq!(&*s.push(b"data: 123456789"), b"data: 123456789");
        assert!(s.pass_through());
        let got = s.push(USAGE.as_bytes());
        assert!(matches!(got, Cow::Borrowed(b) if b == USAGE.as_bytes()));
        assert!(!s.stripped());
        // Cap 0: everything passes.
        assert_eq!(
            run(0, &[input.as_bytes()]),
            (input.as_bytes().to_vec(), false)
        );
    }

    #[test]
    fn one_byte_chunks() {
        for (input, expected, has_usage) in cases() {
            let chunks: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(run(4096, &chunks), (expected, has_usage));
            assert_eq!(run(16, &chunks), (input.clone(), false));
        }
    }

    #[test]
    fn every_two_chunk_split() {
        for (input, expected, has_usage) in cases() {
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(run(4096, &[a, b]), (expected.clone(), has_usage), "{cut}");
            }
        }
    }

    /// Named so that `cargo test --lib proptest` selects them.
    mod proptests {
        use super::*;

        proptest! {
            #[test]
            fn any_split_of_realistic_streams(
                which in 0usize..9,
                cuts in prop::collection::vec(any::<usize>(), 0..64),
            ) {
                let (input, expected, has_usage) = cases().swap_remove(which);
                let chunks = split_at_cuts(&input, &cuts);
                prop_assert_eq!(run(4096, &chunks), (expected, has_usage));
                prop_assert_eq!(run(16, &chunks), (input.clone(), false));
                let tiny: Vec<&[u8]> = chunks.iter().flat_map(|c| c.chunks(1)).collect();
                prop_assert_eq!(run(16, &tiny), (input, false));
            }

            #[test]
            fn any_split_with_any_cap_matches_the_model(
                which in 0usize..9,
                max in 0usize..700,
                cuts in prop::collection::vec(any::<usize>(), 0..32),
            ) {
                let (input, ..) = cases().swap_remove(which);
                let chunks = split_at_cuts(&input, &cuts);
                prop_assert_eq!(run(max, &chunks), reference(&input, max));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_pass_unchanged(
                max in 0usize..256,
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..64),
            ) {
                let chunks = split_at_cuts(&bytes, &cuts);
                let (out, stripped) = run(max, &chunks);
                prop_assert_eq!((out.clone(), stripped), reference(&bytes, max));
                if !stripped {
                    prop_assert_eq!(out, bytes);
                }
            }

            #[test]
            fn sse_like_streams_match_the_model(
                max in prop::sample::select(vec![0usize, 8, 40, 100, 4096]),
                pieces in prop::collection::vec(prop::sample::select(vec![
                    "data: ", "data:", "event: ", "event: message", "event: x", "\n", "\r",
                    "\r\n", ": c", "[DONE]", "{\"choices\":[],", "{\"choices\":[{}],",
                    "\"usage\":{\"prompt_tokens\":1}}", "\"usage\":null}", "\"usage\": {}}",
                    "\\\"usage\\\":{", "\"", "}", "é", "\u{FEFF}",
                ]), 0..60),
                cuts in prop::collection::vec(any::<usize>(), 0..32),
            ) {
                let text = pieces.concat();
                let bytes = text.as_bytes();
                let chunks = split_at_cuts(bytes, &cuts);
                let (out, stripped) = run(max, &chunks);
                let want = reference(bytes, max);
                prop_assert_eq!((&out, stripped), (&want.0, want.1));
                if !stripped {
                    prop_assert_eq!(&out[..], bytes);
                }
                // What remains is the input with whole events cut out: a subsequence.
                let mut rest = bytes.iter();
                prop_assert!(out.iter().all(|b| rest.any(|x| x == b)));
            }
        }
    }
}
