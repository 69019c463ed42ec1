//! The bounded incremental gzip/deflate decoder an exchange reads a compressed response through:
//! gzip header parsing, zlib or raw deflate, a fixed output buffer and a cap on decoded bytes.

use flate2::{Decompress, FlushDecompress, Status};

/// The decoder's output buffer: decoded bytes reach the readers in pieces of at most this.
pub(super) const INFLATE_OUT_BYTES: usize = 32 * 1024;
/// The inflate state (miniz_oxide: the 32 KiB window plus Huffman tables), counted as held.
pub const INFLATE_STATE_BYTES: usize = 48 * 1024;
/// The longest gzip header accepted (optional name, comment and extra fields included).
pub(super) const GZIP_HEADER_MAX: usize = 64 * 1024;

pub(super) enum Decoder {
    Identity,
    Inflate(Box<Inflater>),
    /// The stream could not be decoded; usage is lost for this response.
    Broken,
    /// The decoded output reached `max_decoded_response_bytes`: decoding stopped.
    Capped,
}

impl Decoder {
    /// The decoder for a response's `content-encoding`, producing at most `cap` decoded bytes.
    pub(super) fn for_encoding(content_encoding: Option<&[u8]>, cap: u64) -> Decoder {
        match content_encoding.map(<[u8]>::trim_ascii) {
            None | Some(b"") => Decoder::Identity,
            Some(enc) if enc.eq_ignore_ascii_case(b"identity") => Decoder::Identity,
            Some(enc)
                if enc.eq_ignore_ascii_case(b"gzip") || enc.eq_ignore_ascii_case(b"x-gzip") =>
            {
                Decoder::Inflate(Box::new(Inflater::new(Wrapper::Gzip, cap)))
            }
            Some(enc) if enc.eq_ignore_ascii_case(b"deflate") => {
                Decoder::Inflate(Box::new(Inflater::new(Wrapper::Deflate, cap)))
            }
            Some(_) => Decoder::Broken,
        }
    }
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
pub(super) enum Step {
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
pub(super) struct Inflater {
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

    pub(super) fn held_bytes(&self) -> usize {
        self.header
            .as_ref()
            .map_or(0, Vec::len)
            .saturating_add(self.out.len())
            .saturating_add(INFLATE_STATE_BYTES)
    }

    /// Decodes `input`, handing the output to `sink` in pieces of at most `INFLATE_OUT_BYTES`.
    pub(super) fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Step {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::exchange::testing::{CHAT_JSON, exchange, exchange_with, small_limits};
    use crate::exchange::{Exchange, UsageAnomaly, UsageSource};

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
                    .contains(&("tollgate.usage_anomaly", "decode_limit".into()))
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
}
