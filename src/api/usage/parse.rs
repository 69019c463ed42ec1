//! Deserialising a usage object: map-only serde visitors (an array is never accepted as a usage
//! object), duplicate keys allowed (last wins), unknown keys skipped without allocation; and the
//! full streaming parse that follows a key path when the backward scan cannot vouch for a body.

use core::fmt;
use core::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::shape::RawUsage;

/// Deserialises the usage value at the start of `value`, ignoring whatever follows it.
pub(super) fn parse_usage_value(value: &[u8]) -> Option<RawUsage> {
    let mut de = serde_json::Deserializer::from_slice(value);
    Option::<RawUsage>::deserialize(&mut de).ok().flatten()
}

/// Fallback: a full streaming parse of `body` that only materialises the value at `path`.
pub(super) fn parse_usage_full(body: &[u8], path: &[&str]) -> Option<RawUsage> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = PathSeed { path }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    found
}

/// The top-level `usage` value of a JSON body cut short, when it was whole before the cut (its
/// closing brace arrived). A forward parse from the body's first byte: it knows the nesting depth
/// of every key, so a `"usage"` nested elsewhere is never taken for the real one, and it stops
/// with an error where the body was cut, keeping what it had read. `None` if the cut came first.
pub(super) fn parse_usage_prefix(prefix: &[u8]) -> Option<RawUsage> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(prefix);
    // The error is the cut (or garbage after the usage): what was captured before it is whole.
    let _ = PrefixSeed { found: &mut found }.deserialize(&mut de);
    found.flatten()
}

/// Walks the top-level object, capturing each whole `usage` value as it is read.
struct PrefixSeed<'f> {
    found: &'f mut Option<Option<RawUsage>>,
}

impl<'de> DeserializeSeed<'de> for PrefixSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PrefixSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(is_usage) = map.next_key_seed(KeyIs("usage"))? {
            if is_usage {
                *self.found = Some(map.next_value::<Option<RawUsage>>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UsageField {
    PromptTokens,
    CompletionTokens,
    InputTokens,
    OutputTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    PromptTokensDetails,
    CompletionTokensDetails,
    InputTokensDetails,
    OutputTokensDetails,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for RawUsage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Lenient::<RawUsage>(PhantomData))
    }
}

impl ReadMap for RawUsage {
    const EXPECTING: &'static str = "a usage object";

    fn garbage() -> RawUsage {
        RawUsage::invalid()
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<RawUsage, A::Error> {
        let mut raw = RawUsage::default();
        while let Some(field) = map.next_key::<UsageField>()? {
            // The count's slot, and which count of a details object goes there.
            let (slot, details) = match field {
                UsageField::PromptTokens => (&mut raw.prompt_tokens, None),
                UsageField::CompletionTokens => (&mut raw.completion_tokens, None),
                UsageField::InputTokens => (&mut raw.input_tokens, None),
                UsageField::OutputTokens => (&mut raw.output_tokens, None),
                UsageField::CacheCreationInputTokens => {
                    (&mut raw.cache_creation_input_tokens, None)
                }
                UsageField::CacheReadInputTokens => (&mut raw.cache_read_input_tokens, None),
                UsageField::PromptTokensDetails => (
                    &mut raw.prompt_cached_tokens,
                    Some(DetailsField::CachedTokens),
                ),
                UsageField::CompletionTokensDetails => (
                    &mut raw.completion_reasoning_tokens,
                    Some(DetailsField::ReasoningTokens),
                ),
                UsageField::InputTokensDetails => (
                    &mut raw.input_cached_tokens,
                    Some(DetailsField::CachedTokens),
                ),
                UsageField::OutputTokensDetails => (
                    &mut raw.output_reasoning_tokens,
                    Some(DetailsField::ReasoningTokens),
                ),
                UsageField::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            let invalid = match details {
                None => map.next_value::<Count>()?.set(slot),
                Some(wanted) => {
                    let d: Details = map.next_value()?;
                    *slot = d.get(wanted);
                    d.invalid
                }
            };
            raw.invalid |= invalid;
        }
        Ok(raw)
    }
}

/// A value read as an object by [`ReadMap::read_map`]; `null` is the default (no counts), and
/// anything else (a string, number, array, `true`) is consumed and read as
/// [`ReadMap::garbage`]: only a document error fails the parse.
pub(crate) trait ReadMap: Default {
    const EXPECTING: &'static str;
    fn garbage() -> Self;
    fn read_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
    /// An array: garbage, unless the type reads arrays itself.
    fn read_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Self::garbage())
    }
}

/// Deserialises a [`ReadMap`] type leniently (see the trait): the body of its `Deserialize`.
pub(crate) fn read_lenient<'de, T: ReadMap, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    deserializer.deserialize_any(Lenient::<T>(PhantomData))
}

struct Lenient<T>(PhantomData<T>);

impl<'de, T: ReadMap> Visitor<'de> for Lenient<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::read_map(map)
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::garbage())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Ok(T::garbage())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Ok(T::garbage())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::garbage())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        Ok(T::garbage())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::read_seq(seq)
    }
}

/// One token count as sent: a JSON unsigned integer that fits in `u64`, `null` (no count), or
/// anything else (negative, fractional, `1e3`, over `u64`, a string, …), which makes the whole
/// usage object invalid.
pub(crate) enum Count {
    Value(u64),
    Null,
    Invalid,
}

impl Count {
    /// Stores the count in `slot` (a `null` clears it: the last duplicate wins); `true` if it was
    /// invalid.
    pub(crate) fn set(self, slot: &mut Option<u64>) -> bool {
        match self {
            Count::Value(v) => *slot = Some(v),
            Count::Null => *slot = None,
            Count::Invalid => return true,
        }
        false
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token count")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count::Value(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(u64::try_from(v).map_or(Count::Invalid, Count::Value))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
        Ok(Count::Invalid)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count::Invalid)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
        Ok(Count::Invalid)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(Count::Invalid)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(Count::Invalid)
    }
}

/// `*_tokens_details`: an object, or `null` (the same as missing); anything else is invalid.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
    invalid: bool,
}

impl Details {
    fn get(&self, field: DetailsField) -> Option<u64> {
        match field {
            DetailsField::CachedTokens => self.cached_tokens,
            DetailsField::ReasoningTokens => self.reasoning_tokens,
            DetailsField::Other => None,
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DetailsField {
    CachedTokens,
    ReasoningTokens,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Lenient::<Details>(PhantomData))
    }
}

impl ReadMap for Details {
    const EXPECTING: &'static str = "a token details object";

    fn garbage() -> Details {
        Details {
            invalid: true,
            ..Details::default()
        }
    }

    fn read_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Details, A::Error> {
        let mut details = Details::default();
        while let Some(field) = map.next_key::<DetailsField>()? {
            let slot = match field {
                DetailsField::CachedTokens => &mut details.cached_tokens,
                DetailsField::ReasoningTokens => &mut details.reasoning_tokens,
                DetailsField::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            details.invalid |= map.next_value::<Count>()?.set(slot);
        }
        Ok(details)
    }
}

/// Deserialises an object and returns the usage found by following `path` through it (the last
/// occurrence of a duplicated key wins); every other member is skipped. A `null` on the way means
/// "no usage".
struct PathSeed<'p> {
    path: &'p [&'p str],
}

impl<'de> DeserializeSeed<'de> for PathSeed<'_> {
    type Value = Option<RawUsage>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PathSeed<'_> {
    type Value = Option<RawUsage>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom("empty path"));
        };
        let mut found = None;
        while let Some(is_target) = map.next_key_seed(KeyIs(first))? {
            if !is_target {
                map.next_value::<IgnoredAny>()?;
            } else if rest.is_empty() {
                found = map.next_value::<Option<RawUsage>>()?;
            } else {
                found = map.next_value_seed(NullablePath(PathSeed { path: rest }))?;
            }
        }
        Ok(found)
    }
}

/// [`PathSeed`] that also accepts `null` (no usage).
struct NullablePath<'p>(PathSeed<'p>);

impl<'de> DeserializeSeed<'de> for NullablePath<'_> {
    type Value = Option<RawUsage>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for NullablePath<'_> {
    type Value = Option<RawUsage>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer)
    }
}

/// A map key, compared with a wanted name without allocating.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::api::ApiKind;
    use crate::api::usage::{Reading, read_json_usage, usage_from_json};

    #[test]
    fn invalid_numbers_invalidate_the_usage() {
        for bad in [
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":4}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"usage":{"prompt_tokens":5.0}}"#,
            r#"{"usage":{"prompt_tokens":1e3}}"#,
            r#"{"usage":{"prompt_tokens":1e30}}"#,
            r#"{"usage":{"prompt_tokens":"5"}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
            r#"{"usage":{"prompt_tokens":{"n":1}}}"#,
            r#"{"usage":{"prompt_tokens_details":{"cached_tokens":-3}}}"#,
            r#"{"usage":{"prompt_tokens_details":[1]}}"#,
            r#"{"usage":{"prompt_tokens_details":"x"}}"#,
            // Garbage in a field the API does not read still makes the object garbage.
            r#"{"usage":{"prompt_tokens":3,"input_tokens":-1}}"#,
            r#"{"usage":"lots"}"#,
            r#"{"usage":[1,2,3]}"#,
            r#"{"usage":5}"#,
            // The full parse (text the backward scan cannot vouch for after the usage) agrees.
            r#"{"usage":{"prompt_tokens":-1},"a": [1, 2] }"#,
            "{\"usage\":{\"prompt_tokens\":-1},\"a\":\"\\u00e9\"}",
        ] {
            assert_eq!(
                usage_from_json(ApiKind::ChatCompletions, bad.as_bytes()),
                None,
                "{bad}"
            );
            assert_eq!(
                read_json_usage(ApiKind::ChatCompletions, bad.as_bytes()),
                Reading::Invalid,
                "{bad}"
            );
        }
        // A broken document is no usage, not invalid usage; `null` counts and details are fine.
        for (body, want) in [
            (r#"{"usage":{"prompt_tokens":-1}"#, Reading::Absent),
            (r#"{"usage":{"prompt_tokens":-1}},"#, Reading::Absent),
            (
                r#"{"usage":{"prompt_tokens":1},"a": nope}"#,
                Reading::Absent,
            ),
            (r#"{"usage":null}"#, Reading::Absent),
            (
                r#"{"usage":{"prompt_tokens":1,"completion_tokens":null,"prompt_tokens_details":null}}"#,
                Reading::Usage(crate::api::Usage {
                    input: 1,
                    ..crate::api::Usage::default()
                }),
            ),
        ] {
            assert_eq!(
                read_json_usage(ApiKind::ChatCompletions, body.as_bytes()),
                want,
                "{body}"
            );
        }
        let max = format!(r#"{{"usage":{{"prompt_tokens":{}}}}}"#, u64::MAX);
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, max.as_bytes()).map(|u| u.input),
            Some(u64::MAX)
        );
    }
}
