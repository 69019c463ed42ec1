//! Gemini's `usageMetadata` as Google bills it, and what one response (or one streamed chunk)
//! says: its usage, whether the prompt was blocked, whether a candidate finished.
//!
//! | field | billed as |
//! |---|---|
//! | `promptTokenCount` | input (cached tokens are **inside** it) |
//! | `toolUsePromptTokenCount` | input (tool results fed back to the model) |
//! | `cachedContentTokenCount` | cached input (a part of `promptTokenCount`) |
//! | `candidatesTokenCount` | output (thinking **not** inside it) |
//! | `thoughtsTokenCount` | output, and reasoning |
//!
//! `totalTokenCount` is ignored (it is the sum of the above). Counts are read as the other readers
//! read them (see `usage/`, "Numbers"): a count that is not a `u64` makes the whole object
//! invalid; `null` is a missing count. The REST API sends camelCase; `usage_metadata` and the
//! snake_case count names are read too (the SDKs' own serialisations).

use core::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::api::Usage;
use crate::api::usage::{Count, Locate, ReadMap, Reading, locate_key_backward, read_lenient};

/// A `usageMetadata` object as sent. `None`: missing or `null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageMetadata {
    pub prompt: Option<u64>,
    pub tool_use_prompt: Option<u64>,
    pub cached_content: Option<u64>,
    pub candidates: Option<u64>,
    pub thoughts: Option<u64>,
    /// A count was not a `u64`, or the value was not an object: garbage, not usage.
    pub invalid: bool,
}

impl UsageMetadata {
    /// Whether at least one of Gemini's count fields is present (`{}` or a lone
    /// `totalTokenCount` would bill 0/0).
    pub fn speaks(&self) -> bool {
        self.prompt.is_some()
            || self.tool_use_prompt.is_some()
            || self.cached_content.is_some()
            || self.candidates.is_some()
            || self.thoughts.is_some()
    }

    /// A streamed chunk's metadata is a running total: each field present in `newer` replaces
    /// ours, a missing one keeps ours. Never a sum.
    pub fn merge(&mut self, newer: &UsageMetadata) {
        let keep_last = |ours: &mut Option<u64>, theirs: Option<u64>| {
            if theirs.is_some() {
                *ours = theirs;
            }
        };
        keep_last(&mut self.prompt, newer.prompt);
        keep_last(&mut self.tool_use_prompt, newer.tool_use_prompt);
        keep_last(&mut self.cached_content, newer.cached_content);
        keep_last(&mut self.candidates, newer.candidates);
        keep_last(&mut self.thoughts, newer.thoughts);
    }

    /// The [`Usage`] Google bills (see the module table). `cached_input` is clamped to `input`
    /// and `reasoning` to `output`, as for the other APIs.
    pub fn normalise(&self) -> Usage {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let input = n(self.prompt).saturating_add(n(self.tool_use_prompt));
        let output = n(self.candidates).saturating_add(n(self.thoughts));
        Usage {
            input,
            output,
            cached_input: n(self.cached_content).min(input),
            cache_write_input: 0,
            reasoning: n(self.thoughts).min(output),
        }
    }

    /// Read as the other readers read a usage object.
    pub fn reading(self) -> Reading {
        if self.invalid {
            Reading::Invalid
        } else if self.speaks() {
            Reading::Usage(self.normalise())
        } else {
            Reading::Foreign
        }
    }
}

/// What a `GenerateContentResponse` (a whole body, or one streamed chunk) says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    /// The top-level `usageMetadata` (`None`: absent or `null`).
    pub usage: Option<UsageMetadata>,
    /// `promptFeedback.blockReason` is set: the prompt was refused, and charged what it reports.
    pub blocked: bool,
    /// A candidate carries a `finishReason`: the answer ended.
    pub finished: bool,
    /// At least one candidate (an answer part) is present.
    pub has_candidates: bool,
}

impl ResponseFacts {
    /// The usage of a whole (non-streaming) response.
    pub fn reading(&self) -> Reading {
        self.usage.map_or(Reading::Absent, UsageMetadata::reading)
    }
}

/// Reads a `GenerateContentResponse` JSON object (a non-streaming body, or one element of a
/// stream). `None` when `json` is not a JSON object. One streaming parse, every member but the
/// ones above skipped without allocation.
pub fn read_response(json: &[u8]) -> Option<ResponseFacts> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let facts = de.deserialize_map(ResponseVisitor).ok()?;
    de.end().ok()?;
    Some(facts)
}

/// The usage of a whole (non-streaming) response body, or of a *tail* of it (what the filter
/// keeps of an over-long response): `usageMetadata` is found by the backward scan the other APIs'
/// usage uses (`usage/scan.rs`, which documents its limits), from the body's end, so the cost
/// is the distance from the key to the end (Google serialises it after the candidates); only when
/// the scan cannot vouch for the bytes is the body parsed whole ([`read_response`]).
pub fn read_body_usage(body: &[u8]) -> Reading {
    for key in [&b"usageMetadata"[..], b"usage_metadata"] {
        match locate_key_backward(body, key, 1) {
            Locate::Found(value) => {
                let mut de = serde_json::Deserializer::from_slice(value);
                return match Option::<UsageMetadata>::deserialize(&mut de) {
                    Ok(Some(meta)) => meta.reading(),
                    Ok(None) | Err(_) => Reading::Absent,
                };
            }
            Locate::Absent => {}
            Locate::Unsure => {
                return read_response(body).map_or(Reading::Absent, |f| f.reading());
            }
        }
    }
    Reading::Absent
}

struct ResponseVisitor;

impl<'de> Visitor<'de> for ResponseVisitor {
    type Value = ResponseFacts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a GenerateContentResponse object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResponseFacts, A::Error> {
        let mut facts = ResponseFacts::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "usageMetadata" | "usage_metadata" => facts.usage = map.next_value()?,
                "promptFeedback" | "prompt_feedback" => {
                    facts.blocked = map.next_value::<Feedback>()?.blocked;
                }
                "candidates" => {
                    let candidates: Candidates = map.next_value()?;
                    facts.has_candidates |= candidates.some;
                    facts.finished |= candidates.finished;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(facts)
    }
}

/// A member name, kept only when short enough to be one we read (at most 32 bytes); any other
/// name reads as empty, without allocating.
#[derive(Default)]
pub(super) struct Key {
    buf: [u8; 32],
    len: usize,
}

impl Key {
    pub(super) fn as_str(&self) -> &str {
        self.buf
            .get(..self.len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                let mut key = Key::default();
                if let Some(slot) = key.buf.get_mut(..v.len()) {
                    slot.copy_from_slice(v.as_bytes());
                    key.len = v.len();
                }
                Ok(key)
            }
        }
        deserializer.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for UsageMetadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_lenient(deserializer)
    }
}

impl ReadMap for UsageMetadata {
    const EXPECTING: &'static str = "a usageMetadata object";

    fn garbage() -> UsageMetadata {
        UsageMetadata {
            invalid: true,
            ..UsageMetadata::default()
        }
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<UsageMetadata, A::Error> {
        let mut meta = UsageMetadata::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key.as_str() {
                "promptTokenCount" | "prompt_token_count" => &mut meta.prompt,
                "toolUsePromptTokenCount" | "tool_use_prompt_token_count" => {
                    &mut meta.tool_use_prompt
                }
                "cachedContentTokenCount" | "cached_content_token_count" => {
                    &mut meta.cached_content
                }
                "candidatesTokenCount" | "candidates_token_count" => &mut meta.candidates,
                "thoughtsTokenCount" | "thoughts_token_count" => &mut meta.thoughts,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            meta.invalid |= map.next_value::<Count>()?.set(slot);
        }
        Ok(meta)
    }
}

/// `promptFeedback`: whether `blockReason` is set (not `null`, not the unspecified value).
#[derive(Default)]
struct Feedback {
    blocked: bool,
}

impl<'de> Deserialize<'de> for Feedback {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_lenient(deserializer)
    }
}

impl ReadMap for Feedback {
    const EXPECTING: &'static str = "a promptFeedback object";

    fn garbage() -> Feedback {
        Feedback::default()
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Feedback, A::Error> {
        let mut feedback = Feedback::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "blockReason" | "block_reason" => {
                    feedback.blocked = map.next_value::<BlockReason>()?.0;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(feedback)
    }
}

/// `candidates`: whether there is at least one, and whether one carries a `finishReason`.
#[derive(Default)]
struct Candidates {
    some: bool,
    finished: bool,
}

impl<'de> Deserialize<'de> for Candidates {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_lenient(deserializer)
    }
}

impl ReadMap for Candidates {
    const EXPECTING: &'static str = "a candidates array";

    fn garbage() -> Candidates {
        Candidates::default()
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Candidates, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Candidates::default())
    }

    fn read_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Candidates, A::Error> {
        let mut candidates = Candidates::default();
        while let Some(candidate) = seq.next_element::<Candidate>()? {
            candidates.some = true;
            candidates.finished |= candidate.finished;
        }
        Ok(candidates)
    }
}

/// One candidate: whether its `finishReason` is set.
#[derive(Default)]
struct Candidate {
    finished: bool,
}

impl<'de> Deserialize<'de> for Candidate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        read_lenient(deserializer)
    }
}

impl ReadMap for Candidate {
    const EXPECTING: &'static str = "a candidate object";

    fn garbage() -> Candidate {
        Candidate::default()
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Candidate, A::Error> {
        let mut candidate = Candidate::default();
        while let Some(key) = map.next_key::<Key>()? {
            if matches!(key.as_str(), "finishReason" | "finish_reason") {
                candidate.finished = map.next_value::<Option<IgnoredAny>>()?.is_some();
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(candidate)
    }
}

/// A `blockReason` value: set unless `null` or `BLOCK_REASON_UNSPECIFIED` (any other value,
/// even an unexpected type, counts as blocked: the prompt got no answer).
struct BlockReason(bool);

impl<'de> Deserialize<'de> for BlockReason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BlockReason, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BlockReason;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a block reason")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BlockReason, E> {
                Ok(BlockReason(v != "BLOCK_REASON_UNSPECIFIED"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<BlockReason, E> {
                Ok(BlockReason(false))
            }
            fn visit_none<E: de::Error>(self) -> Result<BlockReason, E> {
                Ok(BlockReason(false))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<BlockReason, E> {
                Ok(BlockReason(true))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<BlockReason, E> {
                Ok(BlockReason(true))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<BlockReason, E> {
                Ok(BlockReason(true))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<BlockReason, E> {
                Ok(BlockReason(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<BlockReason, A::Error> {
                IgnoredAny.visit_seq(seq)?;
                Ok(BlockReason(true))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BlockReason, A::Error> {
                IgnoredAny.visit_map(map)?;
                Ok(BlockReason(true))
            }
        }
        deserializer.deserialize_any(V)
    }
}
