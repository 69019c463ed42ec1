//! The request pipeline, host-free: one [`Request`] per HTTP exchange walks
//! headers → body → decision → upstream → usage → settle, reading what the host provides
//! ([`Host`], [`Headers`], body bytes) and returning what to do as data ([`Effects`]). The skin
//! (`src/envoy/`) only gathers the inputs and executes the effects, so every decision is tested
//! natively with an in-memory store and a fake clock (`tests`).

mod admit;
mod alert_step;
mod buffered;
mod cache_step;
mod conversation_step;
mod head;
mod hit;
mod refill;
mod respond;
mod settle;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::admission::{Admitted, TenantKeys, TenantPolicy};
use crate::api::ApiKind;
use crate::config::Config;
use crate::exchange::Exchange;
use crate::metrics::{LabelId, StatUpdate};
use crate::reply::LocalReply;
use crate::store::SharedStore;

use cache_step::CacheStatus;
pub use refill::{RefillCall, Refilled, Unanswered};
pub use respond::ResponseHead;

/// What the pipeline needs from its host besides the request itself: the shared store, the
/// clock, Envoy properties and a sink for stats.
pub trait Host: SharedStore {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// An Envoy property (`metadata…`, `response.code_details`), `None` when absent.
    fn property(&self, path: &[String]) -> Option<Vec<u8>>;
    /// Records a stat.
    fn stat(&self, update: StatUpdate);
}

/// What the root context sends: global leases' refills (gRPC, to the rate-limit service) and
/// alert webhook events (HTTP). Each returns the host's handle of the call, `None` when it could
/// not be sent (no such cluster).
pub trait Callouts {
    fn grpc(&self, global: &crate::global::GlobalBudgets, message: &[u8]) -> Option<u32>;
    fn post(&self, hooks: &crate::webhook::Webhooks, body: &[u8]) -> Option<u32>;
}

/// The request headers, read from the host in one call (names are lower case, as Envoy
/// keeps them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl Headers {
    /// Applies header edits as Envoy would one by one: every value of the name goes, and a
    /// `Some` value is added at the end.
    pub fn apply(&mut self, edits: &[(&str, Option<Vec<u8>>)]) {
        for (name, value) in edits {
            self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            if let Some(value) = value {
                self.0.push((name.to_ascii_lowercase(), value.clone()));
            }
        }
    }

    /// The first value of `name` (`None` when absent).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// What a callback asks the host to do, in this order: edit headers, replace the body, clear
/// the route cache, send the reply (with `headers` added to it), write the record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects<'g> {
    /// Header edits of the current direction: `None` removes the header. With a `reply`, the
    /// extra headers of the reply.
    pub headers: Vec<(&'g str, Option<Vec<u8>>)>,
    /// The whole header map with `headers` applied, when the host is to replace the map in one
    /// call instead of one call per edit (the response headers). With a `reply`, the request's
    /// headers set before it (a refusal whose `?key=` was cut from `:path`).
    pub header_map: Option<Headers>,
    /// Replaces the request body (request side) or the current chunk (response side).
    pub body: Option<Vec<u8>>,
    /// Makes Envoy match the route table again (the routing header changed).
    pub clear_route_cache: bool,
    /// Answers the request locally.
    pub reply: Option<LocalReply>,
    /// The per-request ledger record: written as one typed JSON value, filter state
    /// `wasm.tollgate.ledger` ([`crate::ledger::encode`]).
    pub record: crate::ledger::Record,
    /// Stops iteration (waiting for the body, or a local reply was sent).
    pub pause: bool,
    /// The request waits for a global lease's refill: the host sends what
    /// [`Gateway::refills_due`] gives and resumes the request ([`Request::resume`]) when
    /// [`Gateway::refill_answered`] names its ticket.
    pub wait: bool,
}

impl<'g> Effects<'g> {
    /// Nothing to do: go on.
    pub fn proceed() -> Effects<'g> {
        Effects::default()
    }

    /// Wait for more of the request.
    fn pause() -> Effects<'g> {
        Effects {
            pause: true,
            ..Effects::default()
        }
    }

    /// Answer locally and stop.
    fn reply(reply: LocalReply) -> Effects<'g> {
        Effects {
            reply: Some(reply),
            pause: true,
            ..Effects::default()
        }
    }
}

/// What one VM (one Envoy worker) shares among its requests: the configuration, precomputed
/// keys, the weighted-draw sequence and the worker's name for the ledger.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    /// The in-flight count key of each tenant label (by id; `_other` last).
    in_flight_keys: Vec<String>,
    draws: Cell<u64>,
    worker: String,
    /// Global leases being refilled on this worker.
    refills: RefCell<refill::Refills>,
    /// Request body bytes of this VM's requests that Envoy or the VM holds now (`buffered.rs`).
    buffered: Rc<Cell<u64>>,
    /// The budget alerts this worker saw recorded: alert key → (window start, thresholds). At
    /// most one entry per alert key the configuration implies.
    alerted: RefCell<hashbrown::HashMap<String, (u64, u64)>>,
    /// Webhook events this worker recorded and has yet to deliver (`alerts`).
    outbox: RefCell<crate::webhook::Outbox>,
    /// A request queued an event: the host starts the root's timer ([`Gateway::take_timer`]).
    timer: Cell<bool>,
    /// This Envoy's name in webhook events, resolved at the first one.
    replica: std::cell::OnceCell<String>,
}

impl Gateway {
    /// `seed` starts this worker's weighted-draw sequence; `worker` names it in the ledger.
    pub fn new(config: Config, seed: u64, worker: String) -> Gateway {
        let in_flight_keys = config
            .labels
            .tenant_values()
            .map(|label| crate::admission::in_flight_key(&label))
            .collect();
        Gateway {
            config,
            in_flight_keys,
            draws: Cell::new(seed),
            worker,
            refills: RefCell::new(refill::Refills::default()),
            buffered: Rc::new(Cell::new(0)),
            alerted: RefCell::new(hashbrown::HashMap::new()),
            outbox: RefCell::new(crate::webhook::Outbox::default()),
            timer: Cell::new(false),
            replica: std::cell::OnceCell::new(),
        }
    }

    /// A worker's gateway, named at random in the ledger: workers configure within the same
    /// clock tick, so the clock alone gave two of them one name (std's hasher keys come from
    /// WASI `random_get`, Envoy's RNG, on wasm32).
    pub fn for_worker(config: Config, now_ms: u64, now_ns: u64) -> Gateway {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            ^ now_ns;
        Gateway::new(config, now_ms, format!("{:08x}", random as u32))
    }

    /// Prepares the host for traffic: creates every shared-data key the configuration implies
    /// (a key created by two workers at once could lose a reservation; an existing key is never
    /// touched) and defines the counters that must exist at 0 (denials for every tenant label).
    /// Returns the number of keys and how many of them were created.
    pub fn prepare<H: Host + ?Sized>(&self, host: &H) -> (usize, usize) {
        use crate::metrics::{DENIAL_REASONS, Stat, UNKNOWN_ID};
        host.stat(StatUpdate::Add(Stat::SharedKeysCreated, 0));
        let keys = self.config.shared_keys();
        let created = keys
            .iter()
            .filter(|key| crate::store::ensure(host, key, crate::store::FRESH))
            .count();
        for (key, plan) in self.config.budget_records() {
            crate::record::prepare(host, &key, &plan);
        }
        for label in self.config.labels.tenant_ids() {
            for reason in DENIAL_REASONS {
                host.stat(StatUpdate::Add(Stat::Denials(label, reason), 0));
            }
        }
        host.stat(StatUpdate::Add(
            Stat::Denials(UNKNOWN_ID, "unauthenticated"),
            0,
        ));
        (keys.len(), created)
    }

    /// The next draw of this worker's weighted-routing sequence.
    fn next_draw(&self) -> u64 {
        let n = self.draws.get();
        self.draws.set(n.wrapping_add(1));
        n
    }

    fn in_flight_key(&self, label: LabelId) -> Option<&str> {
        self.in_flight_keys
            .get(usize::from(label))
            .or(self.in_flight_keys.last())
            .map(String::as_str)
    }

    /// The end user of id `id` (`None`: the empty id), when `identity.user` is configured.
    fn user_of(&self, id: Option<&str>) -> Option<crate::user::User> {
        let users = self.config.users.as_ref()?;
        Some(users.user(id.unwrap_or_default().as_bytes()))
    }

    /// A tenant's policy and keys for a request of end user `user` (its per-user limits in the
    /// user's slot).
    fn budget(
        &self,
        tenant: &str,
        user: Option<&crate::user::User>,
    ) -> (&TenantPolicy, std::borrow::Cow<'_, TenantKeys>) {
        let (policy, keys) = self.tenant_budget(tenant);
        let Some(user) = user else {
            return (policy, keys);
        };
        match keys.for_user(policy, user.slot) {
            Some(keys) => (policy, std::borrow::Cow::Owned(keys)),
            None => (policy, keys),
        }
    }

    /// A tenant's policy and keys (declared tenants borrow them from the configuration).
    fn tenant_budget(&self, tenant: &str) -> (&TenantPolicy, std::borrow::Cow<'_, TenantKeys>) {
        let config = &self.config;
        match config.tenants.get(tenant) {
            Some(t) => (&t.policy, std::borrow::Cow::Borrowed(&t.keys)),
            None => (
                &config.undeclared_policy,
                std::borrow::Cow::Owned(config.undeclared_keys(tenant)),
            ),
        }
    }
}

/// One HTTP exchange through the pipeline.
#[derive(Default)]
pub struct Request {
    state: State,
    /// The host's name for this request, given back when a refill it waits for ends.
    ticket: u32,
    /// The record was written (settled exactly once).
    recorded: bool,
    /// Its body's part of the VM's buffered bytes, from its first byte to its response's head.
    hold: Option<buffered::BodyHold>,
    /// The end user as the ledger names it (`identity.user`), once resolved.
    user: Option<String>,
    /// What the ledger records of the request's head and the response's (method, path,
    /// client request id, upstream time): client-controlled values, so Tollgate writes them
    /// (escaped) rather than the access log.
    seen: crate::ledger::Record,
    /// Test builds only (`--features test-trap`): the request asked this VM to die mid-exchange.
    #[cfg(feature = "test-trap")]
    trap: bool,
}

#[derive(Default)]
enum State {
    /// Not an LLM request (or no configuration): Tollgate stays out of the way.
    #[default]
    PassThrough,
    /// Identified, waiting for the whole request body.
    AwaitingBody {
        kind: ApiKind,
        tenant: String,
        label: LabelId,
        headers: Headers,
    },
    /// Waiting for a global lease's refill, with what it takes to admit it again.
    Waiting(Box<refill::Parked>),
    /// Admitted; the response is being watched.
    Active(Box<Active>),
    /// Answered locally; `reason` goes to the record.
    Refused {
        kind: ApiKind,
        tenant: Option<(String, LabelId)>,
        model: Option<String>,
        reason: &'static str,
        /// The limit that refused it, `tenant/limit` (the tenant whose budget it is).
        by: Option<String>,
    },
    /// Answered by Tollgate itself (usage view, cache hit); the record is ready.
    Answered(crate::ledger::Record),
}

/// An admitted request, from its body to its settlement.
struct Active {
    label: LabelId,
    /// The in-flight gauge comes from the tenant's concurrency slot count.
    slot_gauge: bool,
    /// The epoch this request was counted in flight in (`None`: it could not be counted).
    in_flight: Option<u64>,
    exchange: Exchange,
    admitted: Admitted,
    /// When the request was admitted (time to first token).
    started_ms: u64,
    first_byte_seen: bool,
    conversation: Option<String>,
    /// Its step in a tracked conversation.
    in_conversation: Option<conversation_step::InConversation>,
    cache: CacheStatus,
    /// With a global limit: `lease`, or `fallback` when the service was unreachable.
    global: Option<&'static str>,
}

impl Request {
    pub fn new() -> Request {
        Request::default()
    }

    /// A request the host calls `ticket` (Envoy: its context id).
    pub fn with_ticket(ticket: u32) -> Request {
        Request {
            ticket,
            ..Request::default()
        }
    }

    /// The length of a waiting request's body, as Envoy buffered it (0 when not waiting).
    pub fn parked_body_len(&self) -> usize {
        match &self.state {
            State::Waiting(parked) => parked.body.len(),
            _ => 0,
        }
    }

    /// Gives the body's bytes back to the VM's total once the request was answered locally or
    /// refused (forwarded ones keep them until the response's head: `respond.rs`).
    fn release_body_hold(&mut self) {
        if !matches!(
            self.state,
            State::AwaitingBody { .. } | State::Waiting(_) | State::Active(_)
        ) {
            self.hold = None;
        }
    }

    /// Request body bytes held for this VM's requests now (`limits.max_buffered_request_bytes`).
    pub fn buffered_bytes(gateway: &Gateway) -> u64 {
        gateway.buffered.get()
    }

    /// Whether the response still has to be watched (the skin skips reading it otherwise).
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active(_))
    }

    /// Remembers a local reply for the record and returns its effects.
    fn refuse<'g>(
        &mut self,
        kind: ApiKind,
        tenant: Option<(String, LabelId)>,
        model: Option<String>,
        refusal: &crate::reply::Refusal,
    ) -> Effects<'g> {
        self.refuse_by(kind, tenant, model, refusal, None)
    }

    /// [`Request::refuse`], naming in the record the limit that refused (`tenant/limit`).
    fn refuse_by<'g>(
        &mut self,
        kind: ApiKind,
        tenant: Option<(String, LabelId)>,
        model: Option<String>,
        refusal: &crate::reply::Refusal,
        by: Option<String>,
    ) -> Effects<'g> {
        let reply = refusal.reply(kind.family());
        log::debug!(
            "tollgate refuses {} request: {}",
            kind.as_str(),
            reply.reason
        );
        self.state = State::Refused {
            kind,
            tenant,
            model,
            reason: reply.reason,
            by,
        };
        Effects::reply(reply)
    }
}
