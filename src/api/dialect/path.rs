//! Which API a request path is, and what the path itself says: the model (Gemini, Vertex and
//! Bedrock name it in the path, not the body), whether the operation streams, and a Gemini key
//! passed as `?key=`. Read at request-headers time, before the body.
//!
//! | path (any prefix; trailing `/` allowed; query ignored) | [`ApiKind`] | model | stream |
//! |---|---|---|---|
//! | `…/chat/completions`, `…/responses`, `…/embeddings`, `…/messages` | OpenAI, Anthropic | body | body |
//! | `…/models/{m}:generateContent`, `:streamGenerateContent` | `GenerateContent` | path | path |
//! | `…/models/{m}:embedContent`, `:batchEmbedContents` | `EmbedContent` | path | no |
//! | `…/models/{m}:countTokens` | `CountTokens` | path | no |
//! | `…/publishers/anthropic/models/{m}:rawPredict`, `:streamRawPredict` | `RawPredict` | path | path |
//! | `…/publishers/anthropic/models/count-tokens:rawPredict` (Claude's token count) | `CountTokens` | body | no |
//! | `…/model/{id}/converse`, `/converse-stream` | `Converse` | path | path |
//! | `…/model/{id}/invoke`, `/invoke-with-response-stream` | `Invoke` | path | path |
//!
//! A model in the path is percent-decoded (botocore sends an ARN as `arn%3Aaws%3A…%2F…`; an
//! application inference profile may also come with a raw `/`, so a Bedrock id runs from the
//! first `/model/` to the operation). The shipped route tables match exactly these shapes
//! (`envoy/tollgate.yaml`, `llm_path`), so a path Envoy would forward is always one Tollgate reads.

use crate::api::ApiKind;

/// What the request path says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub kind: ApiKind,
    /// The operation streams (`:streamGenerateContent`, `/converse-stream`, …). For the APIs
    /// whose body says it (`"stream": true`), `false` here.
    pub stream: bool,
    /// The model named in the path, for the APIs that name it there.
    pub model: Option<PathModel>,
}

/// The model segment of a path: where it is in the raw `:path` and its decoded name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathModel {
    /// Byte span of the (still encoded) segment in `:path`.
    pub start: usize,
    pub end: usize,
    /// The percent-decoded name; `None` when it decodes to nothing or not to UTF-8 (refused).
    pub name: Option<String>,
}

const SUFFIXES: [(&[u8], ApiKind); 4] = [
    (b"/chat/completions", ApiKind::ChatCompletions),
    (b"/responses", ApiKind::Responses),
    (b"/embeddings", ApiKind::Embeddings),
    (b"/messages", ApiKind::Messages),
];

/// Gemini and Vertex methods: `…/models/{m}:{method}`. `rawPredict` only under
/// `publishers/anthropic`.
const GOOGLE_METHODS: [(&[u8], ApiKind, bool); 7] = [
    (b"generateContent", ApiKind::GenerateContent, false),
    (b"streamGenerateContent", ApiKind::GenerateContent, true),
    (b"embedContent", ApiKind::EmbedContent, false),
    (b"batchEmbedContents", ApiKind::EmbedContent, false),
    (b"countTokens", ApiKind::CountTokens, false),
    (b"rawPredict", ApiKind::RawPredict, false),
    (b"streamRawPredict", ApiKind::RawPredict, true),
];

/// Bedrock runtime operations: `…/model/{id}/{operation}`.
const BEDROCK_OPERATIONS: [(&[u8], ApiKind, bool); 4] = [
    (b"converse", ApiKind::Converse, false),
    (b"converse-stream", ApiKind::Converse, true),
    (b"invoke", ApiKind::Invoke, false),
    (b"invoke-with-response-stream", ApiKind::Invoke, true),
];

/// The path without its query string (or fragment) and trailing slashes.
fn route_part(path: &[u8]) -> &[u8] {
    let end = path
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(path.len());
    let mut path = path.get(..end).unwrap_or_default();
    while let [rest @ .., b'/'] = path {
        path = rest;
    }
    path
}

/// Classifies a request path. `None` means "not ours".
pub fn classify(raw: &[u8]) -> Option<Call> {
    let path = route_part(raw);
    if let Some((_, kind)) = SUFFIXES.iter().find(|(suffix, _)| path.ends_with(suffix)) {
        return Some(Call {
            kind: *kind,
            stream: false,
            model: None,
        });
    }
    google(path).or_else(|| bedrock(path))
}

fn google(path: &[u8]) -> Option<Call> {
    let slash = path.iter().rposition(|b| *b == b'/')?;
    let (before, last) = path.split_at(slash);
    let last = last.get(1..)?;
    let colon = last.iter().rposition(|b| *b == b':')?;
    let (model, method) = last.split_at(colon);
    let method = method.get(1..)?;
    let &(_, kind, stream) = GOOGLE_METHODS.iter().find(|(m, _, _)| *m == method)?;
    if model.is_empty() || !before.ends_with(b"/models") {
        return None;
    }
    if kind == ApiKind::RawPredict && !before.ends_with(b"/publishers/anthropic/models") {
        return None;
    }
    // Claude's token count on Vertex: `…/models/count-tokens:rawPredict`, the model in the body.
    if kind == ApiKind::RawPredict && model == b"count-tokens" {
        return Some(Call {
            kind: ApiKind::CountTokens,
            stream: false,
            model: None,
        });
    }
    let start = slash.checked_add(1)?;
    Some(Call {
        kind,
        stream,
        model: Some(PathModel {
            start,
            end: start.checked_add(model.len())?,
            name: decode(model),
        }),
    })
}

fn bedrock(path: &[u8]) -> Option<Call> {
    const MARK: &[u8] = b"/model/";
    let at = path.windows(MARK.len()).position(|w| w == MARK)?;
    let start = at.checked_add(MARK.len())?;
    let rest = path.get(start..)?;
    let slash = rest.iter().rposition(|b| *b == b'/')?;
    let (id, operation) = rest.split_at(slash);
    let operation = operation.get(1..)?;
    let &(_, kind, stream) = BEDROCK_OPERATIONS
        .iter()
        .find(|(o, _, _)| *o == operation)?;
    if id.is_empty() {
        return None;
    }
    Some(Call {
        kind,
        stream,
        model: Some(PathModel {
            start,
            end: start.checked_add(id.len())?,
            name: decode(id),
        }),
    })
}

/// Percent-decodes a path segment (`%3A` → `:`); `None` when it is empty after decoding, has a
/// malformed escape, or is not UTF-8.
fn decode(segment: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(segment.len());
    let mut i = 0usize;
    while let Some(&b) = segment.get(i) {
        if b == b'%' {
            let hex = segment.get(i.checked_add(1)?..i.checked_add(3)?)?;
            out.push(hex_byte(hex)?);
            i = i.checked_add(3)?;
        } else {
            out.push(b);
            i = i.checked_add(1)?;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (!name.is_empty()).then_some(name)
}

/// Two hexadecimal digits (exactly: `u8::from_str_radix` would also take a sign, `%+F`).
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| char::from(c).to_digit(16);
    match pair {
        [hi, lo] => u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok(),
        _ => None,
    }
}

/// Percent-encodes a model name for a path segment: unreserved characters and `@` stay, every
/// other byte (`:`, `/` included, as botocore sends them) is `%XX`.
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            let hex = |n: u8| char::from(HEX.get(usize::from(n)).copied().unwrap_or(b'0'));
            out.push('%');
            out.push(hex(b >> 4));
            out.push(hex(b & 0x0f));
        }
    }
    out
}

const HEX: [u8; 16] = *b"0123456789ABCDEF";

/// `raw` with the model segment replaced by `name` (encoded).
pub fn with_model(raw: &[u8], model: &PathModel, name: &str) -> Option<Vec<u8>> {
    let head = raw.get(..model.start)?;
    let tail = raw.get(model.end..)?;
    let encoded = encode(name);
    let mut out = Vec::with_capacity(raw.len().saturating_add(encoded.len()));
    out.extend_from_slice(head);
    out.extend_from_slice(encoded.as_bytes());
    out.extend_from_slice(tail);
    Some(out)
}

/// The query's `key` parameters (Gemini's API key), percent-decoded, and the path without them.
/// `None` when the query has no `key` parameter.
pub fn take_query_key(raw: &[u8]) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    let q = raw.iter().position(|b| *b == b'?')?;
    let (path, query) = raw.split_at(q);
    let query = query.get(1..)?;
    let (query, fragment) = match query.iter().position(|b| *b == b'#') {
        Some(h) => query.split_at(h),
        None => (query, &b""[..]),
    };
    let mut keys = Vec::new();
    let mut kept: Vec<&[u8]> = Vec::new();
    for param in query.split(|b| *b == b'&') {
        // The name is compared decoded, as servers read it: `%6Bey=` is a key too.
        let (name, value) = match param.iter().position(|b| *b == b'=') {
            Some(eq) => param.split_at(eq),
            None => (param, &b""[..]),
        };
        if decode_query(name) == b"key" {
            keys.push(decode_query(value.get(1..).unwrap_or_default()));
        } else {
            kept.push(param);
        }
    }
    if keys.is_empty() {
        return None;
    }
    let mut out = path.to_vec();
    let kept: Vec<&[u8]> = kept.into_iter().filter(|p| !p.is_empty()).collect();
    if !kept.is_empty() {
        out.push(b'?');
        out.extend_from_slice(&kept.join(&b'&'));
    }
    out.extend_from_slice(fragment);
    Some((out, keys))
}

/// Percent- and `+`-decodes a query value; malformed escapes stay as they are.
fn decode_query(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0usize;
    while let Some(&b) = value.get(i) {
        let escaped = (b == b'%')
            .then(|| value.get(i.saturating_add(1)..i.saturating_add(3)))
            .flatten()
            .and_then(hex_byte);
        match (b, escaped) {
            (_, Some(v)) => {
                out.push(v);
                i = i.saturating_add(3);
            }
            (b'+', None) => {
                out.push(b' ');
                i = i.saturating_add(1);
            }
            (b, None) => {
                out.push(b);
                i = i.saturating_add(1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(path: &str) -> Option<String> {
        classify(path.as_bytes())?.model?.name
    }

    #[test]
    fn classifies_every_shape() {
        let cases: [(&str, Option<(ApiKind, bool)>); 31] = [
            (
                "/v1/chat/completions",
                Some((ApiKind::ChatCompletions, false)),
            ),
            (
                "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
                Some((ApiKind::ChatCompletions, false)),
            ),
            ("/gw/team-a/v1/responses", Some((ApiKind::Responses, false))),
            ("/v1/embeddings/", Some((ApiKind::Embeddings, false))),
            ("/v1/messages", Some((ApiKind::Messages, false))),
            ("/v1/messages/count_tokens", None),
            ("/v1/models", None),
            ("/v1/chat/completionsX", None),
            ("", None),
            ("/", None),
            (
                "/v1beta/models/gemini-2.5-flash:generateContent",
                Some((ApiKind::GenerateContent, false)),
            ),
            (
                "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                Some((ApiKind::GenerateContent, true)),
            ),
            (
                "/v1beta1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
                Some((ApiKind::GenerateContent, true)),
            ),
            (
                "/v1beta1/publishers/google/models/gemini-2.5-pro:generateContent/",
                Some((ApiKind::GenerateContent, false)),
            ),
            (
                "/v1/models/m:embedContent",
                Some((ApiKind::EmbedContent, false)),
            ),
            (
                "/v1/models/m:batchEmbedContents",
                Some((ApiKind::EmbedContent, false)),
            ),
            (
                "/v1/models/m:countTokens?key=k",
                Some((ApiKind::CountTokens, false)),
            ),
            (
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict",
                Some((ApiKind::RawPredict, false)),
            ),
            (
                "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict",
                Some((ApiKind::RawPredict, true)),
            ),
            (
                "/v1/projects/p/locations/l/publishers/google/models/g:rawPredict",
                None,
            ),
            (
                "/v1/projects/p/locations/l/publishers/anthropic/models/count-tokens:rawPredict",
                Some((ApiKind::CountTokens, false)),
            ),
            ("/v1/models/:generateContent", None),
            ("/v1/models/m:generate", None),
            ("/v1/tunedModels/m:generateContent", None),
            (
                "/model/anthropic.claude-3-haiku-20240307-v1:0/converse",
                Some((ApiKind::Converse, false)),
            ),
            ("/model/m/converse-stream", Some((ApiKind::Converse, true))),
            ("/model/m/invoke", Some((ApiKind::Invoke, false))),
            (
                "/model/m/invoke-with-response-stream/",
                Some((ApiKind::Invoke, true)),
            ),
            ("/model//converse", None),
            ("/model/m/converse-streaming", None),
            ("/models/m/converse", None),
        ];
        for (path, want) in cases {
            let got = classify(path.as_bytes()).map(|c| (c.kind, c.stream));
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn models_in_paths_are_decoded() {
        assert_eq!(
            model("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-5-sonnet/converse").as_deref(),
            Some("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet")
        );
        assert_eq!(
            model("/model/arn:aws:bedrock:us-east-1:1:application-inference-profile/abc123/invoke")
                .as_deref(),
            Some("arn:aws:bedrock:us-east-1:1:application-inference-profile/abc123")
        );
        assert_eq!(
            model("/gw/model/us.amazon.nova-pro-v1:0/converse?x=1").as_deref(),
            Some("us.amazon.nova-pro-v1:0")
        );
        assert_eq!(
            model("/v1beta/models/gemini%2D2.5:generateContent").as_deref(),
            Some("gemini-2.5")
        );
        assert_eq!(model("/v1/chat/completions"), None);
        // Undecodable: classified (the route table sends it here), refused later.
        for bad in [
            "/model/a%zz/converse",
            "/model/%ff/converse",
            "/model/a%2/converse",
            // `%+F` was read as 0x0F (found by the `dialect` fuzz target).
            "/model/a%+Fb/converse",
            "/model/a%-1b/converse",
        ] {
            let call = classify(bad.as_bytes()).unwrap();
            assert_eq!(call.model.unwrap().name, None, "{bad}");
        }
    }

    #[test]
    fn the_model_segment_is_rewritten_encoded() {
        let raw = b"/v1/model/old%3Aid/converse-stream?x=1";
        let call = classify(raw).unwrap();
        let m = call.model.unwrap();
        let out = with_model(
            raw,
            &m,
            "arn:aws:bedrock:us-east-1:1:inference-profile/us.x",
        )
        .unwrap();
        assert_eq!(
            out,
            b"/v1/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x/converse-stream?x=1"
        );
        let again = classify(&out).unwrap().model.unwrap().name;
        assert_eq!(
            again.as_deref(),
            Some("arn:aws:bedrock:us-east-1:1:inference-profile/us.x")
        );
        let raw = b"/v1/projects/p/locations/l/publishers/anthropic/models/a@1:rawPredict";
        let m = classify(raw).unwrap().model.unwrap();
        assert_eq!(
            with_model(raw, &m, "claude-b@2").unwrap(),
            b"/v1/projects/p/locations/l/publishers/anthropic/models/claude-b@2:rawPredict"
        );
    }

    #[test]
    fn query_keys_are_taken_out() {
        let (path, keys) =
            take_query_key(b"/v1/models/m:generateContent?key=abc%2Bd&alt=sse").unwrap();
        assert_eq!(path, b"/v1/models/m:generateContent?alt=sse");
        assert_eq!(keys, vec![b"abc+d".to_vec()]);
        let (path, keys) = take_query_key(b"/v1/models/m:countTokens?alt=sse&key=a&key=b").unwrap();
        assert_eq!(path, b"/v1/models/m:countTokens?alt=sse");
        assert_eq!(keys.len(), 2);
        let (path, _) = take_query_key(b"/p?key=a").unwrap();
        assert_eq!(path, b"/p");
        assert_eq!(take_query_key(b"/p?keys=a&monkey=b"), None);
        let (path, keys) = take_query_key(b"/p?%6Bey=a&k%65y&x=1").unwrap();
        assert_eq!((path.as_slice(), keys.len()), (&b"/p?x=1"[..], 2));
        assert_eq!(take_query_key(b"/p"), None);
    }
}
