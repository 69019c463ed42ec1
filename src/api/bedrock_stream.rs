//! Usage and outcome of a Bedrock streamed answer (`converse-stream`,
//! `invoke-with-response-stream`), read from its AWS event stream as it passes.
//!
//! ```text
//! body chunks ─▶ eventstream::Decoder ─▶ message ─┬─ exception / error ─▶ failure()
//!                                                 ├─ Converse `metadata` ─▶ usage()
//!                                                 ├─ Converse `contentBlockDelta` ─▶ observed_output()
//!                                                 └─ Invoke `chunk` {"bytes": base64}
//!                                                      └─ decoded Anthropic event ─▶ SseUsageReader
//! ```
//!
//! * **ConverseStream**: the `metadata` event's `usage` (`inputTokens`, `outputTokens`,
//!   `cacheReadInputTokens`, `cacheWriteInputTokens`): `input = inputTokens + cacheRead +
//!   cacheWrite` (Bedrock's `inputTokens` leaves cache tokens out), `cached_input = cacheRead`,
//!   `cache_write_input = cacheWrite`. A later `metadata` replaces an earlier one. The answer is
//!   complete once `messageStop` passed (`metadata` follows it).
//! * **InvokeModelWithResponseStream**: each `chunk` event's payload is `{"bytes": "<base64>"}`
//!   whose decoded bytes are one Anthropic Messages stream event; they go to the crate's own
//!   Anthropic reader ([`feed_anthropic_event`]), so usage is Anthropic's (`message_start` plus the
//!   last `message_delta`, cache tokens included). Only when it reported none, the
//!   `amazon-bedrock-invocationMetrics` of `message_stop` (`inputTokenCount`,
//!   `outputTokenCount`) are used: its input leaves cache tokens out.
//! * A message of type `exception` (`throttlingException`, `modelStreamErrorException`, …) or
//!   `error` makes the answer a **failed** one ([`BedrockStreamReader::failure`]), whatever the
//!   HTTP status was; the first one is kept.
//!
//! A decode error (bad CRC, absurd length, malformed header: [`DecodeError`]) stops reading for
//! good: what was read before it stands, [`BedrockStreamReader::decode_error`] says why. A
//! `chunk` whose payload is not `{"bytes": base64}`, or a `metadata` whose usage is garbage, is
//! skipped and flagged ([`BedrockStreamReader::bad_chunk`], [`BedrockStreamReader::invalid_usage`]).
//!
//! Memory: the decoder's one message (≤ `max_message_bytes`), the decoded chunk (≤ ¾ of it), the
//! Anthropic reader's line and event (≤ 3 × `max_line_bytes`), and a failure name of at most
//! [`MAX_FAILURE_NAME_BYTES`].

use std::borrow::Cow;

use serde::Deserialize;

use super::Usage;
use super::eventstream::{DecodeError, Decoder, Limits, Message, MessageType};
use super::sse::{SseGrammar, SseUsageReader};
use super::usage::{self, anthropic};

/// The streaming operation the response answers (from the request path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOperation {
    /// `/model/{id}/converse-stream`.
    ConverseStream,
    /// `/model/{id}/invoke-with-response-stream` with an Anthropic body.
    InvokeWithResponseStream,
}

/// The longest exception or error name kept (longer ones are cut at a character boundary).
pub const MAX_FAILURE_NAME_BYTES: usize = 64;

/// Why a stream is a failed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFailure {
    /// An `exception` message; its `:exception-type` (empty when missing).
    Exception(String),
    /// An `error` message; its `:error-code` (empty when missing).
    Error(String),
}

/// Incremental reader of one Bedrock streamed answer. See the module documentation.
#[derive(Debug, Clone)]
pub struct BedrockStreamReader {
    operation: StreamOperation,
    decoder: Decoder,
    /// Invoke: the Anthropic events decoded from the `chunk`s.
    anthropic: SseUsageReader,
    /// Invoke: the decoded bytes of the current `chunk` (cleared after each).
    scratch: Vec<u8>,
    /// Converse: the last `metadata` usage.
    converse: Option<Usage>,
    /// Invoke: `amazon-bedrock-invocationMetrics`, the fallback.
    metrics: Option<Usage>,
    message_stop: bool,
    observed_output: u64,
    failure: Option<StreamFailure>,
    invalid: bool,
    foreign: bool,
    bad_chunk: bool,
}

impl BedrockStreamReader {
    /// `max_line_bytes` bounds the Anthropic reader's event (as `limits.max_sse_line_bytes`).
    pub fn new(operation: StreamOperation, limits: Limits, max_line_bytes: usize) -> Self {
        BedrockStreamReader {
            operation,
            decoder: Decoder::new(limits),
            anthropic: SseUsageReader::with_grammar(SseGrammar::Messages, max_line_bytes),
            scratch: Vec::new(),
            converse: None,
            metrics: None,
            message_stop: false,
            observed_output: 0,
            failure: None,
            invalid: false,
            foreign: false,
            bad_chunk: false,
        }
    }

    /// Feed the next chunk of the response body (split anywhere).
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut input = chunk;
        // The decoder's message borrows it; the fields it updates are the others.
        let mut decoder = core::mem::replace(&mut self.decoder, Decoder::new(Limits::default()));
        while let Ok(Some(message)) = decoder.decode(&mut input) {
            self.on_message(&message);
        }
        self.decoder = decoder;
    }

    /// End of the response: a stream cut inside a message is a decode error (`Truncated`).
    pub fn finish(&mut self) {
        let _ = self.decoder.finish();
        self.anthropic.finish();
    }

    /// The usage the stream reported (`None` until some arrived).
    pub fn usage(&self) -> Option<Usage> {
        match self.operation {
            StreamOperation::ConverseStream => self.converse,
            StreamOperation::InvokeWithResponseStream => self.anthropic.usage().or(self.metrics),
        }
    }

    /// The answer's last event passed (`messageStop`; Invoke: Anthropic's `message_stop`) and no
    /// exception or error message came.
    pub fn completed(&self) -> bool {
        let ended = match self.operation {
            StreamOperation::ConverseStream => self.message_stop,
            StreamOperation::InvokeWithResponseStream => self.anthropic.completed(),
        };
        ended && self.failure.is_none()
    }

    /// Content-bearing deltas seen (Converse `contentBlockDelta`s; Invoke: Anthropic's
    /// `content_block_delta`s), the fallback when usage never arrives.
    pub fn observed_output(&self) -> u64 {
        match self.operation {
            StreamOperation::ConverseStream => self.observed_output,
            StreamOperation::InvokeWithResponseStream => self.anthropic.observed_output(),
        }
    }

    /// The first exception or error message: the answer failed.
    pub fn failure(&self) -> Option<&StreamFailure> {
        self.failure.as_ref()
    }

    /// Why reading stopped before the stream's end, if it did.
    pub fn decode_error(&self) -> Option<DecodeError> {
        self.decoder.error()
    }

    /// A usage with a count that is not a `u64` was seen and ignored.
    pub fn invalid_usage(&self) -> bool {
        self.invalid || self.anthropic.invalid_usage()
    }

    /// A usage object without any of the API's own fields was seen and ignored.
    pub fn foreign_usage(&self) -> bool {
        self.foreign || self.anthropic.foreign_usage()
    }

    /// An Invoke `chunk` was not `{"bytes": base64}` (skipped), or its event overflowed the
    /// Anthropic reader's bound.
    pub fn bad_chunk(&self) -> bool {
        self.bad_chunk || self.anthropic.overflowed()
    }

    /// Heap held for the stream: the decoder's buffer, the chunk scratch and the Anthropic
    /// reader's buffers.
    pub fn held_bytes(&self) -> usize {
        self.decoder
            .held_bytes()
            .saturating_add(self.scratch.capacity())
            .saturating_add(self.anthropic.buffered_bytes())
    }

    fn on_message(&mut self, message: &Message<'_>) {
        let name = |value: Option<&[u8]>| bounded_name(value.unwrap_or_default());
        match message.message_type() {
            MessageType::Event => {}
            MessageType::Exception => {
                let failure = StreamFailure::Exception(name(message.exception_type()));
                self.failure.get_or_insert(failure);
                return;
            }
            MessageType::Error => {
                let failure = StreamFailure::Error(name(message.error_code()));
                self.failure.get_or_insert(failure);
                return;
            }
            MessageType::Other => return,
        }
        let payload = message.payload();
        match (self.operation, message.event_type().unwrap_or_default()) {
            (StreamOperation::ConverseStream, b"contentBlockDelta") => {
                self.observed_output = self.observed_output.saturating_add(1);
            }
            (StreamOperation::ConverseStream, b"messageStop") => self.message_stop = true,
            (StreamOperation::ConverseStream, b"metadata") => match converse_usage(payload) {
                ConverseReading::Usage(usage) => self.converse = Some(usage),
                ConverseReading::Invalid => self.invalid = true,
                ConverseReading::Foreign => self.foreign = true,
                ConverseReading::Absent => {}
            },
            (StreamOperation::InvokeWithResponseStream, b"chunk") => self.on_chunk(payload),
            _ => {}
        }
    }

    fn on_chunk(&mut self, payload: &[u8]) {
        self.scratch.clear();
        let decoded = serde_json::from_slice::<ChunkPayload<'_>>(payload)
            .ok()
            .and_then(|chunk| chunk.bytes)
            .is_some_and(|text| decode_base64(text.as_bytes(), &mut self.scratch));
        if !decoded {
            self.bad_chunk = true;
            self.scratch.clear();
            return;
        }
        feed_anthropic_event(&mut self.anthropic, &self.scratch);
        // Anthropic's `message_stop` carries the invocation metrics; other model families' last
        // chunk does too (no `type`): the fallback for both.
        if memchr::memmem::find(&self.scratch, b"amazon-bedrock-invocationMetrics").is_some()
            && let Some(metrics) = invocation_metrics(&self.scratch)
        {
            self.metrics = Some(metrics);
        }
        self.scratch.clear();
    }
}

/// Feeds one Anthropic Messages stream event (its JSON, as an Invoke `chunk` carries it) to the
/// crate's Anthropic SSE reader, as one SSE event: one `data:` line per line of the JSON (a JSON
/// line break is whitespace, which SSE's joining `"\n"` preserves), then the blank line that
/// dispatches it. Allocates nothing beyond the reader's own bounded line.
pub fn feed_anthropic_event(reader: &mut SseUsageReader, event_json: &[u8]) {
    for line in event_json.split(|b| *b == b'\n' || *b == b'\r') {
        reader.feed(b"data: ");
        reader.feed(line);
        reader.feed(b"\n");
    }
    reader.feed(b"\n");
}

fn bounded_name(bytes: &[u8]) -> String {
    let mut name = String::from_utf8_lossy(bytes).into_owned();
    if name.len() > MAX_FAILURE_NAME_BYTES {
        let mut end = MAX_FAILURE_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        name.truncate(end);
    }
    name
}

#[derive(Deserialize)]
struct ChunkPayload<'a> {
    #[serde(borrow, default)]
    bytes: Option<Cow<'a, str>>,
}

/// Standard base64 (RFC 4648 §4, `+/`), padding optional (when present, it completes the last
/// quantum), nothing else accepted (no whitespace).
/// Appends to `out`, reserving exactly what the text decodes to; `false` on a bad character or
/// length (then `out` holds garbage the caller clears).
fn decode_base64(text: &[u8], out: &mut Vec<u8>) -> bool {
    if text.ends_with(b"=") && !text.len().is_multiple_of(4) {
        return false;
    }
    let text = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    if text.len() % 4 == 1 {
        return false;
    }
    out.reserve_exact(text.len() / 4 * 3 + (text.len() % 4).saturating_sub(1));
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    for &c in text {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return false,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xFF) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    true
}

enum ConverseReading {
    Usage(Usage),
    Foreign,
    Invalid,
    Absent,
}

#[derive(Deserialize)]
struct ConverseMetadata {
    #[serde(default)]
    usage: Option<ObjectOnly<ConverseUsage>>,
}

/// `T` read from a JSON object only: serde's derive would also read a struct from an array
/// (`[1, 2]` as its fields in order), which must count as garbage, not as usage.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapOnly<T>(core::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapOnly<T> {
            type Value = ObjectOnly<T>;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(ObjectOnly)
            }
        }
        deserializer.deserialize_map(MapOnly(core::marker::PhantomData))
    }
}

/// Bedrock's `TokenUsage`. A count that is not a JSON number fails the parse (invalid).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseUsage {
    input_tokens: Option<serde_json::Number>,
    output_tokens: Option<serde_json::Number>,
    cache_read_input_tokens: Option<serde_json::Number>,
    cache_write_input_tokens: Option<serde_json::Number>,
}

/// A count: `None` when missing or `null`, `Err` when not a `u64` (negative, fractional, …).
fn count(n: Option<&serde_json::Number>) -> Result<Option<u64>, ()> {
    n.map(|n| n.as_u64().ok_or(())).transpose()
}

/// The usage of a ConverseStream `metadata` event (see the module documentation).
fn converse_usage(payload: &[u8]) -> ConverseReading {
    let Ok(metadata) = serde_json::from_slice::<ConverseMetadata>(payload) else {
        return ConverseReading::Invalid;
    };
    let Some(ObjectOnly(raw)) = metadata.usage else {
        return ConverseReading::Absent;
    };
    converse_counts(&raw)
}

fn converse_counts(raw: &ConverseUsage) -> ConverseReading {
    let counts = (|| {
        Ok::<_, ()>([
            count(raw.input_tokens.as_ref())?,
            count(raw.output_tokens.as_ref())?,
            count(raw.cache_read_input_tokens.as_ref())?,
            count(raw.cache_write_input_tokens.as_ref())?,
        ])
    })();
    match counts {
        Err(()) => ConverseReading::Invalid,
        Ok([None, None, None, None]) => ConverseReading::Foreign,
        Ok([input, output, read, write]) => ConverseReading::Usage(anthropic(
            input.unwrap_or(0),
            output.unwrap_or(0),
            read.unwrap_or(0),
            write.unwrap_or(0),
        )),
    }
}

impl ConverseReading {
    fn reading(self) -> usage::Reading {
        match self {
            ConverseReading::Usage(u) => usage::Reading::Usage(u),
            ConverseReading::Foreign => usage::Reading::Foreign,
            ConverseReading::Invalid => usage::Reading::Invalid,
            ConverseReading::Absent => usage::Reading::Absent,
        }
    }
}

/// The usage of a whole (non-streaming) Converse response body, or of its tail: the top-level
/// `usage` (the stream's `metadata` fields), found by the backward scan the other APIs use; the
/// body is parsed whole only when the scan cannot vouch for the bytes.
pub fn converse_body_usage(body: &[u8]) -> usage::Reading {
    match usage::locate_key_backward(body, b"usage", 1) {
        // The slice runs from the value to the body's end: read one value, not to the end.
        usage::Locate::Found(value) => {
            let mut de = serde_json::Deserializer::from_slice(value);
            match Option::<ObjectOnly<ConverseUsage>>::deserialize(&mut de) {
                Ok(Some(ObjectOnly(raw))) => converse_counts(&raw).reading(),
                Ok(None) => usage::Reading::Absent,
                Err(_) => usage::Reading::Invalid,
            }
        }
        usage::Locate::Absent => usage::Reading::Absent,
        usage::Locate::Unsure => match converse_usage(body) {
            // Not JSON as a whole: nothing to read (not garbage usage).
            ConverseReading::Invalid
                if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() =>
            {
                usage::Reading::Absent
            }
            other => other.reading(),
        },
    }
}

#[derive(Deserialize)]
struct InvokeStop {
    #[serde(rename = "amazon-bedrock-invocationMetrics", default)]
    metrics: Option<ObjectOnly<InvocationMetrics>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvocationMetrics {
    input_token_count: Option<serde_json::Number>,
    output_token_count: Option<serde_json::Number>,
}

/// `amazon-bedrock-invocationMetrics` of an Anthropic `message_stop` (no cache tokens in it).
fn invocation_metrics(event: &[u8]) -> Option<Usage> {
    let ObjectOnly(metrics) = serde_json::from_slice::<InvokeStop>(event).ok()?.metrics?;
    let input = count(metrics.input_token_count.as_ref()).ok()?;
    let output = count(metrics.output_token_count.as_ref()).ok()?;
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(Usage {
        input: input.unwrap_or(0),
        output: output.unwrap_or(0),
        ..Usage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::eventstream::tests::{
        CONVERSE, CONVERSE_THROTTLED, INVOKE, INVOKE_ERROR, INVOKE_METRICS_ONLY, event, frame,
        string_header,
    };
    use crate::api::testing::split_at_cuts;
    use proptest::prelude::*;

    use StreamOperation::{ConverseStream, InvokeWithResponseStream};

    type Outcome = (
        Option<Usage>,
        bool,
        u64,
        Option<StreamFailure>,
        Option<DecodeError>,
        (bool, bool, bool),
    );

    fn outcome(r: &BedrockStreamReader) -> Outcome {
        (
            r.usage(),
            r.completed(),
            r.observed_output(),
            r.failure().cloned(),
            r.decode_error(),
            (r.invalid_usage(), r.foreign_usage(), r.bad_chunk()),
        )
    }

    fn run(op: StreamOperation, chunks: &[&[u8]]) -> Outcome {
        let limits = Limits::default();
        let mut r = BedrockStreamReader::new(op, limits, 4096);
        for c in chunks {
            r.feed(c);
            assert!(r.held_bytes() <= limits.max_message_bytes * 7 / 4 + 3 * 4096);
        }
        r.finish();
        outcome(&r)
    }

    fn cache_usage(input: u64, output: u64) -> Usage {
        Usage {
            input: input + 3000 + 1200,
            output,
            cached_input: 3000,
            cache_write_input: 1200,
            reasoning: 0,
        }
    }

    const CLEAN: (bool, bool, bool) = (false, false, false);

    fn fixtures() -> Vec<(StreamOperation, &'static [u8], Outcome)> {
        let throttled = StreamFailure::Exception("throttlingException".into());
        let stream_error = StreamFailure::Exception("modelStreamErrorException".into());
        let metrics = Usage {
            input: 40,
            output: 3,
            ..Usage::default()
        };
        vec![
            (
                ConverseStream,
                CONVERSE,
                (Some(cache_usage(25, 12)), true, 2, None, None, CLEAN),
            ),
            (
                InvokeWithResponseStream,
                INVOKE,
                (Some(cache_usage(25, 15)), true, 2, None, None, CLEAN),
            ),
            (
                ConverseStream,
                CONVERSE_THROTTLED,
                (None, false, 1, Some(throttled), None, CLEAN),
            ),
            (
                InvokeWithResponseStream,
                INVOKE_ERROR,
                (
                    Some(cache_usage(25, 1)),
                    false,
                    1,
                    Some(stream_error),
                    None,
                    CLEAN,
                ),
            ),
            (
                InvokeWithResponseStream,
                INVOKE_METRICS_ONLY,
                (Some(metrics), true, 1, None, None, CLEAN),
            ),
        ]
    }

    #[test]
    fn fixtures_give_usage_outcome_and_failure() {
        for (op, bytes, want) in fixtures() {
            assert_eq!(run(op, &[bytes]), want, "{op:?}");
        }
    }

    #[test]
    fn every_split_matches_whole() {
        for (op, bytes, want) in fixtures() {
            for cut in 0..=bytes.len() {
                let (a, b) = bytes.split_at(cut);
                assert_eq!(run(op, &[a, b]), want, "{op:?} cut {cut}");
            }
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(run(op, &bytewise), want, "{op:?} bytewise");
        }
    }

    #[test]
    fn a_corrupt_frame_stops_reading_and_keeps_what_came_before() {
        // The metadata frame's CRC flipped: Converse usage is lost, the deltas before it stand.
        let mut bad = CONVERSE.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let got = run(ConverseStream, &[&bad]);
        assert_eq!(
            got,
            (None, true, 2, None, Some(DecodeError::MessageCrc), CLEAN)
        );
        // Cut inside the metadata frame: truncated.
        let got = run(ConverseStream, &[&CONVERSE[..CONVERSE.len() - 10]]);
        assert_eq!(got.4, Some(DecodeError::Truncated));
        assert_eq!(got.0, None);
        // A huge declared length never buffers: the reader stays small.
        let mut huge = CONVERSE.to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let crc = crc32fast::hash(&huge[..8]);
        huge[8..12].copy_from_slice(&crc.to_be_bytes());
        let mut r = BedrockStreamReader::new(ConverseStream, Limits::default(), 4096);
        r.feed(&huge);
        assert_eq!(
            r.decode_error(),
            Some(DecodeError::MessageTooLong { total: u32::MAX })
        );
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn converse_metadata_shapes() {
        let stream = |payload: &str| {
            let mut s = event("messageStop", b"{\"stopReason\":\"end_turn\"}");
            s.extend(event("metadata", payload.as_bytes()));
            run(ConverseStream, &[&s])
        };
        // No cache fields, nulls, unknown members.
        let got = stream(
            r#"{"usage":{"inputTokens":7,"outputTokens":3,"cacheReadInputTokens":null,"totalTokens":10,"x":[1]},"metrics":{"latencyMs":1},"trace":{}}"#,
        );
        let want = Usage {
            input: 7,
            output: 3,
            ..Usage::default()
        };
        assert_eq!(got.0, Some(want));
        // Invalid counts: ignored and flagged.
        for bad in [
            r#"{"usage":{"inputTokens":-7,"outputTokens":3}}"#,
            r#"{"usage":{"inputTokens":7.5}}"#,
            r#"{"usage":{"inputTokens":18446744073709551616}}"#,
            r#"{"usage":{"inputTokens":"7"}}"#,
            r#"{"usage":{"inputTokens":7,"inputTokens":8}}"#,
            r#"{"usage":"lots"}"#,
            r#"{"usage":[7,3,0,0]}"#,
            "not json",
        ] {
            let got = stream(bad);
            assert_eq!((got.0, got.5), (None, (true, false, false)), "{bad}");
        }
        // Another shape, or no usage.
        let got = stream(r#"{"usage":{"input_tokens":7}}"#);
        assert_eq!((got.0, got.5), (None, (false, true, false)));
        let got = stream(r#"{"usage":null,"metrics":{}}"#);
        assert_eq!((got.0, got.5), (None, CLEAN));
        // Saturating sum.
        let got = stream(&format!(
            r#"{{"usage":{{"inputTokens":{m},"cacheReadInputTokens":{m},"outputTokens":1}}}}"#,
            m = u64::MAX
        ));
        assert_eq!(got.0.map(|u| u.input), Some(u64::MAX));
        // The last metadata wins.
        let mut s = event(
            "metadata",
            br#"{"usage":{"inputTokens":1,"outputTokens":1}}"#,
        );
        s.extend(event(
            "metadata",
            br#"{"usage":{"inputTokens":2,"outputTokens":5}}"#,
        ));
        let got = run(ConverseStream, &[&s]);
        assert_eq!(got.0.map(|u| (u.input, u.output)), Some((2, 5)));
        assert!(!got.1, "no messageStop");
    }

    #[test]
    fn invoke_chunks_that_are_not_base64_json_are_skipped_and_flagged() {
        let start =
            br#"{"type":"message_start","message":{"usage":{"input_tokens":9,"output_tokens":1}}}"#;
        let good = format!(r#"{{"bytes":"{}"}}"#, encode_base64(start));
        // JSON escapes in the base64 (`\/`) are undone before decoding.
        let delta = br#"{"type":"message_delta","usage":{"output_tokens":4}}"#;
        let escaped = format!(r#"{{"bytes":"{}"}}"#, encode_base64(delta)).replace('/', "\\/");
        for bad in [
            r#"{"bytes":"!!!!"}"#,
            r#"{"bytes":"QUJD RA=="}"#,
            r#"{"bytes":"QUJDR"}"#,
            r#"{"bytes":7}"#,
            r#"{"p":"abc"}"#,
            "[]",
            "",
        ] {
            let mut s = event("chunk", good.as_bytes());
            s.extend(event("chunk", bad.as_bytes()));
            s.extend(event("chunk", escaped.as_bytes()));
            let got = run(InvokeWithResponseStream, &[&s]);
            assert_eq!(got.0.map(|u| (u.input, u.output)), Some((9, 4)), "{bad}");
            assert_eq!(got.5, (false, false, true), "{bad}");
        }
        // Events of other types, and messages of unknown type, are ignored.
        let mut s = event("chunk", good.as_bytes());
        s.extend(event("somethingNew", b"{}"));
        s.extend(frame(&string_header(":message-type", "surprise"), b""));
        let got = run(InvokeWithResponseStream, &[&s]);
        assert_eq!(got.0.map(|u| u.input), Some(9));
        assert_eq!(got.5, CLEAN);
    }

    #[test]
    fn error_messages_fail_the_answer_and_the_first_failure_is_kept() {
        let mut error = string_header(":message-type", "error");
        error.extend(string_header(":error-code", "InternalFailure"));
        error.extend(string_header(":error-message", "boom"));
        let mut s = CONVERSE.to_vec();
        s.extend(frame(&error, b""));
        let mut exc = string_header(":message-type", "exception");
        exc.extend(string_header(":exception-type", &"x".repeat(300)));
        s.extend(frame(&exc, b"{}"));
        let got = run(ConverseStream, &[&s]);
        assert_eq!(got.3, Some(StreamFailure::Error("InternalFailure".into())));
        assert!(!got.1, "a failed answer is not completed");
        assert_eq!(got.0, Some(cache_usage(25, 12)), "usage read before stands");
        // Names are bounded; an exception without its type still fails the answer.
        let got = run(ConverseStream, &[&frame(&exc, b"{}")]);
        assert_eq!(got.3, Some(StreamFailure::Exception("x".repeat(64))));
        let got = run(
            ConverseStream,
            &[&frame(&string_header(":message-type", "exception"), b"")],
        );
        assert_eq!(got.3, Some(StreamFailure::Exception(String::new())));
        assert_eq!(bounded_name("é".repeat(40).as_bytes()).len(), 64);
        assert_eq!(bounded_name(b"a\xffb"), "a\u{FFFD}b");
    }

    #[test]
    fn anthropic_events_reach_the_anthropic_reader_whatever_their_line_breaks() {
        let mut r = SseUsageReader::new(crate::api::ApiKind::Messages, 4096);
        feed_anthropic_event(
            &mut r,
            b"{\r\n  \"type\": \"message_start\",\n  \"message\": {\"usage\":\r{\"input_tokens\": 3}}\n}",
        );
        feed_anthropic_event(
            &mut r,
            br#"{"type":"content_block_delta","delta":{"text":"a"}}"#,
        );
        feed_anthropic_event(
            &mut r,
            br#"{"type":"message_delta","usage":{"output_tokens":6}}"#,
        );
        feed_anthropic_event(&mut r, br#"{"type":"message_stop"}"#);
        assert_eq!(r.usage().map(|u| (u.input, u.output)), Some((3, 6)));
        assert!(r.completed());
        assert_eq!((r.observed_output(), r.buffered_bytes()), (1, 0));
    }

    #[test]
    fn other_model_families_fall_back_to_their_invocation_metrics() {
        // A Llama stream on Invoke: no Anthropic events, the metrics on its last chunk.
        let chunk = |json: &str| {
            let payload = format!(r#"{{"bytes":"{}"}}"#, encode_base64(json.as_bytes()));
            event("chunk", payload.as_bytes())
        };
        let mut stream = chunk(r#"{"generation":"Hello","prompt_token_count":12}"#);
        stream.extend(chunk(
            r#"{"generation":"","stop_reason":"stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":12,"outputTokenCount":7,"invocationLatency":100,"firstByteLatency":50}}"#,
        ));
        let mut r = BedrockStreamReader::new(InvokeWithResponseStream, Limits::default(), 4096);
        r.feed(&stream);
        r.finish();
        assert_eq!(r.usage().map(|u| (u.input, u.output)), Some((12, 7)));
    }

    fn encode_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for group in bytes.chunks(3) {
            let b = [
                group[0],
                *group.get(1).unwrap_or(&0),
                *group.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..=group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
            for _ in group.len()..3 {
                out.push('=');
            }
        }
        out
    }

    #[test]
    fn base64_rfc4648_vectors() {
        for (plain, text) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            let mut out = Vec::new();
            assert!(decode_base64(text.as_bytes(), &mut out), "{text}");
            assert_eq!(out, plain.as_bytes());
            assert_eq!(out.capacity(), plain.len(), "exact reservation");
            let mut out = Vec::new();
            assert!(decode_base64(
                text.trim_end_matches('=').as_bytes(),
                &mut out
            ));
            assert_eq!(out, plain.as_bytes());
            assert_eq!(encode_base64(plain.as_bytes()), text);
        }
        for bad in [
            "Z", "Zm9vY", "Zm9v\n", "Zm-v", "Zm9v===", "=", "Zg=a", "Zg=", "Zm9v==", "====",
        ] {
            assert!(!decode_base64(bad.as_bytes(), &mut Vec::new()), "{bad}");
        }
    }

    mod proptests {
        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 256,
                rng_seed: proptest::test_runner::RngSeed::Fixed(20),
                ..ProptestConfig::default()
            })]

            #[test]
            fn any_split_matches_whole(
                which in 0usize..5,
                cuts in prop::collection::vec(any::<usize>(), 0..40),
            ) {
                let (op, bytes, want) = fixtures().swap_remove(which);
                prop_assert_eq!(run(op, &split_at_cuts(bytes, &cuts)), want);
            }

            #[test]
            fn base64_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
                let mut out = Vec::new();
                prop_assert!(decode_base64(encode_base64(&bytes).as_bytes(), &mut out));
                prop_assert_eq!(out, bytes);
            }
        }
    }
}
#[cfg(test)]
mod body_usage_tests {
    use super::*;

    #[test]
    fn converse_json_body_usage() {
        let body = br#"{"metrics":{"latencyMs":100},"output":{"message":{"content":[{"text":"hello"}],"role":"assistant"}},"stopReason":"end_turn","usage":{"cacheReadInputTokens":600,"cacheWriteInputTokens":400,"inputTokens":5,"outputTokens":9,"totalTokens":1014}}"#;
        assert_eq!(
            converse_body_usage(body)
                .usage()
                .map(|u| (u.input, u.output)),
            Some((1005, 9))
        );
        // Its tail works as well; garbage counts are invalid, not zero.
        let tail = body.get(body.len() - 120..).unwrap();
        assert!(converse_body_usage(tail).usage().is_some());
        let bad = br#"{"usage":{"inputTokens":-1,"outputTokens":9}}"#;
        assert_eq!(converse_body_usage(bad), usage::Reading::Invalid);
        assert_eq!(
            converse_body_usage(b"{\"output\":{}}"),
            usage::Reading::Absent
        );
        assert_eq!(converse_body_usage(b"not json"), usage::Reading::Absent);
    }
}
