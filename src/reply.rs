//! Local replies: every refusal Tollgate answers itself, in the error shape of the request's API
//! family, so the official SDKs raise their own exceptions.

use serde::Serialize;

use crate::api::Family;

/// Why Tollgate answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the body is not what the API accepts.
    BadRequest {
        param: Option<String>,
        message: String,
    },
    /// 400: the model is neither a model nor an alias of the routing table.
    ModelNotFound { model: String },
    /// 401: no tenant could be identified.
    Unauthenticated { message: String },
    /// 403: the tenant may not use this model.
    Forbidden { message: String },
    /// 405: the endpoint answers only the `allow`ed methods (sent as the `allow` header).
    MethodNotAllowed { allow: &'static str },
    /// 413: the request body exceeds the configured cap.
    TooLarge { limit: u64 },
    /// 429: a window limit (tokens, concurrency) is reached; retry after the window resets.
    RateLimited {
        message: String,
        retry_after_secs: u64,
        /// OpenAI error `type`: `tokens` or `requests`.
        kind: &'static str,
    },
    /// 429: a USD budget is spent. `x-should-retry: false`, so SDKs do not retry in a loop.
    QuotaExceeded {
        message: String,
        retry_after_secs: u64,
    },
    /// 429: the request's conversation spent its budget (steps, tokens, USD, age). It never
    /// comes back: `x-should-retry: false`, no `retry-after`.
    ConversationSpent { message: String },
    /// 500: an internal failure of the gateway (never a trap).
    Internal { message: String },
    /// 503: a global budget needed the rate-limit service, which could not be asked (and the
    /// limit has no fallback allowance left). Transient: SDKs retry it.
    BudgetUnavailable { message: String },
}

impl Family {
    /// The token rate-limit headers of the family's own API on an admitted request: `limit`
    /// and `remaining` tokens, the window resetting at `reset_ms` (in `reset_in_ms`). Google
    /// and Bedrock send none of their own.
    pub fn rate_limit_headers(
        self,
        limit: u64,
        remaining: u64,
        reset_ms: u64,
        reset_in_ms: u64,
    ) -> Option<[(&'static str, String); 3]> {
        match self {
            Family::OpenAi => Some([
                ("x-ratelimit-limit-tokens", limit.to_string()),
                ("x-ratelimit-remaining-tokens", remaining.to_string()),
                (
                    "x-ratelimit-reset-tokens",
                    crate::window::openai_duration(reset_in_ms),
                ),
            ]),
            Family::Anthropic => Some([
                ("anthropic-ratelimit-tokens-limit", limit.to_string()),
                (
                    "anthropic-ratelimit-tokens-remaining",
                    remaining.to_string(),
                ),
                (
                    "anthropic-ratelimit-tokens-reset",
                    crate::window::rfc3339(reset_ms),
                ),
            ]),
            Family::Google | Family::Aws => None,
        }
    }
}

impl LocalReply {
    /// Its headers, then the `extra` ones (names from the configuration) that are text.
    pub fn header_pairs<'a>(
        &'a self,
        extra: &'a [(&str, Option<Vec<u8>>)],
    ) -> Vec<(&'a str, &'a str)> {
        let extra = extra.iter().filter_map(|(name, value)| {
            Some((*name, std::str::from_utf8(value.as_deref()?).ok()?))
        });
        let own = self
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()));
        own.chain(extra).collect()
    }
}

/// A reply for Envoy to send: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Short machine-readable reason for logs and metrics.
    pub reason: &'static str,
}

/// Google's error shape (AI Studio and Vertex AI): `{"error": {code, message, status}}`.
#[derive(Serialize)]
struct GoogleError<'a> {
    error: GoogleErrorBody<'a>,
}

#[derive(Serialize)]
struct GoogleErrorBody<'a> {
    code: u32,
    message: &'a str,
    status: &'static str,
}

/// Bedrock's error body; the error's name goes in `x-amzn-errortype`, where botocore reads it.
#[derive(Serialize)]
struct AwsError<'a> {
    message: &'a str,
}

/// The `google.rpc.Code` name Google's front ends send with an HTTP status.
fn google_status(status: u32) -> &'static str {
    match status {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "INTERNAL",
    }
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    error: OpenAiErrorBody<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct AnthropicError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicErrorBody<'a>,
}

#[derive(Serialize)]
struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

impl Refusal {
    /// The Bedrock error name (`x-amzn-errortype`) boto3 raises. A spent USD budget is
    /// `ServiceQuotaExceededException`, which botocore does not retry (it retries
    /// `ThrottlingException`, so a spent monthly budget must not be one).
    fn aws_error_type(&self) -> &'static str {
        match self {
            Refusal::BadRequest { .. }
            | Refusal::ModelNotFound { .. }
            | Refusal::TooLarge { .. }
            | Refusal::MethodNotAllowed { .. } => "ValidationException",
            Refusal::Unauthenticated { .. } => "UnrecognizedClientException",
            Refusal::Forbidden { .. } => "AccessDeniedException",
            Refusal::RateLimited { .. } => "ThrottlingException",
            Refusal::QuotaExceeded { .. } | Refusal::ConversationSpent { .. } => {
                "ServiceQuotaExceededException"
            }
            Refusal::Internal { .. } => "InternalServerException",
            Refusal::BudgetUnavailable { .. } => "ServiceUnavailableException",
        }
    }

    /// Builds the reply in the shape of `family`.
    pub fn reply(&self, family: Family) -> LocalReply {
        let too_large;
        let not_found;
        let not_allowed;
        let (status, reason, message, param, openai, anthropic) = match self {
            Refusal::ModelNotFound { model } => {
                not_found =
                    format!("The model '{model}' does not exist or you do not have access to it.");
                (
                    400,
                    "model_not_found",
                    not_found.as_str(),
                    Some("model"),
                    ("invalid_request_error", Some("model_not_found")),
                    "invalid_request_error",
                )
            }
            Refusal::BadRequest { param, message } => (
                400,
                "bad_request",
                message.as_str(),
                param.as_deref(),
                ("invalid_request_error", None),
                "invalid_request_error",
            ),
            Refusal::Unauthenticated { message } => (
                401,
                "unauthenticated",
                message.as_str(),
                None,
                ("invalid_request_error", Some("invalid_api_key")),
                "authentication_error",
            ),
            Refusal::Forbidden { message } => (
                403,
                "model_not_allowed",
                message.as_str(),
                Some("model"),
                ("invalid_request_error", Some("model_not_allowed")),
                "permission_error",
            ),
            Refusal::MethodNotAllowed { allow } => {
                not_allowed = format!("This endpoint only answers {allow}.");
                (
                    405,
                    "method_not_allowed",
                    not_allowed.as_str(),
                    None,
                    ("invalid_request_error", Some("method_not_allowed")),
                    "invalid_request_error",
                )
            }
            Refusal::RateLimited { message, kind, .. } => (
                429,
                "rate_limited",
                message.as_str(),
                None,
                (*kind, Some("rate_limit_exceeded")),
                "rate_limit_error",
            ),
            Refusal::QuotaExceeded { message, .. } => (
                429,
                "quota_exceeded",
                message.as_str(),
                None,
                ("insufficient_quota", Some("insufficient_quota")),
                "rate_limit_error",
            ),
            Refusal::ConversationSpent { message } => (
                429,
                "conversation_budget_exceeded",
                message.as_str(),
                None,
                ("insufficient_quota", Some("conversation_budget_exceeded")),
                "rate_limit_error",
            ),
            Refusal::TooLarge { limit } => {
                too_large =
                    format!("The request body exceeds this gateway's limit of {limit} bytes.");
                (
                    413,
                    "too_large",
                    too_large.as_str(),
                    None,
                    ("invalid_request_error", Some("request_too_large")),
                    "request_too_large",
                )
            }
            Refusal::Internal { message } => (
                500,
                "internal",
                message.as_str(),
                None,
                ("server_error", None),
                "api_error",
            ),
            Refusal::BudgetUnavailable { message } => (
                503,
                "budget_unavailable",
                message.as_str(),
                None,
                ("server_error", Some("budget_service_unavailable")),
                "api_error",
            ),
        };
        // Bedrock models a spent quota as 400 `ServiceQuotaExceededException`; botocore's legacy
        // retry mode retries every 429, so a spent budget must not be one there.
        let status = match (family, self) {
            (Family::Aws, Refusal::QuotaExceeded { .. } | Refusal::ConversationSpent { .. }) => 400,
            _ => status,
        };
        let google_status = google_status(status);
        let aws_type = self.aws_error_type();
        let body = match family {
            Family::Google => serde_json::to_vec(&GoogleError {
                error: GoogleErrorBody {
                    code: status,
                    message,
                    status: google_status,
                },
            }),
            Family::Aws => serde_json::to_vec(&AwsError { message }),
            Family::OpenAi => serde_json::to_vec(&OpenAiError {
                error: OpenAiErrorBody {
                    message,
                    kind: openai.0,
                    param,
                    code: openai.1,
                },
            }),
            Family::Anthropic => serde_json::to_vec(&AnthropicError {
                kind: "error",
                error: AnthropicErrorBody {
                    kind: anthropic,
                    message,
                },
            }),
        }
        .unwrap_or_default();
        let mut headers = vec![("content-type", "application/json".to_string())];
        if family == Family::Aws {
            headers.push(("x-amzn-errortype", aws_type.to_string()));
        }
        match self {
            Refusal::RateLimited {
                retry_after_secs, ..
            } => headers.push(("retry-after", retry_after_secs.to_string())),
            Refusal::QuotaExceeded {
                retry_after_secs, ..
            } => {
                headers.push(("retry-after", retry_after_secs.to_string()));
                headers.push(("x-should-retry", "false".to_string()));
            }
            Refusal::ConversationSpent { .. } => {
                headers.push(("x-should-retry", "false".to_string()));
            }
            Refusal::MethodNotAllowed { allow } => headers.push(("allow", (*allow).to_string())),
            Refusal::BudgetUnavailable { .. } => headers.push(("retry-after", "1".to_string())),
            _ => {}
        }
        LocalReply {
            status,
            headers,
            body,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(reply: &LocalReply) -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    }

    #[test]
    fn openai_shape() {
        let r = Refusal::Unauthenticated {
            message: "no".into(),
        }
        .reply(Family::OpenAi);
        assert_eq!(r.status, 401);
        assert_eq!(
            json(&r),
            serde_json::json!({"error":{"message":"no","type":"invalid_request_error","param":null,"code":"invalid_api_key"}})
        );
    }

    #[test]
    fn anthropic_shape() {
        let r = Refusal::TooLarge { limit: 10 }.reply(Family::Anthropic);
        assert_eq!(r.status, 413);
        let v = json(&r);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
    }

    #[test]
    fn rate_limits_carry_retry_after_and_quota_says_do_not_retry() {
        let r = Refusal::RateLimited {
            message: "slow down".into(),
            retry_after_secs: 7,
            kind: "tokens",
        }
        .reply(Family::OpenAi);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "7".to_string())));
        assert_eq!(json(&r)["error"]["type"], "tokens");
        assert_eq!(json(&r)["error"]["code"], "rate_limit_exceeded");
        let q = Refusal::QuotaExceeded {
            message: "spent".into(),
            retry_after_secs: 3600,
        };
        let r = q.reply(Family::OpenAi);
        assert_eq!(json(&r)["error"]["code"], "insufficient_quota");
        assert!(r.headers.contains(&("x-should-retry", "false".to_string())));
        assert_eq!(
            json(&q.reply(Family::Anthropic))["error"]["type"],
            "rate_limit_error"
        );
    }

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let r = Refusal::MethodNotAllowed { allow: "GET" }.reply(Family::OpenAi);
        assert_eq!(r.status, 405);
        assert_eq!(r.reason, "method_not_allowed");
        assert!(r.headers.contains(&("allow", "GET".to_string())));
        assert_eq!(
            json(&r),
            serde_json::json!({"error":{"message":"This endpoint only answers GET.","type":"invalid_request_error","param":null,"code":"method_not_allowed"}})
        );
    }

    #[test]
    fn google_and_aws_shapes() {
        let q = Refusal::QuotaExceeded {
            message: "spent".into(),
            retry_after_secs: 60,
        };
        let r = q.reply(Family::Google);
        assert_eq!(r.status, 429);
        assert_eq!(
            json(&r),
            serde_json::json!({"error":{"code":429,"message":"spent","status":"RESOURCE_EXHAUSTED"}})
        );
        let r = Refusal::Forbidden {
            message: "no".into(),
        }
        .reply(Family::Google);
        assert_eq!(json(&r)["error"]["status"], "PERMISSION_DENIED");
        let r = q.reply(Family::Aws);
        assert_eq!(json(&r), serde_json::json!({"message":"spent"}));
        assert!(
            r.headers
                .contains(&("x-amzn-errortype", "ServiceQuotaExceededException".into()))
        );
        let r = Refusal::RateLimited {
            message: "slow".into(),
            retry_after_secs: 2,
            kind: "tokens",
        }
        .reply(Family::Aws);
        assert!(
            r.headers
                .contains(&("x-amzn-errortype", "ThrottlingException".into()))
        );
        let r = Refusal::Unauthenticated {
            message: "who".into(),
        }
        .reply(Family::Aws);
        assert!(
            r.headers
                .contains(&("x-amzn-errortype", "UnrecognizedClientException".into()))
        );
    }

    #[test]
    fn bad_request_names_param() {
        let r = Refusal::BadRequest {
            param: Some("model".into()),
            message: "m \"q\"".into(),
        }
        .reply(Family::OpenAi);
        assert_eq!(json(&r)["error"]["param"], "model");
        assert_eq!(json(&r)["error"]["message"], "m \"q\"");
    }
}
