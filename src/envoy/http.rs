//! Envoy's HTTP callbacks, mapped onto the core: classify the path, identify the tenant, read the
//! request body, admit it against the tenant's budgets, watch the response for usage, settle the
//! reservation exactly once and write the per-request record.

use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;

use log::{debug, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::{self, EnvoyStore};
use super::metrics;
use crate::admission::{self, Admitted, TenantKeys, TenantPolicy};
use crate::api::request::{RequestFacts, parse_request};
use crate::api::rewrite::{self, Edits};
use crate::api::{ApiKind, Family, Usage};
use crate::cache::{self, CacheKey, Hit, PendingKey};
use crate::config::{CachePolicy, Config};
use crate::cost;
use crate::exchange::{Exchange, record_fields};
use crate::metrics::{Counter, Histogram};
use crate::reply::{LocalReply, Refusal};
use crate::routing::{Draw, Resolved};
use crate::tenant::{API_KEY_HEADERS, KeyDigest, TenantSource};
use crate::{view, window};

enum State {
    /// Not an LLM request (or no configuration): Tollgate stays out of the way.
    PassThrough,
    /// Identified, waiting for the whole request body.
    AwaitingBody { kind: ApiKind, tenant: String },
    /// Admitted; the response is being watched.
    Active(Box<Active>),
    /// Answered locally; `reason` goes to the record.
    Refused {
        kind: ApiKind,
        tenant: Option<String>,
        model: Option<String>,
        reason: &'static str,
    },
    /// Answered by Tollgate itself (usage view, cache hit); the record is ready.
    Answered(Vec<(&'static str, String)>),
}

struct Active {
    /// The epoch this request was counted in flight in (`None`: it could not be counted).
    in_flight: Option<u64>,
    exchange: Exchange,
    admitted: Admitted,
    /// When the request was admitted (time to first token).
    started_ms: u64,
    first_byte_seen: bool,
    conversation: Option<String>,
    cache: CacheStatus,
}

/// What the response cache did with a request.
enum CacheStatus {
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
    fn rekey(&mut self, planned: Option<u64>, admitted: Option<u64>) {
        if planned == admitted {
            return;
        }
        if let CacheStatus::Miss(pending, key, _) | CacheStatus::Refresh(pending, key, _) = self {
            *key = pending.finish(admitted);
        }
    }

    fn as_str(&self) -> &'static str {
        match self {
            CacheStatus::Off => "",
            CacheStatus::Bypass => "bypass",
            CacheStatus::Miss(..) => "miss",
            CacheStatus::Refresh(..) => "store",
        }
    }
}

enum Lookup {
    Hit(Box<Hit>, CacheKey),
    Status(CacheStatus),
}

/// Decides whether the cache may answer this request, and looks it up. `max_tokens`: the
/// max-tokens value admission plans to send upstream (the key is of the upstream's request).
/// Host calls: none when the request is not eligible, else one (every request header: the
/// path, `cache-control` and the key headers) plus the lookup's shared-data reads.
#[allow(clippy::too_many_arguments)]
fn cache_lookup(
    config: &Config,
    kind: ApiKind,
    tenant: &str,
    requested: &str,
    served: &str,
    resolved: Option<&Resolved>,
    body: &[u8],
    max_tokens: Option<u64>,
    now: u64,
) -> Lookup {
    let Some(cache) = &config.cache else {
        return Lookup::Status(CacheStatus::Off);
    };
    let (policy, ttl, global) = cache.rule(kind, served);
    let eligible = match policy {
        CachePolicy::Always => true,
        CachePolicy::Deterministic => cache::deterministic(body),
        CachePolicy::Never => false,
    };
    if !eligible {
        return Lookup::Status(CacheStatus::Bypass);
    }
    let request = host::request_headers();
    let control = cache::header_value(&request, "cache-control").unwrap_or_default();
    if cache::has_directive(&control, b"no-store") {
        return Lookup::Status(CacheStatus::Bypass);
    }
    let path = cache::header_value(&request, ":path").unwrap_or_default();
    let headers = cache::key_header_values(&cache.key_headers, &request);
    let inputs = cache::KeyInputs {
        scope: if global { "global" } else { tenant },
        route: resolved.map_or("", |r| r.route.as_str()),
        upstream_model: resolved.map_or(requested, |r| r.upstream_model.as_str()),
        kind,
        path: &path,
        headers: &headers,
    };
    let Some(pending) = cache::cache_key(&inputs, body) else {
        return Lookup::Status(CacheStatus::Bypass);
    };
    let key = pending.finish(max_tokens);
    if cache::has_directive(&control, b"no-cache") {
        return Lookup::Status(CacheStatus::Refresh(Box::new(pending), key, ttl));
    }
    let table = crate::cache::CacheConfig {
        ttl_ms: ttl,
        ..cache.table
    };
    match cache::lookup(&EnvoyStore, &table, &key, now) {
        Some(hit) => Lookup::Hit(Box::new(hit), key),
        None => Lookup::Status(CacheStatus::Miss(Box::new(pending), key, ttl)),
    }
}

pub struct TollgateHttp {
    config: Option<Rc<Config>>,
    /// This worker's weighted-draw counter (shared by its requests).
    draws: Rc<Cell<u64>>,
    worker: Rc<str>,
    state: State,
    recorded: bool,
    /// Test builds only (`--features test-trap`): the request asked this VM to die mid-exchange.
    #[cfg(feature = "test-trap")]
    trap: bool,
}

/// A tenant's policy and keys (declared tenants borrow them from the configuration).
fn tenant_budget<'c>(config: &'c Config, tenant: &str) -> (&'c TenantPolicy, Cow<'c, TenantKeys>) {
    match config.tenants.get(tenant) {
        Some(t) => (&t.policy, Cow::Borrowed(&t.keys)),
        None => (
            &config.undeclared_policy,
            Cow::Owned(config.undeclared_keys(tenant)),
        ),
    }
}

impl TollgateHttp {
    pub fn new(config: Option<Rc<Config>>, draws: Rc<Cell<u64>>, worker: Rc<str>) -> TollgateHttp {
        TollgateHttp {
            config,
            draws,
            worker,
            state: State::PassThrough,
            recorded: false,
            #[cfg(feature = "test-trap")]
            trap: false,
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

    fn send(reply: &LocalReply) {
        if let Err(status) = host::send_reply(reply, &[]) {
            warn!("tollgate could not send its local reply: {status:?}");
        }
    }

    /// Sends the refusal and remembers it for the record.
    fn refuse(&mut self, kind: ApiKind, tenant: Option<String>, refusal: &Refusal) -> Action {
        self.refuse_model(kind, tenant, None, refusal)
    }

    /// [`Self::refuse`] once the requested model is known (it goes to the record too).
    fn refuse_model(
        &mut self,
        kind: ApiKind,
        tenant: Option<String>,
        model: Option<String>,
        refusal: &Refusal,
    ) -> Action {
        let reply = refusal.reply(kind.family());
        debug!(
            "tollgate refuses {} request: {}",
            kind.as_str(),
            reply.reason
        );
        Self::send(&reply);
        self.state = State::Refused {
            kind,
            tenant,
            model,
            reason: reply.reason,
        };
        Action::Pause
    }

    /// The usage view: `GET <usage_view.path>` with `Authorization: Bearer <admin token>`.
    /// Other methods get 405 (`allow: GET`), whatever the token.
    fn serve_usage_view(&mut self, config: &Config) -> Action {
        let is_get = host::request_header(":method").as_deref() == Some(b"GET");
        let authorized = config.usage_view.as_ref().is_some_and(|v| {
            host::request_header("authorization")
                .as_deref()
                .and_then(|a| a.strip_prefix(b"Bearer "))
                .is_some_and(|token| KeyDigest::of_key(token.trim_ascii()) == v.token)
        });
        let reply = if !is_get {
            Refusal::MethodNotAllowed { allow: "GET" }.reply(Family::OpenAi)
        } else if authorized {
            LocalReply {
                status: 200,
                headers: vec![("content-type", "application/json".to_string())],
                body: view::render(&EnvoyStore, config, host::now_ms()),
                reason: "usage_view",
            }
        } else {
            Refusal::Unauthenticated {
                message: "The usage view needs its admin token.".into(),
            }
            .reply(Family::OpenAi)
        };
        Self::send(&reply);
        self.state = State::Answered(vec![("tollgate.decision", reply.reason.to_string())]);
        Action::Pause
    }

    /// Reads the whole request body, admits it and prepares the exchange.
    fn admit(
        &mut self,
        config: &Config,
        kind: ApiKind,
        tenant: String,
        body_size: usize,
    ) -> Action {
        let body = host::request_body(body_size).unwrap_or_default();
        let facts = match parse_request(kind, &body) {
            Ok(facts) => facts,
            Err(err) => {
                let refusal = Refusal::BadRequest {
                    param: err.param,
                    message: err.message,
                };
                return self.refuse(kind, Some(tenant), &refusal);
            }
        };
        let (policy, keys) = tenant_budget(config, &tenant);
        let now = host::now_ms();
        let resolved = match self.route(config, policy, &keys, &facts.model, now) {
            Ok(resolved) => resolved,
            Err(refusal) => {
                return self.refuse_model(kind, Some(tenant), Some(facts.model), &refusal);
            }
        };
        let served = resolved
            .as_ref()
            .map_or(facts.model.as_str(), |r| r.model.as_str());
        let price = config.price(served);
        let plan = match admission::plan(policy, kind, &facts, served) {
            Ok(plan) => plan,
            Err(refusal) => {
                return self.refuse_model(kind, Some(tenant), Some(facts.model), &refusal);
            }
        };
        let cache_status = match cache_lookup(
            config,
            kind,
            &tenant,
            &facts.model,
            served,
            resolved.as_ref(),
            &body,
            plan.set_max_tokens,
            now,
        ) {
            Lookup::Hit(hit, key) => {
                return self.serve_hit(config, kind, tenant, facts, resolved, *hit, key, plan, now);
            }
            Lookup::Status(status) => status,
        };
        let admitted = match admission::admit(&EnvoyStore, policy, &keys, served, price, plan, now)
        {
            Ok(admitted) => admitted,
            Err(refusal) => {
                return self.refuse_model(kind, Some(tenant), Some(facts.model), &refusal);
            }
        };
        let mut cache_status = cache_status;
        cache_status.rekey(plan.set_max_tokens, admitted.plan.set_max_tokens);
        let edits = Edits {
            max_tokens: admitted.plan.set_max_tokens,
            include_usage: admitted.plan.inject_include_usage,
            model: resolved
                .as_ref()
                .filter(|r| r.upstream_model != facts.model)
                .map(|r| r.upstream_model.clone()),
        };
        if !edits.is_empty() {
            let rewritten = rewrite::apply(kind, &body, &edits).and_then(|new| {
                host::set_request_body(body_size, &new).ok()?;
                host::set_request_header("content-length", Some(new.len().to_string().as_bytes()))
                    .ok()
            });
            if rewritten.is_none() {
                admission::settle(
                    &EnvoyStore,
                    policy,
                    &keys,
                    &admitted,
                    &crate::api::Usage::default(),
                    price,
                    host::now_ms(),
                );
                let refusal = Refusal::Internal {
                    message: "The gateway could not rewrite the request body.".into(),
                };
                return self.refuse_model(kind, Some(tenant), Some(facts.model), &refusal);
            }
        }
        if let (Some(routing), Some(r)) = (&config.routing, &resolved)
            && let Err(status) = host::set_request_header(&routing.header, Some(r.route.as_bytes()))
                .and_then(|()| {
                    host::set_request_header(&routing.model_header, Some(r.model.as_bytes()))
                })
                .and_then(|()| host::clear_route_cache())
        {
            warn!("tollgate could not route the request: {status:?}");
        }
        let mut exchange = Exchange::new(kind, tenant, facts, config.limits);
        if let Some(r) = resolved {
            exchange.set_served(r.model, r.route);
        }
        if let (Some(cache), CacheStatus::Miss(..) | CacheStatus::Refresh(..)) =
            (&config.cache, &cache_status)
        {
            exchange.capture_for_cache(
                usize::try_from(cache.table.max_entry_bytes).unwrap_or(usize::MAX),
            );
        }
        exchange.set_reservation(admitted.plan.prompt_tokens, admitted.plan.output_tokens);
        if admitted.plan.inject_include_usage {
            exchange.set_include_usage_injected();
        }
        let conversation = config
            .routing
            .as_ref()
            .and_then(|r| r.conversation_header.as_deref())
            .and_then(host::request_header)
            .map(|id| String::from_utf8_lossy(&id).into_owned());
        let in_flight = enter_in_flight(config, &exchange.tenant, policy.epoch(now));
        self.state = State::Active(Box::new(Active {
            in_flight,
            exchange,
            admitted,
            started_ms: now,
            first_byte_seen: false,
            conversation,
            cache: cache_status,
        }));
        Action::Continue
    }

    /// Answers from the cache. Hits are free unless `cache.charge_hits`; either way they count
    /// as saved tokens and saved cost at the served model's price.
    #[allow(clippy::too_many_arguments)]
    fn serve_hit(
        &mut self,
        config: &Config,
        kind: ApiKind,
        tenant: String,
        facts: RequestFacts,
        resolved: Option<Resolved>,
        hit: Hit,
        key: CacheKey,
        plan: admission::Plan,
        now: u64,
    ) -> Action {
        let served = resolved
            .as_ref()
            .map_or(facts.model.clone(), |r| r.model.clone());
        // The usage the cached answer stands for, read like any response.
        let mut probe = Exchange::new(kind, tenant.clone(), facts.clone(), config.limits);
        probe.on_response_headers(hit.status, Some(hit.content_type.as_bytes()), None);
        probe.on_response_body(&hit.body);
        probe.on_response_complete();
        let (usage, _) = probe.finish(false);
        let price = config.price(&served);
        let saved_micro = price.map_or(0, |p| cost::billed_micro_usd(p.cost(&usage)));
        let (mut charged, mut billed) = (Usage::default(), 0);
        if config.cache.as_ref().is_some_and(|c| c.charge_hits) {
            let (policy, keys) = tenant_budget(config, &tenant);
            match admission::admit(&EnvoyStore, policy, &keys, &served, price, plan, now) {
                Ok(admitted) => {
                    admission::settle(&EnvoyStore, policy, &keys, &admitted, &usage, price, now);
                    (charged, billed) = (usage, saved_micro);
                }
                Err(refusal) => {
                    return self.refuse_model(kind, Some(tenant), Some(facts.model), &refusal);
                }
            }
        }
        let reply = LocalReply {
            status: hit.status,
            headers: vec![
                ("content-type", hit.content_type.clone()),
                ("x-tollgate-cache", "hit".to_string()),
                ("age", (hit.age_ms / 1000).to_string()),
            ],
            body: hit.body,
            reason: "cache_hit",
        };
        let model_header = config
            .routing
            .as_ref()
            .map(|r| (r.model_header.as_str(), served.as_str()));
        if let Err(status) = host::send_reply(&reply, model_header.as_slice()) {
            warn!("tollgate could not answer from the cache: {status:?}");
        }
        let tenant_label = config.labels.tenant(&tenant);
        let model_label = config.labels.model(&served);
        for (counter, value) in [
            (Counter::Requests, 1),
            (Counter::CacheHits, 1),
            (
                Counter::CacheSavedTokens,
                usage.input.saturating_add(usage.output),
            ),
            (Counter::CacheSavedMicroUsd, saved_micro),
            (Counter::InputTokens, charged.input),
            (Counter::OutputTokens, charged.output),
            (Counter::CostMicroUsd, billed),
        ] {
            metrics::count(
                crate::metrics::counter_name(counter, &tenant_label, &model_label),
                value,
            );
        }
        debug!("tollgate cache hit {}", key.to_hex());
        let route = resolved.map(|r| r.route).unwrap_or_default();
        let mut fields = record_fields(&probe, &served, &route, &charged, "cache");
        fields.extend([
            ("tollgate.cost_usd", cost::format_micro_usd(billed)),
            ("tollgate.cache", "hit".to_string()),
            ("tollgate.decision", "admitted".to_string()),
        ]);
        self.state = State::Answered(fields);
        Action::Pause
    }

    /// Resolves the requested model to a route (`None` without a routing table).
    fn route(
        &self,
        config: &Config,
        policy: &TenantPolicy,
        keys: &TenantKeys,
        requested: &str,
        now: u64,
    ) -> Result<Option<Resolved>, Refusal> {
        let Some(routing) = &config.routing else {
            return Ok(None);
        };
        let overrides = (!policy.aliases.is_empty()).then_some(&policy.aliases);
        // Reading the budget costs host calls: only for aliases that can downgrade.
        let downgrade = routing.may_downgrade(overrides, requested)
            && policy.past_downgrade_threshold(&EnvoyStore, keys, requested, now);
        let conversation = routing
            .conversation_header
            .as_deref()
            .and_then(host::request_header)
            .filter(|id| !id.is_empty());
        let draw = match &conversation {
            Some(id) => Draw::Conversation(id),
            None => {
                let n = self.draws.get();
                self.draws.set(n.wrapping_add(1));
                Draw::Sequence(n)
            }
        };
        routing
            .resolve(overrides, requested, draw, downgrade)
            .map(Some)
            .ok_or_else(|| Refusal::ModelNotFound {
                model: requested.to_string(),
            })
    }

    /// Settles the reservation and writes the per-request record to filter state, once.
    fn finalize(&mut self, upstream_failed: bool) {
        if self.recorded {
            return;
        }
        let fields = match &mut self.state {
            State::PassThrough | State::AwaitingBody { .. } => return,
            State::Active(active) => {
                let (charged, _) = active.exchange.finish(upstream_failed);
                let mut billed_micro = 0;
                if let Some(config) = &self.config {
                    let (policy, keys) = tenant_budget(config, &active.exchange.tenant);
                    let price = config.price(active.exchange.served_model());
                    billed_micro = price.map_or(0, |p| cost::billed_micro_usd(p.cost(&charged)));
                    let now = host::now_ms();
                    count_usage(config, &active.exchange, &charged, billed_micro);
                    if let Some(taken) = active.in_flight {
                        leave_in_flight(config, &active.exchange.tenant, taken, policy.epoch(now));
                    }
                    if active.exchange.usage_anomaly().is_some() {
                        let tenant = config.labels.tenant(&active.exchange.tenant);
                        metrics::count(crate::metrics::usage_anomalies_name(&tenant), 1);
                    }
                    store_in_cache(config, active);
                    let failed = admission::settle(
                        &EnvoyStore,
                        policy,
                        &keys,
                        &active.admitted,
                        &charged,
                        price,
                        now,
                    );
                    if failed > 0 {
                        warn!("tollgate could not settle {failed} budget buckets under contention");
                    }
                }
                let mut fields = active.exchange.record();
                fields.push(("tollgate.decision", "admitted".to_string()));
                fields.push(("tollgate.cost_usd", cost::format_micro_usd(billed_micro)));
                if !matches!(active.cache, CacheStatus::Off) {
                    fields.push(("tollgate.cache", active.cache.as_str().to_string()));
                }
                if let Some(conversation) = &active.conversation {
                    fields.push(("tollgate.conversation_id", conversation.clone()));
                }
                fields
            }
            State::Refused {
                kind,
                tenant,
                model,
                reason,
            } => {
                let mut fields = vec![
                    ("tollgate.api", kind.as_str().to_string()),
                    ("tollgate.decision", (*reason).to_string()),
                ];
                if let Some(tenant) = tenant {
                    fields.push(("tollgate.tenant", tenant.clone()));
                }
                if let Some(model) = model {
                    fields.push(("tollgate.model", model.clone()));
                }
                if let Some(config) = &self.config {
                    let label = tenant
                        .as_deref()
                        .map_or(Cow::Borrowed(crate::metrics::UNKNOWN_TENANT), |t| {
                            config.labels.tenant(t)
                        });
                    metrics::count(crate::metrics::denial_name(&label, reason), 1);
                }
                fields
            }
            State::Answered(fields) => std::mem::take(fields),
        };
        self.recorded = true;
        let worker = ("tollgate.worker", self.worker.to_string());
        for (name, value) in fields.into_iter().chain(std::iter::once(worker)) {
            if let Err(status) = host::set_record_field(name, value.as_bytes()) {
                warn!("tollgate could not write {name}: {status:?}");
            }
        }
    }
}

/// Stores a finished miss (or refresh) in the cache when the response qualifies.
fn store_in_cache(config: &Config, active: &mut Active) {
    let (Some(cache), CacheStatus::Miss(_, key, ttl) | CacheStatus::Refresh(_, key, ttl)) =
        (&config.cache, &active.cache)
    else {
        return;
    };
    let tenant = config.labels.tenant(&active.exchange.tenant);
    let model = config.labels.model(active.exchange.served_model());
    if matches!(active.cache, CacheStatus::Miss(..)) {
        metrics::count(
            crate::metrics::counter_name(Counter::CacheMisses, &tenant, &model),
            1,
        );
    }
    let Some((status, content_type, body)) = active.exchange.take_capture() else {
        return;
    };
    let table = crate::cache::CacheConfig {
        ttl_ms: *ttl,
        ..cache.table
    };
    let outcome = cache::insert(
        &EnvoyStore,
        &table,
        key,
        status,
        &content_type,
        &body,
        host::now_ms(),
    );
    if let cache::StoreOutcome::Stored { evicted } = outcome {
        metrics::count("tollgate.cache.stores".to_string(), 1);
        if evicted {
            metrics::count("tollgate.cache.evictions".to_string(), 1);
        }
        let stats = cache::stats(&EnvoyStore);
        metrics::gauge_set(
            "tollgate.cache.entries".to_string(),
            u64::from(stats.entries),
        );
        metrics::gauge_set("tollgate.cache.bytes".to_string(), stats.bytes_held);
    } else {
        debug!("tollgate did not cache a response: {outcome:?}");
    }
}

/// The usage metrics of one finished exchange.
fn count_usage(config: &Config, exchange: &Exchange, charged: &Usage, billed_micro: u64) {
    let tenant = config.labels.tenant(&exchange.tenant);
    let model = config.labels.model(exchange.served_model());
    for (counter, value) in [
        (Counter::Requests, 1),
        (Counter::InputTokens, charged.input),
        (Counter::OutputTokens, charged.output),
        (Counter::CachedInputTokens, charged.cached_input),
        (Counter::CacheWriteInputTokens, charged.cache_write_input),
        (Counter::CostMicroUsd, billed_micro),
    ] {
        metrics::count(
            crate::metrics::counter_name(counter, &tenant, &model),
            value,
        );
    }
    metrics::sample(
        crate::metrics::histogram_name(Histogram::TokensPerRequest, &tenant),
        charged.input.saturating_add(charged.output),
    );
    metrics::sample(
        crate::metrics::histogram_name(Histogram::CostMicroUsdPerRequest, &tenant),
        billed_micro,
    );
}

/// Counts a request in its tenant label's shared in-flight count and sets the gauge from it.
fn enter_in_flight(config: &Config, tenant: &str, epoch: u64) -> Option<u64> {
    let label = config.labels.tenant(tenant);
    let key = admission::in_flight_key(&label);
    let (taken, count) = admission::enter_in_flight(&EnvoyStore, &key, epoch)?;
    metrics::gauge_set(crate::metrics::in_flight_name(&label), count);
    Some(taken)
}

/// Counts a request out again (see [`enter_in_flight`]).
fn leave_in_flight(config: &Config, tenant: &str, taken: u64, epoch: u64) {
    let label = config.labels.tenant(tenant);
    let key = admission::in_flight_key(&label);
    if let Some(count) = admission::leave_in_flight(&EnvoyStore, &key, taken, epoch) {
        metrics::gauge_set(crate::metrics::in_flight_name(&label), count);
    }
}

impl Context for TollgateHttp {}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let Some(path) = host::request_header(":path") else {
            return Action::Continue;
        };
        if let Some(view) = &config.usage_view
            && path.split(|b| *b == b'?').next() == Some(view.path.as_bytes())
        {
            return self.serve_usage_view(&config);
        }
        let Some(kind) = ApiKind::from_path(&path) else {
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
        // A client must never pick the cluster: drop its routing header (Tollgate sets its own
        // once the body is read).
        let route_header = config
            .routing
            .as_ref()
            .map_or("x-tollgate-route", |r| r.header.as_str());
        if let Err(status) = host::set_request_header(route_header, None) {
            warn!("tollgate could not remove {route_header}: {status:?}");
        }
        // Usage is read from the response: ask for it uncompressed (gzip is still decoded
        // when an upstream ignores this).
        if let Err(status) = host::set_request_header("accept-encoding", Some(b"identity")) {
            warn!("tollgate could not set accept-encoding: {status:?}");
        }
        #[cfg(feature = "test-trap")]
        {
            self.trap = host::request_header("x-tollgate-test-trap").is_some();
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
        self.admit(&config, kind, tenant, body_size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let State::Active(active) = &mut self.state else {
            return Action::Continue;
        };
        // Kills this VM while the request holds its reservation and concurrency slot, as a
        // decompression bomb once did: the e2e suite proves that nothing stays held.
        #[cfg(feature = "test-trap")]
        #[allow(clippy::panic)]
        if self.trap {
            panic!("tollgate test trap: this VM dies mid-exchange");
        }
        let status = host::response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        let content_type = host::response_header("content-type");
        let content_encoding = host::response_header("content-encoding");
        active.exchange.on_response_headers(
            status,
            content_type.as_deref(),
            content_encoding.as_deref(),
        );
        if let Some(routing) = self.config.as_ref().and_then(|c| c.routing.as_ref())
            && let Err(status) = host::set_response_header(
                &routing.model_header,
                active.exchange.served_model().as_bytes(),
            )
        {
            warn!(
                "tollgate could not set {}: {status:?}",
                routing.model_header
            );
        }
        if active.exchange.rewrites_response_body()
            && let Err(status) = host::set_response_header_or_remove("content-length", None)
        {
            warn!("tollgate could not remove content-length: {status:?}");
        }
        if !matches!(active.cache, CacheStatus::Off)
            && let Err(status) =
                host::set_response_header("x-tollgate-cache", active.cache.as_str().as_bytes())
        {
            warn!("tollgate could not set x-tollgate-cache: {status:?}");
        }
        if let Some(rate) = active.admitted.rate {
            let reset_in = rate.reset_ms.saturating_sub(host::now_ms());
            let headers: [(&str, String); 3] = match active.exchange.kind.family() {
                Family::OpenAi => [
                    ("x-ratelimit-limit-tokens", rate.limit.to_string()),
                    ("x-ratelimit-remaining-tokens", rate.remaining.to_string()),
                    (
                        "x-ratelimit-reset-tokens",
                        window::openai_duration(reset_in),
                    ),
                ],
                Family::Anthropic => [
                    ("anthropic-ratelimit-tokens-limit", rate.limit.to_string()),
                    (
                        "anthropic-ratelimit-tokens-remaining",
                        rate.remaining.to_string(),
                    ),
                    (
                        "anthropic-ratelimit-tokens-reset",
                        window::rfc3339(rate.reset_ms),
                    ),
                ],
            };
            for (name, value) in headers {
                if let Err(status) = host::set_response_header(name, value.as_bytes()) {
                    warn!("tollgate could not set {name}: {status:?}");
                }
            }
        }
        if end_of_stream {
            active.exchange.on_response_complete();
            self.finalize(false);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let State::Active(active) = &mut self.state else {
            return Action::Continue;
        };
        // Time to first token: streams only (for a JSON answer the first byte is the last).
        if !active.first_byte_seen
            && body_size > 0
            && active.exchange.facts.stream
            && let Some(config) = &self.config
        {
            active.first_byte_seen = true;
            metrics::sample(
                crate::metrics::histogram_name(
                    Histogram::TimeToFirstTokenMs,
                    &config.labels.tenant(&active.exchange.tenant),
                ),
                host::now_ms().saturating_sub(active.started_ms),
            );
        }
        if active.exchange.wants_response_body() {
            // An empty last chunk still has to flush what the usage-chunk stripper holds.
            let chunk = host::response_body(body_size).unwrap_or_default();
            if let Some(replacement) = active.exchange.on_response_chunk(&chunk, end_of_stream)
                && let Err(status) = host::set_response_body(body_size, &replacement)
            {
                warn!("tollgate could not rewrite a response chunk: {status:?}");
            }
        }
        if end_of_stream {
            active.exchange.on_response_complete();
            self.finalize(false);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // Aborted streams and upstream resets never see end_of_stream: settle them here.
        if self.recorded || !matches!(self.state, State::Active(_)) {
            return self.finalize(false);
        }
        let details = host::property(&["response".to_string(), "code_details".to_string()]);
        let upstream_failed = details.is_some_and(|d| d.windows(8).any(|w| w == b"upstream"));
        self.finalize(upstream_failed);
    }
}
