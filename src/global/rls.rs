//! Envoy's rate limit service, v3: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//!
//! The messages are declared here with `prost`, field for field from Envoy's
//! `envoy/service/ratelimit/v3/rls.proto`, `envoy/extensions/common/ratelimit/v3/ratelimit.proto`
//! and `envoy/config/core/v3/grpc_service.proto`, keeping only the fields Tollgate writes or
//! reads: prost skips the others when decoding. Enums are their `int32` wire values.
//! `proto/` keeps Envoy's files, copied unchanged; a test checks every field declared here
//! against them.

use prost::Message;

use super::{Answer, LeaseProtocol};

/// Envoy's RLS v3, as Limitador and envoyproxy/ratelimit serve it.
pub struct Rls;

impl LeaseProtocol for Rls {
    fn method(&self) -> (&'static str, &'static str) {
        (SERVICE, METHOD)
    }

    fn ask(&self, domain: &str, entries: &[(&str, String)], hits: u32) -> Vec<u8> {
        encode_request(domain, entries, hits)
    }

    fn answer(&self, bytes: &[u8]) -> Option<Answer> {
        decode_response(bytes)
    }
}

/// The gRPC service and method, as `dispatch_grpc_call` names them.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.service.ratelimit.v3.RateLimitRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    /// The hits this call adds (0 means 1 to both servers).
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor` (its `limit` override and
/// per-descriptor `hits_addend` are not used: Limitador ignores both).
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor.Entry`.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    /// `Code`: 0 UNKNOWN, 1 OK, 2 OVER_LIMIT.
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
    #[prost(message, repeated, tag = "3")]
    pub response_headers_to_add: Vec<HeaderValue>,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, Message)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `envoy.config.core.v3.GrpcService`, its `envoy_grpc` target only.
#[derive(Clone, PartialEq, Message)]
pub struct GrpcService {
    #[prost(message, optional, tag = "1")]
    pub envoy_grpc: Option<EnvoyGrpc>,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, Message)]
pub struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    pub cluster_name: String,
    #[prost(string, tag = "2")]
    pub authority: String,
}

/// What `dispatch_grpc_call` is given to reach `cluster`. Envoy reads the target as a
/// serialized `GrpcService` when it parses as one, else as a cluster name whose calls carry
/// the name as `:authority`. An Istio cluster name (`outbound|PORT|SUBSET|HOST`) is no valid
/// authority (HTTP/2 servers, Limitador's among them, reset the stream), so for a name with a
/// `|` the target is a `GrpcService` naming the cluster, with HOST as the authority. `None`
/// when that message is not UTF-8 text, which the SDK's `&str` needs: its length prefixes
/// stay ASCII only while the name and the host fit in 123 bytes together.
pub fn grpc_target(cluster: &str) -> Option<String> {
    let Some((_, host)) = cluster.rsplit_once('|') else {
        return Some(cluster.to_string());
    };
    let service = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_string(),
            authority: host.to_string(),
        }),
    };
    String::from_utf8(service.encode_to_vec()).ok()
}

const OK: i32 = 1;
const OVER_LIMIT: i32 = 2;

/// One refill: `hits` on the counter named by `entries`.
pub fn encode_request(domain: &str, entries: &[(&str, String)], hits: u32) -> Vec<u8> {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: (*key).to_string(),
                    value: value.clone(),
                })
                .collect(),
        }],
        hits_addend: hits,
    }
    .encode_to_vec()
}

/// Reads a `RateLimitResponse`; `None` when the bytes are not one, or the code is UNKNOWN
/// (what Limitador answers to an empty domain): neither grants anything.
pub fn decode_response(bytes: &[u8]) -> Option<Answer> {
    let response = RateLimitResponse::decode(bytes).ok()?;
    let granted = match response.overall_code {
        OK => true,
        OVER_LIMIT => false,
        _ => return None,
    };
    let status = response
        .statuses
        .first()
        .filter(|s| s.current_limit.is_some());
    let header = |name: &str| {
        response
            .response_headers_to_add
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .and_then(|h| h.value.trim().parse::<u64>().ok())
    };
    let remaining = match status {
        Some(s) => Some(u64::from(s.limit_remaining)),
        None => header("x-ratelimit-remaining"),
    };
    let reset_ms = match status.and_then(|s| s.duration_until_reset) {
        Some(d) => Some(
            u64::try_from(d.seconds)
                .unwrap_or(0)
                .saturating_mul(1000)
                .saturating_add(u64::try_from(d.nanos).unwrap_or(0) / 1_000_000),
        ),
        None => header("x-ratelimit-reset").map(|s| s.saturating_mul(1000)),
    };
    Some(Answer {
        granted,
        remaining,
        reset_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field declared above, as Envoy's files in `proto/` declare it (type, name, tag).
    #[test]
    fn the_messages_match_envoys_protos() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let rls = squash(include_str!(
            "../../proto/envoy/service/ratelimit/v3/rls.proto"
        ));
        let descriptor = squash(include_str!(
            "../../proto/envoy/extensions/common/ratelimit/v3/ratelimit.proto"
        ));
        for declared in [
            "string domain = 1;",
            "repeated envoy.extensions.common.ratelimit.v3.RateLimitDescriptor descriptors = 2;",
            "uint32 hits_addend = 3",
            "Code overall_code = 1;",
            "repeated DescriptorStatus statuses = 2;",
            "repeated config.core.v3.HeaderValue response_headers_to_add = 3;",
            "Code code = 1;",
            "RateLimit current_limit = 2;",
            "uint32 limit_remaining = 3;",
            "google.protobuf.Duration duration_until_reset = 4;",
            "uint32 requests_per_unit = 1;",
            "Unit unit = 2;",
            "string name = 3;",
            "OK = 1;",
            "OVER_LIMIT = 2;",
        ] {
            assert!(rls.contains(declared), "rls.proto: {declared}");
        }
        let grpc = squash(include_str!(
            "../../proto/envoy/config/core/v3/grpc_service.proto"
        ));
        for declared in [
            "EnvoyGrpc envoy_grpc = 1;",
            "string cluster_name = 1",
            "string authority = 2",
        ] {
            assert!(grpc.contains(declared), "grpc_service.proto: {declared}");
        }
        for declared in [
            "repeated Entry entries = 1",
            "string key = 1",
            "string value = 2",
        ] {
            assert!(descriptor.contains(declared), "ratelimit.proto: {declared}");
        }
        assert_eq!((OK, OVER_LIMIT), (1, 2));
    }

    #[test]
    fn an_istio_cluster_is_reached_with_its_host_as_the_authority() {
        assert_eq!(grpc_target("ratelimit").as_deref(), Some("ratelimit"));
        let istio = "outbound|8081||limitador.tollgate-budgets.svc.cluster.local";
        let target = grpc_target(istio).unwrap();
        let service = GrpcService::decode(target.as_bytes()).unwrap();
        let envoy = service.envoy_grpc.unwrap();
        assert_eq!(envoy.cluster_name, istio);
        assert_eq!(
            envoy.authority,
            "limitador.tollgate-budgets.svc.cluster.local"
        );
        // The longest that stays text: 123 bytes of name and host together.
        let fits = format!("outbound|1||{}", "h".repeat(55));
        assert_eq!(fits.len() + 55, 122);
        assert!(grpc_target(&fits).is_some());
        let long = format!("outbound|1||{}", "h".repeat(70));
        assert_eq!(grpc_target(&long), None);
    }

    #[test]
    fn a_refill_request_on_the_wire() {
        let bytes = encode_request("tg", &[("k", "v".to_string())], 300);
        // domain (1), one descriptor (2) with one entry (1: key, 2: value), hits_addend (3).
        let expected = [
            0x0a, 2, b't', b'g', 0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 0xac, 0x02,
        ];
        assert_eq!(bytes, expected);
        let back = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.hits_addend, 300);
        assert_eq!(back.descriptors[0].entries[0].value, "v");
    }

    #[test]
    fn answers_from_either_engine() {
        // envoyproxy/ratelimit: a status naming the limit, its remaining and reset.
        let ratelimit = RateLimitResponse {
            overall_code: OK,
            statuses: vec![DescriptorStatus {
                code: OK,
                current_limit: Some(RateLimit {
                    requests_per_unit: 1000,
                    unit: 2,
                    name: String::new(),
                }),
                limit_remaining: 700,
                duration_until_reset: Some(Duration {
                    seconds: 12,
                    nanos: 500_000_000,
                }),
            }],
            response_headers_to_add: vec![],
        };
        assert_eq!(
            decode_response(&ratelimit.encode_to_vec()),
            Some(Answer {
                granted: true,
                remaining: Some(700),
                reset_ms: Some(12_500)
            })
        );
        // Limitador: no statuses; with DRAFT_VERSION_03 headers.
        let limitador = RateLimitResponse {
            overall_code: OVER_LIMIT,
            statuses: vec![],
            response_headers_to_add: vec![
                HeaderValue {
                    key: "X-RateLimit-Limit".into(),
                    value: "10, 10;w=60".into(),
                },
                HeaderValue {
                    key: "X-RateLimit-Remaining".into(),
                    value: "2".into(),
                },
                HeaderValue {
                    key: "X-RateLimit-Reset".into(),
                    value: "59".into(),
                },
            ],
        };
        assert_eq!(
            decode_response(&limitador.encode_to_vec()),
            Some(Answer {
                granted: false,
                remaining: Some(2),
                reset_ms: Some(59_000)
            })
        );
        // Without headers nothing is known but the verdict.
        let bare = RateLimitResponse {
            overall_code: OK,
            statuses: vec![],
            response_headers_to_add: vec![],
        };
        let answer = decode_response(&bare.encode_to_vec()).unwrap();
        assert_eq!(
            (answer.granted, answer.remaining, answer.reset_ms),
            (true, None, None)
        );
        // UNKNOWN, and bytes that are no response, grant nothing.
        assert_eq!(decode_response(&[0x08, 0x00]), None);
        assert_eq!(decode_response(&[0xff, 0xff, 0xff]), None);
        assert_eq!(decode_response(&[]), None);
    }
}
