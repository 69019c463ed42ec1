//! After admission: the budget alerts a reservation crossed, counted once per window per Envoy
//! (the crossing is recorded in shared data; each worker remembers what it saw recorded, so a
//! limit past a threshold costs no shared read per request), and their webhook events
//! (`alerts`), queued by the worker that recorded the crossing and sent from its root context.

use super::{Callouts, Gateway, Host};
use crate::admission::{Admitted, TenantKeys, TenantPolicy};
use crate::alerts;
use crate::budget::Limit;
use crate::metrics::{Stat, StatUpdate, Webhook};
use crate::webhook;

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
    let owner_name = limit.owner.as_deref().unwrap_or(tenant);
    for (i, permille) in limit.alert_at.iter().enumerate() {
        if new & (1 << i) != 0 {
            let stat = Stat::BudgetAlerts(tenant_label, limit_label, *permille);
            host.stat(StatUpdate::Add(stat, 1));
            let crossing = (owner_name, *permille, taken, window);
            post(gateway, host, limit, crossing);
        }
    }
}

/// Queues the crossing's webhook event (`alerts`) for this worker's root to send.
fn post<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    limit: &Limit,
    (tenant, permille, used, window_start): (&str, u16, u64, u64),
) {
    let Some(hooks) = &gateway.config.alerts else {
        return;
    };
    let replica = gateway.replica.get_or_init(|| {
        let node_id = || host.property(&["node".to_string(), "id".to_string()]);
        let named = hooks.replica.clone().map(String::into_bytes);
        String::from_utf8_lossy(&named.or_else(node_id).unwrap_or_default()).into_owned()
    });
    let now_ms = host.now_ms();
    let crossing = webhook::Crossing {
        tenant,
        limit,
        permille,
        used,
        window_start,
        replica,
        worker: &gateway.worker,
        now_ms,
    };
    let body = webhook::event(&crossing);
    if gateway.outbox.borrow_mut().push(hooks, body, now_ms) {
        gateway.timer.set(true);
    } else {
        host.stat(StatUpdate::Add(Stat::Webhooks(Webhook::Dropped), 1));
    }
}

impl Gateway {
    /// Sends the webhook events due (from the root context, whose timer runs while any wait)
    /// and gives up on calls out too long.
    pub(super) fn post_due<H: Host + Callouts + ?Sized>(&self, host: &H, now_ms: u64) {
        let Some(hooks) = &self.config.alerts else {
            return;
        };
        let due = self.outbox.borrow_mut().due(hooks, now_ms);
        for post in due {
            match host.post(hooks, &post.body) {
                Some(token) => {
                    host.stat(StatUpdate::Add(Stat::Webhooks(Webhook::Sent), 1));
                    self.outbox.borrow_mut().sent(token, post, now_ms);
                }
                None => {
                    let outcome = self.outbox.borrow_mut().unsent(hooks, post, now_ms);
                    count(host, outcome);
                }
            }
        }
        let overdue = self.outbox.borrow_mut().overdue(hooks, now_ms);
        overdue.into_iter().for_each(|outcome| count(host, outcome));
    }

    /// Webhook call `token` answered with HTTP `status` (`None`: it failed or timed out).
    pub fn webhook_answered<H: Host + ?Sized>(&self, host: &H, token: u32, status: Option<u16>) {
        let Some(hooks) = &self.config.alerts else {
            return;
        };
        let now_ms = host.now_ms();
        let outcome = (self.outbox.borrow_mut()).answered(hooks, token, status, now_ms);
        if let Some(outcome) = outcome {
            count(host, outcome);
        }
    }

    /// How long the root's timer may sleep (ms; 0: off): 1 while refills are pending, else
    /// until the next webhook event is due.
    pub fn tick_period(&self, now_ms: u64) -> u64 {
        if self.refills_pending() {
            return 1;
        }
        self.outbox.borrow().next_tick(now_ms).unwrap_or(0)
    }

    /// Whether a request queued a webhook event since the last call (its host starts the
    /// root's timer).
    pub fn take_timer(&self) -> bool {
        self.timer.replace(false)
    }
}

fn count<H: Host + ?Sized>(host: &H, outcome: webhook::Outcome) {
    let stat = match outcome {
        webhook::Outcome::Delivered => Webhook::Delivered,
        webhook::Outcome::Retrying => return,
        webhook::Outcome::Failed => Webhook::Failed,
    };
    host.stat(StatUpdate::Add(Stat::Webhooks(stat), 1));
}
