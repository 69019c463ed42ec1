//! Test helpers shared by the exchange's test modules: exchanges over a parsed request, small
//! limits, and a Chat Completions JSON body with usage.

use super::Exchange;
use crate::api::ApiKind;
use crate::api::request::parse_request;
use crate::config::Limits;

pub(super) fn exchange(kind: ApiKind) -> Exchange {
    let facts = parse_request(kind, br#"{"model":"m","stream":true}"#).unwrap();
    Exchange::new(kind, "t".into(), facts, Limits::default())
}

pub(super) fn small_limits() -> Limits {
    Limits {
        max_response_buffer_bytes: 256 * 1024,
        max_sse_line_bytes: 64 * 1024,
        max_decoded_response_bytes: 4 * 1024 * 1024,
        ..Limits::default()
    }
}

pub(super) fn exchange_with(kind: ApiKind, body: &str, limits: Limits) -> Exchange {
    let facts = parse_request(kind, body.as_bytes()).unwrap();
    Exchange::new(kind, "t".into(), facts, limits)
}

pub(super) const CHAT_JSON: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3}}}"#;
