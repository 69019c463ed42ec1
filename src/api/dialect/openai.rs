//! OpenAI's APIs: Chat Completions, Responses and Embeddings (and every server that speaks them:
//! vLLM, Azure OpenAI, Vertex's OpenAI-compatible endpoint, …).

use serde_json::{Map, Value};

use super::Dialect;
use crate::api::request::{RequestError, RequestFacts, read_fields};
use crate::api::sse::SseGrammar;
use crate::api::usage::{RawUsage, Reading, read_usage_object};
use crate::api::{Family, Usage};

/// `…/chat/completions`.
pub(super) struct ChatCompletions;
/// `…/responses`.
pub(super) struct Responses;
/// `…/embeddings`.
pub(super) struct Embeddings;

impl Dialect for ChatCompletions {
    fn name(&self) -> &'static str {
        "chat_completions"
    }
    fn family(&self) -> Family {
        Family::OpenAi
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        let fields = read_fields(body, path_model)?;
        // Rejected prediction tokens are billed as output: at most the body's bytes more.
        let predicted = if fields.prediction { fields.len() } else { 0 };
        // `Option`'s order puts `None` first: the larger of the two when both are given.
        let max = fields.max_completion_tokens.max(fields.max_tokens);
        Ok(RequestFacts {
            predicted_output_bound: predicted,
            ..fields.facts(max)
        })
    }
    fn max_tokens_field(&self) -> &'static str {
        "max_completion_tokens"
    }
    fn set_max_tokens(&self, doc: &mut Map<String, Value>, max: Value) {
        // Keep the client's choice of field; new requests get the current one. A body with
        // both gets both: servers disagree on which one wins.
        let legacy = doc.contains_key("max_tokens");
        if legacy {
            doc.insert("max_tokens".to_string(), max.clone());
        }
        if !legacy || doc.contains_key("max_completion_tokens") {
            doc.insert("max_completion_tokens".to_string(), max);
        }
    }
    fn asks_stream_usage(&self) -> bool {
        true
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        read_usage_object(body, chat_usage)
    }
    fn cut_json_usage(&self, prefix: &[u8]) -> Reading {
        crate::api::usage::read_cut_usage_object(prefix, chat_usage)
    }
    fn sse(&self) -> SseGrammar {
        SseGrammar::Chat
    }
}

impl Dialect for Responses {
    fn name(&self) -> &'static str {
        "responses"
    }
    fn family(&self) -> Family {
        Family::OpenAi
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        let fields = read_fields(body, path_model)?;
        let max = fields.max_output_tokens;
        Ok(fields.facts(max))
    }
    fn max_tokens_field(&self) -> &'static str {
        "max_output_tokens"
    }
    fn set_max_tokens(&self, doc: &mut Map<String, Value>, max: Value) {
        doc.insert("max_output_tokens".to_string(), max);
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        read_usage_object(body, responses_usage)
    }
    fn cut_json_usage(&self, prefix: &[u8]) -> Reading {
        crate::api::usage::read_cut_usage_object(prefix, responses_usage)
    }
    fn sse(&self) -> SseGrammar {
        SseGrammar::Responses
    }
}

impl Dialect for Embeddings {
    fn name(&self) -> &'static str {
        "embeddings"
    }
    fn family(&self) -> Family {
        Family::OpenAi
    }
    fn output(&self) -> super::Output {
        super::Output::InputOnly
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        Ok(read_fields(body, path_model)?.input_only())
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        read_usage_object(body, embeddings_usage)
    }
    fn cut_json_usage(&self, prefix: &[u8]) -> Reading {
        crate::api::usage::read_cut_usage_object(prefix, embeddings_usage)
    }
}

/// Chat Completions' usage: `prompt_tokens` (cached ones included), `completion_tokens`
/// (reasoning included). `None` without either count (another API's usage, or `{}`).
pub(crate) fn chat_usage(raw: &RawUsage) -> Option<Usage> {
    (raw.prompt_tokens.is_some() || raw.completion_tokens.is_some()).then(|| {
        openai(
            raw.prompt_tokens,
            raw.completion_tokens,
            raw.prompt_cached_tokens,
            raw.completion_reasoning_tokens,
        )
    })
}

/// Responses' usage: `input_tokens`, `output_tokens` and their details.
pub(crate) fn responses_usage(raw: &RawUsage) -> Option<Usage> {
    (raw.input_tokens.is_some() || raw.output_tokens.is_some()).then(|| {
        openai(
            raw.input_tokens,
            raw.output_tokens,
            raw.input_cached_tokens,
            raw.output_reasoning_tokens,
        )
    })
}

/// Embeddings' usage: `prompt_tokens`.
pub(crate) fn embeddings_usage(raw: &RawUsage) -> Option<Usage> {
    raw.prompt_tokens.map(|input| Usage {
        input,
        ..Usage::default()
    })
}

fn openai(
    input: Option<u64>,
    output: Option<u64>,
    cached: Option<u64>,
    reasoning: Option<u64>,
) -> Usage {
    let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
    Usage {
        input,
        output,
        cached_input: cached.unwrap_or(0).min(input),
        cache_write_input: 0,
        reasoning: reasoning.unwrap_or(0).min(output),
    }
}
