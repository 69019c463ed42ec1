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
