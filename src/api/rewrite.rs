//! Request body edits Tollgate makes before the request goes upstream: lower or set the API's
//! max-tokens field (clamp and strict modes) and ask an OpenAI chat stream for its usage.

use serde_json::{Map, Value};

use super::ApiKind;

/// What to change in a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    pub max_tokens: Option<u64>,
    pub include_usage: bool,
    /// The model name the upstream expects (routing).
    pub model: Option<String>,
}

impl Edits {
    pub fn is_empty(&self) -> bool {
        self.max_tokens.is_none() && !self.include_usage && self.model.is_none()
    }
}

/// Applies `edits` to a JSON object body; `None` if the body is not a JSON object (it was parsed
/// before, so this does not happen in practice). Keys come out sorted; values are unchanged.
pub fn rewrite(kind: ApiKind, body: &[u8], edits: &Edits) -> Option<Vec<u8>> {
    let mut doc: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if let Some(max) = edits.max_tokens {
        let field = match kind {
            // Keep the client's choice of field; new requests get the current one.
            ApiKind::ChatCompletions
                if doc.contains_key("max_tokens") && !doc.contains_key("max_completion_tokens") =>
            {
                "max_tokens"
            }
            ApiKind::ChatCompletions => "max_completion_tokens",
            ApiKind::Responses => "max_output_tokens",
            ApiKind::Messages => "max_tokens",
            ApiKind::Embeddings => return serde_json::to_vec(&doc).ok(),
        };
        doc.insert(field.to_string(), Value::from(max));
    }
    if edits.include_usage {
        let options = doc
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if !options.is_object() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(options) = options {
            options.insert("include_usage".to_string(), Value::Bool(true));
        }
    }
    if let Some(model) = &edits.model {
        doc.insert("model".to_string(), Value::String(model.clone()));
    }
    serde_json::to_vec(&doc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(kind: ApiKind, body: &str, edits: Edits) -> Value {
        serde_json::from_slice(&rewrite(kind, body.as_bytes(), &edits).unwrap()).unwrap()
    }

    #[test]
    fn sets_each_apis_max_tokens_field() {
        let e = || Edits {
            max_tokens: Some(7),
            ..Edits::default()
        };
        assert_eq!(
            edit(ApiKind::ChatCompletions, r#"{"model":"m"}"#, e())["max_completion_tokens"],
            7
        );
        let v = edit(
            ApiKind::ChatCompletions,
            r#"{"model":"m","max_tokens":99}"#,
            e(),
        );
        assert_eq!(v["max_tokens"], 7);
        assert!(v.get("max_completion_tokens").is_none());
        assert_eq!(
            edit(ApiKind::Responses, r#"{"model":"m"}"#, e())["max_output_tokens"],
            7
        );
        assert_eq!(
            edit(ApiKind::Messages, r#"{"model":"m","max_tokens":99}"#, e())["max_tokens"],
            7
        );
    }

    #[test]
    fn injects_include_usage_keeping_other_options() {
        let e = Edits {
            include_usage: true,
            ..Edits::default()
        };
        let v = edit(
            ApiKind::ChatCompletions,
            r#"{"model":"m","stream":true,"stream_options":{"x":1}}"#,
            e.clone(),
        );
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x":1,"include_usage":true})
        );
        let v = edit(
            ApiKind::ChatCompletions,
            r#"{"model":"m","stream":true,"stream_options":null}"#,
            e,
        );
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage":true})
        );
    }

    #[test]
    fn keeps_everything_else() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"héllo \"q\""}],"temperature":0.7,"n":1}"#;
        let v = edit(
            ApiKind::ChatCompletions,
            body,
            Edits {
                model: Some("up".into()),
                ..Edits::default()
            },
        );
        let mut want: Value = serde_json::from_str(body).unwrap();
        want["model"] = "up".into();
        assert_eq!(v, want);
    }

    #[test]
    fn not_an_object_is_none() {
        assert!(rewrite(ApiKind::ChatCompletions, b"[1]", &Edits::default()).is_none());
    }
}
