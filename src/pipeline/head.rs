//! The request headers: which API, which tenant, whether the body may come (and the usage view).

use super::{Effects, Gateway, Headers, Host, Request, State, buffered};
use crate::api::{Family, dialect};
use crate::ledger::Fact;
use crate::metrics::LabelId;
use crate::reply::{LocalReply, Refusal};
use crate::tenant::{KeyDigest, TenantSource, bearer_token};
use crate::view;

impl Request {
    /// Records the request's method, path (`scrubbed`: with a Gemini `?key=` cut) and client
    /// request id.
    fn seen_request(&mut self, headers: &Headers, scrubbed: Option<&[u8]>) {
        let text = |v: &[u8]| Fact::Text(String::from_utf8_lossy(v).into_owned());
        if let Some(method) = headers.get(":method") {
            self.seen.push(("tollgate.method", text(method)));
        }
        if let Some(path) = scrubbed.or_else(|| headers.get(":path")) {
            self.seen_path(path);
        }
        if let Some(id) = headers.get("x-request-id") {
            self.seen.push(("tollgate.client_request_id", text(id)));
        }
    }

    /// Records `path` as the request's (the path Envoy forwards: set again when Tollgate
    /// rewrites it).
    pub(super) fn seen_path(&mut self, path: &[u8]) {
        let path = Fact::Text(String::from_utf8_lossy(path).into_owned());
        match self
            .seen
            .iter_mut()
            .find(|(name, _)| *name == "tollgate.path")
        {
            Some((_, fact)) => *fact = path,
            None => self.seen.push(("tollgate.path", path)),
        }
    }

    /// The request headers arrived. An LLM POST from a known tenant waits for its body (the
    /// client's routing header is dropped, an uncompressed response asked for); everything else
    /// passes through or is answered here.
    pub fn on_request_headers<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        headers: Headers,
        end_of_stream: bool,
    ) -> Effects<'g> {
        let config = &gateway.config;
        #[cfg(feature = "test-trap")]
        {
            self.trap = headers.get("x-tollgate-test-trap").is_some();
        }
        let path = headers.get(":path");
        let kind = path.and_then(dialect::classify).map(|call| call.kind);
        // Gemini's `?key=`: read as a credential, and cut from `:path` before anything can log
        // or forward it (first, so no ledger line shows it, whatever the method).
        let taken = kind
            .filter(|kind| kind.dialect().query_key())
            .zip(path)
            .and_then(|(_, path)| dialect::take_query_key(path));
        self.seen_request(&headers, taken.as_ref().map(|(clean, _)| clean.as_slice()));
        let Some(path) = path else {
            return Effects::proceed();
        };
        if let Some(view) = &config.usage_view
            && path.split(|b| *b == b'?').next() == Some(view.path.as_bytes())
        {
            return self.serve_usage_view(gateway, host, &headers);
        }
        let Some(kind) = kind else {
            return Effects::proceed();
        };
        if headers.get(":method") != Some(b"POST") {
            return Effects::proceed();
        }
        let mut headers = headers;
        let mut query_keys = Vec::new();
        let mut scrubbed = None;
        if let Some((clean, keys)) = taken {
            query_keys = keys;
            headers.apply(&[(":path", Some(clean.clone()))]);
            scrubbed = Some(clean);
        }
        let tenant = match identify(gateway, host, &headers, &query_keys) {
            Ok(tenant) => tenant,
            Err(refusal) => {
                let mut effects = self.refuse(kind, None, None, &refusal);
                effects.header_map = scrubbed.map(|_| headers);
                return effects;
            }
        };
        let label = config.labels.tenant_id(&tenant);
        let limit = config.limits.max_request_body_bytes;
        let declared_length = headers
            .get("content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        if declared_length.is_some_and(|len| len > limit) {
            let mut effects = self.refuse(
                kind,
                Some((tenant, label)),
                None,
                &Refusal::TooLarge { limit },
            );
            effects.header_map = scrubbed.map(|_| headers);
            return effects;
        }
        if end_of_stream {
            let refusal = Refusal::BadRequest {
                param: None,
                message: "The request has no body; a JSON body is required.".into(),
            };
            let mut effects = self.refuse(kind, Some((tenant, label)), None, &refusal);
            effects.header_map = scrubbed.map(|_| headers);
            return effects;
        }
        // A client must never pick the cluster. With routing, Tollgate sets the routing header
        // itself once the body is read (and makes Envoy match again); without, it goes now.
        let mut effects = Effects::pause();
        if let Some(clean) = scrubbed {
            effects.headers.push((":path", Some(clean)));
        }
        if config.routing.is_none() {
            effects.headers.push(("x-tollgate-route", None));
        }
        headers.apply(&effects.headers);
        self.state = State::AwaitingBody {
            kind,
            tenant,
            label,
            headers,
        };
        effects
    }

    /// The request body so far: refuses it past the cap, waits for its end, then decides.
    /// `read_body` reads the whole buffered body (called once, at the end).
    pub fn on_request_body<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        body_size: usize,
        end_of_stream: bool,
        read_body: impl FnOnce() -> Vec<u8>,
    ) -> Effects<'g> {
        let State::AwaitingBody { kind, .. } = &self.state else {
            return Effects::proceed();
        };
        let kind = *kind;
        let limits = &gateway.config.limits;
        let size = u64::try_from(body_size).unwrap_or(u64::MAX);
        if size > limits.max_request_body_bytes {
            let tenant = self.take_tenant();
            let limit = limits.max_request_body_bytes;
            return self.refuse(kind, tenant, None, &Refusal::TooLarge { limit });
        }
        let hold = self
            .hold
            .get_or_insert_with(|| buffered::BodyHold::new(&gateway.buffered));
        if !hold.grow(size, limits.max_buffered_request_bytes) {
            self.hold = None;
            let tenant = self.take_tenant();
            let refusal = Refusal::RateLimited {
                message: "This gateway is buffering too many request bytes at once; please retry."
                    .into(),
                retry_after_secs: 1,
                kind: "requests",
            };
            return self.refuse(kind, tenant, None, &refusal);
        }
        if !end_of_stream {
            return Effects::pause();
        }
        let State::AwaitingBody {
            kind,
            tenant,
            label,
            headers,
        } = std::mem::take(&mut self.state)
        else {
            return Effects::proceed();
        };
        let effects = self.admit(gateway, host, kind, (tenant, label), headers, read_body());
        self.release_body_hold();
        effects
    }

    fn take_tenant(&mut self) -> Option<(String, LabelId)> {
        match std::mem::take(&mut self.state) {
            State::AwaitingBody { tenant, label, .. } => Some((tenant, label)),
            _ => None,
        }
    }

    /// The usage view: `GET <usage_view.path>` with `Authorization: Bearer <admin token>` (the
    /// scheme case-insensitive, as for API keys).
    /// Other methods get 405 (`allow: GET`), whatever the token.
    fn serve_usage_view<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        headers: &Headers,
    ) -> Effects<'g> {
        let config = &gateway.config;
        let is_get = headers.get(":method") == Some(b"GET");
        let authorized = config.usage_view.as_ref().is_some_and(|v| {
            headers
                .get("authorization")
                .and_then(bearer_token)
                .is_some_and(|token| KeyDigest::of_key(token) == v.token)
        });
        let reply = if !is_get {
            Refusal::MethodNotAllowed { allow: "GET" }.reply(Family::OpenAi)
        } else if authorized {
            LocalReply {
                status: 200,
                headers: vec![("content-type", "application/json".to_string())],
                body: view::render(host, config, host.now_ms()),
                reason: "usage_view",
            }
        } else {
            Refusal::Unauthenticated {
                message: "The usage view needs its admin token.".into(),
            }
            .reply(Family::OpenAi)
        };
        self.state = State::Answered(vec![("tollgate.decision", reply.reason.into())]);
        Effects::reply(reply)
    }
}

/// Who is asking, by the configured source.
fn identify<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    headers: &Headers,
    query_keys: &[Vec<u8>],
) -> Result<String, Refusal> {
    let identity = &gateway.config.identity;
    let found = match &identity.source {
        TenantSource::Header(name) => identity.resolve_value(headers.get(name)),
        TenantSource::Metadata(path) => identity.resolve_value(host.property(path).as_deref()),
        TenantSource::ApiKey(_) => {
            let entries = headers.0.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
            let query = query_keys.iter().map(|k| ("x-goog-api-key", k.as_slice()));
            identity.resolve_api_key(entries.chain(query))
        }
    };
    found.map_err(|why| Refusal::Unauthenticated {
        message: why.message().to_string(),
    })
}
