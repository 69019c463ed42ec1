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
    /// 401: no tenant could be identified.
    Unauthenticated { message: String },
    /// 413: the request body exceeds the configured cap.
    TooLarge { limit: u64 },
    /// 500: an internal failure of the gateway (never a trap).
    Internal { message: String },
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
    /// Builds the reply in the shape of `family`.
    pub fn reply(&self, family: Family) -> LocalReply {
        let too_large;
        let (status, reason, message, param, openai, anthropic) = match self {
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
        };
        let body = match family {
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
        LocalReply {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body,
            reason,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
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
