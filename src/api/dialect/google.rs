//! Google's APIs, on AI Studio and Vertex AI: Gemini's `generateContent` (streamed as SSE or as
//! one JSON array), `embedContent`, `countTokens`, and Claude on Vertex (`rawPredict`, an
//! Anthropic Messages body under Google's front end). The model is in the path; a key may come
//! as `?key=`.

use serde_json::{Map, Value};

use super::{Dialect, Output, Reader, ResponseBody, anthropic};
use crate::api::Family;
use crate::api::gemini::{self, StreamFormat};
use crate::api::request::{RequestError, RequestFacts, object_facts, read_fields};
use crate::api::rewrite::Edits;
use crate::api::sse::SseGrammar;
use crate::api::usage::Reading;

/// `…/models/{m}:generateContent` and `:streamGenerateContent`.
pub(super) struct GenerateContent;
/// `…/models/{m}:embedContent` and `:batchEmbedContents`.
pub(super) struct EmbedContent;
/// `…/models/{m}:countTokens`, and Claude's `count-tokens:rawPredict` (model in the body).
pub(super) struct CountTokens;
/// `…/publishers/anthropic/models/{m}:rawPredict` and `:streamRawPredict`.
pub(super) struct RawPredict;

impl Dialect for GenerateContent {
    fn name(&self) -> &'static str {
        "generate_content"
    }
    fn family(&self) -> Family {
        Family::Google
    }
    /// `generationConfig`'s output cap, candidates and greedy decoding (`gemini::request`).
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        let facts = object_facts(body, path_model.unwrap_or_default())?;
        let generation = gemini::generation_facts(body)?;
        Ok(RequestFacts {
            max_tokens: generation.max_output_tokens,
            choices: generation.candidates,
            greedy: generation.greedy,
            ..facts
        })
    }
    fn max_tokens_field(&self) -> &'static str {
        "generationConfig.maxOutputTokens"
    }
    fn choices_field(&self) -> &'static str {
        "generationConfig.candidateCount"
    }
    /// Its own edit (both spellings of the generation config); the model is in the path and
    /// usage always comes, so the cap is the only one.
    fn rewrite(&self, body: &[u8], edits: &Edits) -> Option<Vec<u8>> {
        match edits.max_tokens {
            Some(max) => gemini::set_max_output_tokens(body, max),
            None => Some(body.to_vec()),
        }
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        gemini::read_body_usage(body)
    }
    fn reader(&self, body: ResponseBody) -> Reader {
        match (body.sse, body.stream_asked) {
            (true, _) => Reader::Gemini(StreamFormat::Sse),
            (false, true) => Reader::Gemini(StreamFormat::JsonArray),
            (false, false) => Reader::Json,
        }
    }
    fn query_key(&self) -> bool {
        true
    }
}

impl Dialect for EmbedContent {
    fn name(&self) -> &'static str {
        "embed_content"
    }
    fn family(&self) -> Family {
        Family::Google
    }
    fn output(&self) -> Output {
        Output::InputOnly
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        object_facts(body, path_model.unwrap_or_default())
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        gemini::read_body_usage(body)
    }
    fn query_key(&self) -> bool {
        true
    }
}

impl Dialect for CountTokens {
    fn name(&self) -> &'static str {
        "count_tokens"
    }
    fn family(&self) -> Family {
        Family::Google
    }
    fn output(&self) -> Output {
        Output::Nothing
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        match path_model {
            Some(model) => object_facts(body, model),
            // Claude's token count on Vertex names the model in its Anthropic body.
            None => Ok(read_fields(body, None)?.input_only()),
        }
    }
    /// A token count generates nothing and is never charged.
    fn json_usage(&self, _body: &[u8]) -> Reading {
        Reading::Absent
    }
    fn query_key(&self) -> bool {
        true
    }
}

impl Dialect for RawPredict {
    fn name(&self) -> &'static str {
        "raw_predict"
    }
    fn family(&self) -> Family {
        Family::Google
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        anthropic::read_body(body, path_model)
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
    fn query_key(&self) -> bool {
        true
    }
}
