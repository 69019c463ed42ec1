//! Token usage from a complete (non-streaming) JSON response body.
//!
//! The usage object is found by a backward scan from the body's end (`scan`, which documents how
//! and its limits), deserialised by map-only serde visitors (`parse`), and read as the API's own
//! fields and normalised (`shape`). A *tail* of the body works as well as the whole body.
//!
//! # Numbers
//!
//! Token counts must be JSON unsigned integers that fit in `u64`; a missing or `null` count is 0,
//! and a `null` details object is the same as a missing one. A usage object holding a negative,
//! fractional (`5.0`, `1e3`, `1e30`), out-of-range (`2^64`) or non-numeric (`"5"`) count, or a
//! details member that is not an object, is treated as **invalid as a whole** and yields `None`:
//! a half-trusted usage would be billed silently, whereas `None` lets the caller fall back to its
//! own estimate. So does a usage value that is neither an object nor `null` (array, string,
//! number). [`read_json_usage`] tells these apart ([`Reading::Invalid`]) from a missing usage so
//! the caller can count the anomaly (`invalid_usage`). An object with none of the API's own count
//! fields (`{}`, or Anthropic's `input_tokens`/`output_tokens` on a Chat Completions path) also
//! yields `None` (charging it would bill 0/0), told apart as [`Reading::Foreign`].
//!
//! # Normalisation
//!
//! See [`Usage`]. `cached_input` is clamped to `input` and `reasoning` to `output`, so consumers
//! can subtract without underflow whatever the provider reports.

mod parse;
mod scan;
mod shape;

#[cfg(test)]
mod fixtures;

pub(crate) use parse::{Count, ReadMap, read_lenient};
pub(crate) use scan::{
    Locate, locate_key_backward, top_level_string, trim_ws, trim_ws_start, usage_at,
};
pub(crate) use shape::{RawUsage, anthropic};

use super::{ApiKind, Usage};

/// The usage reported by a complete JSON response body of `kind`.
///
/// `None` when the body has no top-level `usage`, when it is `null` or not an object, when a count
/// is not a `u64`, or when the body is not JSON. Never panics.
///
/// `body` may also be only the *tail* (a suffix) of the body, as kept for over-long responses: the
/// backward scan never needs the beginning, and nesting depths counted from the end are exact in
/// any suffix of a valid document. If the tail does not reach back to the usage key, the result is
/// `None`.
pub fn usage_from_json(kind: ApiKind, body: &[u8]) -> Option<Usage> {
    read_json_usage(kind, body).usage()
}

/// What a body's usage object said, for callers that must tell a missing usage from one in
/// another API's shape (both are charged by the fallbacks; only the second is an anomaly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// A usage object with at least one of the API's own count fields.
    Usage(Usage),
    /// A usage object without any of the API's own count fields (say Anthropic's
    /// `input_tokens`/`output_tokens` on a Chat Completions path, or `{}`): not this API's usage.
    Foreign,
    /// A usage value with a count that is not a `u64`, or that is not an object at all (see
    /// "Numbers"): garbage, not usage.
    Invalid,
    /// No usage (absent, `null`, or not JSON).
    Absent,
}

impl Reading {
    pub fn usage(self) -> Option<Usage> {
        match self {
            Reading::Usage(usage) => Some(usage),
            Reading::Foreign | Reading::Invalid | Reading::Absent => None,
        }
    }

    /// Reads a raw usage object with a dialect's reading of its fields (`None`: none of its
    /// own count fields, another API's usage).
    pub(crate) fn from_raw(
        raw: Option<RawUsage>,
        read: impl Fn(&RawUsage) -> Option<Usage>,
    ) -> Reading {
        match raw {
            Some(raw) if raw.invalid => Reading::Invalid,
            Some(raw) => read(&raw).map_or(Reading::Foreign, Reading::Usage),
            None => Reading::Absent,
        }
    }
}

/// [`usage_from_json`], telling a foreign-shaped usage object from a missing one.
pub fn read_json_usage(kind: ApiKind, body: &[u8]) -> Reading {
    kind.dialect().json_usage(body)
}

/// The usage of a JSON body that was cut short (an upstream reset, a client that left): `prefix`
/// must be the body from its first byte (not a tail). The top-level usage counts only if its
/// value arrived whole before the cut; found by a forward parse (the backward scan needs the
/// body's end), `O(prefix)` once per such response. Google and Bedrock put usage after the
/// answer: a cut body of theirs is charged by the fallbacks.
pub fn read_cut_json_usage(kind: ApiKind, prefix: &[u8]) -> Reading {
    kind.dialect().cut_json_usage(prefix)
}

/// The top-level `usage` object of a JSON body (or its tail), read by `read`.
pub(crate) fn read_usage_object(body: &[u8], read: impl Fn(&RawUsage) -> Option<Usage>) -> Reading {
    Reading::from_raw(usage_at(body, &["usage"]), read)
}

/// The top-level `usage` of a body cut short, once it passed whole (see [`read_cut_json_usage`]).
pub(crate) fn read_cut_usage_object(
    prefix: &[u8],
    read: impl Fn(&RawUsage) -> Option<Usage>,
) -> Reading {
    Reading::from_raw(parse::parse_usage_prefix(prefix), read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_bodies_give_their_usage_only_once_it_passed_whole() {
        for (kind, body, want) in fixtures::fixtures() {
            let bytes = body.as_bytes();
            let mut seen = false;
            for cut in 0..=bytes.len() {
                let (prefix, _) = bytes.split_at(cut);
                match read_cut_json_usage(kind, prefix) {
                    Reading::Usage(got) => {
                        assert_eq!(got, want, "{kind:?} cut at {cut}");
                        seen = true;
                    }
                    // Once read, a later cut never loses it.
                    other => assert!(!seen && other == Reading::Absent, "{kind:?} at {cut}"),
                }
            }
            assert!(seen, "{kind:?}");
        }
        // Not a JSON object, or a nested usage only: nothing.
        for body in [
            &b""[..],
            b"[",
            br#"{"a":{"usage":{"prompt_tokens":1}}"#,
            b"null",
        ] {
            assert_eq!(
                read_cut_json_usage(ApiKind::ChatCompletions, body),
                Reading::Absent
            );
        }
    }

    #[test]
    fn usage_null_missing_empty_and_wrong_types() {
        let k = ApiKind::ChatCompletions;
        assert_eq!(usage_from_json(k, br#"{"id":"x","usage":null}"#), None);
        assert_eq!(usage_from_json(k, br#"{"id":"x"}"#), None);
        assert_eq!(usage_from_json(k, br#"{}"#), None);
        // An empty usage object is no usage of this API (it would bill 0/0).
        assert_eq!(usage_from_json(k, br#" { "usage" : { } } "#), None);
        assert_eq!(
            read_json_usage(k, br#" { "usage" : { } } "#),
            Reading::Foreign
        );
        assert_eq!(usage_from_json(k, br#"{"usage":[1,2,3]}"#), None);
        assert_eq!(usage_from_json(k, br#"{"usage":"lots"}"#), None);
        assert_eq!(usage_from_json(k, br#"{"usage":5}"#), None);
        // Error bodies.
        assert_eq!(
            usage_from_json(
                k,
                br#"{"error":{"message":"Rate limit","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            None
        );
        assert_eq!(
            usage_from_json(
                ApiKind::Messages,
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            None
        );
    }
}
