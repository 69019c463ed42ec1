//! Anthropic Messages, and the Anthropic Messages body other families carry (Claude on Vertex
//! `rawPredict`, Bedrock `invoke`): its fields, its output cap, its usage.

use serde_json::{Map, Value};

use super::Dialect;
use crate::api::request::{RequestError, RequestFacts, read_fields};
use crate::api::sse::SseGrammar;
use crate::api::usage::{self, RawUsage, Reading, read_cut_usage_object, read_usage_object};
use crate::api::{Family, Usage};

/// `…/messages`.
pub(super) struct Messages;

impl Dialect for Messages {
    fn name(&self) -> &'static str {
        "messages"
    }
    fn family(&self) -> Family {
        Family::Anthropic
    }
    fn read_request(
        &self,
        body: &[u8],
        path_model: Option<&str>,
    ) -> Result<RequestFacts, RequestError> {
        read_body(body, path_model)
    }
    fn set_max_tokens(&self, doc: &mut Map<String, Value>, max: Value) {
        set_max_tokens(doc, max);
    }
    fn json_usage(&self, body: &[u8]) -> Reading {
        json_usage(body)
    }
    fn cut_json_usage(&self, prefix: &[u8]) -> Reading {
        cut_json_usage(prefix)
    }
    fn sse(&self) -> SseGrammar {
        SseGrammar::Messages
    }
}

/// The facts of a Messages body: `max_tokens` caps the response (`thinking.budget_tokens` is
/// inside it).
pub(super) fn read_body(
    body: &[u8],
    path_model: Option<&str>,
) -> Result<RequestFacts, RequestError> {
    let fields = read_fields(body, path_model)?;
    let max = fields.max_tokens;
    Ok(fields.facts(max))
}

pub(super) fn set_max_tokens(doc: &mut Map<String, Value>, max: Value) {
    doc.insert("max_tokens".to_string(), max);
}

pub(super) fn json_usage(body: &[u8]) -> Reading {
    read_usage_object(body, anthropic_usage)
}

pub(super) fn cut_json_usage(prefix: &[u8]) -> Reading {
    read_cut_usage_object(prefix, anthropic_usage)
}

/// Whether a usage object has any of Anthropic's count fields.
pub(crate) fn speaks_anthropic(raw: &RawUsage) -> bool {
    raw.input_tokens.is_some()
        || raw.output_tokens.is_some()
        || raw.cache_read_input_tokens.is_some()
        || raw.cache_creation_input_tokens.is_some()
}

/// Anthropic's usage: `input_tokens` leaves cache reads and writes out; ours counts them in.
pub(crate) fn anthropic_usage(raw: &RawUsage) -> Option<Usage> {
    let n = |v: Option<u64>| v.unwrap_or(0);
    speaks_anthropic(raw).then(|| {
        usage::anthropic(
            n(raw.input_tokens),
            n(raw.output_tokens),
            n(raw.cache_read_input_tokens),
            n(raw.cache_creation_input_tokens),
        )
    })
}
