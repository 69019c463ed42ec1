//! The shared-data value decoders (`tollgate::record::Record::decode`, and through it
//! `budget::Bucket::decode` and `holdings::Ring::decode`) on arbitrary bytes: what another build,
//! a corrupted value or a foreign writer under the same `vm_id` could leave in a budget record.
//! Never panics; a decoded record encodes and decodes to itself (what admission writes back
//! reads the same); it holds at most one bucket per 10 input bytes; and a counting global
//! allocator's peak during a run, above what was live before it, stays under 100 bytes per
//! input byte plus 4 KiB: two decoded records (a bucket is about 190 bytes decoded, its list
//! doubling as it grows) and one encoding (170 bytes a bucket), each bucket from 10 input bytes
//! at least.
//!
//! `TOLLGATE_FUZZ_BOUND=off` in the environment skips the allocator-peak assertion.
#![no_main]

use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use tollgate::record::Record;

#[path = "common/counting.rs"]
mod counting;
use counting::{LIVE, PEAK};

fuzz_target!(|data: &[u8]| {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let record = Record::decode(Some(data));
    assert!(record.buckets.len() <= data.len() / 10);
    let bytes = record.encode();
    assert_eq!(Record::decode(Some(&bytes)), record);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    if std::env::var("TOLLGATE_FUZZ_BOUND").as_deref() != Ok("off") {
        assert!(peak <= 100 * data.len() + 4096, "peak {peak} for {} bytes", data.len());
    }
});
