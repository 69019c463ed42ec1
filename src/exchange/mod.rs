//! One LLM request/response exchange, host-free: the request facts, the response as it streams
//! past (decompressed when the upstream ignored our identity request), the usage found in it, the
//! usage the request is charged (with the documented fallbacks) and the per-request record
//! written to filter state for the access log.
//!
//! # Memory
//!
//! Whatever the upstream sends, the bytes an exchange holds ([`Exchange::held_bytes`]) stay
//! within a bound set by [`Limits`] and the cache's entry cap, never by the response:
//!
//! * JSON: a copy of the body up to `max_response_buffer_bytes`, then only a tail of at most
//!   `2 × min(64 KiB, max_response_buffer_bytes)` bytes;
//! * SSE: the unfinished line, the event type and the event data, each at most
//!   `max_sse_line_bytes`;
//! * the usage-chunk stripper's held-back event: at most 64 KiB + 1;
//! * a compressed response: a fixed 32 KiB output buffer, the deflate state (its 32 KiB window;
//!   counted as [`INFLATE_STATE_BYTES`]) and a gzip header of at most 64 KiB while it arrives.
//!   Decoded bytes go to the JSON or SSE reader piece by piece, and decoding stops for good once
//!   `max_decoded_response_bytes` were produced (a bomb costs that much work, not its ratio);
//! * the cache's copy: at most the `limit` given to [`Exchange::capture_for_cache`].
//!
//! So `held_bytes() ≤ max(max_response_buffer_bytes, 128 KiB) + 3 × max_sse_line_bytes +
//! 64 KiB + 1 + 32 KiB + INFLATE_STATE_BYTES + 64 KiB + capture limit` (only one of the JSON and
//! SSE readers exists). The bytes of the chunk being processed are the caller's. The figure
//! counts bytes held, not allocator slack: a `Vec` may reserve up to twice what it holds.

//!
//! # Where things live
//!
//! This file holds [`Exchange`] itself; `decode` the bounded gzip/deflate decoder, `tail` the
//! JSON tail buffer, `bounds` the usage bounds and anomalies, `record` the access-log record.

mod bounds;
mod decode;
mod record;
mod stream;
mod tail;
#[cfg(test)]
mod testing;

pub use bounds::{UsageAnomaly, UsageBounds};
pub use decode::INFLATE_STATE_BYTES;
pub use record::record_fields;

use crate::api::bedrock_stream::BedrockStreamReader;
use crate::api::dialect::{Reader, ResponseBody};
use crate::api::eventstream;
use crate::api::gemini::GeminiStreamReader;
use crate::api::request::RequestFacts;
use crate::api::sse::SseUsageReader;
use crate::api::strip::UsageChunkStripper;
use crate::api::usage::{Reading, read_cut_json_usage, read_json_usage};
use crate::api::{ApiKind, Usage};
use crate::config::Limits;
use decode::{Decoder, GZIP_HEADER_MAX, INFLATE_OUT_BYTES, Step};
use stream::StreamReader;
use tail::{JSON_TAIL_BYTES, TailBuffer};

/// How much of one SSE event the usage-chunk stripper may hold back (usage chunks are < 1 KiB).
const STRIP_HOLD_BYTES: usize = 64 * 1024;

/// Where the charged usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream reported it (JSON `usage`, final SSE event).
    Reported,
    /// No usage arrived; output counted from streamed deltas (input from the prompt estimate).
    Observed,
    /// No usage and no output, but the upstream may have done the work (2xx without usage, or
    /// the client left before an answer): the reservation is charged.
    Reservation,
    /// An upstream error (non-2xx status, or a reset before any output): nothing is charged.
    Refunded,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Observed => "observed",
            UsageSource::Reservation => "reservation",
            UsageSource::Refunded => "refunded",
        }
    }
}

/// The response cache's copy of the client's bytes.
#[derive(Debug)]
enum Capture {
    Off,
    On {
        bytes: Vec<u8>,
        limit: usize,
        content_type: String,
    },
    /// Over the entry cap, an error, or an encoded body: not stored (still delivered intact).
    Dropped,
}

enum BodyReader {
    Json(TailBuffer),
    Sse(Box<SseUsageReader>),
    /// Gemini / Vertex `streamGenerateContent`: SSE or one streamed JSON array.
    Gemini(Box<GeminiStreamReader>),
    /// Bedrock `converse-stream` / `invoke-with-response-stream`: an AWS event stream.
    Bedrock(Box<BedrockStreamReader>),
    /// Error statuses and bodies we cannot read (unknown encodings).
    Skip,
}

impl BodyReader {
    /// The streamed answer's reader, whichever wire format it reads.
    fn stream(&self) -> Option<&dyn StreamReader> {
        match self {
            BodyReader::Sse(reader) => Some(reader.as_ref()),
            BodyReader::Gemini(reader) => Some(reader.as_ref()),
            BodyReader::Bedrock(reader) => Some(reader.as_ref()),
            BodyReader::Json(_) | BodyReader::Skip => None,
        }
    }

    fn stream_mut(&mut self) -> Option<&mut dyn StreamReader> {
        match self {
            BodyReader::Sse(reader) => Some(reader.as_mut()),
            BodyReader::Gemini(reader) => Some(reader.as_mut()),
            BodyReader::Bedrock(reader) => Some(reader.as_mut()),
            BodyReader::Json(_) | BodyReader::Skip => None,
        }
    }
}

/// State of one exchange from the moment its request body was read.
pub struct Exchange {
    pub kind: ApiKind,
    pub tenant: String,
    pub facts: RequestFacts,
    limits: Limits,
    status: u32,
    decoder: Decoder,
    body: BodyReader,
    /// The response body reached its end (not cut by a reset or a client abort).
    complete: bool,
    /// What was reserved for this request (charged when nothing better is known).
    reservation: Usage,
    /// Removes the usage chunk Tollgate asked for from what the client receives.
    stripper: Option<UsageChunkStripper>,
    /// Tollgate injected `stream_options.include_usage`.
    include_usage_injected: bool,
    /// The model that served the request and its route, when routing resolved one.
    served: Option<(String, String)>,
    /// A copy of what the client receives, for the response cache (bounded).
    capture: Capture,
    finished: Option<(Usage, UsageSource)>,
    /// Bedrock's `x-amzn-bedrock-{input,output}-token-count` response headers: the usage of a
    /// non-streamed answer whose body reported none.
    header_usage: Option<Usage>,
    /// The first anomaly met (decoding, usage shape, bounds).
    anomaly: Option<UsageAnomaly>,
}

impl Exchange {
    pub fn new(kind: ApiKind, tenant: String, facts: RequestFacts, limits: Limits) -> Exchange {
        Exchange {
            kind,
            tenant,
            facts,
            limits,
            status: 0,
            decoder: Decoder::Identity,
            body: BodyReader::Skip,
            complete: false,
            reservation: Usage::default(),
            stripper: None,
            include_usage_injected: false,
            served: None,
            capture: Capture::Off,
            finished: None,
            header_usage: None,
            anomaly: None,
        }
    }

    /// Every byte this exchange holds between calls: decoder state, JSON tail, SSE buffers,
    /// the stripper's held-back event and the cache copy. Bounded by the module's figure (see
    /// "Memory"), whatever the response.
    pub fn held_bytes(&self) -> usize {
        let decoder = match &self.decoder {
            Decoder::Inflate(inflater) => inflater.held_bytes(),
            Decoder::Identity | Decoder::Broken | Decoder::Capped => 0,
        };
        let body = match &self.body {
            BodyReader::Json(buf) => buf.bytes.len(),
            reader => reader.stream().map_or(0, StreamReader::held_bytes),
        };
        let stripper = self
            .stripper
            .as_ref()
            .map_or(0, UsageChunkStripper::held_bytes);
        let capture = match &self.capture {
            Capture::On { bytes, .. } => bytes.len(),
            Capture::Off | Capture::Dropped => 0,
        };
        decoder
            .saturating_add(body)
            .saturating_add(stripper)
            .saturating_add(capture)
    }

    /// The upper bound of [`Self::held_bytes`] for `limits` and a cache copy of at most
    /// `capture_limit` bytes (see the module's "Memory").
    pub fn held_bytes_bound(limits: &Limits, capture_limit: usize) -> usize {
        let as_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let json =
            as_usize(limits.max_response_buffer_bytes).max(JSON_TAIL_BYTES.saturating_mul(2));
        // An SSE or Gemini reader holds at most 3 lines; a Bedrock one its message (one line),
        // the chunk it decodes (¾ of it) and an Anthropic reader's 3 lines: under 5 lines.
        let sse = as_usize(limits.max_sse_line_bytes).saturating_mul(5);
        json.max(sse)
            .saturating_add(STRIP_HOLD_BYTES)
            .saturating_add(1)
            .saturating_add(INFLATE_OUT_BYTES)
            .saturating_add(INFLATE_STATE_BYTES)
            .saturating_add(GZIP_HEADER_MAX)
            .saturating_add(capture_limit)
    }

    /// Why the charged usage is not plainly the reported one, if it is not (decided by
    /// [`Self::finish`]; decoding anomalies are known as soon as they happen).
    pub fn usage_anomaly(&self) -> Option<UsageAnomaly> {
        self.anomaly
    }

    fn note(&mut self, anomaly: UsageAnomaly) {
        self.anomaly.get_or_insert(anomaly);
    }

    /// What was reserved (charged when neither usage nor output is known).
    pub fn set_reservation(&mut self, prompt_tokens: u64, output_tokens: u64) {
        self.reservation = Usage {
            input: prompt_tokens,
            output: output_tokens,
            ..Usage::default()
        };
    }

    /// Routing resolved the request to `model` on `route`.
    pub fn set_served(&mut self, model: String, route: String) {
        self.served = Some((model, route));
    }

    /// The served model: the routed one, else the requested one.
    pub fn served_model(&self) -> &str {
        self.served.as_ref().map_or(&self.facts.model, |(m, _)| m)
    }

    /// Bedrock's token-count response headers (either may be missing), the fallback of a body
    /// without usage. Their input leaves cache tokens out, as `amazon-bedrock-invocationMetrics`.
    pub fn set_header_usage(&mut self, input: Option<u64>, output: Option<u64>) {
        self.header_usage = (input.is_some() || output.is_some()).then(|| Usage {
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            ..Usage::default()
        });
    }

    /// Tollgate asked the upstream for `include_usage`: the client must not see that chunk.
    pub fn set_include_usage_injected(&mut self) {
        self.include_usage_injected = true;
    }

    /// Response headers: status, `content-type`, `content-encoding`.
    pub fn on_response_headers(
        &mut self,
        status: u32,
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
    ) {
        self.status = status;
        if let Capture::On {
            content_type: kept, ..
        } = &mut self.capture
        {
            let encoded = content_encoding.is_some_and(|e| {
                !e.trim_ascii().is_empty() && !e.trim_ascii().eq_ignore_ascii_case(b"identity")
            });
            match content_type.map(|ct| String::from_utf8_lossy(ct).into_owned()) {
                Some(ct) if (200..300).contains(&status) && !encoded => *kept = ct,
                _ => self.capture = Capture::Dropped,
            }
        }
        let is_sse = content_type.is_some_and(|ct| {
            ct.len() >= 17
                && ct
                    .get(..17)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"))
        });
        self.decoder =
            Decoder::for_encoding(content_encoding, self.limits.max_decoded_response_bytes);
        self.stripper = (self.include_usage_injected
            && is_sse
            && (200..300).contains(&status)
            && matches!(self.decoder, Decoder::Identity))
        .then(|| UsageChunkStripper::new(STRIP_HOLD_BYTES));
        const EVENT_STREAM: &[u8] = b"application/vnd.amazon.eventstream";
        let is_event_stream = content_type.is_some_and(|ct| {
            ct.trim_ascii_start()
                .get(..EVENT_STREAM.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(EVENT_STREAM))
        });
        let line_cap = usize::try_from(self.limits.max_sse_line_bytes).unwrap_or(usize::MAX);
        if !(200..300).contains(&status) {
            self.body = BodyReader::Skip;
            return;
        }
        self.body = match self.kind.dialect().reader(ResponseBody {
            sse: is_sse,
            event_stream: is_event_stream,
            stream_asked: self.facts.stream,
        }) {
            Reader::Gemini(format) => {
                BodyReader::Gemini(Box::new(GeminiStreamReader::new(format, line_cap)))
            }
            Reader::EventStream(operation) => {
                let limits = eventstream::Limits {
                    max_message_bytes: line_cap,
                    max_header_bytes: eventstream::DEFAULT_MAX_HEADER_BYTES.min(line_cap),
                };
                BodyReader::Bedrock(Box::new(BedrockStreamReader::new(
                    operation, limits, line_cap,
                )))
            }
            Reader::Sse(grammar) => {
                BodyReader::Sse(Box::new(SseUsageReader::with_grammar(grammar, line_cap)))
            }
            Reader::Json => BodyReader::Json(TailBuffer::new(
                usize::try_from(self.limits.max_response_buffer_bytes).unwrap_or(usize::MAX),
            )),
        };
    }

    /// The client's body will differ from the upstream's (the injected usage chunk is cut), so
    /// a `content-length` from the upstream would be wrong.
    pub fn rewrites_response_body(&self) -> bool {
        self.stripper.is_some()
    }

    /// Whether response body chunks are worth reading at all.
    pub fn wants_response_body(&self) -> bool {
        self.stripper.is_some()
            || matches!(self.capture, Capture::On { .. })
            || (!matches!(self.body, BodyReader::Skip)
                && !matches!(self.decoder, Decoder::Broken | Decoder::Capped))
    }

    /// One response body chunk; returns the bytes to send instead when the client's stream must
    /// differ from the upstream's (the injected usage chunk removed).
    pub fn on_response_chunk(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        self.on_response_body(chunk);
        let replaced = match self.stripper.as_mut() {
            None => None,
            Some(stripper) => {
                let out = stripper.push(chunk);
                let unchanged =
                    matches!(out, std::borrow::Cow::Borrowed(b) if b.len() == chunk.len());
                if unchanged && !end_of_stream {
                    None
                } else {
                    let mut out = out.into_owned();
                    if end_of_stream {
                        out.extend_from_slice(&stripper.finish());
                    }
                    Some(out)
                }
            }
        };
        self.capture_bytes(replaced.as_deref().unwrap_or(chunk));
        replaced
    }

    /// Keep a copy of the response for the cache, up to `limit` bytes.
    pub fn capture_for_cache(&mut self, limit: usize) {
        self.capture = Capture::On {
            bytes: Vec::new(),
            limit,
            content_type: String::new(),
        };
    }

    fn capture_bytes(&mut self, bytes: &[u8]) {
        if let Capture::On {
            bytes: kept, limit, ..
        } = &mut self.capture
        {
            if kept.len().saturating_add(bytes.len()) > *limit {
                self.capture = Capture::Dropped;
            } else {
                kept.extend_from_slice(bytes);
            }
        }
    }

    /// The whole response as the client received it, when it may be cached: 2xx, complete,
    /// unencoded and within the entry cap. `(status, content type, body)`.
    pub fn take_capture(&mut self) -> Option<(u32, String, Vec<u8>)> {
        if !self.complete || !(200..300).contains(&self.status) {
            return None;
        }
        match std::mem::replace(&mut self.capture, Capture::Dropped) {
            Capture::On {
                bytes,
                content_type,
                ..
            } => Some((self.status, content_type, bytes)),
            _ => None,
        }
    }

    /// The response ended normally (`end_of_stream`), so a JSON body is whole.
    pub fn on_response_complete(&mut self) {
        self.complete = true;
    }

    /// One response body chunk as it passes to the client. A compressed chunk is decoded into
    /// a fixed buffer and read piece by piece, up to `max_decoded_response_bytes` in all.
    pub fn on_response_body(&mut self, chunk: &[u8]) {
        if matches!(self.body, BodyReader::Skip) {
            return;
        }
        let body = &mut self.body;
        let mut read = |bytes: &[u8]| match &mut *body {
            BodyReader::Json(buf) => buf.push(bytes),
            reader => {
                if let Some(reader) = reader.stream_mut() {
                    reader.feed(bytes);
                }
            }
        };
        let step = match &mut self.decoder {
            Decoder::Identity => {
                read(chunk);
                return;
            }
            Decoder::Inflate(inflater) => inflater.feed(chunk, &mut read),
            Decoder::Broken | Decoder::Capped => return,
        };
        match step {
            Step::More | Step::End => {}
            Step::Capped => {
                self.decoder = Decoder::Capped;
                self.note(UsageAnomaly::DecodeLimit);
            }
            Step::Broken => {
                self.decoder = Decoder::Broken;
                self.note(UsageAnomaly::DecodeError);
            }
        }
    }

    /// End of the response (or of the exchange, for aborted streams): the usage this request is
    /// charged. Idempotent: the first call decides. `upstream_failed`: the upstream reset or
    /// could not be reached (Envoy's response details say so).
    ///
    /// 1. usage reported by the upstream → that usage (a stream cut short: with at least the
    ///    output deltas that passed; a JSON body cut short: when its top-level usage passed
    ///    whole and the body's start is still held);
    /// 2. else output observed while streaming → prompt estimate + observed output;
    /// 3. else a non-2xx status or an upstream failure → nothing (refund);
    /// 4. else (2xx without usage, or the client left before any answer) → the reservation.
    pub fn finish(&mut self, upstream_failed: bool) -> (Usage, UsageSource) {
        if let Some(done) = self.finished {
            return done;
        }
        if matches!(self.decoder, Decoder::Broken) && self.status_ok() {
            // An unknown encoding, or a corrupt stream: usage was not readable.
            self.note(UsageAnomaly::DecodeError);
        }
        let readable = !matches!(self.decoder, Decoder::Broken | Decoder::Capped);
        let reading = match &mut self.body {
            BodyReader::Json(buf) if readable && self.complete => {
                read_json_usage(self.kind, &buf.bytes)
            }
            // Cut short (a reset, a client that left) after its usage passed: the upstream
            // reported it, so it is charged, as a cut stream's is. Read forward from the first
            // byte: a backward scan from the cut could start inside a nested object. A body past
            // `max_response_buffer_bytes` kept only its tail: not readable once cut.
            BodyReader::Json(buf) if readable && buf.holds_the_start() => {
                read_cut_json_usage(self.kind, &buf.bytes)
            }
            BodyReader::Json(_) | BodyReader::Skip => Reading::Absent,
            reader => match reader.stream_mut() {
                Some(reader) => {
                    reader.finish();
                    reader.reading()
                }
                None => Reading::Absent,
            },
        };
        // An exception or error frame inside a 200 stream is a failed answer; a corrupt frame
        // stopped reading (what was read before it stands).
        let mut upstream_failed = upstream_failed;
        if let BodyReader::Bedrock(reader) = &self.body {
            let (error, failed) = (reader.decode_error(), reader.failure().is_some());
            if let Some(error) = error {
                self.note(UsageAnomaly::EventStream(error));
            }
            if failed {
                self.note(UsageAnomaly::StreamException);
                upstream_failed = true;
            }
        }
        // A stream may have had valid usage besides the invalid one (Anthropic's `message_start`
        // before a garbage `message_delta`): still an anomaly, and its output is not trusted.
        let invalid = reading == Reading::Invalid
            || self.body.stream().is_some_and(StreamReader::invalid_usage);
        if invalid {
            self.note(UsageAnomaly::InvalidUsage);
        }
        if reading == Reading::Foreign {
            self.note(UsageAnomaly::ForeignUsage);
        }
        let complete_json = matches!(self.body, BodyReader::Json(_)) && self.complete;
        let reported = match (reading, self.header_usage) {
            (Reading::Absent, Some(headers)) if complete_json => Some(headers),
            (reading, _) => reading.usage(),
        };
        let (observed, stream_cut) = self.body.stream().map_or((0, false), |reader| {
            (
                reader.observed_output(),
                !reader.completed() || matches!(self.decoder, Decoder::Capped),
            )
        });
        // A stream cut before its end may have reported only part of its usage (Anthropic's
        // `message_start` carries the input and a placeholder output of 1), and so has one whose
        // final usage was garbage: never charge less output than the deltas that passed.
        let reported = reported.map(|mut usage| {
            if stream_cut || invalid {
                usage.output = usage.output.max(observed);
            }
            usage
        });
        let answered_ok = self.status == 0 || (200..300).contains(&self.status);
        let done = match reported {
            Some(usage) => (usage, UsageSource::Reported),
            None if observed > 0 => (
                Usage {
                    input: self.facts.prompt_estimate,
                    output: observed,
                    ..Usage::default()
                },
                UsageSource::Observed,
            ),
            None if answered_ok && !upstream_failed => (self.reservation, UsageSource::Reservation),
            None => (Usage::default(), UsageSource::Refunded),
        };
        // What the upstream claims (or we counted) is held within sane bounds; our own
        // reservation already is.
        let done = match done {
            (usage, source @ (UsageSource::Reported | UsageSource::Observed)) => {
                let (usage, over) = UsageBounds::of(&self.facts, &self.limits).clamp(usage);
                if over {
                    self.note(UsageAnomaly::Clamped);
                }
                (usage, source)
            }
            other => other,
        };
        self.finished = Some(done);
        done
    }

    fn status_ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::testing::{CHAT_JSON, exchange, exchange_with, small_limits};

    #[test]
    fn endless_plain_sse_line_is_dropped_and_usage_after_it_read() {
        let mut x = exchange_with(
            ApiKind::ChatCompletions,
            r#"{"model":"m","stream":true}"#,
            small_limits(),
        );
        x.set_include_usage_injected();
        x.capture_for_cache(100_000);
        x.on_response_headers(200, Some(b"text/event-stream"), None);
        let bound = Exchange::held_bytes_bound(&x.limits, 100_000);
        let mut client = 0usize;
        let mut send = |x: &mut Exchange, bytes: &[u8], end: bool| {
            client += x
                .on_response_chunk(bytes, end)
                .map_or(bytes.len(), |r| r.len());
            assert!(x.held_bytes() <= bound);
        };
        let head = b"data: {\"choices\":[{\"delta\":{\"content\":\"";
        send(&mut x, head, false);
        let filler = vec![b'a'; 64 * 1024];
        for _ in 0..64 {
            send(&mut x, &filler, false);
        }
        let tail = b"\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        send(&mut x, tail, true);
        x.on_response_complete();
        // The stripper went to pass-through on the long event: every byte reached the client.
        assert_eq!(client, head.len() + 64 * 64 * 1024 + tail.len());
        assert!(x.take_capture().is_none(), "over the entry cap: not cached");
        let (usage, source) = x.finish(false);
        assert_eq!((usage.output, source), (9, UsageSource::Reported));
    }

    #[test]
    fn foreign_usage_falls_back_and_is_flagged() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.set_reservation(40, 60);
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(br#"{"choices":[],"usage":{"input_tokens":30,"output_tokens":9}}"#);
        x.on_response_complete();
        assert_eq!(
            x.finish(false),
            (
                Usage {
                    input: 40,
                    output: 60,
                    ..Usage::default()
                },
                UsageSource::Reservation
            )
        );
        assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::ForeignUsage));
        let mut y = exchange(ApiKind::ChatCompletions);
        y.on_response_headers(200, Some(b"text/event-stream"), None);
        y.on_response_body(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"input_tokens\":30,\"output_tokens\":9}}\n\ndata: [DONE]\n\n");
        y.on_response_complete();
        assert_eq!(y.finish(false).1, UsageSource::Observed);
        assert_eq!(y.usage_anomaly(), Some(UsageAnomaly::ForeignUsage));
    }

    /// Garbage counts in every API's own usage fields, JSON and SSE: charged by the fallbacks
    /// as before, and flagged `invalid_usage` (they used to fall back silently).
    #[test]
    fn invalid_usage_falls_back_and_is_flagged_on_every_api() {
        const GARBAGE: [&str; 8] = [
            "-5",
            "2.5",
            "5.0",
            "1e30",
            "18446744073709551616",
            "\"5\"",
            "true",
            "[5]",
        ];
        // (kind, a JSON response whose usage holds `{}` in a count field)
        let json: [(ApiKind, &str); 5] = [
            (
                ApiKind::ChatCompletions,
                r#"{"choices":[],"usage":{"prompt_tokens":{},"completion_tokens":4}}"#,
            ),
            (
                ApiKind::ChatCompletions,
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"completion_tokens_details":{"reasoning_tokens":{}}}}"#,
            ),
            (
                ApiKind::Responses,
                r#"{"output":[],"usage":{"input_tokens":3,"output_tokens":{}}}"#,
            ),
            (
                ApiKind::Embeddings,
                r#"{"data":[],"usage":{"prompt_tokens":{},"total_tokens":3}}"#,
            ),
            (
                ApiKind::Messages,
                r#"{"content":[],"usage":{"input_tokens":3,"cache_read_input_tokens":{},"output_tokens":4}}"#,
            ),
        ];
        for (kind, body) in json {
            for bad in GARBAGE {
                let body = body.replace("{}", bad);
                let mut x = exchange(kind);
                x.set_reservation(40, 60);
                x.on_response_headers(200, Some(b"application/json"), None);
                x.on_response_body(body.as_bytes());
                x.on_response_complete();
                let (usage, source) = x.finish(false);
                assert_eq!(
                    (usage.input, usage.output, source),
                    (40, 60, UsageSource::Reservation),
                    "{body}"
                );
                assert_eq!(
                    x.usage_anomaly(),
                    Some(UsageAnomaly::InvalidUsage),
                    "{body}"
                );
            }
        }
        // A usage that is not an object at all, or a details member that is not one.
        for body in [
            r#"{"usage":"lots"}"#,
            r#"{"usage":[1,2]}"#,
            r#"{"usage":7}"#,
            r#"{"usage":{"prompt_tokens":1,"prompt_tokens_details":[1]}}"#,
        ] {
            let mut x = exchange(ApiKind::ChatCompletions);
            x.on_response_headers(200, Some(b"application/json"), None);
            x.on_response_body(body.as_bytes());
            x.on_response_complete();
            assert_eq!(x.finish(false).1, UsageSource::Reservation, "{body}");
            assert_eq!(
                x.usage_anomaly(),
                Some(UsageAnomaly::InvalidUsage),
                "{body}"
            );
        }
        let delta = |kind| match kind {
            ApiKind::Messages => {
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n"
            }
            ApiKind::Responses => {
                "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n"
            }
            _ => "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        };
        // (kind, the stream's usage-carrying events with `{}` as a count, its end)
        let sse: [(ApiKind, &str, &str); 4] = [
            (
                ApiKind::ChatCompletions,
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":{}}}\n\n",
                "data: [DONE]\n\n",
            ),
            (
                ApiKind::Responses,
                "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":{},\"output_tokens\":9}}}\n\n",
                "",
            ),
            // A garbage message_delta after a valid message_start: the input is kept, the output
            // is at least the deltas that passed (not message_start's placeholder 1).
            (
                ApiKind::Messages,
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":{}}}\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
            (
                ApiKind::Messages,
                "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":{},\"output_tokens\":2}}\n\n",
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
        ];
        for (kind, usage_events, end) in sse {
            for bad in GARBAGE {
                let mut stream = String::new();
                if kind == ApiKind::Messages {
                    stream.push_str("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n");
                }
                for _ in 0..3 {
                    stream.push_str(delta(kind));
                }
                stream.push_str(&usage_events.replace("{}", bad));
                stream.push_str(end);
                let mut x = exchange(kind);
                x.on_response_headers(200, Some(b"text/event-stream"), None);
                x.on_response_body(stream.as_bytes());
                x.on_response_complete();
                let (usage, source) = x.finish(false);
                let want = if kind == ApiKind::Messages {
                    (20, 3, UsageSource::Reported)
                } else {
                    (x.facts.prompt_estimate, 3, UsageSource::Observed)
                };
                assert_eq!((usage.input, usage.output, source), want, "{stream}");
                assert_eq!(
                    x.usage_anomaly(),
                    Some(UsageAnomaly::InvalidUsage),
                    "{stream}"
                );
            }
        }
        // `null` counts and `"usage":null` chunks are not garbage.
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"text/event-stream"), None);
        x.on_response_body(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":null}}\n\ndata: [DONE]\n\n");
        x.on_response_complete();
        assert_eq!(x.finish(false).1, UsageSource::Reported);
        assert_eq!(x.usage_anomaly(), None);
    }

    #[test]
    fn json_usage_across_chunks() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), None);
        for chunk in CHAT_JSON.chunks(5) {
            x.on_response_body(chunk);
        }
        x.on_response_complete();
        let (usage, source) = x.finish(false);
        assert_eq!(source, UsageSource::Reported);
        assert_eq!((usage.input, usage.output, usage.cached_input), (11, 7, 3));
    }

    /// A JSON 200 cut short (an upstream reset, a client that left) after its usage passed is
    /// charged that usage, as a cut stream is (it used to be refunded, or charged the
    /// reservation); cut before the usage's closing brace, it falls back as before.
    #[test]
    fn json_cut_short_after_its_usage_is_charged_the_usage() {
        let usage_end = CHAT_JSON.len() - 1; // the usage object closes just before the last `}`
        for cut in 0..=CHAT_JSON.len() {
            for (upstream_failed, fallback) in [
                (true, UsageSource::Refunded),
                (false, UsageSource::Reservation),
            ] {
                let mut x = exchange(ApiKind::ChatCompletions);
                x.set_reservation(40, 60);
                x.on_response_headers(200, Some(b"application/json"), None);
                let (head, _) = CHAT_JSON.split_at(cut);
                for chunk in head.chunks(9) {
                    x.on_response_body(chunk);
                }
                let (usage, source) = x.finish(upstream_failed);
                if cut >= usage_end {
                    assert_eq!(
                        (usage.input, usage.output, usage.cached_input, source),
                        (11, 7, 3, UsageSource::Reported),
                        "cut at {cut}"
                    );
                } else {
                    assert_eq!(source, fallback, "cut at {cut}");
                }
                assert_eq!(x.usage_anomaly(), None);
            }
        }
        // A nested "usage" that passed before the cut is not the body's usage, and neither is
        // the top-level usage of a body cut after the buffer cap (only its tail was kept).
        let nested = br#"{"id":"x","choices":[{"message":{"content":"hi","tool_calls":[{"function":{"arguments":"{}"}}]},"extra":{"usage":{"prompt_tokens":9,"completion_tokens":9}}}],"usage":{"prompt_tok"#;
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(nested);
        assert_eq!(x.finish(true).1, UsageSource::Refunded);
        let limits = Limits {
            max_response_buffer_bytes: 64,
            ..Limits::default()
        };
        let mut y = exchange_with(ApiKind::ChatCompletions, r#"{"model":"m"}"#, limits);
        y.on_response_headers(200, Some(b"application/json"), None);
        y.on_response_body(CHAT_JSON.split_at(CHAT_JSON.len() - 1).0);
        assert_eq!(y.finish(true).1, UsageSource::Refunded);
        // Garbage usage that passed before the cut is flagged; a reported usage over its bound
        // is clamped; the first call decides.
        let mut z = exchange(ApiKind::Messages);
        z.on_response_headers(200, Some(b"application/json"), None);
        z.on_response_body(br#"{"type":"message","usage":{"input_tokens":-4,"output_tokens":5},"#);
        assert_eq!(z.finish(true).1, UsageSource::Refunded);
        assert_eq!(z.usage_anomaly(), Some(UsageAnomaly::InvalidUsage));
        let mut w = exchange_with(
            ApiKind::Messages,
            r#"{"model":"m","max_tokens":3}"#,
            Limits::default(),
        );
        w.on_response_headers(200, Some(b"application/json"), None);
        w.on_response_body(
            br#"{"type":"message","usage":{"input_tokens":4,"output_tokens":5},"stop"#,
        );
        let (usage, source) = w.finish(true);
        assert_eq!((usage.output, source), (3, UsageSource::Reported));
        assert_eq!(w.usage_anomaly(), Some(UsageAnomaly::Clamped));
        assert_eq!(w.finish(false).1, UsageSource::Reported);
    }

    #[test]
    fn injected_usage_chunk_is_hidden_from_the_client() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        let usage_event =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n";
        for split in 1..stream.len() {
            let mut x = exchange(ApiKind::ChatCompletions);
            x.set_include_usage_injected();
            x.on_response_headers(200, Some(b"text/event-stream"), None);
            let (a, b) = stream.as_bytes().split_at(split);
            let mut client = Vec::new();
            for (chunk, end) in [(a, false), (b, true)] {
                match x.on_response_chunk(chunk, end) {
                    Some(replaced) => client.extend_from_slice(&replaced),
                    None => client.extend_from_slice(chunk),
                }
            }
            assert_eq!(
                String::from_utf8(client).unwrap(),
                stream.replace(usage_event, "")
            );
            x.on_response_complete();
            assert_eq!(
                x.finish(false).0.input,
                5,
                "usage still read at split {split}"
            );
        }
    }

    #[test]
    fn cut_anthropic_stream_charges_the_deltas_that_passed() {
        let mut x = exchange(ApiKind::Messages);
        x.on_response_headers(200, Some(b"text/event-stream"), None);
        x.on_response_body(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":20,\"output_tokens\":1}}}\n\n");
        for _ in 0..5 {
            x.on_response_body(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n");
        }
        // The client left before message_delta.
        let (usage, source) = x.finish(false);
        assert_eq!(
            (usage.input, usage.output, source),
            (20, 5, UsageSource::Reported)
        );
    }

    #[test]
    fn capture_keeps_whole_2xx_bodies_within_the_cap() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.capture_for_cache(1000);
        x.on_response_headers(200, Some(b"application/json"), None);
        for chunk in CHAT_JSON.chunks(7) {
            assert!(x.on_response_chunk(chunk, false).is_none());
        }
        x.on_response_complete();
        let (status, ct, body) = x.take_capture().unwrap();
        assert_eq!(
            (status, ct.as_str(), body.as_slice()),
            (200, "application/json", CHAT_JSON)
        );
        // Over the cap: dropped, the client still gets everything (nothing is replaced).
        let mut y = exchange(ApiKind::ChatCompletions);
        y.capture_for_cache(10);
        y.on_response_headers(200, Some(b"application/json"), None);
        assert!(y.on_response_chunk(CHAT_JSON, true).is_none());
        y.on_response_complete();
        assert!(y.take_capture().is_none());
        // Errors and encoded bodies are never kept.
        let mut z = exchange(ApiKind::ChatCompletions);
        z.capture_for_cache(1000);
        z.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        z.on_response_chunk(b"\x1f\x8b", true);
        z.on_response_complete();
        assert!(z.take_capture().is_none());
    }

    #[test]
    fn error_status_reads_nothing_and_finishes_once() {
        let mut x = exchange(ApiKind::Messages);
        x.on_response_headers(500, Some(b"application/json"), None);
        assert!(!x.wants_response_body());
        assert_eq!(x.finish(false).1, UsageSource::Refunded);
        assert_eq!(x.record().len(), 12);
        assert_eq!(x.usage_anomaly(), None);
    }
}
