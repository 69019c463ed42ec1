//! `SseUsageReader` on arbitrary input, split arbitrarily: never panics, stays within its memory
//! bound, and gives the same result whatever the chunking.
//!
//! Input layout: byte 0 = kind (bits 0-1) and mode (bit 2: 0 = raw bytes, 1 = each byte picks an
//! SSE/JSON token from `TOKENS`, which reaches deep paths without a corpus); byte 1 = line cap;
//! byte 2 = number of cuts (mod 32); then that many cut bytes (position = byte/256 of the body);
//! the rest is the body.
#![no_main]

#[path = "common/cuts.rs"]
mod cuts;
use libfuzzer_sys::fuzz_target;
use tollgate::api::ApiKind;
use tollgate::api::sse::SseUsageReader;

const KINDS: [ApiKind; 4] = [
    ApiKind::ChatCompletions,
    ApiKind::Responses,
    ApiKind::Embeddings,
    ApiKind::Messages,
];

const TOKENS: &[&str] = &[
    "data: ",
    "data:",
    "data",
    "event: ",
    "event:",
    "id: 1",
    "retry: 5",
    ": comment",
    "\n",
    "\r",
    "\r\n",
    "\n\n",
    "\r\n\r\n",
    "\u{FEFF}",
    " ",
    "[DONE]",
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
    "ping",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.output_text.delta",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\\"",
    "null",
    "0",
    "7",
    "-1",
    "2.5",
    "18446744073709551615",
    "18446744073709551616",
    "\"type\":",
    "\"type\":\"message_start\",",
    "\"type\":\"message_delta\",",
    "\"type\":\"content_block_delta\",",
    "\"type\":\"response.completed\",",
    "\"usage\":",
    "\"usage\":null",
    "\"message\":",
    "\"response\":",
    "\"choices\":[]",
    "\"delta\":{\"content\":\"x\"}",
    "\"arguments\":\"\"",
    "\"prompt_tokens\":",
    "\"completion_tokens\":",
    "\"input_tokens\":",
    "\"output_tokens\":",
    "\"cache_read_input_tokens\":",
    "\"cache_creation_input_tokens\":",
    "\"prompt_tokens_details\":{\"cached_tokens\":3}",
    "\"output_tokens_details\":{\"reasoning_tokens\":2}",
    "{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
    "{\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}",
    "{\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1}}}",
    "é",
    "\u{1F600}",
];

type Outcome = (Option<tollgate::api::Usage>, bool, u64, bool);

fn run(kind: ApiKind, max: usize, chunks: &[&[u8]]) -> Outcome {
    let mut r = SseUsageReader::new(kind, max);
    for c in chunks {
        r.feed(c);
        assert!(r.buffered_bytes() <= max.saturating_mul(3), "memory bound");
    }
    r.finish();
    assert_eq!(r.buffered_bytes(), 0, "finish leaves nothing buffered");
    (r.usage(), r.completed(), r.observed_output(), r.overflowed())
}

fuzz_target!(|data: &[u8]| {
    let [mode, cap, ncuts, rest @ ..] = data else {
        return;
    };
    let kind = KINDS[usize::from(mode & 3)];
    let max = match cap >> 6 {
        0 => usize::from(cap & 63),
        1 => 200,
        2 => 4096,
        _ => 1 << 20,
    };
    let ncuts = usize::from(ncuts % 32).min(rest.len());
    let (cut_bytes, body) = rest.split_at(ncuts);
    let body: Vec<u8> = if mode & 4 == 0 {
        body.to_vec()
    } else {
        body.iter()
            .flat_map(|b| TOKENS[usize::from(*b) % TOKENS.len()].bytes())
            .collect()
    };
    let chunks = cuts::pieces(&body, cut_bytes);

    let whole = run(kind, max, &[&body]);
    let split = run(kind, max, &chunks);
    assert_eq!(whole, split, "chunking changed the result");
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(whole, run(kind, max, &bytewise), "1-byte chunks changed the result");
});
