//! What a Gemini / Vertex `generateContent` body asks for, and the one edit Tollgate makes to it.
//!
//! The output bound is `generationConfig.maxOutputTokens` (thinking and answer together) per
//! candidate, times `generationConfig.candidateCount`. Google's JSON parser (protobuf's) reads
//! both camelCase and snake_case names (the google-genai SDK sends some snake_case), and reads
//! `"20"` and `20.0` as 20; so both spellings are read here, duplicates included, the largest
//! value wins, and a count that is not a positive integer (`0`, `"20"`, `20.0`, `-1`, `true`) is
//! refused with 400, as on the OpenAI path. The model and `stream` come from the path.

use core::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::usage::Key;
use crate::api::request::RequestError;
use crate::api::usage::Count;

/// The request members through which a Gemini upstream may generate more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationFacts {
    /// `maxOutputTokens` per candidate (the largest given); `None`: the model's default.
    pub max_output_tokens: Option<u64>,
    /// `candidateCount` (the largest given), 1 when absent.
    pub candidates: u64,
    /// Greedy decoding: a `temperature` or `topP` of 0, or a `topK` of 1 (either spelling), and
    /// one candidate (the cache's `deterministic` policy).
    pub greedy: bool,
}

const CONFIG_KEYS: [&str; 2] = ["generationConfig", "generation_config"];
const MAX_KEYS: [&str; 2] = ["maxOutputTokens", "max_output_tokens"];
const COUNT_KEYS: [&str; 2] = ["candidateCount", "candidate_count"];
/// Sampling members and the value that makes decoding greedy.
const GREEDY_KEYS: [(&str, f64); 5] = [
    ("temperature", 0.0),
    ("topP", 0.0),
    ("top_p", 0.0),
    ("topK", 1.0),
    ("top_k", 1.0),
];

/// Reads the [`GenerationFacts`] of a complete request body. One streaming pass; every member
/// but `generationConfig`'s two counts is skipped without allocation.
pub fn generation_facts(body: &[u8]) -> Result<GenerationFacts, RequestError> {
    let mut found = Found::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = TopSeed { found: &mut found }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Err(err) = parsed {
        return Err(RequestError {
            param: None,
            message: format!("The request body is not valid JSON: {err}"),
        });
    }
    if let Some((param, what)) = found.refused {
        return Err(RequestError {
            message: format!("Invalid value for '{param}': {what}"),
            param: Some(param),
        });
    }
    let candidates = found.candidates.unwrap_or(1);
    Ok(GenerationFacts {
        max_output_tokens: found.max_output_tokens,
        candidates,
        greedy: found.greedy && candidates == 1,
    })
}

/// Sets `maxOutputTokens` to `cap`, or lowers it to `cap` where it is larger, in every
/// generation config the body has (either spelling, written in the spelling it uses); adds
/// `generationConfig.maxOutputTokens` when there is none. No other key is added, so Google
/// never sees a field it rejects. `None` when the body is not a JSON object, or its generation
/// config is neither an object nor `null` (refused earlier by [`generation_facts`]).
pub fn set_max_output_tokens(body: &[u8], cap: u64) -> Option<Vec<u8>> {
    let mut root: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let mut any = false;
    for key in CONFIG_KEYS {
        match root.get_mut(key) {
            Some(Value::Object(config)) => {
                cap_config(config, cap);
                any = true;
            }
            Some(slot @ Value::Null) => {
                *slot = Value::Object(new_config(cap));
                any = true;
            }
            Some(_) => return None,
            None => {}
        }
    }
    if !any {
        root.insert("generationConfig".into(), Value::Object(new_config(cap)));
    }
    serde_json::to_vec(&root).ok()
}

fn new_config(cap: u64) -> Map<String, Value> {
    let mut config = Map::new();
    config.insert("maxOutputTokens".into(), Value::from(cap));
    config
}

fn cap_config(config: &mut Map<String, Value>, cap: u64) {
    let mut any = false;
    for key in MAX_KEYS {
        if let Some(value) = config.get_mut(key) {
            let lowered = value.as_u64().map_or(cap, |v| v.min(cap));
            *value = Value::from(lowered);
            any = true;
        }
    }
    if !any {
        config.insert("maxOutputTokens".into(), Value::from(cap));
    }
}

/// What the pass found: the largest of each count, and the first refused member.
#[derive(Default)]
struct Found {
    max_output_tokens: Option<u64>,
    candidates: Option<u64>,
    greedy: bool,
    refused: Option<(String, &'static str)>,
}

impl Found {
    fn refuse(&mut self, param: String, what: &'static str) {
        if self.refused.is_none() {
            self.refused = Some((param, what));
        }
    }
}

struct TopSeed<'f> {
    found: &'f mut Found,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            match CONFIG_KEYS.into_iter().find(|k| *k == key.as_str()) {
                Some(name) => map.next_value_seed(ConfigSeed {
                    name,
                    found: self.found,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct ConfigSeed<'f> {
    name: &'static str,
    found: &'f mut Found,
}

impl<'de> DeserializeSeed<'de> for ConfigSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ConfigSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a generation config object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Only the top level's config names matter here; a member named like a config inside
        // the config is skipped as any other.
        while let Some(key) = map.next_key::<Key>()? {
            let key = key.as_str();
            let (slot, count) = if let Some(k) = MAX_KEYS.into_iter().find(|k| *k == key) {
                (&mut self.found.max_output_tokens, k)
            } else if let Some(k) = COUNT_KEYS.into_iter().find(|k| *k == key) {
                (&mut self.found.candidates, k)
            } else if let Some((_, want)) = GREEDY_KEYS.into_iter().find(|(k, _)| *k == key) {
                let value = map.next_value::<Value>()?;
                self.found.greedy |= value.as_f64() == Some(want);
                continue;
            } else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            match map.next_value::<Count>()? {
                Count::Value(0) => self.found.refuse(
                    format!("{}.{count}", self.name),
                    "0 is below the minimum value of 1",
                ),
                Count::Value(v) => *slot = Some(slot.map_or(v, |old| old.max(v))),
                Count::Null => {}
                Count::Invalid => self.found.refuse(
                    format!("{}.{count}", self.name),
                    "expected a positive integer",
                ),
            }
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        IgnoredAny.visit_seq(seq)?;
        self.not_an_object();
        Ok(())
    }
}

impl ConfigSeed<'_> {
    fn not_an_object(self) {
        self.found
            .refuse(self.name.to_string(), "expected an object");
    }
}
