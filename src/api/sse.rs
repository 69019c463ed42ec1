//! Incremental reader of the usage reported by a streamed (`text/event-stream`) response.
//!
//! The reader sees the body chunk by chunk as it passes through the filter, split anywhere
//! (inside a line, a UTF-8 sequence or a `"\r\n"`), and keeps only the unfinished line and the
//! data of the event being assembled, both capped by `max_line_bytes`.
//!
//! # Event stream parsing (WHATWG HTML, "Server-sent events", "Interpreting an event stream")
//!
//! Lines end in `"\r\n"`, `"\n"` or `"\r"`; a `"\r"` ending one chunk followed by `"\n"` starting
//! the next is one line break. A leading UTF-8 BOM is ignored. Lines starting with `:` are
//! comments. `field:value` (one space after the colon stripped; a line without a colon is a field
//! with an empty value): `event` sets the event type, `data` appends to the data (several data
//! lines are joined with `"\n"`), other fields are ignored. A blank line dispatches the event if it
//! has data. Deviation: [`SseUsageReader::finish`] also processes an unterminated last line and
//! dispatches a pending event that lacks its blank line (the spec discards them), so a stream cut
//! right after its usage still counts.
//!
//! A line longer than `max_line_bytes` (not counting its terminator), or data lines adding up to
//! more than `max_line_bytes` (counting the joining `"\n"`s), make the reader drop the event that
//! contains them and set [`SseUsageReader::overflowed`]. Which lines and events are dropped
//! depends only on the stream, never on how it was split into chunks. Note that a Responses
//! `response.completed` event repeats the whole response (output text, echoed instructions and
//! tools) on one line, so `max_line_bytes` must exceed the largest response one wants usage for.
//!
//! The event type is the `event:` field when present, else the top-level `"type"` member of the
//! JSON data (OpenAI Responses and Anthropic send both).
//!
//! # Per API
//!
//! * Chat Completions: every data is a chunk; `[DONE]` completes the stream. A chunk whose
//!   top-level `usage` is an object sets the usage (the last one wins; `"usage":null` is ignored).
//! * Responses: `response.completed`, `response.incomplete` and `response.failed` carry
//!   `response.usage` and complete the stream.
//! * Messages: `message_start` carries `message.usage`; `message_delta` carries `usage` whose
//!   `output_tokens` is cumulative (the last value is taken, not a sum) and whose input/cache
//!   fields, when present and not `null`, replace `message_start`'s; `message_stop` completes.
//! * Embeddings never stream: the reader ignores everything and reports no usage.
//!
//! A usage object that is invalid (see `usage/`: negative, fractional, … counts) is ignored
//! and the previous one, if any, is kept; [`SseUsageReader::invalid_usage`] then says so. So is a
//! usage object with none of the API's own count fields (another vendor's shape, or `{}`);
//! [`SseUsageReader::foreign_usage`] then says so.
//!
//! # Observed output
//!
//! [`SseUsageReader::observed_output`] counts content-bearing delta *events*, a rough stand-in for
//! output tokens when usage never arrives (providers send about one token per delta):
//!
//! * Chat Completions: chunks in which a `"content"`, `"reasoning_content"`, `"reasoning"`,
//!   `"refusal"` or `"arguments"` (tool call arguments) member holds a non-empty string. This is a
//!   byte-level check over the chunk (a quoted key followed by optional whitespace, `:`, optional
//!   whitespace and a quote not immediately closed), no JSON parse. Quotes inside JSON strings are
//!   escaped, so text that merely contains those words never matches. The role-only first chunk
//!   (`"content":""`), `"content":null`, the finish chunk (`"delta":{}`) and the usage chunk do
//!   not count. A chunk counts once even if several choices carry content.
//! * Responses: events whose type starts with `response.` and ends with `.delta`
//!   (`response.output_text.delta`, `response.function_call_arguments.delta`,
//!   `response.reasoning_summary_text.delta`, `response.refusal.delta`, …).
//! * Messages: `content_block_delta` events (text, tool input JSON, thinking and signature deltas).

use core::mem;

use super::dialect::{chat_usage, responses_usage, speaks_anthropic};
use super::usage::{self, RawUsage};
use super::{ApiKind, Usage};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// What the events of a stream mean: one grammar per family of SSE streams (see "Per API" in the
/// module documentation). A dialect names its own (`Dialect::sse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseGrammar {
    /// Chat Completions chunks, `[DONE]`.
    Chat,
    /// Responses' `response.*` events.
    Responses,
    /// Anthropic Messages events.
    Messages,
    /// A stream that carries no usage Tollgate reads (embeddings, token counts): ignored.
    Silent,
}

/// Incremental usage reader for one streamed response. See the module documentation.
#[derive(Debug, Clone)]
pub struct SseUsageReader {
    /// The event stream's grammar: lines and events, with their bounds.
    events: SseEvents,
    /// What the events said.
    state: UsageState,
}

/// The usage state of one stream, updated event by event.
#[derive(Debug, Clone)]
struct UsageState {
    grammar: SseGrammar,
    /// Chat Completions and Responses: the last usage seen.
    usage: Option<Usage>,
    /// Messages: the usage fields seen so far.
    anthropic: Option<AnthropicUsage>,
    completed: bool,
    observed_output: u64,
    /// A usage object without any of the API's own fields was seen (and ignored).
    foreign: bool,
    /// An invalid usage object was seen (and ignored).
    invalid: bool,
}

/// The server-sent events grammar (see the module documentation): splits a stream fed in
/// arbitrary chunks into events (`event:` field, joined `data:` lines), keeping only the
/// unfinished line and the event being assembled, each capped by `max_line_bytes`. Shared by
/// every API whose stream is SSE; what an event means is the caller's.
#[derive(Debug, Clone)]
pub(crate) struct SseEvents {
    max_line_bytes: usize,
    /// The unfinished line (never longer than `max_line_bytes`).
    line: Vec<u8>,
    /// The unfinished line overflowed: skip bytes up to its end.
    skipping_line: bool,
    /// The last chunk ended with `"\r"`: a `"\n"` opening the next chunk belongs to it.
    pending_cr: bool,
    /// No line has ended yet (a BOM is stripped from the first one).
    at_start: bool,
    /// The `event:` field of the event being assembled.
    event_type: Vec<u8>,
    /// The `data:` lines of the event being assembled, joined with `"\n"`.
    data: Vec<u8>,
    /// The event being assembled has at least one data line.
    has_data: bool,
    /// Part of the event being assembled was dropped: do not dispatch it.
    event_broken: bool,
    overflowed: bool,
}

/// Anthropic's raw counts, merged over `message_start` and `message_delta`.
#[derive(Debug, Clone, Copy, Default)]
struct AnthropicUsage {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl AnthropicUsage {
    /// Replaces the fields present (and not `null`) in `raw`.
    fn merge(&mut self, raw: &RawUsage) {
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut self.input, raw.input_tokens);
        set(&mut self.output, raw.output_tokens);
        set(&mut self.cache_read, raw.cache_read_input_tokens);
        set(&mut self.cache_creation, raw.cache_creation_input_tokens);
    }
}

impl SseUsageReader {
    /// The reader for `kind`'s streams.
    pub fn new(kind: ApiKind, max_line_bytes: usize) -> Self {
        Self::with_grammar(kind.dialect().sse(), max_line_bytes)
    }

    pub fn with_grammar(grammar: SseGrammar, max_line_bytes: usize) -> Self {
        SseUsageReader {
            events: SseEvents::new(max_line_bytes),
            state: UsageState {
                grammar,
                usage: None,
                anthropic: None,
                completed: false,
                observed_output: 0,
                foreign: false,
                invalid: false,
            },
        }
    }

    /// Feed the next chunk of the response body as it passes (arbitrary splits, including inside a
    /// UTF-8 sequence or inside "\r\n"). Keeps only the unfinished line between calls.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.state.grammar == SseGrammar::Silent {
            return;
        }
        let state = &mut self.state;
        self.events.feed(chunk, &mut |event_type, data| {
            state.on_event(event_type, data)
        });
    }

    /// End of stream: dispatch a pending event even without its terminating blank line.
    pub fn finish(&mut self) {
        if self.state.grammar == SseGrammar::Silent {
            return;
        }
        let state = &mut self.state;
        self.events
            .finish(&mut |event_type, data| state.on_event(event_type, data));
    }

    /// The usage reported by the stream so far (None until some usage was seen).
    pub fn usage(&self) -> Option<Usage> {
        match self.state.grammar {
            SseGrammar::Chat | SseGrammar::Responses => self.state.usage,
            SseGrammar::Messages => self
                .state
                .anthropic
                .map(|a| usage::anthropic(a.input, a.output, a.cache_read, a.cache_creation)),
            SseGrammar::Silent => None,
        }
    }

    /// True once the stream's terminal event was seen (chat: `data: [DONE]`; responses:
    /// `response.completed` / `response.incomplete` / `response.failed`; messages: `message_stop`).
    pub fn completed(&self) -> bool {
        self.state.completed
    }

    /// Output tokens observed while streaming, a fallback when usage never arrives: the number of
    /// content-bearing delta events (see the module documentation for exactly what counts).
    pub fn observed_output(&self) -> u64 {
        self.state.observed_output
    }

    /// True if a usage object in another API's shape (none of this API's count fields) was seen
    /// and ignored.
    pub fn foreign_usage(&self) -> bool {
        self.state.foreign
    }

    /// Whether an invalid usage object (a count that is not a `u64`, …) was seen and ignored.
    pub fn invalid_usage(&self) -> bool {
        self.state.invalid
    }

    /// True if a line was longer than max_line_bytes and was dropped (usage may be missing).
    pub fn overflowed(&self) -> bool {
        self.events.overflowed()
    }

    /// Bytes currently buffered (unfinished line, event type and data); at most
    /// `3 * max_line_bytes`, and 0 between events once the stream's lines are complete.
    pub fn buffered_bytes(&self) -> usize {
        self.events.buffered_bytes()
    }
}

impl SseEvents {
    pub(crate) fn new(max_line_bytes: usize) -> Self {
        SseEvents {
            max_line_bytes,
            line: Vec::new(),
            skipping_line: false,
            pending_cr: false,
            at_start: true,
            event_type: Vec::new(),
            data: Vec::new(),
            has_data: false,
            event_broken: false,
            overflowed: false,
        }
    }

    /// Feeds the next chunk, calling `on_event(event_type, data)` for each event it completes.
    pub(crate) fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(&[u8], &[u8])) {
        if chunk.is_empty() {
            return;
        }
        let mut rest = chunk;
        if mem::replace(&mut self.pending_cr, false)
            && let Some(tail) = rest.strip_prefix(b"\n")
        {
            rest = tail;
        }
        while let Some(pos) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let Some((head, tail)) = rest.split_at_checked(pos) else {
                break;
            };
            let Some((&terminator, mut after)) = tail.split_first() else {
                break;
            };
            if terminator == b'\r' {
                match after {
                    [b'\n', more @ ..] => after = more,
                    [] => self.pending_cr = true,
                    _ => {}
                }
            }
            self.end_line(head, on_event);
            rest = after;
        }
        self.push_partial(rest);
    }

    /// End of stream: dispatches a pending event even without its terminating blank line.
    pub(crate) fn finish(&mut self, on_event: &mut impl FnMut(&[u8], &[u8])) {
        self.pending_cr = false;
        if self.skipping_line {
            self.skipping_line = false;
        } else if !self.line.is_empty() {
            let line = mem::take(&mut self.line);
            self.handle_line(&line, on_event);
            self.line = line;
            self.line.clear();
        }
        self.dispatch(on_event);
    }

    /// True if a line or an event's data was longer than `max_line_bytes` and was dropped.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes buffered (unfinished line, event type and data): at most `3 * max_line_bytes`.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.line
            .len()
            .saturating_add(self.event_type.len())
            .saturating_add(self.data.len())
    }

    /// A line terminator was met; `head` is the part of the line in the current chunk.
    fn end_line(&mut self, head: &[u8], on_event: &mut impl FnMut(&[u8], &[u8])) {
        if self.skipping_line {
            self.skipping_line = false;
        } else if self.line.is_empty() {
            if head.len() > self.max_line_bytes {
                self.drop_line();
            } else {
                self.handle_line(head, on_event);
            }
        } else if self.line.len().saturating_add(head.len()) > self.max_line_bytes {
            self.line.clear();
            self.drop_line();
        } else {
            self.line.extend_from_slice(head);
            let line = mem::take(&mut self.line);
            self.handle_line(&line, on_event);
            self.line = line;
            self.line.clear();
        }
        self.at_start = false;
    }

    /// Keeps the unfinished end of a chunk, or starts skipping the line if it is too long.
    fn push_partial(&mut self, part: &[u8]) {
        if part.is_empty() || self.skipping_line {
            return;
        }
        if self.line.len().saturating_add(part.len()) > self.max_line_bytes {
            self.line.clear();
            self.skipping_line = true;
            self.drop_line();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn drop_line(&mut self) {
        self.overflowed = true;
        self.event_broken = true;
    }

    fn handle_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8], &[u8])) {
        let line = if self.at_start {
            line.strip_prefix(BOM).unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => return,
            Some(colon) => {
                let field = line.get(..colon).unwrap_or_default();
                let value = line.get(colon.saturating_add(1)..).unwrap_or_default();
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => self.push_data(value),
            b"event" => {
                self.event_type.clear();
                self.event_type.extend_from_slice(value);
            }
            _ => {}
        }
    }

    fn push_data(&mut self, value: &[u8]) {
        if self.event_broken {
            return;
        }
        let separator = usize::from(self.has_data);
        if self
            .data
            .len()
            .saturating_add(separator)
            .saturating_add(value.len())
            > self.max_line_bytes
        {
            self.data.clear();
            self.overflowed = true;
            self.event_broken = true;
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(&[u8], &[u8])) {
        let broken = mem::replace(&mut self.event_broken, false);
        let has_data = mem::replace(&mut self.has_data, false);
        if has_data && !broken {
            on_event(&self.event_type, &self.data);
        }
        self.data.clear();
        self.event_type.clear();
    }
}

impl UsageState {
    // -----------------------------------------------------------------------------------------
    // Events.

    fn on_event(&mut self, event_type: &[u8], data: &[u8]) {
        match self.grammar {
            SseGrammar::Chat => self.on_chat_chunk(data),
            SseGrammar::Responses => {
                let name = event_name(event_type, data);
                match name {
                    b"response.completed" | b"response.incomplete" | b"response.failed" => {
                        let raw = usage::usage_at(data, &["response", "usage"]);
                        self.take(usage::Reading::from_raw(raw, responses_usage));
                        self.completed = true;
                    }
                    _ if name.starts_with(b"response.") && name.ends_with(b".delta") => {
                        self.count_output();
                    }
                    _ => {}
                }
            }
            SseGrammar::Messages => match event_name(event_type, data) {
                b"content_block_delta" => self.count_output(),
                b"message_start" => self.merge_anthropic(data, &["message", "usage"]),
                b"message_delta" => self.merge_anthropic(data, &["usage"]),
                b"message_stop" => self.completed = true,
                _ => {}
            },
            SseGrammar::Silent => {}
        }
    }

    fn on_chat_chunk(&mut self, data: &[u8]) {
        let data = usage::trim_ws(data);
        if data == b"[DONE]" {
            self.completed = true;
            return;
        }
        if chat_chunk_has_output(data) {
            self.count_output();
        }
        self.take(usage::read_usage_object(data, chat_usage));
    }

    /// Chat Completions and Responses: a usage object replaces the last one.
    fn take(&mut self, reading: usage::Reading) {
        match reading {
            usage::Reading::Usage(u) => self.usage = Some(u),
            usage::Reading::Foreign => self.foreign = true,
            usage::Reading::Invalid => self.invalid = true,
            usage::Reading::Absent => {}
        }
    }

    fn merge_anthropic(&mut self, data: &[u8], path: &[&str]) {
        match usage::usage_at(data, path) {
            Some(raw) if raw.invalid => self.invalid = true,
            Some(raw) if speaks_anthropic(&raw) => {
                self.anthropic.get_or_insert_default().merge(&raw);
            }
            Some(_) => self.foreign = true,
            None => {}
        }
    }

    fn count_output(&mut self) {
        self.observed_output = self.observed_output.saturating_add(1);
    }
}

/// The `event:` field if set, else the JSON data's top-level `"type"`.
fn event_name<'a>(event_type: &'a [u8], data: &'a [u8]) -> &'a [u8] {
    if event_type.is_empty() {
        usage::top_level_string(data, b"type").unwrap_or_default()
    } else {
        event_type
    }
}

/// Keys whose non-empty string value marks a chat chunk as carrying output.
const CHAT_OUTPUT_KEYS: [&[u8]; 5] = [
    b"content",
    b"reasoning_content",
    b"reasoning",
    b"refusal",
    b"arguments",
];

/// Whether a chat chunk carries output text (see the module documentation), by a byte scan.
fn chat_chunk_has_output(chunk: &[u8]) -> bool {
    let mut rest = chunk;
    while let Some(q) = rest.iter().position(|b| *b == b'"') {
        rest = rest.get(q.saturating_add(1)..).unwrap_or_default();
        let Some(first) = rest.first() else {
            return false;
        };
        if !matches!(first, b'c' | b'r' | b'a') {
            continue;
        }
        for key in CHAT_OUTPUT_KEYS {
            let Some(after_key) = rest.strip_prefix(key) else {
                continue;
            };
            let Some(after_quote) = after_key.strip_prefix(b"\"") else {
                continue;
            };
            let Some(value) = usage::trim_ws_start(after_quote).strip_prefix(b":") else {
                continue;
            };
            if let [b'"', c, ..] = usage::trim_ws_start(value)
                && *c != b'"'
            {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testing::split_at_cuts;
    use proptest::prelude::*;

    /// OpenAI chat stream with `stream_options.include_usage`, as sent (compact JSON, `"\n\n"`).
    /// The usage chunk is split over two `data:` lines (legal SSE and JSON) so that line-break
    /// handling across chunks is exercised: dispatching twice would cut the JSON in two.
    const CHAT: &str = concat!(
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Qz"}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x1"}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{"content":"! \"usage\": {\"prompt_tokens\": 99} \u00e9"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        ": keep-alive comment\n\n",
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-BnQ2","object":"chat.completion.chunk","created":1751000000,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":[],"#,
        "\n",
        r#"data: "usage":{"prompt_tokens":1234,"completion_tokens":37,"total_tokens":1271,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"obfuscation":"dGk"}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    /// Chat stream with tool calls, spaces after colons (Python-style servers), no usage.
    const CHAT_TOOLS: &str = concat!(
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": null}]}"#,
        "\n\n",
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"loc"}}]}, "finish_reason": null}]}"#,
        "\n\n",
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ation\": \"Paris\"}"}}]}, "finish_reason": null}]}"#,
        "\n\n",
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"reasoning_content": "hm"}, "finish_reason": null}]}"#,
        "\n\n",
        r#"data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const RESPONSES: &str = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_68","object":"response","created_at":1751000000,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null,"metadata":{}}}"#,
        "\n\n",
        "event: response.in_progress\n",
        r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_68","object":"response","status":"in_progress","output":[],"usage":null}}"#,
        "\n\n",
        "event: response.output_item.added\n",
        r#"data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_68","type":"message","status":"in_progress","content":[],"role":"assistant"}}"#,
        "\n\n",
        "event: response.content_part.added\n",
        r#"data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_68","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"text":""}}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_68","output_index":0,"content_index":0,"delta":"Hi","logprobs":[],"obfuscation":"a"}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_68","output_index":0,"content_index":0,"delta":" there \"usage\":{}","logprobs":[]}"#,
        "\n\n",
        "event: response.output_text.done\n",
        r#"data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_68","output_index":0,"content_index":0,"text":"Hi there","logprobs":[]}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","sequence_number":7,"response":{"id":"resp_68","object":"response","created_at":1751000000,"status":"completed","error":null,"instructions":"Be \"usage\": brief","model":"gpt-4.1-2025-04-14","output":[{"id":"msg_68","type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"text":"Hi there"}],"role":"assistant"}],"tools":[{"type":"function","name":"f","parameters":{"properties":{"usage":{"type":"integer"}}}}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":5},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":48},"user":null,"metadata":{"usage":"tag"}}}"#,
        "\n\n",
    );

    /// Responses without `event:` lines (type from the JSON), incomplete.
    const RESPONSES_NO_EVENT: &str = concat!(
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"r","status":"in_progress","usage":null}}"#,
        "\n\n",
        r#"data: {"type":"response.reasoning_summary_text.delta","sequence_number":1,"delta":"think"}"#,
        "\n\n",
        r#"data: {"type":"response.function_call_arguments.delta","sequence_number":2,"delta":"{\"a\""}"#,
        "\n\n",
        r#"data: {"sequence_number":3,"type":"response.incomplete","response":{"id":"r","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":9,"output_tokens":16,"output_tokens_details":{"reasoning_tokens":null},"input_tokens_details":null}}}"#,
        "\n\n",
    );

    const MESSAGES: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-20250514","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":1200,"cache_read_input_tokens":3000,"cache_creation":{"ephemeral_5m_input_tokens":1200,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\n",
        "event: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! \"usage\":{\"output_tokens\":7}"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":10}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    /// Anthropic without `event:` lines; newer message_delta carrying input and cache fields.
    const MESSAGES_NO_EVENT: &str = concat!(
        r#"data: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        "\n\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"n","input":{}}}"#,
        "\n\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"usage\": 1}"}}"#,
        "\n\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"input_tokens":12,"cache_creation_input_tokens":null,"cache_read_input_tokens":4,"output_tokens":30,"server_tool_use":{"web_search_requests":1}}}"#,
        "\n\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    fn with_endings(s: &str, ending: &str) -> String {
        s.replace('\n', ending)
    }

    fn stream_fixtures() -> Vec<(ApiKind, String, Option<Usage>, bool, u64)> {
        let chat = Some(Usage {
            input: 1234,
            output: 37,
            cached_input: 1024,
            cache_write_input: 0,
            reasoning: 0,
        });
        let responses = Some(Usage {
            input: 37,
            output: 11,
            cached_input: 5,
            cache_write_input: 0,
            reasoning: 3,
        });
        let responses_no_event = Some(Usage {
            input: 9,
            output: 16,
            ..Usage::default()
        });
        let messages = Some(Usage {
            input: 25 + 1200 + 3000,
            output: 15,
            cached_input: 3000,
            cache_write_input: 1200,
            reasoning: 0,
        });
        let messages_no_event = Some(Usage {
            input: 12 + 4,
            output: 30,
            cached_input: 4,
            cache_write_input: 0,
            reasoning: 0,
        });
        let base: [(ApiKind, &str, Option<Usage>, bool, u64); 6] = [
            (ApiKind::ChatCompletions, CHAT, chat, true, 2),
            (ApiKind::ChatCompletions, CHAT_TOOLS, None, true, 3),
            (ApiKind::Responses, RESPONSES, responses, true, 2),
            (
                ApiKind::Responses,
                RESPONSES_NO_EVENT,
                responses_no_event,
                true,
                2,
            ),
            (ApiKind::Messages, MESSAGES, messages, true, 2),
            (
                ApiKind::Messages,
                MESSAGES_NO_EVENT,
                messages_no_event,
                true,
                1,
            ),
        ];
        let mut out = Vec::new();
        for (kind, text, usage, completed, observed) in base {
            for ending in ["\n", "\r\n", "\r"] {
                out.push((kind, with_endings(text, ending), usage, completed, observed));
            }
        }
        out
    }

    type Outcome = (Option<Usage>, bool, u64, bool);

    fn outcome(r: &SseUsageReader) -> Outcome {
        (
            r.usage(),
            r.completed(),
            r.observed_output(),
            r.overflowed(),
        )
    }

    fn run(kind: ApiKind, max: usize, chunks: &[&[u8]]) -> Outcome {
        let mut r = SseUsageReader::new(kind, max);
        for c in chunks {
            r.feed(c);
            assert!(r.events.line.len() <= max);
            assert!(r.events.data.len() <= max);
            assert!(r.events.event_type.len() <= max);
        }
        r.finish();
        assert_eq!(r.buffered_bytes(), 0);
        outcome(&r)
    }

    #[test]
    fn realistic_streams() {
        for (kind, text, usage, completed, observed) in stream_fixtures() {
            let got = run(kind, 4096, &[text.as_bytes()]);
            assert_eq!(
                got,
                (usage, completed, observed, false),
                "{kind:?} {text:?}"
            );
        }
    }

    #[test]
    fn state_before_finish() {
        // Everything is already known when the last blank line has been fed.
        for (kind, text, usage, completed, observed) in stream_fixtures() {
            let mut r = SseUsageReader::new(kind, 4096);
            r.feed(text.as_bytes());
            assert_eq!(outcome(&r), (usage, completed, observed, false), "{kind:?}");
            if !text.ends_with('\r') {
                assert_eq!(r.buffered_bytes(), 0);
            }
        }
    }

    #[test]
    fn foreign_usage_is_ignored_and_flagged() {
        let chat = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"input_tokens\":5,\"output_tokens\":9}}\n\ndata: [DONE]\n\n";
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}}\n\n";
        let messages = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"prompt_tokens\":5}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"completion_tokens\":9}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for (kind, text) in [
            (ApiKind::ChatCompletions, chat),
            (ApiKind::Responses, responses),
            (ApiKind::Messages, messages),
        ] {
            let mut r = SseUsageReader::new(kind, 4096);
            r.feed(text.as_bytes());
            r.finish();
            assert_eq!(r.usage(), None, "{kind:?}");
            assert!(r.foreign_usage() && r.completed(), "{kind:?}");
        }
        // `"usage":null` chunks are not foreign.
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 4096);
        r.feed(b"data: {\"choices\":[],\"usage\":null}\n\n");
        assert!(!r.foreign_usage());
    }

    #[test]
    fn usage_is_none_before_it_arrives() {
        let mut r = SseUsageReader::new(ApiKind::Messages, 4096);
        assert_eq!(r.usage(), None);
        let first_event_end = MESSAGES.find("\n\n").unwrap() + 2;
        r.feed(&MESSAGES.as_bytes()[..first_event_end]);
        let u = r.usage().unwrap();
        assert_eq!((u.input, u.output), (25 + 1200 + 3000, 1));
        assert!(!r.completed());

        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 4096);
        let first_event_end = CHAT.find("\n\n").unwrap() + 2;
        r.feed(&CHAT.as_bytes()[..first_event_end]);
        assert_eq!(outcome(&r), (None, false, 0, false));
    }

    #[test]
    fn every_two_chunk_split_matches_whole() {
        for (kind, text, ..) in stream_fixtures() {
            let bytes = text.as_bytes();
            let whole = run(kind, 4096, &[bytes]);
            for cut in 0..=bytes.len() {
                let (a, b) = bytes.split_at(cut);
                assert_eq!(run(kind, 4096, &[a, b]), whole, "{kind:?} cut {cut}");
            }
        }
    }

    #[test]
    fn one_byte_chunks_match_whole() {
        for (kind, text, ..) in stream_fixtures() {
            let bytes = text.as_bytes();
            let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(run(kind, 4096, &chunks), run(kind, 4096, &[bytes]));
        }
    }

    #[test]
    fn finish_dispatches_unterminated_event() {
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n");
        assert_eq!(r.usage(), None);
        r.feed(b"data: [DO");
        r.finish();
        // The two data lines form one event, which is not valid JSON: nothing counts.
        assert_eq!(outcome(&r), (None, false, 0, false));

        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]");
        assert!(!r.completed());
        r.finish();
        assert!(r.completed());
        assert_eq!(r.usage().map(|u| (u.input, u.output)), Some((3, 4)));
        r.finish();
        assert!(r.completed());

        let mut r = SseUsageReader::new(ApiKind::Messages, 1024);
        r.feed(b"event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r");
        assert!(!r.completed());
        r.finish();
        assert!(r.completed());
    }

    #[test]
    fn cr_then_lf_in_next_chunk_is_one_break() {
        // Split multi-line data: a doubled break would dispatch two halves of the JSON.
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(b"data: {\"choices\":[],\r");
        r.feed(b"\ndata: \"usage\":{\"prompt_tokens\":3}}\r");
        r.feed(b"\n\r");
        r.feed(b"\n");
        assert_eq!(r.usage().map(|u| u.input), Some(3));
        // "\r\r" is two breaks: a blank line.
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(b"data: {\"usage\":{\"prompt_tokens\":3}}\r");
        r.feed(b"");
        r.feed(b"\r");
        assert_eq!(r.usage().map(|u| u.input), Some(3));
    }

    #[test]
    fn sse_field_parsing_details() {
        let mut r = SseUsageReader::new(ApiKind::Messages, 1024);
        // BOM, no space after colon, id/retry ignored, unknown field, comment, field without colon.
        r.feed(b"\xEF\xBB\xBFevent:message_stop\nid: 7\nretry: 10\nfoo: bar\n: hi\ndata\n\n");
        // `data` without colon is an empty data line: the event dispatches with data "".
        assert!(r.completed());

        // An event type set by a previous event does not leak into the next.
        let mut r = SseUsageReader::new(ApiKind::Messages, 1024);
        r.feed(b"event: message_stop\n\ndata: {\"type\":\"ping\"}\n\n");
        assert!(!r.completed());

        // `event:` overrides the JSON type; two spaces keep one.
        let mut r = SseUsageReader::new(ApiKind::Messages, 1024);
        r.feed(b"event:  message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(!r.completed());

        // A blank line without data dispatches nothing; a BOM later in the stream is not special.
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(b"\n\n\n\xEF\xBB\xBFdata: [DONE]\n\n");
        assert!(!r.completed());
        r.feed(b"data:[DONE]\n\n");
        assert!(r.completed());
    }

    #[test]
    fn overlong_lines_are_dropped_and_flagged() {
        let usage_line = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}";
        let max = usage_line.len();
        // Exactly max fits.
        let mut s = usage_line.to_vec();
        s.extend_from_slice(b"\n\n");
        assert_eq!(
            run(ApiKind::ChatCompletions, max, &[&s]).0.map(|u| u.input),
            Some(3)
        );
        // One byte more is dropped, whatever the split; later events still work.
        let mut s = b"data: {\"choices\":[], \"usage\":{\"prompt_tokens\":3}}\n\n".to_vec();
        s.extend_from_slice(b"data: [DONE]\n\n");
        for cut in 0..=s.len() {
            let (a, b) = s.split_at(cut);
            assert_eq!(
                run(ApiKind::ChatCompletions, max, &[a, b]),
                (None, true, 0, true),
                "cut {cut}"
            );
        }
        // Data lines adding up to more than max break the event.
        let s =
            b"data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            run(ApiKind::ChatCompletions, 30, &[s]),
            (None, true, 0, true)
        );
        // A dropped line (even a comment) drops its event only.
        let s = b": a very long comment line indeed\ndata: [DONE]\n\ndata: [DONE]\n\n";
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 20);
        r.feed(&s[..40]);
        assert!(!r.completed());
        r.feed(&s[40..]);
        assert!(r.completed() && r.overflowed());
        // max 0: only blank lines survive.
        assert_eq!(
            run(ApiKind::Messages, 0, &[MESSAGES.as_bytes()]),
            (None, false, 0, true)
        );
    }

    #[test]
    fn embeddings_never_report() {
        let mut r = SseUsageReader::new(ApiKind::Embeddings, 1024);
        r.feed(b"data: {\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n");
        r.finish();
        assert_eq!(outcome(&r), (None, false, 0, false));
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn chat_usage_last_wins_and_bad_usage_is_ignored() {
        let mut r = SseUsageReader::new(ApiKind::ChatCompletions, 1024);
        r.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
        );
        r.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9}}\n\n",
        );
        r.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-3}}\n\n");
        r.feed(b"data: {\"choices\":[],\"usage\":null}\n\n");
        r.feed(b"data: not json \"usage\": {}\n\n");
        assert_eq!(r.usage().map(|u| (u.input, u.output)), Some((3, 9)));
    }

    #[test]
    fn chat_output_detection() {
        for (chunk, want) in [
            (r#"{"choices":[{"delta":{"content":"x"}}]}"#, true),
            (r#"{"choices":[{"delta":{"content" : "x"}}]}"#, true),
            (r#"{"choices":[{"delta":{"content":"\n"}}]}"#, true),
            (r#"{"choices":[{"delta":{"content":""}}]}"#, false),
            (r#"{"choices":[{"delta":{"content":null}}]}"#, false),
            (
                r#"{"choices":[{"delta":{}}],"x":"\"content\":\"y\""}"#,
                false,
            ),
            (r#"{"choices":[{"delta":{"refusal":"no"}}]}"#, true),
            (r#"{"choices":[{"delta":{"reasoning":"r"}}]}"#, true),
            (
                r#"{"choices":[{"delta":{"content_filter_results":"r"}}]}"#,
                false,
            ),
            (
                r#"{"choices":[{"logprobs":{"content":[{"token":"a"}]}}]}"#,
                false,
            ),
            (r#"{"choices":[{"delta":{"content":"#, false),
            (r#"{"choices":[{"delta":{"content":""#, false),
            ("", false),
        ] {
            assert_eq!(chat_chunk_has_output(chunk.as_bytes()), want, "{chunk}");
        }
    }

    #[test]
    fn responses_failed_without_usage_completes() {
        let mut r = SseUsageReader::new(ApiKind::Responses, 1024);
        r.feed(b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\"},\"usage\":null}}\n\n");
        assert_eq!(outcome(&r), (None, true, 0, false));
    }

    /// Named so that `cargo test --lib proptest` (the Makefile's fallback fuzzing) selects them.
    mod proptests {
        use super::*;

        proptest! {
            #[test]
            fn any_split_matches_whole(
                which in 0usize..18,
                cuts in prop::collection::vec(any::<usize>(), 0..40),
            ) {
                let fixtures = stream_fixtures();
                let (kind, text, ..) = &fixtures[which];
                let bytes = text.as_bytes();
                let chunks = split_at_cuts(bytes, &cuts);
                prop_assert_eq!(run(*kind, 4096, &chunks), run(*kind, 4096, &[bytes]));
            }

            #[test]
            fn any_split_matches_whole_with_small_max(
                which in 0usize..18,
                max in 0usize..400,
                cuts in prop::collection::vec(any::<usize>(), 0..40),
            ) {
                let fixtures = stream_fixtures();
                let (kind, text, ..) = &fixtures[which];
                let bytes = text.as_bytes();
                let chunks = split_at_cuts(bytes, &cuts);
                prop_assert_eq!(run(*kind, max, &chunks), run(*kind, max, &[bytes]));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_stay_bounded(
                kind in prop::sample::select(vec![
                    ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Embeddings, ApiKind::Messages,
                ]),
                max in 0usize..256,
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..64),
            ) {
                let chunks = split_at_cuts(&bytes, &cuts);
                let split = run(kind, max, &chunks);
                prop_assert_eq!(split, run(kind, max, &[&bytes]));
            }

            #[test]
            fn sse_like_streams_split_invariant(
                kind in prop::sample::select(vec![
                    ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Messages,
                ]),
                max in prop::sample::select(vec![0usize, 8, 40, 4096]),
                pieces in prop::collection::vec(prop::sample::select(vec![
                    "data: ", "data:", "event: ", "event: message_stop", "event: response.completed",
                    "\n", "\r", "\r\n", ": c", "[DONE]", "\u{FEFF}", "{\"type\":\"message_delta\",",
                    "\"usage\":{\"output_tokens\":5}}", "{\"choices\":[{\"delta\":{\"content\":\"x\"}}],",
                    "\"response\":{\"usage\":{\"input_tokens\":2}}}", "{\"type\":\"content_block_delta\"}",
                    "{\"type\":\"response.output_text.delta\"}", "\"", "\\", "}", "é",
                ]), 0..60),
                cuts in prop::collection::vec(any::<usize>(), 0..32),
            ) {
                let text = pieces.concat();
                let bytes = text.as_bytes();
                let chunks = split_at_cuts(bytes, &cuts);
                prop_assert_eq!(run(kind, max, &chunks), run(kind, max, &[bytes]));
            }
        }
    }
}
