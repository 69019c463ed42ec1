//! Incremental decoder of the AWS event stream (`application/vnd.amazon.eventstream`), the binary
//! framing of Bedrock's `converse-stream` and `invoke-with-response-stream` answers.
//!
//! # Wire format (one message; all integers big-endian)
//!
//! ```text
//! total length u32 | headers length u32 | prelude CRC32 (of the 8 bytes before it)
//! headers (headers length bytes) | payload | message CRC32 (of every byte before it)
//! header = name length u8 | name | value type u8 | value
//! value  = 0 true, 1 false (no bytes) | 2 byte i8 | 3 short i16 | 4 int i32 | 5 long i64
//!        | 6 byte array (u16 length + bytes) | 7 string (u16 length + UTF-8) | 8 timestamp i64 (ms)
//!        | 9 uuid (16 bytes)
//! ```
//!
//! # Incremental, bounded, final
//!
//! [`Decoder::decode`] takes the body chunk by chunk as it streams past, split anywhere. A message
//! that lies whole inside one chunk is returned borrowed from it (no copy); otherwise its bytes are
//! kept until it is complete, and it is returned borrowed from the decoder. So the decoder holds
//! at most one unfinished message: at most [`Limits::max_message_bytes`] bytes of heap, ever. The
//! 12-byte prelude is checked (its CRC, then the lengths against [`Limits`]) before a single byte
//! of the message body is kept, so an absurd declared length never allocates.
//!
//! Any fault (a bad CRC, a length out of bounds, a malformed header, see [`DecodeError`]) stops
//! decoding **for good**: the rest of the stream cannot be framed again with any confidence, so
//! every later call returns the same error and drops its input. The caller (the Bedrock reader in
//! `bedrock_stream`) then falls back and flags `usage_anomaly`; the client still receives the
//! upstream's bytes unchanged, since the decoder only reads.
//!
//! Decisions where the specification is silent: header names and string values are bytes (not
//! checked as UTF-8: the decoder only compares them); an empty header name is allowed; one of the
//! six headers the readers act on appearing twice is an error (botocore refuses any repeated
//! name; other names are not compared, which would cost quadratic time), and for the others
//! [`Message::header`] takes the last.

use core::fmt;

/// The prelude: total length, headers length, prelude CRC.
const PRELUDE_BYTES: usize = 12;
/// Prelude plus the message CRC: the smallest message (no headers, no payload).
const MIN_MESSAGE_BYTES: usize = PRELUDE_BYTES + 4;

/// The default bound of one message. Bedrock's frames are small (a Converse delta or an Invoke
/// `chunk` is a few hundred bytes, a `metadata` event about 200), so 1 MiB leaves three orders of
/// magnitude of headroom while capping what one stream can make the filter hold; it is the same
/// figure as `limits.max_sse_line_bytes`, the bound of the SSE line a message plays the part of.
/// (The protocol allows 16 MiB of payload; botocore accepts up to 24 MiB.)
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// The default bound of one message's header block: the protocol's own limit (128 KiB, which
/// botocore enforces too), so the decoder never refuses a header block the client SDK accepts.
/// Bedrock sends three short headers (about 90 bytes).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 128 * 1024;

/// The bounds a decoder enforces; a message over either stops decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest total length (prelude, headers, payload and CRC) accepted; also the most heap
    /// the decoder ever holds. Values under 16 are read as 16.
    pub max_message_bytes: usize,
    /// Largest header block accepted.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

/// Why decoding stopped. Every variant is final (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The prelude's CRC32 does not match its 8 bytes.
    PreludeCrc,
    /// The message's CRC32 does not match the bytes before it.
    MessageCrc,
    /// The declared total length is under 16 bytes (no room for the prelude and the CRC).
    MessageTooShort { total: u32 },
    /// The declared total length is over [`Limits::max_message_bytes`].
    MessageTooLong { total: u32 },
    /// The declared header block is over [`Limits::max_header_bytes`].
    HeadersTooLong { headers: u32 },
    /// The declared header block does not fit in the declared message.
    HeadersPastEnd { headers: u32, total: u32 },
    /// A header is cut short by the end of the header block, or has an unknown value type.
    MalformedHeader { offset: u32 },
    /// One of the headers the readers act on (`:message-type`, `:event-type`, `:exception-type`,
    /// `:error-code`, `:error-message`, `:content-type`) appears twice: botocore refuses such a
    /// message (`DuplicateHeader`), and which one counts would be a guess.
    DuplicateHeader { offset: u32 },
    /// The stream ended inside a message (reported by [`Decoder::finish`]).
    Truncated,
}

impl DecodeError {
    /// A short stable name, for logs and the `usage_anomaly` detail.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeError::PreludeCrc => "eventstream_prelude_crc",
            DecodeError::MessageCrc => "eventstream_message_crc",
            DecodeError::MessageTooShort { .. } => "eventstream_message_too_short",
            DecodeError::MessageTooLong { .. } => "eventstream_message_too_long",
            DecodeError::HeadersTooLong { .. } => "eventstream_headers_too_long",
            DecodeError::HeadersPastEnd { .. } => "eventstream_headers_past_end",
            DecodeError::MalformedHeader { .. } => "eventstream_malformed_header",
            DecodeError::DuplicateHeader { .. } => "eventstream_duplicate_header",
            DecodeError::Truncated => "eventstream_truncated",
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Incremental event-stream decoder for one response. See the module documentation.
#[derive(Debug, Clone)]
pub struct Decoder {
    limits: Limits,
    /// The unfinished message (never more than `max_message_bytes`, capacity included).
    buf: Vec<u8>,
    /// The total length of the message in `buf`, once its prelude passed its checks.
    total: usize,
    /// `buf` holds a message already returned: clear it on the next call.
    returned: bool,
    failed: Option<DecodeError>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits: Limits {
                max_message_bytes: limits.max_message_bytes.max(MIN_MESSAGE_BYTES),
                max_header_bytes: limits.max_header_bytes,
            },
            buf: Vec::new(),
            total: 0,
            returned: false,
            failed: None,
        }
    }

    /// Consumes bytes from the front of `input` up to the end of the next whole message and
    /// returns it (`input` then holds what follows it). `Ok(None)`: `input` is used up and the
    /// message it ended in is kept for the next chunk. After an error `input` is emptied and
    /// every later call returns the same error.
    ///
    /// Call it in a loop until it returns `Ok(None)` or an error.
    pub fn decode<'a, 'b: 'a>(
        &'a mut self,
        input: &mut &'b [u8],
    ) -> Result<Option<Message<'a>>, DecodeError> {
        if let Some(error) = self.failed {
            *input = &[];
            return Err(error);
        }
        if self.returned {
            self.returned = false;
            self.buf.clear();
            self.total = 0;
        }
        if input.is_empty() {
            return Ok(None);
        }
        let data: &'b [u8] = input;
        if self.buf.is_empty()
            && let Some(prelude) = data.get(..PRELUDE_BYTES)
        {
            // Zero-copy: the prelude is here; if the whole message is too, borrow it.
            let total = self.check_prelude(prelude, input)?;
            if let Some((whole, rest)) = data.split_at_checked(total) {
                let headers_len = self.check_message(whole, input)?;
                *input = rest;
                return Ok(Some(Message::new(whole, headers_len)));
            }
        }
        if self.buf.len() < PRELUDE_BYTES {
            if self.buf.is_empty() {
                self.buf.reserve_exact(PRELUDE_BYTES);
            }
            let need = PRELUDE_BYTES.saturating_sub(self.buf.len());
            self.take(input, need);
            let Some(prelude) = self.buf.get(..PRELUDE_BYTES) else {
                return Ok(None);
            };
            let mut prelude_copy = [0u8; PRELUDE_BYTES];
            prelude_copy.copy_from_slice(prelude);
            self.total = self.check_prelude(&prelude_copy, input)?;
            self.buf
                .reserve_exact(self.total.saturating_sub(self.buf.len()));
        }
        let need = self.total.saturating_sub(self.buf.len());
        self.take(input, need);
        if self.buf.len() < self.total {
            return Ok(None);
        }
        let headers_len = match check_message(&self.buf, &self.limits) {
            Ok(headers_len) => headers_len,
            Err(error) => return Err(self.fail(error, input)),
        };
        self.returned = true;
        Ok(Some(Message::new(&self.buf, headers_len)))
    }

    /// End of the stream: `Err(Truncated)` if it ended inside a message (then final, like any
    /// error), the earlier error if decoding had stopped, else `Ok`. Frees the buffer.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        let pending = !self.returned && !self.buf.is_empty();
        self.buf = Vec::new();
        self.total = 0;
        self.returned = false;
        if let Some(error) = self.failed {
            return Err(error);
        }
        if pending {
            self.failed = Some(DecodeError::Truncated);
            return Err(DecodeError::Truncated);
        }
        Ok(())
    }

    /// Why decoding stopped, if it did.
    pub fn error(&self) -> Option<DecodeError> {
        self.failed
    }

    /// Bytes of the unfinished (or last returned) message held: at most `max_message_bytes`.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Heap the decoder holds (its buffer's capacity): at most `max_message_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity()
    }

    fn take(&mut self, input: &mut &[u8], n: usize) {
        let data: &[u8] = input;
        let (head, rest) = data.split_at_checked(n).unwrap_or((data, &[]));
        self.buf.extend_from_slice(head);
        *input = rest;
    }

    fn fail(&mut self, error: DecodeError, input: &mut &[u8]) -> DecodeError {
        self.failed = Some(error);
        self.buf = Vec::new();
        self.total = 0;
        *input = &[];
        error
    }

    /// Checks a 12-byte prelude; returns the message's total length.
    fn check_prelude(&mut self, prelude: &[u8], input: &mut &[u8]) -> Result<usize, DecodeError> {
        check_prelude(prelude, &self.limits).map_err(|error| self.fail(error, input))
    }

    fn check_message(&mut self, whole: &[u8], input: &mut &[u8]) -> Result<usize, DecodeError> {
        check_message(whole, &self.limits).map_err(|error| self.fail(error, input))
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at.saturating_add(4)) {
        word.copy_from_slice(src);
    }
    u32::from_be_bytes(word)
}

fn check_prelude(prelude: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    let total = be_u32(prelude, 0);
    let headers = be_u32(prelude, 4);
    if crc32fast::hash(prelude.get(..8).unwrap_or_default()) != be_u32(prelude, 8) {
        return Err(DecodeError::PreludeCrc);
    }
    let total_len = usize::try_from(total).unwrap_or(usize::MAX);
    let headers_len = usize::try_from(headers).unwrap_or(usize::MAX);
    if total_len < MIN_MESSAGE_BYTES {
        return Err(DecodeError::MessageTooShort { total });
    }
    if total_len > limits.max_message_bytes {
        return Err(DecodeError::MessageTooLong { total });
    }
    if headers_len > limits.max_header_bytes {
        return Err(DecodeError::HeadersTooLong { headers });
    }
    if headers_len > total_len.saturating_sub(MIN_MESSAGE_BYTES) {
        return Err(DecodeError::HeadersPastEnd { headers, total });
    }
    Ok(total_len)
}

/// Checks a whole message (its prelude already checked): the message CRC, then every header.
/// Returns the header block's length.
fn check_message(whole: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    check_prelude(whole, limits)?;
    let crc_at = whole.len().saturating_sub(4);
    if crc32fast::hash(whole.get(..crc_at).unwrap_or_default()) != be_u32(whole, crc_at) {
        return Err(DecodeError::MessageCrc);
    }
    let headers_len = usize::try_from(be_u32(whole, 4)).unwrap_or(usize::MAX);
    let block = whole
        .get(PRELUDE_BYTES..PRELUDE_BYTES.saturating_add(headers_len))
        .unwrap_or_default();
    let mut headers = Headers { rest: block };
    let mut seen = 0u8;
    while !headers.rest.is_empty() {
        let offset = block.len().saturating_sub(headers.rest.len());
        let offset = u32::try_from(offset).unwrap_or(u32::MAX);
        let Some(header) = headers.next_header() else {
            return Err(DecodeError::MalformedHeader { offset });
        };
        if let Some(i) = KNOWN_HEADERS.iter().position(|known| *known == header.name) {
            let bit = 1u8 << (i & 7);
            if seen & bit != 0 {
                return Err(DecodeError::DuplicateHeader { offset });
            }
            seen |= bit;
        }
    }
    Ok(headers_len)
}

/// The headers whose value the readers act on: each may appear once.
const KNOWN_HEADERS: [&[u8]; 6] = [
    b":message-type",
    b":event-type",
    b":exception-type",
    b":error-code",
    b":error-message",
    b":content-type",
];

/// The `:message-type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// `event`: an event of the operation's stream (`:event-type` names it).
    Event,
    /// `exception`: a modelled error inside the stream (`:exception-type` names it).
    Exception,
    /// `error`: an unmodelled error (`:error-code`, `:error-message`).
    Error,
    /// Missing, not a string, or another value.
    Other,
}

/// One decoded message, borrowed from the input chunk or from the decoder. Its CRCs and headers
/// were checked when it was decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    headers: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Message<'a> {
    fn new(whole: &'a [u8], headers_len: usize) -> Self {
        let body_end = whole.len().saturating_sub(4);
        let headers_end = PRELUDE_BYTES.saturating_add(headers_len).min(body_end);
        Message {
            headers: whole.get(PRELUDE_BYTES..headers_end).unwrap_or_default(),
            payload: whole.get(headers_end..body_end).unwrap_or_default(),
        }
    }

    /// The payload bytes (JSON for Bedrock).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Every header, in wire order.
    pub fn headers(&self) -> Headers<'a> {
        Headers { rest: self.headers }
    }

    /// The value of the header `name` (the last one when it repeats).
    pub fn header(&self, name: &[u8]) -> Option<HeaderValue<'a>> {
        self.headers()
            .filter(|h| h.name == name)
            .last()
            .map(|h| h.value)
    }

    /// A string header's value; `None` when missing or of another type.
    pub fn string_header(&self, name: &[u8]) -> Option<&'a [u8]> {
        match self.header(name) {
            Some(HeaderValue::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn message_type(&self) -> MessageType {
        match self.string_header(b":message-type") {
            Some(b"event") => MessageType::Event,
            Some(b"exception") => MessageType::Exception,
            Some(b"error") => MessageType::Error,
            _ => MessageType::Other,
        }
    }

    /// `:event-type` (`metadata`, `chunk`, `contentBlockDelta`, …).
    pub fn event_type(&self) -> Option<&'a [u8]> {
        self.string_header(b":event-type")
    }

    /// `:exception-type` (`throttlingException`, `modelStreamErrorException`, …).
    pub fn exception_type(&self) -> Option<&'a [u8]> {
        self.string_header(b":exception-type")
    }

    /// `:error-code` of an `error` message.
    pub fn error_code(&self) -> Option<&'a [u8]> {
        self.string_header(b":error-code")
    }

    /// `:error-message` of an `error` message.
    pub fn error_message(&self) -> Option<&'a [u8]> {
        self.string_header(b":error-message")
    }

    /// `:content-type` (`application/json`).
    pub fn content_type(&self) -> Option<&'a [u8]> {
        self.string_header(b":content-type")
    }
}

/// One header's value (see the module documentation for the wire types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(&'a [u8]),
    String(&'a [u8]),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
}

/// One header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a [u8],
    pub value: HeaderValue<'a>,
}

/// The headers of a message, in wire order. Over a checked message it yields every header; over
/// a malformed block it stops at the fault.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Headers<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Some(out)
    }

    fn next_header(&mut self) -> Option<Header<'a>> {
        let [name_len] = self.array::<1>()?;
        let name = self.bytes(usize::from(name_len))?;
        let [kind] = self.array::<1>()?;
        let value = match kind {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(i8::from_be_bytes(self.array()?)),
            3 => HeaderValue::Short(i16::from_be_bytes(self.array()?)),
            4 => HeaderValue::Int(i32::from_be_bytes(self.array()?)),
            5 => HeaderValue::Long(i64::from_be_bytes(self.array()?)),
            6 | 7 => {
                let len = u16::from_be_bytes(self.array()?);
                let bytes = self.bytes(usize::from(len))?;
                if kind == 6 {
                    HeaderValue::Bytes(bytes)
                } else {
                    HeaderValue::String(bytes)
                }
            }
            8 => HeaderValue::Timestamp(i64::from_be_bytes(self.array()?)),
            9 => HeaderValue::Uuid(self.array()?),
            _ => return None,
        };
        Some(Header { name, value })
    }
}

impl<'a> Iterator for Headers<'a> {
    type Item = Header<'a>;

    fn next(&mut self) -> Option<Header<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let header = self.next_header();
        if header.is_none() {
            self.rest = &[];
        }
        header
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::testing::split_at_cuts;
    use proptest::prelude::*;

    pub(crate) const CONVERSE: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/converse_stream.bin");
    pub(crate) const INVOKE: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/invoke_stream.bin");
    pub(crate) const CONVERSE_THROTTLED: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/converse_throttled.bin");
    pub(crate) const INVOKE_ERROR: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/invoke_stream_error.bin");
    pub(crate) const INVOKE_METRICS_ONLY: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/invoke_stream_metrics_only.bin");
    const EVERY_HEADER_TYPE: &[u8] =
        include_bytes!("../../tests/fixtures/eventstream/every_header_type.bin");

    pub(crate) const FIXTURES: [&[u8]; 6] = [
        CONVERSE,
        INVOKE,
        CONVERSE_THROTTLED,
        INVOKE_ERROR,
        INVOKE_METRICS_ONLY,
        EVERY_HEADER_TYPE,
    ];

    /// Encodes one message (the tests' own encoder, for corrupt and edge cases).
    pub(crate) fn frame(header_block: &[u8], payload: &[u8]) -> Vec<u8> {
        let total = (16 + header_block.len() + payload.len()) as u32;
        let mut out = total.to_be_bytes().to_vec();
        out.extend_from_slice(&(header_block.len() as u32).to_be_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(header_block);
        out.extend_from_slice(payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// A string header.
    pub(crate) fn string_header(name: &str, value: &str) -> Vec<u8> {
        let mut out = vec![name.len() as u8];
        out.extend_from_slice(name.as_bytes());
        out.push(7);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
        out
    }

    /// An event as Bedrock frames it.
    pub(crate) fn event(event_type: &str, payload: &[u8]) -> Vec<u8> {
        let mut headers = string_header(":event-type", event_type);
        headers.extend(string_header(":content-type", "application/json"));
        headers.extend(string_header(":message-type", "event"));
        frame(&headers, payload)
    }

    /// Rewrites the prelude's lengths (and its CRC, so the lengths are what is tested).
    fn with_prelude(mut message: Vec<u8>, total: u32, headers: u32) -> Vec<u8> {
        message[0..4].copy_from_slice(&total.to_be_bytes());
        message[4..8].copy_from_slice(&headers.to_be_bytes());
        let crc = crc32fast::hash(&message[0..8]);
        message[8..12].copy_from_slice(&crc.to_be_bytes());
        message
    }

    /// Recomputes the message CRC after an edit.
    fn reseal(mut message: Vec<u8>) -> Vec<u8> {
        let end = message.len() - 4;
        let crc = crc32fast::hash(&message[..end]);
        message[end..].copy_from_slice(&crc.to_be_bytes());
        message
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Seen {
        message_type: MessageType,
        event_type: Option<Vec<u8>>,
        exception_type: Option<Vec<u8>>,
        error: Option<(Vec<u8>, Vec<u8>)>,
        content_type: Option<Vec<u8>>,
        headers: usize,
        payload: Vec<u8>,
    }

    fn seen(m: &Message<'_>) -> Seen {
        Seen {
            message_type: m.message_type(),
            event_type: m.event_type().map(<[u8]>::to_vec),
            exception_type: m.exception_type().map(<[u8]>::to_vec),
            error: m
                .error_code()
                .map(|c| (c.to_vec(), m.error_message().unwrap_or_default().to_vec())),
            content_type: m.content_type().map(<[u8]>::to_vec),
            headers: m.headers().count(),
            payload: m.payload().to_vec(),
        }
    }

    type Outcome = (Vec<Seen>, Result<(), DecodeError>);

    fn run_with(limits: Limits, chunks: &[&[u8]]) -> Outcome {
        let mut d = Decoder::new(limits);
        let mut out = Vec::new();
        let bound = limits.max_message_bytes.max(MIN_MESSAGE_BYTES);
        let mut result = Ok(());
        for chunk in chunks {
            let mut input = *chunk;
            loop {
                match d.decode(&mut input) {
                    Ok(Some(m)) => out.push(seen(&m)),
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        assert!(input.is_empty());
                        break;
                    }
                }
            }
            assert!(d.held_bytes() <= bound, "memory bound");
            assert!(d.buffered_bytes() <= bound, "memory bound");
        }
        let finish = d.finish();
        if result.is_ok() {
            result = finish;
        } else {
            assert_eq!(finish, result, "errors are final");
        }
        assert_eq!(d.held_bytes(), 0);
        (out, result)
    }

    fn run(chunks: &[&[u8]]) -> Outcome {
        run_with(Limits::default(), chunks)
    }

    #[test]
    fn fixtures_decode_as_botocore_built_them() {
        let (frames, result) = run(&[CONVERSE]);
        assert_eq!(result, Ok(()));
        let events: Vec<&[u8]> = frames
            .iter()
            .map(|f| f.event_type.as_deref().unwrap())
            .collect();
        assert_eq!(
            events,
            [
                &b"messageStart"[..],
                b"contentBlockDelta",
                b"contentBlockDelta",
                b"contentBlockStop",
                b"messageStop",
                b"metadata"
            ]
        );
        for f in &frames {
            assert_eq!(f.message_type, MessageType::Event);
            assert_eq!(f.content_type.as_deref(), Some(&b"application/json"[..]));
            assert_eq!(f.headers, 3);
        }
        assert!(
            frames[5]
                .payload
                .starts_with(b"{\"metrics\":{\"latencyMs\":812}")
        );

        let (frames, result) = run(&[INVOKE]);
        assert_eq!(result, Ok(()));
        assert_eq!(frames.len(), 7);
        assert!(
            frames
                .iter()
                .all(|f| f.event_type.as_deref() == Some(b"chunk"))
        );
        assert!(
            frames[0]
                .payload
                .starts_with(b"{\"bytes\":\"eyJ0eXBlIjoibWVzc2FnZV9zdGFydCIs")
        );

        let (frames, result) = run(&[CONVERSE_THROTTLED]);
        assert_eq!(result, Ok(()));
        let last = frames.last().unwrap();
        assert_eq!(last.message_type, MessageType::Exception);
        assert_eq!(
            last.exception_type.as_deref(),
            Some(&b"throttlingException"[..])
        );
        assert_eq!(last.event_type, None);
        assert_eq!(
            last.payload,
            b"{\"message\":\"Too many requests, please wait before trying again.\"}"
        );

        let (frames, _) = run(&[INVOKE_ERROR]);
        assert_eq!(
            frames.last().unwrap().exception_type.as_deref(),
            Some(&b"modelStreamErrorException"[..])
        );
    }

    #[test]
    fn every_header_type_reads_its_value() {
        let mut d = Decoder::new(Limits::default());
        let mut input = EVERY_HEADER_TYPE;
        let m = d.decode(&mut input).unwrap().unwrap();
        let headers: Vec<(&[u8], HeaderValue<'_>)> =
            m.headers().map(|h| (h.name, h.value)).collect();
        assert_eq!(
            headers,
            [
                (&b"t"[..], HeaderValue::Bool(true)),
                (b"f", HeaderValue::Bool(false)),
                (b"byte", HeaderValue::Byte(-7)),
                (b"short", HeaderValue::Short(-300)),
                (b"int", HeaderValue::Int(70000)),
                (b"long", HeaderValue::Long(-(1 << 40))),
                (b"bytes", HeaderValue::Bytes(b"\x00\xff\x10")),
                (b"string", HeaderValue::String("h\u{e9}".as_bytes())),
                (b"timestamp", HeaderValue::Timestamp(1_751_000_000_123)),
                (
                    b"uuid",
                    HeaderValue::Uuid([
                        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67,
                        0x89, 0xab, 0xcd, 0xef
                    ])
                ),
                (b":message-type", HeaderValue::String(b"event")),
                (b":event-type", HeaderValue::String(b"custom")),
            ]
        );
        assert_eq!(m.payload(), b"payload");
        assert_eq!(m.event_type(), Some(&b"custom"[..]));
        assert_eq!(m.header(b"int"), Some(HeaderValue::Int(70000)));
        // A non-string value is no string header.
        assert_eq!(m.string_header(b"int"), None);
        // No headers, no payload.
        let m = d.decode(&mut input).unwrap().unwrap();
        assert_eq!((m.headers().count(), m.payload()), (0, &b""[..]));
        assert_eq!(m.message_type(), MessageType::Other);
        // An error message.
        let m = d.decode(&mut input).unwrap().unwrap();
        assert_eq!(m.message_type(), MessageType::Error);
        assert_eq!(m.error_code(), Some(&b"InternalFailure"[..]));
        assert_eq!(m.error_message(), Some(&b"boom"[..]));
        assert_eq!(d.decode(&mut input), Ok(None));
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn every_two_chunk_split_matches_whole() {
        for bytes in FIXTURES {
            let whole = run(&[bytes]);
            assert_eq!(whole.1, Ok(()));
            for cut in 0..=bytes.len() {
                let (a, b) = bytes.split_at(cut);
                assert_eq!(run(&[a, b]), whole, "cut {cut}");
            }
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(run(&bytewise), whole);
        }
    }

    #[test]
    fn whole_messages_in_one_chunk_are_borrowed_not_copied() {
        let mut d = Decoder::new(Limits::default());
        let mut input = CONVERSE;
        while let Some(m) = d.decode(&mut input).unwrap() {
            let payload = m.payload().as_ptr_range();
            assert!(CONVERSE.as_ptr_range().contains(&payload.start));
        }
        assert_eq!(d.held_bytes(), 0);
    }

    /// The first message of the Converse fixture, and where its parts are.
    fn first_converse_message() -> Vec<u8> {
        let total = u32::from_be_bytes(CONVERSE[0..4].try_into().unwrap()) as usize;
        CONVERSE[..total].to_vec()
    }

    /// Corrupt variants of a stream whose first message is fine: each gives its typed error,
    /// after the messages before it, whatever the split, within the memory bound.
    fn assert_fails_after_first(corrupt: &[u8], want: DecodeError, limits: Limits) {
        let mut stream = first_converse_message();
        stream.extend_from_slice(corrupt);
        stream.extend_from_slice(CONVERSE);
        let whole = run_with(limits, &[&stream]);
        assert_eq!(whole.0.len(), 1, "{want:?}");
        assert_eq!(whole.1, Err(want));
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(run_with(limits, &[a, b]), whole, "{want:?} cut {cut}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run_with(limits, &bytewise), whole);
    }

    #[test]
    fn flipped_bits_in_either_crc_stop_decoding() {
        let message = first_converse_message();
        let end = message.len() - 4;
        for bit in 0..32 {
            let mut bad = message.clone();
            bad[8 + bit / 8] ^= 1 << (bit % 8);
            assert_fails_after_first(&bad, DecodeError::PreludeCrc, Limits::default());
            let mut bad = message.clone();
            bad[end + bit / 8] ^= 1 << (bit % 8);
            assert_fails_after_first(&bad, DecodeError::MessageCrc, Limits::default());
        }
        // A flipped bit in the lengths, the headers or the payload: one CRC or the other.
        let mut bad = message.clone();
        bad[1] ^= 0x10;
        assert_fails_after_first(&bad, DecodeError::PreludeCrc, Limits::default());
        let mut bad = message.clone();
        bad[14] ^= 1;
        assert_fails_after_first(&bad, DecodeError::MessageCrc, Limits::default());
        let mut bad = message;
        bad[end - 1] ^= 0x80;
        assert_fails_after_first(&bad, DecodeError::MessageCrc, Limits::default());
    }

    #[test]
    fn absurd_lengths_stop_decoding_before_buffering() {
        let message = first_converse_message();
        let headers = u32::from_be_bytes(message[4..8].try_into().unwrap());
        for total in [u32::MAX, 1 << 31, (1 << 20) + 1] {
            let bad = with_prelude(message.clone(), total, headers);
            assert_fails_after_first(
                &bad,
                DecodeError::MessageTooLong { total },
                Limits::default(),
            );
        }
        for total in [0, 1, 15] {
            let bad = with_prelude(message.clone(), total, 0);
            assert_fails_after_first(
                &bad,
                DecodeError::MessageTooShort { total },
                Limits::default(),
            );
        }
        // Header block longer than the message (and than the whole stream).
        let total = message.len() as u32;
        for h in [total - 15, total, u32::MAX] {
            let limits = Limits {
                max_header_bytes: usize::MAX,
                ..Limits::default()
            };
            let bad = with_prelude(message.clone(), total, h);
            assert_fails_after_first(
                &bad,
                DecodeError::HeadersPastEnd { headers: h, total },
                limits,
            );
        }
        // The largest header block that fits is fine as far as the prelude goes.
        let fits = with_prelude(message.clone(), total, total - 16);
        assert!(check_prelude(&fits, &Limits::default()).is_ok());
        // Over the header bound.
        let limits = Limits {
            max_header_bytes: headers as usize - 1,
            ..Limits::default()
        };
        let mut stream = message.clone();
        stream.extend_from_slice(&message);
        let whole = run_with(limits, &[&stream]);
        assert_eq!(
            whole,
            (vec![], Err(DecodeError::HeadersTooLong { headers }))
        );
    }

    #[test]
    fn message_bound_is_inclusive() {
        let message = first_converse_message();
        let exact = Limits {
            max_message_bytes: message.len(),
            ..Limits::default()
        };
        assert_eq!(run_with(exact, &[&message]).1, Ok(()));
        let under = Limits {
            max_message_bytes: message.len() - 1,
            ..Limits::default()
        };
        let total = message.len() as u32;
        let chunks: Vec<&[u8]> = message.chunks(1).collect();
        assert_eq!(
            run_with(under, &chunks),
            (vec![], Err(DecodeError::MessageTooLong { total }))
        );
        // Tiny bounds are read as the smallest message.
        let tiny = Limits {
            max_message_bytes: 0,
            max_header_bytes: 0,
        };
        let empty = frame(&[], &[]);
        assert_eq!(run_with(tiny, &[&empty]).0.len(), 1);
    }

    #[test]
    fn malformed_headers_stop_decoding() {
        let ok = string_header(":event-type", "metadata");
        // Unknown value type 10.
        let mut bad = ok.clone();
        bad[12] = 10;
        assert_fails_after_first(
            &frame(&bad, b"{}"),
            DecodeError::MalformedHeader { offset: 0 },
            Limits::default(),
        );
        // Cut short: in the name, in the type, in the length, in the value.
        for keep in [1, 5, 12, 13, 14, ok.len() - 1] {
            let mut block = ok.clone();
            block.extend_from_slice(&ok[..keep]);
            assert_fails_after_first(
                &frame(&block, b"{}"),
                DecodeError::MalformedHeader {
                    offset: ok.len() as u32,
                },
                Limits::default(),
            );
        }
        // Fixed-size values cut short.
        for (kind, size) in [(2u8, 1usize), (3, 2), (4, 4), (5, 8), (8, 8), (9, 16)] {
            let mut block = vec![1, b'x', kind];
            block.extend(std::iter::repeat_n(0, size - 1));
            assert_fails_after_first(
                &frame(&block, b""),
                DecodeError::MalformedHeader { offset: 0 },
                Limits::default(),
            );
            block.push(0);
            assert_eq!(run(&[&frame(&block, b"")]).1, Ok(()));
        }
        // A known header twice.
        let mut twice = ok.clone();
        twice.extend(string_header(":message-type", "event"));
        twice.extend(string_header(":event-type", "chunk"));
        let offset = (ok.len() + string_header(":message-type", "event").len()) as u32;
        assert_fails_after_first(
            &frame(&twice, b"{}"),
            DecodeError::DuplicateHeader { offset },
            Limits::default(),
        );
        // Any other name may repeat (the last one is read).
        let mut other = string_header("x", "1");
        other.extend(string_header("x", "2"));
        let (frames, result) = run(&[&frame(&other, b"")]);
        assert_eq!((frames.len(), result), (1, Ok(())));
        let mut d = Decoder::new(Limits::default());
        let bytes = frame(&other, b"");
        let mut input = &bytes[..];
        let m = d.decode(&mut input).unwrap().unwrap();
        assert_eq!(m.string_header(b"x"), Some(&b"2"[..]));
    }

    #[test]
    fn a_stream_cut_inside_a_message_is_truncated() {
        for cut in 1..CONVERSE.len() {
            let (frames, result) = run(&[&CONVERSE[..cut]]);
            let boundary = result.is_ok();
            assert_eq!(result.is_err(), !boundary);
            if !boundary {
                assert_eq!(result, Err(DecodeError::Truncated));
            }
            assert!(frames.len() < 6);
        }
        // Resealed edits stay valid: the checks are the CRCs, not the bytes.
        let mut edited = first_converse_message();
        let at = edited.len() - 6;
        edited[at] = b' ';
        assert_eq!(run(&[&reseal(edited)]).1, Ok(()));
    }

    #[test]
    fn errors_are_final_and_drop_input() {
        let mut d = Decoder::new(Limits::default());
        let mut bad = first_converse_message();
        bad[9] ^= 1;
        let mut input = &bad[..];
        assert_eq!(d.decode(&mut input), Err(DecodeError::PreludeCrc));
        assert!(input.is_empty());
        let mut input = CONVERSE;
        assert_eq!(d.decode(&mut input), Err(DecodeError::PreludeCrc));
        assert!(input.is_empty());
        assert_eq!(d.error(), Some(DecodeError::PreludeCrc));
        assert_eq!(d.finish(), Err(DecodeError::PreludeCrc));
        assert_eq!(
            DecodeError::PreludeCrc.to_string(),
            "eventstream_prelude_crc"
        );
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
                which in 0usize..6,
                cuts in prop::collection::vec(any::<usize>(), 0..40),
            ) {
                let bytes = FIXTURES[which];
                prop_assert_eq!(run(&split_at_cuts(bytes, &cuts)), run(&[bytes]));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_stay_bounded(
                max in prop::sample::select(vec![0usize, 16, 64, 300, 1 << 20]),
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                cuts in prop::collection::vec(any::<usize>(), 0..64),
            ) {
                let limits = Limits { max_message_bytes: max, max_header_bytes: max };
                let split = run_with(limits, &split_at_cuts(&bytes, &cuts));
                prop_assert_eq!(split, run_with(limits, &[&bytes]));
            }

            #[test]
            fn corrupted_fixture_bytes_split_invariant(
                which in 0usize..6,
                flips in prop::collection::vec((any::<usize>(), 0u8..8), 1..4),
                cuts in prop::collection::vec(any::<usize>(), 0..16),
            ) {
                let mut bytes = FIXTURES[which].to_vec();
                for (at, bit) in flips {
                    let at = at % bytes.len();
                    bytes[at] ^= 1 << bit;
                }
                let whole = run(&[&bytes]);
                // CRC32 catches every change of up to three bits (flips may cancel out).
                prop_assert!(whole.1.is_err() || bytes == FIXTURES[which]);
                prop_assert_eq!(run(&split_at_cuts(&bytes, &cuts)), whole);
            }
        }
    }
}
