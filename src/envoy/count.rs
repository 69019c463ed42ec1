//! Bench builds only (feature `bench-count`, never shipped): host calls and allocations per
//! request, as two Envoy counters `make bench` divides by the requests served.
//!
//! Every wrapper in `host` and `metrics` calls [`host_call`] right before its host call, and
//! `on_log` calls [`flush`]. The counting itself lives in `tests/bench/benchcount`: its allocator
//! needs an `unsafe impl GlobalAlloc`, which this crate's `unsafe_code = "forbid"` does not allow
//! in any module; the naive bench filter counts with the same crate.

#[global_allocator]
static ALLOCATOR: benchcount::Counting = benchcount::Counting;

pub use benchcount::{flush, host_call};
