//! The plugin configuration parser and the request-facts parser never panic on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::ApiKind;
use tollgate::api::request::parse_request;
use tollgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let _ = Config::from_json(data);
    for kind in [ApiKind::ChatCompletions, ApiKind::Responses, ApiKind::Embeddings, ApiKind::Messages] {
        let _ = parse_request(kind, data);
    }
});
