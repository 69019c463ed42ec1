//! Helpers the cache's tests share: tables, keys, bodies, the accounting check and a store
//! that lets another worker act between two steps.

use std::cell::{Cell, RefCell};

use sha2::{Digest, Sha256};

use super::share::{SCOPE_BUCKETS, Share, held};
use super::table::{DATA_MAGIC, Header, Meta, State, data_key, header_key};
use super::{CacheConfig, CacheKey, Hit, KeyInputs, META_KEY, all_keys, cache_key};
use crate::api::ApiKind;
use crate::store::{FRESH, MemStore, SharedStore, ensure};

pub(super) const CHAT: ApiKind = ApiKind::ChatCompletions;
pub(super) const JSON: &str = "application/json";

pub(super) fn cfg(
    max_entries: u32,
    max_bytes: u64,
    max_entry_bytes: u64,
    ways: u32,
) -> CacheConfig {
    CacheConfig {
        max_entries,
        max_bytes,
        max_entry_bytes,
        ttl_ms: 60_000,
        ways,
        max_entries_per_scope: max_entries,
        max_bytes_per_scope: max_bytes,
    }
}

pub(super) fn fresh(cfg: &CacheConfig) -> MemStore {
    let store = MemStore::default();
    for key in all_keys(cfg) {
        ensure(&store, &key, FRESH);
    }
    store
}

/// A key of scope 0 (one scope: plain LRU within a set).
pub(super) fn key(id: u8) -> CacheKey {
    scoped_key(0, id)
}

/// A key of the scope tagged `owner`.
pub(super) fn scoped_key(owner: u32, id: u8) -> CacheKey {
    let mut bytes: [u8; 32] = Sha256::digest([id]).into();
    if let Some(tail) = bytes.last_chunk_mut::<4>() {
        *tail = owner.to_le_bytes();
    }
    CacheKey(bytes)
}

pub(super) const PATH: &[u8] = b"/v1/chat/completions";

/// The key of a request on [`PATH`] without key headers and without a max-tokens edit.
pub(super) fn plain_key(
    scope: &str,
    route: &str,
    upstream_model: &str,
    kind: ApiKind,
    body: &[u8],
) -> Option<CacheKey> {
    let inputs = KeyInputs {
        scope,
        route,
        upstream_model,
        kind,
        path: PATH,
        headers: &[],
    };
    cache_key(&inputs, body).map(|k| k.finish(None))
}

pub(super) fn chat_key(body: &str) -> Option<CacheKey> {
    plain_key("acme", "default", "gpt-4o", CHAT, body.as_bytes())
}

/// The bytes a data value counts for: the placeholder and anything not ours count 0.
pub(super) fn accounted(data: &[u8]) -> u64 {
    match data.first() {
        Some(&DATA_MAGIC) => u64::try_from(data.len()).unwrap_or(u64::MAX),
        _ => 0,
    }
}

/// Slots a table of `cfg` has ever had keys for.
pub(super) fn slots_in(store: &MemStore) -> u32 {
    let mut n = 0;
    while store.get(&header_key(n)).1 != 0 {
        n += 1;
    }
    n
}

/// The accounting invariants, read off the whole store.
pub(super) fn check(store: &MemStore, cfg: &CacheConfig) {
    let meta = Meta::decode(store.get(META_KEY).0.as_deref());
    let slots = slots_in(store);
    let mut data_sum = 0;
    let mut held_sum = 0;
    let mut counted = 0;
    for slot in 0..slots {
        let header = Header::decode(store.get(&header_key(slot)).0.as_deref());
        let data = store.get(&data_key(slot)).0.unwrap();
        assert_ne!(header.state, State::Writing, "slot {slot} left writing");
        data_sum += accounted(&data);
        held_sum += u64::from(header.held);
        counted += u32::from(header.counted);
        assert_eq!(accounted(&data), u64::from(header.held), "slot {slot}");
        if header.state == State::Ready {
            assert_eq!(data.get(1..33).unwrap(), &header.key);
        }
    }
    assert!(meta.bytes_held <= cfg.max_bytes, "{meta:?}");
    assert_eq!(meta.bytes_held, data_sum);
    assert_eq!(meta.bytes_held, held_sum);
    assert_eq!(meta.entries, counted);
    assert!(meta.entries <= slots);
    assert_eq!(store.len(), 2 * slots as usize + 1 + SCOPE_BUCKETS as usize);
    // The scope counters add up to the counted entries of their scopes.
    let mut shares = vec![Share::default(); SCOPE_BUCKETS as usize];
    for slot in 0..slots {
        let header = Header::decode(store.get(&header_key(slot)).0.as_deref());
        if header.counted {
            let share = &mut shares[(header.owner() % SCOPE_BUCKETS) as usize];
            share.entries += 1;
            share.bytes += u64::from(header.held);
        }
    }
    for (bucket, want) in shares.iter().enumerate() {
        assert_eq!(held(store, bucket as u32), *want, "scope bucket {bucket}");
    }
}

/// A body that says which key it belongs to.
pub(super) fn body_of(id: u8, len: usize) -> Vec<u8> {
    vec![id; len]
}

pub(super) fn assert_hit_matches(hit: &Hit, id: u8) {
    assert!(hit.body.iter().all(|b| *b == id), "body of another key");
    assert_eq!(hit.content_type, JSON);
    assert_eq!(hit.status, 200);
}

type Hook<'a> = Box<dyn FnOnce(&MemStore) + 'a>;

/// A store that runs `hook` on the inner store right before its `at`-th call: another worker
/// acting between two steps of this one.
pub(super) struct Meddler<'a> {
    inner: &'a MemStore,
    calls: Cell<usize>,
    at: usize,
    hook: RefCell<Option<Hook<'a>>>,
}

impl<'a> Meddler<'a> {
    pub(super) fn new(inner: &'a MemStore, at: usize, hook: impl FnOnce(&MemStore) + 'a) -> Self {
        Meddler {
            inner,
            calls: Cell::new(0),
            at,
            hook: RefCell::new(Some(Box::new(hook))),
        }
    }

    fn tick(&self) {
        let n = self.calls.get();
        self.calls.set(n + 1);
        if n == self.at
            && let Some(hook) = self.hook.borrow_mut().take()
        {
            hook(self.inner);
        }
    }
}

impl SharedStore for Meddler<'_> {
    fn get(&self, key: &str) -> crate::store::Versioned {
        self.tick();
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), ()> {
        self.tick();
        self.inner.set(key, value, cas)
    }
}
