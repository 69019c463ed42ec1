//! Request facts and usage for the LLM APIs Tollgate understands: which API a path is, what a
//! request asks for, and how many tokens a response used (JSON bodies and incremental SSE).

pub mod bedrock_stream;
pub mod dialect;
pub mod eventstream;
pub mod gemini;
pub mod request;
pub mod rewrite;
pub mod sse;
pub mod strip;
pub mod usage;

#[cfg(test)]
pub(crate) mod testing;

/// The API family decides the error shape and header names used towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Anthropic,
    /// Gemini (AI Studio) and Vertex AI, Claude on Vertex included: Google's error shape.
    Google,
    /// Bedrock runtime: `x-amzn-errortype` and `{"message": …}`.
    Aws,
}

/// The APIs Tollgate reads. Anything else passes through untouched. Each is one
/// [`dialect::Dialect`] ([`ApiKind::dialect`]): its body, usage and refusal shape; the path
/// table ([`dialect::classify`]) says which a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiKind {
    /// OpenAI Chat Completions, `…/chat/completions`.
    ChatCompletions,
    /// OpenAI Responses, `…/responses`.
    Responses,
    /// OpenAI Embeddings, `…/embeddings`.
    Embeddings,
    /// Anthropic Messages, `…/messages`.
    Messages,
    /// Gemini / Vertex `…/models/{m}:generateContent` and `:streamGenerateContent`.
    GenerateContent,
    /// Gemini / Vertex `…/models/{m}:embedContent` and `:batchEmbedContents`.
    EmbedContent,
    /// Gemini / Vertex `…/models/{m}:countTokens`: generates nothing, never charged.
    CountTokens,
    /// Claude on Vertex, `…/publishers/anthropic/models/{m}:rawPredict` and `:streamRawPredict`:
    /// an Anthropic Messages body, the model in the path.
    RawPredict,
    /// Bedrock `…/model/{id}/converse` and `/converse-stream`.
    Converse,
    /// Bedrock `…/model/{id}/invoke` and `/invoke-with-response-stream` with an Anthropic
    /// Messages body, the model in the path.
    Invoke,
}

impl ApiKind {
    /// Every API, in declaration order (tests and fuzz targets pick from it by index).
    pub const ALL: [ApiKind; 10] = [
        ApiKind::ChatCompletions,
        ApiKind::Responses,
        ApiKind::Embeddings,
        ApiKind::Messages,
        ApiKind::GenerateContent,
        ApiKind::EmbedContent,
        ApiKind::CountTokens,
        ApiKind::RawPredict,
        ApiKind::Converse,
        ApiKind::Invoke,
    ];

    /// Classifies a request path (`:path`, query string allowed). `None` means "not ours".
    /// See [`dialect::classify`], which also gives the model named in the path.
    pub fn from_path(path: &[u8]) -> Option<ApiKind> {
        dialect::classify(path).map(|call| call.kind)
    }

    /// Whose error shape and headers the client gets ([`dialect::Dialect::family`]).
    pub fn family(self) -> Family {
        self.dialect().family()
    }

    /// The name used in the ledger, metrics and logs.
    pub fn as_str(self) -> &'static str {
        self.dialect().name()
    }

    /// The API generates no output tokens (embeddings, token counts): no max-tokens field, no
    /// output reserved.
    pub fn generates_nothing(self) -> bool {
        self.dialect().output() != dialect::Output::Tokens
    }
}

/// Token usage normalised across APIs.
///
/// `input` counts every prompt token, cached and cache-write ones included (OpenAI's
/// `prompt_tokens` convention); `cached_input` and `cache_write_input` say how many of them were
/// cache reads and cache writes. Anthropic reports `input_tokens` *without* cache tokens, so its
/// `input` is `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`.
/// `reasoning` is the part of `output` spent on reasoning (informational; already in `output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_write_input: u64,
    pub reasoning: u64,
}
