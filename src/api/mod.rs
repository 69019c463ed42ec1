//! Request facts and usage for the LLM APIs Tollgate understands: which API a path is, what a
//! request asks for, and how many tokens a response used (JSON bodies and incremental SSE).

pub mod bedrock_stream;
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
}

/// The APIs Tollgate reads. Anything else passes through untouched.
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
}

impl ApiKind {
    /// Classifies a request path (`:path`, query string allowed) by suffix, so prefixes such as
    /// `/v1`, `/openai/deployments/NAME` or a gateway prefix work. `None` means "not ours".
    pub fn from_path(path: &[u8]) -> Option<ApiKind> {
        let end = path
            .iter()
            .position(|b| *b == b'?' || *b == b'#')
            .unwrap_or(path.len());
        let mut path = path.get(..end)?;
        while let [rest @ .., b'/'] = path {
            path = rest;
        }
        const SUFFIXES: [(&[u8], ApiKind); 4] = [
            (b"/chat/completions", ApiKind::ChatCompletions),
            (b"/responses", ApiKind::Responses),
            (b"/embeddings", ApiKind::Embeddings),
            (b"/messages", ApiKind::Messages),
        ];
        SUFFIXES
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix))
            .map(|(_, kind)| *kind)
    }

    pub fn family(self) -> Family {
        match self {
            ApiKind::Messages => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }

    /// The name used in the ledger, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKind::ChatCompletions => "chat_completions",
            ApiKind::Responses => "responses",
            ApiKind::Embeddings => "embeddings",
            ApiKind::Messages => "messages",
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_suffix_with_prefixes_and_queries() {
        let cases: [(&str, Option<ApiKind>); 10] = [
            ("/v1/chat/completions", Some(ApiKind::ChatCompletions)),
            (
                "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
                Some(ApiKind::ChatCompletions),
            ),
            ("/gw/team-a/v1/responses", Some(ApiKind::Responses)),
            ("/v1/embeddings/", Some(ApiKind::Embeddings)),
            ("/v1/messages", Some(ApiKind::Messages)),
            ("/v1/messages/count_tokens", None),
            ("/v1/models", None),
            ("/v1/chat/completionsX", None),
            ("", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(ApiKind::from_path(path.as_bytes()), want, "{path}");
        }
    }
}
