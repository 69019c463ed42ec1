//! Tollgate: a proxy-wasm filter that makes Envoy an LLM API gateway.
//!
//! Request flow (one exchange):
//! ```text
//! request headers ─ api::ApiKind::from_path ── not an LLM path ──▶ pass through untouched
//!        │ tenant::Identity (header │ API-key digest │ metadata) ── unknown ──▶ 401 (reply)
//!        ▼ pause; buffer the body (cap ──▶ 413)
//! request body ─── api::request::parse_request ── bad JSON ──▶ 400 (reply)
//!        ▼ continue upstream (accept-encoding: identity)
//! response ─────── exchange::Exchange: JSON tail or incremental SSE (gzip decoded) ──▶ Usage
//! end / on_log ─── record → filter state `wasm.tollgate.*` → the JSON access log
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
pub mod metrics;
pub mod reply;
pub mod routing;
pub mod store;
pub mod tenant;
pub mod view;
pub mod window;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod envoy;
