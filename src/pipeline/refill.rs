//! Refills of global leases, one per (tenant, limit) per Envoy. A request whose lease is short
//! joins the refill this worker is making, or claims the lease and starts one, or, when another
//! worker holds the claim, watches the lease until that refill ends (`Gateway::refills_watched`).
//! The host sends a refill (`Gateway::refills_due`, from the worker's root context, so the
//! answer always finds its way back) and hands the answer to `Gateway::refill_answered`, which
//! applies it to the lease and names the requests to resume. A resumed request is admitted again
//! from its body ([`Request::resume`]). A refill without an answer backs the lease off in its
//! bucket, for every worker of the Envoy ([`budget::backoff_ms`]), and its ask counts as
//! unconfirmed: the service may have counted it.

use hashbrown::HashMap;

use super::{Callouts, Effects, Gateway, Headers, Host, Request, State};
use crate::admission::{TenantKeys, TenantPolicy};
use crate::api::ApiKind;
use crate::budget::{self, Claim, Limit, Refill};
use crate::global;
use crate::metrics::{LabelId, Stat, StatUpdate};
use crate::record::BucketAt;
use crate::reply::Refusal;

/// A request admitted again this many times without fitting is refused (429).
const MAX_ATTEMPTS: u8 = 3;

/// This worker's refills in flight, by bucket key (bounded by the configuration's keys).
#[derive(Debug, Default)]
pub(super) struct Refills {
    flights: HashMap<BucketAt, Flight>,
    /// The host's handle of each refill sent (Envoy: the gRPC call's token).
    tokens: HashMap<u32, BucketAt>,
}

#[derive(Debug)]
struct Flight {
    tenant: String,
    limit: usize,
    /// The window the refill is for (its grant counts in no other).
    window_start: u64,
    /// Another worker of this Envoy is refilling the lease: this one only watches the bucket.
    foreign: bool,
    /// The amount asked for, in the limit's unit.
    asked: u64,
    message: Vec<u8>,
    /// When it was handed to the host (`None`: not yet).
    sent_at: Option<u64>,
    waiters: Vec<u32>,
}

/// A refill the host is to send to the rate-limit service; `key` names it when it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefillCall {
    pub key: BucketAt,
    pub message: Vec<u8>,
}

/// Why a refill has no answer to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The host could not send it: the service never saw it.
    NotSent,
    /// It was sent and failed or timed out: the service may have counted it.
    Lost,
}

/// How a refill ended, for the requests that waited on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refilled {
    /// The lease grew (granted, or the fallback allowance while the service was unreachable).
    Grew,
    /// The service refused: the requests are admitted again against what is left, or refused.
    Refused,
    /// The service could not be asked and no fallback allowance is left.
    Unavailable,
}

/// A request waiting for its lease.
pub(super) struct Parked {
    pub kind: ApiKind,
    pub tenant: String,
    /// The end user's slot (its per-user limits' buckets), when it has one.
    pub user_slot: Option<u64>,
    pub label: LabelId,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub attempts: u8,
}

enum Join {
    Waiting,
    Unavailable,
    TooLarge,
}

impl Gateway {
    /// Refills to send now (each once).
    pub fn refills_due(&self, now_ms: u64) -> Vec<RefillCall> {
        let mut refills = self.refills.borrow_mut();
        refills
            .flights
            .iter_mut()
            .filter(|(_, f)| f.sent_at.is_none() && !f.foreign)
            .map(|(key, flight)| {
                flight.sent_at = Some(now_ms);
                RefillCall {
                    key: key.clone(),
                    message: std::mem::take(&mut flight.message),
                }
            })
            .collect()
    }

    /// The host sent refill `key` as `token`.
    pub fn refill_sent(&self, key: BucketAt, token: u32) {
        self.refills.borrow_mut().tokens.insert(token, key);
    }

    /// The refill the host sent as `token` (once).
    pub fn refill_of(&self, token: u32) -> Option<BucketAt> {
        self.refills.borrow_mut().tokens.remove(&token)
    }

    /// Refills sent longer ago than the call's timeout and a second: their answer is lost, and
    /// the host answers them as failed.
    pub fn refills_overdue(&self, now_ms: u64) -> Vec<BucketAt> {
        let Some(global) = &self.config.global else {
            return Vec::new();
        };
        let deadline = global.timeout_ms.saturating_add(1_000);
        let mut refills = self.refills.borrow_mut();
        let overdue: Vec<BucketAt> = refills
            .flights
            .iter()
            .filter(|(_, f)| !f.foreign)
            .filter(|(_, f)| {
                f.sent_at
                    .is_some_and(|t| now_ms.saturating_sub(t) > deadline)
            })
            .map(|(key, _)| key.clone())
            .collect();
        refills.tokens.retain(|_, key| !overdue.contains(key));
        overdue
    }

    /// Refills another worker of this Envoy is making that ended (its claim on the lease is
    /// gone or expired, or the window turned): their waiters are admitted again.
    pub fn refills_watched<H: Host + ?Sized>(&self, host: &H, now_ms: u64) -> Vec<Vec<u32>> {
        let mut refills = self.refills.borrow_mut();
        let ended: Vec<BucketAt> = refills
            .flights
            .iter()
            .filter(|(_, f)| f.foreign)
            .filter(|(key, f)| {
                let (policy, _) = self.tenant_budget(&f.tenant);
                let Some(limit) = policy.limits.get(f.limit) else {
                    return true;
                };
                let bucket = budget::read(host, key, limit, now_ms, policy.epoch(now_ms));
                let claimed = bucket.lease.is_some_and(|l| l.refilling_until > now_ms);
                !claimed || bucket.window_start != f.window_start
            })
            .map(|(key, _)| key.clone())
            .collect();
        ended
            .iter()
            .filter_map(|key| refills.flights.remove(key))
            .map(|flight| flight.waiters)
            .collect()
    }

    /// The answer to the refill the host sent as `token` (`None`: the call failed), applied.
    pub fn refill_reply<H: Host + ?Sized>(
        &self,
        host: &H,
        token: u32,
        answer: Option<&[u8]>,
    ) -> Vec<(Refilled, Vec<u32>)> {
        let Some(key) = self.refill_of(token) else {
            return Vec::new();
        };
        let answer = answer.ok_or(Unanswered::Lost);
        vec![self.refill_answered(host, &key, answer, host.now_ms())]
    }

    /// The root's timer: sends the refills and webhook events due, fails refills whose answer
    /// is overdue, and returns how each ended refill ended with the requests to resume (the
    /// host resumes them, then sets its timer to [`Gateway::tick_period`]).
    pub fn on_tick<H: Host + Callouts + ?Sized>(&self, host: &H) -> Vec<(Refilled, Vec<u32>)> {
        let now = host.now_ms();
        let mut ended = Vec::new();
        if let Some(global) = &self.config.global {
            for call in self.refills_due(now) {
                match host.grpc(global, &call.message) {
                    Some(token) => self.refill_sent(call.key, token),
                    None => ended.push(self.refill_answered(
                        host,
                        &call.key,
                        Err(Unanswered::NotSent),
                        now,
                    )),
                }
            }
            for key in self.refills_overdue(now) {
                ended.push(self.refill_answered(host, &key, Err(Unanswered::Lost), now));
            }
            let watched = self.refills_watched(host, now).into_iter();
            ended.extend(watched.map(|waiters| (Refilled::Grew, waiters)));
        }
        self.post_due(host, now);
        ended
    }

    /// Whether any refill is waiting to be sent or answered (the host keeps its timer on).
    pub fn refills_pending(&self) -> bool {
        !self.refills.borrow().flights.is_empty()
    }

    /// Applies a refill's answer (or why there is none) to its lease and returns how it ended
    /// and the tickets of the requests to resume.
    pub fn refill_answered<H: Host + ?Sized>(
        &self,
        host: &H,
        key: &BucketAt,
        answer: Result<&[u8], Unanswered>,
        now_ms: u64,
    ) -> (Refilled, Vec<u32>) {
        let Some(flight) = self.refills.borrow_mut().flights.remove(key) else {
            return (Refilled::Unavailable, Vec::new());
        };
        let (policy, _) = self.tenant_budget(&flight.tenant);
        let Some(limit) = policy.limits.get(flight.limit) else {
            return (Refilled::Unavailable, flight.waiters);
        };
        // An ancestor's limit is counted under the ancestor's label.
        let label = self
            .config
            .labels
            .tenant_id(limit.owner.as_deref().unwrap_or(&flight.tenant));
        let epoch = policy.epoch(now_ms);
        let size = global::hit_size(limit.unit);
        let service = self.config.global.as_ref().map(|g| g.protocol());
        let decoded = answer
            .ok()
            .zip(service)
            .and_then(|(bytes, s)| s.answer(bytes));
        let (refill, outcome) = match decoded {
            Some(a) if a.granted => (
                Refill::Granted {
                    amount: flight.asked,
                    remaining: a.remaining.map(|r| r.saturating_mul(size)),
                },
                "granted",
            ),
            Some(a) => (
                Refill::Refused {
                    need: flight.asked,
                    remaining: a.remaining.map(|r| r.saturating_mul(size)),
                },
                "refused",
            ),
            None => {
                let lost = answer == Err(Unanswered::Lost);
                let asked = if lost { flight.asked } else { 0 };
                (Refill::Unavailable { asked }, "unavailable")
            }
        };
        host.stat(StatUpdate::Add(Stat::GlobalRefills(label, outcome), 1));
        if let Refill::Unavailable { asked: 1.. } = refill {
            let hits = flight.asked.div_ceil(size);
            host.stat(StatUpdate::Add(Stat::GlobalUnconfirmed(label), hits));
        }
        let applied = budget::refill(
            host,
            key,
            limit,
            (refill, flight.window_start),
            now_ms,
            epoch,
        );
        self.lease_gauges(host, (key, limit, label), now_ms, epoch);
        let refilled = match (refill, applied) {
            (Refill::Refused { .. }, Some(_)) => Refilled::Refused,
            // Granted, or the window turned meanwhile: admitted again (in the new window).
            (_, Some(true) | None) => Refilled::Grew,
            (_, Some(false)) => Refilled::Unavailable,
        };
        (refilled, flight.waiters)
    }

    /// Sets the lease gauges of `limit` after a refill: what this Envoy was granted this
    /// window, and the service's remaining when it said (per refill, never per request).
    fn lease_gauges<H: Host + ?Sized>(
        &self,
        host: &H,
        (key, limit, tenant): (&BucketAt, &Limit, LabelId),
        now_ms: u64,
        epoch: u64,
    ) {
        let Some(lease) = budget::read(host, key, limit, now_ms, epoch).lease else {
            return;
        };
        let id = self.config.labels.limit_id(&limit.name);
        let in_hits = |amount: u64| {
            amount
                .checked_div(global::hit_size(limit.unit))
                .unwrap_or(0)
        };
        let granted = Stat::GlobalLease(tenant, id, "granted");
        host.stat(StatUpdate::Set(granted, in_hits(lease.granted)));
        if lease.remaining != u64::MAX {
            let remaining = Stat::GlobalLease(tenant, id, "remaining");
            host.stat(StatUpdate::Set(remaining, in_hits(lease.remaining)));
        }
    }

    /// Joins the refill of `keys.buckets[limit]`, or starts one.
    #[allow(clippy::too_many_arguments)]
    fn join_refill<H: Host + ?Sized>(
        &self,
        host: &H,
        tenant: &str,
        policy: &TenantPolicy,
        keys: &TenantKeys,
        limit: usize,
        need: u64,
        ticket: u32,
        now_ms: u64,
    ) -> Join {
        let (Some(global), Some(l), Some(key)) = (
            &self.config.global,
            policy.limits.get(limit),
            keys.buckets.get(limit),
        ) else {
            return Join::Unavailable;
        };
        let mut refills = self.refills.borrow_mut();
        if let Some(flight) = refills.flights.get_mut(key) {
            flight.waiters.push(ticket);
            return Join::Waiting;
        }
        // One refill per lease on this Envoy: a claim in the bucket tells the other workers,
        // and a backoff there keeps all of them from asking a failing service.
        let until = now_ms.saturating_add(global.timeout_ms.saturating_add(1_000));
        let claim = budget::claim_refill(host, key, l, (now_ms, until), policy.epoch(now_ms));
        let (claimed, bucket) = match claim {
            Claim::Down => return Join::Unavailable,
            Claim::Busy(bucket) => (false, bucket),
            Claim::Claimed(bucket) => (true, bucket),
        };
        // Without the claim this worker only watches the lease another worker refills.
        let watch = Flight {
            tenant: tenant.to_string(),
            limit,
            window_start: bucket.window_start,
            foreign: true,
            asked: 0,
            message: Vec::new(),
            sent_at: Some(now_ms),
            waiters: vec![ticket],
        };
        if !claimed {
            refills.flights.insert(key.clone(), watch);
            return Join::Waiting;
        }
        let lease = bucket.lease.unwrap_or_default();
        // Once the service refused this window, or a refill got no answer (the service may
        // have counted it), ask for the need alone until an answer comes.
        let remaining = match (lease.refused_at, lease.failures) {
            (u64::MAX, 0) => lease.remaining,
            _ => 0,
        };
        let Some(hits) = global::refill_hits(global, l, need, remaining, lease.granted) else {
            return Join::TooLarge;
        };
        // The counter is the limit's owner's: an ancestor's is shared by every tenant under it.
        let declared = self.config.tenants.contains_key(tenant);
        let (policy_name, scope) = match &l.owner {
            Some(owner) => (owner.as_str(), owner.as_str()),
            None if declared => (tenant, keys.scope.as_str()),
            None => ("~", keys.scope.as_str()),
        };
        // A per-user limit counts each user slot apart: `team-a:u17`.
        let scope = match (l.per_user, keys.user_slot) {
            (true, Some(slot)) => std::borrow::Cow::Owned(format!("{scope}:u{slot}")),
            _ => std::borrow::Cow::Borrowed(scope),
        };
        let entries = global::descriptor(policy_name, &l.name, &scope, &l.window.id(now_ms));
        let message = global.protocol().ask(&global.domain, &entries, hits);
        let own = Flight {
            foreign: false,
            asked: u64::from(hits).saturating_mul(global::hit_size(l.unit)),
            message,
            sent_at: None,
            ..watch
        };
        refills.flights.insert(key.clone(), own);
        Join::Waiting
    }
}

impl Request {
    /// Global limit `limit`'s lease is `need` short: wait for a refill, or decide now when the
    /// service is known to be unreachable.
    pub(super) fn wait_for_lease<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        parked: Parked,
        (limit, need): (usize, u64),
        now: u64,
    ) -> Effects<'g> {
        let who = Some((parked.tenant.clone(), parked.label));
        if parked.attempts >= MAX_ATTEMPTS {
            let refusal = Refusal::RateLimited {
                message: "The global budget is busy; please retry.".into(),
                retry_after_secs: 1,
                kind: "tokens",
            };
            return self.refuse(parked.kind, who, None, &refusal);
        }
        let (policy, keys) = gateway.tenant_budget(&parked.tenant);
        let keys = match parked
            .user_slot
            .and_then(|slot| keys.for_user(policy, slot))
        {
            Some(user_keys) => std::borrow::Cow::Owned(user_keys),
            None => keys,
        };
        let joined = gateway.join_refill(
            host,
            &parked.tenant,
            policy,
            &keys,
            limit,
            need,
            self.ticket,
            now,
        );
        match joined {
            Join::Waiting => {
                self.state = State::Waiting(Box::new(parked));
                Effects {
                    pause: true,
                    wait: true,
                    ..Effects::default()
                }
            }
            Join::Unavailable => {
                let grew = match (policy.limits.get(limit), keys.buckets.get(limit)) {
                    (Some(l), Some(key)) => {
                        let epoch = policy.epoch(now);
                        let start = l.window.start(now);
                        let answer = (Refill::Fallback, start);
                        budget::refill(host, key, l, answer, now, epoch) == Some(true)
                    }
                    _ => false,
                };
                self.state = State::Waiting(Box::new(parked));
                let refilled = if grew {
                    Refilled::Grew
                } else {
                    Refilled::Unavailable
                };
                self.resume(gateway, host, refilled)
            }
            Join::TooLarge => {
                let refusal = Refusal::RateLimited {
                    message: "This request is larger than one refill of the global budget.".into(),
                    retry_after_secs: 1,
                    kind: "tokens",
                };
                self.refuse(parked.kind, who, None, &refusal)
            }
        }
    }

    /// The refill this request waited for ended: admit it again (or refuse it when the service
    /// could not be asked).
    pub fn resume<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        refilled: Refilled,
    ) -> Effects<'g> {
        let effects = self.resume_parked(gateway, host, refilled);
        self.release_body_hold();
        effects
    }

    fn resume_parked<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        refilled: Refilled,
    ) -> Effects<'g> {
        let State::Waiting(parked) = std::mem::take(&mut self.state) else {
            return Effects::proceed();
        };
        let Parked {
            kind,
            tenant,
            label,
            headers,
            body,
            attempts,
            ..
        } = *parked;
        if refilled == Refilled::Unavailable {
            let refusal = Refusal::BudgetUnavailable {
                message: "The global budget service cannot be reached; please retry.".into(),
            };
            return self.refuse(kind, Some((tenant, label)), None, &refusal);
        }
        self.admit_again(
            gateway,
            host,
            kind,
            (tenant, label),
            headers,
            body,
            attempts + 1,
        )
    }
}
