//! The write path: claim a slot, reserve its bytes in the meta key, write the value, mark it
//! ready; every step compare-and-swap.
//!
//! # Insert (every step compare-and-swap; contention gives up, never blocks)
//! 1. Read the set's headers and pick a victim: a live entry with the same key, or the same key
//!    being written by another worker, means [`StoreOutcome::AlreadyPresent`]; else the same key
//!    expired; else the stale slot (expired, or a write abandoned for [`WRITE_TIMEOUT_MS`])
//!    holding most bytes; else an empty slot; else the least recently used live entry the key's
//!    scope may replace (LRU eviction, fair between scopes: `share.rs`). A victim that would take
//!    the scope past its caps is skipped; when none is left, free up to [`RECLAIM_SCAN`] stale
//!    slots elsewhere and look again once, then [`StoreOutcome::OverShare`]. A set of live
//!    entries the scope may not replace is [`StoreOutcome::NoRoom`].
//! 2. Claim it: header → `writing` with the new key, keeping the old `held`/counted (so an
//!    abandoned claim is taken over with the right accounting). A lost race re-reads the set (up
//!    to three times), then [`StoreOutcome::Contended`].
//! 3. Reserve in meta: refused unless `bytes_held - held + size <= max_bytes`. On a refusal,
//!    free up to [`RECLAIM_SCAN`] stale or orphaned slots elsewhere in the table and try once
//!    more; still refused → restore the header and answer [`StoreOutcome::NoRoom`] (never
//!    evicts a live entry it will not replace).
//! 4. Write the data value (unconditionally: only the claim holder writes it), then the header
//!    `writing → ready` (expiry `now + ttl`), then move the entry between the scope counters and
//!    release `held - size` if the entry shrank.
//!
//! A worker that traps midway leaves the meta key over-counting (capacity lost, the cap holds);
//! one that traps between the ready header and the scope counters leaves its scope's counter
//! off by that entry until the slot is next replaced.
//!
//! [`WRITE_TIMEOUT_MS`]: super::WRITE_TIMEOUT_MS
//! [`RECLAIM_SCAN`]: super::RECLAIM_SCAN

use super::evict::{Choice, choose, reclaim};
use super::share;
use super::table::{
    DATA_PREFIX_BYTES, Geometry, Header, Refusal, State, data_key, encode_data, header_key,
    release, reserve, version_of,
};
use super::{CacheConfig, CacheKey, StoreOutcome};
use crate::store::SharedStore;

/// Claim attempts of one insert before it reports contention.
const CLAIM_ATTEMPTS: usize = 3;

/// Stores a response under `key` for `cfg.ttl_ms` (see the module documentation).
pub fn insert<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    key: &CacheKey,
    status: u32,
    content_type: &str,
    body: &[u8],
    now_ms: u64,
) -> StoreOutcome {
    let geo = Geometry::of(cfg);
    let Some(status) = u16::try_from(status)
        .ok()
        .filter(|s| (200..=299).contains(s))
    else {
        return StoreOutcome::Rejected;
    };
    if geo.slots == 0 || cfg.ttl_ms == 0 || content_type.len() > usize::from(u8::MAX) {
        return StoreOutcome::Rejected;
    }
    let size = DATA_PREFIX_BYTES
        .saturating_add(content_type.len())
        .saturating_add(body.len());
    let size = u64::try_from(size).unwrap_or(u64::MAX);
    let Some(size32) = u32::try_from(size)
        .ok()
        .filter(|_| size <= cfg.max_entry_bytes && size <= cfg.max_bytes)
    else {
        return StoreOutcome::TooLarge;
    };
    // Caps as large as the table's change nothing: skip reading the counter.
    let capped = cfg.max_entries_per_scope < geo.slots || cfg.max_bytes_per_scope < cfg.max_bytes;
    let caps = (cfg.max_entries_per_scope, cfg.max_bytes_per_scope);
    let mut reclaimed = false;
    for _ in 0..CLAIM_ATTEMPTS {
        let share = capped.then(|| share::held(store, key.owner()));
        let within =
            |old: &Header| share.is_none_or(|s| share::fits(s, caps, key.owner(), old, size32));
        let (slot, old, cas) = match choose(store, geo.set_of(key), key, now_ms, within) {
            Choice::Present => return StoreOutcome::AlreadyPresent,
            Choice::Busy => return StoreOutcome::Contended,
            Choice::Held => return StoreOutcome::NoRoom,
            Choice::OverShare if !reclaimed => {
                // Expired entries of the scope elsewhere may still count against it: free some
                // and look again, once.
                reclaimed = true;
                reclaim(
                    store,
                    &geo,
                    geo.slots,
                    reclaim_start(key, geo.slots),
                    u32::MAX,
                    now_ms,
                );
                continue;
            }
            Choice::OverShare => return StoreOutcome::OverShare,
            Choice::Victim { slot, header, cas } => (slot, header, cas),
        };
        let claim = Header {
            state: State::Writing,
            counted: old.counted,
            held: old.held,
            key: key.0,
            time: now_ms,
            stored_at: 0,
            last_used: 0,
        };
        let hkey = header_key(slot);
        if store.set(&hkey, &claim.encode(), cas).is_err() {
            continue;
        }
        let evicted = old.live(now_ms) && old.key != key.0;
        return write_claimed(
            store,
            cfg,
            &geo,
            key,
            slot,
            old,
            claim,
            Pending {
                size: size32,
                status,
                content_type,
                body,
                evicted,
                now_ms,
            },
        );
    }
    StoreOutcome::Contended
}

/// Where a reclaim scan for `key` starts among `range` slots (spread by the key).
fn reclaim_start(key: &CacheKey, range: u32) -> u32 {
    let start = key.0.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok());
    start.map_or(0, u32::from_le_bytes) % range.max(1)
}

/// The entry an insert is writing.
struct Pending<'a> {
    size: u32,
    status: u16,
    content_type: &'a str,
    body: &'a [u8],
    evicted: bool,
    now_ms: u64,
}

/// Steps 3 and 4 of an insert, with the victim's header claimed.
#[allow(clippy::too_many_arguments)]
fn write_claimed<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    geo: &Geometry,
    key: &CacheKey,
    slot: u32,
    old: Header,
    claim: Header,
    entry: Pending<'_>,
) -> StoreOutcome {
    let hkey = header_key(slot);
    let restore = || {
        if let Some(cas) = version_of(store, &hkey, &claim) {
            let _ = store.set(&hkey, &old.encode(), cas);
        }
    };
    let grow = u64::from(entry.size).saturating_sub(u64::from(old.held));
    let mut reserved = reserve(store, cfg, geo, &old, entry.size, entry.evicted);
    if let Err(Refusal::NoRoom { high_water }) = reserved {
        let range = high_water.max(geo.slots);
        let start = reclaim_start(key, range);
        if reclaim(store, geo, range, start, slot, entry.now_ms) > 0 {
            reserved = reserve(store, cfg, geo, &old, entry.size, entry.evicted);
        }
    }
    match reserved {
        Ok(()) => {}
        Err(Refusal::NoRoom { .. }) => {
            restore();
            return StoreOutcome::NoRoom;
        }
        Err(Refusal::Contended) => {
            restore();
            return StoreOutcome::Contended;
        }
    }
    let Some(value) = encode_data(key, entry.status, entry.content_type, entry.body) else {
        release(store, grow, !old.counted, entry.evicted);
        restore();
        return StoreOutcome::Rejected;
    };
    if store.set(&data_key(slot), &value, 0).is_err() {
        // The old value is still there: give the reservation back and the slot to its entry.
        release(store, grow, !old.counted, entry.evicted);
        restore();
        return StoreOutcome::Contended;
    }
    let ready = Header {
        state: State::Ready,
        counted: true,
        held: entry.size,
        key: key.0,
        time: entry.now_ms.saturating_add(cfg.ttl_ms),
        stored_at: entry.now_ms,
        last_used: entry.now_ms,
    };
    let done = version_of(store, &hkey, &claim)
        .is_some_and(|cas| store.set(&hkey, &ready.encode(), cas).is_ok());
    if !done {
        // Taken over as abandoned (cannot happen within one callback): the new holder accounts
        // from the claim's `held`; what was reserved on top stays counted (over, never under).
        return StoreOutcome::Contended;
    }
    if old.counted {
        share::count(store, old.owner(), old.held, false);
    }
    share::count(store, key.owner(), entry.size, true);
    let shrink = u64::from(old.held).saturating_sub(u64::from(entry.size));
    if shrink > 0 {
        release(store, shrink, false, false);
    }
    StoreOutcome::Stored {
        evicted: entry.evicted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::table::Meta;
    use crate::cache::testing::*;
    use crate::cache::{Hit, META_KEY, SCOPE_BUCKETS, WRITE_TIMEOUT_MS, all_keys, lookup, stats};
    use crate::store::MemStore;

    fn snapshot(store: &MemStore, c: &CacheConfig) -> Vec<Option<Vec<u8>>> {
        all_keys(c).iter().map(|k| store.get(k).0).collect()
    }

    #[test]
    fn too_large_and_rejected_change_nothing() {
        let c = cfg(4, 1_000, 200, 4);
        let store = fresh(&c);
        insert(&store, &c, &key(1), 200, JSON, b"x", 0);
        let before: Vec<_> = all_keys(&c).iter().map(|k| store.get(k)).collect();
        let max_body = 200 - DATA_PREFIX_BYTES - JSON.len();
        let cases = [
            (
                key(2),
                200,
                JSON,
                vec![0; max_body + 1],
                StoreOutcome::TooLarge,
            ),
            (key(2), 404, JSON, vec![0; 1], StoreOutcome::Rejected),
            (key(2), 199, JSON, vec![0; 1], StoreOutcome::Rejected),
            (key(2), 70_000, JSON, vec![0; 1], StoreOutcome::Rejected),
        ];
        for (k, status, ct, body, want) in cases {
            assert_eq!(insert(&store, &c, &k, status, ct, &body, 1), want);
        }
        let long_ct = "x".repeat(256);
        assert_eq!(
            insert(&store, &c, &key(2), 200, &long_ct, b"", 1),
            StoreOutcome::Rejected
        );
        let zero_ttl = CacheConfig { ttl_ms: 0, ..c };
        assert_eq!(
            insert(&store, &zero_ttl, &key(2), 200, JSON, b"", 1),
            StoreOutcome::Rejected
        );
        let after: Vec<_> = all_keys(&c).iter().map(|k| store.get(k)).collect();
        assert_eq!(before, after);
        // Exactly at the entry cap is fine.
        assert!(matches!(
            insert(&store, &c, &key(2), 200, JSON, &vec![0; max_body], 1),
            StoreOutcome::Stored { .. }
        ));
        // An entry bigger than the whole cache can never fit.
        let tiny = cfg(4, 100, 1_000, 4);
        assert_eq!(
            insert(&fresh(&tiny), &tiny, &key(2), 200, JSON, &[0; 100], 1),
            StoreOutcome::TooLarge
        );
        // No slots: nothing to do, nothing to find.
        let none = cfg(0, 1_000, 1_000, 4);
        let store = fresh(&none);
        assert_eq!(store.len(), 1 + SCOPE_BUCKETS as usize);
        assert_eq!(
            insert(&store, &none, &key(2), 200, JSON, b"", 1),
            StoreOutcome::Rejected
        );
        assert_eq!(lookup(&store, &none, &key(2), 1), None);
    }

    #[test]
    fn no_room_when_live_entries_hold_the_bytes() {
        // One set of four; each entry is 300 bytes; the cache holds 1 200.
        let c = cfg(4, 1_200, 1_000, 4);
        let store = fresh(&c);
        let body = 300 - DATA_PREFIX_BYTES - JSON.len();
        for id in 1..=4 {
            insert(
                &store,
                &c,
                &key(id),
                200,
                JSON,
                &body_of(id, body),
                u64::from(id),
            );
        }
        assert_eq!(stats(&store).bytes_held, 1_200);
        let before = snapshot(&store, &c);
        assert_eq!(
            insert(&store, &c, &key(9), 200, JSON, &body_of(9, body + 1), 10),
            StoreOutcome::NoRoom
        );
        assert_eq!(snapshot(&store, &c), before);
        check(&store, &c);
        // Same size fits by replacing the least recently used one.
        assert_eq!(
            insert(&store, &c, &key(9), 200, JSON, &body_of(9, body), 10),
            StoreOutcome::Stored { evicted: true }
        );
        assert_eq!(lookup(&store, &c, &key(1), 11), None);
        check(&store, &c);
    }

    #[test]
    fn abandoned_writes_are_taken_over() {
        let c = cfg(1, 1_000, 1_000, 1);
        let store = fresh(&c);
        insert(&store, &c, &key(1), 200, JSON, &[1; 100], 0);
        // A worker claimed the slot for key 2 at t=5 and died.
        let (bytes, cas) = store.get(&header_key(0));
        let old = Header::decode(bytes.as_deref());
        let claim = Header {
            state: State::Writing,
            key: key(2).0,
            time: 5,
            ..old
        };
        store.set(&header_key(0), &claim.encode(), cas).unwrap();
        assert_eq!(lookup(&store, &c, &key(1), 6), None);
        assert_eq!(
            insert(&store, &c, &key(2), 200, JSON, b"x", 6),
            StoreOutcome::AlreadyPresent
        );
        assert_eq!(
            insert(&store, &c, &key(3), 200, JSON, b"x", 6),
            StoreOutcome::Contended
        );
        let late = 5 + WRITE_TIMEOUT_MS;
        assert_eq!(
            insert(&store, &c, &key(3), 200, JSON, &[3; 10], late),
            StoreOutcome::Stored { evicted: false }
        );
        assert_hit_matches_id(&lookup(&store, &c, &key(3), late).unwrap(), 3);
        check(&store, &c);
    }

    fn assert_hit_matches_id(hit: &Hit, id: u8) {
        assert!(hit.body.iter().all(|b| *b == id));
    }

    #[test]
    fn interleaved_inserts_into_one_set() {
        let c = cfg(2, 1_000, 1_000, 2);
        for at in 0..20 {
            let store = fresh(&c);
            insert(&store, &c, &key(1), 200, JSON, &body_of(1, 100), 0);
            let meddler = Meddler::new(&store, at, |inner| {
                let out = insert(inner, &c, &key(2), 200, JSON, &body_of(2, 300), 1_500);
                assert!(matches!(out, StoreOutcome::Stored { .. }), "{out:?}");
            });
            let out = insert(&meddler, &c, &key(3), 200, JSON, &body_of(3, 400), 1_500);
            assert_ne!(out, StoreOutcome::TooLarge);
            check(&store, &c);
            for id in 1..=3 {
                if let Some(hit) = lookup(&store, &c, &key(id), 2_000) {
                    assert_hit_matches(&hit, id);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Thousands of random inserts, lookups and clock moves on a small table: the caps and
        /// the accounting hold after every operation.
        #[test]
        fn caps_hold(ops in proptest::collection::vec((0u8..64, 0usize..1_100, 0u8..10), 1..2_000)) {
            let c = CacheConfig { ttl_ms: 5_000, ..cfg(16, 4_096, 1_024, 4) };
            let store = fresh(&c);
            let mut now = 0u64;
            for (id, len, op) in ops {
                match op {
                    0 => now += 1_000,
                    1..=3 => {
                        if let Some(hit) = lookup(&store, &c, &key(id), now) {
                            assert_hit_matches(&hit, id);
                        }
                    }
                    _ => {
                        let out = insert(&store, &c, &key(id), 200, JSON, &body_of(id, len), now);
                        let size = DATA_PREFIX_BYTES + JSON.len() + len;
                        proptest::prop_assert_eq!(out == StoreOutcome::TooLarge, size > 1_024);
                        proptest::prop_assert_ne!(out, StoreOutcome::Contended);
                        if matches!(out, StoreOutcome::Stored { .. }) {
                            assert_hit_matches(&lookup(&store, &c, &key(id), now).unwrap(), id);
                        }
                    }
                }
                check(&store, &c);
            }
        }

        /// Another worker's insert or lookup runs between any two steps of an insert.
        #[test]
        fn interleavings_never_corrupt(
            seed in proptest::collection::vec((0u8..6, 0usize..300), 0..6),
            (a, a_len) in (0u8..6, 0usize..400),
            (b, b_len, b_lookup) in (0u8..6, 0usize..400, proptest::bool::ANY),
            at in 0usize..24,
            dt in 0u64..2,
        ) {
            let c = CacheConfig { ttl_ms: 1_000, ..cfg(4, 1_200, 600, 2) };
            let store = fresh(&c);
            for (i, (id, len)) in seed.iter().enumerate() {
                insert(&store, &c, &key(*id), 200, JSON, &body_of(*id, *len), i as u64 * 200);
            }
            let now = 1_000 + dt * 600;
            let meddler = Meddler::new(&store, at, |inner| {
                // Midway through the other insert: what is stored never exceeds what is counted.
                let meta = Meta::decode(inner.get(META_KEY).0.as_deref());
                let stored: u64 = (0..4)
                    .map(|slot| accounted(&inner.get(&data_key(slot)).0.unwrap()))
                    .sum();
                assert!(stored <= meta.bytes_held && meta.bytes_held <= c.max_bytes);
                if b_lookup {
                    if let Some(hit) = lookup(inner, &c, &key(b), now) {
                        assert_hit_matches(&hit, b);
                    }
                } else {
                    insert(inner, &c, &key(b), 200, JSON, &body_of(b, b_len), now);
                }
            });
            insert(&meddler, &c, &key(a), 200, JSON, &body_of(a, a_len), now);
            check(&store, &c);
            for id in 0..6 {
                if let Some(hit) = lookup(&store, &c, &key(id), now) {
                    assert_hit_matches(&hit, id);
                }
            }
        }
    }
}
