//! The usage view: every declared tenant's limits, what is used and reserved, and when each
//! window resets, as JSON for operators (served on `usage_view.path` behind a token digest).

use serde::Serialize;

use crate::admission::in_flight;
use crate::budget::{self, Unit};
use crate::config::Config;
use crate::cost::format_usd;
use crate::store::SharedStore;
use crate::window::rfc3339;

#[derive(Serialize)]
struct View<'a> {
    now: String,
    /// The shared-data keys the configuration implies, and how many of them exist.
    shared_keys: KeyCount,
    /// Per-user budgets' slots per tenant (`identity.user_slots`), with `identity.user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_slots: Option<u64>,
    /// Conversation slots per tracked tenant (`conversations.slots`).
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation_slots: Option<u64>,
    tenants: Vec<TenantView<'a>>,
}

/// A per-user limit: its definition (each user's use is in its slot, not listed).
#[derive(Serialize)]
struct UserLimitView<'a> {
    name: &'a str,
    unit: &'static str,
    window: String,
    model: Option<&'a str>,
    limit: serde_json::Value,
}

#[derive(Serialize)]
struct KeyCount {
    bound: usize,
    present: usize,
}

#[derive(Serialize)]
struct TenantView<'a> {
    tenant: &'a str,
    /// The budget tree: the tenant's parent (whose limits its requests must fit too) and the
    /// tenants whose parent it is. Each level lists only its own limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    children: Vec<&'a str>,
    in_flight: u64,
    max_concurrent: Option<u64>,
    limits: Vec<LimitView<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    user_limits: Vec<UserLimitView<'a>>,
}

#[derive(Serialize)]
struct LimitView<'a> {
    name: &'a str,
    unit: &'static str,
    window: String,
    model: Option<&'a str>,
    /// Token counts as integers; USD amounts as exact decimal strings.
    limit: serde_json::Value,
    used: serde_json::Value,
    reserved: serde_json::Value,
    remaining: serde_json::Value,
    resets_at: String,
    /// A global limit: this replica's lease (absent for local limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    global: Option<LeaseView>,
}

/// A global limit's lease on this replica, this window.
#[derive(Serialize)]
struct LeaseView {
    /// Granted by the service (and the fallback allowance) to this replica.
    granted: serde_json::Value,
    /// What this replica has used of it (charged and reserved).
    used: serde_json::Value,
    /// The service's remaining as it last said (`null`: it never said).
    global_remaining: Option<serde_json::Value>,
    /// Of `granted`, the fallback allowance given while the service was unreachable.
    fallback: serde_json::Value,
    /// What the requests the fallback allowance paid for hold (reserved, then charged).
    fallback_used: serde_json::Value,
    /// Asked by refills that got no answer: the service may have counted it.
    unconfirmed: serde_json::Value,
}

fn amount(unit: Unit, value: u64) -> serde_json::Value {
    match unit {
        Unit::Tokens => value.into(),
        Unit::PicoUsd => format_usd(u128::from(value)).into(),
    }
}

/// Renders the view as of `now_ms`, tenants sorted by name.
pub fn render<S: SharedStore + ?Sized>(store: &S, config: &Config, now_ms: u64) -> Vec<u8> {
    let mut names: Vec<&String> = config.tenants.keys().collect();
    names.sort();
    let tenants = names
        .into_iter()
        .filter_map(|name| {
            let tenant = config.tenants.get(name)?;
            let limits = tenant
                .policy
                .limits
                .iter()
                .zip(&tenant.keys.buckets)
                .filter(|(limit, _)| limit.owner.is_none() && !limit.per_user)
                .map(|(limit, key)| {
                    let b = budget::read(store, key, limit, now_ms, tenant.policy.epoch(now_ms));
                    LimitView {
                        name: &limit.name,
                        unit: limit.unit.as_str(),
                        window: limit.window.as_str(),
                        model: limit.model.as_deref(),
                        limit: amount(limit.unit, limit.amount),
                        used: amount(limit.unit, b.used),
                        reserved: amount(limit.unit, b.reserved()),
                        remaining: amount(limit.unit, b.remaining(limit.amount)),
                        resets_at: rfc3339(limit.window.end(now_ms)),
                        global: b.lease.map(|lease| LeaseView {
                            granted: amount(limit.unit, lease.granted),
                            used: amount(limit.unit, b.used.saturating_add(b.reserved())),
                            global_remaining: (lease.remaining != u64::MAX)
                                .then(|| amount(limit.unit, lease.remaining)),
                            fallback: amount(limit.unit, lease.fallback),
                            fallback_used: amount(limit.unit, lease.fallback_spent),
                            unconfirmed: amount(limit.unit, lease.unconfirmed),
                        }),
                    }
                })
                .collect();
            let mut children: Vec<&str> = config
                .tenants
                .iter()
                .filter(|(_, t)| t.policy.ancestors.first() == Some(name))
                .map(|(child, _)| child.as_str())
                .collect();
            children.sort_unstable();
            let user_limits = tenant
                .policy
                .limits
                .iter()
                .filter(|l| l.per_user && l.owner.is_none())
                .map(|l| UserLimitView {
                    name: &l.name,
                    unit: l.unit.as_str(),
                    window: l.window.as_str(),
                    model: l.model.as_deref(),
                    limit: amount(l.unit, l.amount),
                })
                .collect();
            Some(TenantView {
                tenant: name,
                user_limits,
                parent: tenant.policy.ancestors.first().map(String::as_str),
                children,
                in_flight: in_flight(
                    store.get(&tenant.keys.concurrency).0.as_deref(),
                    tenant.policy.epoch(now_ms),
                ),
                max_concurrent: tenant.policy.max_concurrent,
                limits,
            })
        })
        .collect();
    let implied = config.shared_keys();
    let present = implied.iter().filter(|k| store.get(k).0.is_some()).count();
    serde_json::to_vec(&View {
        now: rfc3339(now_ms),
        shared_keys: KeyCount {
            bound: implied.len(),
            present,
        },
        user_slots: config.users.as_ref().map(|u| u.slots),
        conversation_slots: config.conversations.as_ref().map(|c| c.slots),
        tenants,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{Plan, admit};
    use crate::store::MemStore;

    #[test]
    fn shows_used_reserved_and_remaining() {
        let config = Config::from_json(
            br#"{"identity":{"source":"header","header":"x-t"},
                 "tenants":{"a":{"limits":[{"name":"tpm","tokens":100,"window":"minute"},
                                           {"usd":"2.5","window":"day"}]}},
                 "prices":{"*":{"input":"1","output":"2"}}}"#,
        )
        .unwrap();
        let store = MemStore::default();
        let t = &config.tenants["a"];
        let plan = Plan {
            prompt_tokens: 10,
            output_tokens: 20,
            choices: 1,
            predicted_output: 0,
            set_max_tokens: None,
            inject_include_usage: false,
        };
        admit(&store, &t.policy, &t.keys, "m", config.price("m"), plan, 0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&render(&store, &config, 0)).unwrap();
        let tpm = &v["tenants"][0]["limits"][0];
        assert_eq!(
            (tpm["reserved"].as_u64(), tpm["remaining"].as_u64()),
            (Some(30), Some(70))
        );
        assert_eq!(tpm["resets_at"], "1970-01-01T00:01:00Z");
        let usd = &v["tenants"][0]["limits"][1];
        assert_eq!(usd["name"], "usd-day");
        assert_eq!(usd["reserved"], "0.00005");
        assert_eq!(usd["limit"], "2.5");
    }
}
