//! Envoy's HTTP callbacks, mapped onto the core: classify the path, identify the tenant, read the
//! request body, watch the response for usage, write the per-request record.

use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host;
use crate::api::ApiKind;
use crate::api::request::parse_request;
use crate::config::Config;
use crate::exchange::Exchange;
use crate::reply::Refusal;
use crate::tenant::{API_KEY_HEADERS, TenantSource};

enum State {
    /// Not an LLM request (or no configuration): Tollgate stays out of the way.
    PassThrough,
    /// Identified, waiting for the whole request body.
    AwaitingBody { kind: ApiKind, tenant: String },
    /// Admitted; the response is being watched.
    Active(Box<Exchange>),
    /// Answered locally; `reason` goes to the record.
    Refused {
        kind: ApiKind,
        tenant: Option<String>,
        reason: &'static str,
    },
}

pub struct TollgateHttp {
    config: Option<Rc<Config>>,
    state: State,
    recorded: bool,
}

impl TollgateHttp {
    pub fn new(config: Option<Rc<Config>>) -> TollgateHttp {
        TollgateHttp {
            config,
            state: State::PassThrough,
            recorded: false,
        }
    }

    fn identify(config: &Config) -> Result<String, Refusal> {
        let identity = &config.identity;
        let found = match &identity.source {
            TenantSource::Header(name) => {
                identity.resolve_value(host::request_header(name).as_deref())
            }
            TenantSource::Metadata(path) => identity.resolve_value(host::property(path).as_deref()),
            TenantSource::ApiKey(_) => {
                let [a, b, c] = API_KEY_HEADERS.map(host::request_header);
                identity.resolve_api_key([a.as_deref(), b.as_deref(), c.as_deref()])
            }
        };
        found.map_err(|why| Refusal::Unauthenticated {
            message: why.message().to_string(),
        })
    }

    /// Sends the refusal and remembers it for the record.
    fn refuse(&mut self, kind: ApiKind, tenant: Option<String>, refusal: &Refusal) -> Action {
        let reply = refusal.reply(kind.family());
        debug!(
            "tollgate refuses {} request: {}",
            kind.as_str(),
            reply.reason
        );
        if let Err(status) = host::send_reply(&reply) {
            warn!("tollgate could not send its local reply: {status:?}");
        }
        self.state = State::Refused {
            kind,
            tenant,
            reason: reply.reason,
        };
        Action::Pause
    }

    /// Writes the per-request record to filter state, once.
    fn write_record(&mut self) {
        if self.recorded {
            return;
        }
        let fields = match &mut self.state {
            State::PassThrough | State::AwaitingBody { .. } => return,
            State::Active(exchange) => {
                let mut fields = exchange.record();
                fields.push(("tollgate.decision", "admitted".to_string()));
                fields
            }
            State::Refused {
                kind,
                tenant,
                reason,
            } => {
                let mut fields = vec![
                    ("tollgate.api", kind.as_str().to_string()),
                    ("tollgate.decision", (*reason).to_string()),
                ];
                if let Some(tenant) = tenant {
                    fields.push(("tollgate.tenant", tenant.clone()));
                }
                fields
            }
        };
        self.recorded = true;
        for (name, value) in fields {
            if let Err(status) = host::set_record_field(name, value.as_bytes()) {
                warn!("tollgate could not write {name}: {status:?}");
            }
        }
    }
}

impl Context for TollgateHttp {}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let Some(kind) = host::request_header(":path").and_then(|p| ApiKind::from_path(&p)) else {
            return Action::Continue;
        };
        if host::request_header(":method").as_deref() != Some(b"POST") {
            return Action::Continue;
        }
        let tenant = match Self::identify(&config) {
            Ok(tenant) => tenant,
            Err(refusal) => return self.refuse(kind, None, &refusal),
        };
        let limit = config.limits.max_request_body_bytes;
        let declared_length = host::request_header("content-length")
            .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > limit) {
            return self.refuse(kind, Some(tenant), &Refusal::TooLarge { limit });
        }
        if end_of_stream {
            let refusal = Refusal::BadRequest {
                param: None,
                message: "The request has no body; a JSON body is required.".into(),
            };
            return self.refuse(kind, Some(tenant), &refusal);
        }
        // Usage is read from the response: ask for it uncompressed (gzip is still decoded
        // when an upstream ignores this).
        if let Err(status) = host::set_request_header("accept-encoding", Some(b"identity")) {
            warn!("tollgate could not set accept-encoding: {status:?}");
        }
        self.state = State::AwaitingBody { kind, tenant };
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let State::AwaitingBody { kind, tenant } = &self.state else {
            return Action::Continue;
        };
        let (kind, tenant) = (*kind, tenant.clone());
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let limit = config.limits.max_request_body_bytes;
        if u64::try_from(body_size).unwrap_or(u64::MAX) > limit {
            return self.refuse(kind, Some(tenant), &Refusal::TooLarge { limit });
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::request_body(body_size).unwrap_or_default();
        match parse_request(kind, &body) {
            Ok(facts) => {
                self.state =
                    State::Active(Box::new(Exchange::new(kind, tenant, facts, config.limits)));
                Action::Continue
            }
            Err(err) => {
                let refusal = Refusal::BadRequest {
                    param: err.param,
                    message: err.message,
                };
                self.refuse(kind, Some(tenant), &refusal)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if let State::Active(exchange) = &mut self.state {
            let status = host::response_header(":status")
                .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
                .unwrap_or(0);
            let content_type = host::response_header("content-type");
            let content_encoding = host::response_header("content-encoding");
            exchange.on_response_headers(
                status,
                content_type.as_deref(),
                content_encoding.as_deref(),
            );
            if end_of_stream {
                exchange.on_response_complete();
                self.write_record();
            }
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let State::Active(exchange) = &mut self.state {
            if exchange.wants_response_body()
                && let Some(chunk) = host::response_body(body_size)
            {
                exchange.on_response_body(&chunk);
            }
            if end_of_stream {
                exchange.on_response_complete();
                self.write_record();
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Aborted streams and upstream resets never see end_of_stream: settle them here.
        self.write_record();
    }
}
