//! Tollgate: a proxy-wasm filter that makes Envoy an LLM API gateway.
//!
//! Request flow: one `pipeline::Request` per exchange, driven by `envoy/` (the only module
//! that names `proxy_wasm`), which executes the `pipeline::Effects` each step returns:
//! ```text
//! headers ── pipeline::head: api::ApiKind::from_path ── not an LLM path ──▶ pass through
//!    │ tenant::Identity (header │ API-key digest │ metadata) ── unknown ──▶ 401 reply
//!    ▼ pause; drop the client's routing header; wait for the body (cap ──▶ 413)
//! body ───── pipeline::admit: api::request (one parse) · routing · admission::plan ── refusal
//!    │ pipeline::cache_step ── hit ──▶ pipeline::hit: reply from the cache
//!    │ admission::admit (budget::reserve_all over store::SharedStore, CAS) ── 429
//!    ▼ forward: api::rewrite body edits, routing headers, clear_route_cache
//! upstream ─ pipeline::respond: exchange::Exchange reads usage (JSON tail │ SSE, gzip decoded)
//! settle ─── pipeline::settle: admission::settle once · cache::insert · stats · ledger record
//! ```
//! Everything but `envoy/` is host-free and tested natively and on wasm32 (`pipeline::tests`
//! drives whole exchanges with an in-memory store and a fake clock).

pub mod admission;
pub mod alerts;
pub mod api;
pub mod budget;
pub mod cache;
pub mod config;
pub mod conversation;
pub mod cost;
pub mod exchange;
pub mod global;
pub mod holdings;
pub mod keys;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod reply;
pub mod routing;
pub mod store;
pub mod tenant;
pub mod user;
pub mod view;
pub mod webhook;
pub mod window;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod envoy;
