//! One LLM request/response exchange, host-free: the request facts, the response as it streams
//! past (decompressed when the upstream ignored our identity request), the usage found in it, the
//! usage the request is charged (with the documented fallbacks) and the per-request record
//! written to filter state for the access log.

use std::io::Write;

use flate2::write::{GzDecoder, ZlibDecoder};

use crate::api::request::RequestFacts;
use crate::api::sse::SseUsageReader;
use crate::api::strip::UsageChunkStripper;
use crate::api::usage::usage_from_json;
use crate::api::{ApiKind, Usage};
use crate::config::Limits;

/// How much of an over-long JSON response is kept: usage sits at the end of every API's body.
const JSON_TAIL_BYTES: usize = 64 * 1024;
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

/// A bounded copy of a JSON response body: everything up to the cap, then only the tail.
#[derive(Debug, Default)]
struct TailBuffer {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > self.cap {
            let keep = JSON_TAIL_BYTES.min(self.cap);
            let excess = self.bytes.len().saturating_sub(keep);
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }
}

enum BodyReader {
    Json(TailBuffer),
    Sse(Box<SseUsageReader>),
    /// Error statuses and bodies we cannot read (unknown encodings).
    Skip,
}

enum Decoder {
    Identity,
    Gzip(Box<GzDecoder<Vec<u8>>>),
    Deflate(Box<ZlibDecoder<Vec<u8>>>),
    /// The stream could not be decoded; usage is lost for this response.
    Broken,
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
        }
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
        self.decoder = match content_encoding.map(<[u8]>::trim_ascii) {
            None | Some(b"") => Decoder::Identity,
            Some(enc) if enc.eq_ignore_ascii_case(b"identity") => Decoder::Identity,
            Some(enc)
                if enc.eq_ignore_ascii_case(b"gzip") || enc.eq_ignore_ascii_case(b"x-gzip") =>
            {
                Decoder::Gzip(Box::new(GzDecoder::new(Vec::new())))
            }
            Some(enc) if enc.eq_ignore_ascii_case(b"deflate") => {
                Decoder::Deflate(Box::new(ZlibDecoder::new(Vec::new())))
            }
            Some(_) => Decoder::Broken,
        };
        self.stripper = (self.include_usage_injected
            && is_sse
            && (200..300).contains(&status)
            && matches!(self.decoder, Decoder::Identity))
        .then(|| UsageChunkStripper::new(STRIP_HOLD_BYTES));
        self.body = if !(200..300).contains(&status) {
            BodyReader::Skip
        } else if is_sse {
            let line_cap = usize::try_from(self.limits.max_sse_line_bytes).unwrap_or(usize::MAX);
            BodyReader::Sse(Box::new(SseUsageReader::new(self.kind, line_cap)))
        } else {
            BodyReader::Json(TailBuffer {
                bytes: Vec::new(),
                cap: usize::try_from(self.limits.max_response_buffer_bytes).unwrap_or(usize::MAX),
                truncated: false,
            })
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
            || (!matches!(self.body, BodyReader::Skip) && !matches!(self.decoder, Decoder::Broken))
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

    /// One response body chunk as it passes to the client.
    pub fn on_response_body(&mut self, chunk: &[u8]) {
        let decoded: Option<Vec<u8>> = match &mut self.decoder {
            Decoder::Identity => None,
            Decoder::Gzip(d) => inflate(d.write_all(chunk).and_then(|()| d.flush()), d.get_mut()),
            Decoder::Deflate(d) => {
                inflate(d.write_all(chunk).and_then(|()| d.flush()), d.get_mut())
            }
            Decoder::Broken => return,
        };
        let bytes: &[u8] = match &decoded {
            Some(out) => out,
            None if matches!(self.decoder, Decoder::Identity) => chunk,
            None => {
                self.decoder = Decoder::Broken;
                return;
            }
        };
        match &mut self.body {
            BodyReader::Json(buf) => buf.push(bytes),
            BodyReader::Sse(reader) => reader.feed(bytes),
            BodyReader::Skip => {}
        }
    }

    /// End of the response (or of the exchange, for aborted streams): the usage this request is
    /// charged. Idempotent: the first call decides. `upstream_failed`: the upstream reset or
    /// could not be reached (Envoy's response details say so).
    ///
    /// 1. usage reported by the upstream → that usage (a stream cut short: with at least the
    ///    output deltas that passed);
    /// 2. else output observed while streaming → prompt estimate + observed output;
    /// 3. else a non-2xx status or an upstream failure → nothing (refund);
    /// 4. else (2xx without usage, or the client left before any answer) → the reservation.
    pub fn finish(&mut self, upstream_failed: bool) -> (Usage, UsageSource) {
        if let Some(done) = self.finished {
            return done;
        }
        let reported = match &mut self.body {
            // A JSON body cut short could end inside a nested object: trust only whole bodies.
            BodyReader::Json(buf) if self.complete && !matches!(self.decoder, Decoder::Broken) => {
                usage_from_json(self.kind, &buf.bytes)
            }
            BodyReader::Sse(reader) => {
                reader.finish();
                reader.usage()
            }
            _ => None,
        };
        let (observed, stream_cut) = match &self.body {
            BodyReader::Sse(reader) => (reader.observed_output(), !reader.completed()),
            _ => (0, false),
        };
        // A stream cut before its end may have reported only part of its usage (Anthropic's
        // `message_start` carries the input and a placeholder output of 1): never charge less
        // output than the deltas that passed.
        let reported = reported.map(|mut usage| {
            if stream_cut {
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
        self.finished = Some(done);
        done
    }

    /// The per-request record, as (filter state name, plain-text value) pairs.
    pub fn record(&mut self) -> Vec<(&'static str, String)> {
        let (usage, source) = self.finish(false);
        let route = self.served.as_ref().map_or("", |(_, r)| r.as_str());
        record_fields(self, self.served_model(), route, &usage, source.as_str())
    }
}

/// The ledger fields of a request that was read and answered (by the upstream or the cache):
/// who, which API and model, and the usage it is charged, from `source`.
pub fn record_fields(
    exchange: &Exchange,
    served_model: &str,
    route: &str,
    usage: &Usage,
    source: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("tollgate.tenant", exchange.tenant.clone()),
        ("tollgate.api", exchange.kind.as_str().to_string()),
        ("tollgate.model", exchange.facts.model.clone()),
        ("tollgate.served_model", served_model.to_string()),
        ("tollgate.route", route.to_string()),
        ("tollgate.stream", exchange.facts.stream.to_string()),
        ("tollgate.input_tokens", usage.input.to_string()),
        ("tollgate.output_tokens", usage.output.to_string()),
        (
            "tollgate.cached_input_tokens",
            usage.cached_input.to_string(),
        ),
        (
            "tollgate.cache_write_input_tokens",
            usage.cache_write_input.to_string(),
        ),
        ("tollgate.reasoning_tokens", usage.reasoning.to_string()),
        ("tollgate.usage_source", source.to_string()),
    ]
}

/// Takes what a decoder produced so far; `None` when the stream is corrupt.
fn inflate(written: std::io::Result<()>, out: &mut Vec<u8>) -> Option<Vec<u8>> {
    written.ok()?;
    Some(std::mem::take(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::parse_request;

    fn exchange(kind: ApiKind) -> Exchange {
        let facts = parse_request(kind, br#"{"model":"m","stream":true}"#).unwrap();
        Exchange::new(kind, "t".into(), facts, Limits::default())
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    const CHAT_JSON: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3}}}"#;

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

    #[test]
    fn gzip_json_is_decoded() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        for chunk in gzip(CHAT_JSON).chunks(3) {
            x.on_response_body(chunk);
        }
        x.on_response_complete();
        assert_eq!(x.finish(false).0.output, 7);
        // In one piece, too: a decoder must not hold back its last output.
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        x.on_response_body(&gzip(CHAT_JSON));
        x.on_response_complete();
        assert_eq!(x.finish(false).0.output, 7);
    }

    #[test]
    fn corrupt_gzip_loses_usage_without_panicking() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        x.on_response_body(b"definitely not gzip");
        assert_eq!(x.finish(false).1, UsageSource::Reservation);
    }

    #[test]
    fn long_json_keeps_only_a_bounded_tail() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.limits.max_response_buffer_bytes = 1000;
        x.on_response_headers(200, Some(b"application/json"), None);
        let filler = format!(
            r#"{{"choices":[{{"message":{{"content":"{}"}}}}],"#,
            "a".repeat(200_000)
        );
        for chunk in filler.as_bytes().chunks(4096) {
            x.on_response_body(chunk);
            if let BodyReader::Json(buf) = &x.body {
                assert!(buf.bytes.len() <= 1000 + 4096);
            }
        }
        x.on_response_body(br#""usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        x.on_response_complete();
        assert_eq!(x.finish(false).0.output, 2);
    }

    #[test]
    fn json_cut_short_is_not_trusted() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(CHAT_JSON);
        // No end of stream: a client abort charges the reservation, an upstream reset nothing.
        x.set_reservation(40, 60);
        let mut y = exchange(ApiKind::ChatCompletions);
        y.on_response_headers(200, Some(b"application/json"), None);
        y.on_response_body(CHAT_JSON);
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
        assert_eq!(y.finish(true).1, UsageSource::Refunded);
        // The first call decides: a later one (say, from on_log) changes nothing.
        assert_eq!(x.finish(true).1, UsageSource::Reservation);
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
        x.on_response_body(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n");
        for _ in 0..5 {
            x.on_response_body(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n");
        }
        // The client left before message_delta.
        let (usage, source) = x.finish(false);
        assert_eq!(
            (usage.input, usage.output, source),
            (30, 5, UsageSource::Reported)
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
    }
}
