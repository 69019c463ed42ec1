//! The AWS event-stream decoder (`tollgate::api::eventstream::Decoder`) and the Bedrock stream
//! reader over it (`tollgate::api::bedrock_stream::BedrockStreamReader`) on arbitrary input,
//! split arbitrarily: never panics, gives the same result whatever the chunking (one shot, the
//! fuzzer's cuts, one byte at a time), and stays within its memory bound: the decoder's
//! `held_bytes()` never passes `max_message_bytes`, and a counting global allocator's peak during
//! a run, above what was live before it, stays under `bound()`.
//!
//! Input layout: byte 0 = `max_message_bytes` (bits 0-1, see `MAX_MESSAGE`), body mode (bit 2:
//! 0 = raw bytes, 1 = frames built from `TEMPLATES` with real CRCs, each then maybe corrupted,
//! which reaches past the CRC checks without a corpus), operation (bit 3: Converse or Invoke);
//! byte 1 = number of cuts (mod 32); then that many cut bytes (position = byte/255 of the body);
//! the rest is the body (mode 1: byte pairs = template, corruption).
//!
//! `TOLLGATE_FUZZ_BOUND=off` in the environment skips the allocator-peak assertion.
#![no_main]

use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use flate2::Crc;
#[path = "common/cuts.rs"]
mod cuts;
use libfuzzer_sys::fuzz_target;
use tollgate::api::bedrock_stream::{BedrockStreamReader, StreamOperation};
use tollgate::api::eventstream::{DecodeError, Decoder, Limits, MessageType};

#[path = "common/counting.rs"]
mod counting;
use counting::{LIVE, PEAK};

fn bound_enforced() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TOLLGATE_FUZZ_BOUND").as_deref() != Ok("off"))
}

// ---- the bound -----------------------------------------------------------------------------

const MAX_MESSAGE: [usize; 4] = [16, 300, 4096, 1 << 20];
/// The Anthropic reader's line bound given to the Bedrock reader.
const MAX_LINE: usize = 4096;
/// Fixed slack: the reader structs, a failure name, serde's small scratch.
const SLACK: usize = 16 * 1024;

/// The most heap a run may use above what was live before it:
///
/// ```text
/// decoder   1 × max_message   its one message, reserved exactly (never doubled)
/// chunk     1 × max_message   a `{"bytes": …}` string with JSON escapes is unescaped (owned)
/// scratch   1 × max_message   the decoded base64 (¾ of it), reserved exactly
/// anthropic 9 × max_line      the SSE reader's line, data and event type (each ≤ max_line,
///                             grown by doubling: < 3× at the peak)
/// ```
fn bound(max_message: usize) -> usize {
    3 * max_message + 9 * MAX_LINE + SLACK
}

/// Runs `f`, asserting the allocation peak above the live heap before it.
fn measured<T>(max_message: usize, f: impl FnOnce() -> T) -> T {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    if bound_enforced() {
        assert!(
            peak <= bound(max_message),
            "memory bound: peak {peak} > {} (max_message {max_message})",
            bound(max_message)
        );
    }
    out
}

// ---- frames ----------------------------------------------------------------------------------


/// (`:message-type`, `:event-type` or `:exception-type`, payload).
const TEMPLATES: &[(&str, &str, &str)] = &[
    ("event", "messageStart", r#"{"role":"assistant","p":"ab"}"#),
    ("event", "contentBlockDelta", r#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#),
    ("event", "messageStop", r#"{"stopReason":"end_turn"}"#),
    ("event", "metadata", r#"{"usage":{"inputTokens":25,"outputTokens":12,"cacheReadInputTokens":3000,"cacheWriteInputTokens":1200},"metrics":{"latencyMs":8}}"#),
    ("event", "metadata", r#"{"usage":{"inputTokens":-1}}"#),
    ("event", "metadata", r#"{"usage":{"input_tokens":1}}"#),
    ("event", "chunk", concat!(r#"{"bytes":""#, "eyJ0eXBlIjoibWVzc2FnZV9zdGFydCIsIm1lc3NhZ2UiOnsidXNhZ2UiOnsiaW5wdXRfdG9rZW5zIjoyNSwiY2FjaGVfcmVhZF9pbnB1dF90b2tlbnMiOjMsIm91dHB1dF90b2tlbnMiOjF9fX0=", r#"","p":"abc"}"#)),
    ("event", "chunk", concat!(r#"{"bytes":""#, "eyJ0eXBlIjoiY29udGVudF9ibG9ja19kZWx0YSIsImluZGV4IjowLCJkZWx0YSI6eyJ0eXBlIjoidGV4dF9kZWx0YSIsInRleHQiOiJIaSJ9fQ==", r#""}"#)),
    ("event", "chunk", concat!(r#"{"bytes":""#, "eyJ0eXBlIjoibWVzc2FnZV9kZWx0YSIsInVzYWdlIjp7Im91dHB1dF90b2tlbnMiOjE1fX0=", r#""}"#)),
    ("event", "chunk", concat!(r#"{"bytes":""#, "eyJ0eXBlIjoibWVzc2FnZV9zdG9wIiwiYW1hem9uLWJlZHJvY2staW52b2NhdGlvbk1ldHJpY3MiOnsiaW5wdXRUb2tlbkNvdW50Ijo0MCwib3V0cHV0VG9rZW5Db3VudCI6M319", r#""}"#)),
    ("event", "chunk", r#"{"bytes":"!!not base64"}"#),
    ("event", "chunk", r#"{"bytes":"eyJ0eXBlIjoibWVzc2FnZV9kZWx0YSIsInVzYWdlIjp7Im91dHB1dF90b2tlbnMiOjE1fX0\u003d"}"#),
    ("exception", "throttlingException", r#"{"message":"Too many requests"}"#),
    ("exception", "modelStreamErrorException", r#"{"message":"boom"}"#),
    ("error", "InternalFailure", ""),
    ("surprise", "x", "{}"),
];

fn header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(7);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

fn crc(bytes: &[u8]) -> u32 {
    let mut c = Crc::new();
    c.update(bytes);
    c.sum()
}

/// One frame from a template, then a corruption picked by `how` (mostly none).
fn frame(template: u8, how: u8, out: &mut Vec<u8>) {
    let (kind, name, payload) = TEMPLATES[usize::from(template) % TEMPLATES.len()];
    let mut headers = Vec::new();
    let name_header = match kind {
        "exception" => ":exception-type",
        "error" => ":error-code",
        _ => ":event-type",
    };
    header(&mut headers, name_header, name);
    header(&mut headers, ":content-type", "application/json");
    header(&mut headers, ":message-type", kind);
    match how {
        // A header of every other type, an unknown type, a repeated known header.
        200..=209 => {
            headers.extend_from_slice(&[1, b'x', how - 200]);
            headers.extend(std::iter::repeat_n(0x11, usize::from(how - 200) * 2));
        }
        210 => headers.extend_from_slice(&[1, b'x', 10]),
        211 => header(&mut headers, ":message-type", "event"),
        _ => {}
    }
    let start = out.len();
    let total = (16 + headers.len() + payload.len()) as u32;
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc(&out[start..]).to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload.as_bytes());
    out.extend_from_slice(&crc(&out[start..]).to_be_bytes());
    let end = out.len();
    let set_prelude = |out: &mut Vec<u8>, total: u32, headers: u32| {
        out[start..start + 4].copy_from_slice(&total.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&headers.to_be_bytes());
        let c = crc(&out[start..start + 8]);
        out[start + 8..start + 12].copy_from_slice(&c.to_be_bytes());
    };
    match how {
        212..=219 => out[start + 8 + usize::from(how - 212) % 4] ^= 1 << (how % 8),
        220..=227 => out[end - 4 + usize::from(how - 220) % 4] ^= 1 << (how % 8),
        228..=235 => {
            let at = start + 12 + usize::from(how) * 7 % (end - start - 16).max(1);
            out[at] ^= 1 << (how % 8);
        }
        236 => set_prelude(out, u32::MAX, 0),
        237 => set_prelude(out, 0x0100_0001, 0),
        238 => set_prelude(out, total, total),
        239 => set_prelude(out, 10, 0),
        240 => out.truncate(start + (end - start) / 2),
        _ => {}
    }
}

// ---- runs ------------------------------------------------------------------------------------

/// Frames seen (count and a digest of their type, event type and payload: no allocation, so
/// the peak measured is the decoder's), and how decoding ended.
type DecodeOutcome = ((usize, u32), Result<(), DecodeError>);

fn decode(limits: Limits, chunks: &[&[u8]]) -> DecodeOutcome {
    let mut d = Decoder::new(limits);
    let mut frames = (0usize, Crc::new());
    let mut result = Ok(());
    for chunk in chunks {
        let mut input = *chunk;
        loop {
            match d.decode(&mut input) {
                Ok(Some(m)) => {
                    let kind = match m.message_type() {
                        MessageType::Event => 0u8,
                        MessageType::Exception => 1,
                        MessageType::Error => 2,
                        MessageType::Other => 3,
                    };
                    frames.0 += 1;
                    frames.1.update(&[kind]);
                    frames.1.update(m.event_type().unwrap_or_default());
                    frames.1.update(&(m.payload().len() as u32).to_be_bytes());
                    frames.1.update(m.payload());
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    assert!(input.is_empty(), "an error drops its input");
                    break;
                }
            }
        }
        assert!(d.held_bytes() <= limits.max_message_bytes.max(16), "held_bytes bound");
    }
    let finish = d.finish();
    if result.is_ok() {
        result = finish;
    } else {
        assert_eq!(finish, result, "errors are final");
    }
    ((frames.0, frames.1.sum()), result)
}

fn read(op: StreamOperation, limits: Limits, chunks: &[&[u8]]) -> String {
    let mut r = BedrockStreamReader::new(op, limits, MAX_LINE);
    for chunk in chunks {
        r.feed(chunk);
    }
    r.finish();
    format!(
        "{:?} {} {} {:?} {:?} {} {} {}",
        r.usage(),
        r.completed(),
        r.observed_output(),
        r.failure(),
        r.decode_error(),
        r.invalid_usage(),
        r.foreign_usage(),
        r.bad_chunk()
    )
}

fuzz_target!(|data: &[u8]| {
    let [mode, ncuts, rest @ ..] = data else {
        return;
    };
    let max_message = MAX_MESSAGE[usize::from(mode & 3)];
    let limits = Limits {
        max_message_bytes: max_message,
        max_header_bytes: if mode & 16 == 0 { 128 * 1024 } else { 40 },
    };
    let op = if mode & 8 == 0 {
        StreamOperation::ConverseStream
    } else {
        StreamOperation::InvokeWithResponseStream
    };
    let ncuts = usize::from(ncuts % 32).min(rest.len());
    let (cut_bytes, body) = rest.split_at(ncuts);
    let body: Vec<u8> = if mode & 4 == 0 {
        body.to_vec()
    } else {
        let mut out = Vec::new();
        for pair in body.chunks(2) {
            frame(pair[0], pair.get(1).copied().unwrap_or(0), &mut out);
        }
        out
    };
    let chunks = cuts::pieces(&body, cut_bytes);
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();

    let whole = measured(max_message, || decode(limits, &[&body]));
    assert_eq!(whole, measured(max_message, || decode(limits, &chunks)), "chunking changed the frames");
    assert_eq!(whole, measured(max_message, || decode(limits, &bytewise)), "1-byte chunks changed the frames");

    let whole = measured(max_message, || read(op, limits, &[&body]));
    assert_eq!(whole, measured(max_message, || read(op, limits, &chunks)), "chunking changed the reading");
    assert_eq!(whole, measured(max_message, || read(op, limits, &bytewise)), "1-byte chunks changed the reading");
});
