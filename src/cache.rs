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
//! - [`lookup`]`(store, cfg, key, now_ms) -> Option<Hit>`.
//! - [`insert`]`(store, cfg, key, status, content_type, body, now_ms) -> StoreOutcome`; the entry
//!   lives `cfg.ttl_ms` (pass a copy of the config with another `ttl_ms` for a per-route TTL).
//! - [`stats`]`(store) -> CacheStats` for metrics.
//!
//! # Key
//! SHA-256 over a domain tag and, each prefixed with its length (u64 LE) so fields cannot run
//! into each other: scope (tenant name or `"global"`), route, upstream model, [`ApiKind::as_str`],
//! the stream flag (one byte; `stream: true` and not embeddings), the canonical body, the
//! `:path`, the key headers, and the max-tokens value Tollgate sends upstream.
//!
//! The key is of the request **as the upstream receives it**, since that is what the answer
//! depends on:
//! - `:path` whole, query included, byte for byte (as Envoy's HCM left it: its path
//!   normalisation runs before filters). On Azure OpenAI the deployment in the path picks the
//!   model and `api-version` the API; a self-hosted server may read any query parameter. No
//!   canonical form (sorted query, trailing slash): SDKs send one stable path per endpoint, and
//!   a canonical form can only turn a miss into a wrong hit.
//! - The key headers: [`KEY_HEADERS`] plus `cache.key_headers`, names lowercase and sorted (the
//!   configuration's list, so the client's header order and name case do not matter). Each name
//!   is hashed, then a presence byte, then the value (absent and empty differ); repeated lines
//!   of one header are joined with `,` in request order. Values are exact bytes.
//! - The max-tokens edit: `None`, or the value Tollgate writes into the API's max-tokens field
//!   (strict mode's default when the client sent none, a per-request cap, a clamp to the budget
//!   left). The upstream body is a function of the client body, this value and the upstream
//!   model, so the key determines what the upstream received. A lookup uses the value planned
//!   from the tenant's rules before admission; when admission clamps further, the response is
//!   stored under the clamped value's key, which only a request planned to the same value can
//!   hit: a truncated answer is never served to the request that was not clamped.
//!
//! The canonical body is the body parsed into a `serde_json::Value`, minus the top-level fields
//! in [`IGNORED_FIELDS`], re-serialised: objects come out with sorted keys (serde_json's `Map`
//! is a `BTreeMap` here: no `preserve_order`), no whitespace, string escapes normalised, the last
//! of duplicate keys kept (as the providers read it). Numbers: integers within i64/u64 are exact;
//! every other number is an f64 printed shortest-round-trip, so `1.0`, `1.00` and `1e0` are the
//! same, while `1` and `1.0` are two keys (a miss, never a wrong hit). Integers beyond 64 bits
//! and decimals beyond f64 precision collapse to the nearest f64, which is how the providers
//! read them too.
//!
//! Ignored (cannot change the output): `user`, `metadata`, `prompt_cache_key`,
//! `safety_identifier`. Kept on purpose: `store` (decides whether the returned response id is
//! retrievable later), `service_tier` (echoed in the response body), `stream`, `stream_options`,
//! sampling parameters and everything else. Refused (`None`): a non-null `conversation`
//! (Responses: the conversation grows with every call), `background: true` (the answer is a
//! queued job), a non-null `container` (Anthropic code-execution container state) and a `prompt`
//! object without a `version` (a prompt template's latest version can change). Tools that read
//! live data (web search, MCP) are only bounded by the TTL.
//!
//! # Storage
//! A fixed table of `S = min(max_entries, MAX_SLOTS)` slots grouped into sets of
//! `W = clamp(ways, 1, MAX_WAYS)` consecutive slots (the last set may be smaller); a key lives in
//! set `u64::from_le_bytes(key[0..8]) % ceil(S / W)`. Per slot two keys, plus one meta key: the
//! key space is `2 × max_entries + 1`, all created up front (Envoy never deletes keys). If the
//! config later shrinks, slots beyond the new size are orphans: the keys stay (the key space is
//! bounded by the largest config ever used) and their bytes are reclaimed (see below).
//!
//! Header `tg:cache:h:<i>`, 64 bytes, integers little-endian:
//! ```text
//! 0 version = 1 │ 1 state (0 empty, 1 writing, 2 ready) │ 2 flags (bit 0: counted in `entries`)
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
//!
//! # Insert (every step compare-and-swap; contention gives up, never blocks)
//! 1. Read the set's headers and pick a victim: a live entry with the same key, or the same key
//!    being written by another worker, means [`StoreOutcome::AlreadyPresent`]; else the same key
//!    expired; else the stale slot (expired, or a write abandoned for [`WRITE_TIMEOUT_MS`])
//!    holding most bytes; else an empty slot; else the least recently used live entry (LRU
//!    eviction).
//! 2. Claim it: header → `writing` with the new key, keeping the old `held`/counted (so an
//!    abandoned claim is taken over with the right accounting). A lost race re-reads the set (up
//!    to three times), then [`StoreOutcome::Contended`].
//! 3. Reserve in meta: refused unless `bytes_held - held + size <= max_bytes`. On a refusal,
//!    free up to [`RECLAIM_SCAN`] stale or orphaned slots elsewhere in the table and try once
//!    more; still refused → restore the header and answer [`StoreOutcome::NoRoom`] (never
//!    evicts a live entry it will not replace).
//! 4. Write the data value (unconditionally: only the claim holder writes it), then the header
//!    `writing → ready` (expiry `now + ttl`), then release `held - size` if the entry shrank.
//!
//! A worker that traps midway leaves the meta key over-counting (capacity lost, the cap holds).
//!
//! # Lookup
//! Reads the set's headers (at most `W` gets, nothing else allocated); a ready, unexpired header
//! with the key leads to one read of the data value, whose key, size and format are checked
//! again (a writer may have replaced it in between → miss).

use std::ops::Range;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::api::ApiKind;
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
/// How many slots an insert that found no room inspects for stale entries to free.
pub const RECLAIM_SCAN: u32 = 8;
/// A hit refreshes its slot's LRU stamp only when it is at least this old (fewer writes).
const TOUCH_INTERVAL_MS: u64 = 1_000;
/// Claim attempts of one insert before it reports contention.
const CLAIM_ATTEMPTS: usize = 3;

/// Top-level request fields that cannot change the response, left out of the key.
pub const IGNORED_FIELDS: [&str; 4] = ["user", "metadata", "prompt_cache_key", "safety_identifier"];

/// Request headers that select the upstream's answer, always in the key (`cache.key_headers`
/// adds more): the OpenAI beta features (`openai-beta: assistants=v2`, …), the organization and
/// project (their model access, data controls and fine-tunes), and Anthropic's API version and
/// beta features. Sorted.
pub const KEY_HEADERS: [&str; 5] = [
    "anthropic-beta",
    "anthropic-version",
    "openai-beta",
    "openai-organization",
    "openai-project",
];

const DOMAIN: &[u8] = b"tollgate.cache.v2";

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
}

/// The cache key of a request: SHA-256 (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, for logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
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

/// What [`insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored; `evicted` when a live entry of another key was replaced (LRU).
    Stored { evicted: bool },
    /// A live entry with this key exists or is being written by another worker.
    AlreadyPresent,
    /// The value is bigger than `max_entry_bytes` or `max_bytes`.
    TooLarge,
    /// Storing it would exceed `max_bytes` (nothing evicted).
    NoRoom,
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

// ---------------------------------------------------------------------------------------------
// Key

/// What a request's key is computed from besides its body.
#[derive(Debug, Clone, Copy)]
pub struct KeyInputs<'a> {
    /// The tenant, or `"global"`.
    pub scope: &'a str,
    pub route: &'a str,
    pub upstream_model: &'a str,
    pub kind: ApiKind,
    /// The request's `:path` as the filter sees it (after Envoy's normalisation), query included.
    pub path: &'a [u8],
    /// The key headers and their values, from [`key_header_values`].
    pub headers: &'a [(&'a str, Option<Vec<u8>>)],
}

/// A request's key but for its last field, what Tollgate sets the API's max-tokens field to:
/// that is only known after admission (clamp mode lowers it to the budget left), so the key is
/// finished twice when it changes (lookup, then store) without hashing the body again.
#[derive(Clone)]
pub struct PendingKey(Sha256);

impl PendingKey {
    /// The key of the request as the upstream receives it, with the API's max-tokens field set
    /// to `max_tokens` by Tollgate (`None`: the body's own value, or none).
    pub fn finish(&self, max_tokens: Option<u64>) -> CacheKey {
        let mut hash = self.0.clone();
        let value = max_tokens.map(u64::to_le_bytes);
        put(&mut hash, value.as_ref().map_or(&[][..], |v| &v[..]));
        CacheKey(hash.finalize().into())
    }
}

fn put(hash: &mut Sha256, field: &[u8]) {
    hash.update(u64::try_from(field.len()).unwrap_or(u64::MAX).to_le_bytes());
    hash.update(field);
}

/// The key of a request but for Tollgate's max-tokens edit ([`PendingKey::finish`]), or `None`
/// when it must not be cached (not a JSON object, or it refers to mutable server-side state).
/// See the module documentation for the fields and the canonical form.
pub fn cache_key(inputs: &KeyInputs<'_>, body: &[u8]) -> Option<PendingKey> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    if refers_to_server_state(&map) {
        return None;
    }
    for field in IGNORED_FIELDS {
        map.remove(field);
    }
    let stream =
        inputs.kind != ApiKind::Embeddings && map.get("stream") == Some(&Value::Bool(true));
    let canonical = serde_json::to_vec(&Value::Object(map)).ok()?;
    let mut hash = Sha256::new();
    hash.update(DOMAIN);
    let fields: [&[u8]; 7] = [
        inputs.scope.as_bytes(),
        inputs.route.as_bytes(),
        inputs.upstream_model.as_bytes(),
        inputs.kind.as_str().as_bytes(),
        &[u8::from(stream)],
        &canonical,
        inputs.path,
    ];
    for field in fields {
        put(&mut hash, field);
    }
    // Header names are part of the key (the list is the configuration's), then a presence byte
    // and the value: absent and empty are two keys.
    put(
        &mut hash,
        &u64::try_from(inputs.headers.len())
            .unwrap_or(u64::MAX)
            .to_le_bytes(),
    );
    for (name, value) in inputs.headers {
        put(&mut hash, name.as_bytes());
        match value {
            None => put(&mut hash, &[0]),
            Some(value) => {
                put(&mut hash, &[1]);
                put(&mut hash, value);
            }
        }
    }
    Some(PendingKey(hash))
}

/// A request header's value: every line with that name (ASCII case-insensitive), in request
/// order, joined with `,` (as HTTP allows combining them); `None` when absent.
pub fn header_value(request: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for (_, value) in request.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        match &mut out {
            None => out = Some(value.clone()),
            Some(joined) => {
                joined.push(b',');
                joined.extend_from_slice(value);
            }
        }
    }
    out
}

/// The values of the key headers `names` (the configuration's list: lowercase, sorted, unique)
/// among the request's headers (any order, any case): the key sees the same list whatever order
/// the client sent its headers in.
pub fn key_header_values<'n>(
    names: &'n [String],
    request: &[(String, Vec<u8>)],
) -> Vec<(&'n str, Option<Vec<u8>>)> {
    names
        .iter()
        .map(|name| (name.as_str(), header_value(request, name)))
        .collect()
}

/// Whether a `cache-control` value has `directive` (ASCII case-insensitive, e.g. `no-store`).
pub fn has_directive(cache_control: &[u8], directive: &[u8]) -> bool {
    cache_control
        .split(|b| *b == b',')
        .any(|d| d.trim_ascii().eq_ignore_ascii_case(directive))
}

fn refers_to_server_state(map: &Map<String, Value>) -> bool {
    let set = |field: &str| map.get(field).is_some_and(|v| !v.is_null());
    set("conversation")
        || set("container")
        || map.get("background") == Some(&Value::Bool(true))
        || map
            .get("prompt")
            .and_then(Value::as_object)
            .is_some_and(|p| p.get("version").is_none_or(Value::is_null))
}

/// Whether a request asks for greedy decoding: a top-level `temperature` of 0, `top_p` of 0 or
/// `top_k` of 1 (each keeps only the most likely token), and `n` absent, null or 1. Not a JSON
/// object → false.
pub fn deterministic(body: &[u8]) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let is = |field: &str, want: f64| {
        map.get(field)
            .and_then(Value::as_f64)
            .is_some_and(|v| v == want)
    };
    let single = map.get("n").is_none_or(Value::is_null) || is("n", 1.0);
    single && (is("temperature", 0.0) || is("top_p", 0.0) || is("top_k", 1.0))
}

// ---------------------------------------------------------------------------------------------
// Layout

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    slots: u32,
    ways: u32,
    sets: u32,
}

impl Geometry {
    fn of(cfg: &CacheConfig) -> Geometry {
        let slots = cfg.max_entries.min(MAX_SLOTS);
        let ways = cfg.ways.clamp(1, MAX_WAYS).min(slots.max(1));
        Geometry {
            slots,
            ways,
            sets: slots.div_ceil(ways),
        }
    }

    /// The slots `key` can live in.
    fn set_of(&self, key: &CacheKey) -> Range<u32> {
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

fn header_key(slot: u32) -> String {
    format!("{HEADER_PREFIX}{slot}")
}

fn data_key(slot: u32) -> String {
    format!("{DATA_PREFIX}{slot}")
}

/// Every key the cache uses with `cfg` (meta first), to create up front with `store::FRESH`.
pub fn all_keys(cfg: &CacheConfig) -> Vec<String> {
    let slots = Geometry::of(cfg).slots;
    let mut keys = Vec::with_capacity(usize::try_from(slots).unwrap_or(0).saturating_mul(2) + 1);
    keys.push(META_KEY.to_string());
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
enum State {
    Empty,
    Writing,
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    state: State,
    /// Counted in the meta key's `entries`.
    counted: bool,
    /// Data bytes the meta key attributes to this slot.
    held: u32,
    key: [u8; 32],
    /// Ready: expiry; writing: when the claim was made.
    time: u64,
    stored_at: u64,
    last_used: u64,
}

const HEADER_VERSION: u8 = 1;
const HEADER_BYTES: usize = 64;

impl Header {
    const EMPTY: Header = Header {
        state: State::Empty,
        counted: false,
        held: 0,
        key: [0; 32],
        time: 0,
        stored_at: 0,
        last_used: 0,
    };

    /// Absent, placeholder or foreign bytes read as an empty slot.
    fn decode(bytes: Option<&[u8]>) -> Header {
        bytes
            .filter(|b| b.len() == HEADER_BYTES)
            .and_then(|b| Header::read(&mut Reader(b)))
            .unwrap_or(Header::EMPTY)
    }

    fn read(r: &mut Reader<'_>) -> Option<Header> {
        if r.u8()? != HEADER_VERSION {
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
        Some(Header {
            state,
            counted,
            held: r.u32()?,
            key: r.array()?,
            time: r.u64()?,
            stored_at: r.u64()?,
            last_used: r.u64()?,
        })
    }

    fn encode(&self) -> Vec<u8> {
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

    fn live(&self, now_ms: u64) -> bool {
        self.state == State::Ready && now_ms < self.time
    }

    /// Expired, or a write whose worker died: its slot can be reused.
    fn stale(&self, now_ms: u64) -> bool {
        match self.state {
            State::Empty => false,
            State::Ready => now_ms >= self.time,
            State::Writing => now_ms >= self.time.saturating_add(WRITE_TIMEOUT_MS),
        }
    }
}

const DATA_MAGIC: u8 = 0xC1;
/// Magic, key, status and content-type length.
const DATA_PREFIX_BYTES: usize = 36;

fn encode_data(key: &CacheKey, status: u16, content_type: &str, body: &[u8]) -> Option<Vec<u8>> {
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
fn decode_data(data: Option<Vec<u8>>, key: &CacheKey, held: u32) -> Option<(u16, String, Vec<u8>)> {
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
struct Meta {
    entries: u32,
    bytes_held: u64,
    high_water: u32,
    evictions: u64,
}

const META_VERSION: u8 = 1;
const META_BYTES: usize = 32;

impl Meta {
    fn decode(bytes: Option<&[u8]>) -> Meta {
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
// Lookup

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

// ---------------------------------------------------------------------------------------------
// Insert

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
    for _ in 0..CLAIM_ATTEMPTS {
        let (slot, old, cas) = match choose(store, geo.set_of(key), key, now_ms) {
            Choice::Present => return StoreOutcome::AlreadyPresent,
            Choice::Busy => return StoreOutcome::Contended,
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

/// The entry an insert is writing.
struct Pending<'a> {
    size: u32,
    status: u16,
    content_type: &'a str,
    body: &'a [u8],
    evicted: bool,
    now_ms: u64,
}

enum Choice {
    Present,
    Busy,
    Victim { slot: u32, header: Header, cas: u32 },
}

/// Picks the slot of `set` an insert of `key` replaces.
fn choose<S: SharedStore + ?Sized>(
    store: &S,
    set: Range<u32>,
    key: &CacheKey,
    now_ms: u64,
) -> Choice {
    // Lower is better: (rank, order).
    let mut best: Option<((u8, u64), u32, Header, u32)> = None;
    for slot in set {
        let (header, cas) = read_header(store, slot);
        if cas == 0 {
            // Not created and could not be: a write could not be compare-and-swapped.
            continue;
        }
        let stale = header.stale(now_ms);
        if header.key == key.0 && !stale && header.state != State::Empty {
            return Choice::Present;
        }
        let rank = match header.state {
            State::Writing if !stale => continue,
            _ if stale && header.key == key.0 => (0, 0),
            _ if stale => (1, u64::from(u32::MAX - header.held)),
            State::Empty => (2, 0),
            _ => (3, header.last_used),
        };
        if best.as_ref().is_none_or(|(r, ..)| rank < *r) {
            best = Some((rank, slot, header, cas));
        }
    }
    match best {
        Some((_, slot, header, cas)) => Choice::Victim { slot, header, cas },
        None => Choice::Busy,
    }
}

/// A slot's header and version, creating the slot's keys if they are missing.
fn read_header<S: SharedStore + ?Sized>(store: &S, slot: u32) -> (Header, u32) {
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
fn version_of<S: SharedStore + ?Sized>(store: &S, hkey: &str, expected: &Header) -> Option<u32> {
    let (bytes, cas) = store.get(hkey);
    (cas != 0 && Header::decode(bytes.as_deref()) == *expected).then_some(cas)
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
        let start = key.0.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok());
        let start = start.map_or(0, u32::from_le_bytes) % range.max(1);
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
    let shrink = u64::from(old.held).saturating_sub(u64::from(entry.size));
    if shrink > 0 {
        release(store, shrink, false, false);
    }
    StoreOutcome::Stored {
        evicted: entry.evicted,
    }
}

enum Refusal {
    NoRoom { high_water: u32 },
    Contended,
}

/// Reserves room for a value of `size` replacing `old` in the meta key.
fn reserve<S: SharedStore + ?Sized>(
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
fn release<S: SharedStore + ?Sized>(store: &S, bytes: u64, entry: bool, eviction: bool) {
    let _: Result<(), UpdateError<()>> = update(store, META_KEY, |current| {
        let mut meta = Meta::decode(current);
        meta.bytes_held = meta.bytes_held.saturating_sub(bytes);
        meta.entries = meta.entries.saturating_sub(u32::from(entry));
        meta.evictions = meta.evictions.saturating_sub(u64::from(eviction));
        Ok((meta.encode(), ()))
    });
}

/// Frees stale slots (expired or abandoned) and orphaned ones (beyond the configured table) among
/// up to [`RECLAIM_SCAN`] slots of `0..range` from `start`, skipping `skip`. Returns the bytes
/// freed.
fn reclaim<S: SharedStore + ?Sized>(
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
            freed = freed.saturating_add(u64::from(header.held));
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;
    use crate::store::MemStore;

    const CHAT: ApiKind = ApiKind::ChatCompletions;
    const JSON: &str = "application/json";

    fn cfg(max_entries: u32, max_bytes: u64, max_entry_bytes: u64, ways: u32) -> CacheConfig {
        CacheConfig {
            max_entries,
            max_bytes,
            max_entry_bytes,
            ttl_ms: 60_000,
            ways,
        }
    }

    fn fresh(cfg: &CacheConfig) -> MemStore {
        let store = MemStore::default();
        for key in all_keys(cfg) {
            ensure(&store, &key, FRESH);
        }
        store
    }

    fn key(id: u8) -> CacheKey {
        CacheKey(Sha256::digest([id]).into())
    }

    const PATH: &[u8] = b"/v1/chat/completions";

    /// The key of a request on [`PATH`] without key headers and without a max-tokens edit.
    fn plain_key(
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

    fn chat_key(body: &str) -> Option<CacheKey> {
        plain_key("acme", "default", "gpt-4o", CHAT, body.as_bytes())
    }

    /// The key of one fixed chat body with this path, these request headers (the default key
    /// header list picks from them) and this max-tokens edit.
    fn request_key(path: &str, request: &[(&str, &str)], max_tokens: Option<u64>) -> CacheKey {
        let names: Vec<String> = KEY_HEADERS.iter().map(|n| n.to_string()).collect();
        let request: Vec<(String, Vec<u8>)> = request
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        let headers = key_header_values(&names, &request);
        let inputs = KeyInputs {
            scope: "acme",
            route: "default",
            upstream_model: "gpt-4o",
            kind: CHAT,
            path: path.as_bytes(),
            headers: &headers,
        };
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        cache_key(&inputs, body).unwrap().finish(max_tokens)
    }

    #[test]
    fn key_covers_the_path_whole() {
        let base = request_key("/v1/chat/completions", &[], None);
        let azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
        let others = [
            "/openai/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/chat/completions?x=1",
            azure,
            "/openai/deployments/other-deploy/chat/completions?api-version=2024-10-21",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview",
            "/openai/deployments/gpt-4o/chat/completions",
        ];
        let mut seen = vec![base];
        for path in others {
            let key = request_key(path, &[], None);
            assert!(!seen.contains(&key), "{path}");
            seen.push(key);
        }
        // The same path is the same key: nothing else varies.
        assert_eq!(request_key(azure, &[], None), request_key(azure, &[], None));
        // No canonical form: query order is a miss, never a merge.
        assert_ne!(
            request_key("/v1/chat/completions?a=1&b=2", &[], None),
            request_key("/v1/chat/completions?b=2&a=1", &[], None)
        );
    }

    #[test]
    fn key_covers_the_key_headers() {
        let path = "/v1/messages";
        let base = request_key(path, &[("content-type", "application/json")], None);
        // Headers outside the list (identity, tracing, SDK telemetry) do not change the key.
        let unrelated = [
            ("x-request-id", "r1"),
            ("user-agent", "OpenAI/Python 1.99"),
            ("x-stainless-retry-count", "1"),
            ("authorization", "Bearer sk-1"),
        ];
        assert_eq!(request_key(path, &unrelated, None), base);
        let mut seen = vec![base];
        for name in KEY_HEADERS {
            for value in ["", "v1", "v2"] {
                let key = request_key(path, &[(name, value)], None);
                assert!(!seen.contains(&key), "{name}: {value:?}");
                seen.push(key);
            }
        }
        // A value moving from one header to another changes the key.
        assert_ne!(
            request_key(path, &[("openai-organization", "x")], None),
            request_key(path, &[("openai-project", "x")], None)
        );
    }

    #[test]
    fn key_headers_ignore_order_and_name_case() {
        let path = "/v1/messages";
        let a = request_key(
            path,
            &[
                ("anthropic-version", "2023-06-01"),
                ("x-other", "1"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
            ],
            None,
        );
        let b = request_key(
            path,
            &[
                ("Anthropic-Beta", "prompt-caching-2024-07-31"),
                ("ANTHROPIC-VERSION", "2023-06-01"),
            ],
            None,
        );
        assert_eq!(a, b);
        // Values are exact: case and content matter.
        assert_ne!(
            a,
            request_key(
                path,
                &[
                    ("anthropic-version", "2023-06-01"),
                    ("anthropic-beta", "Prompt-Caching-2024-07-31"),
                ],
                None,
            )
        );
        // Repeated lines are one comma-joined value, in request order.
        let joined = request_key(path, &[("anthropic-beta", "a,b")], None);
        assert_eq!(
            request_key(
                path,
                &[("anthropic-beta", "a"), ("anthropic-beta", "b")],
                None
            ),
            joined
        );
        assert_ne!(
            request_key(
                path,
                &[("anthropic-beta", "b"), ("anthropic-beta", "a")],
                None
            ),
            joined
        );
    }

    #[test]
    fn absent_and_empty_headers_are_two_keys() {
        let path = "/v1/chat/completions";
        let absent = request_key(path, &[], None);
        for name in KEY_HEADERS {
            assert_ne!(request_key(path, &[(name, "")], None), absent, "{name}");
        }
        assert_eq!(header_value(&[], "openai-beta"), None);
        let empty = [("openai-beta".to_string(), Vec::new())];
        assert_eq!(header_value(&empty, "openai-beta"), Some(Vec::new()));
    }

    #[test]
    fn key_covers_the_max_tokens_edit() {
        let path = "/v1/chat/completions";
        let none = request_key(path, &[], None);
        let keys = [
            none,
            request_key(path, &[], Some(0)),
            request_key(path, &[], Some(83)),
            request_key(path, &[], Some(84)),
            request_key(path, &[], Some(u64::MAX)),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in keys.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            request_key(path, &[], Some(83)),
            request_key(path, &[], Some(83))
        );
    }

    #[test]
    fn cache_control_directives() {
        assert!(has_directive(b"no-store", b"no-store"));
        assert!(has_directive(b"max-age=0, No-Cache", b"no-cache"));
        assert!(!has_directive(b"no-cache=x", b"no-cache"));
        assert!(!has_directive(b"", b"no-store"));
    }

    /// The bytes a data value counts for: the placeholder and anything not ours count 0.
    fn accounted(data: &[u8]) -> u64 {
        match data.first() {
            Some(&DATA_MAGIC) => u64::try_from(data.len()).unwrap_or(u64::MAX),
            _ => 0,
        }
    }

    /// Slots a table of `cfg` has ever had keys for.
    fn slots_in(store: &MemStore) -> u32 {
        let mut n = 0;
        while store.get(&header_key(n)).1 != 0 {
            n += 1;
        }
        n
    }

    /// The accounting invariants, read off the whole store.
    fn check(store: &MemStore, cfg: &CacheConfig) {
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
        assert_eq!(store.len(), 2 * slots as usize + 1);
    }

    /// A body that says which key it belongs to.
    fn body_of(id: u8, len: usize) -> Vec<u8> {
        vec![id; len]
    }

    fn assert_hit_matches(hit: &Hit, id: u8) {
        assert!(hit.body.iter().all(|b| *b == id), "body of another key");
        assert_eq!(hit.content_type, JSON);
        assert_eq!(hit.status, 200);
    }

    #[test]
    fn key_covers_every_field() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let base = chat_key(body).unwrap();
        let b = body.as_bytes();
        let others = [
            plain_key("other", "default", "gpt-4o", CHAT, b),
            plain_key("global", "default", "gpt-4o", CHAT, b),
            plain_key("acme", "fast", "gpt-4o", CHAT, b),
            plain_key("acme", "default", "gpt-4o-mini", CHAT, b),
            plain_key("acme", "default", "gpt-4o", ApiKind::Responses, b),
            plain_key("acme", "default", "gpt-4o", ApiKind::Messages, b),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"ho"}],"temperature":0}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"seed":1}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"store":true}"#,
            ),
            chat_key(
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"service_tier":"flex"}"#,
            ),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(other.unwrap(), base, "case {i}");
        }
        // Fields are length-prefixed: moving a byte between fields changes the key.
        assert_ne!(
            plain_key("a", "bc", "m", CHAT, b"{}"),
            plain_key("ab", "c", "m", CHAT, b"{}")
        );
        assert_ne!(
            plain_key("a", "", "bc", CHAT, b"{}"),
            plain_key("a", "b", "c", CHAT, b"{}")
        );
    }

    #[test]
    fn key_ignores_order_whitespace_and_identity_fields() {
        let base = chat_key(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        );
        let same = [
            r#"{ "temperature": 0, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"user":"u1"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"h\u0069"}],"temperature":0,"metadata":{"a":"b"},"prompt_cache_key":"p","safety_identifier":"s"}"#,
            r#"{"model":"x","model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
        ];
        for body in same {
            assert_eq!(chat_key(body), base, "{body}");
        }
        // Numbers: 0.0, 0.00 and 0e0 are one f64; 0 is an integer (another key, a miss).
        let float = chat_key(r#"{"temperature":0.0}"#);
        assert_eq!(chat_key(r#"{"temperature":0.00}"#), float);
        assert_eq!(chat_key(r#"{"temperature":0e0}"#), float);
        assert_ne!(chat_key(r#"{"temperature":0}"#), float);
        // Embeddings have no stream flag.
        let emb = |body: &str| plain_key("g", "r", "e", ApiKind::Embeddings, body.as_bytes());
        assert_eq!(emb(r#"{"input":"x","user":"a"}"#), emb(r#"{"input":"x"}"#));
    }

    #[test]
    fn key_refuses_bad_bodies_and_server_state() {
        for body in [
            "",
            "[1]",
            "\"s\"",
            "{",
            "\u{ff}",
            r#"{"conversation":"conv_1"}"#,
            r#"{"conversation":{"id":"conv_1"}}"#,
            r#"{"background":true}"#,
            r#"{"container":"cntr_1"}"#,
            r#"{"prompt":{"id":"pmpt_1"}}"#,
            r#"{"prompt":{"id":"pmpt_1","version":null}}"#,
        ] {
            assert_eq!(chat_key(body), None, "{body}");
        }
        for body in [
            r#"{"conversation":null,"background":false,"container":null}"#,
            r#"{"prompt":{"id":"pmpt_1","version":"2"}}"#,
            r#"{"previous_response_id":"resp_1"}"#,
        ] {
            assert!(chat_key(body).is_some(), "{body}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(chat_key(&format!(r#"{{"a":{deep}}}"#)), None);
    }

    #[test]
    fn deterministic_requests() {
        for body in [
            r#"{"temperature":0}"#,
            r#"{"temperature":0.0,"n":1}"#,
            r#"{"temperature":-0.0,"n":null}"#,
            r#"{"top_p":0,"temperature":1}"#,
            r#"{"top_k":1}"#,
        ] {
            assert!(deterministic(body.as_bytes()), "{body}");
        }
        for body in [
            "{}",
            r#"{"temperature":0.1}"#,
            r#"{"temperature":null}"#,
            r#"{"temperature":"0"}"#,
            r#"{"temperature":0,"n":2}"#,
            r#"{"top_k":2}"#,
            "[]",
            "nope",
        ] {
            assert!(!deterministic(body.as_bytes()), "{body}");
        }
    }

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
        assert_eq!(store.len(), 1);
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
        assert!(store.len() <= 2 * 8 + 1);
        for k in all_keys(&c) {
            ensure(&store, &k, FRESH);
        }
        check(&store, &c);
    }

    #[test]
    fn all_keys_is_the_key_space() {
        let c = cfg(3, 1, 1, 4);
        assert_eq!(
            all_keys(&c),
            [
                "tg:cache:meta",
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

    type Hook<'a> = Box<dyn FnOnce(&MemStore) + 'a>;

    /// A store that runs `hook` on the inner store right before its `at`-th call: another worker
    /// acting between two steps of this one.
    struct Meddler<'a> {
        inner: &'a MemStore,
        calls: Cell<usize>,
        at: usize,
        hook: RefCell<Option<Hook<'a>>>,
    }

    impl<'a> Meddler<'a> {
        fn new(inner: &'a MemStore, at: usize, hook: impl FnOnce(&MemStore) + 'a) -> Self {
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
