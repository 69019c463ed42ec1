//! A scope's record: one shared-data value per budget scope (a tenant, an undeclared tenant's
//! slot, a user slot) holding the scope's concurrency slots and the bucket of every limit the
//! scope owns. A request reads and writes each record it touches once, at admission and at
//! settlement, whatever the number of its limits: a tenant whose limits are all its own makes
//! one shared-data read and one write each time (one compare-and-swap, so the record's buckets
//! and slots change together or not at all).
//!
//! A bucket is found in its record by its limit's id (a hash of the limit's name), so usage
//! survives configuration edits that keep the name. Only admission and refills add a bucket
//! (for a configured limit); `on_configure` drops the buckets of limits the configuration no
//! longer has, so a record holds at most the limits of the current configuration and of the one
//! before it.

use crate::budget::Bucket;
use crate::holdings::{RING_BYTES, Ring};
use crate::keys::RecordPlan;
use crate::store::{SharedStore, UpdateError, update};

/// The value format (the `3` in `tg:r3:` keys).
const VERSION: u8 = 3;

/// Where one limit's bucket is: its scope's record and the limit's id in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketAt {
    pub record: String,
    pub id: u64,
}

/// The shared-data key of a scope's record (`scope` may name a user slot: `team:u3`).
pub fn record_key(scope: &str) -> String {
    format!("tg:r3:{scope}")
}

/// The records a request touches, each once (read and written once), `first` first, then in the order `rest` names them.
pub(crate) fn in_order<'a>(
    first: Option<&'a str>,
    rest: impl Iterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut records: Vec<&str> = first.into_iter().collect();
    for key in rest {
        if !records.contains(&key) {
            records.push(key);
        }
    }
    records
}

/// A limit's id in its record: FNV-1a of its name (stable across builds and processes).
pub fn limit_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One scope's record, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The scope's requests in flight, by the epoch they entered in (its concurrency slots).
    pub slots: Ring,
    /// The buckets of the scope's limits, by limit id.
    pub buckets: Vec<(u64, Bucket)>,
}

impl Record {
    /// Decodes a stored record; absent, fresh or foreign bytes read as an empty record, and a
    /// truncated entry ends the list.
    pub fn decode(bytes: Option<&[u8]>) -> Record {
        let Some(rest) = bytes
            .and_then(|b| b.strip_prefix(&[VERSION]))
            .filter(|b| b.len() >= RING_BYTES)
        else {
            return Record::default();
        };
        let (ring, mut rest) = rest.split_at(RING_BYTES);
        let mut record = Record {
            slots: Ring::decode(ring),
            buckets: Vec::new(),
        };
        while let Some((head, tail)) = rest.split_first_chunk::<10>() {
            let (id, len) = head.split_at(8);
            let id = <[u8; 8]>::try_from(id).map_or(0, u64::from_le_bytes);
            let len = <[u8; 2]>::try_from(len).map_or(0, u16::from_le_bytes);
            let Some((bucket, tail)) = tail.split_at_checked(usize::from(len)) else {
                break;
            };
            record.buckets.push((id, Bucket::decode(Some(bucket))));
            rest = tail;
        }
        record
    }

    pub fn encode(&self) -> Vec<u8> {
        let entries: usize = self.buckets.iter().map(|(_, b)| 10 + b.encoded_len()).sum();
        let mut out = Vec::with_capacity(1 + RING_BYTES + entries);
        out.push(VERSION);
        self.slots.encode_into(&mut out);
        for (id, bucket) in &self.buckets {
            out.extend_from_slice(&id.to_le_bytes());
            let len = u16::try_from(bucket.encoded_len()).unwrap_or(0);
            out.extend_from_slice(&len.to_le_bytes());
            bucket.encode_into(&mut out);
        }
        out
    }

    /// The bucket of limit `id`, if the record has one.
    pub fn bucket(&self, id: u64) -> Option<Bucket> {
        self.buckets.iter().find(|(i, _)| *i == id).map(|(_, b)| *b)
    }

    /// Stores the bucket of limit `id` (added if the record had none).
    pub fn put(&mut self, id: u64, bucket: Bucket) {
        match self.buckets.iter_mut().find(|(i, _)| *i == id) {
            Some((_, b)) => *b = bucket,
            None => self.buckets.push((id, bucket)),
        }
    }

    /// Drops the buckets of limits not in `known`; whether it dropped any.
    pub fn retain(&mut self, known: &[u64]) -> bool {
        let before = self.buckets.len();
        self.buckets.retain(|(id, _)| known.contains(id));
        self.buckets.len() != before
    }
}

/// Readies one record at configuration time: drops the buckets of limits the configuration no
/// longer has and, for a record not written yet, starts it from the keys builds before the
/// records kept its buckets in, so a code update that keeps the `vm_id` keeps the current
/// windows' usage and leases. Their reservations stay behind: the requests the old code has in
/// flight settle into the old keys (a reservation carried over would hold the budget until it
/// expires). Returns whether it wrote the record.
pub fn prepare<S: SharedStore + ?Sized>(store: &S, key: &str, plan: &RecordPlan) -> bool {
    let result: Result<(), UpdateError<()>> = update(store, key, |bytes| {
        let mut record = Record::decode(bytes);
        let mut changed = record.retain(&plan.ids);
        if bytes.is_none_or(|b| b.first() != Some(&VERSION)) {
            for (id, legacy) in &plan.legacy {
                if let (Some(old), _) = store.get(legacy) {
                    let bucket = Bucket {
                        held: Ring::default(),
                        ..Bucket::decode(Some(&old))
                    };
                    record.put(*id, bucket);
                    changed = true;
                }
            }
        }
        if changed {
            Ok((record.encode(), ()))
        } else {
            Err(())
        }
    });
    result.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket of the minute starting at 60 s: `used`, and `held` reserved in `epoch`.
    fn bucket_holding(used: u64, epoch: u64, held: u64) -> Bucket {
        let mut bucket = Bucket {
            window_start: 60_000,
            used,
            ..Bucket::default()
        };
        bucket.held.advance(epoch);
        bucket.held.hold(held);
        bucket
    }

    #[test]
    fn round_trips_and_reads_garbage_as_empty() {
        let mut record = Record::default();
        record.slots.advance(4);
        record.slots.hold(2);
        let bucket = bucket_holding(12, 4, 30);
        record.put(limit_id("tpm"), bucket);
        let global = Bucket {
            lease: Some(crate::budget::Lease::default()),
            ..Bucket::default()
        };
        record.put(limit_id("usd"), global);
        let bytes = record.encode();
        assert_eq!(Record::decode(Some(&bytes)), record);
        assert_eq!(record.bucket(limit_id("tpm")), Some(bucket));
        assert_eq!(record.bucket(limit_id("tpd")), None);
        for garbage in [&b""[..], &[0], &b"tg"[..], &[3, 1, 2]] {
            assert_eq!(Record::decode(Some(garbage)), Record::default());
        }
        assert_eq!(Record::decode(None), Record::default());
        // A truncated entry ends the list; what came before it is kept.
        let cut = Record::decode(bytes.get(..bytes.len() - 1));
        assert_eq!(cut.buckets.len(), 1);
        assert_eq!(cut.slots, record.slots);
    }

    #[test]
    fn retain_drops_limits_the_configuration_no_longer_has() {
        let mut record = Record::default();
        record.put(1, Bucket::default());
        record.put(2, Bucket::default());
        assert!(!record.retain(&[1, 2, 3]));
        assert!(record.retain(&[2]));
        assert_eq!(record.buckets.len(), 1);
        assert_eq!(limit_id("tpm"), limit_id("tpm"));
        assert_ne!(limit_id("tpm"), limit_id("tpd"));
    }

    #[test]
    fn a_new_record_starts_from_the_old_keys_once_and_drops_removed_limits() {
        use crate::store::{FRESH, MemStore, ensure};
        let store = MemStore::default();
        let old = bucket_holding(500, 1, 30);
        store.set("tg:b2:team:tpm", &old.encode(), 0).unwrap();
        let plan = RecordPlan {
            ids: vec![limit_id("tpm"), limit_id("tpd")],
            legacy: vec![
                (limit_id("tpm"), "tg:b2:team:tpm".into()),
                (limit_id("tpd"), "tg:b2:team:tpd".into()),
            ],
        };
        assert!(ensure(&store, "tg:r3:team", FRESH));
        assert!(prepare(&store, "tg:r3:team", &plan));
        let read = |store: &MemStore| Record::decode(store.get("tg:r3:team").0.as_deref());
        let record = read(&store);
        // Usage and window carried over; the old code's reservations stay behind.
        let tpm = record.bucket(limit_id("tpm")).unwrap();
        assert_eq!(
            (tpm.window_start, tpm.used, tpm.reserved()),
            (60_000, 500, 0)
        );
        assert_eq!(record.bucket(limit_id("tpd")), None);
        // Written once: a later configuration neither migrates again nor writes.
        store
            .set("tg:b2:team:tpm", &Bucket::default().encode(), 0)
            .unwrap();
        assert!(!prepare(&store, "tg:r3:team", &plan));
        assert_eq!(read(&store), record);
        // A limit the configuration dropped leaves the record.
        let fewer = RecordPlan {
            ids: vec![limit_id("tpd")],
            legacy: Vec::new(),
        };
        assert!(prepare(&store, "tg:r3:team", &fewer));
        assert!(read(&store).buckets.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let record = Record::decode(Some(&bytes));
            proptest::prop_assert!(record.buckets.len() <= bytes.len() / 10);
        }
    }
}
