//! Global budgets: limits whose allowance is leased, in chunks, from a rate-limit service that
//! every Envoy replica shares (Envoy's RLS v3, served by Limitador or envoyproxy/ratelimit over
//! Redis). The lease itself lives in the limit's bucket ([`crate::budget::Lease`]); this module
//! has the service's settings, the refill's size, and the protocol a refill speaks
//! ([`LeaseProtocol`]; today [`rls`]).

pub mod limits;
pub mod rls;

use crate::budget::{Limit, Unit};

/// `global_budgets`: where the service is and how leases are sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalBudgets {
    /// The Envoy cluster (HTTP/2) serving `envoy.service.ratelimit.v3.RateLimitService`.
    pub cluster: String,
    /// What a refill's `dispatch_grpc_call` is given to reach it ([`rls::grpc_target`]).
    pub target: String,
    /// The RLS domain (Limitador's namespace).
    pub domain: String,
    /// How long a refill may take before the request is decided without the service.
    pub timeout_ms: u64,
    /// The replicas expected to share each global limit.
    pub replicas: u64,
    /// A refill takes at most this share (thousandths) of what the service has left, split
    /// over the replicas (never less than the request needs).
    pub share_permille: u64,
}

impl GlobalBudgets {
    /// The protocol refills speak (Envoy's RLS v3: the one both engines serve).
    pub fn protocol(&self) -> &'static dyn LeaseProtocol {
        &rls::Rls
    }
}

/// How a refill asks a global counter service for hits and reads its answer. Refills go
/// through it alone, so another protocol (Limitador's atomic Reserve/Commit, say) is one more
/// implementation and a `global_budgets` setting to choose it.
pub trait LeaseProtocol {
    /// The gRPC service and method a refill calls.
    fn method(&self) -> (&'static str, &'static str);
    /// The message asking for `hits` on the counter named by `entries` in `domain`.
    fn ask(&self, domain: &str, entries: &[(&str, String)], hits: u32) -> Vec<u8>;
    /// What the service answered; `None` when the bytes grant nothing (the limit is then
    /// decided without the service).
    fn answer(&self, bytes: &[u8]) -> Option<Answer>;
}

/// What a refill's answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// `OK`: the hits were added. `OVER_LIMIT` or `UNKNOWN`: they were not.
    pub granted: bool,
    /// The counter's remaining hits after the call, if the service said: the descriptor's
    /// status when it names a limit (envoyproxy/ratelimit), else `x-ratelimit-remaining`
    /// (Limitador with `--rate-limit-headers DRAFT_VERSION_03`).
    pub remaining: Option<u64>,
    /// Time until the counter resets, in ms, if the service said (the status's
    /// `duration_until_reset`, else `x-ratelimit-reset` seconds).
    pub reset_ms: Option<u64>,
}

impl Default for GlobalBudgets {
    fn default() -> GlobalBudgets {
        GlobalBudgets {
            cluster: String::new(),
            target: String::new(),
            domain: "tollgate".to_string(),
            timeout_ms: 250,
            replicas: 2,
            share_permille: 100,
        }
    }
}

/// What one hit of the service's counter is worth in the limit's own unit: a token, or a
/// micro-USD (the counters count whole micro-dollars: `hits_addend` is a `uint32`).
pub fn hit_size(unit: Unit) -> u64 {
    match unit {
        Unit::Tokens => 1,
        Unit::PicoUsd => 1_000_000,
    }
}

/// The hits one refill asks for when the lease is `need` short (both in the limit's unit
/// except the result): `share` of what the service has left (as last reported, or else the
/// limit less what this replica was granted) split over the replicas, and never less than the
/// need. `None` when the need alone is more than one call can ask for (`u32::MAX` hits).
pub fn refill_hits(
    global: &GlobalBudgets,
    limit: &Limit,
    need: u64,
    remaining: u64,
    granted: u64,
) -> Option<u32> {
    // What the service says is left is never more than the limit (a chunk never exceeds it).
    let left = match remaining {
        u64::MAX => limit.amount.saturating_sub(granted),
        known => known.min(limit.amount),
    };
    let share = left.saturating_mul(global.share_permille) / 1000 / global.replicas.max(1);
    let want = need.max(share.min(left));
    let size = hit_size(limit.unit);
    let need_hits = need.div_ceil(size);
    let want_hits = want.div_ceil(size);
    u32::try_from(need_hits).ok()?;
    Some(u32::try_from(want_hits).unwrap_or(u32::MAX))
}

/// The descriptor entries that name one global counter: the policy the limit comes from (the
/// tenant, or `~` for undeclared tenants), the limit, the budget scope (the tenant, or its
/// slot) and the window. The fixed entries come first, as envoyproxy/ratelimit's nested
/// descriptors need.
pub fn descriptor(
    policy: &str,
    limit: &str,
    scope: &str,
    window: &str,
) -> [(&'static str, String); 4] {
    [
        ("tollgate.policy", policy.to_string()),
        ("tollgate.limit", limit.to_string()),
        ("tollgate.scope", scope.to_string()),
        ("tollgate.window", window.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::GlobalLimit;
    use crate::window::Window;

    fn limit(unit: Unit, amount: u64) -> Limit {
        Limit {
            name: "tpm".into(),
            unit,
            amount,
            window: Window::Minute,
            model: None,
            global: Some(GlobalLimit::default()),
            owner: None,
            shadow: false,
            per_user: false,
            alert_at: Vec::new(),
        }
    }

    #[test]
    fn refills_shrink_as_the_budget_runs_out_and_cover_the_need() {
        let g = GlobalBudgets {
            replicas: 4,
            share_permille: 200,
            ..GlobalBudgets::default()
        };
        let l = limit(Unit::Tokens, 100_000);
        // Nothing reported yet: a fifth of the limit over four replicas.
        assert_eq!(refill_hits(&g, &l, 10, u64::MAX, 0), Some(5_000));
        assert_eq!(refill_hits(&g, &l, 10, u64::MAX, 60_000), Some(2_000));
        assert_eq!(refill_hits(&g, &l, 10, 8_000, 0), Some(400));
        // Never less than the need, never more than is left unless the need is.
        assert_eq!(refill_hits(&g, &l, 900, 8_000, 0), Some(900));
        assert_eq!(refill_hits(&g, &l, 900, 100, 0), Some(900));
        assert_eq!(refill_hits(&g, &l, 10, 0, 0), Some(10));
    }

    #[test]
    fn a_remaining_above_the_limit_sizes_no_chunk_past_the_limit() {
        let g = GlobalBudgets {
            replicas: 1,
            share_permille: 1000,
            ..GlobalBudgets::default()
        };
        let l = limit(Unit::Tokens, 3_000_000);
        assert_eq!(refill_hits(&g, &l, 10, 14_316_557, 0), Some(3_000_000));
        assert_eq!(
            refill_hits(&g, &l, 10, u64::from(u32::MAX), 0),
            Some(3_000_000)
        );
    }

    #[test]
    fn usd_refills_count_whole_micro_dollars() {
        let g = GlobalBudgets::default();
        // $100 in picodollars; a need of 1.5 micro-dollars asks for 2.
        let l = limit(Unit::PicoUsd, 100_000_000_000_000);
        assert_eq!(refill_hits(&g, &l, 1_500_000, 0, 0), Some(2));
        // Default share: a tenth over two replicas of $100 = $5 = 5,000,000 micro-dollars.
        assert_eq!(refill_hits(&g, &l, 1, u64::MAX, 0), Some(5_000_000));
        // A need beyond one call's uint32 cannot be asked for.
        let big = limit(Unit::Tokens, u64::MAX);
        assert_eq!(refill_hits(&g, &big, 1 << 33, u64::MAX, 0), None);
        assert_eq!(refill_hits(&g, &big, 1, u64::MAX, 0), Some(u32::MAX));
    }
}
