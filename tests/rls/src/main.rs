//! A test rate limit service: Envoy's RLS v3 `ShouldRateLimit` answered by Limitador's library
//! (`limitador` 0.14) over Redis, the way `limitador-server`'s RLS endpoint answers it:
//!
//! - the request's `domain` is the Limitador namespace; an empty domain answers `UNKNOWN` and
//!   touches nothing;
//! - every descriptor's entries become one map of the CEL list `descriptors`;
//! - the request-level `hits_addend` is the delta (0 counts as 1); per-descriptor `hits_addend`
//!   and `limit` overrides are ignored (limitador-server's protos do not have the former);
//! - `check_rate_limited_and_update` on `AsyncRedisStorage` (limitador-server's `redis`
//!   storage): a read, then an increment when admitted, so refusals count nothing;
//! - `OK` or `OVER_LIMIT`, no per-descriptor statuses; with `--rate-limit-headers
//!   DRAFT_VERSION_03` the `X-RateLimit-*` headers of the most restrictive counter, sorted by key;
//! - any limiter error is gRPC `UNAVAILABLE` "Service unavailable".
//!
//! Usage: `tollgate-test-rls --limits FILE --redis URL --port-file FILE [--port N]
//! [--rate-limit-headers DRAFT_VERSION_03]`. It binds 127.0.0.1 (on a free port without `--port`)
//! and writes the port to the port file.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::AsyncRateLimiter;
use limitador::limit::{Context, Limit};
use limitador::storage::redis::AsyncRedisStorage;
use tonic::{Request, Response, Status};

struct Service {
    limiter: Arc<AsyncRateLimiter>,
    headers: bool,
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        if req.domain.is_empty() {
            return Ok(Response::new(RateLimitResponse {
                overall_code: Code::Unknown.into(),
                ..RateLimitResponse::default()
            }));
        }
        let values: Vec<HashMap<String, String>> = req
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.clone()))
                    .collect()
            })
            .collect();
        let hits_addend = if req.hits_addend == 0 { 1 } else { req.hits_addend } as u64;
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_string(), values);
        let namespace = req.domain.into();
        let checked = self
            .limiter
            .check_rate_limited_and_update(&namespace, &ctx, hits_addend)
            .await;
        let mut result = match checked {
            Ok(result) => result,
            Err(_) => return Err(Status::unavailable("Service unavailable")),
        };
        let code = if result.limited { Code::OverLimit } else { Code::Ok };
        let mut headers: Vec<HeaderValue> = match self.headers {
            true => result
                .response_header()
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key,
                    value,
                    ..HeaderValue::default()
                })
                .collect(),
            false => Vec::new(),
        };
        headers.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Response::new(RateLimitResponse {
            overall_code: code.into(),
            response_headers_to_add: headers,
            ..RateLimitResponse::default()
        }))
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let limits_path = arg(&args, "--limits").ok_or("--limits FILE is required")?;
    let redis = arg(&args, "--redis").ok_or("--redis URL is required")?;
    let port_file = arg(&args, "--port-file").ok_or("--port-file FILE is required")?;
    let headers = match arg(&args, "--rate-limit-headers").as_deref() {
        None | Some("NONE") => false,
        Some("DRAFT_VERSION_03") => true,
        Some(other) => return Err(format!("unknown --rate-limit-headers {other}").into()),
    };
    let limits: Vec<Limit> = serde_yaml::from_reader(std::fs::File::open(&limits_path)?)?;
    let storage = AsyncRedisStorage::new(&redis).await?;
    let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
    limiter
        .configure_with(limits)
        .await
        .map_err(|e| format!("limits: {e}"))?;
    let port: u16 = arg(&args, "--port").map_or(Ok(0), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let tmp = format!("{port_file}.tmp");
    std::fs::write(&tmp, port.to_string())?;
    std::fs::rename(&tmp, &port_file)?;
    let service = Service {
        limiter: Arc::new(limiter),
        headers,
    };
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
