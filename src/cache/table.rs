//! The slot table in shared data: its layout (sets of slots, the key space), the binary
//! header, data and meta values, and the meta key's accounting.
//!
//! # Storage
//! A fixed table of `S = min(max_entries, MAX_SLOTS)` slots grouped into sets of
//! `W = clamp(ways, 1, MAX_WAYS)` consecutive slots (the last set may be smaller); a key lives in
//! set `u64::from_le_bytes(key[0..8]) % ceil(S / W)`. Per slot two keys, plus one meta key: the
//! key space is `2 × max_entries + 1` plus the [`SCOPE_BUCKETS`] scope counters of `share.rs`,
//! all created up front (Envoy never deletes keys). If the
//! config later shrinks, slots beyond the new size are orphans: the keys stay (the key space is
//! bounded by the largest config ever used) and their bytes are reclaimed (step 3 of an insert,
//! in `insert.rs`).
//!
//! Header `tg:cache:h:<i>`, 64 bytes, integers little-endian:
//! ```text
//! 0 version = 2 │ 1 state (0 empty, 1 writing, 2 ready) │ 2 flags (bit 0: counted in `entries`)
//! 3 zero │ 4..8 held: u32, the data bytes the meta key attributes to this slot
//! 8..40 key │ 40..48 ready: expires_at_ms; writing: started_ms │ 48..56 stored_at_ms
//! 56..64 last_used_ms (LRU stamp, refreshed by hits at most once a second)
//! ```
//! Data `tg:cache:d:<i>`: `0xC1 │ key (32) │ status: u16 │ content-type length: u8 │
//! content type │ body`. Its size (prefix included) is what counts against `max_entry_bytes` and
//! `max_bytes`. A slot without an entry holds the 1-byte placeholder `store::FRESH`, which
//! counts as 0 (never an empty value: it would read back as absent).
//!
//! Meta `tg:cache:meta`, 32 bytes: `0 version = 1 │ 1..4 zero │ 4..8 entries: u32 │
//! 8..16 bytes_held: u64 │ 16..20 high_water: u32 (largest slot count ever used) │ 20..24 zero │
//! 24..32 evictions: u64`. Any other value (`FRESH`) reads as all zero.
//!
//! Accounting invariants: `bytes_held == Σ held over headers == Σ size of data values` (expired
//! entries included: Envoy keeps them in memory until overwritten) whenever no insert is midway,
//! and `Σ size of data values <= bytes_held <= max_bytes` at every instant: growth is reserved in
//! the meta key before the data is written, shrinkage released after. `entries` counts slots
//! holding an entry (expired ones included) and is clamped to the largest slot count ever used.

use std::ops::Range;

#[cfg(doc)]
use super::SCOPE_BUCKETS;
use super::{CacheConfig, CacheKey, CacheStats};
use crate::store::{FRESH, SharedStore, UpdateError, ensure, update};

/// The meta key: entry count, bytes held, evictions.
pub const META_KEY: &str = "tg:cache:meta";
const HEADER_PREFIX: &str = "tg:cache:h:";
const DATA_PREFIX: &str = "tg:cache:d:";

/// The most slots a table can have, whatever `max_entries` says.
pub const MAX_SLOTS: u32 = 1 << 20;
/// The most slots a set can have (a lookup reads every header of its set).
pub const MAX_WAYS: u32 = 16;
/// A header left in the writing state this long belongs to a dead writer and may be taken over.
pub const WRITE_TIMEOUT_MS: u64 = 10_000;

// ---------------------------------------------------------------------------------------------
// Layout

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) slots: u32,
    pub(super) ways: u32,
    pub(super) sets: u32,
}

impl Geometry {
    pub(super) fn of(cfg: &CacheConfig) -> Geometry {
        let slots = cfg.max_entries.min(MAX_SLOTS);
        let ways = cfg.ways.clamp(1, MAX_WAYS).min(slots.max(1));
        Geometry {
            slots,
            ways,
            sets: slots.div_ceil(ways),
        }
    }

    /// The slots `key` can live in.
    pub(super) fn set_of(&self, key: &CacheKey) -> Range<u32> {
        if self.sets == 0 {
            return 0..0;
        }
        let hash = key
            .0
            .first_chunk::<8>()
            .map_or(0, |b| u64::from_le_bytes(*b));
        let set = u32::try_from(hash % u64::from(self.sets)).unwrap_or(0);
        let start = set.saturating_mul(self.ways);
        start..start.saturating_add(self.ways).min(self.slots)
    }
}

pub(super) fn header_key(slot: u32) -> String {
    format!("{HEADER_PREFIX}{slot}")
}

pub(super) fn data_key(slot: u32) -> String {
    format!("{DATA_PREFIX}{slot}")
}

/// Every key the cache uses with `cfg` (meta, the scope counters, then the slots), to create up
/// front with `store::FRESH`.
pub fn all_keys(cfg: &CacheConfig) -> Vec<String> {
    let slots = Geometry::of(cfg).slots;
    let extra = usize::try_from(super::share::SCOPE_BUCKETS).unwrap_or(0) + 1;
    let mut keys =
        Vec::with_capacity(usize::try_from(slots).unwrap_or(0).saturating_mul(2) + extra);
    keys.push(META_KEY.to_string());
    keys.extend(super::share::share_keys());
    for slot in 0..slots {
        keys.push(header_key(slot));
        keys.push(data_key(slot));
    }
    keys
}

// ---------------------------------------------------------------------------------------------
// Binary values

/// Reads fixed-size fields off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Empty,
    Writing,
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) state: State,
    /// Counted in the meta key's `entries`.
    pub(super) counted: bool,
    /// Data bytes the meta key attributes to this slot.
    pub(super) held: u32,
    pub(super) key: [u8; 32],
    /// Ready: expiry; writing: when the claim was made.
    pub(super) time: u64,
    pub(super) stored_at: u64,
    pub(super) last_used: u64,
}

/// 2: keys end with their scope's tag. A version-1 header (written before) reads as expired:
/// its key can never be looked up again, and an entry of no known scope would otherwise be
/// protected by fair replacement until its TTL.
const HEADER_VERSION: u8 = 2;
const HEADER_BYTES: usize = 64;

impl Header {
    pub(super) const EMPTY: Header = Header {
        state: State::Empty,
        counted: false,
        held: 0,
        key: [0; 32],
        time: 0,
        stored_at: 0,
        last_used: 0,
    };

    /// Absent, placeholder or foreign bytes read as an empty slot.
    pub(super) fn decode(bytes: Option<&[u8]>) -> Header {
        bytes
            .filter(|b| b.len() == HEADER_BYTES)
            .and_then(|b| Header::read(&mut Reader(b)))
            .unwrap_or(Header::EMPTY)
    }

    fn read(r: &mut Reader<'_>) -> Option<Header> {
        let version = r.u8()?;
        if version != HEADER_VERSION && version != 1 {
            return None;
        }
        let state = match r.u8()? {
            0 => State::Empty,
            1 => State::Writing,
            2 => State::Ready,
            _ => return None,
        };
        let counted = r.u8()? & 1 == 1;
        r.u8()?;
        let held = r.u32()?;
        let key = r.array()?;
        let time = r.u64()?;
        Some(Header {
            state,
            counted,
            held,
            key,
            time: if version == HEADER_VERSION { time } else { 0 },
            stored_at: r.u64()?,
            last_used: r.u64()?,
        })
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES);
        out.push(HEADER_VERSION);
        out.push(match self.state {
            State::Empty => 0,
            State::Writing => 1,
            State::Ready => 2,
        });
        out.push(u8::from(self.counted));
        out.push(0);
        out.extend_from_slice(&self.held.to_le_bytes());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&self.stored_at.to_le_bytes());
        out.extend_from_slice(&self.last_used.to_le_bytes());
        out
    }

    /// The scope tag of the key the slot holds.
    pub(super) fn owner(&self) -> u32 {
        super::key::owner_of(&self.key)
    }

    pub(super) fn live(&self, now_ms: u64) -> bool {
        self.state == State::Ready && now_ms < self.time
    }

    /// Expired, or a write whose worker died: its slot can be reused.
    pub(super) fn stale(&self, now_ms: u64) -> bool {
        match self.state {
            State::Empty => false,
            State::Ready => now_ms >= self.time,
            State::Writing => now_ms >= self.time.saturating_add(WRITE_TIMEOUT_MS),
        }
    }
}

pub(super) const DATA_MAGIC: u8 = 0xC1;
/// Magic, key, status and content-type length.
pub(super) const DATA_PREFIX_BYTES: usize = 36;

pub(super) fn encode_data(
    key: &CacheKey,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> Option<Vec<u8>> {
    let ct_len = u8::try_from(content_type.len()).ok()?;
    let len = DATA_PREFIX_BYTES
        .checked_add(content_type.len())?
        .checked_add(body.len())?;
    let mut out = Vec::with_capacity(len);
    out.push(DATA_MAGIC);
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&status.to_le_bytes());
    out.push(ct_len);
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(body);
    Some(out)
}

/// The entry in a data value, if it is a well-formed value of `key` and `held` bytes long.
pub(super) fn decode_data(
    data: Option<Vec<u8>>,
    key: &CacheKey,
    held: u32,
) -> Option<(u16, String, Vec<u8>)> {
    let mut data = data?;
    if u32::try_from(data.len()).ok()? != held {
        return None;
    }
    let mut r = Reader(&data);
    if r.u8()? != DATA_MAGIC || r.array::<32>()? != key.0 {
        return None;
    }
    let status = r.u16()?;
    let ct_len = usize::from(r.u8()?);
    let content_type = String::from_utf8(r.bytes(ct_len)?.to_vec()).ok()?;
    let prefix = DATA_PREFIX_BYTES.checked_add(ct_len)?;
    if prefix > data.len() {
        return None;
    }
    data.drain(..prefix);
    Some((status, content_type, data))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) entries: u32,
    pub(super) bytes_held: u64,
    pub(super) high_water: u32,
    pub(super) evictions: u64,
}

const META_VERSION: u8 = 1;
const META_BYTES: usize = 32;

impl Meta {
    pub(super) fn decode(bytes: Option<&[u8]>) -> Meta {
        bytes
            .filter(|b| b.len() == META_BYTES)
            .and_then(|b| Meta::read(&mut Reader(b)))
            .unwrap_or_default()
    }

    fn read(r: &mut Reader<'_>) -> Option<Meta> {
        if r.u8()? != META_VERSION {
            return None;
        }
        r.bytes(3)?;
        let entries = r.u32()?;
        let bytes_held = r.u64()?;
        let high_water = r.u32()?;
        r.u32()?;
        Some(Meta {
            entries,
            bytes_held,
            high_water,
            evictions: r.u64()?,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(META_BYTES);
        out.extend_from_slice(&[META_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.entries.to_le_bytes());
        out.extend_from_slice(&self.bytes_held.to_le_bytes());
        out.extend_from_slice(&self.high_water.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.evictions.to_le_bytes());
        out
    }
}

/// The meta key's numbers.
pub fn stats<S: SharedStore + ?Sized>(store: &S) -> CacheStats {
    let meta = Meta::decode(store.get(META_KEY).0.as_deref());
    CacheStats {
        entries: meta.entries,
        bytes_held: meta.bytes_held,
        evictions: meta.evictions,
    }
}

// ---------------------------------------------------------------------------------------------
// Slot access

/// A slot's header and version, creating the slot's keys if they are missing.
pub(super) fn read_header<S: SharedStore + ?Sized>(store: &S, slot: u32) -> (Header, u32) {
    let hkey = header_key(slot);
    let (mut bytes, mut cas) = store.get(&hkey);
    if bytes.is_none() && cas == 0 {
        ensure(store, &hkey, FRESH);
        ensure(store, &data_key(slot), FRESH);
        (bytes, cas) = store.get(&hkey);
    }
    (Header::decode(bytes.as_deref()), cas)
}

/// Re-reads a header this worker wrote and returns its version if it still holds `expected`.
pub(super) fn version_of<S: SharedStore + ?Sized>(
    store: &S,
    hkey: &str,
    expected: &Header,
) -> Option<u32> {
    let (bytes, cas) = store.get(hkey);
    (cas != 0 && Header::decode(bytes.as_deref()) == *expected).then_some(cas)
}

// ---------------------------------------------------------------------------------------------
// Meta accounting

pub(super) enum Refusal {
    NoRoom { high_water: u32 },
    Contended,
}

/// Reserves room for a value of `size` replacing `old` in the meta key.
pub(super) fn reserve<S: SharedStore + ?Sized>(
    store: &S,
    cfg: &CacheConfig,
    geo: &Geometry,
    old: &Header,
    size: u32,
    evicted: bool,
) -> Result<(), Refusal> {
    let result = update(store, META_KEY, |bytes| {
        let mut meta = Meta::decode(bytes);
        let after = meta
            .bytes_held
            .saturating_sub(u64::from(old.held))
            .saturating_add(u64::from(size));
        if after > cfg.max_bytes {
            return Err(meta.high_water);
        }
        // Grow now, shrink only once the old value is gone.
        meta.bytes_held = meta.bytes_held.max(after);
        meta.high_water = meta.high_water.max(geo.slots);
        if !old.counted {
            meta.entries = meta.entries.saturating_add(1).min(meta.high_water);
        }
        if evicted {
            meta.evictions = meta.evictions.saturating_add(1);
        }
        Ok((meta.encode(), ()))
    });
    result.map_err(|err| match err {
        UpdateError::Refused(high_water) => Refusal::NoRoom { high_water },
        UpdateError::Contended => Refusal::Contended,
    })
}

/// Gives bytes (and an entry, and an eviction) back to the meta key. Failure leaves the meta key
/// over-counting, the safe direction.
pub(super) fn release<S: SharedStore + ?Sized>(store: &S, bytes: u64, entry: bool, eviction: bool) {
    let _: Result<(), UpdateError<()>> = update(store, META_KEY, |current| {
        let mut meta = Meta::decode(current);
        meta.bytes_held = meta.bytes_held.saturating_sub(bytes);
        meta.entries = meta.entries.saturating_sub(u32::from(entry));
        meta.evictions = meta.evictions.saturating_sub(u64::from(eviction));
        Ok((meta.encode(), ()))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::testing::*;
    use crate::cache::{SCOPE_BUCKETS, insert, lookup};
    use crate::store::MemStore;

    #[test]
    fn binary_values_round_trip_and_reject_garbage() {
        let h = Header {
            state: State::Ready,
            counted: true,
            held: 77,
            key: [9; 32],
            time: u64::MAX,
            stored_at: 5,
            last_used: 6,
        };
        assert_eq!(h.encode().len(), HEADER_BYTES);
        assert_eq!(Header::decode(Some(&h.encode())), h);
        assert_eq!(Header::decode(Some(FRESH)), Header::EMPTY);
        let mut bad = h.encode();
        bad[1] = 7;
        assert_eq!(Header::decode(Some(&bad)), Header::EMPTY);
        // A header of the previous version (keys without a scope tag) reads as expired.
        let mut v1 = h.encode();
        v1[0] = 1;
        let old = Header::decode(Some(&v1));
        assert_eq!(old, Header { time: 0, ..h });
        assert!(old.stale(1) && !old.live(1));
        let m = Meta {
            entries: 3,
            bytes_held: 9,
            high_water: 16,
            evictions: 2,
        };
        assert_eq!(m.encode().len(), META_BYTES);
        assert_eq!(Meta::decode(Some(&m.encode())), m);
        assert_eq!(Meta::decode(Some(FRESH)), Meta::default());
        let k = key(1);
        let d = encode_data(&k, 201, "text/event-stream", b"data: x\n\n").unwrap();
        assert_eq!(d.len(), DATA_PREFIX_BYTES + 17 + 9);
        let n = d.len() as u32;
        assert_eq!(
            decode_data(Some(d.clone()), &k, n),
            Some((201, "text/event-stream".into(), b"data: x\n\n".to_vec()))
        );
        assert_eq!(decode_data(Some(d.clone()), &key(2), n), None);
        assert_eq!(decode_data(Some(d.clone()), &k, n - 1), None);
        assert_eq!(decode_data(Some(FRESH.to_vec()), &k, 1), None);
        assert_eq!(decode_data(None, &k, 0), None);
    }

    #[test]
    fn missing_keys_are_created_within_the_key_space() {
        let c = cfg(8, 1 << 20, 1 << 16, 4);
        let store = MemStore::default();
        for id in 0..50 {
            insert(
                &store,
                &c,
                &key(id),
                200,
                JSON,
                &body_of(id, 20),
                u64::from(id),
            );
            lookup(&store, &c, &key(id), u64::from(id));
        }
        assert!(store.len() <= 2 * 8 + 1 + SCOPE_BUCKETS as usize);
        for k in all_keys(&c) {
            ensure(&store, &k, FRESH);
        }
        check(&store, &c);
    }

    #[test]
    fn all_keys_is_the_key_space() {
        let c = cfg(3, 1, 1, 4);
        assert_eq!(all_keys(&c)[..2], ["tg:cache:meta", "tg:cache:s:0"]);
        assert_eq!(all_keys(&c)[64], "tg:cache:s:63");
        assert_eq!(
            all_keys(&c)[65..],
            [
                "tg:cache:h:0",
                "tg:cache:d:0",
                "tg:cache:h:1",
                "tg:cache:d:1",
                "tg:cache:h:2",
                "tg:cache:d:2"
            ]
        );
        let huge = cfg(u32::MAX, 1, 1, u32::MAX);
        assert_eq!(Geometry::of(&huge).slots, MAX_SLOTS);
        assert_eq!(Geometry::of(&huge).ways, MAX_WAYS);
        let g = Geometry::of(&cfg(10, 1, 1, 4));
        assert_eq!(g.sets, 3);
        for id in 0..=255 {
            let set = g.set_of(&key(id));
            assert!(set.start < set.end && set.end <= 10 && set.len() <= 4);
        }
    }
}
