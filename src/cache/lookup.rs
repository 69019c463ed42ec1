//! The read path: a key's set, its live header, and the data value checked again.
//!
//! # Lookup
//! Reads the set's headers (at most `W` gets, nothing else allocated); a ready, unexpired header
//! with the key leads to one read of the data value, whose key, size and format are checked
//! again (a writer may have replaced it in between → miss).

use super::table::{Geometry, Header, data_key, decode_data, header_key};
use super::{CacheConfig, CacheKey, Hit};
use crate::store::SharedStore;

/// A hit refreshes its slot's LRU stamp only when it is at least this old (fewer writes).
const TOUCH_INTERVAL_MS: u64 = 1_000;

/// The cached response for `key`, if a live one is stored.
pub fn lookup<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    key: &CacheKey,
    now_ms: u64,
) -> Option<Hit> {
    for slot in Geometry::of(cfg).set_of(key) {
        let hkey = header_key(slot);
        let (bytes, cas) = store.get(&hkey);
        let header = Header::decode(bytes.as_deref());
        if !header.live(now_ms) || header.key != key.0 {
            continue;
        }
        let Some((status, content_type, body)) =
            decode_data(store.get(&data_key(slot)).0, key, header.held)
        else {
            continue;
        };
        if cas != 0 && now_ms >= header.last_used.saturating_add(TOUCH_INTERVAL_MS) {
            // Best effort: a conflict means someone else just wrote the header.
            let touched = Header {
                last_used: now_ms,
                ..header
            };
            let _ = store.set(&hkey, &touched.encode(), cas);
        }
        return Some(Hit {
            status: u32::from(status),
            content_type,
            body,
            age_ms: now_ms.saturating_sub(header.stored_at),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::table::{DATA_PREFIX_BYTES, encode_data};
    use crate::cache::testing::*;
    use crate::cache::{StoreOutcome, insert, stats};
    use crate::store::FRESH;

    #[test]
    fn hit_after_insert_then_expiry() {
        let c = cfg(16, 1 << 20, 1 << 16, 4);
        let store = fresh(&c);
        let k = chat_key(r#"{"model":"m","temperature":0}"#).unwrap();
        assert_eq!(lookup(&store, &c, &k, 0), None);
        let out = insert(
            &store,
            &c,
            &k,
            200,
            "text/event-stream",
            b"data: hi\n\n",
            1_000,
        );
        assert_eq!(out, StoreOutcome::Stored { evicted: false });
        let hit = lookup(&store, &c, &k, 3_000).unwrap();
        assert_eq!(
            hit,
            Hit {
                status: 200,
                content_type: "text/event-stream".into(),
                body: b"data: hi\n\n".to_vec(),
                age_ms: 2_000,
            }
        );
        assert_eq!(lookup(&store, &c, &key(1), 3_000), None);
        assert_eq!(
            insert(&store, &c, &k, 200, JSON, b"other", 4_000),
            StoreOutcome::AlreadyPresent
        );
        let s = stats(&store);
        assert_eq!(s.entries, 1);
        assert_eq!(s.bytes_held, (DATA_PREFIX_BYTES + 17 + 10) as u64);
        check(&store, &c);
        // Live until stored_at + ttl, exclusive.
        assert!(lookup(&store, &c, &k, 1_000 + c.ttl_ms - 1).is_some());
        assert_eq!(lookup(&store, &c, &k, 1_000 + c.ttl_ms), None);
        // Expired: the same key is stored again, in the same slot.
        let later = 1_000 + c.ttl_ms;
        assert_eq!(
            insert(&store, &c, &k, 203, JSON, b"{}", later),
            StoreOutcome::Stored { evicted: false }
        );
        assert_eq!(lookup(&store, &c, &k, later).unwrap().status, 203);
        assert_eq!(stats(&store).entries, 1);
        check(&store, &c);
    }

    #[test]
    fn lookup_rejects_a_data_value_of_another_key() {
        let c = cfg(1, 1_000, 1_000, 1);
        let store = fresh(&c);
        insert(&store, &c, &key(1), 200, JSON, &[1; 10], 0);
        // Another writer replaced the value after our header read (same size, other key).
        let other = encode_data(&key(2), 200, JSON, &[2; 10]).unwrap();
        store.set(&data_key(0), &other, 0).unwrap();
        assert_eq!(lookup(&store, &c, &key(1), 1), None);
        // A different size is caught too.
        let longer = encode_data(&key(1), 200, JSON, &[1; 11]).unwrap();
        store.set(&data_key(0), &longer, 0).unwrap();
        assert_eq!(lookup(&store, &c, &key(1), 1), None);
        store.set(&data_key(0), FRESH, 0).unwrap();
        assert_eq!(lookup(&store, &c, &key(1), 1), None);
    }

    #[test]
    fn a_lookup_racing_a_writer_misses_or_hits_the_right_body() {
        let c = cfg(1, 1_000, 1_000, 1);
        for at in 0..4 {
            let store = fresh(&c);
            insert(&store, &c, &key(1), 200, JSON, &body_of(1, 10), 0);
            let meddler = Meddler::new(&store, at, |inner| {
                let out = insert(inner, &c, &key(2), 200, JSON, &body_of(2, 10), 1_500);
                assert_eq!(out, StoreOutcome::Stored { evicted: true });
            });
            if let Some(hit) = lookup(&meddler, &c, &key(1), 1_500) {
                assert_hit_matches(&hit, 1);
            }
            check(&store, &c);
        }
    }
}
