//! Realistic response bodies of every API (with nested `"usage"` keys and escaped quotes to trip
//! a naive scan) and the usage each must yield, shared by the usage tests.

use crate::api::{ApiKind, Usage};

pub(super) const CHAT: &str = r#"{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
{
  "index": 0,
  "message": {
    "role": "assistant",
    "content": "He said \"usage\": {\"prompt_tokens\": 5} and left. \\\"usage\\\":",
    "refusal": null,
    "annotations": []
  },
  "logprobs": null,
  "finish_reason": "stop"
}
  ],
  "usage": {
"prompt_tokens": 1117,
"completion_tokens": 46,
"total_tokens": 1163,
"prompt_tokens_details": {
  "cached_tokens": 1024,
  "audio_tokens": 0
},
"completion_tokens_details": {
  "reasoning_tokens": 12,
  "audio_tokens": 0,
  "accepted_prediction_tokens": 0,
  "rejected_prediction_tokens": 0
}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"#;

pub(super) const RESPONSES: &str = r#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4o-2024-08-06","output":[{"type":"message","id":"msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41","status":"completed","role":"assistant","content":[{"type":"output_text","text":"The image depicts a scenic landscape.","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[{"type":"function","name":"log","parameters":{"type":"object","properties":{"usage":{"type":"integer"}}},"strict":true}],"top_p":1,"truncation":"disabled","usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":128},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":7},"total_tokens":380},"user":null,"metadata":{"usage":"nightly-batch"}}"#;

pub(super) const EMBEDDINGS: &str = r#"{
  "object": "list",
  "data": [
{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -1.5e-3, 4E2]}
  ],
  "model": "text-embedding-3-small",
  "usage": {"prompt_tokens": 8, "total_tokens": 8}
}
"#;

pub(super) const MESSAGES: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[{"type":"text","text":"Let me log that."},{"type":"tool_use","id":"toolu_01","name":"record","input":{"usage":{"input_tokens":999999,"output_tokens":999999}}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":21,"cache_creation_input_tokens":188086,"cache_read_input_tokens":1000,"cache_creation":{"ephemeral_5m_input_tokens":188086,"ephemeral_1h_input_tokens":0},"output_tokens":393,"service_tier":"standard","server_tool_use":null}}"#;

pub(super) fn chat_usage() -> Usage {
    Usage {
        input: 1117,
        output: 46,
        cached_input: 1024,
        cache_write_input: 0,
        reasoning: 12,
    }
}

pub(super) fn responses_usage() -> Usage {
    Usage {
        input: 328,
        output: 52,
        cached_input: 128,
        cache_write_input: 0,
        reasoning: 7,
    }
}

pub(super) fn messages_usage() -> Usage {
    Usage {
        input: 21 + 188_086 + 1000,
        output: 393,
        cached_input: 1000,
        cache_write_input: 188_086,
        reasoning: 0,
    }
}

pub(super) fn embeddings_usage() -> Usage {
    Usage {
        input: 8,
        ..Usage::default()
    }
}

pub(super) fn fixtures() -> [(ApiKind, &'static str, Usage); 4] {
    [
        (ApiKind::ChatCompletions, CHAT, chat_usage()),
        (ApiKind::Responses, RESPONSES, responses_usage()),
        (ApiKind::Embeddings, EMBEDDINGS, embeddings_usage()),
        (ApiKind::Messages, MESSAGES, messages_usage()),
    ]
}
