//! Who is asking: the tenant of a request, from a trusted header, from the API key (looked up by
//! its SHA-256 digest, the raw key is never kept), or from a value an earlier filter wrote into
//! Envoy's metadata.

use hashbrown::{HashMap, HashSet};
use sha2::{Digest, Sha256};

/// SHA-256 of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of_key(key: &[u8]) -> KeyDigest {
        KeyDigest(Sha256::digest(key).into())
    }

    /// The first eight bytes as a number (slot selection).
    pub fn prefix_u64(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, h])
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<KeyDigest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let [hi, lo] = pair else { return None };
            *slot = (hex_value(*hi)? << 4) | hex_value(*lo)?;
        }
        Some(KeyDigest(out))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Where the tenant comes from.
#[derive(Debug, Clone)]
pub enum TenantSource {
    /// A header set by something trusted in front of Envoy (lower-cased name).
    Header(String),
    /// `x-api-key`, `api-key` (Azure) or `Authorization: Bearer …`, digest → tenant.
    ApiKey(HashMap<KeyDigest, String>),
    /// An Envoy property path, e.g. `metadata.filter_metadata.envoy.filters.http.jwt_authn…`.
    Metadata(Vec<String>),
}

/// The tenant identity policy.
#[derive(Debug, Clone)]
pub struct Identity {
    pub source: TenantSource,
    /// Declared tenants (the keys of `tenants` in the configuration).
    pub tenants: HashSet<String>,
    /// Where unknown or missing identities go instead of a 401.
    pub default_tenant: Option<String>,
    /// Header and metadata sources: accept any well-formed value as a tenant name.
    pub accept_undeclared: bool,
}

/// Why no tenant could be found; each is a 401 unless a default tenant is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unidentified {
    /// No credential or identity value in the request.
    Missing,
    /// A value that names no tenant (unknown key, undeclared or malformed tenant name).
    Unknown,
    /// Two credential headers (or two values of one) carry different keys: Tollgate would bill
    /// one while the upstream may authenticate the other. Refused even with a default tenant.
    Conflicting,
}

impl Unidentified {
    pub fn message(self) -> &'static str {
        match self {
            Unidentified::Missing => "No API key or tenant identity was provided.",
            Unidentified::Unknown => "The API key or tenant identity is not known to this gateway.",
            Unidentified::Conflicting => {
                "The request carries different API keys (x-api-key, api-key, authorization); send one."
            }
        }
    }
}

/// The headers that carry an API key (`authorization` as `Bearer <key>`).
pub const API_KEY_HEADERS: [&str; 4] = ["x-api-key", "api-key", "authorization", "x-goog-api-key"];

impl Identity {
    /// Resolves a header or metadata value to a tenant.
    pub fn resolve_value(&self, value: Option<&[u8]>) -> Result<String, Unidentified> {
        let found = match value {
            None | Some(b"") => Err(Unidentified::Missing),
            Some(raw) => match std::str::from_utf8(raw) {
                Ok(name) if self.tenants.contains(name) => Ok(name.to_string()),
                Ok(name) if self.accept_undeclared && is_plain_name(name) => Ok(name.to_string()),
                _ => Err(Unidentified::Unknown),
            },
        };
        self.or_default(found)
    }

    /// Resolves the API key headers of a request (every `(name, value)` header entry; names
    /// other than [`API_KEY_HEADERS`] are skipped) to a tenant. A value names a key when it is
    /// not blank (`authorization` only as `Bearer <key>`); every key named must be the same
    /// key, else [`Unidentified::Conflicting`] whatever the default tenant.
    pub fn resolve_api_key<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<String, Unidentified> {
        let TenantSource::ApiKey(keys) = &self.source else {
            return self.or_default(Err(Unidentified::Unknown));
        };
        let mut key: Option<&[u8]> = None;
        for (name, value) in headers {
            if !API_KEY_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                continue;
            }
            // Envoy joins repeated `authorization` lines with `,`, which no Bearer token holds;
            // the other headers' values are one key each (a split that never matches).
            let bearer = name.eq_ignore_ascii_case("authorization");
            let parts = value.split(move |b| bearer && *b == b',');
            let keys_named = parts.map(|v| {
                if bearer {
                    bearer_token(v).unwrap_or(b"")
                } else {
                    trim(v)
                }
            });
            for named in keys_named {
                match key {
                    _ if named.is_empty() => {}
                    Some(first) if first != named => return Err(Unidentified::Conflicting),
                    _ => key = Some(named),
                }
            }
        }
        let found = match key {
            None => Err(Unidentified::Missing),
            Some(key) => keys
                .get(&KeyDigest::of_key(key))
                .cloned()
                .ok_or(Unidentified::Unknown),
        };
        self.or_default(found)
    }

    fn or_default(&self, found: Result<String, Unidentified>) -> Result<String, Unidentified> {
        match (found, &self.default_tenant) {
            (Err(_), Some(default)) => Ok(default.clone()),
            (found, _) => found,
        }
    }
}

/// `Bearer <token>` (scheme case-insensitive) → token.
pub(crate) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(trim(rest))
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &KeyDigest) -> String {
        d.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn key_identity(default: Option<&str>) -> Identity {
        let mut keys = HashMap::new();
        keys.insert(KeyDigest::of_key(b"sk-team-a"), "a".to_string());
        Identity {
            source: TenantSource::ApiKey(keys),
            tenants: ["a".to_string(), "anon".to_string()].into_iter().collect(),
            default_tenant: default.map(str::to_string),
            accept_undeclared: false,
        }
    }

    /// The `x-api-key`, `api-key` and `authorization` values, each present or not.
    fn keyed(id: &Identity, values: [Option<&[u8]>; 3]) -> Result<String, Unidentified> {
        let present = API_KEY_HEADERS.into_iter().zip(values);
        id.resolve_api_key(present.filter_map(|(name, value)| Some((name, value?))))
    }

    #[test]
    fn conflicting_keys_are_refused_even_with_a_default() {
        let id = key_identity(Some("anon"));
        let refused: [&[(&str, &[u8])]; 6] = [
            &[
                ("x-api-key", b"sk-team-a"),
                ("authorization", b"Bearer sk-other"),
            ],
            &[
                ("authorization", b"Bearer sk-other"),
                ("x-api-key", b"sk-team-a"),
            ],
            &[("x-api-key", b"sk-team-a"), ("x-api-key", b"sk-other")],
            &[
                ("authorization", b"Bearer sk-team-a"),
                ("authorization", b"bearer x"),
            ],
            &[("api-key", b"sk-other"), ("X-Api-Key", b"sk-team-a")],
            // Envoy joins repeated authorization lines.
            &[("authorization", b"Bearer sk-team-a,Bearer sk-other")],
        ];
        for headers in refused {
            let got = id.resolve_api_key(headers.iter().copied());
            assert_eq!(got, Err(Unidentified::Conflicting), "{headers:?}");
        }
        // The same key twice, blank values and non-Bearer schemes name no second key.
        let accepted: [&[(&str, &[u8])]; 6] = [
            &[
                ("x-api-key", b"sk-team-a"),
                ("authorization", b"Bearer  sk-team-a "),
            ],
            &[("x-api-key", b"sk-team-a"), ("x-api-key", b" sk-team-a")],
            &[
                ("x-api-key", b"sk-team-a"),
                ("authorization", b"Basic dXNlcjpwdw=="),
            ],
            &[("x-api-key", b" "), ("authorization", b"Bearer sk-team-a")],
            &[("authorization", b"Bearer sk-team-a, Bearer sk-team-a")],
            &[
                ("x-tenant", b"anon"),
                ("api-key", b"sk-team-a"),
                ("cookie", b"x"),
            ],
        ];
        for headers in accepted {
            let got = id.resolve_api_key(headers.iter().copied());
            assert_eq!(got, Ok("a".into()), "{headers:?}");
        }
    }

    #[test]
    fn digest_round_trips_through_hex() {
        let d = KeyDigest::of_key(b"test");
        assert_eq!(
            hex(&d),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(KeyDigest::from_hex(&hex(&d).to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
        assert_eq!(KeyDigest::from_hex(&"g".repeat(64)), None);
        assert_eq!(KeyDigest::from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn api_key_from_each_header() {
        let id = key_identity(None);
        assert_eq!(keyed(&id, [Some(b"sk-team-a"), None, None]), Ok("a".into()));
        assert_eq!(
            keyed(&id, [None, Some(b" sk-team-a "), None]),
            Ok("a".into())
        );
        assert_eq!(
            keyed(&id, [None, None, Some(b"Bearer sk-team-a")]),
            Ok("a".into())
        );
        assert_eq!(
            keyed(&id, [None, None, Some(b"bearer  sk-team-a")]),
            Ok("a".into())
        );
        assert_eq!(
            keyed(&id, [None, None, Some(b"Basic sk-team-a")]),
            Err(Unidentified::Missing)
        );
        assert_eq!(keyed(&id, [None, None, None]), Err(Unidentified::Missing));
        assert_eq!(
            keyed(&id, [Some(b"sk-other"), None, None]),
            Err(Unidentified::Unknown)
        );
        assert_eq!(
            keyed(&id, [Some(b"\xff\xfe"), None, None]),
            Err(Unidentified::Unknown)
        );
    }

    #[test]
    fn unknown_goes_to_default_when_configured() {
        let id = key_identity(Some("anon"));
        assert_eq!(
            keyed(&id, [Some(b"sk-other"), None, None]),
            Ok("anon".into())
        );
        assert_eq!(keyed(&id, [None, None, None]), Ok("anon".into()));
    }

    #[test]
    fn header_values_must_be_declared_unless_accepted() {
        let mut id = Identity {
            source: TenantSource::Header("x-tenant".into()),
            tenants: ["a".to_string()].into_iter().collect(),
            default_tenant: None,
            accept_undeclared: false,
        };
        assert_eq!(id.resolve_value(Some(b"a")), Ok("a".into()));
        assert_eq!(id.resolve_value(Some(b"b")), Err(Unidentified::Unknown));
        assert_eq!(id.resolve_value(None), Err(Unidentified::Missing));
        assert_eq!(
            id.resolve_value(Some(b"\xc3\x28")),
            Err(Unidentified::Unknown)
        );
        id.accept_undeclared = true;
        assert_eq!(id.resolve_value(Some(b"b")), Ok("b".into()));
        assert_eq!(id.resolve_value(Some(b"b c")), Err(Unidentified::Unknown));
    }
}
