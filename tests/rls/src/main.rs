//! A test rate limit service: Envoy's RLS v3 `ShouldRateLimit`, answered by one of two engines
//! over Redis.
//!
//! `--engine limitador` (the default): Limitador's library (`limitador` 0.14), the way
//! `limitador-server`'s RLS endpoint answers:
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
//! `--engine ratelimit --config FILE` (repeatable, one file per domain): envoyproxy/ratelimit
//! with its Redis fixed-window cache, see `ratelimit.rs` for what it follows; with
//! `--response-headers` its `RateLimit-*` headers (`LIMIT_RESPONSE_HEADERS_ENABLED`);
//! `--expiration-jitter-max-seconds N` (default 300) and `--cache-key-prefix P` (default "") are
//! its settings of the same names.
//!
//! Usage: `tollgate-test-rls [--engine limitador] --limits FILE --redis URL --port-file FILE
//! [--port N] [--rate-limit-headers DRAFT_VERSION_03] [--grants-log FILE]`, or
//! `tollgate-test-rls --engine ratelimit --config FILE --redis URL --port-file FILE [--port N]
//! [--response-headers] [--grants-log FILE]`. It binds 127.0.0.1 (on a free port without
//! `--port`) and writes the port to the port file.
//!
//! `--grants-log FILE` is observation only, which neither real server has: every answered call
//! appends one line per counted descriptor, `code<TAB>hits<TAB>counter after (or -)<TAB>key`
//! (`OK` or `OVER_LIMIT`; for Limitador the key is the domain and the entries, for ratelimit its
//! Redis cache key), written before the answer is sent, so a test can tell what the service
//! granted from what it counted. It changes no answer.
//!
//! Two faults, for tests of a slow or lying service (neither real server has them):
//! `--delay-file FILE`: each call first sleeps the milliseconds FILE holds (absent or empty:
//! none; read per call, so a test turns it on and off), then counts and answers, so a caller
//! whose deadline passed meanwhile has its hits counted all the same (a slow Redis).
//! `--claim-remaining N`: every answer says N remaining (each descriptor status's
//! `limit_remaining` and any `X-RateLimit-Remaining` header), whatever the counter holds.

mod ratelimit;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

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

enum Engine {
    Limitador {
        limiter: Arc<AsyncRateLimiter>,
        headers: bool,
    },
    Ratelimit(Box<ratelimit::Engine>),
}

struct Service {
    engine: Engine,
    /// `--grants-log`: observation only.
    grants: Option<Mutex<std::fs::File>>,
    /// `--delay-file`: the delay before counting, read per call.
    delay_file: Option<String>,
    /// `--claim-remaining`: the remaining every answer says.
    claim_remaining: Option<u32>,
}

impl Service {
    fn observe(&self, lines: &[(bool, u64, Option<u64>, String)]) {
        let Some(file) = &self.grants else { return };
        let mut text = String::new();
        for (over, hits, after, key) in lines {
            let code = if *over { "OVER_LIMIT" } else { "OK" };
            let after = after.map_or("-".to_string(), |a| a.to_string());
            text += &format!("{code}\t{hits}\t{after}\t{key}\n");
        }
        if let Ok(mut f) = file.lock() {
            let _ = f.write_all(text.as_bytes());
        }
    }

    async fn limitador(
        &self,
        limiter: &AsyncRateLimiter,
        headers: bool,
        req: RateLimitRequest,
    ) -> Result<Response<RateLimitResponse>, Status> {
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
        let hits_addend = if req.hits_addend == 0 {
            1
        } else {
            req.hits_addend
        } as u64;
        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_string(), values);
        let observed_key = self.grants.is_some().then(|| {
            let descriptors: Vec<String> = req
                .descriptors
                .iter()
                .map(|d| {
                    let entries: Vec<String> = d
                        .entries
                        .iter()
                        .map(|e| format!("{}={}", e.key, e.value))
                        .collect();
                    entries.join(",")
                })
                .collect();
            format!("{}:{}", req.domain, descriptors.join(";"))
        });
        let namespace = req.domain.into();
        let checked = limiter
            .check_rate_limited_and_update(&namespace, &ctx, hits_addend)
            .await;
        let mut result = match checked {
            Ok(result) => result,
            Err(_) => return Err(Status::unavailable("Service unavailable")),
        };
        if let Some(key) = observed_key {
            self.observe(&[(result.limited, hits_addend, None, key)]);
        }
        let code = if result.limited {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let mut headers: Vec<HeaderValue> = match headers {
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

/// The gRPC handler: each call runs in a task of its own, which finishes (counts) even when the
/// caller gave up and tonic dropped the handler, as a slow Redis completes an increment.
struct Handler(Arc<Service>);

#[tonic::async_trait]
impl RateLimitService for Handler {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let service = self.0.clone();
        let req = request.into_inner();
        tokio::spawn(async move { service.call(req).await })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }
}

impl Service {
    async fn call(&self, req: RateLimitRequest) -> Result<Response<RateLimitResponse>, Status> {
        let delay = self
            .delay_file
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| text.trim().parse::<u64>().ok());
        if let Some(ms) = delay {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let mut response = self.answer(req).await?;
        if let Some(remaining) = self.claim_remaining {
            let body = response.get_mut();
            for status in &mut body.statuses {
                status.limit_remaining = remaining;
            }
            for header in &mut body.response_headers_to_add {
                if header.key.eq_ignore_ascii_case("x-ratelimit-remaining") {
                    header.value = remaining.to_string();
                }
            }
        }
        Ok(response)
    }

    async fn answer(&self, req: RateLimitRequest) -> Result<Response<RateLimitResponse>, Status> {
        match &self.engine {
            Engine::Limitador { limiter, headers } => self.limitador(limiter, *headers, req).await,
            Engine::Ratelimit(engine) => {
                let (response, observed) = engine.should_rate_limit(&req).await?;
                if self.grants.is_some() {
                    let lines: Vec<_> = observed
                        .into_iter()
                        .map(|o| (o.over_limit, o.hits, Some(o.after), o.key))
                        .collect();
                    self.observe(&lines);
                }
                Ok(Response::new(response))
            }
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

fn all_args(args: &[String], name: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == name)
        .map(|w| w[1].clone())
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let redis = arg(&args, "--redis").ok_or("--redis URL is required")?;
    let port_file = arg(&args, "--port-file").ok_or("--port-file FILE is required")?;
    let engine = match arg(&args, "--engine").as_deref() {
        None | Some("limitador") => {
            let limits_path = arg(&args, "--limits").ok_or("--limits FILE is required")?;
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
            Engine::Limitador {
                limiter: Arc::new(limiter),
                headers,
            }
        }
        Some("ratelimit") => {
            let mut files = Vec::new();
            for path in all_args(&args, "--config") {
                let text = std::fs::read_to_string(&path)?;
                files.push((path, text));
            }
            if files.is_empty() {
                return Err("--config FILE is required with --engine ratelimit".into());
            }
            let config = ratelimit::Config::load(&files)?;
            let jitter: i64 =
                arg(&args, "--expiration-jitter-max-seconds").map_or(Ok(300), |s| s.parse())?;
            let prefix = arg(&args, "--cache-key-prefix").unwrap_or_default();
            let headers = args.iter().any(|a| a == "--response-headers");
            Engine::Ratelimit(Box::new(
                ratelimit::Engine::new(config, &redis, jitter, prefix, headers).await?,
            ))
        }
        Some(other) => return Err(format!("unknown --engine {other}").into()),
    };
    let grants = match arg(&args, "--grants-log") {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
        None => None,
    };
    let port: u16 = arg(&args, "--port").map_or(Ok(0), |p| p.parse())?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    let tmp = format!("{port_file}.tmp");
    std::fs::write(&tmp, port.to_string())?;
    std::fs::rename(&tmp, &port_file)?;
    let delay_file = arg(&args, "--delay-file");
    let claim_remaining = arg(&args, "--claim-remaining")
        .map(|n| n.parse::<u32>())
        .transpose()?;
    let service = Service {
        engine,
        grants,
        delay_file,
        claim_remaining,
    };
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Handler(Arc::new(service))))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
