//! The pipeline, natively: every decision with an in-memory store and a fake clock.
