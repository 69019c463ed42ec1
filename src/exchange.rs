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

use flate2::{Decompress, FlushDecompress, Status};

use crate::api::request::RequestFacts;
use crate::api::sse::SseUsageReader;
use crate::api::strip::UsageChunkStripper;
use crate::api::usage::{Reading, read_json_usage};
use crate::api::{ApiKind, Usage};
use crate::config::Limits;

/// How much of an over-long JSON response is kept: usage sits at the end of every API's body.
const JSON_TAIL_BYTES: usize = 64 * 1024;
/// How much of one SSE event the usage-chunk stripper may hold back (usage chunks are < 1 KiB).
const STRIP_HOLD_BYTES: usize = 64 * 1024;
/// The decoder's output buffer: decoded bytes reach the readers in pieces of at most this.
const INFLATE_OUT_BYTES: usize = 32 * 1024;
/// The inflate state (miniz_oxide: the 32 KiB window plus Huffman tables), counted as held.
pub const INFLATE_STATE_BYTES: usize = 48 * 1024;
/// The longest gzip header accepted (optional name, comment and extra fields included).
const GZIP_HEADER_MAX: usize = 64 * 1024;

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

/// Why the usage charged is not simply what the upstream reported (ledger field
/// `tollgate.usage_anomaly`, metric `tollgate.tenant.<t>.usage_anomalies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageAnomaly {
    /// The reported (or observed) usage was over its bound and was charged at the bound.
    Clamped,
    /// A usage object with none of the API's own fields: ignored, charged by the fallbacks.
    ForeignUsage,
    /// A compressed response decoded to more than `max_decoded_response_bytes`: decoding
    /// stopped, usage after that point was not read.
    DecodeLimit,
    /// A compressed response could not be decoded (corrupt, or an unknown encoding).
    DecodeError,
}

impl UsageAnomaly {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageAnomaly::Clamped => "clamped",
            UsageAnomaly::ForeignUsage => "foreign_usage",
            UsageAnomaly::DecodeLimit => "decode_limit",
            UsageAnomaly::DecodeError => "decode_error",
        }
    }
}

/// The most a response may be charged, field by field. See [`Exchange::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBounds {
    pub input: u64,
    pub output: u64,
}

impl UsageBounds {
    /// Output: the request's own max tokens (reasoning is part of it on every API; times chat's
    /// `n`), never more than `max_reported_tokens`. Input: the body's bytes (every text token covers at least one byte)
    /// plus `max_reported_tokens` for what the body does not show: images, files, a
    /// `previous_response_id` conversation, server-side cached prompts.
    pub fn of(facts: &RequestFacts, limits: &Limits) -> UsageBounds {
        UsageBounds {
            input: facts
                .prompt_bound
                .saturating_add(limits.max_reported_tokens),
            output: facts
                .max_tokens
                .map_or(u64::MAX, |max| max.saturating_mul(facts.choices.max(1)))
                .min(limits.max_reported_tokens),
        }
    }

    /// `usage` held within the bounds, keeping its invariants (`cached_input + cache_write_input
    /// ≤ input`, `reasoning ≤ output`); `true` when anything had to change.
    pub fn clamp(self, usage: Usage) -> (Usage, bool) {
        let input = usage.input.min(self.input);
        let output = usage.output.min(self.output);
        let cached_input = usage.cached_input.min(input);
        let cache_write_input = usage
            .cache_write_input
            .min(input.saturating_sub(cached_input));
        let reasoning = usage.reasoning.min(output);
        let clamped = Usage {
            input,
            output,
            cached_input,
            cache_write_input,
            reasoning,
        };
        // Only the bounds count as an anomaly: the invariants were already enforced on parsing
        // for each API, except an Anthropic cache split, which is re-derived here.
        let over = usage.input > self.input || usage.output > self.output;
        (clamped, over)
    }
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

/// A bounded copy of a JSON response body: everything up to the cap, then only a tail of at
/// least `keep = min(64 KiB, cap)` and at most `2 × keep` bytes (so the front is cut once per
/// `keep` bytes, not on every chunk: linear work for any body size).
#[derive(Debug, Default)]
struct TailBuffer {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            bytes: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if !self.truncated && self.bytes.len().saturating_add(chunk.len()) <= self.cap {
            self.bytes.extend_from_slice(chunk);
            return;
        }
        if !self.truncated {
            // Leaving the whole-body copy: give its memory back.
            self.truncated = true;
            let keep = self.keep();
            let from = self.bytes.len().saturating_sub(keep);
            let tail = self.bytes.get(from..).unwrap_or_default().to_vec();
            self.bytes = tail;
        }
        let keep = self.keep();
        if chunk.len() >= keep {
            self.bytes.clear();
            let from = chunk.len().saturating_sub(keep);
            self.bytes
                .extend_from_slice(chunk.get(from..).unwrap_or_default());
            return;
        }
        if self.bytes.len().saturating_add(chunk.len()) > keep.saturating_mul(2) {
            let excess = self
                .bytes
                .len()
                .saturating_add(chunk.len())
                .saturating_sub(keep);
            self.bytes.drain(..excess.min(self.bytes.len()));
        }
        self.bytes.extend_from_slice(chunk);
    }

    fn keep(&self) -> usize {
        JSON_TAIL_BYTES.min(self.cap)
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
    Inflate(Box<Inflater>),
    /// The stream could not be decoded; usage is lost for this response.
    Broken,
    /// The decoded output reached `max_decoded_response_bytes`: decoding stopped.
    Capped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrapper {
    /// RFC 1952: a header (parsed here), raw deflate, CRC-32 and size (not checked: only usage is
    /// read from this copy, the client gets the original bytes).
    Gzip,
    /// HTTP `deflate`: RFC 1950 zlib, or raw deflate from servers that send that instead.
    Deflate,
}

/// What decoding one chunk came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Everything was consumed; more input may follow.
    More,
    /// The compressed stream ended (bytes after it are ignored).
    End,
    /// `max_decoded_response_bytes` reached.
    Capped,
    /// Not a valid stream.
    Broken,
}

/// An incremental gzip/deflate decoder with a fixed output buffer: peak memory does not depend
/// on the compression ratio.
struct Inflater {
    wrapper: Wrapper,
    /// The wrapper header while it arrives (`None` once the deflate data started).
    header: Option<Vec<u8>>,
    inflate: Decompress,
    out: Box<[u8]>,
    /// Decoded bytes so far, and the most allowed.
    decoded: u64,
    cap: u64,
    ended: bool,
}

/// How the start of a compressed stream reads: the bytes to skip before the deflate data and
/// whether that data is zlib-wrapped, or that more bytes are needed, or that it is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    Done { skip: usize, zlib: bool },
    NeedMore,
    Invalid,
}

fn parse_header(wrapper: Wrapper, b: &[u8]) -> Header {
    match wrapper {
        Wrapper::Deflate => match b {
            [cmf, flg, ..] => {
                let zlib = cmf & 0x0f == 8
                    && cmf >> 4 <= 7
                    && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0;
                Header::Done { skip: 0, zlib }
            }
            _ => Header::NeedMore,
        },
        Wrapper::Gzip => parse_gzip_header(b),
    }
}

/// RFC 1952 member header: magic, method 8, flags, then the optional extra, name, comment and
/// header CRC.
fn parse_gzip_header(b: &[u8]) -> Header {
    let Some(fixed) = b.get(..10) else {
        return match b {
            [0x1f, 0x8b, 8, ..] | [0x1f, 0x8b] | [0x1f] | [] => Header::NeedMore,
            _ => Header::Invalid,
        };
    };
    let [0x1f, 0x8b, 8, flags, ..] = *fixed else {
        return Header::Invalid;
    };
    if flags & 0xe0 != 0 {
        return Header::Invalid;
    }
    let mut pos = 10usize;
    if flags & 0x04 != 0 {
        let Some([lo, hi]) = b
            .get(pos..pos.saturating_add(2))
            .and_then(|x| x.first_chunk::<2>().copied())
        else {
            return Header::NeedMore;
        };
        pos = pos
            .saturating_add(2)
            .saturating_add(usize::from(u16::from_le_bytes([lo, hi])));
    }
    for flag in [0x08u8, 0x10] {
        if flags & flag != 0 {
            let Some(nul) = b
                .get(pos..)
                .and_then(|rest| rest.iter().position(|c| *c == 0))
            else {
                return Header::NeedMore;
            };
            pos = pos.saturating_add(nul).saturating_add(1);
        }
    }
    if flags & 0x02 != 0 {
        pos = pos.saturating_add(2);
    }
    if b.len() >= pos {
        Header::Done {
            skip: pos,
            zlib: false,
        }
    } else {
        Header::NeedMore
    }
}

impl Inflater {
    fn new(wrapper: Wrapper, cap: u64) -> Inflater {
        Inflater {
            wrapper,
            header: Some(Vec::new()),
            inflate: Decompress::new(false),
            out: vec![0u8; INFLATE_OUT_BYTES].into_boxed_slice(),
            decoded: 0,
            cap,
            ended: false,
        }
    }

    fn held_bytes(&self) -> usize {
        self.header
            .as_ref()
            .map_or(0, Vec::len)
            .saturating_add(self.out.len())
            .saturating_add(INFLATE_STATE_BYTES)
    }

    /// Decodes `input`, handing the output to `sink` in pieces of at most `INFLATE_OUT_BYTES`.
    fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Step {
        if self.ended {
            return Step::End;
        }
        let Some(header) = self.header.as_mut() else {
            return self.run(input, sink);
        };
        // Hold at most GZIP_HEADER_MAX bytes of header; the rest of `input` is used in place.
        let take = input
            .len()
            .min(GZIP_HEADER_MAX.saturating_sub(header.len()));
        let (head, rest) = input.split_at_checked(take).unwrap_or((input, &[]));
        header.extend_from_slice(head);
        match parse_header(self.wrapper, header) {
            Header::Invalid => Step::Broken,
            Header::NeedMore if header.len() >= GZIP_HEADER_MAX => Step::Broken,
            Header::NeedMore => Step::More,
            Header::Done { skip, zlib } => {
                let held = self.header.take().unwrap_or_default();
                self.inflate = Decompress::new(zlib);
                let step = self.run(held.get(skip..).unwrap_or_default(), sink);
                if step == Step::More {
                    self.run(rest, sink)
                } else {
                    step
                }
            }
        }
    }

    fn run(&mut self, mut input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Step {
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let status = match self
                .inflate
                .decompress(input, &mut self.out, FlushDecompress::None)
            {
                Ok(status) => status,
                Err(_) => return Step::Broken,
            };
            let consumed = self.inflate.total_in().saturating_sub(in_before);
            let produced = self.inflate.total_out().saturating_sub(out_before);
            input = input
                .get(usize::try_from(consumed).unwrap_or(usize::MAX)..)
                .unwrap_or_default();
            let room = self.cap.saturating_sub(self.decoded);
            let give = produced.min(room);
            let out = self
                .out
                .get(..usize::try_from(give).unwrap_or(usize::MAX))
                .unwrap_or_default();
            if !out.is_empty() {
                sink(out);
            }
            self.decoded = self.decoded.saturating_add(give);
            if produced > room {
                return Step::Capped;
            }
            if status == Status::StreamEnd {
                self.ended = true;
                return Step::End;
            }
            if consumed == 0 && produced == 0 {
                return Step::More;
            }
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
            BodyReader::Sse(reader) => reader.buffered_bytes(),
            BodyReader::Skip => 0,
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
        let sse = as_usize(limits.max_sse_line_bytes).saturating_mul(3);
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
                Decoder::Inflate(Box::new(Inflater::new(
                    Wrapper::Gzip,
                    self.limits.max_decoded_response_bytes,
                )))
            }
            Some(enc) if enc.eq_ignore_ascii_case(b"deflate") => Decoder::Inflate(Box::new(
                Inflater::new(Wrapper::Deflate, self.limits.max_decoded_response_bytes),
            )),
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
            BodyReader::Json(TailBuffer::new(
                usize::try_from(self.limits.max_response_buffer_bytes).unwrap_or(usize::MAX),
            ))
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
        let mut read = |bytes: &[u8]| match body {
            BodyReader::Json(buf) => buf.push(bytes),
            BodyReader::Sse(reader) => reader.feed(bytes),
            BodyReader::Skip => {}
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
    ///    output deltas that passed);
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
        let reading = match &mut self.body {
            // A JSON body cut short could end inside a nested object: trust only whole bodies.
            BodyReader::Json(buf)
                if self.complete && !matches!(self.decoder, Decoder::Broken | Decoder::Capped) =>
            {
                read_json_usage(self.kind, &buf.bytes)
            }
            BodyReader::Sse(reader) => {
                reader.finish();
                match reader.usage() {
                    Some(usage) => Reading::Usage(usage),
                    None if reader.foreign_usage() => Reading::Foreign,
                    None => Reading::Absent,
                }
            }
            _ => Reading::Absent,
        };
        if reading == Reading::Foreign {
            self.note(UsageAnomaly::ForeignUsage);
        }
        let reported = reading.usage();
        let (observed, stream_cut) = match &self.body {
            BodyReader::Sse(reader) => (
                reader.observed_output(),
                !reader.completed() || matches!(self.decoder, Decoder::Capped),
            ),
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

    /// The per-request record, as (filter state name, plain-text value) pairs.
    pub fn record(&mut self) -> Vec<(&'static str, String)> {
        let (usage, source) = self.finish(false);
        let route = self.served.as_ref().map_or("", |(_, r)| r.as_str());
        let mut fields = record_fields(self, self.served_model(), route, &usage, source.as_str());
        if let Some(anomaly) = self.anomaly {
            fields.push(("tollgate.usage_anomaly", anomaly.as_str().to_string()));
        }
        fields
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::parse_request;

    fn exchange(kind: ApiKind) -> Exchange {
        let facts = parse_request(kind, br#"{"model":"m","stream":true}"#).unwrap();
        Exchange::new(kind, "t".into(), facts, Limits::default())
    }

    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Raw deflate of `data` from an empty window, ending byte-aligned (or final): such
    /// segments concatenate into one stream, so a bomb repeats one compressed block.
    fn segment(data: &[u8], last: bool) -> Vec<u8> {
        let mut c = flate2::Compress::new(flate2::Compression::best(), false);
        let mut out = Vec::with_capacity(data.len() / 2 + 1024);
        let flush = if last {
            flate2::FlushCompress::Finish
        } else {
            flate2::FlushCompress::Full
        };
        c.compress_vec(data, &mut out, flush).unwrap();
        out
    }

    /// `prefix + filler × n + suffix` in `wrapper` (gzip, zlib or raw); the trailer's checksum
    /// is not computed (never checked: bombs are cut before it, and gzip's is not read).
    fn bomb(wrapper: &str, prefix: &[u8], filler: &[u8], n: usize, suffix: &[u8]) -> Vec<u8> {
        let mut out = match wrapper {
            "gzip" => vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 0xff],
            "zlib" => vec![0x78, 0xda],
            _ => Vec::new(),
        };
        out.extend_from_slice(&segment(prefix, false));
        let block = segment(filler, false);
        for _ in 0..n {
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&segment(suffix, true));
        out.extend_from_slice(&[0; 8]);
        out
    }

    fn small_limits() -> Limits {
        Limits {
            max_response_buffer_bytes: 256 * 1024,
            max_sse_line_bytes: 64 * 1024,
            max_decoded_response_bytes: 4 * 1024 * 1024,
            ..Limits::default()
        }
    }

    fn exchange_with(kind: ApiKind, body: &str, limits: Limits) -> Exchange {
        let facts = parse_request(kind, body.as_bytes()).unwrap();
        Exchange::new(kind, "t".into(), facts, limits)
    }

    /// Feeds `wire` in `chunk`-byte pieces, checking the memory bound after each.
    fn pump(x: &mut Exchange, wire: &[u8], chunk: usize) {
        let bound = Exchange::held_bytes_bound(&x.limits, 0);
        let mut peak = 0;
        for piece in wire.chunks(chunk) {
            assert!(
                x.on_response_chunk(piece, false).is_none(),
                "bytes are passed untouched"
            );
            peak = peak.max(x.held_bytes());
            assert!(x.held_bytes() <= bound, "{} > {bound}", x.held_bytes());
        }
        x.on_response_complete();
        // Far below the bound in practice: the bound is what a fuzzer may assert.
        assert!(peak <= bound);
    }

    const BOMB_JSON_HEAD: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    const BOMB_JSON_TAIL: &[u8] =
        br#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7}}"#;

    #[test]
    fn gzip_bomb_json_stops_at_the_decode_cap_and_falls_back() {
        // 64 MiB decoded from ~64 KiB on the wire; the cap is 4 MiB (decoding stops there).
        let filler = vec![b'a'; 1 << 20];
        for wrapper in ["gzip", "zlib", "raw"] {
            let wire = bomb(wrapper, BOMB_JSON_HEAD, &filler, 64, BOMB_JSON_TAIL);
            assert!(wire.len() < 128 * 1024, "{}", wire.len());
            let mut x = exchange_with(ApiKind::ChatCompletions, r#"{"model":"m"}"#, small_limits());
            x.set_reservation(40, 60);
            x.on_response_headers(
                200,
                Some(b"application/json"),
                Some(if wrapper == "gzip" {
                    b"gzip"
                } else {
                    b"deflate"
                }),
            );
            pump(&mut x, &wire, 16 * 1024);
            assert!(matches!(x.decoder, Decoder::Capped), "{wrapper}");
            assert!(!x.wants_response_body());
            let (usage, source) = x.finish(false);
            assert_eq!(
                (usage.input, usage.output, source),
                (40, 60, UsageSource::Reservation)
            );
            assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::DecodeLimit));
            assert!(
                x.record()
                    .contains(&("tollgate.usage_anomaly", "decode_limit".to_string()))
            );
        }
    }

    #[test]
    fn large_compressed_json_within_the_cap_is_read_through_a_bounded_tail() {
        // 3 MiB decoded (over max_response_buffer_bytes, under the decode cap), fed in one piece.
        let filler = vec![b'a'; 1 << 20];
        let wire = bomb("gzip", BOMB_JSON_HEAD, &filler, 3, BOMB_JSON_TAIL);
        let mut x = exchange_with(ApiKind::ChatCompletions, r#"{"model":"m"}"#, small_limits());
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        pump(&mut x, &wire, wire.len());
        let (usage, source) = x.finish(false);
        assert_eq!(
            (usage.input, usage.output, source),
            (11, 7, UsageSource::Reported)
        );
        assert_eq!(x.usage_anomaly(), None);
    }

    #[test]
    fn gzip_bomb_sse_keeps_observed_output() {
        let head = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"yo\"}}]}\n\n";
        let tail = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        let comment_lines = [b": keep-alive ".as_slice(), &[b'a'; 1010], b"\n"].concat();
        // Many short lines, and one endless line, each well past the cap.
        for (filler, n) in [(comment_lines, 8192), (vec![b'a'; 1 << 20], 16)] {
            let line_head = [&head[..], b"data: {\"choices\":[{\"delta\":{\"content\":\""].concat();
            let prefix: &[u8] = if filler.len() > 4096 {
                &line_head
            } else {
                head
            };
            let wire = bomb("gzip", prefix, &filler, n, tail);
            let mut x = exchange_with(
                ApiKind::ChatCompletions,
                r#"{"model":"m","stream":true}"#,
                small_limits(),
            );
            x.set_reservation(40, 60);
            x.on_response_headers(200, Some(b"text/event-stream"), Some(b"gzip"));
            pump(&mut x, &wire, 4096);
            let (usage, source) = x.finish(false);
            assert_eq!(
                (usage.input, usage.output, source),
                (x.facts.prompt_estimate, 2, UsageSource::Observed)
            );
            assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::DecodeLimit));
        }
    }

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
    fn gzip_header_fields_and_byte_by_byte_delivery() {
        // FEXTRA, FNAME, FCOMMENT and FHCRC, then the deflate data.
        let deflated = bomb("raw", CHAT_JSON, b"", 0, b"");
        let mut wire = vec![
            0x1f,
            0x8b,
            8,
            0x04 | 0x08 | 0x10 | 0x02,
            0,
            0,
            0,
            0,
            0,
            0xff,
        ];
        wire.extend_from_slice(&[3, 0, b'x', b'y', b'z']);
        wire.extend_from_slice(b"name.json\0a comment\0");
        wire.extend_from_slice(&[0xaa, 0xbb]);
        wire.extend_from_slice(&deflated);
        wire.extend_from_slice(&[0; 8]); // trailer (not checked)
        let mut x = exchange(ApiKind::ChatCompletions);
        x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
        pump(&mut x, &wire, 1);
        assert_eq!(x.finish(false), (x.finish(false).0, UsageSource::Reported));
        assert_eq!(x.finish(false).0.output, 7);
        // Not gzip at all, or a header that never ends: no usage, flagged, no panic.
        for bad in [
            b"PK\x03\x04 not gzip".to_vec(),
            [
                &[0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 0][..],
                &vec![b'n'; 70_000],
            ]
            .concat(),
        ] {
            let mut x = exchange(ApiKind::ChatCompletions);
            x.on_response_headers(200, Some(b"application/json"), Some(b"gzip"));
            pump(&mut x, &bad, 1000);
            assert_eq!(x.finish(false).1, UsageSource::Reservation);
            assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::DecodeError));
        }
    }

    #[test]
    fn absurd_usage_is_clamped_to_the_request_bounds() {
        let absurd = format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":{m},"completion_tokens":{m},"prompt_tokens_details":{{"cached_tokens":{m}}},"completion_tokens_details":{{"reasoning_tokens":{m}}}}}}}"#,
            m = 1u64 << 63
        );
        let body = r#"{"model":"m","max_completion_tokens":50}"#;
        let mut x = exchange_with(ApiKind::ChatCompletions, body, Limits::default());
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(absurd.as_bytes());
        x.on_response_complete();
        let (usage, source) = x.finish(false);
        let input = body.len() as u64 + 2_000_000;
        assert_eq!(
            usage,
            Usage {
                input,
                output: 50,
                cached_input: input,
                cache_write_input: 0,
                reasoning: 50
            }
        );
        assert_eq!(source, UsageSource::Reported);
        assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::Clamped));
        // No max tokens: the configured bound.
        let mut y = exchange_with(
            ApiKind::ChatCompletions,
            r#"{"model":"m"}"#,
            Limits::default(),
        );
        y.on_response_headers(200, Some(b"application/json"), None);
        y.on_response_body(absurd.as_bytes());
        y.on_response_complete();
        assert_eq!(y.finish(false).0.output, 2_000_000);
        // Chat's n choices each get max tokens.
        let mut n = exchange_with(
            ApiKind::ChatCompletions,
            r#"{"model":"m","max_tokens":50,"n":3}"#,
            Limits::default(),
        );
        n.on_response_headers(200, Some(b"application/json"), None);
        n.on_response_body(absurd.as_bytes());
        n.on_response_complete();
        assert_eq!(n.finish(false).0.output, 150);
        // Anthropic: the cache split is kept within the clamped input.
        let bounds = UsageBounds {
            input: 100,
            output: 10,
        };
        let (u, over) = bounds.clamp(Usage {
            input: 500,
            output: 5,
            cached_input: 80,
            cache_write_input: 400,
            reasoning: 0,
        });
        assert!(over);
        assert_eq!(
            (u.input, u.cached_input, u.cache_write_input, u.output),
            (100, 80, 20, 5)
        );
        // Ordinary usage is untouched and not an anomaly.
        let mut z = exchange(ApiKind::ChatCompletions);
        z.on_response_headers(200, Some(b"application/json"), None);
        z.on_response_body(CHAT_JSON);
        z.on_response_complete();
        assert_eq!(z.finish(false).0.output, 7);
        assert_eq!(z.usage_anomaly(), None);
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

    proptest::proptest! {
        /// The tail buffer always ends with the body's last bytes and stays within its bound.
        #[test]
        fn tail_buffer_keeps_the_last_bytes(
            cap in 1usize..200_000,
            sizes in proptest::collection::vec(0usize..80_000, 0..8),
        ) {
            let mut buf = TailBuffer::new(cap);
            let mut all = Vec::new();
            for (i, n) in sizes.into_iter().enumerate() {
                let chunk: Vec<u8> = (0..n).map(|j| (i * 7 + j) as u8).collect();
                buf.push(&chunk);
                all.extend_from_slice(&chunk);
                let keep = JSON_TAIL_BYTES.min(cap);
                proptest::prop_assert!(buf.bytes.len() <= cap.max(2 * keep));
                proptest::prop_assert!(all.ends_with(&buf.bytes));
                proptest::prop_assert!(buf.bytes.len() >= keep.min(all.len()));
                proptest::prop_assert_eq!(buf.truncated, all.len() > cap);
                if !buf.truncated {
                    proptest::prop_assert_eq!(&buf.bytes, &all);
                }
            }
        }
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
        assert_eq!(x.usage_anomaly(), None);
    }
}
