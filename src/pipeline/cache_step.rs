//! The cache's part of a request: eligibility, the key of what goes upstream, the lookup.

use super::{Gateway, Headers, Host};
use crate::api::ApiKind;
use crate::cache::{self, CacheKey, Hit, PendingKey};
use crate::config::CachePolicy;
use crate::routing::Resolved;

/// What the response cache did with a request.
pub(super) enum CacheStatus {
    /// No cache configured.
    Off,
    /// Not eligible (policy, `cache-control: no-store`, or a body that must not be cached).
    Bypass,
    /// Looked up, not found: the response is stored if it qualifies.
    Miss(Box<PendingKey>, CacheKey, u64),
    /// `cache-control: no-cache`: not read, the response refreshes the entry.
    Refresh(Box<PendingKey>, CacheKey, u64),
}

impl CacheStatus {
    /// Once admission lowered the max-tokens value below the planned one (clamp mode), the
    /// response answers another upstream request: store it under that request's key (a later
    /// request planned without the clamp looks up the other key, a miss).
    pub(super) fn rekey(&mut self, planned: Option<u64>, admitted: Option<u64>) {
        if planned == admitted {
            return;
        }
        if let CacheStatus::Miss(pending, key, _) | CacheStatus::Refresh(pending, key, _) = self {
            *key = pending.finish(admitted);
        }
    }

    pub(super) fn as_str(&self) -> &'static str {
        match self {
            CacheStatus::Off => "",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Miss(..) => "miss",
            CacheStatus::Refresh(..) => "store",
        }
    }

    /// The response is to be stored.
    pub(super) fn stores(&self) -> bool {
        matches!(self, CacheStatus::Miss(..) | CacheStatus::Refresh(..))
    }
}

pub(super) enum Lookup {
    Hit(Box<Hit>, CacheKey),
    Status(CacheStatus),
}

/// What the lookup needs to know of the request.
pub(super) struct Asked<'a> {
    pub kind: ApiKind,
    pub tenant: &'a str,
    pub requested: &'a str,
    pub served: &'a str,
    pub resolved: Option<&'a Resolved>,
    pub body: &'a [u8],
    /// The request asks for greedy decoding ([`crate::api::request::RequestFacts::greedy`]).
    pub greedy: bool,
    /// The max-tokens value admission plans to send upstream (the key is of the upstream's
    /// request).
    pub max_tokens: Option<u64>,
}

/// Decides whether the cache may answer this request, and looks it up.
pub(super) fn lookup<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    headers: &Headers,
    asked: &Asked<'_>,
    now: u64,
) -> Lookup {
    let Some(cache) = &gateway.config.cache else {
        return Lookup::Status(CacheStatus::Off);
    };
    let (policy, ttl, global) = cache.rule(asked.kind, asked.served);
    let eligible = match policy {
        CachePolicy::Always => true,
        CachePolicy::Deterministic => asked.greedy,
        CachePolicy::Never => false,
    };
    if !eligible {
        return Lookup::Status(CacheStatus::Bypass);
    }
    let control = cache::header_value(&headers.0, "cache-control").unwrap_or_default();
    if cache::has_directive(&control, b"no-store") {
        return Lookup::Status(CacheStatus::Bypass);
    }
    let path = cache::header_value(&headers.0, ":path").unwrap_or_default();
    let key_headers = cache::key_header_values(&cache.key_headers, &headers.0);
    let inputs = cache::KeyInputs {
        scope: if global { "global" } else { asked.tenant },
        route: asked.resolved.map_or("", |r| r.route.as_str()),
        upstream_model: asked
            .resolved
            .map_or(asked.requested, |r| r.upstream_model.as_str()),
        kind: asked.kind,
        path: &path,
        headers: &key_headers,
    };
    let Some(pending) = cache::cache_key(&inputs, asked.body) else {
        return Lookup::Status(CacheStatus::Bypass);
    };
    let key = pending.finish(asked.max_tokens);
    if cache::has_directive(&control, b"no-cache") {
        return Lookup::Status(CacheStatus::Refresh(Box::new(pending), key, ttl));
    }
    let table = cache::CacheConfig {
        ttl_ms: ttl,
        ..cache.table
    };
    match cache::lookup(host, &table, &key, now) {
        Some(hit) => Lookup::Hit(Box::new(hit), key),
        None => Lookup::Status(CacheStatus::Miss(Box::new(pending), key, ttl)),
    }
}
