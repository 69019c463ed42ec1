//! The APIs Tollgate reads, each one [`Dialect`]: how its body is read and edited, how its
//! response's usage is read, and whose error shape it answers in. The pipeline only ever asks
//! `kind.dialect()`; it never names an API.
//!
//! One module per provider family holds its dialects, composing the readers in `api/` (`sse`,
//! `gemini`, `eventstream`, `bedrock_stream`, `usage`):
//!
//! | module | dialects |
//! |---|---|
//! | [`openai`] | Chat Completions, Responses, Embeddings |
//! | [`anthropic`] | Messages (and the Anthropic body other families carry) |
//! | [`google`] | Gemini/Vertex `generateContent`, `embedContent`, `countTokens`; Claude's `rawPredict` |
//! | [`bedrock`] | Converse, Invoke |
//!
//! [`path`] says which dialect a request path is (the path table), at request-headers time.
//!
//! # Adding a dialect
//! 1. An [`ApiKind`] variant, and its row in [`ApiKind::dialect`] (and `ApiKind::ALL`).
//! 2. Its path shape in [`path`] (and in the shipped `llm_path` regex, `envoy/*.yaml`).
//! 3. A unit struct implementing [`Dialect`] in its family's module: request facts, the
//!    output-cap edit, the JSON usage and how a streamed body is read. Everything else (budgets,
//!    strict mode, routing, cache, ledger, metrics, refusals) follows from these answers.

mod anthropic;
mod bedrock;
mod google;
mod openai;
mod path;

#[cfg(test)]
pub(crate) use anthropic::anthropic_usage;
pub(crate) use anthropic::speaks_anthropic;
pub use bedrock::CONVERSE_ADDITIONAL_CAPS;
#[cfg(test)]
pub(crate) use openai::embeddings_usage;
pub(crate) use openai::{chat_usage, responses_usage};
pub use path::{Call, PathModel, classify, take_query_key, with_model};

use serde_json::{Map, Value};

use super::bedrock_stream::StreamOperation;
use super::gemini::StreamFormat;
use super::request::{RequestError, RequestFacts};
use super::rewrite::{self, Edits};
use super::sse::SseGrammar;
use super::usage::Reading;
use super::{ApiKind, Family};

/// What an API generates, and so what is reserved and charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Output tokens, up to the body's (or Tollgate's) cap.
    Tokens,
    /// Input only (embeddings): no output cap, no output reserved.
    InputOnly,
    /// Nothing at all (token counts): admitted, counted, never charged.
    Nothing,
}

/// What a successful response's head says about its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseBody {
    /// `content-type: text/event-stream`.
    pub sse: bool,
    /// `content-type: application/vnd.amazon.eventstream`.
    pub event_stream: bool,
    /// The request asked for a stream (body or path).
    pub stream_asked: bool,
}

/// How a successful response body is read for its usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// One JSON document, read at its end ([`Dialect::json_usage`]).
    Json,
    /// Server-sent events in one of the grammars of `sse`.
    Sse(SseGrammar),
    /// Gemini's stream: SSE (`?alt=sse`) or one JSON array in pieces.
    Gemini(StreamFormat),
    /// An AWS event stream.
    EventStream(StreamOperation),
}

/// One API as Tollgate reads it. Implementations are unit structs, one per [`ApiKind`].
pub trait Dialect: Sync {
    /// The name used in the ledger, metrics and logs.
    fn name(&self) -> &'static str;

    /// Whose error shape and rate-limit headers the client gets.
    fn family(&self) -> Family;

    fn output(&self) -> Output {
        Output::Tokens
    }

    /// The facts of a complete JSON body. `path_model` is the model the path names, for the
    /// dialects that name it there (`None` for the others, or when a caller has no path).
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError>;

    /// The output-cap field, as named in refusals.
    fn max_tokens_field(&self) -> &'static str {
        "max_tokens"
    }

    /// The field asking for several outputs, as named in refusals.
    fn choices_field(&self) -> &'static str {
        "n"
    }

    /// Sets the output cap in a parsed body (clamp and strict modes).
    fn set_max_tokens(&self, _doc: &mut Map<String, Value>, _max: Value) {}

    /// Applies `edits` to the body (re-serialised); `None` if it is not a JSON object.
    fn rewrite(&self, body: &[u8], edits: &Edits) -> Option<Vec<u8>> {
        rewrite::edit_object(body, edits, |doc, max| self.set_max_tokens(doc, max))
    }

    /// A stream that did not ask for its usage must be asked (Chat Completions'
    /// `stream_options.include_usage`, hidden from the client again).
    fn asks_stream_usage(&self) -> bool {
        false
    }

    /// The usage a complete JSON response body reports.
    fn json_usage(&self, body: &[u8]) -> Reading;

    /// The usage of a JSON body cut short, from its first byte (see
    /// `usage::read_cut_json_usage`). Absent unless the usage can come before the body's end.
    fn cut_json_usage(&self, _prefix: &[u8]) -> Reading {
        Reading::Absent
    }

    /// The events of its `text/event-stream` bodies.
    fn sse(&self) -> SseGrammar {
        SseGrammar::Silent
    }

    /// How a successful response body is read.
    fn reader(&self, body: ResponseBody) -> Reader {
        if body.sse {
            Reader::Sse(self.sse())
        } else {
            Reader::Json
        }
    }

    /// Response headers giving input and output tokens, a fallback for a usage never read.
    fn usage_headers(&self) -> Option<[&'static str; 2]> {
        None
    }

    /// The query parameter that may carry a credential (cut from `:path`).
    fn query_key(&self) -> bool {
        false
    }

    /// The path's model segment is written back percent-encoded on every request, even when
    /// routing keeps the model.
    fn reencodes_path_model(&self) -> bool {
        false
    }
}

impl ApiKind {
    /// The dialect of this API: the one table from API to behaviour.
    pub fn dialect(self) -> &'static dyn Dialect {
        match self {
            ApiKind::ChatCompletions => &openai::ChatCompletions,
            ApiKind::Responses => &openai::Responses,
            ApiKind::Embeddings => &openai::Embeddings,
            ApiKind::Messages => &anthropic::Messages,
            ApiKind::GenerateContent => &google::GenerateContent,
            ApiKind::EmbedContent => &google::EmbedContent,
            ApiKind::CountTokens => &google::CountTokens,
            ApiKind::RawPredict => &google::RawPredict,
            ApiKind::Converse => &bedrock::Converse,
            ApiKind::Invoke => &bedrock::Invoke,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One path per API, as its SDK sends it.
    const PATHS: [(&str, ApiKind); 10] = [
        ("/v1/chat/completions", ApiKind::ChatCompletions),
        ("/v1/responses", ApiKind::Responses),
        ("/v1/embeddings", ApiKind::Embeddings),
        ("/v1/messages", ApiKind::Messages),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            ApiKind::GenerateContent,
        ),
        (
            "/v1/models/text-embedding-004:batchEmbedContents",
            ApiKind::EmbedContent,
        ),
        (
            "/v1/models/gemini-2.5-flash:countTokens",
            ApiKind::CountTokens,
        ),
        (
            "/v1/projects/p/locations/l/publishers/anthropic/models/claude:rawPredict",
            ApiKind::RawPredict,
        ),
        ("/model/amazon.nova-pro-v1%3A0/converse", ApiKind::Converse),
        ("/model/anthropic.claude-v2/invoke", ApiKind::Invoke),
    ];

    #[test]
    fn every_api_is_one_dialect_reached_from_its_path() {
        let mut names: Vec<&str> = ApiKind::ALL.iter().map(|k| k.dialect().name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ApiKind::ALL.len(), "dialect names are unique");
        for (path, kind) in PATHS {
            assert_eq!(
                classify(path.as_bytes()).map(|c| c.kind),
                Some(kind),
                "{path}"
            );
            assert_eq!(kind.as_str(), kind.dialect().name());
        }
        assert!(
            ApiKind::ALL
                .iter()
                .all(|k| PATHS.iter().any(|(_, p)| p == k))
        );
    }

    #[test]
    fn the_questions_the_pipeline_asks_have_the_documented_answers() {
        let output = |k: ApiKind| k.dialect().output();
        assert_eq!(output(ApiKind::Embeddings), Output::InputOnly);
        assert_eq!(output(ApiKind::EmbedContent), Output::InputOnly);
        assert_eq!(output(ApiKind::CountTokens), Output::Nothing);
        let asks: Vec<ApiKind> = ApiKind::ALL
            .into_iter()
            .filter(|k| k.dialect().asks_stream_usage())
            .collect();
        assert_eq!(asks, [ApiKind::ChatCompletions]);
        for kind in ApiKind::ALL {
            let d = kind.dialect();
            assert_eq!(d.query_key(), d.family() == Family::Google, "{kind:?}");
            assert_eq!(
                d.reencodes_path_model() || d.usage_headers().is_some(),
                d.family() == Family::Aws,
                "{kind:?}"
            );
        }
        // A Bedrock event stream is read as one only where Bedrock streams; a JSON answer is
        // JSON everywhere.
        let body = |sse, event_stream| ResponseBody {
            sse,
            event_stream,
            stream_asked: true,
        };
        assert_eq!(
            ApiKind::Converse.dialect().reader(body(false, true)),
            Reader::EventStream(StreamOperation::ConverseStream)
        );
        assert_eq!(
            ApiKind::Messages.dialect().reader(body(false, true)),
            Reader::Json
        );
        assert_eq!(
            ApiKind::GenerateContent
                .dialect()
                .reader(body(false, false)),
            Reader::Gemini(StreamFormat::JsonArray)
        );
        assert_eq!(
            ApiKind::Invoke.dialect().reader(body(true, false)),
            Reader::Sse(SseGrammar::Messages)
        );
    }
}
