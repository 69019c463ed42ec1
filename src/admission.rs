//! Admission of one request for one tenant: the per-request checks (model allow-list, max-tokens
//! cap, clamp, strict mode), the estimate, the concurrency slot and the budget reservations; and
//! the settlement that later replaces the estimate with what the request really used.

use hashbrown::{HashMap, HashSet};

use crate::api::Usage;
use crate::budget::{self, Denial, Held, Limit, SlotAsk, Unit};
use crate::cost::Price;
use crate::holdings::{self, Ring};
use crate::record::{BucketAt, Record};
use crate::reply::Refusal;
use crate::routing::Alias;
use crate::store::{SharedStore, UpdateError, update};
use crate::window;

pub use crate::keys::TenantKeys;
pub use crate::plan::{Plan, max_tokens_field, output_reserve, plan};

/// What a tenant may do; declared tenants merge their own fields over `tenant_defaults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    pub limits: Vec<Limit>,
    /// In-flight requests at most.
    pub max_concurrent: Option<u64>,
    /// Per-request cap on the API's max-tokens field.
    pub max_output_tokens: Option<u64>,
    /// Per-request cap on the outputs generated (`n`, `best_of`).
    pub max_choices: Option<u64>,
    /// Output tokens reserved when a request names no max tokens.
    pub default_output_tokens: u64,
    /// Models this tenant may use (`None`: any).
    pub models: Option<HashSet<String>>,
    /// Clamp mode: lower max tokens to what is left instead of refusing, if at least this fits.
    pub clamp_min_output_tokens: Option<u64>,
    /// Strict mode: the estimate is a true upper bound, so admitted usage never passes a limit.
    pub strict: bool,
    /// This tenant's own aliases (over the routing table's).
    pub aliases: HashMap<String, Alias>,
    /// Aliases downgrade once any applicable budget is this many thousandths used.
    pub downgrade_at_permille: Option<u64>,
    /// Length of a reservation epoch: what a request holds expires `holdings::SLOTS - 1` to
    /// `holdings::SLOTS` epochs after it was taken if it is never settled (its VM died).
    pub reservation_epoch_ms: u64,
    /// The tenants above this one (`parent`, its parent, …), nearest first. Their limits are in
    /// `limits` too, each with its `owner`.
    pub ancestors: Vec<String>,
    /// Conversation tracking and its limits (`None`: conversations are not tracked).
    pub conversation: Option<crate::conversation::ConversationLimits>,
}

impl TenantPolicy {
    /// Whether any limit applying to `model` is at least `downgrade_at_permille` used
    /// (counting reservations).
    pub fn past_downgrade_threshold<S: SharedStore + ?Sized>(
        &self,
        store: &S,
        keys: &TenantKeys,
        model: &str,
        now_ms: u64,
    ) -> bool {
        let Some(permille) = self.downgrade_at_permille else {
            return false;
        };
        self.limits
            .iter()
            .zip(&keys.buckets)
            .filter(|(limit, _)| limit.applies_to(model) && !limit.shadow)
            .any(|(limit, key)| {
                let b = budget::read(store, key, limit, now_ms, self.epoch(now_ms));
                let taken = u128::from(b.used.saturating_add(b.reserved())) * 1000;
                taken >= u128::from(limit.amount) * u128::from(permille)
            })
    }

    /// The reservation epoch of `now_ms`.
    pub fn epoch(&self, now_ms: u64) -> u64 {
        now_ms.checked_div(self.reservation_epoch_ms).unwrap_or(0)
    }
}

/// Reservations expire ten minutes after they were taken by default (the shipped routes time
/// out after five).
pub const DEFAULT_RESERVATION_TTL_MS: u64 = 600_000;

impl Default for TenantPolicy {
    fn default() -> Self {
        TenantPolicy {
            limits: Vec::new(),
            max_concurrent: None,
            max_output_tokens: None,
            max_choices: None,
            default_output_tokens: 4096,
            models: None,
            clamp_min_output_tokens: None,
            strict: false,
            aliases: HashMap::new(),
            downgrade_at_permille: None,
            reservation_epoch_ms: holdings::epoch_ms_for_ttl(DEFAULT_RESERVATION_TTL_MS),
            ancestors: Vec::new(),
            conversation: None,
        }
    }
}

/// Rate-limit facts for the response headers: the tightest token limit after admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateInfo {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// An admitted request: what it holds until settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub plan: Plan,
    pub held: Vec<Held>,
    /// The epoch the request's slot in its scope's record was taken in (`None`: it holds none,
    /// e.g. a cache hit).
    pub concurrency: Option<u64>,
    /// The scope's requests in flight once this one took its slot.
    pub in_flight: Option<u64>,
    pub rate: Option<RateInfo>,
    /// The first shadow limit that would have refused it, `tenant/limit` (it was admitted).
    pub shadow_refusal: Option<String>,
}

/// The amount a request's usage counts against `limit`.
fn amount(limit: &Limit, usage: &Usage, price: Option<&Price>, strict: bool) -> u64 {
    match limit.unit {
        Unit::Tokens => usage.input.saturating_add(usage.output),
        Unit::PicoUsd => pico_usd(usage, price, strict),
    }
}

/// What `usage` costs in picodollars at `price` (0 without one); in strict mode the upper
/// bound of an estimate (every input token at the dearest input rate).
pub fn pico_usd(usage: &Usage, price: Option<&Price>, strict: bool) -> u64 {
    let cost = match price {
        Some(p) if strict => p.cost_upper_bound(usage.input, usage.output),
        Some(p) => p.cost(usage),
        None => 0,
    };
    u64::try_from(cost).unwrap_or(u64::MAX)
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// Refused: the reply says why.
    Refused(Refusal),
    /// Refused because a limit is spent: `by` names it, `tenant/limit` (the tenant being the
    /// request's or the ancestor whose budget it is).
    Spent { refusal: Refusal, by: String },
    /// Global limit `limit`'s lease is `need` short: refill it, then try again. Nothing is held.
    Short { limit: usize, need: u64 },
}

impl From<Refusal> for Denied {
    fn from(refusal: Refusal) -> Denied {
        Denied::Refused(refusal)
    }
}

/// Reserves a concurrency slot and every applicable budget, or refuses with a 429 (or a 400
/// when a USD budget applies to a model without a price), or asks for a global lease's refill.
#[allow(clippy::too_many_arguments)]
pub fn admit<S: SharedStore + ?Sized>(
    store: &S,
    policy: &TenantPolicy,
    keys: &TenantKeys,
    model: &str,
    price: Option<&Price>,
    mut plan: Plan,
    now_ms: u64,
) -> Result<Admitted, Denied> {
    let applicable: Vec<usize> = policy
        .limits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.applies_to(model))
        .map(|(i, _)| i)
        .collect();
    if price.is_none()
        && applicable.iter().any(|&i| {
            policy
                .limits
                .get(i)
                .is_some_and(|l| l.unit == Unit::PicoUsd)
        })
    {
        return Err(Denied::Refused(Refusal::BadRequest {
            param: Some("model".into()),
            message: format!(
                "The model '{model}' has no price, so its USD budget cannot be enforced."
            ),
        }));
    }
    let epoch = policy.epoch(now_ms);
    // The scope's own record is always touched: its slots count the request in flight (the
    // in-flight gauge, the view) and, with `max_concurrent`, bound them.
    let slot = SlotAsk {
        record: &keys.concurrency,
        max: policy.max_concurrent.unwrap_or(u64::MAX),
    };
    let mut clamped = false;
    loop {
        let estimate = Usage {
            input: plan.prompt_tokens,
            output: plan.output_tokens,
            ..Usage::default()
        };
        let targets: Vec<(usize, &BucketAt, u64)> = applicable
            .iter()
            .filter_map(|&i| {
                let limit = policy.limits.get(i)?;
                let key = keys.buckets.get(i)?;
                Some((i, key, amount(limit, &estimate, price, policy.strict)))
            })
            .collect();
        match budget::reserve(store, &policy.limits, &targets, Some(slot), (now_ms, epoch)) {
            Ok(reserved) => {
                let held = reserved.held;
                let rate = tightest_tokens(policy, &held, now_ms);
                let shadow_refusal = held
                    .iter()
                    .find(|h| h.over)
                    .and_then(|h| policy.limits.get(h.limit))
                    .map(|l| limit_path(l, keys));
                return Ok(Admitted {
                    plan,
                    held,
                    concurrency: reserved.slot.map(|(taken, _)| taken),
                    in_flight: reserved.slot.map(|(_, count)| count),
                    rate,
                    shadow_refusal,
                });
            }
            Err(denial) => {
                if let Denial::Short { limit, need } = denial {
                    return Err(Denied::Short { limit, need });
                }
                // Clamp mode: one more try with the output that still fits everywhere.
                if !clamped
                    && !matches!(denial, Denial::Busy)
                    && let Some(min) = policy.clamp_min_output_tokens
                    && let Some(fit) =
                        output_that_fits(store, policy, keys, &applicable, &plan, price, now_ms)
                    && let Some(per_output) = fit
                        .saturating_sub(plan.predicted_output)
                        .checked_div(plan.choices.max(1))
                    && per_output >= min
                    && output_reserve(per_output, plan.choices, plan.predicted_output)
                        < plan.output_tokens
                {
                    plan.output_tokens =
                        output_reserve(per_output, plan.choices, plan.predicted_output);
                    plan.set_max_tokens = Some(per_output);
                    clamped = true;
                    continue;
                }
                let by = match &denial {
                    Denial::Exhausted { limit, .. } => {
                        policy.limits.get(*limit).map(|l| limit_path(l, keys))
                    }
                    Denial::Contended | Denial::Short { .. } | Denial::Busy => None,
                };
                let refusal = refusal(policy, denial, now_ms);
                return Err(match by {
                    Some(by) => Denied::Spent { refusal, by },
                    None => Denied::Refused(refusal),
                });
            }
        }
    }
}

/// A limit as the ledger names it: `tenant/limit`, the tenant whose budget it is.
fn limit_path(limit: &Limit, keys: &TenantKeys) -> String {
    format!(
        "{}/{}",
        limit.owner.as_deref().unwrap_or(&keys.scope),
        limit.name
    )
}

/// The largest output reservation every applicable (enforced) limit still has room for.
fn output_that_fits<S: SharedStore + ?Sized>(
    store: &S,
    policy: &TenantPolicy,
    keys: &TenantKeys,
    applicable: &[usize],
    plan: &Plan,
    price: Option<&Price>,
    now_ms: u64,
) -> Option<u64> {
    let mut fit = u64::MAX;
    for &i in applicable {
        let limit = policy.limits.get(i)?;
        if limit.shadow {
            continue;
        }
        let bucket = budget::read(
            store,
            keys.buckets.get(i)?,
            limit,
            now_ms,
            policy.epoch(now_ms),
        );
        let left = bucket.remaining(limit.amount);
        let prompt_only = Usage {
            input: plan.prompt_tokens,
            ..Usage::default()
        };
        let left_after_prompt =
            left.checked_sub(amount(limit, &prompt_only, price, policy.strict))?;
        let per_output_token = match limit.unit {
            Unit::Tokens => 1,
            Unit::PicoUsd => price.map_or(0, |p| p.output),
        };
        if let Some(tokens) = left_after_prompt.checked_div(per_output_token) {
            fit = fit.min(tokens);
        }
    }
    Some(fit)
}

fn refusal(policy: &TenantPolicy, denial: Denial, now_ms: u64) -> Refusal {
    match denial {
        Denial::Exhausted {
            limit,
            remaining,
            reset_ms,
        } => {
            let retry_after_secs = window::retry_after_secs(now_ms, reset_ms);
            // An ancestor's limit says whose it is.
            let whose = |l: &Limit| match &l.owner {
                Some(owner) => format!(" of '{owner}'"),
                None => String::new(),
            };
            match policy.limits.get(limit) {
                Some(l) if l.unit == Unit::PicoUsd => Refusal::QuotaExceeded {
                    message: format!(
                        "You exceeded your current quota: the {} budget '{}'{} is spent until it resets in {retry_after_secs}s.",
                        l.window.as_str(),
                        l.name,
                        whose(l)
                    ),
                    retry_after_secs,
                },
                Some(l) => Refusal::RateLimited {
                    message: format!(
                        "Rate limit reached on tokens per {} ('{}'{}): limit {}, remaining {remaining}. Please try again in {retry_after_secs}s.",
                        l.window.as_str(),
                        l.name,
                        whose(l),
                        l.amount
                    ),
                    retry_after_secs,
                    kind: "tokens",
                },
                None => contended(),
            }
        }
        Denial::Busy => Refusal::RateLimited {
            message: format!(
                "Too many concurrent requests for this tenant (limit {}).",
                policy.max_concurrent.unwrap_or(u64::MAX)
            ),
            retry_after_secs: 1,
            kind: "requests",
        },
        Denial::Contended | Denial::Short { .. } => contended(),
    }
}

fn contended() -> Refusal {
    Refusal::RateLimited {
        message: "The budget store is busy; please retry.".into(),
        retry_after_secs: 1,
        kind: "tokens",
    }
}

fn tightest_tokens(policy: &TenantPolicy, held: &[Held], now_ms: u64) -> Option<RateInfo> {
    held.iter()
        .filter_map(|h| {
            let limit = policy.limits.get(h.limit)?;
            (limit.unit == Unit::Tokens && !limit.shadow).then(|| RateInfo {
                limit: limit.amount,
                remaining: h.after.remaining(limit.amount),
                reset_ms: limit.window.end(now_ms),
            })
        })
        .min_by_key(|r| r.remaining)
}

/// Takes a slot of the count under `key` in `epoch`; returns the epoch to release it from and
/// how many are now taken.
fn acquire_slot<S: SharedStore + ?Sized>(store: &S, key: &str, epoch: u64) -> Option<(u64, u64)> {
    let result: Result<_, UpdateError<()>> = update(store, key, |bytes| {
        let mut slots = in_flight_at(bytes, epoch);
        let taken = slots.hold(1);
        Ok((encode_ring(&slots), (taken, slots.total())))
    });
    result.ok()
}

/// Releases a slot taken in `taken`; returns how many are still taken (`None` under endless
/// contention).
fn release_slot<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    taken: u64,
    epoch: u64,
) -> Option<u64> {
    let result: Result<u64, UpdateError<()>> = update(store, key, |bytes| {
        let mut slots = in_flight_at(bytes, epoch);
        slots.release(taken, 1);
        Ok((encode_ring(&slots), slots.total()))
    });
    result.ok()
}

/// The shared count behind the `tollgate_in_flight{tenant}` gauge of a tenant label that
/// stands for many tenants (a label of one tenant is counted by its record's slots). The gauge
/// is set from it, never moved by ±1, so what a dead VM had in flight leaves the gauge when its
/// slots expire.
pub fn in_flight_key(label: &str) -> String {
    format!("tg:f2:{label}")
}

/// Counts a request in flight under `key` ([`in_flight_key`]): the epoch to leave from, and the
/// new count. `None` under endless contention (the gauge is then left as it is).
pub fn enter_in_flight<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    epoch: u64,
) -> Option<(u64, u64)> {
    acquire_slot(store, key, epoch)
}

/// Counts a request out of `key`; returns the new count.
pub fn leave_in_flight<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    taken: u64,
    epoch: u64,
) -> Option<u64> {
    release_slot(store, key, taken, epoch)
}

fn in_flight_at(bytes: Option<&[u8]>, epoch: u64) -> Ring {
    let mut slots = Ring::decode(bytes.unwrap_or_default());
    slots.advance(epoch);
    slots
}

fn encode_ring(ring: &Ring) -> Vec<u8> {
    let mut out = Vec::with_capacity(holdings::RING_BYTES);
    ring.encode_into(&mut out);
    out
}

/// In-flight requests of a scope as of `epoch`, from its record (slots of requests whose VM
/// died have expired).
pub fn in_flight(record: Option<&[u8]>, epoch: u64) -> u64 {
    let mut slots = Record::decode(record).slots;
    slots.advance(epoch);
    slots.total()
}

/// What a settlement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Writes that failed under contention (for the log; nothing panics).
    pub failed: usize,
    /// The scope's requests in flight once the slot was released.
    pub in_flight: Option<u64>,
    /// For a tenant in a budget tree, and for alerting limits: each settled limit (its index)
    /// and its `used` after.
    pub used: Vec<(usize, u64)>,
}

/// Settles an admitted request with the usage it is charged for.
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    policy: &TenantPolicy,
    keys: &TenantKeys,
    admitted: &Admitted,
    charged: &Usage,
    price: Option<&Price>,
    now_ms: u64,
) -> Settled {
    let actual: Vec<u64> = admitted
        .held
        .iter()
        .map(|h| {
            policy
                .limits
                .get(h.limit)
                .map_or(0, |l| amount(l, charged, price, false))
        })
        .collect();
    let key_refs: Vec<(usize, &BucketAt)> = admitted
        .held
        .iter()
        .filter_map(|h| Some((h.limit, keys.buckets.get(h.limit)?)))
        .collect();
    // What is reported after settlement: every level's use in a budget tree (the budget
    // gauges), and an alerting limit's use (its thresholds).
    let mut used = Vec::new();
    let tree = !policy.ancestors.is_empty();
    let slot = admitted
        .concurrency
        .map(|taken| (keys.concurrency.as_str(), taken));
    let (failed, in_flight) = budget::settle(
        store,
        &policy.limits,
        &key_refs,
        (&admitted.held, &actual),
        slot,
        (now_ms, policy.epoch(now_ms)),
        |limit, value| {
            let alerting = policy
                .limits
                .get(limit)
                .is_some_and(|l| !l.alert_at.is_empty());
            if tree || alerting {
                used.push((limit, value));
            }
        },
    );
    Settled {
        failed,
        in_flight,
        used,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::api::request::{RequestFacts, parse_request};
    use crate::store::MemStore;
    use crate::window::Window;

    fn limit(name: &str, unit: Unit, amount: u64) -> Limit {
        Limit {
            name: name.into(),
            unit,
            amount,
            window: Window::Minute,
            model: None,
            global: None,
            owner: None,
            shadow: false,
            per_user: false,
            alert_at: Vec::new(),
        }
    }

    fn facts(body: &str) -> RequestFacts {
        parse_request(ApiKind::ChatCompletions, body.as_bytes()).unwrap()
    }

    #[test]
    fn allow_list_and_cap() {
        let policy = TenantPolicy {
            models: Some(["a".to_string()].into_iter().collect()),
            max_output_tokens: Some(100),
            ..TenantPolicy::default()
        };
        let f = facts(r#"{"model":"b"}"#);
        assert!(matches!(
            plan(&policy, ApiKind::ChatCompletions, &f, &f.model),
            Err(Refusal::Forbidden { .. })
        ));
        let f = facts(r#"{"model":"a","max_tokens":500}"#);
        assert!(matches!(
            plan(&policy, ApiKind::ChatCompletions, &f, &f.model),
            Err(Refusal::BadRequest { .. })
        ));
        let f = facts(r#"{"model":"a"}"#);
        let p = plan(&policy, ApiKind::ChatCompletions, &f, &f.model).unwrap();
        assert_eq!((p.output_tokens, p.set_max_tokens), (100, None));
    }

    #[test]
    fn strict_mode_bounds_and_forces_max_tokens() {
        let policy = TenantPolicy {
            strict: true,
            default_output_tokens: 50,
            ..TenantPolicy::default()
        };
        let body = r#"{"model":"a","stream":true}"#;
        let p = plan(&policy, ApiKind::ChatCompletions, &facts(body), "a").unwrap();
        assert_eq!(p.prompt_tokens, body.len() as u64);
        assert_eq!(p.set_max_tokens, Some(50));
        assert!(p.inject_include_usage);
    }

    /// Issue 18 A.1: `n` outputs of up to max tokens each, the injected default too.
    #[test]
    fn every_output_is_reserved() {
        let strict = TenantPolicy {
            strict: true,
            default_output_tokens: 50,
            ..TenantPolicy::default()
        };
        let f = facts(r#"{"model":"a","max_tokens":100,"n":20}"#);
        let p = plan(&strict, ApiKind::ChatCompletions, &f, "a").unwrap();
        assert_eq!((p.output_tokens, p.set_max_tokens), (2000, None));
        let f = facts(r#"{"model":"a","n":3}"#);
        let p = plan(&strict, ApiKind::ChatCompletions, &f, "a").unwrap();
        assert_eq!((p.output_tokens, p.set_max_tokens), (150, Some(50)));
        // Not strict: the estimate counts every output too.
        let f = facts(r#"{"model":"a","max_tokens":10,"best_of":4}"#);
        let p = plan(&TenantPolicy::default(), ApiKind::ChatCompletions, &f, "a").unwrap();
        assert_eq!(p.output_tokens, 40);
        let capped = TenantPolicy {
            max_choices: Some(4),
            ..TenantPolicy::default()
        };
        assert!(plan(&capped, ApiKind::ChatCompletions, &f, "a").is_ok());
        let f = facts(r#"{"model":"a","n":5}"#);
        match plan(&capped, ApiKind::ChatCompletions, &f, "a") {
            Err(Refusal::BadRequest { param, .. }) => assert_eq!(param.as_deref(), Some("n")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clamp_mode_lowers_each_output_to_what_fits() {
        let store = MemStore::default();
        let policy = TenantPolicy {
            limits: vec![limit("tpm", Unit::Tokens, 1000)],
            clamp_min_output_tokens: Some(10),
            ..TenantPolicy::default()
        };
        let keys = TenantKeys::new("t", &policy);
        let f = facts(r#"{"model":"a","max_tokens":500,"n":4}"#);
        let p = plan(&policy, ApiKind::ChatCompletions, &f, "a").unwrap();
        let a = admit(&store, &policy, &keys, "a", None, p, 0).unwrap();
        // 1000 - the prompt estimate left, shared by four outputs.
        let per = (1000 - p.prompt_tokens) / 4;
        assert_eq!(a.plan.set_max_tokens, Some(per));
        assert_eq!(a.plan.output_tokens, per * 4);
    }

    #[test]
    fn admit_settle_and_refuse() {
        let store = MemStore::default();
        let policy = TenantPolicy {
            limits: vec![limit("tpm", Unit::Tokens, 100)],
            max_concurrent: Some(1),
            ..TenantPolicy::default()
        };
        let keys = TenantKeys::new("t", &policy);
        let p = Plan {
            prompt_tokens: 10,
            output_tokens: 50,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        };
        let a = admit(&store, &policy, &keys, "m", None, p, 0).unwrap();
        assert_eq!(a.rate.unwrap().remaining, 40);
        // The concurrency slot is taken.
        assert!(matches!(
            admit(&store, &policy, &keys, "m", None, p, 0),
            Err(Denied::Refused(Refusal::RateLimited {
                kind: "requests",
                ..
            }))
        ));
        let used = Usage {
            input: 10,
            output: 20,
            ..Usage::default()
        };
        assert_eq!(settle(&store, &policy, &keys, &a, &used, None, 1).failed, 0);
        // 30 used, 70 left: 60 fits, a second 60 does not.
        let a2 = admit(&store, &policy, &keys, "m", None, p, 2).unwrap();
        settle(
            &store,
            &policy,
            &keys,
            &a2,
            &Usage {
                input: 10,
                output: 50,
                ..Usage::default()
            },
            None,
            3,
        );
        let refused = admit(&store, &policy, &keys, "m", None, p, 4).unwrap_err();
        assert!(matches!(
            &refused,
            Denied::Spent {
                refusal: Refusal::RateLimited {
                    kind: "tokens",
                    retry_after_secs: 60,
                    ..
                },
                by,
            } if by == "t/tpm"
        ));
    }

    #[test]
    fn clamp_lowers_max_tokens_to_what_fits() {
        let store = MemStore::default();
        let policy = TenantPolicy {
            limits: vec![limit("tpm", Unit::Tokens, 100)],
            clamp_min_output_tokens: Some(10),
            ..TenantPolicy::default()
        };
        let keys = TenantKeys::new("t", &policy);
        let big = Plan {
            prompt_tokens: 20,
            output_tokens: 500,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        };
        let a = admit(&store, &policy, &keys, "m", None, big, 0).unwrap();
        assert_eq!(a.plan.set_max_tokens, Some(80));
        // Nothing left: below the clamp minimum, refused.
        assert!(admit(&store, &policy, &keys, "m", None, big, 0).is_err());
    }

    #[test]
    fn usd_budget_needs_a_price_and_refuses_as_quota() {
        let store = MemStore::default();
        let policy = TenantPolicy {
            limits: vec![limit("daily", Unit::PicoUsd, 1_000_000)],
            ..TenantPolicy::default()
        };
        let keys = TenantKeys::new("t", &policy);
        let p = Plan {
            prompt_tokens: 1,
            output_tokens: 1,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        };
        assert!(matches!(
            admit(&store, &policy, &keys, "m", None, p, 0),
            Err(Denied::Refused(Refusal::BadRequest { .. }))
        ));
        let price = Price::new(400_000, 600_000, None, None);
        assert!(admit(&store, &policy, &keys, "m", Some(&price), p, 0).is_ok());
        assert!(matches!(
            admit(&store, &policy, &keys, "m", Some(&price), p, 0),
            Err(Denied::Spent {
                refusal: Refusal::QuotaExceeded { .. },
                ..
            })
        ));
    }
}
