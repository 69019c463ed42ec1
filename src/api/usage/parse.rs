//! Deserialising a usage object: map-only serde visitors (an array is never accepted as a usage
//! object), duplicate keys allowed (last wins), unknown keys skipped without allocation; and the
//! full streaming parse that follows a key path when the backward scan cannot vouch for a body.

use core::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

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
        deserializer.deserialize_map(RawUsageVisitor)
    }
}

struct RawUsageVisitor;

impl<'de> Visitor<'de> for RawUsageVisitor {
    type Value = RawUsage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a usage object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawUsage, A::Error> {
        let mut raw = RawUsage::default();
        while let Some(field) = map.next_key::<UsageField>()? {
            match field {
                UsageField::PromptTokens => raw.prompt_tokens = map.next_value()?,
                UsageField::CompletionTokens => raw.completion_tokens = map.next_value()?,
                UsageField::InputTokens => raw.input_tokens = map.next_value()?,
                UsageField::OutputTokens => raw.output_tokens = map.next_value()?,
                UsageField::CacheCreationInputTokens => {
                    raw.cache_creation_input_tokens = map.next_value()?;
                }
                UsageField::CacheReadInputTokens => {
                    raw.cache_read_input_tokens = map.next_value()?;
                }
                UsageField::PromptTokensDetails => {
                    let d: Option<Details> = map.next_value()?;
                    raw.prompt_cached_tokens = d.and_then(|d| d.cached_tokens);
                }
                UsageField::CompletionTokensDetails => {
                    let d: Option<Details> = map.next_value()?;
                    raw.completion_reasoning_tokens = d.and_then(|d| d.reasoning_tokens);
                }
                UsageField::InputTokensDetails => {
                    let d: Option<Details> = map.next_value()?;
                    raw.input_cached_tokens = d.and_then(|d| d.cached_tokens);
                }
                UsageField::OutputTokensDetails => {
                    let d: Option<Details> = map.next_value()?;
                    raw.output_reasoning_tokens = d.and_then(|d| d.reasoning_tokens);
                }
                UsageField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(raw)
    }
}

/// `*_tokens_details`.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum DetailsField {
    CachedTokens,
    ReasoningTokens,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DetailsVisitor)
    }
}

struct DetailsVisitor;

impl<'de> Visitor<'de> for DetailsVisitor {
    type Value = Details;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token details object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Details, A::Error> {
        let mut details = Details::default();
        while let Some(field) = map.next_key::<DetailsField>()? {
            match field {
                DetailsField::CachedTokens => details.cached_tokens = map.next_value()?,
                DetailsField::ReasoningTokens => details.reasoning_tokens = map.next_value()?,
                DetailsField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
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
    use crate::api::usage::usage_from_json;

    #[test]
    fn invalid_numbers_invalidate_the_usage() {
        for bad in [
            r#"{"usage":{"prompt_tokens":-1,"completion_tokens":4}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"usage":{"prompt_tokens":5.0}}"#,
            r#"{"usage":{"prompt_tokens":1e3}}"#,
            r#"{"usage":{"prompt_tokens":"5"}}"#,
            r#"{"usage":{"prompt_tokens":18446744073709551616}}"#,
            r#"{"usage":{"prompt_tokens_details":{"cached_tokens":-3}}}"#,
            r#"{"usage":{"prompt_tokens_details":[1]}}"#,
        ] {
            assert_eq!(
                usage_from_json(ApiKind::ChatCompletions, bad.as_bytes()),
                None,
                "{bad}"
            );
        }
        let max = format!(r#"{{"usage":{{"prompt_tokens":{}}}}}"#, u64::MAX);
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, max.as_bytes()).map(|u| u.input),
            Some(u64::MAX)
        );
    }
}
