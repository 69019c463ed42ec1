//! Bedrock runtime: Converse (every model in one shape; its stream an AWS event stream) and
//! Invoke with an Anthropic Messages body. The model id is in the path; usage also comes in
//! `x-amzn-bedrock-*-token-count` headers.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Dialect, Reader, ResponseBody, anthropic};
use crate::api::Family;
use crate::api::bedrock_stream::{self, StreamOperation};
use crate::api::request::{
    Number, RequestError, RequestFacts, object_facts, read_fields, without_position,
};
use crate::api::sse::SseGrammar;
use crate::api::usage::Reading;

/// `…/model/{id}/converse` and `/converse-stream`.
pub(super) struct Converse;
/// `…/model/{id}/invoke` and `/invoke-with-response-stream`.
pub(super) struct Invoke;

/// Bedrock's token counts on every non-streamed answer.
const USAGE_HEADERS: [&str; 2] = [
    "x-amzn-bedrock-input-token-count",
    "x-amzn-bedrock-output-token-count",
];

impl Dialect for Converse {
    fn name(&self) -> &'static str {
        "converse"
    }
    fn family(&self) -> Family {
        Family::Aws
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        let facts = object_facts(body, path_model.unwrap_or_default())?;
        let (max_tokens, greedy) = converse_fields(body)?;
        Ok(RequestFacts {
            max_tokens,
            greedy,
            ..facts
        })
    }
    fn max_tokens_field(&self) -> &'static str {
        "inferenceConfig.maxTokens"
    }
    fn set_max_tokens(&self, doc: &mut Map<String, Value>, max: Value) {
        let config = doc
            .entry("inferenceConfig")
            .or_insert_with(|| Value::Object(Map::new()));
        if !config.is_object() {
            *config = Value::Object(Map::new());
        }
        if let Value::Object(config) = config {
            config.insert("maxTokens".to_string(), max.clone());
        }
        // A model-specific cap passed through as it is must not stay above ours.
        if let Some(Value::Object(extra)) = doc.get_mut("additionalModelRequestFields") {
            for name in CONVERSE_ADDITIONAL_CAPS {
                if let Some(cap) = extra.get_mut(name) {
                    *cap = max.clone();
                }
            }
        }
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        bedrock_stream::converse_body_usage(body)
    }
    fn reader(&self, body: ResponseBody) -> Reader {
        event_stream_reader(body, StreamOperation::ConverseStream, SseGrammar::Silent)
    }
    fn usage_headers(&self) -> Option<[&'static str; 2]> {
        Some(USAGE_HEADERS)
    }
    fn reencodes_path_model(&self) -> bool {
        true
    }
}

impl Dialect for Invoke {
    fn name(&self) -> &'static str {
        "invoke"
    }
    fn family(&self) -> Family {
        Family::Aws
    }
    /// An Anthropic Messages body (with `anthropic_version`). Another model family's body is
    /// `foreign_body`: neither its cap nor its usage can be read (Converse reads every model).
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        let fields = read_fields(body, path_model)?;
        if fields.anthropic_version {
            let max = fields.max_tokens;
            return Ok(fields.facts(max));
        }
        Ok(RequestFacts {
            foreign_body: true,
            ..fields.facts(None)
        })
    }
    fn set_max_tokens(&self, doc: &mut Map<String, Value>, max: Value) {
        anthropic::set_max_tokens(doc, max);
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        anthropic::json_usage(body)
    }
    fn cut_json_usage(&self, prefix: &[u8]) -> Reading {
        anthropic::cut_json_usage(prefix)
    }
    fn sse(&self) -> SseGrammar {
        SseGrammar::Messages
    }
    fn reader(&self, body: ResponseBody) -> Reader {
        event_stream_reader(body, StreamOperation::InvokeWithResponseStream, self.sse())
    }
    fn usage_headers(&self) -> Option<[&'static str; 2]> {
        Some(USAGE_HEADERS)
    }
    fn reencodes_path_model(&self) -> bool {
        true
    }
}

/// An event stream for the streaming operation; SSE or JSON otherwise.
fn event_stream_reader(body: ResponseBody, operation: StreamOperation, sse: SseGrammar) -> Reader {
    if body.event_stream {
        Reader::EventStream(operation)
    } else if body.sse {
        Reader::Sse(sse)
    } else {
        Reader::Json
    }
}

#[derive(Deserialize)]
struct ConverseBody {
    #[serde(rename = "inferenceConfig", default)]
    inference_config: Option<ConverseInference>,
    /// Model-specific request fields Bedrock passes to the model as they are.
    #[serde(rename = "additionalModelRequestFields", default)]
    additional: Option<ConverseAdditional>,
}

#[derive(Deserialize)]
struct ConverseInference {
    #[serde(rename = "maxTokens", default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Number,
    #[serde(rename = "topP", default)]
    top_p: Number,
}

/// The output caps model families read from `additionalModelRequestFields`, by name: Anthropic
/// (`max_tokens`), Meta (`max_gen_len`), Amazon Titan (`maxTokenCount`), Mistral and others
/// (`max_new_tokens`, `max_completion_tokens`, `maxTokens`). Tollgate rewrites each one present
/// with `inferenceConfig.maxTokens` ([`CONVERSE_ADDITIONAL_CAPS`]).
#[derive(Deserialize)]
struct ConverseAdditional {
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_gen_len: Option<u64>,
    #[serde(rename = "maxTokenCount", default)]
    max_token_count: Option<u64>,
    #[serde(default)]
    max_new_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(rename = "maxTokens", default)]
    max_tokens_camel: Option<u64>,
    /// Anthropic's and others' top-k, passed through (Converse has none of its own).
    #[serde(default)]
    top_k: Number,
}

/// The `additionalModelRequestFields` members read as output caps (see [`ConverseAdditional`]).
pub const CONVERSE_ADDITIONAL_CAPS: [&str; 6] = [
    "max_tokens",
    "max_gen_len",
    "maxTokenCount",
    "max_new_tokens",
    "max_completion_tokens",
    "maxTokens",
];

/// Converse's output cap: `inferenceConfig.maxTokens` and the model-specific caps of
/// `additionalModelRequestFields`, the largest given (each a positive integer, or absent); and
/// whether it decodes greedily (`inferenceConfig.temperature` or `topP` of 0, or a passed-through
/// `top_k` of 1; Converse generates one output).
fn converse_fields(body: &[u8]) -> Result<(Option<u64>, bool), RequestError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: ConverseBody = match serde_path_to_error::deserialize(&mut de) {
        Ok(parsed) => parsed,
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            return Err(if inner.is_data() {
                RequestError {
                    message: format!("Invalid value for '{path}': {}", without_position(&inner)),
                    param: Some(path),
                }
            } else {
                RequestError {
                    param: None,
                    message: format!("The request body is not valid JSON: {inner}"),
                }
            });
        }
    };
    let greedy = parsed
        .inference_config
        .as_ref()
        .is_some_and(|c| c.temperature.is(0.0) || c.top_p.is(0.0))
        || parsed.additional.as_ref().is_some_and(|a| a.top_k.is(1.0));
    let extra = parsed.additional.map(|a| {
        [
            a.max_tokens,
            a.max_gen_len,
            a.max_token_count,
            a.max_new_tokens,
            a.max_completion_tokens,
            a.max_tokens_camel,
        ]
    });
    let named = std::iter::once((
        "inferenceConfig.maxTokens".to_string(),
        parsed.inference_config.and_then(|c| c.max_tokens),
    ))
    .chain(extra.into_iter().flat_map(|values| {
        CONVERSE_ADDITIONAL_CAPS
            .iter()
            .zip(values)
            .map(|(name, value)| (format!("additionalModelRequestFields.{name}"), value))
    }));
    let mut max = None;
    for (name, value) in named {
        if value == Some(0) {
            return Err(RequestError {
                message: format!("Invalid value for '{name}': 0 is below the minimum value of 1"),
                param: Some(name),
            });
        }
        max = max.max(value);
    }
    Ok((max, greedy))
}
