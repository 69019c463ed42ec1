//! Scopes' shares of the table: whose entry a slot holds (the key's scope tag), which live entry
//! of another scope an insert may replace, and the per-scope counters behind
//! `cache.max_entries_per_scope` and `cache.max_bytes_per_scope`.
//!
//! # Fair replacement
//! When an insert finds its set full of live entries, it replaces the least recently used entry
//! among its own scope's entries and those of scopes holding at least two more slots of the set
//! than it does. A scope's only entry in a set is thus never replaced by another scope, and no
//! scope's traffic can push another below an even split of a set (nor take the last slot of a
//! scope holding one more than it): a tenant sending many distinct requests recycles its own
//! slots.
//!
//! # Per-scope caps
//! Scope tags fall into [`SCOPE_BUCKETS`] counters `tg:cache:s:<tag % SCOPE_BUCKETS>` (16 bytes:
//! `0 version = 1 │ 1..4 zero │ 4..8 entries: u32 │ 8..16 bytes: u64`; anything else reads as
//! zero), created with the table. An insert that would take a scope past either cap may only
//! replace the scope's own entry in the set (nothing else: [`StoreOutcome::OverShare`]). Two
//! scopes sharing a bucket share its caps (stricter for both, never looser). The counters follow
//! the table (updated by compare-and-swap once an entry is stored or freed); the check before an
//! insert reads them without a lock, so racing workers can overshoot a cap by one entry each.
//! The table's own caps (`max_entries`, `max_bytes`) stay exact.
//!
//! [`StoreOutcome::OverShare`]: super::StoreOutcome::OverShare

use super::table::Header;
use crate::store::{SharedStore, UpdateError, update};

/// Counters the scope tags are spread over (the key space they add to the table's).
pub const SCOPE_BUCKETS: u32 = 64;
const SHARE_PREFIX: &str = "tg:cache:s:";

pub(super) fn share_key(owner: u32) -> String {
    format!("{SHARE_PREFIX}{}", owner % SCOPE_BUCKETS)
}

/// Every counter key, to create with the table.
pub(super) fn share_keys() -> impl Iterator<Item = String> {
    (0..SCOPE_BUCKETS).map(share_key)
}

/// What a scope's bucket holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Share {
    pub(super) entries: u32,
    pub(super) bytes: u64,
}

const SHARE_VERSION: u8 = 1;
const SHARE_BYTES: usize = 16;

impl Share {
    fn decode(bytes: Option<&[u8]>) -> Share {
        let Some(b) = bytes.filter(|b| b.len() == SHARE_BYTES && b.first() == Some(&1)) else {
            return Share::default();
        };
        let entries = b.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok());
        let held = b.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok());
        Share {
            entries: entries.map_or(0, u32::from_le_bytes),
            bytes: held.map_or(0, u64::from_le_bytes),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SHARE_BYTES);
        out.extend_from_slice(&[SHARE_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.bytes.to_le_bytes());
        out
    }
}

/// What `owner`'s bucket holds now.
pub(super) fn held<S: SharedStore + ?Sized>(store: &S, owner: u32) -> Share {
    Share::decode(store.get(&share_key(owner)).0.as_deref())
}

/// Whether storing `size` bytes for `owner` over the entry `old` keeps the scope within its caps.
pub(super) fn fits(share: Share, caps: (u32, u64), owner: u32, old: &Header, size: u32) -> bool {
    let (max_entries, max_bytes) = caps;
    let own = old.counted && super::key::owner_of(&old.key) == owner;
    let entries = share.entries.saturating_add(u32::from(!own));
    let bytes = share
        .bytes
        .saturating_sub(if own { u64::from(old.held) } else { 0 })
        .saturating_add(u64::from(size));
    entries <= max_entries && bytes <= max_bytes
}

/// Adds an entry of `bytes` to `owner`'s bucket (`add`) or takes one away. Failure (other
/// workers kept writing) leaves the bucket off by one entry until it is next replaced.
pub(super) fn count<S: SharedStore + ?Sized>(store: &S, owner: u32, bytes: u32, add: bool) {
    let _: Result<(), UpdateError<()>> = update(store, &share_key(owner), |current| {
        let mut share = Share::decode(current);
        let bytes = u64::from(bytes);
        if add {
            share.entries = share.entries.saturating_add(1);
            share.bytes = share.bytes.saturating_add(bytes);
        } else {
            share.entries = share.entries.saturating_sub(1);
            share.bytes = share.bytes.saturating_sub(bytes);
        }
        Ok((share.encode(), ()))
    });
}

/// Live or in-flight slots per scope in one set, for fair replacement.
pub(super) struct SetOwners(Vec<(u32, u32)>);

impl SetOwners {
    pub(super) fn of<'h>(headers: impl Iterator<Item = &'h Header>) -> SetOwners {
        let mut counts: Vec<(u32, u32)> = Vec::new();
        for header in headers {
            let owner = super::key::owner_of(&header.key);
            match counts.iter_mut().find(|(o, _)| *o == owner) {
                Some((_, n)) => *n = n.saturating_add(1),
                None => counts.push((owner, 1)),
            }
        }
        SetOwners(counts)
    }

    fn slots_of(&self, owner: u32) -> u32 {
        self.0
            .iter()
            .find(|(o, _)| *o == owner)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether `inserter` may replace a live entry of `victim`: its own, or one of a scope
    /// holding at least two more slots of the set.
    pub(super) fn may_replace(&self, inserter: u32, victim: u32) -> bool {
        victim == inserter || self.slots_of(victim) >= self.slots_of(inserter).saturating_add(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::testing::*;
    use crate::cache::{CacheConfig, CacheKey, StoreOutcome, insert, lookup};
    use sha2::{Digest, Sha256};

    const A: u32 = 1;
    const B: u32 = 2;
    const C: u32 = 3;

    fn put(store: &crate::store::MemStore, c: &CacheConfig, owner: u32, id: u8, now: u64) {
        let k = scoped_key(owner, id);
        insert(store, c, &k, 200, JSON, &body_of(id, 40), now);
    }

    #[test]
    fn another_scopes_traffic_never_evicts_a_lone_entry() {
        // The repro, scaled: 256 slots in sets of 4, B sends 400 distinct requests.
        let c = cfg(256, 1 << 24, 1 << 16, 4);
        let store = fresh(&c);
        put(&store, &c, A, 7, 0);
        for i in 0..400u32 {
            let mut k: [u8; 32] = Sha256::digest(i.to_le_bytes()).into();
            k[28..].copy_from_slice(&B.to_le_bytes());
            insert(&store, &c, &CacheKey(k), 200, JSON, b"{}", 1 + u64::from(i));
        }
        assert_hit_matches(&lookup(&store, &c, &scoped_key(A, 7), 500).unwrap(), 7);
        check(&store, &c);
    }

    #[test]
    fn a_set_is_shared_fairly() {
        // One set of four slots.
        let c = cfg(4, 1 << 20, 1 << 16, 4);
        let store = fresh(&c);
        for id in 1..=4 {
            put(&store, &c, A, id, u64::from(id));
        }
        // B holds nothing: it may take A's least recently used slot, then a second one.
        put(&store, &c, B, 10, 10);
        assert_eq!(lookup(&store, &c, &scoped_key(A, 1), 11), None);
        put(&store, &c, B, 11, 12);
        assert_eq!(lookup(&store, &c, &scoped_key(A, 2), 13), None);
        // Two each: B now recycles its own slots, A keeps its two.
        put(&store, &c, B, 12, 14);
        assert_eq!(lookup(&store, &c, &scoped_key(B, 10), 15), None);
        for id in [3, 4] {
            assert!(lookup(&store, &c, &scoped_key(A, id), 15).is_some());
        }
        // C holds nothing here: two is two more, so C takes the least recently used slot.
        put(&store, &c, C, 20, 16);
        assert!(lookup(&store, &c, &scoped_key(C, 20), 17).is_some());
        // A lone entry is never taken: C's entry survives B's and A's traffic.
        for id in 30..60 {
            put(&store, &c, B, id, 20 + u64::from(id));
            put(&store, &c, A, id, 20 + u64::from(id));
        }
        assert!(lookup(&store, &c, &scoped_key(C, 20), 100).is_some());
        check(&store, &c);
        // A set held by four scopes with one slot each refuses a fifth.
        let store = fresh(&c);
        for owner in 1..=4 {
            put(&store, &c, owner, owner as u8, 0);
        }
        let k = scoped_key(9, 9);
        assert_eq!(
            insert(&store, &c, &k, 200, JSON, b"{}", 1),
            StoreOutcome::NoRoom
        );
        check(&store, &c);
    }

    #[test]
    fn per_scope_caps_hold_and_leave_room_for_others() {
        let c = CacheConfig {
            max_entries_per_scope: 4,
            max_bytes_per_scope: 1_000,
            ..cfg(32, 4_000, 1_000, 4)
        };
        let store = fresh(&c);
        let mut stored = 0;
        for id in 0..100 {
            let k = scoped_key(B, id);
            if let StoreOutcome::Stored { .. } =
                insert(&store, &c, &k, 200, JSON, &body_of(id, 100), u64::from(id))
            {
                stored += 1;
            }
            let share = held(&store, B);
            assert!(share.entries <= 4 && share.bytes <= 1_000, "{share:?}");
        }
        assert!(stored > 4, "B recycles its own slots ({stored})");
        // Bytes: three 300-byte entries fit, a fourth does not.
        for id in 0..4 {
            let k = scoped_key(C, id);
            let out = insert(&store, &c, &k, 200, JSON, &body_of(id, 264), 200);
            let want = if id < 3 { "Stored" } else { "OverShare" };
            assert!(format!("{out:?}").starts_with(want), "{id}: {out:?}");
        }
        // A still finds room.
        let k = scoped_key(A, 1);
        assert!(matches!(
            insert(&store, &c, &k, 200, JSON, &body_of(1, 10), 300),
            StoreOutcome::Stored { .. }
        ));
        check(&store, &c);
        // Once B's entries expire, their share is freed for new ones elsewhere.
        let later = c.ttl_ms + 200;
        for id in 100..140 {
            insert(&store, &c, &scoped_key(B, id), 200, JSON, b"x", later);
            assert!(held(&store, B).entries <= 4);
        }
        check(&store, &c);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Three scopes with caps: the table's caps, the counters and the scopes' caps hold after
        /// every operation.
        #[test]
        fn shares_hold(ops in proptest::collection::vec((0u32..3, 0u8..48, 0usize..400, 0u8..8), 1..800)) {
            let c = CacheConfig {
                ttl_ms: 4_000,
                max_entries_per_scope: 6,
                max_bytes_per_scope: 2_000,
                ..cfg(16, 4_096, 1_024, 4)
            };
            let store = fresh(&c);
            let mut now = 0u64;
            for (owner, id, len, op) in ops {
                let k = scoped_key(owner, id);
                match op {
                    0 => now += 1_000,
                    1 | 2 => {
                        if let Some(hit) = lookup(&store, &c, &k, now) {
                            assert_hit_matches(&hit, id);
                        }
                    }
                    _ => {
                        let out = insert(&store, &c, &k, 200, JSON, &body_of(id, len), now);
                        proptest::prop_assert_ne!(out, StoreOutcome::Contended);
                    }
                }
                check(&store, &c);
                for o in 0..3 {
                    let share = held(&store, o);
                    proptest::prop_assert!(share.entries <= 6 && share.bytes <= 2_000);
                }
            }
        }
    }
}
