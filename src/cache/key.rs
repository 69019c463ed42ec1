//! The cache key of a request and its eligibility: what the key hashes (the request as the
//! upstream receives it), the canonical body, the key headers and `cache-control` directives.
//!
//! # Key
//! SHA-256 over a domain tag and, each prefixed with its length (u64 LE) so fields cannot run
//! into each other: scope (tenant name or `"global"`), route, upstream model, [`ApiKind::as_str`],
//! the stream flag (one byte; `stream: true` and not embeddings), the canonical body, the
//! `:path`, the key headers, and the max-tokens value Tollgate sends upstream.
//!
//! The key is of the request **as the upstream receives it**, since that is what the answer
//! depends on:
//! - `:path` whole, query included, byte for byte (as Envoy's HCM left it: its path
//!   normalisation runs before filters). On Azure OpenAI the deployment in the path picks the
//!   model and `api-version` the API; a self-hosted server may read any query parameter. No
//!   canonical form (sorted query, trailing slash): SDKs send one stable path per endpoint, and
//!   a canonical form can only turn a miss into a wrong hit.
//! - The key headers: [`KEY_HEADERS`] plus `cache.key_headers`, names lowercase and sorted (the
//!   configuration's list, so the client's header order and name case do not matter). Each name
//!   is hashed, then a presence byte, then the value (absent and empty differ); repeated lines
//!   of one header are joined with `,` in request order. Values are exact bytes.
//! - The max-tokens edit: `None`, or the value Tollgate writes into the API's max-tokens field
//!   (strict mode's default when the client sent none, a per-request cap, a clamp to the budget
//!   left). The upstream body is a function of the client body, this value and the upstream
//!   model, so the key determines what the upstream received. A lookup uses the value planned
//!   from the tenant's rules before admission; when admission clamps further, the response is
//!   stored under the clamped value's key, which only a request planned to the same value can
//!   hit: a truncated answer is never served to the request that was not clamped.
//!
//! The canonical body is the body parsed into a `serde_json::Value`, minus the top-level fields
//! in [`IGNORED_FIELDS`], re-serialised: objects come out with sorted keys (serde_json's `Map`
//! is a `BTreeMap` here: no `preserve_order`), no whitespace, string escapes normalised, the last
//! of duplicate keys kept (as the providers read it). Numbers: integers within i64/u64 are exact;
//! every other number is an f64 printed shortest-round-trip, so `1.0`, `1.00` and `1e0` are the
//! same, while `1` and `1.0` are two keys (a miss, never a wrong hit). Integers beyond 64 bits
//! and decimals beyond f64 precision collapse to the nearest f64, which is how the providers
//! read them too.
//!
//! Ignored (cannot change the output): `user`, `metadata`, `prompt_cache_key`,
//! `safety_identifier`. Kept on purpose: `store` (decides whether the returned response id is
//! retrievable later), `service_tier` (echoed in the response body), `stream`, `stream_options`,
//! sampling parameters and everything else. Refused (`None`): a non-null `conversation`
//! (Responses: the conversation grows with every call), `background: true` (the answer is a
//! queued job), a non-null `container` (Anthropic code-execution container state) and a `prompt`
//! object without a `version` (a prompt template's latest version can change). Tools that read
//! live data (web search, MCP) are only bounded by the TTL.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::api::ApiKind;

/// Top-level request fields that cannot change the response, left out of the key.
pub const IGNORED_FIELDS: [&str; 4] = ["user", "metadata", "prompt_cache_key", "safety_identifier"];

/// Request headers that select the upstream's answer, always in the key (`cache.key_headers`
/// adds more): the OpenAI beta features (`openai-beta: assistants=v2`, …), the organization and
/// project (their model access, data controls and fine-tunes), and Anthropic's API version and
/// beta features. Sorted.
pub const KEY_HEADERS: [&str; 5] = [
    "anthropic-beta",
    "anthropic-version",
    "openai-beta",
    "openai-organization",
    "openai-project",
];

const DOMAIN: &[u8] = b"tollgate.cache.v2";

/// The cache key of a request: SHA-256 (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The tag of the scope the key belongs to (its last four bytes).
    pub fn owner(&self) -> u32 {
        owner_of(&self.0)
    }

    /// Lowercase hex, for logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a request's key is computed from besides its body.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    /// The tenant, or `"global"`.
    pub scope: &'a str,
    pub route: &'a str,
    pub upstream_model: &'a str,
    pub kind: ApiKind,
    /// The request's `:path` as the filter sees it (after Envoy's normalisation), query included.
    pub path: &'a [u8],
    /// The key headers and their values, from [`key_header_values`].
    pub headers: &'a [(&'a str, Option<Vec<u8>>)],
}

/// A request's key but for its last field, what Tollgate sets the API's max-tokens field to:
/// that is only known after admission (clamp mode lowers it to the budget left), so the key is
/// finished twice when it changes (lookup, then store) without hashing the body again.
#[derive(Clone)]
pub struct PendingKey {
    hash: Sha256,
    /// The scope's tag, written over the key's last four bytes.
    owner: [u8; 4],
}

impl PendingKey {
    /// The key of the request as the upstream receives it, with the API's max-tokens field set
    /// to `max_tokens` by Tollgate (`None`: the body's own value, or none).
    pub fn finish(&self, max_tokens: Option<u64>) -> CacheKey {
        let mut hash = self.hash.clone();
        let value = max_tokens.map(u64::to_le_bytes);
        put(&mut hash, value.as_ref().map_or(&[][..], |v| &v[..]));
        let mut key: [u8; 32] = hash.finalize().into();
        if let Some(tail) = key.last_chunk_mut::<4>() {
            *tail = self.owner;
        }
        CacheKey(key)
    }
}

/// The scope tag of a key's bytes.
pub(super) fn owner_of(key: &[u8; 32]) -> u32 {
    key.last_chunk::<4>().map_or(0, |b| u32::from_le_bytes(*b))
}

/// The tag of a scope (tenant name or `"global"`).
pub(super) fn scope_tag(scope: &str) -> [u8; 4] {
    let digest: [u8; 32] = Sha256::digest(scope.as_bytes()).into();
    digest.first_chunk::<4>().copied().unwrap_or_default()
}

fn put(hash: &mut Sha256, field: &[u8]) {
    hash.update(u64::try_from(field.len()).unwrap_or(u64::MAX).to_le_bytes());
    hash.update(field);
}

/// The key of a request but for Tollgate's max-tokens edit ([`PendingKey::finish`]), or `None`
/// when it must not be cached (not a JSON object, or it refers to mutable server-side state).
/// See the module documentation for the fields and the canonical form.
pub fn cache_key(inputs: &KeyInputs<'_>, body: &[u8]) -> Option<PendingKey> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if refers_to_server_state(&map) {
        return None;
    }
    for field in IGNORED_FIELDS {
        map.remove(field);
    }
    let stream = !inputs.kind.generates_nothing() && map.get("stream") == Some(&Value::Bool(true));
    let canonical = serde_json::to_vec(&Value::Object(map)).ok()?;
    let mut hash = Sha256::new();
    hash.update(DOMAIN);
    let fields: [&[u8]; 7] = [
        inputs.scope.as_bytes(),
        inputs.route.as_bytes(),
        inputs.upstream_model.as_bytes(),
        inputs.kind.as_str().as_bytes(),
        &[u8::from(stream)],
        &canonical,
        inputs.path,
    ];
    for field in fields {
        put(&mut hash, field);
    }
    // Header names are part of the key (the list is the configuration's), then a presence byte
    // and the value: absent and empty are two keys.
    put(
        &mut hash,
        &u64::try_from(inputs.headers.len())
            .unwrap_or(u64::MAX)
            .to_le_bytes(),
    );
    for (name, value) in inputs.headers {
        put(&mut hash, name.as_bytes());
        match value {
            None => put(&mut hash, &[0]),
            Some(value) => {
                put(&mut hash, &[1]);
                put(&mut hash, value);
            }
        }
    }
    Some(PendingKey {
        hash,
        owner: scope_tag(inputs.scope),
    })
}

/// A request header's value: every line with that name (ASCII case-insensitive), in request
/// order, joined with `,` (as HTTP allows combining them); `None` when absent.
pub fn header_value(request: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for (_, value) in request.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        match &mut out {
            None => out = Some(value.clone()),
            Some(joined) => {
                joined.push(b',');
                joined.extend_from_slice(value);
            }
        }
    }
    out
}

/// The values of the key headers `names` (the configuration's list: lowercase, sorted, unique)
/// among the request's headers (any order, any case): the key sees the same list whatever order
/// the client sent its headers in.
pub fn key_header_values<'n>(
    names: &'n [String],
    request: &[(String, Vec<u8>)],
) -> Vec<(&'n str, Option<Vec<u8>>)> {
    names
        .iter()
        .map(|name| (name.as_str(), header_value(request, name)))
        .collect()
}

/// Whether a `cache-control` value has `directive` (ASCII case-insensitive, e.g. `no-store`).
pub fn has_directive(cache_control: &[u8], directive: &[u8]) -> bool {
    cache_control
        .split(|b| *b == b',')
        .any(|d| d.trim_ascii().eq_ignore_ascii_case(directive))
}

fn refers_to_server_state(map: &Map<String, Value>) -> bool {
    let set = |field: &str| map.get(field).is_some_and(|v| !v.is_null());
    set("conversation")
        || set("container")
        || map.get("background") == Some(&Value::Bool(true))
        || map
            .get("prompt")
            .and_then(Value::as_object)
            .is_some_and(|p| p.get("version").is_none_or(Value::is_null))
}

/// Whether a request asks for greedy decoding: a top-level `temperature` of 0, `top_p` of 0 or
/// `top_k` of 1 (each keeps only the most likely token), and `n` absent, null or 1. Not a JSON
/// object → false.
pub fn deterministic(body: &[u8]) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let is = |field: &str, want: f64| {
        map.get(field)
            .and_then(Value::as_f64)
            .is_some_and(|v| v == want)
    };
    let single = map.get("n").is_none_or(Value::is_null) || is("n", 1.0);
    single && (is("temperature", 0.0) || is("top_p", 0.0) || is("top_k", 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::testing::*;

    /// The key of one fixed chat body with this path, these request headers (the default key
    /// header list picks from them) and this max-tokens edit.
    fn request_key(path: &str, request: &[(&str, &str)], max_tokens: Option<u64>) -> CacheKey {
        let names: Vec<String> = KEY_HEADERS.iter().map(|n| n.to_string()).collect();
        let request: Vec<(String, Vec<u8>)> = request
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        let headers = key_header_values(&names, &request);
        let inputs = KeyInputs {
            scope: "acme",
            route: "default",
            upstream_model: "gpt-4o",
            kind: CHAT,
            path: path.as_bytes(),
            headers: &headers,
        };
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        cache_key(&inputs, body).unwrap().finish(max_tokens)
    }

    #[test]
    fn key_covers_the_path_whole() {
        let base = request_key("/v1/chat/completions", &[], None);
        let azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
        let others = [
            "/openai/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/chat/completions?x=1",
            azure,
            "/openai/deployments/other-deploy/chat/completions?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview",
            "/openai/deployments/gpt-4o/chat/completions",
        ];
        let mut seen = vec![base];
        for path in others {
            let key = request_key(path, &[], None);
            assert!(!seen.contains(&key), "{path}");
            seen.push(key);
        }
        // The same path is the same key: nothing else varies.
        assert_eq!(request_key(azure, &[], None), request_key(azure, &[], None));
        // No canonical form: query order is a miss, never a merge.
        assert_ne!(
            request_key("/v1/chat/completions?a=1&b=2", &[], None),
            request_key("/v1/chat/completions?b=2&a=1", &[], None)
        );
    }

    #[test]
    fn key_covers_the_key_headers() {
        let path = "/v1/messages";
        let base = request_key(path, &[("content-type", "application/json")], None);
        // Headers outside the list (identity, tracing, SDK telemetry) do not change the key.
        let unrelated = [
            ("x-request-id", "r1"),
            ("user-agent", "OpenAI/Python 1.99"),
            ("x-stainless-retry-count", "1"),
            ("authorization", "Bearer sk-1"),
        ];
        assert_eq!(request_key(path, &unrelated, None), base);
        let mut seen = vec![base];
        for name in KEY_HEADERS {
            for value in ["", "v1", "v2"] {
                let key = request_key(path, &[(name, value)], None);
                assert!(!seen.contains(&key), "{name}: {value:?}");
                seen.push(key);
            }
        }
        // A value moving from one header to another changes the key.
        assert_ne!(
            request_key(path, &[("openai-organization", "x")], None),
            request_key(path, &[("openai-project", "x")], None)
        );
    }

    #[test]
    fn key_headers_ignore_order_and_name_case() {
        let path = "/v1/messages";
        let a = request_key(
            path,
            &[
                ("anthropic-version", "2023-06-01"),
                ("x-other", "1"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
            ],
            None,
        );
        let b = request_key(
            path,
            &[
                ("Anthropic-Beta", "prompt-caching-2024-07-31"),
                ("ANTHROPIC-VERSION", "2023-06-01"),
            ],
            None,
        );
        assert_eq!(a, b);
        // Values are exact: case and content matter.
        assert_ne!(
            a,
            request_key(
                path,
                &[
                    ("anthropic-version", "2023-06-01"),
                    ("anthropic-beta", "Prompt-Caching-2024-07-31"),
                ],
                None,
            )
        );
        // Repeated lines are one comma-joined value, in request order.
        let joined = request_key(path, &[("anthropic-beta", "a,b")], None);
        assert_eq!(
            request_key(
                path,
                &[("anthropic-beta", "a"), ("anthropic-beta", "b")],
                None
            ),
            joined
        );
        assert_ne!(
            request_key(
                path,
                &[("anthropic-beta", "b"), ("anthropic-beta", "a")],
                None
            ),
            joined
        );
    }

    #[test]
    fn absent_and_empty_headers_are_two_keys() {
        let path = "/v1/chat/completions";
        let absent = request_key(path, &[], None);
        for name in KEY_HEADERS {
            assert_ne!(request_key(path, &[(name, "")], None), absent, "{name}");
        }
        assert_eq!(header_value(&[], "openai-beta"), None);
        let empty = [("openai-beta".to_string(), Vec::new())];
        assert_eq!(header_value(&empty, "openai-beta"), Some(Vec::new()));
    }

    #[test]
    fn key_covers_the_max_tokens_edit() {
        let path = "/v1/chat/completions";
        let none = request_key(path, &[], None);
        let keys = [
            none,
            request_key(path, &[], Some(0)),
            request_key(path, &[], Some(83)),
            request_key(path, &[], Some(84)),
            request_key(path, &[], Some(u64::MAX)),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in keys.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            request_key(path, &[], Some(83)),
            request_key(path, &[], Some(83))
        );
    }

    #[test]
    fn the_key_ends_with_its_scopes_tag() {
        let body = r#"{"model":"m","messages":[]}"#.as_bytes();
        let of = |scope| plain_key(scope, "r", "m", CHAT, body).unwrap();
        let (a, a2, b) = (of("team-a"), of("team-a"), of("team-b"));
        assert_eq!(a, a2);
        assert_ne!(a.owner(), b.owner());
        assert_eq!(a.owner().to_le_bytes(), scope_tag("team-a"));
        assert_ne!(a.0[..28], b.0[..28]);
        assert_eq!(of("global").owner().to_le_bytes(), scope_tag("global"));
    }

    #[test]
    fn cache_control_directives() {
        assert!(has_directive(b"no-store", b"no-store"));
        assert!(has_directive(b"max-age=0, No-Cache", b"no-cache"));
        assert!(!has_directive(b"no-cache=x", b"no-cache"));
        assert!(!has_directive(b"", b"no-store"));
    }

    #[test]
    fn key_covers_every_field() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let base = chat_key(body).unwrap();
        let b = body.as_bytes();
        let others = [
            plain_key("other", "default", "gpt-4o", CHAT, b),
            plain_key("global", "default", "gpt-4o", CHAT, b),
            plain_key("acme", "fast", "gpt-4o", CHAT, b),
            plain_key("acme", "default", "gpt-4o-mini", CHAT, b),
            plain_key("acme", "default", "gpt-4o", ApiKind::Responses, b),
            plain_key("acme", "default", "gpt-4o", ApiKind::Messages, b),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"ho"}],"temperature":0}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"seed":1}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"store":true}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"service_tier":"flex"}"#,
            ),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(other.unwrap(), base, "case {i}");
        }
        // Fields are length-prefixed: moving a byte between fields changes the key.
        assert_ne!(
            plain_key("a", "bc", "m", CHAT, b"{}"),
            plain_key("ab", "c", "m", CHAT, b"{}")
        );
        assert_ne!(
            plain_key("a", "", "bc", CHAT, b"{}"),
            plain_key("a", "b", "c", CHAT, b"{}")
        );
    }

    #[test]
    fn key_ignores_order_whitespace_and_identity_fields() {
        let base = chat_key(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        let same = [
            r#"{ "temperature": 0, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"user":"u1"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"h\u0069"}],"temperature":0,"metadata":{"a":"b"},"prompt_cache_key":"p","safety_identifier":"s"}"#,
            r#"{"model":"x","model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        ];
        for body in same {
            assert_eq!(chat_key(body), base, "{body}");
        }
        // Numbers: 0.0, 0.00 and 0e0 are one f64; 0 is an integer (another key, a miss).
        let float = chat_key(r#"{"temperature":0.0}"#);
        assert_eq!(chat_key(r#"{"temperature":0.00}"#), float);
        assert_eq!(chat_key(r#"{"temperature":0e0}"#), float);
        assert_ne!(chat_key(r#"{"temperature":0}"#), float);
        // Embeddings have no stream flag.
        let emb = |body: &str| plain_key("g", "r", "e", ApiKind::Embeddings, body.as_bytes());
        assert_eq!(emb(r#"{"input":"x","user":"a"}"#), emb(r#"{"input":"x"}"#));
    }

    #[test]
    fn key_refuses_bad_bodies_and_server_state() {
        for body in [
            "",
            "[1]",
            "\"s\"",
            "{",
            "\u{ff}",
            r#"{"conversation":"conv_1"}"#,
            r#"{"conversation":{"id":"conv_1"}}"#,
            r#"{"background":true}"#,
            r#"{"container":"cntr_1"}"#,
            r#"{"prompt":{"id":"pmpt_1"}}"#,
            r#"{"prompt":{"id":"pmpt_1","version":null}}"#,
        ] {
            assert_eq!(chat_key(body), None, "{body}");
        }
        for body in [
            r#"{"conversation":null,"background":false,"container":null}"#,
            r#"{"prompt":{"id":"pmpt_1","version":"2"}}"#,
            r#"{"previous_response_id":"resp_1"}"#,
        ] {
            assert!(chat_key(body).is_some(), "{body}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(chat_key(&format!(r#"{{"a":{deep}}}"#)), None);
    }

    #[test]
    fn deterministic_requests() {
        for body in [
            r#"{"temperature":0}"#,
            r#"{"temperature":0.0,"n":1}"#,
            r#"{"temperature":-0.0,"n":null}"#,
            r#"{"top_p":0,"temperature":1}"#,
            r#"{"top_k":1}"#,
        ] {
            assert!(deterministic(body.as_bytes()), "{body}");
            assert!(greedy(body), "{body}");
        }
        for body in [
            "{}",
            r#"{"temperature":0.1}"#,
            r#"{"temperature":null}"#,
            r#"{"temperature":"0"}"#,
            r#"{"temperature":0,"n":2}"#,
            r#"{"top_k":2}"#,
            "[]",
            "nope",
        ] {
            assert!(!deterministic(body.as_bytes()), "{body}");
            assert!(!greedy(body), "{body}");
        }
    }

    /// The request parser's reading, which the pipeline uses (one parse per request).
    fn greedy(body: &str) -> bool {
        let body = body.replacen('{', r#"{"model":"m","#, 1);
        crate::api::request::parse_request(CHAT, body.as_bytes()).is_ok_and(|f| f.greedy)
    }
}
