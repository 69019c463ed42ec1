//! A global limit's lease refills: which worker of an Envoy asks the rate-limit service, and how
//! an answer (or none) changes the lease in the limit's bucket. See [`crate::budget`] for the
//! lease itself.

use crate::budget::{BACKOFF_MS, Bucket, Lease, Limit, MAX_BACKOFF_MS, read, update_bucket};
use crate::record::BucketAt;
use crate::store::{SharedStore, UpdateError};

/// A refill's answer, applied to a global limit's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// The service granted `amount` (in the limit's unit); it reported `remaining` if it did.
    Granted { amount: u64, remaining: Option<u64> },
    /// The service refused `need`: nothing this large is granted again this window, nor
    /// anything above what it says is left (`remaining`, when it says).
    Refused { need: u64, remaining: Option<u64> },
    /// The service gave no answer: the fallback allowance is granted once per window, if the
    /// limit has one, and the service is not asked again until the backoff ends. `asked`: what
    /// the call asked for if it was sent (the service may have counted it: unconfirmed).
    Unavailable { asked: u64 },
    /// As `Unavailable`, decided without a call (the service failed a moment ago): another
    /// worker's claim on the refill stays.
    Fallback,
}

/// Whether a worker may refill a lease now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This worker claimed it: the bucket as it is now.
    Claimed(Bucket),
    /// Another worker of this Envoy is refilling it.
    Busy(Bucket),
    /// The service failed a moment ago: no one asks it until the backoff ends.
    Down,
}

/// Claims the refill of `limit`'s lease for this worker until `until_ms`, unless another worker
/// of this Envoy is refilling it or the service is backed off.
pub fn claim_refill<S: SharedStore + ?Sized>(
    store: &S,
    key: &BucketAt,
    limit: &Limit,
    (now_ms, until_ms): (u64, u64),
    epoch: u64,
) -> Claim {
    let result = update_bucket(store, key, limit, (now_ms, epoch), |bucket| {
        match bucket.lease.as_mut() {
            Some(lease) if lease.down_until > now_ms => Err(true),
            Some(lease) if lease.refilling_until <= now_ms => {
                lease.refilling_until = until_ms;
                Ok(*bucket)
            }
            _ => Err(false),
        }
    });
    match result {
        Ok(bucket) => Claim::Claimed(bucket),
        Err(UpdateError::Refused(true)) => Claim::Down,
        Err(_) => Claim::Busy(read(store, key, limit, now_ms, epoch)),
    }
}

/// How long the service is not asked after `failures` refills in a row got no answer: 1 s,
/// doubled per failure, at most [`MAX_BACKOFF_MS`].
pub fn backoff_ms(failures: u64) -> u64 {
    let doublings = u32::try_from(failures.saturating_sub(1).min(16)).unwrap_or(16);
    BACKOFF_MS
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF_MS)
}

/// Applies a refill's answer to the lease of `limit` (stored under `key`), if the window is
/// still the one it was asked for (`window_start`): `None` when it turned (the grant belongs
/// to the old window's counter), else whether the lease grew (a granted refill, or a fallback
/// allowance not yet used this window). The refill's claim ends either way.
pub fn refill<S: SharedStore + ?Sized>(
    store: &S,
    key: &BucketAt,
    limit: &Limit,
    (answer, window_start): (Refill, u64),
    now_ms: u64,
    epoch: u64,
) -> Option<bool> {
    let result = update_bucket(store, key, limit, (now_ms, epoch), |bucket| {
        let current = bucket.window_start == window_start;
        let Some(lease) = bucket.lease.as_mut() else {
            return Err(());
        };
        if !matches!(answer, Refill::Fallback) {
            lease.refilling_until = 0;
        }
        match answer {
            Refill::Granted { .. } | Refill::Refused { .. } => {
                lease.failures = 0;
                lease.down_until = 0;
            }
            Refill::Unavailable { asked } => {
                lease.failures = lease.failures.saturating_add(1);
                lease.down_until = now_ms.saturating_add(backoff_ms(lease.failures));
                if current {
                    lease.unconfirmed = lease.unconfirmed.saturating_add(asked);
                }
            }
            Refill::Fallback => {}
        }
        if !current {
            return Ok(None);
        }
        // The service cannot have more left than the limit less what it granted this Envoy:
        // a larger `remaining` (a lying or misconfigured service) is read as that.
        let most = |lease: &Lease| {
            let from_service = lease.granted.saturating_sub(lease.fallback);
            limit.amount.saturating_sub(from_service)
        };
        let grew = match answer {
            Refill::Granted { amount, remaining } => {
                lease.granted = lease.granted.saturating_add(amount);
                if let Some(remaining) = remaining {
                    lease.remaining = remaining.min(most(lease));
                }
                true
            }
            Refill::Refused { need, remaining } => {
                let said = remaining.unwrap_or(u64::MAX).min(most(lease));
                let left = said.min(need.saturating_sub(1));
                lease.refused_at = lease.refused_at.min(left.saturating_add(1));
                lease.remaining = lease.remaining.min(left);
                false
            }
            Refill::Unavailable { .. } | Refill::Fallback => {
                let given = match limit.global.and_then(|g| g.fallback) {
                    Some(allowance) if lease.fallback == 0 && allowance > 0 => {
                        lease.granted = lease.granted.saturating_add(allowance);
                        lease.fallback = allowance;
                        true
                    }
                    _ => false,
                };
                // A refill just lost: what is left of an allowance given earlier this window
                // may pay for the requests that waited (now that the service is backed off).
                let left = lease.fallback_spent < lease.fallback;
                given || (left && matches!(answer, Refill::Unavailable { .. }))
            }
        };
        Ok(Some(grew))
    });
    result.unwrap_or(Some(false))
}
