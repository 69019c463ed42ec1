//! The plugin configuration parser and the request-facts parsers never panic on any bytes: the
//! whole input is the configuration, and the request body of every `ApiKind`, read both as the
//! body alone (`parse_request`) and, for the kinds that name the model in the path, through
//! `read_request` with a path model (streaming operation or not).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::api::ApiKind;
use tollgate::api::dialect::{Call, PathModel};
use tollgate::api::request::{parse_request, read_request};
use tollgate::config::Config;

const KINDS: [ApiKind; 10] = ApiKind::ALL;

fuzz_target!(|data: &[u8]| {
    let _ = Config::from_json(data);
    for kind in KINDS {
        let _ = parse_request(kind, data);
        if matches!(
            kind,
            ApiKind::ChatCompletions | ApiKind::Responses | ApiKind::Embeddings | ApiKind::Messages
        ) {
            continue;
        }
        for stream in [false, true] {
            let call = Call {
                kind,
                stream,
                model: Some(PathModel {
                    start: 0,
                    end: 0,
                    name: Some("m".to_string()),
                }),
            };
            let _ = read_request(&call, data);
        }
    }
});
