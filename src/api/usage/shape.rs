//! A usage object as sent on the wire ([`RawUsage`], every API's fields), whether it speaks the
//! API's own fields, and its normalisation to a [`Usage`].

use crate::api::Usage;

/// A usage object as sent on the wire: the union of every API's fields. `None` means missing or
/// `null`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RawUsage {
    pub(crate) prompt_tokens: Option<u64>,
    pub(crate) completion_tokens: Option<u64>,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) cache_creation_input_tokens: Option<u64>,
    pub(crate) cache_read_input_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens` (Chat Completions).
    pub(crate) prompt_cached_tokens: Option<u64>,
    /// `completion_tokens_details.reasoning_tokens` (Chat Completions).
    pub(crate) completion_reasoning_tokens: Option<u64>,
    /// `input_tokens_details.cached_tokens` (Responses).
    pub(crate) input_cached_tokens: Option<u64>,
    /// `output_tokens_details.reasoning_tokens` (Responses).
    pub(crate) output_reasoning_tokens: Option<u64>,
    /// A count was not a `u64` (negative, fractional, `1e3`, over `u64`, a string, …), a details
    /// member was not an object, or the usage itself was not an object: the whole object is
    /// garbage, charged by the fallbacks and flagged `invalid_usage`.
    pub(crate) invalid: bool,
}

impl RawUsage {
    /// A usage object that cannot be trusted (see [`RawUsage::invalid`]).
    pub(crate) fn invalid() -> RawUsage {
        RawUsage {
            invalid: true,
            ..RawUsage::default()
        }
    }
}

/// Anthropic's `input_tokens` excludes cache reads and writes; ours includes them.
pub(crate) fn anthropic(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
    Usage {
        input: input.saturating_add(cache_read).saturating_add(cache_write),
        output,
        cached_input: cache_read,
        cache_write_input: cache_write,
        reasoning: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::api::usage::{Reading, read_json_usage, usage_from_json};

    #[test]
    fn null_and_missing_counts_are_zero() {
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":null,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, body),
            Some(Usage {
                input: 10,
                ..Usage::default()
            })
        );
        let body = br#"{"usage":{"input_tokens":5,"cache_read_input_tokens":null}}"#;
        assert_eq!(
            usage_from_json(ApiKind::Messages, body),
            Some(Usage {
                input: 5,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn anthropic_sum_saturates_and_openai_details_are_clamped() {
        let body = format!(
            r#"{{"usage":{{"input_tokens":{m},"cache_read_input_tokens":{m},"cache_creation_input_tokens":1,"output_tokens":2}}}}"#,
            m = u64::MAX
        );
        let u = usage_from_json(ApiKind::Messages, body.as_bytes()).unwrap();
        assert_eq!(
            (u.input, u.cached_input, u.cache_write_input),
            (u64::MAX, u64::MAX, 1)
        );
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":50},"completion_tokens_details":{"reasoning_tokens":9}}}"#;
        let u = usage_from_json(ApiKind::ChatCompletions, body).unwrap();
        assert_eq!((u.cached_input, u.reasoning), (10, 3));
    }

    #[test]
    fn foreign_usage_shapes_are_not_charged_as_zero() {
        let anthropic = br#"{"usage":{"input_tokens":30,"output_tokens":40}}"#;
        let openai = br#"{"usage":{"prompt_tokens":30,"completion_tokens":40,"total_tokens":70}}"#;
        for (kind, body, foreign) in [
            (ApiKind::ChatCompletions, &anthropic[..], true),
            (ApiKind::Embeddings, &anthropic[..], true),
            (ApiKind::Responses, &openai[..], true),
            (ApiKind::Messages, &openai[..], true),
            (ApiKind::ChatCompletions, &openai[..], false),
            (ApiKind::Responses, &anthropic[..], false),
            (ApiKind::Messages, &anthropic[..], false),
        ] {
            let reading = read_json_usage(kind, body);
            assert_eq!(reading == Reading::Foreign, foreign, "{kind:?}");
            assert_eq!(usage_from_json(kind, body).is_none(), foreign, "{kind:?}");
        }
        // Only total_tokens, or null counts: not the API's fields either.
        for body in [
            &br#"{"usage":{"total_tokens":5}}"#[..],
            br#"{"usage":{"prompt_tokens":null,"completion_tokens":null}}"#,
        ] {
            assert_eq!(
                read_json_usage(ApiKind::ChatCompletions, body),
                Reading::Foreign
            );
        }
        // One own field is enough (the others count 0).
        assert_eq!(
            usage_from_json(ApiKind::Messages, br#"{"usage":{"output_tokens":3}}"#),
            Some(Usage {
                output: 3,
                ..Usage::default()
            })
        );
        assert_eq!(
            read_json_usage(ApiKind::ChatCompletions, br#"{"usage":null}"#),
            Reading::Absent
        );
    }

    #[test]
    fn kinds_read_their_own_fields() {
        let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(
            usage_from_json(ApiKind::ChatCompletions, body)
                .unwrap()
                .input,
            1
        );
        assert_eq!(usage_from_json(ApiKind::Embeddings, body).unwrap().input, 1);
        assert_eq!(
            usage_from_json(ApiKind::Embeddings, body).unwrap().output,
            0
        );
        assert_eq!(usage_from_json(ApiKind::Responses, body).unwrap().input, 3);
        assert_eq!(usage_from_json(ApiKind::Messages, body).unwrap().output, 4);
    }
}
