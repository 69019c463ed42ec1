//! `exchange::Exchange` driven the way the Envoy glue (`src/envoy/http.rs`) drives it, for every
//! `ApiKind` (the Gemini, Vertex and Bedrock ones read their facts through `read_request` with
//! the model and, for the streaming operations, the stream flag in the path): request
//! facts, include_usage injected or not, the cache capture on or off, response headers (status,
//! content type, content encoding), the body in arbitrary chunks — identity, gzip or deflate,
//! properly compressed or corrupt, sometimes with a decompression bomb (up to 32 MiB of zeros) —
//! then `on_response_complete` (or a cut stream), `finish`, `record` and `take_capture`.
//!
//! Besides "never panics" it asserts:
//! - the MEMORY BOUND, twice after every step: `Exchange::held_bytes()` stays within
//!   `Exchange::held_bytes_bound(limits, capture limit)` (the crate's own figure), and a counting
//!   global allocator's peak during the exchange, above what was live before it, stays under
//!   `bound()` (see there: the same design counted in allocations — capacity, reallocation and
//!   transients included);
//! - the decompression cap: a well-formed gzip/deflate body that decodes to more than
//!   `max_decoded_response_bytes` is flagged `UsageAnomaly::DecodeLimit` (a JSON one then charges
//!   a fallback, never usage read past the cap); one within the cap is flagged neither
//!   `DecodeLimit` nor `DecodeError`;
//! - the client's bytes are the upstream's unless the exchange rewrites the body (only the
//!   injected usage chunk removed, as a one-shot `UsageChunkStripper` would);
//! - a capture is only returned for a complete 2xx identity response, equals what the client got
//!   and fits its limit; `finish` is idempotent; a refund charges nothing; `record` has its 12
//!   fields (13 with `tollgate.usage_anomaly`, which agrees with `usage_anomaly()`) with the
//!   same usage.
//!
//! `TOLLGATE_FUZZ_BOUND=off` in the environment skips the allocator-peak assertion (not the
//! `held_bytes` one), to fuzz everything else should the peak bound ever be broken.
//!
//! Input layout (missing bytes read as 0):
//! - byte 0: kind (bits 0-1, the low bits of the kind index, see byte 6), request `stream` (2:
//!   the body's `stream` for the OpenAI/Anthropic kinds, the path's streaming operation for
//!   `GenerateContent`, `RawPredict`, `Converse` and `Invoke`), request `include_usage` (3), Tollgate injected
//!   include_usage (4), capture for the cache (5), routed to another model (6), the response ends
//!   normally (7: else it is cut and `finish` sees `upstream_failed` from byte 1 bit 6);
//! - byte 1: status (bits 0-2), content type (3-5, the low bits of its index, see byte 6),
//!   upstream_failed (6), an empty last chunk (7);
//! - byte 2: content encoding (bits 0-2), how the body is encoded (3-4: 0 = compressed as the
//!   header says, 1 = the other of gzip/zlib, 2 = not compressed, 3 = raw deflate), level (5),
//!   body mode (6: 0 = raw bytes, 1 = each byte picks a token from `TOKENS`);
//! - byte 3: `max_response_buffer_bytes` (bits 0-1), `max_sse_line_bytes` (2-3), capture limit
//!   (4-5);
//! - byte 4: bomb size (bits 0-3, see `BOMBS`), `max_decoded_response_bytes` (4-6, see
//!   `DECODE_CAPS`); byte 5: where in the body the bomb goes (/255);
//! - byte 6: the kind index's high bits (bits 0-1: index = byte 0 bits 0-1 + 4 × these, mod
//!   `KINDS.len()`), the content type index's high bit (2: index = byte 1 bits 3-5 + 8 × it),
//!   Bedrock's `x-amzn-bedrock-{input,output}-token-count` headers for the `Aws` family (3:
//!   input = 21, 4: output = 13; given to `set_header_usage` after `on_response_headers`, as
//!   `pipeline/respond.rs` does);
//! - bytes 7-8, 9-10: reservation (prompt, output tokens);
//! - byte 11: number of cuts (mod 64), then 2 bytes per cut (position = u16/65535 of the wire
//!   body); the rest is the body. In token mode (byte 2 bit 6) `TOKENS` include Gemini SSE
//!   events and JSON-array pieces, and AWS event-stream frames built with real CRCs (Converse
//!   events, Invoke `chunk` frames carrying base64 Anthropic events, exception and error
//!   frames, one with a corrupt message CRC).
#![no_main]

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use libfuzzer_sys::fuzz_target;
use tollgate::api::dialect::{Call, PathModel};
use tollgate::api::request::{RequestFacts, parse_request, read_request};
use tollgate::api::ApiKind;
use tollgate::api::strip::UsageChunkStripper;
use tollgate::config::Limits;
use tollgate::exchange::{Exchange, INFLATE_STATE_BYTES, UsageAnomaly, UsageSource};

#[path = "common/counting.rs"]
mod counting;
use counting::{LIVE, PEAK};

// ---- the bound -----------------------------------------------------------------------------

/// Mirrors of private constants in `src/exchange.rs` (keep in sync; `check_mirrors_once` checks
/// their sum against `Exchange::held_bytes_bound`).
const JSON_TAIL_BYTES: usize = 64 * 1024;
const STRIP_HOLD_BYTES: usize = 64 * 1024;
/// The decoder's fixed output buffer: decoded bytes reach the readers in pieces of at most this.
const INFLATE_OUT_BYTES: usize = 32 * 1024;
/// The longest gzip header the decoder holds while it arrives.
const GZIP_HEADER_MAX: usize = 64 * 1024;

/// A growable buffer of n bytes may have a capacity of up to 2n, and while it grows the old block
/// (< n) and the new one (≤ 2n) coexist: < 3n at the peak (the allocator above counts that).
const GROW: usize = 3;

/// Fixed slack: the boxed SSE reader and decoder structs, the record's 12 strings and its `Vec`,
/// the step labels `check` formats, small boxes. Measured well under 4 KiB.
const SLACK: usize = 16 * 1024;

/// The most heap the exchange may use above what was live before it (bytes, at the peak).
///
/// ```text
/// bound = GROW × (reader + scratch + strip + capture + header) + inflate + SLACK
///   reader  = max(max_response_buffer_bytes, 2 × JSON_TAIL_BYTES)   JSON tail (2xx, not SSE):
///             the whole body up to the cap, then a tail of keep..2 × keep bytes,
///             keep = min(JSON_TAIL_BYTES, cap)
///           = 3 × max_sse_line_bytes                                 SSE reader (2xx, SSE):
///             unfinished line + event type + event data, each ≤ the line cap; the Gemini
///             stream reader (SSE or JSON array) and the Bedrock event-stream reader count
///             as this too: GROW × (reader + scratch) = 12 lines is the bound the
///             `gemini_stream` (12 × max) and `eventstream` (3 × message + 9 × line, both
///             the line cap here) targets assert for them on their own
///   scratch = serde_json's scratch for one escaped string while usage is parsed: at most the
///             document parsed (JSON: the tail = reader; SSE, Gemini, Bedrock: one line)
///   strip   = 5 × (STRIP_HOLD_BYTES + 1) + largest_chunk           if the usage chunk is stripped:
///             the held-back event, a judged event's joined data and its parse scratch, and the
///             replacement returned for a chunk (held + chunk + what `finish` returns)
///   capture = the capture limit                                      if capture_for_cache was called
///   header  = GZIP_HEADER_MAX                                        if the body is gzip/deflate:
///             the wrapper header while it arrives
///   inflate = INFLATE_OUT_BYTES + 2 × INFLATE_STATE_BYTES            if the body is gzip/deflate:
///             the fixed 32 KiB output buffer (a boxed slice, never grows) and the inflate state,
///             twice: it is replaced by a fresh one (zlib or raw) once the header is parsed
/// ```
/// Decoded bytes add nothing of their own: they pass from the fixed output buffer to the reader,
/// which is bounded above whatever the compression ratio, and decoding stops for good after
/// `max_decoded_response_bytes`. The chunk itself is the caller's.
///
/// This is the allocator-level counterpart of `Exchange::held_bytes_bound` (which counts bytes
/// held between calls, not capacity or transients); both are asserted after every step.
#[allow(clippy::too_many_arguments)]
fn bound(
    limits: &Limits,
    json_on: bool,
    sse_on: bool,
    strip_on: bool,
    capture: Option<usize>,
    encoded: bool,
    largest_chunk: usize,
) -> usize {
    let cap = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let (reader, scratch) = if json_on {
        let json = cap(limits.max_response_buffer_bytes).max(2 * JSON_TAIL_BYTES);
        (json, json)
    } else if sse_on {
        let line = cap(limits.max_sse_line_bytes);
        (line.saturating_mul(3), line)
    } else {
        (0, 0)
    };
    let strip = if strip_on {
        (5 * (STRIP_HOLD_BYTES + 1)).saturating_add(largest_chunk)
    } else {
        0
    };
    let (header, inflate) = if encoded {
        (GZIP_HEADER_MAX, INFLATE_OUT_BYTES + 2 * INFLATE_STATE_BYTES)
    } else {
        (0, 0)
    };
    GROW.saturating_mul(
        reader
            .saturating_add(scratch)
            .saturating_add(strip)
            .saturating_add(capture.unwrap_or(0))
            .saturating_add(header),
    )
    .saturating_add(inflate)
    .saturating_add(SLACK)
}

/// Once per process: the mirrored constants agree with the crate's own formula, and flate2's
/// inflate state really fits in `INFLATE_STATE_BYTES` (the crate counts it as that).
fn check_mirrors_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let zero = Limits {
            max_response_buffer_bytes: 0,
            max_sse_line_bytes: 0,
            ..Limits::default()
        };
        assert_eq!(
            Exchange::held_bytes_bound(&zero, 0),
            2 * JSON_TAIL_BYTES
                + STRIP_HOLD_BYTES
                + 1
                + INFLATE_OUT_BYTES
                + INFLATE_STATE_BYTES
                + GZIP_HEADER_MAX,
            "the mirrored constants drifted from src/exchange.rs"
        );
        let before = LIVE.load(Ordering::Relaxed);
        let state = flate2::Decompress::new(true);
        let size = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        drop(state);
        assert!(
            size <= INFLATE_STATE_BYTES,
            "flate2's inflate state is {size} B, over INFLATE_STATE_BYTES ({INFLATE_STATE_BYTES})"
        );
    });
}

/// `TOLLGATE_FUZZ_REPORT=1`: print the measured figures of each input on stderr (to run single
/// inputs: `target/x86_64-unknown-linux-gnu/release/exchange <file>`).
fn report() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("TOLLGATE_FUZZ_REPORT").is_some())
}

fn bound_enforced() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TOLLGATE_FUZZ_BOUND").map_or(true, |v| v != "off"))
}

// ---- input ---------------------------------------------------------------------------------

const KINDS: [ApiKind; 10] = ApiKind::ALL;
const STATUSES: [u32; 8] = [200, 200, 200, 201, 204, 400, 429, 500];
const CONTENT_TYPES: [Option<&[u8]>; 16] = [
    Some(b"application/json"),
    Some(b"text/event-stream"),
    Some(b"text/event-stream; charset=utf-8"),
    Some(b"TEXT/EVENT-STREAM"),
    Some(b"application/json; charset=utf-8"),
    None,
    Some(b"text/plain"),
    Some(b"text/event-strea"),
    Some(b"application/vnd.amazon.eventstream"),
    Some(b"application/vnd.amazon.eventstream"),
    Some(b" APPLICATION/VND.AMAZON.EVENTSTREAM; charset=x"),
    Some(b"application/vnd.amazon.eventstrea"),
    Some(b"application/vnd.amazon.eventstreamX"),
    Some(b"text/event-stream"),
    Some(b"application/json"),
    Some(b""),
];
/// The path's streaming operation exists for these kinds (`:streamGenerateContent`,
/// `:streamRawPredict`, `/converse-stream`, `/invoke-with-response-stream`).
fn path_streams(kind: ApiKind) -> bool {
    matches!(
        kind,
        ApiKind::GenerateContent | ApiKind::RawPredict | ApiKind::Converse | ApiKind::Invoke
    )
}

/// The request facts of `kind`: the OpenAI/Anthropic ones from their body, the others through
/// `read_request` with the model (and, for a streaming operation, the stream flag) in the path,
/// as the filter reads them.
fn request_facts(kind: ApiKind, stream: bool, asked_usage: bool, max_tokens: u16) -> RequestFacts {
    let body = match kind {
        ApiKind::ChatCompletions | ApiKind::Responses | ApiKind::Embeddings | ApiKind::Messages => {
            let body = format!(
                r#"{{"model":"m","stream":{stream},"stream_options":{{"include_usage":{asked_usage}}},"max_tokens":{max_tokens}}}"#
            );
            match parse_request(kind, body.as_bytes()) {
                Ok(f) => return f,
                Err(e) => panic!("generated request rejected: {e:?}"),
            }
        }
        ApiKind::GenerateContent => {
            format!(r#"{{"contents":[],"generationConfig":{{"maxOutputTokens":{max_tokens}}}}}"#)
        }
        ApiKind::EmbedContent | ApiKind::CountTokens => r#"{"contents":[]}"#.to_string(),
        ApiKind::RawPredict | ApiKind::Invoke => format!(
            r#"{{"anthropic_version":"bedrock-2023-05-31","messages":[],"max_tokens":{max_tokens}}}"#
        ),
        ApiKind::Converse => {
            format!(r#"{{"messages":[],"inferenceConfig":{{"maxTokens":{max_tokens}}}}}"#)
        }
    };
    let call = Call {
        kind,
        stream: stream && path_streams(kind),
        model: Some(PathModel {
            start: 0,
            end: 0,
            name: Some("m".to_string()),
        }),
    };
    match read_request(&call, body.as_bytes()) {
        Ok(f) => {
            assert_eq!(f.stream, call.stream, "the path's stream flag was not kept");
            f
        }
        Err(e) => panic!("generated request rejected: {e:?}"),
    }
}
const ENCODINGS: [Option<&[u8]>; 8] = [
    None,
    Some(b"identity"),
    Some(b"gzip"),
    Some(b"deflate"),
    Some(b" GZIP "),
    Some(b"x-gzip"),
    Some(b"br"),
    Some(b""),
];
/// Capture limits (bytes).
const CAPTURE_LIMITS: [usize; 4] = [0, 1000, 64 * 1024, 1024 * 1024];
/// `max_response_buffer_bytes` / `max_sse_line_bytes` choices (the last is the default).
const LIMIT_CHOICES: [u64; 4] = [0, 1000, 64 * 1024, 1024 * 1024];
/// `max_decoded_response_bytes` choices: the 64 MiB default for half the inputs (no bomb here
/// reaches it), small caps for the others so that decoding stops early and the fallback is hit.
const DECODE_CAPS: [u64; 8] = [
    64 * 1024 * 1024,
    64 * 1024 * 1024,
    64 * 1024 * 1024,
    64 * 1024 * 1024,
    1,
    1000,
    100_000,
    1024 * 1024,
];
/// Zero bytes compressed into the body: 0 for most inputs, up to 32 MiB.
const BOMBS: [usize; 16] = [
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1000,
    64 * 1024,
    256 * 1024,
    1024 * 1024,
    4 * 1024 * 1024,
    16 * 1024 * 1024,
    32 * 1024 * 1024,
];

const FILLER_1K: &str = "\u{1}1K";
const FILLER_64K: &str = "\u{1}64K";

const TOKENS: &[&str] = &[
    // SSE framing
    "data: ",
    "event: ",
    "\n",
    "\r\n",
    "\n\n",
    ": keep-alive\n\n",
    "data: [DONE]\n\n",
    // chat completions
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n",
    "data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\n",
    "data: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
    // responses
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2}}}\n\n",
    // messages
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    // JSON bodies and pieces
    "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"",
    "\"}}],",
    "\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":3}}}",
    "{\"type\":\"message\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}",
    "{\"object\":\"list\",\"usage\":{\"prompt_tokens\":8,\"total_tokens\":8}}",
    "{",
    "}",
    "\"",
    "\\",
    "null",
    "18446744073709551615",
    "é",
    FILLER_1K,
    FILLER_64K,
    // Gemini: SSE events (running totals; CRLF, LF and CR separators), JSON-array pieces, a
    // blocked prompt
    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"hi\"}]}}],\"usageMetadata\":{\"promptTokenCount\":12,\"candidatesTokenCount\":3,\"thoughtsTokenCount\":5}}\r\n\r\n",
    "data: {\"usageMetadata\":{\"promptTokenCount\":12,\"candidatesTokenCount\":9,\"cachedContentTokenCount\":4,\"toolUsePromptTokenCount\":2}}\n\n",
    "data: {\"promptFeedback\":{\"blockReason\":\"SAFETY\"},\"usageMetadata\":{\"promptTokenCount\":7}}\r\r",
    "[",
    "]",
    ",",
    "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"x]}[\"}]}}]}",
    "{\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":8,\"thoughtsTokenCount\":1}}",
    "{\"usageMetadata\":{\"promptTokenCount\":-1}}",
    // Bedrock event-stream frames (see `FRAMES`)
    FRAME_0,
    FRAME_1,
    FRAME_2,
    FRAME_3,
    FRAME_4,
    FRAME_5,
    FRAME_6,
    FRAME_7,
    // Bedrock JSON bodies
    "{\"output\":{\"message\":{}},\"usage\":{\"inputTokens\":10,\"outputTokens\":4,\"cacheReadInputTokens\":100}}",
    "{\"content\":[],\"usage\":{\"input_tokens\":3,\"output_tokens\":4,\"cache_creation_input_tokens\":2}}",
];

const FRAME_0: &str = "\u{2}F0";
const FRAME_1: &str = "\u{2}F1";
const FRAME_2: &str = "\u{2}F2";
const FRAME_3: &str = "\u{2}F3";
const FRAME_4: &str = "\u{2}F4";
const FRAME_5: &str = "\u{2}F5";
const FRAME_6: &str = "\u{2}F6";
const FRAME_7: &str = "\u{2}F7";
const FRAME_MARKERS: [&str; 8] = [
    FRAME_0, FRAME_1, FRAME_2, FRAME_3, FRAME_4, FRAME_5, FRAME_6, FRAME_7,
];

/// (`:message-type`, event/exception type, payload, corrupt the message CRC) of each frame
/// token. Invoke's `chunk` payloads are base64 Anthropic events (`message_start` with cache
/// tokens, `message_delta`).
const FRAMES: [(&str, &str, &str, bool); 8] = [
    ("event", "messageStart", r#"{"role":"assistant"}"#, false),
    ("event", "contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#, false),
    (
        "event",
        "metadata",
        r#"{"usage":{"inputTokens":25,"outputTokens":12,"cacheReadInputTokens":3000,"cacheWriteInputTokens":1200},"metrics":{"latencyMs":8}}"#,
        false,
    ),
    (
        "event",
        "chunk",
        concat!(
            r#"{"bytes":""#,
            "eyJ0eXBlIjoibWVzc2FnZV9zdGFydCIsIm1lc3NhZ2UiOnsidXNhZ2UiOnsiaW5wdXRfdG9rZW5zIjoyNSwiY2FjaGVfcmVhZF9pbnB1dF90b2tlbnMiOjMsIm91dHB1dF90b2tlbnMiOjF9fX0=",
            r#""}"#
        ),
        false,
    ),
    (
        "event",
        "chunk",
        concat!(
            r#"{"bytes":""#,
            "eyJ0eXBlIjoibWVzc2FnZV9kZWx0YSIsInVzYWdlIjp7Im91dHB1dF90b2tlbnMiOjE1fX0=",
            r#""}"#
        ),
        false,
    ),
    ("exception", "throttlingException", r#"{"message":"Too many requests"}"#, false),
    ("error", "InternalFailure", "", false),
    ("event", "metadata", r#"{"usage":{"inputTokens":1,"outputTokens":1}}"#, true),
];

fn eventstream_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(7);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc::new();
    c.update(bytes);
    c.sum()
}

/// One AWS event-stream message (prelude and its CRC, string headers, payload, message CRC).
fn eventstream_frame(n: usize, out: &mut Vec<u8>) {
    let (kind, name, payload, corrupt) = FRAMES[n % FRAMES.len()];
    let mut headers = Vec::new();
    let name_header = match kind {
        "exception" => ":exception-type",
        "error" => ":error-code",
        _ => ":event-type",
    };
    eventstream_header(&mut headers, name_header, name);
    eventstream_header(&mut headers, ":content-type", "application/json");
    eventstream_header(&mut headers, ":message-type", kind);
    let start = out.len();
    let total = (16 + headers.len() + payload.len()) as u32;
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&out[start..]);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload.as_bytes());
    let message_crc = crc32(&out[start..]) ^ u32::from(corrupt);
    out.extend_from_slice(&message_crc.to_be_bytes());
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
}

fn bit(byte: u8, n: u32) -> bool {
    byte >> n & 1 == 1
}

fn expand(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in body {
        match TOKENS[usize::from(*b) % TOKENS.len()] {
            FILLER_1K => out.resize(out.len() + 1024, b'a'),
            FILLER_64K => out.resize(out.len() + 64 * 1024, b'a'),
            t if t.starts_with('\u{2}') => {
                let n = FRAME_MARKERS.iter().position(|m| *m == t).unwrap_or(0);
                eventstream_frame(n, &mut out);
            }
            t => out.extend_from_slice(t.as_bytes()),
        }
    }
    out
}

/// Raw deflate blocks for `bytes`, ending in a sync flush (byte-aligned, not final) or in the
/// final block. Segments from fresh encoders concatenate into one valid deflate stream: each
/// one's back-references stay inside its own data.
fn deflate_segment(level: Compression, bytes: &[u8], zeros: usize, last: bool) -> Vec<u8> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut enc = DeflateEncoder::new(Vec::new(), level);
    let _ = enc.write_all(bytes);
    let mut left = zeros;
    while left > 0 {
        let n = left.min(ZEROS.len());
        let _ = enc.write_all(&ZEROS[..n]);
        left -= n;
    }
    if last {
        return enc.finish().unwrap_or_default();
    }
    let _ = enc.flush();
    std::mem::take(enc.get_mut())
}

/// The compressed zeros of a bomb and their CRC-32, computed once per (size, level): compressing
/// 32 MiB on every execution would cost seconds.
fn zeros_segment(zeros: usize, level: Compression) -> Rc<(Vec<u8>, Crc)> {
    thread_local! {
        static CACHE: RefCell<HashMap<(usize, u32), Rc<(Vec<u8>, Crc)>>> = RefCell::default();
    }
    CACHE.with(|cache| {
        cache
            .borrow_mut()
            .entry((zeros, level.level()))
            .or_insert_with(|| {
                let mut crc = Crc::new();
                let zero_block = [0u8; 64 * 1024];
                let mut left = zeros;
                while left > 0 {
                    let n = left.min(zero_block.len());
                    crc.update(&zero_block[..n]);
                    left -= n;
                }
                Rc::new((deflate_segment(level, &[], zeros, false), crc))
            })
            .clone()
    })
}

fn adler32(mut ab: (u32, u32), bytes: &[u8], zeros: usize) -> (u32, u32) {
    const M: u64 = 65521;
    for b in bytes {
        ab.0 = (ab.0 + u32::from(*b)) % 65521;
        ab.1 = (ab.1 + ab.0) % 65521;
    }
    // n zero bytes leave a alone and add n·a to b.
    ab.1 = ((u64::from(ab.1) + (zeros as u64 % M) * u64::from(ab.0)) % M) as u32;
    ab
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Gzip,
    Zlib,
    RawDeflate,
}

/// `prefix`, `zeros` zero bytes, then `suffix`, compressed in `format`.
fn encode(
    format: Format,
    level: Compression,
    prefix: &[u8],
    zeros: usize,
    suffix: &[u8],
) -> Vec<u8> {
    let mut raw = deflate_segment(level, prefix, 0, false);
    let bomb = (zeros > 0).then(|| zeros_segment(zeros, level));
    if let Some(bomb) = &bomb {
        raw.extend_from_slice(&bomb.0);
    }
    raw.extend_from_slice(&deflate_segment(level, suffix, 0, true));
    match format {
        Format::RawDeflate => raw,
        Format::Gzip => {
            let mut crc = Crc::new();
            crc.update(prefix);
            if let Some(bomb) = &bomb {
                crc.combine(&bomb.1);
            }
            let mut tail = Crc::new();
            tail.update(suffix);
            crc.combine(&tail);
            let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
            out.extend_from_slice(&raw);
            out.extend_from_slice(&crc.sum().to_le_bytes());
            out.extend_from_slice(&crc.amount().to_le_bytes());
            out
        }
        Format::Zlib => {
            let ab = adler32((1, 0), prefix, zeros);
            let (a, b) = adler32(ab, suffix, 0);
            let mut out = vec![0x78, 0x9c];
            out.extend_from_slice(&raw);
            out.extend_from_slice(&((b << 16) | a).to_be_bytes());
            out
        }
    }
}

/// Once per process: the spliced streams decode to prefix + zeros + suffix (CRC and Adler-32
/// included), so a bomb is a valid stream, not merely a corrupt one.
fn check_encoder_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        use std::io::Read;
        let (prefix, suffix) = (&b"{\"usage\":"[..], &b"{\"prompt_tokens\":1}}"[..]);
        let mut want = prefix.to_vec();
        want.resize(want.len() + 70_000, 0);
        want.extend_from_slice(suffix);
        for format in [Format::Gzip, Format::Zlib, Format::RawDeflate] {
            for level in [Compression::fast(), Compression::default()] {
                let wire = encode(format, level, prefix, 70_000, suffix);
                let mut got = Vec::new();
                let read = match format {
                    Format::Gzip => flate2::read::GzDecoder::new(&wire[..]).read_to_end(&mut got),
                    Format::Zlib => flate2::read::ZlibDecoder::new(&wire[..]).read_to_end(&mut got),
                    Format::RawDeflate => {
                        flate2::read::DeflateDecoder::new(&wire[..]).read_to_end(&mut got)
                    }
                };
                assert!(read.is_ok() && got == want, "the fuzz encoder is broken");
            }
        }
    });
}

// ---- the target ----------------------------------------------------------------------------

fuzz_target!(|data: &[u8]| {
    check_encoder_once();
    check_mirrors_once();
    let mut input = Input(data);
    let [b0, b1, b2, b3, b4, b5, b6] = [0; 7].map(|_| input.u8());
    let (prompt_reserved, output_reserved) = (input.u16(), input.u16());
    let ncuts = usize::from(input.u8() % 64);
    let cut_points: Vec<u16> = (0..ncuts).map(|_| input.u16()).collect();
    let raw_body = input.0;

    let kind = KINDS[usize::from((b0 & 3) | (b6 & 3) << 2) % KINDS.len()];
    let (stream, asked_usage, inject, capture, routed, complete) = (
        bit(b0, 2),
        bit(b0, 3),
        bit(b0, 4),
        bit(b0, 5),
        bit(b0, 6),
        bit(b0, 7),
    );
    let status = STATUSES[usize::from(b1 & 7)];
    let content_type = CONTENT_TYPES[usize::from((b1 >> 3 & 7) | (b6 >> 2 & 1) << 3)];
    let (upstream_failed, empty_last) = (bit(b1, 6), bit(b1, 7));
    let encoding = ENCODINGS[usize::from(b2 & 7)];
    let how = b2 >> 3 & 3;
    let level = if bit(b2, 5) {
        Compression::fast()
    } else {
        Compression::default()
    };
    let limits = Limits {
        max_response_buffer_bytes: LIMIT_CHOICES[usize::from(b3 & 3)],
        max_sse_line_bytes: LIMIT_CHOICES[usize::from(b3 >> 2 & 3)],
        max_decoded_response_bytes: DECODE_CAPS[usize::from(b4 >> 4 & 7)],
        ..Limits::default()
    };
    let capture_limit = CAPTURE_LIMITS[usize::from(b3 >> 4 & 3)];

    let body = if bit(b2, 6) {
        expand(raw_body)
    } else {
        raw_body.to_vec()
    };
    // What the upstream sends: identity, or compressed (gzip/zlib matching the header, or the
    // other one, or raw deflate), or the bytes as they are (corrupt), with an optional bomb.
    let enc = encoding.map(<[u8]>::trim_ascii).unwrap_or_default();
    let gzip = enc.eq_ignore_ascii_case(b"gzip") || enc.eq_ignore_ascii_case(b"x-gzip");
    let deflate = enc.eq_ignore_ascii_case(b"deflate");
    let encoded = gzip || deflate;
    let bomb = if encoded {
        BOMBS[usize::from(b4 & 15)]
    } else {
        0
    };
    // A well-formed stream for the header: gzip for gzip, zlib or raw deflate for deflate (the
    // other mismatches are corrupt). It decodes to exactly the body with the bomb spliced in.
    let well_formed = encoded && (how == 0 || (how == 3 && deflate));
    let decoded_len = body.len().saturating_add(bomb);
    let at = body.len() * usize::from(b5) / 255;
    let (prefix, suffix) = body.split_at(at);
    let wire: Vec<u8> = match (encoded, how) {
        (false, _) | (true, 2) => body.clone(),
        (true, 0 | 1) if gzip == (how == 0) => encode(Format::Gzip, level, prefix, bomb, suffix),
        (true, 0 | 1) => encode(Format::Zlib, level, prefix, bomb, suffix),
        (true, _) => encode(Format::RawDeflate, level, prefix, bomb, suffix),
    };
    let mut cuts: Vec<usize> = cut_points
        .iter()
        .map(|c| usize::from(*c) * wire.len() / 65535)
        .collect();
    cuts.sort_unstable();
    let mut chunks: Vec<&[u8]> = Vec::with_capacity(cuts.len() + 2);
    let mut start = 0;
    for c in cuts {
        chunks.push(&wire[start..c]);
        start = c;
    }
    chunks.push(&wire[start..]);
    if empty_last {
        chunks.push(&[]);
    }
    let largest_chunk = chunks.iter().map(|c| c.len()).max().unwrap_or(0);

    // A max_tokens of 0 is refused since issue 18 (vLLM reads it as no cap).
    let max_tokens = output_reserved.max(1);
    let facts = request_facts(kind, stream, asked_usage, max_tokens);
    let mut client: Vec<u8> = Vec::with_capacity(wire.len());
    let is_sse = content_type.is_some_and(|ct| {
        ct.get(..17)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"))
    });
    let ok = (200..300).contains(&status);
    let is_event_stream = content_type.is_some_and(|ct| {
        const EVENT_STREAM: &[u8] = b"application/vnd.amazon.eventstream";
        ct.trim_ascii_start()
            .get(..EVENT_STREAM.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(EVENT_STREAM))
    });
    // Which reader the exchange reads a 2xx body with: a streaming one (SSE, the Gemini stream
    // reader, the Bedrock event-stream reader) or the JSON tail.
    let streamed = (kind == ApiKind::GenerateContent && (is_sse || facts.stream))
        || (matches!(kind, ApiKind::Converse | ApiKind::Invoke) && is_event_stream)
        || is_sse;
    let served = ("m-upstream".to_string(), "route-a".to_string());
    let tenant = "tenant".to_string();

    // ---- measured: everything the exchange allocates from here on ----
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    let mut x = Exchange::new(kind, tenant, facts, limits);
    x.set_reservation(u64::from(prompt_reserved), u64::from(output_reserved));
    if routed {
        x.set_served(served.0, served.1);
    }
    if inject {
        x.set_include_usage_injected();
    }
    if capture {
        x.capture_for_cache(capture_limit);
    }
    x.on_response_headers(status, content_type, encoding);
    let header_usage = (kind.family() == tollgate::api::Family::Aws
        && (bit(b6, 3) || bit(b6, 4)))
    .then(|| (u64::from(bit(b6, 3)) * 21, u64::from(bit(b6, 4)) * 13));
    if kind.family() == tollgate::api::Family::Aws {
        x.set_header_usage(bit(b6, 3).then_some(21), bit(b6, 4).then_some(13));
    }
    let rewrites = x.rewrites_response_body();
    let held_limit = Exchange::held_bytes_bound(&limits, if capture { capture_limit } else { 0 });
    let limit = bound(
        &limits,
        ok && !streamed,
        ok && streamed,
        rewrites,
        capture.then_some(capture_limit),
        encoded,
        largest_chunk,
    );
    let max_held = std::cell::Cell::new(0);
    let check = |x: &Exchange, step: &str| {
        let held = x.held_bytes();
        max_held.set(max_held.get().max(held));
        assert!(
            held <= held_limit,
            "held_bytes {held} B > held_bytes_bound {held_limit} B at {step} (encoding {:?}, \
             wire {} B, bomb {bomb} B, limits {limits:?}, capture {capture}/{capture_limit})",
            encoding.map(String::from_utf8_lossy),
            wire.len(),
        );
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
        if bound_enforced() && peak > limit {
            panic!(
                "memory bound: peak {peak} B > bound {limit} B at {step} \
                 (encoding {:?}, wire {} B, bomb {bomb} B of zeros, largest chunk \
                 {largest_chunk} B, {} chunks, status {status}, sse {is_sse}, limits {limits:?}, \
                 capture {capture}/{capture_limit})",
                encoding.map(String::from_utf8_lossy),
                wire.len(),
                chunks.len(),
            );
        }
    };
    check(&x, "on_response_headers");
    let wants = x.wants_response_body();
    let mut replaced_any = false;
    for (i, chunk) in chunks.iter().enumerate() {
        let last = complete && i + 1 == chunks.len();
        if !wants {
            client.extend_from_slice(chunk);
            continue;
        }
        match x.on_response_chunk(chunk, last) {
            Some(out) => {
                replaced_any = true;
                client.extend_from_slice(&out);
            }
            None => client.extend_from_slice(chunk),
        }
        check(&x, &format!("chunk {i} ({} B)", chunk.len()));
    }
    if complete {
        x.on_response_complete();
    }
    let (usage, source) = x.finish(upstream_failed);
    check(&x, "finish");
    let record = x.record();
    check(&x, "record");
    let captured = x.take_capture();
    check(&x, "take_capture");
    // ---- end of the measured part ----
    if report() {
        eprintln!(
            "exchange: peak {} B (bound {limit} B), held ≤ {} B (bound {held_limit} B); \
             {} B on the wire in {} chunks, {decoded_len} B decoded if well-formed \
             ({well_formed}), cap {} B, anomaly {:?}, {source:?}",
            PEAK.load(Ordering::Relaxed).saturating_sub(baseline),
            max_held.get(),
            wire.len(),
            chunks.len(),
            limits.max_decoded_response_bytes,
            x.usage_anomaly(),
        );
    }

    assert_eq!(
        x.finish(!upstream_failed),
        (usage, source),
        "finish is idempotent"
    );
    if source == UsageSource::Refunded {
        assert_eq!(usage, Default::default(), "a refund charges nothing");
    }
    let field = |name: &str| {
        record
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    // Decoding: every decoded body goes through the decoder (the reader exists for a 2xx).
    let anomaly = x.usage_anomaly();
    let decode_cap = usize::try_from(limits.max_decoded_response_bytes).unwrap_or(usize::MAX);
    if ok && well_formed && decoded_len > decode_cap {
        // Past the cap, decoding stopped: flagged, and a JSON body's usage (at its end, past the
        // cap) is never read: the fallbacks charge (Bedrock's token-count headers among them:
        // they are not read from the body).
        assert_eq!(
            anomaly,
            Some(UsageAnomaly::DecodeLimit),
            "{decoded_len} B decoded against a cap of {decode_cap} B, not flagged"
        );
        if !streamed {
            let from_headers = header_usage.is_some_and(|(i, o)| {
                source == UsageSource::Reported && (usage.input, usage.output) == (i, o)
            });
            assert!(
                from_headers
                    || matches!(source, UsageSource::Reservation | UsageSource::Refunded),
                "usage read past the decode cap: {source:?} {usage:?}"
            );
        }
    } else if ok && well_formed {
        assert!(
            !matches!(
                anomaly,
                Some(UsageAnomaly::DecodeLimit | UsageAnomaly::DecodeError)
            ),
            "a well-formed {decoded_len} B body (cap {decode_cap} B) flagged {anomaly:?}"
        );
    } else if !encoded || !ok {
        assert!(
            !matches!(anomaly, Some(UsageAnomaly::DecodeLimit)),
            "nothing was decoded, yet {anomaly:?}"
        );
    }
    // 12 ledger fields, and `tollgate.usage_anomaly` when there is one.
    assert_eq!(record.len(), 12 + usize::from(anomaly.is_some()));
    assert_eq!(
        field("tollgate.usage_anomaly").as_deref(),
        anomaly.map(UsageAnomaly::as_str)
    );
    assert_eq!(
        field("tollgate.usage_source").as_deref(),
        Some(source.as_str())
    );
    assert_eq!(
        field("tollgate.input_tokens"),
        Some(usage.input.to_string())
    );
    assert_eq!(
        field("tollgate.output_tokens"),
        Some(usage.output.to_string())
    );
    assert_eq!(
        field("tollgate.served_model").as_deref(),
        Some(if routed { "m-upstream" } else { "m" })
    );

    if !rewrites {
        assert!(
            !replaced_any,
            "a chunk was replaced, yet the exchange does not rewrite"
        );
        assert_eq!(
            client, wire,
            "the client's bytes differ from the upstream's"
        );
    } else if complete {
        assert!(
            !encoded && is_sse && ok && inject,
            "stripping outside its case"
        );
        let mut s = UsageChunkStripper::new(STRIP_HOLD_BYTES);
        let mut want = s.push(&wire).into_owned();
        want.extend_from_slice(&s.finish());
        assert_eq!(
            client, want,
            "the client's bytes are not the upstream's minus the usage chunk"
        );
    }
    if let Some((st, ct, kept)) = captured {
        assert!(
            complete && ok && capture && !encoded,
            "capture returned outside its case"
        );
        assert_eq!(st, status);
        assert_eq!(Some(ct.as_bytes()), content_type, "captured content type");
        assert!(kept.len() <= capture_limit, "capture over its limit");
        assert_eq!(
            kept, client,
            "the capture differs from what the client received"
        );
    }
});
