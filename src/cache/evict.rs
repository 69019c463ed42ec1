//! Eviction: which slot of its set an insert replaces (same key, stale, empty, then the least
//! recently used), and reclaiming stale and orphaned slots elsewhere when the bytes cap
//! refuses an insert (steps 1 and 3 of an insert).

use std::ops::Range;

use super::CacheKey;
use super::share::{SetOwners, count};
use super::table::{
    Geometry, Header, State, data_key, header_key, read_header, release, version_of,
};
use crate::store::{FRESH, SharedStore};

/// How many slots an insert that found no room inspects for stale entries to free.
pub const RECLAIM_SCAN: u32 = 8;

pub(super) enum Choice {
    Present,
    Busy,
    /// Every slot is live and held by scopes the inserter may not replace (fair replacement).
    Held,
    /// The only slots the inserter may replace would take its scope past its share.
    OverShare,
    Victim {
        slot: u32,
        header: Header,
        cas: u32,
    },
}

/// Picks the slot of `set` an insert of `key` replaces; `within_share(old)` says whether
/// replacing the entry `old` keeps the key's scope within its caps.
pub(super) fn choose<S: SharedStore + ?Sized>(
    store: &S,
    set: Range<u32>,
    key: &CacheKey,
    now_ms: u64,
    within_share: impl Fn(&Header) -> bool,
) -> Choice {
    let mut headers: Vec<(u32, Header, u32)> = Vec::with_capacity(set.len());
    for slot in set {
        let (header, cas) = read_header(store, slot);
        // cas 0: not created and could not be (a write could not be compare-and-swapped).
        if cas != 0 {
            headers.push((slot, header, cas));
        }
    }
    let held = |h: &Header| h.state != State::Empty && !h.stale(now_ms);
    if headers.iter().any(|(_, h, _)| held(h) && h.key == key.0) {
        return Choice::Present;
    }
    let owners = SetOwners::of(headers.iter().map(|(_, h, _)| h).filter(|h| held(h)));
    let me = key.owner();
    let (mut fair_refused, mut share_refused) = (false, false);
    // Lower is better: (rank, order).
    let mut best: Option<((u8, u64), u32, Header, u32)> = None;
    for (slot, header, cas) in headers {
        let stale = header.stale(now_ms);
        let rank = match header.state {
            State::Writing if !stale => continue,
            _ if stale && header.key == key.0 => (0, 0),
            _ if stale => (1, u64::from(u32::MAX - header.held)),
            State::Empty => (2, 0),
            _ if owners.may_replace(me, header.owner()) => (3, header.last_used),
            _ => {
                fair_refused = true;
                continue;
            }
        };
        if !within_share(&header) {
            share_refused = true;
            continue;
        }
        if best.as_ref().is_none_or(|(r, ..)| rank < *r) {
            best = Some((rank, slot, header, cas));
        }
    }
    match best {
        Some((_, slot, header, cas)) => Choice::Victim { slot, header, cas },
        None if share_refused => Choice::OverShare,
        None if fair_refused => Choice::Held,
        None => Choice::Busy,
    }
}

/// Frees stale slots (expired or abandoned) and orphaned ones (beyond the configured table) among
/// up to [`RECLAIM_SCAN`] slots of `0..range` from `start`, skipping `skip`. Returns the bytes
/// freed.
pub(super) fn reclaim<S: SharedStore + ?Sized>(
    store: &S,
    geo: &Geometry,
    range: u32,
    start: u32,
    skip: u32,
    now_ms: u64,
) -> u64 {
    let mut freed = 0u64;
    for i in 0..RECLAIM_SCAN.min(range) {
        let slot = u32::try_from((u64::from(start) + u64::from(i)) % u64::from(range)).unwrap_or(0);
        if slot == skip {
            continue;
        }
        let hkey = header_key(slot);
        let (bytes, cas) = store.get(&hkey);
        let header = Header::decode(bytes.as_deref());
        let orphan = slot >= geo.slots && header.state == State::Ready;
        if cas == 0 || !(header.stale(now_ms) || orphan) {
            continue;
        }
        let claim = Header {
            state: State::Writing,
            time: now_ms,
            ..header
        };
        if store.set(&hkey, &claim.encode(), cas).is_err() {
            continue;
        }
        if store.set(&data_key(slot), FRESH, 0).is_err() {
            if let Some(cas) = version_of(store, &hkey, &claim) {
                let _ = store.set(&hkey, &header.encode(), cas);
            }
            continue;
        }
        let emptied = version_of(store, &hkey, &claim)
            .is_some_and(|cas| store.set(&hkey, &Header::EMPTY.encode(), cas).is_ok());
        if emptied {
            release(store, u64::from(header.held), header.counted, false);
            if header.counted {
                count(store, header.owner(), header.held, false);
            }
            freed = freed.saturating_add(u64::from(header.held));
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::table::DATA_PREFIX_BYTES;
    use crate::cache::testing::*;
    use crate::cache::{CacheConfig, StoreOutcome, insert, lookup, stats};

    #[test]
    fn expired_slots_are_reused_before_empty_ones() {
        let c = cfg(4, 1 << 20, 1 << 16, 4);
        let store = fresh(&c);
        assert!(matches!(
            insert(&store, &c, &key(1), 200, JSON, &[1; 100], 0),
            StoreOutcome::Stored { .. }
        ));
        let later = c.ttl_ms;
        assert_eq!(
            insert(&store, &c, &key(2), 200, JSON, &[2; 10], later),
            StoreOutcome::Stored { evicted: false }
        );
        let s = stats(&store);
        assert_eq!((s.entries, s.evictions), (1, 0));
        assert_eq!(s.bytes_held, (DATA_PREFIX_BYTES + JSON.len() + 10) as u64);
        check(&store, &c);
    }

    #[test]
    fn lru_eviction_when_the_set_is_full() {
        let c = cfg(4, 1 << 20, 1 << 16, 4);
        let store = fresh(&c);
        for id in 1..=4 {
            let now = u64::from(id) * 2_000;
            assert_eq!(
                insert(&store, &c, &key(id), 200, JSON, &body_of(id, 50), now),
                StoreOutcome::Stored { evicted: false }
            );
        }
        // Key 1 is used again: key 2 is now the least recently used.
        assert!(lookup(&store, &c, &key(1), 10_000).is_some());
        assert_eq!(
            insert(&store, &c, &key(5), 200, JSON, &body_of(5, 50), 11_000),
            StoreOutcome::Stored { evicted: true }
        );
        assert_eq!(lookup(&store, &c, &key(2), 11_000), None);
        for id in [1, 3, 4, 5] {
            assert_hit_matches(&lookup(&store, &c, &key(id), 11_000).unwrap(), id);
        }
        let s = stats(&store);
        assert_eq!((s.entries, s.evictions), (4, 1));
        check(&store, &c);
    }

    #[test]
    fn no_room_reclaims_expired_entries_in_other_sets() {
        // Two sets of one slot each; an expired big entry elsewhere blocks a new one.
        let c = cfg(2, 1_000, 1_000, 1);
        let store = fresh(&c);
        let (a, b) = {
            let mut ids = (0..=255u8).map(|i| (i, Geometry::of(&c).set_of(&key(i)).start));
            let a = ids.find(|(_, s)| *s == 0).unwrap().0;
            let b = ids.find(|(_, s)| *s == 1).unwrap().0;
            (a, b)
        };
        insert(&store, &c, &key(a), 200, JSON, &body_of(a, 900), 0);
        assert_eq!(
            insert(&store, &c, &key(b), 200, JSON, &body_of(b, 500), 1),
            StoreOutcome::NoRoom
        );
        check(&store, &c);
        assert_eq!(
            insert(&store, &c, &key(b), 200, JSON, &body_of(b, 500), c.ttl_ms),
            StoreOutcome::Stored { evicted: false }
        );
        assert_hit_matches(&lookup(&store, &c, &key(b), c.ttl_ms).unwrap(), b);
        assert_eq!(stats(&store).entries, 1);
        check(&store, &c);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The table shrinks and its set layout changes: orphaned slots are reclaimed, the caps
        /// and the accounting still hold, the key space is the largest table's.
        #[test]
        fn reconfiguration_keeps_the_caps(
            ops in proptest::collection::vec((0u8..64, 0usize..500, 0u8..8), 1..600),
        ) {
            let big = CacheConfig { ttl_ms: 3_000, ..cfg(16, 4_096, 1_024, 4) };
            let small = CacheConfig { max_entries: 6, ways: 3, max_bytes: 2_048, ..big };
            let store = fresh(&big);
            let mut now = 0u64;
            for (i, (id, len, op)) in ops.into_iter().enumerate() {
                let c = if i < 200 { &big } else { &small };
                match op {
                    0 => now += 700,
                    1 | 2 => {
                        if let Some(hit) = lookup(&store, c, &key(id), now) {
                            assert_hit_matches(&hit, id);
                        }
                    }
                    _ => {
                        insert(&store, c, &key(id), 200, JSON, &body_of(id, len), now);
                    }
                }
                // The bytes cap that matters is the one in force when bytes were added.
                check(&store, &big);
                proptest::prop_assert_eq!(slots_in(&store), 16);
            }
        }
    }
}
