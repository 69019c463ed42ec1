//! Gemini's streamed usage, read incrementally from `:streamGenerateContent` responses.
//!
//! Two wire formats carry the same `GenerateContentResponse` chunks:
//!
//! * `?alt=sse`: server-sent events, one chunk per `data:` (events separated by LF, CRLF or CR
//!   pairs), read by the shared SSE grammar (`sse.rs`'s `SseEvents`); an event's data over
//!   `max_bytes` is dropped and flagged.
//! * without it: ONE JSON array streamed in pieces (`[{…}\r\n,{…}\r\n]`), split into its top-level
//!   elements by [`JsonArrayElements`], which keeps only the element being read, at most
//!   `max_bytes`; a longer element is skipped (its structure still followed, so the next one is
//!   found) and flagged.
//!
//! `usageMetadata` is a running total that may be on every chunk, only the last, or a separate
//! usage-only chunk: each field keeps its **last** value ([`UsageMetadata::merge`]), chunks are
//! never added. A chunk whose usage is invalid is ignored (the earlier fields stay) and flagged,
//! as are usage objects with none of Gemini's fields.

use crate::api::Usage;
use crate::api::sse::SseEvents;

use super::usage::{ResponseFacts, UsageMetadata, read_response};

/// Which wire format a stream uses (`?alt=sse` in the request path, or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    Sse,
    JsonArray,
}

/// Incremental usage reader for one Gemini stream. See the module documentation.
#[derive(Debug, Clone)]
pub struct GeminiStreamReader {
    splitter: Splitter,
    state: StreamState,
}

#[derive(Debug, Clone)]
enum Splitter {
    Sse(SseEvents),
    Array(JsonArrayElements),
}

#[derive(Debug, Clone, Default)]
struct StreamState {
    usage: Option<UsageMetadata>,
    blocked: bool,
    finished: bool,
    observed_output: u64,
    foreign: bool,
    invalid: bool,
    /// An element or event that is not a JSON object (garbage, or cut by the bound's skip).
    malformed: bool,
}

impl StreamState {
    fn on_chunk(&mut self, json: &[u8]) {
        let Some(facts) = read_response(json) else {
            self.malformed = true;
            return;
        };
        self.take(&facts);
    }

    fn take(&mut self, facts: &ResponseFacts) {
        self.blocked |= facts.blocked;
        self.finished |= facts.finished;
        if facts.has_candidates {
            self.observed_output = self.observed_output.saturating_add(1);
        }
        match facts.usage {
            Some(meta) if meta.invalid => self.invalid = true,
            Some(meta) if meta.speaks() => self.usage.get_or_insert_default().merge(&meta),
            Some(_) => self.foreign = true,
            None => {}
        }
    }
}

impl GeminiStreamReader {
    /// `max_bytes` bounds one chunk (an SSE line or event's data, or an array element).
    pub fn new(format: StreamFormat, max_bytes: usize) -> Self {
        GeminiStreamReader {
            splitter: match format {
                StreamFormat::Sse => Splitter::Sse(SseEvents::new(max_bytes)),
                StreamFormat::JsonArray => Splitter::Array(JsonArrayElements::new(max_bytes)),
            },
            state: StreamState::default(),
        }
    }

    /// Feeds the next piece of the response body, split anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let state = &mut self.state;
        match &mut self.splitter {
            Splitter::Sse(events) => events.feed(chunk, &mut |_, data| state.on_chunk(data)),
            Splitter::Array(elements) => elements.feed(chunk, &mut |json| state.on_chunk(json)),
        }
    }

    /// End of stream: an SSE event that lacks its blank line still counts (as in `sse.rs`); an
    /// array element cut short does not (it is not JSON).
    pub fn finish(&mut self) {
        let state = &mut self.state;
        match &mut self.splitter {
            Splitter::Sse(events) => events.finish(&mut |_, data| state.on_chunk(data)),
            Splitter::Array(elements) => elements.finish(),
        }
    }

    /// The usage Google bills for what the stream reported so far.
    pub fn usage(&self) -> Option<Usage> {
        self.state.usage.map(|meta| meta.normalise())
    }

    /// The raw running totals, last value per field.
    pub fn usage_metadata(&self) -> Option<UsageMetadata> {
        self.state.usage
    }

    /// A chunk said the prompt was blocked (`promptFeedback.blockReason`).
    pub fn blocked(&self) -> bool {
        self.state.blocked
    }

    /// The answer ended: a candidate carried a `finishReason`, or (JSON array) the array closed.
    pub fn completed(&self) -> bool {
        self.state.finished
            || matches!(&self.splitter, Splitter::Array(elements) if elements.closed())
    }

    /// Chunks that carried candidates: a stand-in for output tokens when usage never arrives.
    pub fn observed_output(&self) -> u64 {
        self.state.observed_output
    }

    /// A usage object with none of Gemini's count fields was seen and ignored.
    pub fn foreign_usage(&self) -> bool {
        self.state.foreign
    }

    /// A usage object with a count that is not a `u64` was seen and ignored.
    pub fn invalid_usage(&self) -> bool {
        self.state.invalid
    }

    /// A chunk was over `max_bytes` and skipped (usage may be missing).
    pub fn overflowed(&self) -> bool {
        match &self.splitter {
            Splitter::Sse(events) => events.overflowed(),
            Splitter::Array(elements) => elements.overflowed(),
        }
    }

    /// A chunk (or bytes between elements) was not a JSON object.
    pub fn malformed(&self) -> bool {
        self.state.malformed
            || matches!(&self.splitter, Splitter::Array(elements) if elements.stray())
    }

    /// Bytes buffered: at most `3 * max_bytes` (SSE) or `max_bytes` (JSON array).
    pub fn buffered_bytes(&self) -> usize {
        match &self.splitter {
            Splitter::Sse(events) => events.buffered_bytes(),
            Splitter::Array(elements) => elements.buffered_bytes(),
        }
    }
}

/// Splits a streamed JSON array into its top-level elements, fed in arbitrary pieces.
///
/// Only structure is followed (strings with their escapes, nesting of `{}` and `[]`), not
/// grammar: each element is handed over whole, for a real parse. The element being read is the
/// only thing kept, at most `max_bytes`; an element over it is dropped and followed to its end
/// without being kept ([`overflowed`](Self::overflowed)). Bytes between elements other than
/// whitespace, `,` and the array's brackets (scalars, garbage) are skipped and flagged
/// ([`stray`](Self::stray)). Several arrays one after another are read as one.
#[derive(Debug, Clone)]
pub struct JsonArrayElements {
    max_bytes: usize,
    /// The element being read (empty between elements, and while skipping one).
    element: Vec<u8>,
    /// Nesting depth: 0 outside the array, 1 between elements, 2 or more inside one.
    depth: u64,
    in_string: bool,
    /// The last byte was a backslash inside a string.
    escaped: bool,
    /// The element being read is over the bound: follow it without keeping it.
    skipping: bool,
    overflowed: bool,
    stray: bool,
    closed: bool,
}

impl JsonArrayElements {
    pub fn new(max_bytes: usize) -> Self {
        JsonArrayElements {
            max_bytes,
            element: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            skipping: false,
            overflowed: false,
            stray: false,
            closed: false,
        }
    }

    /// Feeds the next piece, calling `on_element` with each element it completes.
    pub fn feed(&mut self, chunk: &[u8], on_element: &mut impl FnMut(&[u8])) {
        let mut i = 0usize;
        // Where the current element's bytes start in this chunk (when inside one).
        let mut from = 0usize;
        while let Some(&b) = chunk.get(i) {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else {
                    // Jump to the next quote or backslash.
                    let rest = chunk.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(at) => {
                            i = i.saturating_add(at);
                            if chunk.get(i) == Some(&b'\\') {
                                self.escaped = true;
                            } else {
                                self.in_string = false;
                            }
                        }
                        None => i = chunk.len(),
                    }
                }
            } else if self.depth >= 2 {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                    b'}' | b']' => {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth == 1 {
                            let end = i.saturating_add(1);
                            self.keep(chunk.get(from..end).unwrap_or_default());
                            if !std::mem::replace(&mut self.skipping, false) {
                                on_element(&self.element);
                            }
                            self.element.clear();
                        }
                    }
                    _ => {}
                }
            } else {
                match b {
                    b'[' if self.depth == 0 => self.depth = 1,
                    b'{' | b'[' if self.depth == 1 => {
                        self.depth = 2;
                        from = i;
                    }
                    b']' if self.depth == 1 => {
                        self.depth = 0;
                        self.closed = true;
                    }
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b',' if self.depth == 1 => {}
                    // A string outside an element (a scalar, or garbage): skipped whole, so
                    // brackets inside it are not taken for structure.
                    b'"' => {
                        self.stray = true;
                        self.in_string = true;
                    }
                    _ => self.stray = true,
                }
            }
            i = i.saturating_add(1);
        }
        if self.depth >= 2 {
            self.keep(chunk.get(from..).unwrap_or_default());
        }
    }

    /// End of stream: an element cut short is dropped (it is not JSON).
    pub fn finish(&mut self) {
        self.element.clear();
        self.skipping = false;
        self.in_string = false;
        self.escaped = false;
        self.depth = 0;
    }

    /// Keeps `part` of the element being read, or starts skipping it if it goes over the bound.
    fn keep(&mut self, part: &[u8]) {
        if self.skipping {
            return;
        }
        if self.element.len().saturating_add(part.len()) > self.max_bytes {
            self.element.clear();
            self.skipping = true;
            self.overflowed = true;
        } else {
            self.element.extend_from_slice(part);
        }
    }

    /// An element was over `max_bytes` and skipped.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes between elements were neither whitespace, `,` nor the array's brackets.
    pub fn stray(&self) -> bool {
        self.stray
    }

    /// The array's closing `]` was seen.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Bytes kept: at most `max_bytes`, 0 between elements.
    pub fn buffered_bytes(&self) -> usize {
        self.element.len()
    }
}
