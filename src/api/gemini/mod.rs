//! Gemini (AI Studio) and Vertex AI `generateContent`: request facts and the max-output edit
//! (`request`), usage as Google bills it (`usage`), and the streamed usage of both stream
//! formats (`stream`). Pure Rust, no host calls; the pipeline wires it in.
//!
//! ```text
//! request body ──generation_facts──▶ max_output_tokens × candidates (strict mode's bound)
//!              ──set_max_output_tokens──▶ body for the upstream (clamp / strict)
//! response     ──read_response──▶ usageMetadata, blockReason, finishReason
//! stream       ──GeminiStreamReader (SSE | JSON array)──▶ last value of each usage field
//! ```

pub mod request;
pub mod stream;
pub mod usage;

pub use request::{GenerationFacts, generation_facts, set_max_output_tokens};
pub use stream::{GeminiStreamReader, JsonArrayElements, StreamFormat};
pub use usage::{ResponseFacts, UsageMetadata, read_body_usage, read_response};

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests;
