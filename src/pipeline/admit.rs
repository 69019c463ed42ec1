//! The request body: parse, route, plan, cache lookup, admission, then the edits that send the
//! request upstream.

use super::alert_step;
use super::cache_step::{self, Asked, Lookup};
use super::conversation_step;
use super::refill::Parked;
use super::{Active, Effects, Gateway, Headers, Host, Request, State};
use crate::admission::{self, Denied, TenantKeys, TenantPolicy};
use crate::api::dialect::{self, Call};
use crate::api::request::read_request;
use crate::api::rewrite::{self, Edits};
use crate::api::{ApiKind, Usage};
use crate::exchange::Exchange;
use crate::metrics::{LabelId, Stat, StatUpdate};
use crate::reply::Refusal;
use crate::routing::{Draw, Resolved};
use crate::user::{User, UserSource, slot_owner_key};

impl Request {
    /// Decides on a whole request body: refuse, answer from the cache, or forward (with the
    /// body rewritten and the routing headers set when needed).
    pub(super) fn admit<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        kind: ApiKind,
        who: (String, LabelId),
        headers: Headers,
        body: Vec<u8>,
    ) -> Effects<'g> {
        self.admit_again(gateway, host, kind, who, headers, body, 0)
    }

    /// [`Request::admit`], for the `attempts`-th time (a global lease was refilled since).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn admit_again<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        kind: ApiKind,
        (tenant, label): (String, LabelId),
        mut headers: Headers,
        body: Vec<u8>,
        attempts: u8,
    ) -> Effects<'g> {
        let config = &gateway.config;
        // The path was classified at the headers; read again here for the model it names.
        let call = headers
            .get(":path")
            .and_then(dialect::classify)
            .filter(|call| call.kind == kind)
            .unwrap_or(Call {
                kind,
                stream: false,
                model: None,
            });
        let mut facts = match read_request(&call, &body) {
            Ok(facts) => facts,
            Err(err) => {
                let refusal = Refusal::BadRequest {
                    param: err.param,
                    message: err.message,
                };
                return self.refuse(kind, Some((tenant, label)), None, &refusal);
            }
        };
        let now = host.now_ms();
        facts.user = resolve_user(gateway, host, &headers, facts.user.take());
        // The id is hashed once here: its slot, fingerprint and the ledger's name for it.
        let user = gateway.user_of(facts.user.as_deref());
        if let (Some(user), Some(_)) = (&user, &facts.user) {
            self.user = Some(user.ledger.clone());
        }
        let (policy, keys) = gateway.budget(&tenant, user.as_ref());
        if let Some(user) = &user
            && policy.limits.iter().any(|l| l.per_user)
        {
            note_slot_owner(gateway, host, user, &keys.scope, &tenant);
        }
        let conversation = config
            .conversation_header()
            .and_then(|name| headers.get(name))
            .filter(|id| !id.is_empty());
        let resolved = match route(
            gateway,
            host,
            conversation,
            policy,
            &keys,
            &facts.model,
            now,
        ) {
            Ok(resolved) => resolved,
            Err(refusal) => {
                return self.refuse(kind, Some((tenant, label)), Some(facts.model), &refusal);
            }
        };
        if let Some(api) = resolved.as_ref().and_then(|r| r.api)
            && api != kind.family()
        {
            let refusal = Refusal::BadRequest {
                param: Some("model".into()),
                message: format!(
                    "The model '{}' is not served through this API.",
                    facts.model
                ),
            };
            return self.refuse(kind, Some((tenant, label)), Some(facts.model), &refusal);
        }
        let served = resolved
            .as_ref()
            .map_or(facts.model.as_str(), |r| r.model.as_str());
        let price = config.price(served);
        let plan = match admission::plan(policy, kind, &facts, served) {
            Ok(plan) => plan,
            Err(refusal) => {
                return self.refuse(kind, Some((tenant, label)), Some(facts.model), &refusal);
            }
        };
        let asked = Asked {
            kind,
            tenant: &tenant,
            requested: &facts.model,
            served,
            resolved: resolved.as_ref(),
            body: &body,
            greedy: facts.greedy,
            max_tokens: plan.set_max_tokens,
        };
        let mut cache = match cache_step::lookup(gateway, host, &headers, &asked, now) {
            Lookup::Hit(hit, key) => {
                let served = served.to_string();
                let who = Some((tenant, label));
                let args = (facts, resolved, served, *hit, key, plan, now);
                let (f, r, sv, h, k, p, n) = args;
                return match self.serve_hit(gateway, host, kind, who, f, r, sv, h, k, p, n) {
                    Ok(effects) => effects,
                    Err((tenant, limit, need)) => {
                        let parked = Parked {
                            kind,
                            tenant,
                            user_slot: user.as_ref().map(|u| u.slot),
                            label,
                            headers,
                            body,
                            attempts,
                        };
                        self.wait_for_lease(gateway, host, parked, (limit, need), now)
                    }
                };
            }
            Lookup::Status(status) => status,
        };
        let admitted = match admission::admit(host, policy, &keys, served, price, plan, now) {
            Ok(admitted) => admitted,
            Err(Denied::Refused(refusal)) => {
                return self.refuse(kind, Some((tenant, label)), Some(facts.model), &refusal);
            }
            Err(Denied::Spent { refusal, by }) => {
                let who = Some((tenant, label));
                return self.refuse_by(kind, who, Some(facts.model), &refusal, Some(by));
            }
            Err(Denied::Short { limit, need }) => {
                let parked = Parked {
                    kind,
                    tenant,
                    user_slot: user.as_ref().map(|u| u.slot),
                    label,
                    headers,
                    body,
                    attempts,
                };
                return self.wait_for_lease(gateway, host, parked, (limit, need), now);
            }
        };
        // Global limits: the ledger says whether the service's grants paid for the request or,
        // while the service was unreachable, the fallback allowance did.
        let global = admitted
            .held
            .iter()
            .filter(|h| h.after.lease.is_some())
            .map(|h| h.fallback)
            .reduce(|a, b| a || b)
            .map(|fallback| if fallback { "fallback" } else { "lease" });
        // A shadow limit that would have refused it: counted under the limit's owner.
        if let Some(limit) = admitted
            .held
            .iter()
            .find(|h| h.over)
            .and_then(|h| policy.limits.get(h.limit))
        {
            let labels = &gateway.config.labels;
            let owner = labels.tenant_id(limit.owner.as_deref().unwrap_or(&tenant));
            let stat = Stat::ShadowRefusals(owner, labels.limit_id(&limit.name));
            host.stat(StatUpdate::Add(stat, 1));
        }
        if global == Some("fallback") {
            host.stat(StatUpdate::Add(Stat::GlobalFallbackAdmits(label), 1));
        }
        alert_step::count_crossings(gateway, host, (policy, keys.as_ref()), &tenant, &admitted);
        // The conversation's step, once its budgets admitted it (its refusal releases them).
        let budget = (policy, keys.as_ref());
        let in_conversation = match conversation_step::admit(
            gateway,
            host,
            budget,
            label,
            conversation,
            &admitted,
            price,
            now,
        ) {
            Ok(step) => step,
            Err((refusal, by)) => {
                release_unused(host, budget, &admitted, price, now);
                let who = Some((tenant, label));
                return self.refuse_by(kind, who, Some(facts.model), &refusal, by);
            }
        };
        cache.rekey(plan.set_max_tokens, admitted.plan.set_max_tokens);
        let edits = Edits {
            max_tokens: admitted.plan.set_max_tokens,
            include_usage: admitted.plan.inject_include_usage,
            model: resolved
                .as_ref()
                .filter(|r| r.upstream_model != facts.model && call.model.is_none())
                .map(|r| r.upstream_model.clone()),
        };
        // Gemini, Vertex and Bedrock name the model in the path: routing rewrites it there.
        // Bedrock's segment is always sent fully percent-encoded, as botocore sends it: Envoy's
        // path normalisation turns a `%2F` into `/`, and Bedrock does not find the model then.
        let new_path = call.model.as_ref().and_then(|at| {
            let name = resolved
                .as_ref()
                .map_or(facts.model.as_str(), |r| r.upstream_model.as_str());
            if name == facts.model && !kind.dialect().reencodes_path_model() {
                return None;
            }
            let raw = headers.get(":path")?;
            dialect::with_model(raw, at, name).filter(|path| path.as_slice() != raw)
        });
        // Usage is read from the response: ask for it uncompressed (gzip is still decoded when
        // an upstream ignores this).
        let mut effects = Effects::proceed();
        effects
            .headers
            .push(("accept-encoding", Some(b"identity".to_vec())));
        if !edits.is_empty() {
            match rewrite::apply(kind, &body, &edits) {
                Some(new) => {
                    effects
                        .headers
                        .push(("content-length", Some(new.len().to_string().into_bytes())));
                    effects.body = Some(new);
                }
                None => {
                    let model = Some(facts.model);
                    release_unused(host, (policy, &keys), &admitted, price, now);
                    return self.refuse(kind, Some((tenant, label)), model, &rewrite_failed());
                }
            }
        }
        if let Some(path) = new_path {
            self.seen_path(&path);
            effects.headers.push((":path", Some(path)));
        }
        if let (Some(routing), Some(r)) = (&config.routing, &resolved) {
            effects.headers.extend([
                (routing.header.as_str(), Some(r.route.clone().into_bytes())),
                (
                    routing.model_header.as_str(),
                    Some(r.model.clone().into_bytes()),
                ),
            ]);
            effects.clear_route_cache = true;
        }
        // The upstream gets the max tokens Tollgate set (injected or lowered): no output past it
        // is charged, so strict mode's bound holds even against an upstream that ignores it.
        if let Some(sent) = admitted.plan.set_max_tokens {
            facts.max_tokens = Some(sent);
        }
        let mut exchange = Exchange::new(kind, tenant, facts, config.limits);
        if let Some(r) = resolved {
            exchange.set_served(r.model, r.route);
        }
        if let (Some(c), true) = (&config.cache, cache.stores()) {
            exchange
                .capture_for_cache(usize::try_from(c.table.max_entry_bytes).unwrap_or(usize::MAX));
        }
        exchange.set_reservation(admitted.plan.prompt_tokens, admitted.plan.output_tokens);
        if admitted.plan.inject_include_usage {
            exchange.set_include_usage_injected();
        }
        let conversation = conversation.map(|id| String::from_utf8_lossy(id).into_owned());
        // A tenant with a concurrency limit and a label of its own already counts its requests
        // in flight (its slot key): the gauge comes from there, without a second count.
        let slot_gauge = admitted
            .in_flight
            .filter(|_| label_is_tenant(gateway, &exchange.tenant, label));
        let in_flight = match slot_gauge {
            Some(count) => {
                host.stat(StatUpdate::Set(Stat::InFlight(label), count));
                None
            }
            None => enter_in_flight(gateway, host, label, policy.epoch(now)),
        };
        // The request's headers go back whole: one host call instead of one per edit.
        headers.apply(&effects.headers);
        effects.header_map = Some(headers);
        self.state = State::Active(Box::new(Active {
            label,
            slot_gauge: slot_gauge.is_some(),
            in_flight,
            exchange,
            admitted,
            started_ms: now,
            first_byte_seen: false,
            conversation,
            in_conversation,
            cache,
            global,
        }));
        effects
    }

    /// The host could not apply the forward's edits (the body or a header could not be
    /// replaced): the reservation is released and the client gets a 500.
    pub fn forward_failed<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
    ) -> Effects<'g> {
        let State::Active(active) = std::mem::take(&mut self.state) else {
            return Effects::proceed();
        };
        let exchange = &active.exchange;
        active.release(gateway, host, &Usage::default(), host.now_ms());
        let who = Some((exchange.tenant.clone(), active.label));
        let model = Some(exchange.facts.model.clone());
        self.refuse(exchange.kind, who, model, &rewrite_failed())
    }
}

/// Releases what an admitted request holds, charging nothing: it is refused after all.
fn release_unused<H: Host + ?Sized>(
    host: &H,
    (policy, keys): (&TenantPolicy, &TenantKeys),
    admitted: &crate::admission::Admitted,
    price: Option<&crate::cost::Price>,
    now: u64,
) {
    admission::settle(host, policy, keys, admitted, &Usage::default(), price, now);
}

fn rewrite_failed() -> Refusal {
    Refusal::Internal {
        message: "The gateway could not rewrite the request body.".into(),
    }
}

/// Resolves the requested model to a route (`None` without a routing table).
fn route<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    conversation: Option<&[u8]>,
    policy: &TenantPolicy,
    keys: &TenantKeys,
    requested: &str,
    now: u64,
) -> Result<Option<Resolved>, Refusal> {
    let Some(routing) = &gateway.config.routing else {
        return Ok(None);
    };
    let overrides = (!policy.aliases.is_empty()).then_some(&policy.aliases);
    // Reading the budget costs shared-data reads: only for aliases that can downgrade.
    let downgrade = routing.may_downgrade(overrides, requested)
        && policy.past_downgrade_threshold(host, keys, requested, now);
    let draw = match conversation {
        Some(id) => Draw::Conversation(id),
        None => Draw::Sequence(gateway.next_draw()),
    };
    routing
        .resolve(overrides, requested, draw, downgrade)
        .map(Some)
        .ok_or_else(|| Refusal::ModelNotFound {
            model: requested.to_string(),
        })
}

/// Whether `label` stands for `tenant` alone (a declared tenant with its own label value).
fn label_is_tenant(gateway: &Gateway, tenant: &str, label: LabelId) -> bool {
    let labels = &gateway.config.labels;
    gateway.config.tenants.contains_key(tenant) && labels.is_exclusive(label)
}

impl Active {
    /// Settles the reservation with what is `charged` (once per exchange: the caller has taken
    /// the request out of `State::Active`) and counts the request out of the in-flight gauge:
    /// from its slot count when the gauge comes from the concurrency slot, or its label's shared
    /// count.
    pub(super) fn release<H: Host + ?Sized>(
        &self,
        gateway: &Gateway,
        host: &H,
        charged: &Usage,
        now: u64,
    ) {
        let user = gateway.user_of(self.exchange.facts.user.as_deref());
        let (policy, keys) = gateway.budget(&self.exchange.tenant, user.as_ref());
        let price = gateway.config.price(self.exchange.served_model());
        let settled = admission::settle(host, policy, &keys, &self.admitted, charged, price, now);
        match (self.slot_gauge, settled.in_flight, self.in_flight) {
            (true, Some(count), _) => host.stat(StatUpdate::Set(Stat::InFlight(self.label), count)),
            (false, _, Some(taken)) => {
                leave_in_flight(gateway, host, self.label, taken, policy.epoch(now));
            }
            _ => {}
        }
        // A budget tree's gauges: each level's use, under the level's own label; and the alert
        // thresholds a settlement reached (a charge past the estimate).
        for (i, used) in settled.used {
            let Some(limit) = policy.limits.get(i) else {
                continue;
            };
            let window = limit.window.start(now);
            let tenant = &self.exchange.tenant;
            alert_step::note(gateway, host, (&keys, tenant), limit, (used, window));
            if policy.ancestors.is_empty() {
                continue;
            }
            let labels = &gateway.config.labels;
            let owner = labels.tenant_id(limit.owner.as_deref().unwrap_or(&self.exchange.tenant));
            let stat = Stat::BudgetUsed(owner, labels.limit_id(&limit.name));
            let value = used / crate::global::hit_size(limit.unit);
            host.stat(StatUpdate::Set(stat, value));
        }
        if settled.failed > 0 {
            let failed = settled.failed;
            log::warn!("tollgate could not settle {failed} budget buckets under contention");
        }
    }
}

/// The request's end user id (`identity.user`), non-empty; `body_user` is what the body said.
fn resolve_user<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    headers: &Headers,
    body_user: Option<String>,
) -> Option<String> {
    let users = gateway.config.users.as_ref()?;
    match &users.source {
        UserSource::Header(name) => headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        UserSource::Metadata(path) => host
            .property(path)
            .map(|v| String::from_utf8_lossy(&v).into_owned()),
        UserSource::Body => body_user,
    }
    .filter(|id| !id.is_empty())
}

/// Remembers which user last used a tenant's user slot, and counts a request whose slot was
/// last used by another user (their per-user budgets are shared: stricter, never looser).
fn note_slot_owner<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    user: &User,
    scope: &str,
    tenant: &str,
) {
    let key = slot_owner_key(scope, user.slot);
    let (bytes, cas) = host.get(&key);
    let mine = user.fingerprint.to_le_bytes();
    if bytes.as_deref() == Some(&mine[..]) {
        return;
    }
    if bytes.is_some_and(|b| !b.is_empty()) {
        let label = gateway.config.labels.tenant_id(tenant);
        host.stat(StatUpdate::Add(Stat::UserSlotCollisions(label), 1));
    }
    // Another worker writing first is as good: the next request sees whoever it was.
    let _ = host.set(&key, &mine, cas);
}

/// Counts a request in its tenant label's shared in-flight count and sets the gauge from it.
pub(super) fn enter_in_flight<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    label: LabelId,
    epoch: u64,
) -> Option<u64> {
    let key = gateway.in_flight_key(label)?;
    let (taken, count) = admission::enter_in_flight(host, key, epoch)?;
    host.stat(StatUpdate::Set(Stat::InFlight(label), count));
    Some(taken)
}

/// Counts a request out again (see [`enter_in_flight`]).
pub(super) fn leave_in_flight<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    label: LabelId,
    taken: u64,
    epoch: u64,
) {
    let Some(key) = gateway.in_flight_key(label) else {
        return;
    };
    if let Some(count) = admission::leave_in_flight(host, key, taken, epoch) {
        host.stat(StatUpdate::Set(Stat::InFlight(label), count));
    }
}
