//! The `--engine ratelimit` engine: `ShouldRateLimit` answered the way envoyproxy/ratelimit
//! answers it with its Redis fixed-window cache (`BACKEND_TYPE=redis`, `REDIS_TYPE=single`, no
//! per-second pool, `LOCAL_CACHE_SIZE_IN_BYTES=0`, `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT=false`,
//! no shadow or quota mode, `MERGE_DOMAIN_CONFIG=false`: its defaults). Followed, file by file,
//! from github.com/envoyproxy/ratelimit at f2fb15770f7fd1c88ca6c3a1b58ee513917ace96:
//!
//! - src/config/config_impl.go: `ConfigFileContentToYaml` + `validateYamlKeys` (only the known
//!   keys, leaves string/int/bool/null), `loadConfig` (non-empty, unique domain),
//!   `loadDescriptors` (non-empty key, `key` or `key_value`, no duplicate, a valid unit unless
//!   `unlimited` and then no unit, `replaces`, wildcards in values) and `GetLimit` (a request
//!   descriptor's `limit` override first; else walk the entries, `key_value` before a wildcard
//!   before the value-less `key`; the limit only when the node is at the descriptor's depth);
//! - src/service/ratelimit.go: `ShouldRateLimit` (a panic with a `RedisError` or a
//!   `serviceError` becomes the call's error: grpc-go sends a non-status error as `UNKNOWN`
//!   with the error's text), `shouldRateLimitWorker` (empty domain or descriptor list is a
//!   service error; statuses; `OVER_LIMIT` when any descriptor is; `RateLimit-*` headers of the
//!   descriptor closest to its limit when `LIMIT_RESPONSE_HEADERS_ENABLED`),
//!   `constructLimitsToCheck` (unlimited: `OK` with `limit_remaining` = `u32::MAX`; `replaces`);
//! - src/utils/utilities.go: `GetHitsAddends` (the descriptor's `hits_addend` when set, zero
//!   included; else the request's, 0 meaning 1), `UnitToDivider` (epoch-aligned units, MONTH =
//!   30 days, YEAR = 365), `CalculateReset`;
//! - src/limiter/cache_key.go `GenerateCacheKey`: `prefix + domain + "_" + (key + "_" + value +
//!   "_")… + (now / divider) * divider`, no key (nothing counted) without a limit;
//! - src/redis/fixed_cache_impl.go `DoLimit` + `pipelineAppend`: one pipeline (not a
//!   transaction) of `INCRBY key hits` and `EXPIRE key divider + jitter` per limited descriptor,
//!   jitter in [0, `EXPIRATION_JITTER_MAX_SECONDS`) (default 300); a pipeline error is a
//!   `RedisError` (`checkError`);
//! - src/limiter/base_limiter.go `GetResponseDescriptorStatus`: `OVER_LIMIT` when the value
//!   after the increase exceeds `requests_per_unit` (the refused hits stay counted), with
//!   `limit_remaining` 0; else `OK` with `requests_per_unit - after`; `current_limit` and
//!   `duration_until_reset` (`CalculateReset`, the clock read again) whenever a limit applied.
//!
//! Not reproduced (rejected in the configuration when asked for): `shadow_mode`, `quota_mode`,
//! `share_threshold`. Stats, `detailed_metric`, `value_to_metric` and `metadata` change no answer
//! (dynamic metadata is off by default) and are accepted and ignored.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit as ResponseLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration;
use redis::aio::ConnectionManager;
use serde_yaml::{Mapping, Value};
use tonic::Status;

/// `config.RateLimit`: what a descriptor is limited to.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub requests_per_unit: u32,
    /// `RateLimitResponse.RateLimit.Unit` (1 SECOND … 6 YEAR, 7 WEEK); 0 when unlimited.
    pub unit: i32,
    pub name: String,
    pub unlimited: bool,
    pub replaces: Vec<String>,
}

/// `rateLimitDescriptor`: a node of a domain's tree.
#[derive(Default, Debug)]
struct Node {
    descriptors: HashMap<String, Node>,
    limit: Option<Limit>,
    /// `wildcardEntries`: (the `key_value` pattern, split on `*`).
    wildcards: Vec<(String, Vec<String>)>,
}

/// `rateLimitConfigImpl`: every domain's tree.
#[derive(Default, Debug)]
pub struct Config {
    domains: HashMap<String, Node>,
}

const VALID_KEYS: [&str; 16] = [
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "quota_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];

/// `UnitToDivider`.
pub fn unit_to_divider(unit: i32) -> Option<i64> {
    Some(match unit {
        1 => 1,
        2 => 60,
        3 => 60 * 60,
        4 => 60 * 60 * 24,
        7 => 60 * 60 * 24 * 7,
        5 => 60 * 60 * 24 * 30,
        6 => 60 * 60 * 24 * 365,
        _ => return None,
    })
}

/// `pb.RateLimitResponse_RateLimit_Unit_value[strings.ToUpper(unit)]`.
fn unit_value(unit: &str) -> Option<i32> {
    Some(match unit.to_uppercase().as_str() {
        "UNKNOWN" => 0,
        "SECOND" => 1,
        "MINUTE" => 2,
        "HOUR" => 3,
        "DAY" => 4,
        "MONTH" => 5,
        "YEAR" => 6,
        "WEEK" => 7,
        _ => return None,
    })
}

/// `validateYamlKeys`.
fn validate_keys(file: &str, map: &Mapping) -> Result<(), String> {
    for (k, v) in map {
        let Some(k) = k.as_str() else {
            return Err(format!(
                "{file}: config error, key is not of type string: {k:?}"
            ));
        };
        if !VALID_KEYS.contains(&k) {
            return Err(format!("{file}: config error, unknown key '{k}'"));
        }
        if k == "metadata" {
            continue;
        }
        match v {
            Value::Sequence(items) => {
                for e in items {
                    let Value::Mapping(m) = e else {
                        return Err(format!(
                            "{file}: config error, yaml file contains list of type other than \
                             map: {e:?}"
                        ));
                    };
                    validate_keys(file, m)?;
                }
            }
            Value::Mapping(m) => validate_keys(file, m)?,
            Value::String(_) | Value::Bool(_) | Value::Null => {}
            Value::Number(n) if n.is_i64() => {}
            _ => return Err(format!("{file}: error checking config")),
        }
    }
    Ok(())
}

/// yaml.v2 into a `string` field: any scalar's text; absent or null is "".
fn string_field(file: &str, map: &Mapping, key: &str) -> Result<String, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other) => Err(format!(
            "{file}: error loading config file: cannot unmarshal {other:?} into string ({key})"
        )),
    }
}

fn bool_field(file: &str, map: &Mapping, key: &str) -> Result<bool, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!(
            "{file}: error loading config file: cannot unmarshal {other:?} into bool ({key})"
        )),
    }
}

fn seq_field<'a>(file: &str, map: &'a Mapping, key: &str) -> Result<&'a [Value], String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Sequence(items)) => Ok(items),
        Some(other) => Err(format!(
            "{file}: error loading config file: cannot unmarshal {other:?} into a list ({key})"
        )),
    }
}

/// `wildcardMatch`.
fn wildcard_match(parts: &[String], value: &str) -> bool {
    if parts.len() == 1 {
        return parts[0] == value;
    }
    let (first, last) = (&parts[0], &parts[parts.len() - 1]);
    if !value.starts_with(first.as_str()) || !value.ends_with(last.as_str()) {
        return false;
    }
    if value.len() < parts.iter().map(String::len).sum::<usize>() {
        return false;
    }
    let mut remaining = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match remaining.find(part.as_str()) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

impl Node {
    /// `loadDescriptors`.
    fn load(&mut self, file: &str, parent_key: &str, descriptors: &[Value]) -> Result<(), String> {
        for d in descriptors {
            let Value::Mapping(d) = d else {
                return Err(format!(
                    "{file}: error loading config file: a descriptor is not a map"
                ));
            };
            let key = string_field(file, d, "key")?;
            if key.is_empty() {
                return Err(format!("{file}: descriptor has empty key"));
            }
            let value = string_field(file, d, "value")?;
            let mut final_key = key.clone();
            if !value.is_empty() {
                final_key += &format!("_{value}");
            }
            let new_parent_key = format!("{parent_key}{final_key}");
            if self.descriptors.contains_key(&final_key) {
                return Err(format!(
                    "{file}: duplicate descriptor composite key '{new_parent_key}'"
                ));
            }
            for unsupported in ["shadow_mode", "quota_mode", "share_threshold"] {
                if bool_field(file, d, unsupported)? {
                    return Err(format!(
                        "{file}: {unsupported} is not reproduced by this test server ({new_parent_key})"
                    ));
                }
            }
            bool_field(file, d, "detailed_metric")?;
            bool_field(file, d, "value_to_metric")?;
            let limit = match d.get("rate_limit") {
                None | Some(Value::Null) => None,
                Some(Value::Mapping(r)) => {
                    let unlimited = bool_field(file, r, "unlimited")?;
                    let unit_text = string_field(file, r, "unit")?;
                    let unit = unit_value(&unit_text).unwrap_or(0);
                    let valid_unit = unit_value(&unit_text).is_some_and(|u| u != 0);
                    if unlimited {
                        if valid_unit {
                            return Err(format!(
                                "{file}: should not specify rate limit unit when unlimited"
                            ));
                        }
                    } else if !valid_unit {
                        return Err(format!("{file}: invalid rate limit unit '{unit_text}'"));
                    }
                    let requests_per_unit = match r.get("requests_per_unit") {
                        None | Some(Value::Null) => 0,
                        Some(Value::Number(n)) => n
                            .as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| {
                                format!("{file}: error loading config file: cannot unmarshal {n} into uint32")
                            })?,
                        Some(other) => {
                            return Err(format!(
                                "{file}: error loading config file: cannot unmarshal {other:?} into uint32"
                            ));
                        }
                    };
                    let name = string_field(file, r, "name")?;
                    let mut replaces = Vec::new();
                    for e in seq_field(file, r, "replaces")? {
                        let Value::Mapping(e) = e else {
                            return Err(format!("{file}: error loading config file: replaces"));
                        };
                        let replaced = string_field(file, e, "name")?;
                        if replaced.is_empty() {
                            return Err(format!("{file}: should not have an empty replaces entry"));
                        }
                        if replaced == name {
                            return Err(format!(
                                "{file}: replaces should not contain name of same descriptor"
                            ));
                        }
                        replaces.push(replaced);
                    }
                    Some(Limit {
                        requests_per_unit,
                        unit,
                        name,
                        unlimited,
                        replaces,
                    })
                }
                Some(other) => {
                    return Err(format!(
                        "{file}: error loading config file: rate_limit is {other:?}"
                    ));
                }
            };
            if final_key.contains('*') {
                let parts = final_key.split('*').map(str::to_string).collect();
                self.wildcards.push((final_key.clone(), parts));
            }
            let mut node = Node {
                limit,
                ..Node::default()
            };
            node.load(
                file,
                &format!("{new_parent_key}."),
                seq_field(file, d, "descriptors")?,
            )?;
            self.descriptors.insert(final_key, node);
        }
        Ok(())
    }
}

impl Config {
    /// `ConfigFileContentToYaml` + `loadConfig`, for each file in turn.
    pub fn load(files: &[(String, String)]) -> Result<Config, String> {
        let mut config = Config::default();
        for (file, content) in files {
            let root: Value = serde_yaml::from_str(content)
                .map_err(|e| format!("{file}: error loading config file: {e}"))?;
            let root = match root {
                Value::Mapping(m) => m,
                Value::Null => Mapping::new(),
                _ => return Err(format!("{file}: error loading config file: not a map")),
            };
            validate_keys(file, &root)?;
            let domain = string_field(file, &root, "domain")?;
            if domain.is_empty() {
                return Err(format!("{file}: config file cannot have empty domain"));
            }
            if config.domains.contains_key(&domain) {
                return Err(format!(
                    "{file}: duplicate domain '{domain}' in config file"
                ));
            }
            let mut node = Node::default();
            node.load(
                file,
                &format!("{domain}."),
                seq_field(file, &root, "descriptors")?,
            )?;
            config.domains.insert(domain, node);
        }
        Ok(config)
    }

    /// `GetLimit`.
    pub fn get_limit(&self, domain: &str, descriptor: &RateLimitDescriptor) -> Option<Limit> {
        let root = self.domains.get(domain)?;
        if let Some(over) = &descriptor.limit {
            return Some(Limit {
                requests_per_unit: over.requests_per_unit,
                // `pb.RateLimitResponse_RateLimit_Unit(descriptor.GetLimit().GetUnit())`: the
                // same numbers for SECOND … YEAR.
                unit: over.unit,
                name: String::new(),
                unlimited: false,
                replaces: Vec::new(),
            });
        }
        let mut map = &root.descriptors;
        let mut prev = root;
        let mut limit = None;
        let last = descriptor.entries.len().saturating_sub(1);
        for (i, entry) in descriptor.entries.iter().enumerate() {
            let final_key = format!("{}_{}", entry.key, entry.value);
            let mut next = map.get(&final_key);
            if next.is_none() {
                next = prev
                    .wildcards
                    .iter()
                    .find(|(_, parts)| wildcard_match(parts, &final_key))
                    .and_then(|(key, _)| map.get(key));
            }
            if next.is_none() {
                next = map.get(&entry.key);
            }
            if let Some(node) = next
                && let Some(l) = &node.limit
                && i == last
            {
                limit = Some(l.clone());
            }
            match next {
                Some(node) if !node.descriptors.is_empty() => {
                    map = &node.descriptors;
                    prev = node;
                }
                _ => break,
            }
        }
        limit
    }
}

/// One descriptor's outcome, for the observation log: the cache key, the hits added, the code,
/// and the counter after the increase.
pub struct Observed {
    pub key: String,
    pub hits: u64,
    pub over_limit: bool,
    pub after: u64,
}

pub struct Engine {
    config: Config,
    redis: ConnectionManager,
    jitter_max_seconds: i64,
    cache_key_prefix: String,
    headers: bool,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `CalculateReset`.
fn reset(unit: i32) -> Option<Duration> {
    let sec = unit_to_divider(unit)?;
    Some(Duration {
        seconds: sec - now() % sec,
        nanos: 0,
    })
}

fn status(code: Code, limit: Option<&Limit>, remaining: u32) -> DescriptorStatus {
    DescriptorStatus {
        code: code.into(),
        current_limit: limit.map(|l| ResponseLimit {
            name: l.name.clone(),
            requests_per_unit: l.requests_per_unit,
            unit: l.unit,
        }),
        limit_remaining: remaining,
        duration_until_reset: limit.and_then(|l| reset(l.unit)),
        ..DescriptorStatus::default()
    }
}

impl Engine {
    pub async fn new(
        config: Config,
        redis_url: &str,
        jitter_max_seconds: i64,
        cache_key_prefix: String,
        headers: bool,
    ) -> Result<Engine, redis::RedisError> {
        let redis = ConnectionManager::new(redis::Client::open(redis_url)?).await?;
        Ok(Engine {
            config,
            redis,
            jitter_max_seconds,
            cache_key_prefix,
            headers,
        })
    }

    /// `constructLimitsToCheck`: (limits to check, unlimited).
    fn limits_to_check(&self, req: &RateLimitRequest) -> (Vec<Option<Limit>>, Vec<bool>) {
        let mut limits = Vec::with_capacity(req.descriptors.len());
        let mut unlimited = Vec::with_capacity(req.descriptors.len());
        let mut replacing = HashSet::new();
        for d in &req.descriptors {
            let mut limit = self.config.get_limit(&req.domain, d);
            let mut is_unlimited = false;
            if let Some(l) = &limit {
                replacing.extend(l.replaces.iter().cloned());
                if l.unlimited {
                    is_unlimited = true;
                    limit = None;
                }
            }
            limits.push(limit);
            unlimited.push(is_unlimited);
        }
        for limit in &mut limits {
            if limit
                .as_ref()
                .is_some_and(|l| !l.name.is_empty() && replacing.contains(&l.name))
            {
                *limit = None;
            }
        }
        (limits, unlimited)
    }

    /// `GenerateCacheKey`.
    fn cache_key(&self, domain: &str, d: &RateLimitDescriptor, limit: &Limit, now: i64) -> String {
        let mut key = format!("{}{domain}_", self.cache_key_prefix);
        for e in &d.entries {
            key += &format!("{}_{}_", e.key, e.value);
        }
        // `UnitToDivider` panics on an unknown unit (an override's UNKNOWN): not a RedisError
        // or serviceError, so the real server crashes; this one answers the call with an error.
        let divider = unit_to_divider(limit.unit).unwrap_or(1);
        key + &((now / divider) * divider).to_string()
    }

    /// `ShouldRateLimit` → `shouldRateLimitWorker` → `DoLimit`.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<(RateLimitResponse, Vec<Observed>), Status> {
        if req.domain.is_empty() {
            return Err(Status::unknown("rate limit domain must not be empty"));
        }
        if req.descriptors.is_empty() {
            return Err(Status::unknown(
                "rate limit descriptor list must not be empty",
            ));
        }
        let (limits, unlimited) = self.limits_to_check(req);
        if limits
            .iter()
            .flatten()
            .any(|l| unit_to_divider(l.unit).is_none())
        {
            return Err(Status::unknown("should not get here"));
        }
        // `GetHitsAddends`.
        let hits: Vec<u64> = req
            .descriptors
            .iter()
            .map(|d| match &d.hits_addend {
                Some(h) => h.value,
                None => u64::from(req.hits_addend.max(1)),
            })
            .collect();
        // `DoLimit`: the keys, then one pipeline of INCRBY + EXPIRE per key.
        let now = now();
        let keys: Vec<Option<String>> = req
            .descriptors
            .iter()
            .zip(&limits)
            .map(|(d, l)| l.as_ref().map(|l| self.cache_key(&req.domain, d, l, now)))
            .collect();
        let mut pipe = redis::pipe();
        let mut counted = 0;
        for ((key, limit), hits) in keys.iter().zip(&limits).zip(&hits) {
            let (Some(key), Some(limit)) = (key, limit) else {
                continue;
            };
            let mut expiration = unit_to_divider(limit.unit).unwrap_or(1);
            if self.jitter_max_seconds > 0 {
                // `JitterRand.Int63n(ExpirationJitterMaxSeconds)`.
                expiration +=
                    (RandomState::new().hash_one(key) % self.jitter_max_seconds as u64) as i64;
            }
            pipe.cmd("INCRBY").arg(key).arg(*hits);
            pipe.cmd("EXPIRE").arg(key).arg(expiration).ignore();
            counted += 1;
        }
        let mut results = Vec::new();
        if counted > 0 {
            let mut con = self.redis.clone();
            // `checkError` panics with a `RedisError(err.Error())`; `ShouldRateLimit` returns it
            // as the call's error, which grpc-go sends as UNKNOWN with that text.
            let values: Vec<i64> = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| Status::unknown(e.to_string()))?;
            results = values;
        }
        let mut results = results.into_iter();
        let mut observed = Vec::new();
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for (i, key) in keys.iter().enumerate() {
            // `GetResponseDescriptorStatus`.
            let s = match (key, &limits[i]) {
                (Some(key), Some(limit)) => {
                    let after = results.next().unwrap_or(0) as u64;
                    let threshold = u64::from(limit.requests_per_unit);
                    let over = after > threshold;
                    observed.push(Observed {
                        key: key.clone(),
                        hits: hits[i],
                        over_limit: over,
                        after,
                    });
                    if over {
                        status(Code::OverLimit, Some(limit), 0)
                    } else {
                        status(Code::Ok, Some(limit), (threshold - after) as u32)
                    }
                }
                _ => status(Code::Ok, None, 0),
            };
            statuses.push(s);
        }
        // `shouldRateLimitWorker`.
        let mut min_remaining = u32::MAX;
        let mut minimum: Option<usize> = None;
        let mut over_limit = 0;
        for (i, s) in statuses.iter_mut().enumerate() {
            if self.headers && s.current_limit.is_some() && s.limit_remaining < min_remaining {
                minimum = Some(i);
                min_remaining = s.limit_remaining;
            }
            if unlimited[i] {
                *s = DescriptorStatus {
                    code: Code::Ok.into(),
                    limit_remaining: u32::MAX,
                    ..DescriptorStatus::default()
                };
            } else if s.code == i32::from(Code::OverLimit) {
                over_limit += 1;
                minimum = Some(i);
                min_remaining = 0;
            }
        }
        let mut response = RateLimitResponse {
            overall_code: if over_limit > 0 {
                Code::OverLimit
            } else {
                Code::Ok
            }
            .into(),
            ..RateLimitResponse::default()
        };
        if self.headers
            && let Some(i) = minimum
        {
            let s = &statuses[i];
            let limit = s.current_limit.as_ref();
            let header = |key: &str, value: String| HeaderValue {
                key: key.to_string(),
                value,
                ..HeaderValue::default()
            };
            response.response_headers_to_add = vec![
                header(
                    "RateLimit-Limit",
                    limit.map_or(0, |l| l.requests_per_unit).to_string(),
                ),
                header("RateLimit-Remaining", s.limit_remaining.to_string()),
                header(
                    "RateLimit-Reset",
                    limit
                        .and_then(|l| reset(l.unit))
                        .map_or(0, |d| d.seconds)
                        .to_string(),
                ),
            ];
        }
        response.statuses = statuses;
        Ok((response, observed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;

    const YAML: &str = "domain: tollgate
descriptors:
  - key: tollgate.policy
    value: \"g\"
    descriptors:
      - key: tollgate.limit
        value: \"tpm\"
        descriptors:
          - key: tollgate.scope
            descriptors:
              - key: tollgate.window
                rate_limit:
                  unit: minute
                  requests_per_unit: 4000
  - key: free
    rate_limit:
      unlimited: true
  - key: path
    value: \"/api/*\"
    rate_limit:
      unit: second
      requests_per_unit: 3
";

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        }
    }

    #[test]
    fn nested_descriptors_match_at_their_depth_only() {
        let config = Config::load(&[("c.yaml".into(), YAML.into())]).unwrap();
        let full = descriptor(&[
            ("tollgate.policy", "g"),
            ("tollgate.limit", "tpm"),
            ("tollgate.scope", "g"),
            ("tollgate.window", "2026-11-28T07:05"),
        ]);
        let limit = config.get_limit("tollgate", &full).unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (4000, 2));
        assert_eq!(config.get_limit("other", &full), None);
        let short = descriptor(&[("tollgate.policy", "g"), ("tollgate.limit", "tpm")]);
        assert_eq!(config.get_limit("tollgate", &short), None);
        let other = descriptor(&[("tollgate.policy", "h"), ("tollgate.limit", "tpm")]);
        assert_eq!(config.get_limit("tollgate", &other), None);
        assert!(
            config
                .get_limit("tollgate", &descriptor(&[("free", "x")]))
                .unwrap()
                .unlimited
        );
        let wild = config.get_limit("tollgate", &descriptor(&[("path", "/api/v1")]));
        assert_eq!(wild.unwrap().requests_per_unit, 3);
        assert_eq!(
            config.get_limit("tollgate", &descriptor(&[("path", "/x")])),
            None
        );
    }

    #[test]
    fn the_server_s_configuration_errors() {
        let load = |y: &str| Config::load(&[("c.yaml".into(), y.into())]).map(|_| ());
        assert!(load("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute, requests_per_unit: 1}\n  - key: a\n").unwrap_err().contains("duplicate descriptor composite key 'd.a'"));
        assert!(
            load("domain: d\nbogus: 1\n")
                .unwrap_err()
                .contains("unknown key 'bogus'")
        );
        assert!(
            load("descriptors: []\n")
                .unwrap_err()
                .contains("empty domain")
        );
        assert!(load("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n").unwrap_err().contains("invalid rate limit unit"));
        assert!(load("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: day, unlimited: true}\n").unwrap_err().contains("unlimited"));
    }

    #[test]
    fn wildcards_as_the_server_matches_them() {
        let parts = |p: &str| p.split('*').map(str::to_string).collect::<Vec<_>>();
        assert!(wildcard_match(&parts("path_/a*"), "path_/a/b"));
        assert!(wildcard_match(&parts("path_/a*c*e"), "path_/abcde"));
        assert!(!wildcard_match(&parts("path_/a*c*e"), "path_/abde"));
        assert!(!wildcard_match(&parts("ab*ba"), "aba"));
    }
}
