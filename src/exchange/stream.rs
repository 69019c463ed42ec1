//! What an exchange asks of a streamed answer's usage reader, whichever wire format it reads:
//! SSE (OpenAI, Anthropic), Gemini's SSE or JSON array, or an AWS event stream.

use crate::api::Usage;
use crate::api::bedrock_stream::BedrockStreamReader;
use crate::api::gemini::GeminiStreamReader;
use crate::api::sse::SseUsageReader;
use crate::api::usage::Reading;

pub(super) trait StreamReader {
    fn feed(&mut self, chunk: &[u8]);
    /// End of the response: dispatch what is pending.
    fn finish(&mut self);
    fn usage(&self) -> Option<Usage>;
    fn invalid_usage(&self) -> bool;
    fn foreign_usage(&self) -> bool;
    fn observed_output(&self) -> u64;
    fn completed(&self) -> bool;
    /// Bytes held between chunks (the exchange's memory bound counts them).
    fn held_bytes(&self) -> usize;

    /// The usage read, telling invalid and foreign usage from none.
    fn reading(&self) -> Reading {
        match self.usage() {
            Some(usage) => Reading::Usage(usage),
            None if self.invalid_usage() => Reading::Invalid,
            None if self.foreign_usage() => Reading::Foreign,
            None => Reading::Absent,
        }
    }
}

/// Each reader's own methods; `$held` is its name for the bytes it holds.
macro_rules! stream_reader {
    ($reader:ty, $held:ident) => {
        impl StreamReader for $reader {
            fn feed(&mut self, chunk: &[u8]) {
                <$reader>::feed(self, chunk)
            }
            fn finish(&mut self) {
                <$reader>::finish(self)
            }
            fn usage(&self) -> Option<Usage> {
                <$reader>::usage(self)
            }
            fn invalid_usage(&self) -> bool {
                <$reader>::invalid_usage(self)
            }
            fn foreign_usage(&self) -> bool {
                <$reader>::foreign_usage(self)
            }
            fn observed_output(&self) -> u64 {
                <$reader>::observed_output(self)
            }
            fn completed(&self) -> bool {
                <$reader>::completed(self)
            }
            fn held_bytes(&self) -> usize {
                <$reader>::$held(self)
            }
        }
    };
}

stream_reader!(SseUsageReader, buffered_bytes);
stream_reader!(GeminiStreamReader, buffered_bytes);
stream_reader!(BedrockStreamReader, held_bytes);
