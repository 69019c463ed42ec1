//! What a response may be charged at most ([`UsageBounds`]) and why a charge is not simply the
//! reported usage ([`UsageAnomaly`]).

use crate::api::Usage;
use crate::api::request::RequestFacts;
use crate::config::Limits;

/// Why the usage charged is not simply what the upstream reported (ledger field
/// `tollgate.usage_anomaly`, metric `tollgate.tenant.<t>.usage_anomalies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageAnomaly {
    /// The reported (or observed) usage was over its bound and was charged at the bound.
    Clamped,
    /// A usage object with none of the API's own fields: ignored, charged by the fallbacks.
    ForeignUsage,
    /// A usage object with a count that is not a `u64` (negative, fractional, `1e30`, over
    /// `u64`, a string, …), or a usage that is not an object: ignored, charged by the fallbacks
    /// (a stream: never less output than the deltas that passed).
    InvalidUsage,
    /// A compressed response decoded to more than `max_decoded_response_bytes`: decoding
    /// stopped, usage after that point was not read.
    DecodeLimit,
    /// A compressed response could not be decoded (corrupt, or an unknown encoding).
    DecodeError,
    /// A Bedrock event stream stopped decoding (a bad CRC, an absurd length, a malformed or
    /// over-long header block): usage after that point was not read.
    EventStream(crate::api::eventstream::DecodeError),
    /// An `exception` or `error` frame inside a 200 Bedrock stream: a failed answer.
    StreamException,
}

impl UsageAnomaly {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageAnomaly::Clamped => "clamped",
            UsageAnomaly::ForeignUsage => "foreign_usage",
            UsageAnomaly::InvalidUsage => "invalid_usage",
            UsageAnomaly::DecodeLimit => "decode_limit",
            UsageAnomaly::DecodeError => "decode_error",
            UsageAnomaly::EventStream(error) => error.as_str(),
            UsageAnomaly::StreamException => "stream_exception",
        }
    }
}

/// The most a response may be charged, field by field. See [`Exchange::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBounds {
    pub input: u64,
    pub output: u64,
}

impl UsageBounds {
    /// Output: the request's own max tokens (reasoning is part of it on every API) times its
    /// outputs (`n`, `best_of`), plus a predicted output's bound, never more than
    /// `max_reported_tokens`. Input: the body's bytes (every text token
    /// covers at least one byte, the premise of strict mode), plus `max_reported_tokens` when the
    /// body can bring input it does not show (`RequestFacts::external_input`: images or files by
    /// URL or id, a previous response or conversation, a stored prompt, tools).
    pub fn of(facts: &RequestFacts, limits: &Limits) -> UsageBounds {
        let unseen = if facts.external_input {
            limits.max_reported_tokens
        } else {
            0
        };
        UsageBounds {
            input: facts.prompt_bound.saturating_add(unseen),
            output: facts
                .max_tokens
                .map_or(u64::MAX, |max| {
                    crate::admission::output_reserve(
                        max,
                        facts.choices,
                        facts.predicted_output_bound,
                    )
                })
                .min(limits.max_reported_tokens),
        }
    }

    /// `usage` held within the bounds, keeping its invariants (`cached_input + cache_write_input
    /// ≤ input`, `reasoning ≤ output`); `true` when anything had to change.
    pub fn clamp(self, usage: Usage) -> (Usage, bool) {
        let input = usage.input.min(self.input);
        let output = usage.output.min(self.output);
        let cached_input = usage.cached_input.min(input);
        let cache_write_input = usage
            .cache_write_input
            .min(input.saturating_sub(cached_input));
        let reasoning = usage.reasoning.min(output);
        let clamped = Usage {
            input,
            output,
            cached_input,
            cache_write_input,
            reasoning,
        };
        // Only the bounds count as an anomaly: the invariants were already enforced on parsing
        // for each API, except an Anthropic cache split, which is re-derived here.
        let over = usage.input > self.input || usage.output > self.output;
        (clamped, over)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::exchange::UsageSource;
    use crate::exchange::testing::{CHAT_JSON, exchange, exchange_with};

    #[test]
    fn absurd_usage_is_clamped_to_the_request_bounds() {
        let absurd = format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":{m},"completion_tokens":{m},"prompt_tokens_details":{{"cached_tokens":{m}}},"completion_tokens_details":{{"reasoning_tokens":{m}}}}}}}"#,
            m = 1u64 << 63
        );
        let body = r#"{"model":"m","max_completion_tokens":50}"#;
        let mut x = exchange_with(ApiKind::ChatCompletions, body, Limits::default());
        x.on_response_headers(200, Some(b"application/json"), None);
        x.on_response_body(absurd.as_bytes());
        x.on_response_complete();
        let (usage, source) = x.finish(false);
        // Nothing in the body brings input from elsewhere: input is bounded by its bytes.
        let input = body.len() as u64;
        assert_eq!(
            usage,
            Usage {
                input,
                output: 50,
                cached_input: input,
                cache_write_input: 0,
                reasoning: 50
            }
        );
        assert_eq!(source, UsageSource::Reported);
        assert_eq!(x.usage_anomaly(), Some(UsageAnomaly::Clamped));
        // No max tokens: the configured bound.
        let mut y = exchange_with(
            ApiKind::ChatCompletions,
            r#"{"model":"m"}"#,
            Limits::default(),
        );
        y.on_response_headers(200, Some(b"application/json"), None);
        y.on_response_body(absurd.as_bytes());
        y.on_response_complete();
        assert_eq!(y.finish(false).0.output, 2_000_000);
        // Chat's n choices each get max tokens.
        let mut n = exchange_with(
            ApiKind::ChatCompletions,
            r#"{"model":"m","max_tokens":50,"n":3}"#,
            Limits::default(),
        );
        n.on_response_headers(200, Some(b"application/json"), None);
        n.on_response_body(absurd.as_bytes());
        n.on_response_complete();
        assert_eq!(n.finish(false).0.output, 150);
        // A body that can bring input from elsewhere (here a previous response) may report more.
        let mut r = exchange_with(
            ApiKind::Responses,
            r#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#,
            Limits::default(),
        );
        r.on_response_headers(200, Some(b"application/json"), None);
        r.on_response_body(br#"{"usage":{"input_tokens":150000,"output_tokens":3}}"#);
        r.on_response_complete();
        assert_eq!(
            (r.finish(false).0.input, r.usage_anomaly()),
            (150_000, None)
        );
        // Anthropic: the cache split is kept within the clamped input.
        let bounds = UsageBounds {
            input: 100,
            output: 10,
        };
        let (u, over) = bounds.clamp(Usage {
            input: 500,
            output: 5,
            cached_input: 80,
            cache_write_input: 400,
            reasoning: 0,
        });
        assert!(over);
        assert_eq!(
            (u.input, u.cached_input, u.cache_write_input, u.output),
            (100, 80, 20, 5)
        );
        // Ordinary usage is untouched and not an anomaly.
        let mut z = exchange(ApiKind::ChatCompletions);
        z.on_response_headers(200, Some(b"application/json"), None);
        z.on_response_body(CHAT_JSON);
        z.on_response_complete();
        assert_eq!(z.finish(false).0.output, 7);
        assert_eq!(z.usage_anomaly(), None);
    }
}
