//! Who is asking: the `identity` section (header, API-key digests or metadata; the default
//! tenant; undeclared tenants and their slots) validated into [`Identity`].

use std::collections::BTreeMap;

use hashbrown::HashMap;

use crate::tenant::{Identity, KeyDigest, TenantSource};
use crate::user::{UserInLedger, UserSource, Users};

use super::raw::{RawIdentity, RawPolicy, RawSource, RawUser, RawUserSource};
use super::{ConfigError, check_header_name};

/// The tenant source and its rules; `tenants` are the declared tenants the section may name.
pub(super) fn build_identity(
    id: RawIdentity,
    tenants: &BTreeMap<String, RawPolicy>,
) -> Result<Identity, ConfigError> {
    let declared = |name: &str| tenants.contains_key(name);
    let source = match id.source {
        RawSource::Header => {
            let header = id.header.ok_or_else(|| {
                ConfigError::new("identity.header", "required when source is \"header\"")
            })?;
            TenantSource::Header(
                check_header_name(&header).map_err(|r| ConfigError::new("identity.header", r))?,
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
        tenants: tenants.keys().cloned().collect(),
        default_tenant: id.default_tenant,
        accept_undeclared: id.accept_undeclared,
    };
    Ok(identity)
}

/// The end-user section (`identity.user`, `identity.user_slots`).
pub(super) fn build_users(
    raw: Option<&RawUser>,
    slots: Option<u64>,
) -> Result<Option<Users>, ConfigError> {
    let Some(raw) = raw else {
        if slots.is_some() {
            return Err(ConfigError::new(
                "identity.user_slots",
                "only applies with `identity.user`",
            ));
        }
        return Ok(None);
    };
    let source = match raw.source {
        RawUserSource::Header => {
            let header = raw.header.as_deref().ok_or_else(|| {
                ConfigError::new("identity.user.header", "required when source is \"header\"")
            })?;
            UserSource::Header(
                check_header_name(header)
                    .map_err(|r| ConfigError::new("identity.user.header", r))?,
            )
        }
        RawUserSource::Metadata => match &raw.metadata_path {
            Some(path) if !path.is_empty() && path.iter().all(|s| !s.is_empty()) => {
                UserSource::Metadata(path.clone())
            }
            _ => {
                return Err(ConfigError::new(
                    "identity.user.metadata_path",
                    "a non-empty list of non-empty property path segments, required when source is \"metadata\"",
                ));
            }
        },
        RawUserSource::Body => UserSource::Body,
    };
    let ledger = match raw.ledger.as_deref() {
        None | Some("hash") => UserInLedger::Hash,
        Some("raw") => UserInLedger::Raw,
        Some(_) => {
            return Err(ConfigError::new(
                "identity.user.ledger",
                "must be \"hash\" or \"raw\"",
            ));
        }
    };
    let slots = match slots {
        None => 1024,
        Some(n) if (1..=MAX_USER_SLOTS).contains(&n) => n,
        Some(_) => {
            return Err(ConfigError::new(
                "identity.user_slots",
                format!("must be between 1 and {MAX_USER_SLOTS}"),
            ));
        }
    };
    Ok(Some(Users {
        source,
        slots,
        ledger,
    }))
}

/// At most this many user slots per tenant scope.
pub const MAX_USER_SLOTS: u64 = 65536;

/// How many budget slots undeclared tenants share (`identity.undeclared_slots`).
pub(super) fn undeclared_slots(raw: Option<u64>) -> Result<u64, ConfigError> {
    let undeclared_slots = match raw {
        None => 1024,
        Some(n) if (1..=65536).contains(&n) => n,
        Some(_) => {
            return Err(ConfigError::new(
                "identity.undeclared_slots",
                "must be between 1 and 65536",
            ));
        }
    };
    Ok(undeclared_slots)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;
    use crate::tenant::TenantSource;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn api_key_config() {
        let json = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{DIGEST}","tenant":"a"}}]}},"tenants":{{"a":{{}}}}}}"#
        );
        let cfg = Config::from_json(json.as_bytes()).unwrap();
        assert!(matches!(cfg.identity.source, TenantSource::ApiKey(ref k) if k.len() == 1));
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
}
