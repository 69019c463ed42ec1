//! Token and cost budgets: one bucket per (tenant, limit) in shared data, reserved before a
//! request goes upstream and settled exactly once with what it really used.
//!
//! A bucket holds `{window_start, used, reserved}`. Admission needs, for every applicable limit,
//! `used + reserved + estimate <= amount` and adds the estimate to `reserved` with
//! compare-and-swap, so concurrent workers can never reserve past a limit. Settlement moves the
//! request's estimate out of `reserved` and its actual usage into `used`. A new window resets
//! `used` but carries `reserved` over: requests admitted in the old window are still in flight,
//! and their settlement lands in the window where it happens.
//!
//! `reserved` is a [`Ring`] of epochs: a reservation whose VM died before settling it expires
//! after the reservation TTL instead of holding the budget until Envoy restarts.
//!
//! A global limit's bucket also holds a [`Lease`]: the allowance this Envoy took from the
//! rate-limit service's counter for the current window. Admission then needs
//! `used + reserved + estimate <= granted` as well; when the lease is short the request waits
//! for a refill ([`Denial::Short`]), and what the service refused is remembered for the window
//! (its counter only grows within a window, so a need it refused is refused until the window
//! turns). A global limit's settlement lands in the window its reservation was taken in: that
//! window's lease paid for it.

use crate::holdings::{RING_BYTES, Ring};
use crate::record::{BucketAt, Record, in_order};

pub use crate::lease::{Claim, Refill, backoff_ms, claim_refill, refill};
use crate::store::{SharedStore, UpdateError, update};
use crate::window::Window;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Input + output tokens.
    Tokens,
    /// Cost in picodollars (1e-12 USD).
    PicoUsd,
}

impl Unit {
    /// The unit's name in limit names and the usage view: `tokens` or `usd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::PicoUsd => "usd",
        }
    }
}

/// One configured limit of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Stable name: part of the shared-data key, so usage survives config edits that keep it.
    pub name: String,
    pub unit: Unit,
    pub amount: u64,
    pub window: Window,
    /// Only requests for this model count against it.
    pub model: Option<String>,
    /// Leased from the rate-limit service's global counter (`None`: this Envoy's own budget).
    pub global: Option<GlobalLimit>,
    /// The ancestor tenant whose budget this is (`parent`, its parent, …): its bucket is the
    /// ancestor's, shared by every tenant under it. `None`: the request's own tenant's.
    pub owner: Option<String>,
    /// Shadow mode: reserved, settled and reported like any limit, but a request it would
    /// refuse is admitted (and says so: `Held::over`).
    pub shadow: bool,
    /// A `user_limits` entry: each end user has a bucket of its own (its slot's).
    pub per_user: bool,
    /// Thresholds in thousandths of `amount`, ascending, whose crossing is counted once per
    /// window (`alerts`).
    pub alert_at: Vec<u16>,
}

/// A global limit's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GlobalLimit {
    /// When the service cannot be reached: what this Envoy may admit on its own per window, in
    /// the limit's unit (`None`: deny).
    pub fallback: Option<u64>,
}

impl Limit {
    pub fn applies_to(&self, model: &str) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
    }
}

/// The shared-data value of one (tenant, limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Start of the window `used` belongs to, ms since the epoch.
    pub window_start: u64,
    pub used: u64,
    /// What requests in flight reserved, by the epoch they reserved it in.
    pub held: Ring,
    /// A global limit's lease for this window.
    pub lease: Option<Lease>,
}

const BUCKET_BYTES: usize = 16 + RING_BYTES;
const LEASE_BYTES: usize = 72;
/// A lease as builds before the refill backoff stored it (read on a VM reload, its new fields 0).
const LEASE_BYTES_V1: usize = 40;

/// After a refill got no answer the service is not asked for this long, doubled per failure in a
/// row up to [`MAX_BACKOFF_MS`] (per Envoy: the lease is in shared data).
pub const BACKOFF_MS: u64 = 1_000;
pub const MAX_BACKOFF_MS: u64 = 8_000;

/// What this Envoy took from a global limit's counter in the current window (amounts in the
/// limit's unit: tokens or picodollars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Allowance granted by the service (and by the fallback allowance), all refills together.
    pub granted: u64,
    /// The counter's remaining as the service last reported it (`u64::MAX`: never reported).
    pub remaining: u64,
    /// The smallest need the service refused this window (`u64::MAX`: none).
    pub refused_at: u64,
    /// Of `granted`, what the fallback allowance gave while the service was unreachable.
    pub fallback: u64,
    /// A worker of this Envoy is refilling the lease until then (ms; 0: none is): the others
    /// wait for it instead of asking too.
    pub refilling_until: u64,
    /// Refills in a row that got no answer (kept across windows; 0 after an answer).
    pub failures: u64,
    /// The service is not asked before then (ms; kept across windows): the backoff.
    pub down_until: u64,
    /// This window, what refills that got no answer asked for after they were sent: the
    /// service may have counted it without granting it (unconfirmed).
    pub unconfirmed: u64,
    /// This window, what the requests the fallback allowance paid for hold: their reservations
    /// while in flight, their charges once settled. At most `fallback` (but for the overage of
    /// requests outside strict mode).
    pub fallback_spent: u64,
}

impl Default for Lease {
    fn default() -> Lease {
        Lease {
            granted: 0,
            remaining: u64::MAX,
            refused_at: u64::MAX,
            fallback: 0,
            refilling_until: 0,
            failures: 0,
            down_until: 0,
            unconfirmed: 0,
            fallback_spent: 0,
        }
    }
}

impl Bucket {
    /// Decodes a stored bucket; absent or foreign bytes read as an empty bucket.
    pub fn decode(bytes: Option<&[u8]>) -> Bucket {
        let field = |i: usize| -> u64 {
            bytes
                .and_then(|b| b.get(i * 8..i * 8 + 8))
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map_or(0, u64::from_le_bytes)
        };
        let lease_at = BUCKET_BYTES / 8;
        match bytes {
            Some(b)
                if [0, LEASE_BYTES_V1, LEASE_BYTES]
                    .contains(&b.len().wrapping_sub(BUCKET_BYTES)) =>
            {
                Bucket {
                    window_start: field(0),
                    used: field(1),
                    held: Ring::decode(b.get(16..BUCKET_BYTES).unwrap_or_default()),
                    lease: (b.len() > BUCKET_BYTES).then(|| Lease {
                        granted: field(lease_at),
                        remaining: field(lease_at + 1),
                        refused_at: field(lease_at + 2),
                        fallback: field(lease_at + 3),
                        refilling_until: field(lease_at + 4),
                        failures: field(lease_at + 5),
                        down_until: field(lease_at + 6),
                        unconfirmed: field(lease_at + 7),
                        fallback_spent: field(lease_at + 8),
                    }),
                }
            }
            _ => Bucket::default(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// The length of [`Bucket::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        BUCKET_BYTES + self.lease.map_or(0, |_| LEASE_BYTES)
    }

    /// Appends the bucket's encoding to `out` (a record's entry, without a copy of its own).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.window_start.to_le_bytes());
        out.extend_from_slice(&self.used.to_le_bytes());
        self.held.encode_into(out);
        if let Some(lease) = &self.lease {
            for field in [
                lease.granted,
                lease.remaining,
                lease.refused_at,
                lease.fallback,
                lease.refilling_until,
                lease.failures,
                lease.down_until,
                lease.unconfirmed,
                lease.fallback_spent,
            ] {
                out.extend_from_slice(&field.to_le_bytes());
            }
        }
    }

    /// The bucket of `limit` as of `now` (and its reservation `epoch`): a new window starts
    /// with nothing used and, for a global limit, an empty lease; reservations are kept;
    /// reservations of expired epochs are gone.
    pub fn at(mut self, limit: &Limit, now_ms: u64, epoch: u64) -> Bucket {
        let start = limit.window.start(now_ms);
        let new_window = start > self.window_start;
        if new_window {
            self.window_start = start;
            self.used = 0;
        }
        self.lease = match (limit.global, self.lease) {
            (None, _) => None,
            (Some(_), Some(lease)) if !new_window => Some(lease),
            // The backoff outlives the window: the service is as slow in the next one.
            (Some(_), Some(lease)) => Some(Lease {
                failures: lease.failures,
                down_until: lease.down_until,
                ..Lease::default()
            }),
            (Some(_), None) => Some(Lease::default()),
        };
        self.held.advance(epoch);
        self
    }

    /// What can still be admitted here without asking anyone: the amount left after what is
    /// used and reserved, and for a global limit also within the lease.
    pub fn room(&self, amount: u64) -> u64 {
        let cap = match &self.lease {
            Some(lease) => lease.granted.min(amount),
            None => amount,
        };
        cap.saturating_sub(self.used.saturating_add(self.reserved()))
    }

    /// What requests in flight hold.
    pub fn reserved(&self) -> u64 {
        self.held.total()
    }

    /// What is left of `amount` after what is used and reserved.
    pub fn remaining(&self, amount: u64) -> u64 {
        amount.saturating_sub(self.used.saturating_add(self.reserved()))
    }
}

/// A reservation held against one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Index of the limit in the tenant's list.
    pub limit: usize,
    pub amount: u64,
    /// The epoch it was held in (its settlement releases it there).
    pub epoch: u64,
    /// The bucket right after the reservation (for rate-limit headers).
    pub after: Bucket,
    /// A global limit's fallback allowance paid for it (the service's grants could not).
    pub fallback: bool,
    /// A shadow limit that would have refused the request (it was reserved anyway).
    pub over: bool,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Limit `limit` has less than the estimate left; it frees up at `reset_ms` at the latest.
    Exhausted {
        limit: usize,
        remaining: u64,
        reset_ms: u64,
    },
    /// The store stayed contended (the request is refused, nothing is held).
    Contended,
    /// Global limit `limit`'s lease is `need` short of the estimate: a refill may admit it.
    Short { limit: usize, need: u64 },
    /// Every concurrency slot is taken.
    Busy,
}

/// A concurrency slot taken with the reservations: one of `max` in the slots of `record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAsk<'a> {
    pub record: &'a str,
    pub max: u64,
}

/// What an admission holds: its reservations, and the concurrency slot it took (the epoch it
/// was taken in, and how many of the record's slots were taken with it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reserved {
    pub held: Vec<Held>,
    pub slot: Option<(u64, u64)>,
}

/// Reserves `amounts[i]` against each `(limit index, bucket)` in `targets`, all or nothing: on
/// a refusal every reservation already made is released again.
pub fn reserve_all<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[Limit],
    targets: &[(usize, &BucketAt, u64)],
    now_ms: u64,
    epoch: u64,
) -> Result<Vec<Held>, Denial> {
    reserve(store, limits, targets, None, (now_ms, epoch)).map(|r| r.held)
}

/// [`reserve_all`], taking a concurrency `slot` too ([`Denial::Busy`] when all are taken).
/// Each record is read and written once, the slot's first, whatever the number of its limits.
pub fn reserve<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[Limit],
    targets: &[(usize, &BucketAt, u64)],
    slot: Option<SlotAsk<'_>>,
    (now_ms, epoch): (u64, u64),
) -> Result<Reserved, Denial> {
    let records = in_order(
        slot.map(|s| s.record),
        targets.iter().map(|t| t.1.record.as_str()),
    );
    let mut done = Reserved::default();
    for key in records {
        let ask = slot.filter(|s| s.record == key);
        let result = update(store, key, |bytes| {
            let mut record = Record::decode(bytes);
            let mut taken = None;
            if let Some(ask) = ask {
                record.slots.advance(epoch);
                if record.slots.total() >= ask.max {
                    return Err(Denial::Busy);
                }
                let in_epoch = record.slots.hold(1);
                taken = Some((in_epoch, record.slots.total()));
            }
            let mut held = Vec::new();
            for &(index, at, amount) in targets.iter().filter(|t| t.1.record == key) {
                let Some(limit) = limits.get(index) else {
                    continue;
                };
                let bucket = record.bucket(at.id).unwrap_or_default();
                let mut bucket = bucket.at(limit, now_ms, epoch);
                let (in_epoch, fallback, over) =
                    reserve_one(&mut bucket, limit, (index, amount), now_ms)?;
                record.put(at.id, bucket);
                held.push(Held {
                    limit: index,
                    amount,
                    epoch: in_epoch,
                    after: bucket,
                    fallback,
                    over,
                });
            }
            Ok((record.encode(), (taken, held)))
        });
        match result {
            Ok((taken, held)) => {
                done.slot = done.slot.or(taken);
                done.held.extend(held);
            }
            Err(err) => {
                let keys: Vec<(usize, &BucketAt)> =
                    targets.iter().map(|&(i, k, _)| (i, k)).collect();
                let zeros = vec![0; done.held.len()];
                let taken = done.slot.zip(slot).map(|((e, _), s)| (s.record, e));
                settle(
                    store,
                    limits,
                    &keys,
                    (&done.held, &zeros),
                    taken,
                    (now_ms, epoch),
                    |_, _| {},
                );
                return Err(match err {
                    UpdateError::Refused(denial) => denial,
                    UpdateError::Contended => Denial::Contended,
                });
            }
        }
    }
    Ok(done)
}

/// Reserves `amount` of limit `index` in its `bucket` (as of now): the epoch it is held in,
/// whether the fallback allowance paid for it, whether a shadow limit would have refused it.
fn reserve_one(
    bucket: &mut Bucket,
    limit: &Limit,
    (index, amount): (usize, u64),
    now_ms: u64,
) -> Result<(u64, bool, bool), Denial> {
    let remaining = bucket.remaining(limit.amount);
    let exhausted = Denial::Exhausted {
        limit: index,
        remaining: bucket.room(limit.amount),
        reset_ms: limit.window.end(now_ms),
    };
    // A shadow limit only notes that it would have refused.
    let over = amount > remaining;
    if over && !limit.shadow {
        return Err(exhausted);
    }
    let mut fallback = false;
    if let Some(lease) = bucket.lease.as_mut() {
        // The service's grants pay first; a request they cannot cover is paid whole by the
        // fallback allowance (with room for it), or waits for a refill.
        let held = bucket.used.saturating_add(bucket.held.total());
        let need = held.saturating_add(amount).saturating_sub(lease.granted);
        let from_service = lease.granted.saturating_sub(lease.fallback);
        let paid = held.saturating_sub(lease.fallback_spent);
        let short = paid.saturating_add(amount).saturating_sub(from_service);
        let spent = lease.fallback_spent.saturating_add(amount);
        // Only while the service is backed off: a healthy service is asked instead.
        let down = lease.down_until > now_ms;
        fallback = short > 0 && need == 0 && spent <= lease.fallback && down;
        if short > 0 && !fallback {
            if short >= lease.refused_at {
                return Err(exhausted);
            }
            return Err(Denial::Short {
                limit: index,
                need: short,
            });
        }
        if fallback {
            lease.fallback_spent = spent;
        }
    }
    Ok((bucket.held.hold(amount), fallback, over))
}

/// Settles reservations: `actual[i]` replaces `held[i].amount`. Returns how many buckets could
/// not be written (contention past the retry bound; logged by the caller).
pub fn settle_all<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[Limit],
    keys: &[(usize, &BucketAt)],
    held: &[Held],
    actual: &[u64],
    now_ms: u64,
    epoch: u64,
) -> usize {
    settle(
        store,
        limits,
        keys,
        (held, actual),
        None,
        (now_ms, epoch),
        |_, _| {},
    )
    .0
}

/// [`settle_all`], releasing the concurrency slot `slot` (its record, the epoch it was taken
/// in) too and telling `settled` each limit's `used` once its settlement is written. Each record
/// is read and written once. Returns the writes that failed and, once the slot is released, how
/// many of its record's slots are still taken.
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    limits: &[Limit],
    keys: &[(usize, &BucketAt)],
    (held, actual): (&[Held], &[u64]),
    slot: Option<(&str, u64)>,
    (now_ms, epoch): (u64, u64),
    mut settled: impl FnMut(usize, u64),
) -> (usize, Option<u64>) {
    let located: Vec<(&Held, u64, &Limit, &BucketAt)> = held
        .iter()
        .zip(actual)
        .filter_map(|(h, &used)| {
            let limit = limits.get(h.limit)?;
            let (_, at) = keys.iter().find(|(i, _)| *i == h.limit)?;
            Some((h, used, limit, *at))
        })
        .collect();
    let records = in_order(
        slot.map(|(record, _)| record),
        located.iter().map(|l| l.3.record.as_str()),
    );
    let (mut failed, mut left) = (0, None);
    for key in records {
        let release = slot.filter(|(record, _)| *record == key);
        let result: Result<_, UpdateError<()>> = update(store, key, |bytes| {
            let mut record = Record::decode(bytes);
            let mut count = None;
            if let Some((_, taken)) = release {
                record.slots.advance(epoch);
                record.slots.release(taken, 1);
                count = Some(record.slots.total());
            }
            let mut used_after = Vec::new();
            for &(h, used, limit, at) in located.iter().filter(|l| l.3.record == key) {
                // A bucket the record no longer has (its limit left the configuration).
                let Some(bucket) = record.bucket(at.id) else {
                    continue;
                };
                let mut bucket = bucket.at(limit, now_ms, epoch);
                settle_one(&mut bucket, h, used);
                record.put(at.id, bucket);
                used_after.push((h.limit, bucket.used));
            }
            Ok((record.encode(), (count, used_after)))
        });
        match result {
            Ok((count, used_after)) => {
                left = left.or(count);
                for (limit, used) in used_after {
                    settled(limit, used);
                }
            }
            Err(_) => {
                failed += located.iter().filter(|l| l.3.record == key).count();
                failed += usize::from(release.is_some());
            }
        }
    }
    (failed, left)
}

/// Moves `h`'s reservation out of `bucket` (as of now) and charges `used`.
fn settle_one(bucket: &mut Bucket, h: &Held, used: u64) {
    // A global limit charges the window whose lease paid for the reservation: a settlement
    // after the window turned only releases what it held.
    let same_window = h.after.window_start >= bucket.window_start;
    if bucket.lease.is_none() || same_window {
        bucket.used = bucket.used.saturating_add(used);
    }
    // What the fallback allowance paid for holds its charge instead of its reservation.
    if let Some(lease) = bucket.lease.as_mut().filter(|_| h.fallback && same_window) {
        let spent = lease.fallback_spent.saturating_sub(h.amount);
        lease.fallback_spent = spent.saturating_add(used);
    }
    bucket.held.release(h.epoch, h.amount);
}

/// Reads a bucket as of `now` (for views and headers).
pub fn read<S: SharedStore + ?Sized>(
    store: &S,
    at: &BucketAt,
    limit: &Limit,
    now_ms: u64,
    epoch: u64,
) -> Bucket {
    let record = Record::decode(store.get(&at.record).0.as_deref());
    record
        .bucket(at.id)
        .unwrap_or_default()
        .at(limit, now_ms, epoch)
}

/// Reads, changes and writes one limit's bucket (as of now) in its record: one
/// compare-and-swap.
pub(crate) fn update_bucket<S, T, E>(
    store: &S,
    at: &BucketAt,
    limit: &Limit,
    (now_ms, epoch): (u64, u64),
    mut apply: impl FnMut(&mut Bucket) -> Result<T, E>,
) -> Result<T, UpdateError<E>>
where
    S: SharedStore + ?Sized,
{
    update(store, &at.record, |bytes| {
        let mut record = Record::decode(bytes);
        let mut bucket = record
            .bucket(at.id)
            .unwrap_or_default()
            .at(limit, now_ms, epoch);
        let out = apply(&mut bucket)?;
        record.put(at.id, bucket);
        Ok((record.encode(), out))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn at(record: &str) -> BucketAt {
        BucketAt {
            record: record.into(),
            id: 1,
        }
    }

    fn tokens(amount: u64) -> Limit {
        Limit {
            name: "tpm".into(),
            unit: Unit::Tokens,
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

    const MIN: u64 = 60_000;

    #[test]
    fn bucket_round_trips_and_ignores_garbage() {
        let mut b = Bucket {
            window_start: 7,
            used: u64::MAX,
            ..Bucket::default()
        };
        b.held.advance(9);
        b.held.hold(3);
        assert_eq!(Bucket::decode(Some(&b.encode())), b);
        assert_eq!(Bucket::decode(Some(b"short")), Bucket::default());
        assert_eq!(Bucket::decode(None), Bucket::default());
    }

    #[test]
    fn reserve_until_full_then_refuse_with_reset() {
        let store = MemStore::default();
        let limits = [tokens(100)];
        let now = 10 * MIN + 5_000;
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 60)], now, 0).is_ok());
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 40)], now, 0).is_ok());
        let denied = reserve_all(&store, &limits, &[(0, &at("k"), 1)], now, 0).unwrap_err();
        assert_eq!(
            denied,
            Denial::Exhausted {
                limit: 0,
                remaining: 0,
                reset_ms: 11 * MIN
            }
        );
    }

    #[test]
    fn settle_replaces_the_estimate_with_actual_usage() {
        let store = MemStore::default();
        let limits = [tokens(100)];
        let held = reserve_all(&store, &limits, &[(0, &at("k"), 80)], 0, 0).unwrap();
        assert_eq!(
            settle_all(&store, &limits, &[(0, &at("k"))], &held, &[30], 1, 0),
            0
        );
        let b = read(&store, &at("k"), &limits[0], 2, 0);
        assert_eq!((b.used, b.reserved()), (30, 0));
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 70)], 3, 0).is_ok());
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let store = MemStore::default();
        let limits = [tokens(1000), tokens(50)];
        let targets = [(0, &at("a"), 60), (1, &at("b"), 60)];
        assert!(matches!(
            reserve_all(&store, &limits, &targets, 0, 0),
            Err(Denial::Exhausted { limit: 1, .. })
        ));
        // The first limit's reservation was released again.
        assert_eq!(read(&store, &at("a"), &limits[0], 0, 0), Bucket::default());
    }

    #[test]
    fn new_window_resets_used_and_keeps_reservations() {
        let store = MemStore::default();
        let limits = [tokens(100)];
        let held = reserve_all(&store, &limits, &[(0, &at("k"), 50)], 30_000, 0).unwrap();
        let done = reserve_all(&store, &limits, &[(0, &at("k"), 50)], 31_000, 0).unwrap();
        settle_all(&store, &limits, &[(0, &at("k"))], &done, &[50], 32_000, 0);
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 1)], 33_000, 0).is_err());
        // Next minute: used is gone, the first request's reservation is still held.
        let b = read(&store, &at("k"), &limits[0], MIN + 1, 0);
        assert_eq!((b.used, b.reserved()), (0, 50));
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 51)], MIN + 1, 0).is_err());
        settle_all(&store, &limits, &[(0, &at("k"))], &held, &[20], MIN + 2, 0);
        let b = read(&store, &at("k"), &limits[0], MIN + 3, 0);
        assert_eq!((b.used, b.reserved()), (20, 0));
    }

    #[test]
    fn a_dead_holders_reservation_expires_and_a_late_settlement_only_adds_usage() {
        let store = MemStore::default();
        let limits = [tokens(100)];
        // Epoch 10: a request reserves 90 and its VM dies; nothing else fits.
        let lost = reserve_all(&store, &limits, &[(0, &at("k"), 90)], 0, 10).unwrap();
        assert!(reserve_all(&store, &limits, &[(0, &at("k"), 20)], 0, 17).is_err());
        // Eight epochs on, the ring has turned past it: the budget is free again.
        let b = read(&store, &at("k"), &limits[0], 0, 18);
        assert_eq!((b.used, b.reserved()), (0, 0));
        let live = reserve_all(&store, &limits, &[(0, &at("k"), 60)], 0, 18).unwrap();
        // Were the lost request settled after all, it adds its usage and releases nothing that
        // a live request holds.
        settle_all(&store, &limits, &[(0, &at("k"))], &lost, &[5], 0, 18);
        let b = read(&store, &at("k"), &limits[0], 0, 18);
        assert_eq!((b.used, b.reserved()), (5, 60));
        settle_all(&store, &limits, &[(0, &at("k"))], &live, &[60], 0, 19);
        let b = read(&store, &at("k"), &limits[0], 0, 19);
        assert_eq!((b.used, b.reserved()), (65, 0));
    }

    #[test]
    fn model_scoped_limits() {
        let mut l = tokens(1);
        l.model = Some("gpt-4o".into());
        assert!(l.applies_to("gpt-4o") && !l.applies_to("gpt-4o-mini"));
        assert!(tokens(1).applies_to("anything"));
    }

    proptest::proptest! {
        /// Any interleaving of reservations and settlements: reserved never goes below what is
        /// still held, and admission never pushes used + reserved past the amount while every
        /// settlement is at most its estimate (strict mode's premise).
        #[test]
        fn never_over_the_limit(ops in proptest::collection::vec((1u64..40, 0u64..=100, proptest::bool::ANY), 1..200)) {
            let store = MemStore::default();
            let limits = [tokens(100)];
            let mut open: Vec<Vec<Held>> = Vec::new();
            for (amount, used_pct, settle) in ops {
                if settle && !open.is_empty() {
                    let held = open.remove(0);
                    let actual = held.first().map_or(0, |h| h.amount * used_pct / 100);
                    settle_all(&store, &limits, &[(0, &at("k"))], &held, &[actual], 0, 0);
                } else if let Ok(held) = reserve_all(&store, &limits, &[(0, &at("k"), amount)], 0, 0) {
                    open.push(held);
                }
                let b = read(&store, &at("k"), &limits[0], 0, 0);
                proptest::prop_assert!(b.used + b.reserved() <= 100);
                let outstanding: u64 = open.iter().flatten().map(|h| h.amount).sum();
                proptest::prop_assert_eq!(b.reserved(), outstanding);
            }
        }
    }
}
