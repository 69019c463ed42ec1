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

/// Applies `edits` the cheapest way: a routing-only edit splices the `model` value in place; any
/// other edit (or a body the splice does not handle) re-serialises the body.
pub fn apply(kind: ApiKind, body: &[u8], edits: &Edits) -> Option<Vec<u8>> {
    if let (Some(model), None, false) = (&edits.model, edits.max_tokens, edits.include_usage)
        && let Some(out) = replace_model(body, model)
    {
        return Some(out);
    }
    rewrite(kind, body, edits)
}

/// Replaces only the top-level `model` value, byte for byte everything else: the common routing
/// edit, without re-serialising the body. `None` when the body is not a plain case (no string
/// `model`, a duplicate or escaped key, not an object): use [`rewrite`] then.
pub fn replace_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let (start, end) = model_value_span(body)?;
    let quoted = serde_json::to_vec(model).ok()?;
    let mut out = Vec::with_capacity(body.len().saturating_add(quoted.len()));
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(&quoted);
    out.extend_from_slice(body.get(end..)?);
    Some(out)
}

fn skip_ws(body: &[u8], mut i: usize) -> usize {
    while body
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Index just past the string starting at `i` (which holds `"`).
fn string_end(body: &[u8], i: usize) -> Option<usize> {
    let mut j = i.checked_add(1)?;
    loop {
        match body.get(j)? {
            b'\\' => j = j.checked_add(2)?,
            b'"' => return j.checked_add(1),
            _ => j += 1,
        }
    }
}

/// Index just past the JSON value starting at `i` (the body was validated before).
fn value_end(body: &[u8], i: usize) -> Option<usize> {
    match body.get(i)? {
        b'"' => string_end(body, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match body.get(j)? {
                    b'"' => {
                        j = string_end(body, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return j.checked_add(1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while body
                .get(j)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The byte span of the top-level `model` string value (quotes included).
fn model_value_span(body: &[u8]) -> Option<(usize, usize)> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found = None;
    loop {
        i = skip_ws(body, i);
        match body.get(i)? {
            b'}' => return found,
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(body, i)?;
        let key = body.get(i + 1..key_end.checked_sub(1)?)?;
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let end = value_end(body, i)?;
        if key == b"model" {
            if found.is_some() || body.get(i) != Some(&b'"') {
                return None;
            }
            found = Some((i, end));
        } else if key.contains(&b'\\') {
            // An escaped key could spell "model": leave such bodies to the full rewrite.
            return None;
        }
        i = skip_ws(body, end);
        match body.get(i)? {
            b',' => i += 1,
            b'}' => return found,
            _ => return None,
        }
    }
}

/// Applies `edits` to a body of `kind` (its dialect's edit, see `Dialect::rewrite`); `None` if
/// the body is not a JSON object (it was parsed before, so this does not happen in practice).
pub fn rewrite(kind: ApiKind, body: &[u8], edits: &Edits) -> Option<Vec<u8>> {
    kind.dialect().rewrite(body, edits)
}

/// Applies `edits` to a JSON object body: the output cap through `set_max` (the dialect's
/// field), `stream_options.include_usage`, the model. Keys come out sorted; values are
/// unchanged. `None` if the body is not a JSON object.
pub(crate) fn edit_object(
    body: &[u8],
    edits: &Edits,
    set_max: impl FnOnce(&mut Map<String, Value>, Value),
) -> Option<Vec<u8>> {
    let mut doc: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if let Some(max) = edits.max_tokens {
        set_max(&mut doc, Value::from(max));
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
        // Both given: both lowered, whichever one the upstream reads.
        let v = edit(
            ApiKind::ChatCompletions,
            r#"{"model":"m","max_tokens":5000,"max_completion_tokens":null}"#,
            e(),
        );
        assert_eq!(
            (&v["max_tokens"], &v["max_completion_tokens"]),
            (&7.into(), &7.into())
        );
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
    fn replace_model_keeps_every_other_byte() {
        let body = br#" { "messages": [{"role":"user","content":"the \"model\": x {[ "}], "model" : "fast" ,"n":1} "#;
        let out = replace_model(body, "gpt-4o-\"mini\"").unwrap();
        let want = String::from_utf8_lossy(body).replace(r#""fast""#, r#""gpt-4o-\"mini\"""#);
        assert_eq!(String::from_utf8(out).unwrap(), want);
        // Not the plain case: left to the full rewrite.
        assert!(replace_model(br#"{"model":"a","model":"b"}"#, "x").is_none());
        assert!(replace_model(br#"{"mod\u0065l":"a","model":"b"}"#, "x").is_none());
        assert!(replace_model(br#"{"model":7}"#, "x").is_none());
        assert!(replace_model(br#"{"messages":[]}"#, "x").is_none());
        assert!(replace_model(br#"[{"model":"a"}]"#, "x").is_none());
    }

    proptest::proptest! {
        /// On any JSON object with a string model, the splice equals the full rewrite.
        #[test]
        fn replace_model_agrees_with_the_full_rewrite(
            fields in proptest::collection::btree_map("[a-z\" \\\\]{0,6}", proptest::prelude::any::<i32>(), 0..5),
            model in "[ -~é]{0,12}",
            new in "[ -~é]{0,12}",
        ) {
            let mut doc: Map<String, Value> = fields.into_iter().map(|(k, v)| (k, Value::from(v))).collect();
            doc.insert("model".into(), Value::String(model));
            doc.insert("nested".into(), serde_json::json!({"model": "inner", "a": ["}", "\"{"]}));
            let body = serde_json::to_vec(&doc).unwrap();
            let escaped_key = doc.keys().any(|k| k.contains(['"', '\\']));
            let Some(spliced) = replace_model(&body, &new) else {
                // Only a key written with escapes is left to the full rewrite.
                proptest::prop_assert!(escaped_key);
                return Ok(());
            };
            let spliced: Value = serde_json::from_slice(&spliced).unwrap();
            let edits = Edits { model: Some(new), ..Edits::default() };
            let full: Value = serde_json::from_slice(&rewrite(ApiKind::ChatCompletions, &body, &edits).unwrap()).unwrap();
            proptest::prop_assert_eq!(spliced, full);
        }

        #[test]
        fn replace_model_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = replace_model(&body, "m");
        }
    }

    #[test]
    fn not_an_object_is_none() {
        assert!(rewrite(ApiKind::ChatCompletions, b"[1]", &Edits::default()).is_none());
    }
}
