//! One LLM request/response exchange, host-free: the request facts, the response as it streams
//! past (decompressed when the upstream ignored our identity request), the usage found in it and
//! the per-request record written to filter state for the access log.

use std::io::Write;

use flate2::write::{GzDecoder, ZlibDecoder};

use crate::api::request::RequestFacts;
use crate::api::sse::SseUsageReader;
use crate::api::usage::usage_from_json;
use crate::api::{ApiKind, Usage};
use crate::config::Limits;

/// How much of an over-long JSON response is kept: usage sits at the end of every API's body.
const JSON_TAIL_BYTES: usize = 64 * 1024;

/// Where the recorded usage came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream reported it (JSON `usage`, final SSE event).
    Reported,
    /// No usage arrived; output counted from streamed deltas (input from the prompt estimate).
    Observed,
    /// Nothing usable: no usage and nothing streamed (errors, resets before any output).
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Observed => "observed",
            UsageSource::None => "none",
        }
    }
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
            finished: None,
        }
    }

    /// Response headers: status, `content-type`, `content-encoding`.
    pub fn on_response_headers(
        &mut self,
        status: u32,
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
    ) {
        self.status = status;
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

    /// Whether response body chunks are worth reading at all.
    pub fn wants_response_body(&self) -> bool {
        !matches!(self.body, BodyReader::Skip) && !matches!(self.decoder, Decoder::Broken)
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

    /// End of the response (or of the exchange, for aborted streams): settle what usage is known.
    /// Idempotent: the first call decides.
    pub fn finish(&mut self) -> (Usage, UsageSource) {
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
        let observed = match &self.body {
            BodyReader::Sse(reader) => reader.observed_output(),
            _ => 0,
        };
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
            None => (Usage::default(), UsageSource::None),
        };
        self.finished = Some(done);
        done
    }

    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// The per-request record, as (filter state name, plain-text value) pairs.
    pub fn record(&mut self) -> Vec<(&'static str, String)> {
        let (usage, source) = self.finish();
        vec![
            ("tollgate.tenant", self.tenant.clone()),
            ("tollgate.api", self.kind.as_str().to_string()),
            ("tollgate.model", self.facts.model.clone()),
            ("tollgate.stream", self.facts.stream.to_string()),
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
            ("tollgate.usage_source", source.as_str().to_string()),
        ]
    }
}

/// Takes what a decoder produced so far; `None` when the stream is corrupt.
fn inflate(written: std::io::Result<()>, out: &mut Vec<u8>) -> Option<Vec<u8>> {
    written.ok()?;
    Some(std::mem::take(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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
        let (usage, source) = x.finish();
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
        assert_eq!(x.finish().0.output, 7);
        // In one piece, too: a decoder must not hold back its last output.
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        x.on_response_body(&gzip(CHAT_JSON));
        x.on_response_complete();
        assert_eq!(x.finish().0.output, 7);
    }

    #[test]
    fn corrupt_gzip_loses_usage_without_panicking() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        x.on_response_body(b"definitely not gzip");
        assert_eq!(x.finish().1, UsageSource::None);
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
        assert_eq!(x.finish().0.output, 2);
    }

    #[test]
    fn json_cut_short_is_not_trusted() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(CHAT_JSON);
        // No end of stream: an upstream reset or a client abort.
        assert_eq!(x.finish().1, UsageSource::None);
    }

    #[test]
    fn error_status_reads_nothing_and_finishes_once() {
        let mut x = exchange(ApiKind::Messages);
        x.on_response_headers(500, Some(b"application/json"), None);
        assert!(!x.wants_response_body());
        assert_eq!(x.finish().1, UsageSource::None);
        assert!(x.is_finished());
        assert_eq!(x.record().len(), 10);
    }
}
