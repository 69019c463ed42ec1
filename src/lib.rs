//! Tollgate: a proxy-wasm filter that makes Envoy an LLM API gateway.
//!
//! Request flow (one exchange):
//! ```text
//! request headers ─ api::ApiKind::from_path ── not an LLM path ──▶ pass through untouched
//!        │ tenant::Identity (header │ API-key digest │ metadata) ── unknown ──▶ 401 (reply)
//!        ▼ pause; buffer the body (cap ──▶ 413)
//! request body ─── api::request ─ routing::Routing ─ admission::plan ── refusals ──▶ reply
//!        │ cache::lookup ── hit ──▶ reply from the cache (no reservation)
//!        │ admission::admit (budget::reserve_all over store::SharedStore, CAS) ── 429
//!        ▼ routing header + clear_route_cache; api::rewrite when the body must change
//! response ─────── exchange::Exchange: JSON tail or incremental SSE (gzip decoded) ──▶ Usage
//! end / on_log ─── admission::settle once · cache::insert · metrics · record → access log
//! ```
//! Everything but `envoy/` is host-free and tested natively and on wasm32; `envoy/` is the only
//! module that names `proxy_wasm`.

pub mod admission;
pub mod api;
pub mod budget;
pub mod cache;
pub mod config;
pub mod cost;
pub mod exchange;
pub mod holdings;
pub mod metrics;
pub mod pipeline;
pub mod reply;
pub mod routing;
pub mod store;
pub mod tenant;
pub mod view;
pub mod window;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod envoy;
