//! Response cache: an exact-match cache of successful responses (JSON or SSE bytes) kept in
//! Envoy's shared data, so every worker thread sees the same entries, with hard caps on entries,
//! total bytes, entry bytes and age.
//!
//! # API
//! - [`cache_key`]`(inputs, body) -> Option<PendingKey>`: a request's SHA-256 key but for its
//!   last field, `None` when the body is not a JSON object or the request refers to mutable
//!   server-side state (never cacheable); [`PendingKey::finish`]`(max_tokens) -> CacheKey` adds
//!   what Tollgate sets the max-tokens field to (lookup and store may differ: clamp mode).
//! - [`key_header_values`]`(names, request_headers)`, [`header_value`], [`has_directive`]: the
//!   header side of the key and of `cache-control`, from the request's header list.
//! - [`deterministic`]`(body) -> bool`: the request asks for greedy decoding (eligibility helper;
//!   the caller decides per config whether to require it; embeddings need no such check).
//! - [`all_keys`]`(cfg)`: every shared-data key the cache uses, to `store::ensure` with
//!   `store::FRESH` at configuration time.
//! - [`lookup`](fn@lookup)`(store, cfg, key, now_ms) -> Option<Hit>`.
//! - [`insert`](fn@insert)`(store, cfg, key, status, content_type, body, now_ms) -> StoreOutcome`;
//!   the entry lives `cfg.ttl_ms` (pass a copy of the config with another `ttl_ms` for a
//!   per-route TTL).
//! - [`stats`]`(store) -> CacheStats` for metrics.
//!
//! # Files
//! - `key.rs`: the key (what it hashes, the canonical body, the key headers) and eligibility.
//! - `table.rs`: the storage format: the slot table's layout, its header, data and meta values,
//!   and the meta key's accounting.
//! - `lookup.rs`, `insert.rs`: the read path and the write path.
//! - `evict.rs`: which slot an insert replaces, and reclaiming stale and orphaned slots.
//! - `share.rs`: scopes' shares: fair replacement between scopes and the per-scope caps.

mod evict;
mod insert;
mod key;
mod lookup;
mod share;
mod table;
#[cfg(test)]
mod testing;

pub use evict::RECLAIM_SCAN;
pub use insert::insert;
pub use key::{
    CacheKey, IGNORED_FIELDS, KEY_HEADERS, KeyInputs, PendingKey, cache_key, deterministic,
    has_directive, header_value, key_header_values,
};
pub use lookup::lookup;
pub use share::SCOPE_BUCKETS;
pub use table::{MAX_SLOTS, MAX_WAYS, META_KEY, WRITE_TIMEOUT_MS, all_keys, stats};

/// The cache's caps. `max_entries` and `ways` fix the table layout: every worker must use the
/// same values (a change leaves old entries unreachable until they are reclaimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Slots in the table (at most [`MAX_SLOTS`]); 0 disables the cache.
    pub max_entries: u32,
    /// Total bytes of stored values (bodies plus a 36-byte prefix and the content type).
    pub max_bytes: u64,
    /// Bytes of one stored value (same measure).
    pub max_entry_bytes: u64,
    /// Lifetime of an entry; 0 stores nothing.
    pub ttl_ms: u64,
    /// Set associativity: slots a key can live in (1..=[`MAX_WAYS`]; e.g. 4).
    pub ways: u32,
    /// Entries one scope (tenant, or `"global"`) may hold (`share.rs`).
    pub max_entries_per_scope: u32,
    /// Bytes one scope may hold (same measure as `max_bytes`).
    pub max_bytes_per_scope: u64,
}

/// A cached response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub status: u32,
    pub content_type: String,
    pub body: Vec<u8>,
    /// How long ago it was stored (for an `age` header).
    pub age_ms: u64,
}

/// What [`insert`](fn@insert) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored; `evicted` when a live entry of another key was replaced (LRU).
    Stored { evicted: bool },
    /// A live entry with this key exists or is being written by another worker.
    AlreadyPresent,
    /// The value is bigger than `max_entry_bytes` or `max_bytes`.
    TooLarge,
    /// Storing it would exceed `max_bytes`, or its set is held by other scopes' live entries
    /// it may not replace (nothing evicted).
    NoRoom,
    /// Storing it would take its scope past `max_entries_per_scope` or `max_bytes_per_scope`,
    /// and no entry of its own in its set can make room.
    OverShare,
    /// Other workers kept changing the set or the meta key; nothing stored.
    Contended,
    /// Never storable: status outside 200..=299, content type over 255 bytes, or the cache
    /// has no slots or a zero TTL.
    Rejected,
}

/// The meta key's numbers, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Slots holding an entry (expired ones included until reused).
    pub entries: u32,
    /// Bytes of all stored values (expired ones included until overwritten).
    pub bytes_held: u64,
    /// Live entries replaced to make room.
    pub evictions: u64,
}
