//! The per-request decisions, before anything is reserved: the model allow-list, the cap on
//! max tokens and on outputs (`n`), strict mode's injected max tokens, and the output to reserve
//! (every output a request may generate; see `api::request` for the fields read).

use crate::admission::TenantPolicy;
use crate::api::ApiKind;
use crate::api::dialect::Output;
use crate::api::request::RequestFacts;
use crate::reply::Refusal;

/// The request-level decisions, before anything is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Prompt tokens reserved (estimate, or the upper bound in strict mode).
    pub prompt_tokens: u64,
    /// Output tokens reserved: per output times `choices`, plus a predicted output's bound.
    pub output_tokens: u64,
    /// Outputs the upstream generates (`RequestFacts::choices`), each up to the max tokens.
    pub choices: u64,
    /// Output a predicted output may add (`RequestFacts::predicted_output_bound`).
    pub predicted_output: u64,
    /// Rewrite the API's max-tokens field (per output) to this value.
    pub set_max_tokens: Option<u64>,
    /// OpenAI chat stream that did not ask for usage: ask upstream, hide it from the client.
    pub inject_include_usage: bool,
}

/// The API's max-tokens field name, for messages.
pub fn max_tokens_field(kind: ApiKind) -> &'static str {
    kind.dialect().max_tokens_field()
}

/// Checks the request against the tenant's per-request rules and decides what to reserve.
/// `served` is the model routing resolved `facts.model` to: the allow-list accepts either name.
pub fn plan(
    policy: &TenantPolicy,
    kind: ApiKind,
    facts: &RequestFacts,
    served: &str,
) -> Result<Plan, Refusal> {
    if let Some(models) = &policy.models
        && !models.contains(&facts.model)
        && !models.contains(served)
    {
        return Err(Refusal::Forbidden {
            message: format!(
                "The model '{}' is not allowed for this tenant.",
                facts.model
            ),
        });
    }
    let prompt_tokens = if policy.strict {
        facts.prompt_bound
    } else {
        facts.prompt_estimate
    };
    let dialect = kind.dialect();
    if dialect.output() != Output::Tokens {
        return Ok(Plan {
            // A token count generates nothing and is never charged.
            prompt_tokens: if dialect.output() == Output::Nothing {
                0
            } else {
                prompt_tokens
            },
            output_tokens: 0,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        });
    }
    if facts.foreign_body {
        if policy.strict || policy.max_output_tokens.is_some() {
            return Err(Refusal::BadRequest {
                param: None,
                message: "This tenant's output cap cannot be applied to this Invoke body (only Anthropic Messages bodies, with anthropic_version, are read); use the Converse API.".into(),
            });
        }
        return Ok(Plan {
            prompt_tokens,
            output_tokens: policy.default_output_tokens,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        });
    }
    if let Some(max) = policy.max_choices
        && facts.choices > max
    {
        return Err(Refusal::BadRequest {
            param: Some(dialect.choices_field().into()),
            message: format!(
                "{} outputs were asked for (n, best_of), above this tenant's per-request cap of {max}.",
                facts.choices
            ),
        });
    }
    let cap = policy.max_output_tokens.unwrap_or(u64::MAX);
    let (per_output, set_max_tokens) = match facts.max_tokens {
        Some(asked) if asked > cap => {
            if policy.clamp_min_output_tokens.is_none() {
                return Err(Refusal::BadRequest {
                    param: Some(max_tokens_field(kind).to_string()),
                    message: format!(
                        "{} is {asked}, above this tenant's per-request cap of {cap}.",
                        max_tokens_field(kind)
                    ),
                });
            }
            (cap, Some(cap))
        }
        Some(asked) => (asked, None),
        None => {
            let reserve = policy.default_output_tokens.min(cap);
            // Strict mode only holds if the upstream cannot produce more than was reserved.
            (reserve, policy.strict.then_some(reserve))
        }
    };
    Ok(Plan {
        prompt_tokens,
        output_tokens: output_reserve(per_output, facts.choices, facts.predicted_output_bound),
        choices: facts.choices,
        predicted_output: facts.predicted_output_bound,
        set_max_tokens,
        inject_include_usage: dialect.asks_stream_usage() && facts.stream && !facts.include_usage,
    })
}

/// The output a request may generate: `choices` outputs of `per_output` tokens each, plus what
/// a predicted output may add.
pub fn output_reserve(per_output: u64, choices: u64, predicted: u64) -> u64 {
    per_output
        .saturating_mul(choices.max(1))
        .saturating_add(predicted)
}
