//! What a request asks for: model, streaming, the API's max-tokens field and a prompt-size
//! estimate, read from the JSON body in one pass without building a document tree.
//!
//! ## The fields that bound the output
//! Strict mode promises that an admitted request cannot be charged past a limit, so every field
//! through which an upstream may generate more is read here, as the most permissive upstream
//! would read it (OpenAI's, Anthropic's and vLLM's references; vLLM coerces with pydantic):
//!
//! | field | API | read as |
//! |---|---|---|
//! | `max_completion_tokens`, `max_tokens` | chat | per output; both given: the larger (vLLM takes the first that is not 0 or null, others the second) |
//! | `max_output_tokens` | responses | per response (reasoning and tool turns included) |
//! | `max_tokens` | messages | per response (`thinking.budget_tokens` is inside it) |
//! | `n` | chat (also counted if sent elsewhere) | outputs generated, each up to the cap |
//! | `best_of` | vLLM | outputs generated (`n` of them returned) |
//! | `prediction` | chat | rejected prediction tokens are billed as output: at most the body's bytes more |
//! | `generationConfig.maxOutputTokens` (also `generation_config`, `max_output_tokens`) | Gemini, Vertex | per candidate (thinking and answer together); every spelling read, the largest wins (`gemini::request`) |
//! | `generationConfig.candidateCount` (also `candidate_count`) | Gemini, Vertex | candidates generated, each up to the cap, as `n` |
//! | `inferenceConfig.maxTokens`, and `additionalModelRequestFields`' `max_tokens`, `max_gen_len`, `maxTokenCount`, `max_new_tokens`, `max_completion_tokens`, `maxTokens` | Bedrock Converse | per response; the largest given; a cap Tollgate sets is written to `inferenceConfig.maxTokens` and to each of the others present |
//!
//! Each count must be a positive integer (or null or absent): `0` means "no cap" to vLLM and
//! `"20"` or `20.0` mean 20 to pydantic (and to Google's protobuf JSON parser), so both are
//! refused with 400 rather than read as a smaller number. `min_tokens` and `ignore_eos` (vLLM)
//! stay under the cap, so they need nothing.

use std::borrow::Cow;

use serde::Deserialize;

use super::ApiKind;
use super::dialect::Call;

/// The facts Tollgate needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: String,
    pub stream: bool,
    /// OpenAI chat: `stream_options.include_usage`.
    pub include_usage: bool,
    /// The API's output cap per choice: the larger of `max_completion_tokens` and `max_tokens`
    /// (chat: servers disagree on which wins), `max_output_tokens` (responses), `max_tokens`
    /// (messages). Never 0: a 0 is refused (vLLM reads it as "no cap").
    pub max_tokens: Option<u64>,
    /// Outputs generated, each up to `max_tokens`: the larger of `n` and vLLM's `best_of`
    /// (both refused unless a positive integer); 1 for embeddings. See the module docs.
    pub choices: u64,
    /// Chat's `prediction` (predicted outputs): rejected prediction tokens are billed as output
    /// on top of `max_tokens`; they come from the body, so at most its byte count. 0 without it.
    pub predicted_output_bound: u64,
    /// Prompt tokens, estimated at four body bytes per token.
    pub prompt_estimate: u64,
    /// An upper bound on text prompt tokens: every token of a byte-level BPE tokenizer covers at
    /// least one byte of text, and JSON encoding only adds bytes.
    pub prompt_bound: u64,
    /// The body may bring input it does not contain ([`refers_outside_body`]), so the input
    /// tokens reported can exceed `prompt_bound`.
    pub external_input: bool,
    /// Greedy decoding: a top-level `temperature` of 0, `top_p` of 0 or `top_k` of 1 (each keeps
    /// only the most likely token), and `n` and `best_of` absent, null or 1 (the cache's
    /// `deterministic`).
    pub greedy: bool,
    /// A Bedrock Invoke body that is not an Anthropic Messages body (no `anthropic_version`:
    /// Llama, Titan, Mistral, … each with its own fields): Tollgate can neither read nor set its
    /// output cap, so strict mode and per-request caps refuse it (Converse reads every model).
    pub foreign_body: bool,
    /// The end user: the body's own field (OpenAI's `user`, Anthropic's `metadata.user_id`,
    /// a string), or what `identity.user` names once the pipeline resolved it.
    pub user: Option<String>,
}

/// Keys (and values) through which a request brings input tokens its body does not hold: a
/// previous response or conversation, a stored prompt, files and images by id or URL, documents,
/// tools (server-side tools add their results, providers add tool instructions), MCP servers,
/// containers. Matched as quoted JSON strings, so text inside a string (escaped quotes) does not
/// match; a false match only loosens the bound to what it is without this check.
const EXTERNAL_INPUT_MARKERS: [&[u8]; 18] = [
    b"\"previous_response_id\"",
    b"\"conversation\"",
    b"\"prompt\"",
    b"\"file_id\"",
    b"\"url\"",
    b"\"image_url\"",
    b"\"file_url\"",
    b"\"input_file\"",
    b"\"document\"",
    b"\"tools\"",
    b"\"mcp_servers\"",
    b"\"container\"",
    // Gemini and Vertex: files by URI, cached contents.
    b"\"fileData\"",
    b"\"file_data\"",
    b"\"cachedContent\"",
    b"\"cached_content\"",
    // Bedrock: documents, images and videos from S3, prompts from prompt management.
    b"\"s3Location\"",
    b"\"promptVariables\"",
];

/// Whether a request body may bring input it does not contain (see [`EXTERNAL_INPUT_MARKERS`]).
/// Without any, every input token it can be charged covers at least one byte of the body.
pub fn refers_outside_body(body: &[u8]) -> bool {
    shape(body, usize::MAX).external
}

/// What one pass over a body's structure finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    /// Arrays and objects nest deeper than the limit (the pass stops there).
    too_deep: bool,
    /// A string that opens with one of the [`EXTERNAL_INPUT_MARKERS`].
    external: bool,
}

/// One pass, no allocation: nesting depth (brackets inside strings do not count) and the
/// external-input markers, checked at the strings' opening quotes only. Meaningful for valid
/// JSON, harmless on anything else.
fn shape(body: &[u8], max_depth: usize) -> Shape {
    let mut found = Shape {
        too_deep: false,
        external: false,
    };
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        match b {
            b'"' => {
                let rest = body.get(i..).unwrap_or_default();
                if !found.external && EXTERNAL_INPUT_MARKERS.iter().any(|m| rest.starts_with(m)) {
                    found.external = true;
                }
                match string_end(body, i.saturating_add(1)) {
                    Some(end) => i = end,
                    None => return found,
                }
            }
            b'{' | b'[' => {
                depth = depth.saturating_add(1);
                if depth > max_depth {
                    found.too_deep = true;
                    return found;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i = i.saturating_add(1);
    }
    found
}

/// The index of the quote that closes a string whose contents start at `from` (`None`: it
/// never closes). Skips to the next quote or backslash at a time, not byte by byte.
fn string_end(body: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from.checked_add(memchr::memchr2(b'"', b'\\', body.get(from..)?)?)?;
        match body.get(at) {
            Some(b'"') => return Some(at),
            _ => from = at.checked_add(2)?,
        }
    }
}

/// Why a request body cannot be read; answered with 400 in the API's error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request field at fault (`None` when the body as a whole is not JSON).
    pub param: Option<String>,
    pub message: String,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<RawStreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    /// vLLM: sequences generated per request, `n` of them returned.
    #[serde(default)]
    best_of: Option<u64>,
    #[serde(default)]
    prediction: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    anthropic_version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    temperature: Number,
    #[serde(default)]
    top_p: Number,
    #[serde(default)]
    top_k: Number,
    /// OpenAI's end-user id.
    #[serde(default)]
    user: Text,
    /// Anthropic's `metadata.user_id` (OpenAI's `metadata` is a map of strings too).
    #[serde(default)]
    metadata: UserIdIn,
}

/// A JSON string, or anything else (`None`): an id Tollgate reads, never validates.
#[derive(Default)]
struct Text(Option<String>);

/// Visits any JSON value; a string (or, as `metadata`, an object's `user_id` string) is kept.
struct TextVisitor {
    /// Look inside an object for this member instead of taking a string.
    member: Option<&'static str>,
}

impl<'de> serde::de::Visitor<'de> for TextVisitor {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<Option<String>, E> {
        Ok(self.member.is_none().then(|| v.to_string()))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Option<String>, A::Error> {
        while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Option<String>, A::Error> {
        let mut found = None;
        while let Some(key) = a.next_key::<Cow<'de, str>>()? {
            match self.member {
                Some(member) if key == member => {
                    found = a.next_value::<Text>()?.0;
                }
                _ => {
                    a.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        deserializer
            .deserialize_any(TextVisitor { member: None })
            .map(Text)
    }
}

/// An object's `user_id` string (Anthropic's `metadata`), or nothing.
#[derive(Default)]
struct UserIdIn(Option<String>);

impl<'de> Deserialize<'de> for UserIdIn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UserIdIn, D::Error> {
        deserializer
            .deserialize_any(TextVisitor {
                member: Some("user_id"),
            })
            .map(UserIdIn)
    }
}

/// A JSON number read as `f64`, or anything else (`None`): sampling parameters are the
/// upstream's to validate; Tollgate only asks whether they are exactly 0 or 1.
#[derive(Default)]
pub(crate) struct Number(Option<f64>);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Number, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number(Some(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_unit<E>(self) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_none<E>(self) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Number, D::Error> {
                Number::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Number, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Number(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Number, A::Error> {
                while a
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Number(None))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl Number {
    pub(crate) fn is(&self, want: f64) -> bool {
        self.0 == Some(want)
    }
}

#[derive(Deserialize)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The deepest nesting of arrays and objects a request body may have. Real requests stay far
/// below it (deeply nested JSON schemas in tools reach a few dozen levels); it is under serde_json's
/// recursion limit of 128, which the body rewrite and the cache key's canonical form need, so an
/// admitted body can always be rewritten. A deeper body is refused with 400 before anything else.
pub const MAX_JSON_DEPTH: usize = 100;

/// Whether `body` nests arrays and objects deeper than `max` (brackets inside strings do not
/// count). One pass, no allocation; meaningful for valid JSON, harmless on anything else.
pub fn nested_deeper_than(body: &[u8], max: usize) -> bool {
    shape(body, max).too_deep
}

/// Reads the request facts of `kind` from a complete JSON body, without a path (the APIs that
/// name the model in the body; see [`read_request`] for every API).
pub fn parse_request(kind: ApiKind, body: &[u8]) -> Result<RequestFacts, RequestError> {
    kind.dialect().read_request(body, None)
}

/// Reads the request facts of the request `call` classified, from its complete JSON body: the
/// model and the streaming flag come from the path for the APIs that put them there.
pub fn read_request(call: &Call, body: &[u8]) -> Result<RequestFacts, RequestError> {
    let Some(path_model) = &call.model else {
        return parse_request(call.kind, body);
    };
    let Some(model) = path_model.name.as_deref() else {
        return Err(RequestError {
            param: Some("model".into()),
            message:
                "The model named in the request path is not a valid percent-encoded UTF-8 name"
                    .into(),
        });
    };
    let mut facts = call.kind.dialect().read_request(body, Some(model))?;
    facts.stream = call.stream;
    Ok(facts)
}

/// The facts of a body whose fields Tollgate does not read (its dialect fills in its output
/// fields): one JSON object within the nesting limit, the model from the path.
pub(crate) fn object_facts(body: &[u8], model: &str) -> Result<RequestFacts, RequestError> {
    let shape = check_object(body)?;
    let len = u64::try_from(body.len()).unwrap_or(u64::MAX);
    Ok(RequestFacts {
        model: model.to_string(),
        stream: false,
        include_usage: false,
        max_tokens: None,
        choices: 1,
        predicted_output_bound: 0,
        prompt_estimate: len.div_ceil(4),
        prompt_bound: len,
        external_input: shape.external,
        greedy: false,
        foreign_body: false,
        user: None,
    })
}

/// A body must be one JSON object within the nesting limit; its shape for the other checks.
fn check_object(body: &[u8]) -> Result<Shape, RequestError> {
    // serde would read a struct from a JSON array too; every API's body is an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(RequestError {
            param: None,
            message: "The request body is not valid JSON: expected a JSON object".into(),
        });
    }
    // serde skips unknown members without a depth limit, but the rewrite cannot parse them back.
    let shape = shape(body, MAX_JSON_DEPTH);
    if shape.too_deep {
        return Err(RequestError {
            param: None,
            message: format!(
                "The request body is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects are accepted"
            ),
        });
    }
    Ok(shape)
}

/// The fields of an OpenAI or Anthropic body, checked (see the module docs); each dialect
/// picks its output cap from them ([`Fields::facts`]).
#[derive(Debug)]
pub(crate) struct Fields {
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_completion_tokens: Option<u64>,
    pub(crate) max_output_tokens: Option<u64>,
    /// The larger of `n` and `best_of` (1 without them).
    pub(crate) choices: u64,
    /// Chat's `prediction` is present.
    pub(crate) prediction: bool,
    /// `anthropic_version` is present (Bedrock Invoke's Anthropic bodies).
    pub(crate) anthropic_version: bool,
    pub(crate) greedy: bool,
    /// OpenAI's `user`, else Anthropic's `metadata.user_id`.
    pub(crate) user: Option<String>,
    len: u64,
    external: bool,
}

impl Fields {
    /// The facts of a dialect whose output cap per choice is `max_tokens`.
    pub(crate) fn facts(self, max_tokens: Option<u64>) -> RequestFacts {
        RequestFacts {
            model: self.model,
            stream: self.stream,
            include_usage: self.include_usage,
            max_tokens,
            choices: self.choices,
            predicted_output_bound: 0,
            prompt_estimate: self.len.div_ceil(4),
            prompt_bound: self.len,
            external_input: self.external,
            greedy: self.greedy,
            foreign_body: false,
            user: self.user,
        }
    }

    /// The facts of a dialect that generates nothing (embeddings, token counts): no stream, no
    /// output cap, one output.
    pub(crate) fn input_only(self) -> RequestFacts {
        RequestFacts {
            stream: false,
            choices: 1,
            ..self.facts(None)
        }
    }

    /// The body's byte count (the bound on what a predicted output may add).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// Reads and checks an OpenAI or Anthropic body; `path_model` for Anthropic bodies that name the
/// model in the path (Bedrock Invoke, Vertex rawPredict), whose body has none.
pub(crate) fn read_fields(body: &[u8], path_model: Option<&str>) -> Result<Fields, RequestError> {
    let shape = check_object(body)?;
    // The common body parses on the fast path; only a refused one is read again for the path
    // of the field at fault (tracking it costs on every field).
    let raw = match serde_json::from_slice::<RawRequest<'_>>(body) {
        Ok(raw) => raw,
        Err(_) => return Err(explain(body)),
    };
    let model = match (path_model, raw.model) {
        (Some(model), _) => model.to_string(),
        (None, Some(model)) if !model.is_empty() => model.into_owned(),
        _ => {
            return Err(RequestError {
                param: Some("model".into()),
                message: "you must provide a model parameter".into(),
            });
        }
    };
    // A count of 0 is no count to vLLM (`max_completion_tokens or max_tokens`): it would lift
    // the cap strict mode relies on. OpenAI and Anthropic refuse it too.
    for (name, value) in [
        ("max_tokens", raw.max_tokens),
        ("max_completion_tokens", raw.max_completion_tokens),
        ("max_output_tokens", raw.max_output_tokens),
        ("n", raw.n),
        ("best_of", raw.best_of),
    ] {
        if value == Some(0) {
            return Err(RequestError {
                param: Some(name.into()),
                message: format!("Invalid value for '{name}': 0 is below the minimum value of 1"),
            });
        }
    }
    let single = |v: Option<u64>| v.is_none_or(|v| v == 1);
    Ok(Fields {
        model,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens: raw.max_tokens,
        max_completion_tokens: raw.max_completion_tokens,
        max_output_tokens: raw.max_output_tokens,
        choices: raw.n.unwrap_or(1).max(raw.best_of.unwrap_or(1)),
        prediction: raw.prediction.is_some(),
        anthropic_version: raw.anthropic_version.is_some(),
        greedy: single(raw.n)
            && single(raw.best_of)
            && (raw.temperature.is(0.0) || raw.top_p.is(0.0) || raw.top_k.is(1.0)),
        user: raw.user.0.or(raw.metadata.0),
        len: u64::try_from(body.len()).unwrap_or(u64::MAX),
        external: shape.external,
    })
}

/// Why a body that did not parse was refused: the field at fault, from a second, slower pass.
fn explain(body: &[u8]) -> RequestError {
    let mut de = serde_json::Deserializer::from_slice(body);
    let result: Result<RawRequest<'_>, _> = serde_path_to_error::deserialize(&mut de);
    let err = match result {
        Ok(_) => match de.end() {
            Ok(()) => {
                return RequestError {
                    param: None,
                    message: "The request body is not valid JSON".into(),
                };
            }
            Err(err) => {
                return RequestError {
                    param: None,
                    message: format!("The request body is not valid JSON: {err}"),
                };
            }
        },
        Err(err) => err,
    };
    let path = err.path().to_string();
    let inner = err.into_inner();
    let param = (path != "." && !inner.is_syntax() && !inner.is_eof()).then_some(path);
    RequestError {
        message: match &param {
            Some(p) => format!("Invalid value for '{p}': {}", without_position(&inner)),
            None => format!("The request body is not valid JSON: {inner}"),
        },
        param,
    }
}

pub(crate) fn without_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(at) => text.get(..at).unwrap_or(&text).to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_facts() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,
            "stream_options":{"include_usage":true},"max_tokens":100,"max_completion_tokens":50}"#;
        let f = parse_request(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(f.model, "gpt-4o");
        assert!(f.stream && f.include_usage);
        // Both spellings given: the larger, whichever one the upstream reads.
        assert_eq!(f.max_tokens, Some(100));
        assert_eq!(f.prompt_bound, body.len() as u64);
        assert_eq!(f.prompt_estimate, (body.len() as u64).div_ceil(4));
    }

    #[test]
    fn outputs_count_n_and_best_of_on_every_generating_api() {
        let n = |k, body: &str| parse_request(k, body.as_bytes()).unwrap().choices;
        assert_eq!(n(ApiKind::ChatCompletions, r#"{"model":"m","n":3}"#), 3);
        assert_eq!(n(ApiKind::ChatCompletions, r#"{"model":"m","n":null}"#), 1);
        assert_eq!(
            n(
                ApiKind::ChatCompletions,
                r#"{"model":"m","n":2,"best_of":5}"#
            ),
            5
        );
        assert_eq!(n(ApiKind::Responses, r#"{"model":"m","n":4}"#), 4);
        assert_eq!(n(ApiKind::Messages, r#"{"model":"m","n":4}"#), 4);
        assert_eq!(n(ApiKind::Embeddings, r#"{"model":"m","n":4}"#), 1);
    }

    /// Issue 18 A.2 and A.3: pydantic reads `"20"` and `20.0` as 20, vLLM reads 0 as no cap.
    #[test]
    fn counts_that_are_not_positive_integers_are_refused() {
        for field in [
            "n",
            "best_of",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
        ] {
            for value in [
                "0",
                "\"20\"",
                "20.0",
                "-1",
                "true",
                "1e3",
                "18446744073709551616",
            ] {
                let body = format!(r#"{{"model":"m","{field}":{value}}}"#);
                let e = parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap_err();
                assert_eq!(e.param.as_deref(), Some(field), "{body}");
            }
        }
        let e = parse_request(
            ApiKind::ChatCompletions,
            br#"{"model":"m","max_completion_tokens":0,"max_tokens":5000}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("minimum"), "{}", e.message);
        // A duplicate key is refused, whichever copy an upstream would read.
        assert!(parse_request(ApiKind::ChatCompletions, br#"{"model":"m","n":1,"n":9}"#).is_err());
    }

    #[test]
    fn a_predicted_output_adds_the_body_to_the_output_bound() {
        let body = br#"{"model":"m","prediction":{"type":"content","content":"abc"}}"#;
        let f = parse_request(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(f.predicted_output_bound, body.len() as u64);
        let f = parse_request(
            ApiKind::ChatCompletions,
            br#"{"model":"m","prediction":null}"#,
        );
        assert_eq!(f.unwrap().predicted_output_bound, 0);
    }

    #[test]
    fn each_api_has_its_max_tokens_field() {
        let body =
            br#"{"model":"m","max_tokens":1,"max_output_tokens":2,"max_completion_tokens":3}"#;
        let get = |k| parse_request(k, body).unwrap().max_tokens;
        assert_eq!(get(ApiKind::ChatCompletions), Some(3));
        assert_eq!(get(ApiKind::Responses), Some(2));
        assert_eq!(get(ApiKind::Messages), Some(1));
        assert_eq!(get(ApiKind::Embeddings), None);
    }

    #[test]
    fn escaped_model_and_nulls() {
        let body =
            br#"{"model":"gpt\u002d4o","stream":null,"stream_options":null,"max_tokens":null}"#;
        let f = parse_request(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!(f.model, "gpt-4o");
        assert!(!f.stream);
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let e = parse_request(ApiKind::ChatCompletions, b"{\"model\":").unwrap_err();
        assert_eq!(e.param, None);
        let e = parse_request(ApiKind::ChatCompletions, br#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse_request(ApiKind::Messages, br#"{"model":"m","max_tokens":-1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse_request(ApiKind::Messages, br#"{"model":"m","stream":"yes"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream"));
        let e = parse_request(ApiKind::Messages, br#"{"model":"m"} {}"#).unwrap_err();
        assert_eq!(e.param, None);
        assert!(parse_request(ApiKind::Messages, b"[1,2]").is_err());
        assert!(parse_request(ApiKind::Messages, br#"["gpt-4o"]"#).is_err());
        assert!(parse_request(ApiKind::Messages, b"\xff").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_without_a_param() {
        let deep = |n: usize| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"x":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        // The body object itself is level 1: `x` holds MAX - 1 more levels at the limit.
        let at_limit = deep(MAX_JSON_DEPTH - 1);
        parse_request(ApiKind::ChatCompletions, at_limit.as_bytes()).unwrap();
        // What is admitted can always be rewritten (include_usage, max tokens).
        let edits = super::super::rewrite::Edits {
            include_usage: true,
            max_tokens: Some(5),
            model: None,
        };
        assert!(
            super::super::rewrite::apply(ApiKind::ChatCompletions, at_limit.as_bytes(), &edits)
                .is_some()
        );
        for n in [MAX_JSON_DEPTH, 10_000] {
            let e = parse_request(ApiKind::ChatCompletions, deep(n).as_bytes()).unwrap_err();
            assert_eq!(e.param, None);
            assert!(e.message.contains("nested too deeply"), "{}", e.message);
        }
        // Brackets inside strings (escaped quotes included) do not count.
        let text = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"\"{}"}}]}}"#,
            "[{".repeat(5000)
        );
        assert!(parse_request(ApiKind::ChatCompletions, text.as_bytes()).is_ok());
        assert!(!nested_deeper_than(br#"{"a":"\\"}"#, 1));
        assert!(nested_deeper_than(br#"{"a":"\\",[]}"#, 1));
    }

    /// The byte-at-a-time depth scan the word-at-a-time one replaced.
    fn deeper_reference(body: &[u8], max: usize) -> bool {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    proptest::proptest! {
        #[test]
        fn the_depth_scan_matches_the_bytewise_one(
            body in proptest::collection::vec(proptest::sample::select(b"{}[]\"\\ a".to_vec()), 0..64),
            max in 0usize..6,
        ) {
            proptest::prop_assert_eq!(nested_deeper_than(&body, max), deeper_reference(&body, max));
        }

        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(ApiKind::ChatCompletions, &body);
        }
    }

    #[test]
    fn input_from_outside_the_body_is_recognised_by_its_keys() {
        let plain =
            br#"{"model":"m","messages":[{"role":"user","content":"say \"prompt\" and \"url\""}]}"#;
        assert!(!refers_outside_body(plain));
        for body in [
            &br#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#[..],
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#,
            br#"{"model":"m","messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
            br#"{"model":"m","input":[{"type":"input_file","file_id":"file-1"}]}"#,
        ] {
            assert!(refers_outside_body(body), "{}", String::from_utf8_lossy(body));
        }
        let facts = parse_request(ApiKind::ChatCompletions, plain).unwrap();
        assert!(!facts.external_input);
    }
}
