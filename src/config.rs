//! The plugin configuration: raw JSON (serde) turned into a validated [`Config`] once, in
//! `on_configure`. Every error names the field it is about, so Envoy's log says what to fix.

use std::collections::BTreeMap;
use std::fmt;

use hashbrown::HashMap;
use serde::Deserialize;

use crate::tenant::{Identity, KeyDigest, TenantSource};

/// A configuration error: the dotted path of the offending field and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid tollgate configuration: field `{}`: {}",
            self.field, self.reason
        )
    }
}

/// The validated configuration the filter runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub identity: Identity,
    pub limits: Limits,
}

/// Size limits that keep every request's memory bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request bodies above this are refused with 413 before they are buffered further.
    pub max_request_body_bytes: u64,
    /// JSON response bytes kept to read usage at the end; past it only a tail window is kept.
    pub max_response_buffer_bytes: u64,
    /// Longest SSE line (or event data) kept; longer ones are dropped and flagged.
    pub max_sse_line_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body_bytes: 4 * 1024 * 1024,
            max_response_buffer_bytes: 1024 * 1024,
            max_sse_line_bytes: 1024 * 1024,
        }
    }
}

// ---- raw, as written by the operator ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: RawIdentity,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawSource {
    Header,
    ApiKey,
    Metadata,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: RawSource,
    header: Option<String>,
    metadata_path: Option<Vec<String>>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    default_tenant: Option<String>,
    #[serde(default)]
    accept_undeclared: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    sha256: String,
    tenant: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTenant {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_body_bytes: Option<u64>,
    max_response_buffer_bytes: Option<u64>,
    max_sse_line_bytes: Option<u64>,
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(&mut de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return ConfigError::new("(root)", format!("not valid JSON: {inner}"));
            }
            let field = if path == "." {
                "(root)".to_string()
            } else {
                path
            };
            ConfigError::new(field, strip_position(&inner.to_string()))
        })?;
        de.end()
            .map_err(|err| ConfigError::new("(root)", strip_position(&err.to_string())))?;
        Config::try_from(raw)
    }
}

/// serde_json appends " at line L column C"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message.get(..at).unwrap_or(message).to_string(),
        None => message.to_string(),
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        for name in raw.tenants.keys() {
            check_tenant_name(name)
                .map_err(|reason| ConfigError::new(format!("tenants.{name}"), reason))?;
        }
        let declared = |name: &str| raw.tenants.contains_key(name);
        let id = raw.identity;
        let source = match id.source {
            RawSource::Header => {
                let header = id.header.ok_or_else(|| {
                    ConfigError::new("identity.header", "required when source is \"header\"")
                })?;
                TenantSource::Header(
                    check_header_name(&header)
                        .map_err(|r| ConfigError::new("identity.header", r))?,
                )
            }
            RawSource::Metadata => {
                let path = id.metadata_path.ok_or_else(|| {
                    ConfigError::new(
                        "identity.metadata_path",
                        "required when source is \"metadata\"",
                    )
                })?;
                if path.is_empty() || path.iter().any(String::is_empty) {
                    return Err(ConfigError::new(
                        "identity.metadata_path",
                        "must be a non-empty list of non-empty property path segments",
                    ));
                }
                TenantSource::Metadata(path)
            }
            RawSource::ApiKey => {
                if id.api_keys.is_empty() {
                    return Err(ConfigError::new(
                        "identity.api_keys",
                        "at least one key digest is required when source is \"api_key\"",
                    ));
                }
                let mut keys = HashMap::with_capacity(id.api_keys.len());
                for (i, key) in id.api_keys.iter().enumerate() {
                    let digest = KeyDigest::from_hex(&key.sha256).ok_or_else(|| {
                        ConfigError::new(
                            format!("identity.api_keys[{i}].sha256"),
                            "must be 64 hexadecimal characters (the SHA-256 of the key, never the key)",
                        )
                    })?;
                    if !declared(&key.tenant) {
                        return Err(ConfigError::new(
                            format!("identity.api_keys[{i}].tenant"),
                            format!("tenant \"{}\" is not declared under `tenants`", key.tenant),
                        ));
                    }
                    if keys.insert(digest, key.tenant.clone()).is_some() {
                        return Err(ConfigError::new(
                            format!("identity.api_keys[{i}].sha256"),
                            "the same digest is listed twice",
                        ));
                    }
                }
                TenantSource::ApiKey(keys)
            }
        };
        if let Some(default) = &id.default_tenant
            && !declared(default)
        {
            return Err(ConfigError::new(
                "identity.default_tenant",
                format!("tenant \"{default}\" is not declared under `tenants`"),
            ));
        }
        if id.accept_undeclared && matches!(source, TenantSource::ApiKey(_)) {
            return Err(ConfigError::new(
                "identity.accept_undeclared",
                "only applies to the \"header\" and \"metadata\" sources",
            ));
        }
        let identity = Identity {
            source,
            tenants: raw.tenants.keys().cloned().collect(),
            default_tenant: id.default_tenant,
            accept_undeclared: id.accept_undeclared,
        };

        let defaults = Limits::default();
        let limits = Limits {
            max_request_body_bytes: positive(
                "limits.max_request_body_bytes",
                raw.limits.max_request_body_bytes,
                defaults.max_request_body_bytes,
            )?,
            max_response_buffer_bytes: positive(
                "limits.max_response_buffer_bytes",
                raw.limits.max_response_buffer_bytes,
                defaults.max_response_buffer_bytes,
            )?,
            max_sse_line_bytes: positive(
                "limits.max_sse_line_bytes",
                raw.limits.max_sse_line_bytes,
                defaults.max_sse_line_bytes,
            )?,
        };
        Ok(Config { identity, limits })
    }
}

fn positive(field: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(v) if v > u64::from(u32::MAX) => Err(ConfigError::new(field, "must be below 4 GiB")),
        Some(v) => Ok(v),
    }
}

/// Tenant names end up in metric names, access logs and shared-data keys: keep them plain.
fn check_tenant_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err("tenant names are 1-64 characters of [A-Za-z0-9._-]".to_string())
    }
}

fn check_header_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err("must be a header name of [A-Za-z0-9_-]".to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn err(json: &str) -> ConfigError {
        Config::from_json(json.as_bytes()).expect_err("must be refused")
    }

    #[test]
    fn minimal_header_config() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"X-Tenant"},"tenants":{"a":{}}}"#,
        )
        .unwrap();
        assert!(matches!(cfg.identity.source, TenantSource::Header(ref h) if h == "x-tenant"));
        assert_eq!(cfg.limits, Limits::default());
    }

    #[test]
    fn api_key_config() {
        let json = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{DIGEST}","tenant":"a"}}]}},"tenants":{{"a":{{}}}}}}"#
        );
        let cfg = Config::from_json(json.as_bytes()).unwrap();
        assert!(matches!(cfg.identity.source, TenantSource::ApiKey(ref k) if k.len() == 1));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, &str); 9] = [
            (
                r#"{"identity":{"source":"header","header":7}}"#,
                "identity.header",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"bogus":1}"#,
                "bogus",
            ),
            (
                r#"{"identity":{"source":"header","header":"x","colour":1}}"#,
                "identity.colour",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"limits":{"max_request_body_bytes":-5}}"#,
                "limits.max_request_body_bytes",
            ),
            (r#"{"tenants":{}}"#, "(root)"),
            (r#"{"identity":{"source":"header"}}"#, "identity.header"),
            (
                r#"{"identity":{"source":"api_key","api_keys":[{"sha256":"abc","tenant":"a"}]},"tenants":{"a":{}}}"#,
                "identity.api_keys[0].sha256",
            ),
            (
                r#"{"identity":{"source":"carrier_pigeon"}}"#,
                "identity.source",
            ),
            (
                r#"{"identity":{"source":"header","header":"x"},"limits":{"max_sse_line_bytes":0}}"#,
                "limits.max_sse_line_bytes",
            ),
        ];
        for (json, field) in cases {
            let e = err(json);
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn unknown_field_is_named_in_the_reason() {
        let e = err(r#"{"identity":{"source":"header","header":"x"},"bogus":1}"#);
        assert!(e.reason.contains("bogus"), "{e}");
    }

    #[test]
    fn undeclared_tenants_are_refused() {
        let json = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{DIGEST}","tenant":"ghost"}}]}}}}"#
        );
        assert_eq!(err(&json).field, "identity.api_keys[0].tenant");
        let e = err(r#"{"identity":{"source":"header","header":"x","default_tenant":"nobody"}}"#);
        assert_eq!(e.field, "identity.default_tenant");
        assert_eq!(
            err(r#"{"identity":{"source":"header","header":"x"},"tenants":{"a b":{}}}"#).field,
            "tenants.a b"
        );
    }

    #[test]
    fn not_json_is_refused_not_panicking() {
        for bytes in [&b""[..], b"{", b"[]", b"null", b"\xff\xfe", b"{} trailing"] {
            assert!(Config::from_json(bytes).is_err());
        }
    }
}
