//! After admission: the budget alerts a reservation crossed, counted once per window per Envoy
//! (the crossing is recorded in shared data; each worker remembers what it saw recorded, so a
//! limit past a threshold costs no shared read per request).

use super::{Gateway, Host};
use crate::admission::{Admitted, TenantKeys, TenantPolicy};
use crate::alerts;
use crate::budget::Limit;
use crate::metrics::{Stat, StatUpdate};

pub(super) fn count_crossings<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    (policy, keys): (&TenantPolicy, &TenantKeys),
    tenant: &str,
    admitted: &Admitted,
) {
    for held in &admitted.held {
        let Some(limit) = policy.limits.get(held.limit) else {
            continue;
        };
        let taken = held.after.used.saturating_add(held.after.reserved());
        note(
            gateway,
            host,
            (keys, tenant),
            limit,
            (taken, held.after.window_start),
        );
    }
}

/// Counts the thresholds of `limit` that `taken` (used, and reserved at admission) reaches in
/// the window starting at `window`, unless this Envoy counted them already.
pub(super) fn note<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    (keys, tenant): (&TenantKeys, &str),
    limit: &Limit,
    (taken, window): (u64, u64),
) {
    if limit.alert_at.is_empty() {
        return;
    }
    let reached = alerts::reached(&limit.alert_at, taken, limit.amount);
    if reached == 0 {
        return;
    }
    let owner = limit.owner.as_deref().unwrap_or(&keys.scope);
    let key = alerts::key(owner, &limit.name);
    let mut seen = gateway.alerted.borrow_mut();
    let known = match seen.get(&key) {
        Some((w, mask)) if *w == window => *mask,
        _ => 0,
    };
    if known & reached == reached {
        return;
    }
    let new = alerts::cross(host, &key, window, reached);
    seen.insert(key, (window, known | reached));
    let labels = &gateway.config.labels;
    let tenant_label = labels.tenant_id(limit.owner.as_deref().unwrap_or(tenant));
    let limit_label = labels.limit_id(&limit.name);
    for (i, permille) in limit.alert_at.iter().enumerate() {
        if new & (1 << i) != 0 {
            let stat = Stat::BudgetAlerts(tenant_label, limit_label, *permille);
            host.stat(StatUpdate::Add(stat, 1));
        }
    }
}
