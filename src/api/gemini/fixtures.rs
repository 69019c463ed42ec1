//! Real-shaped Gemini stream chunks, every one accepted by google-genai 3.6.1's
//! `types.GenerateContentResponse.model_validate`; the `SDK` stream is the SDK's own
//! serialisation (`model_dump_json(by_alias=True, exclude_none=True)`) of responses built with
//! its types. The tests frame them both ways (SSE with each line ending, and the JSON array).

/// (name, chunks, input, output, cached_input, reasoning)
pub(super) type Stream = (&'static str, &'static [&'static str], u64, u64, u64, u64);

pub(super) const STREAMS: [Stream; 5] = [
    (
        "EVERY",
        &[
            r##"{"candidates":[{"content":{"parts":[{"text":"Hello"}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":2100,"candidatesTokenCount":1,"thoughtsTokenCount":412,"cachedContentTokenCount":2048,"totalTokenCount":2513,"promptTokensDetails":[{"modality":"TEXT","tokenCount":2100}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":" wor\"ldé {["}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":2100,"candidatesTokenCount":5,"thoughtsTokenCount":412,"cachedContentTokenCount":2048,"totalTokenCount":2517,"promptTokensDetails":[{"modality":"TEXT","tokenCount":2100}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":2100,"candidatesTokenCount":9,"thoughtsTokenCount":412,"cachedContentTokenCount":2048,"toolUsePromptTokenCount":17,"totalTokenCount":2538,"promptTokensDetails":[{"modality":"TEXT","tokenCount":2100}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
        ],
        2117,
        421,
        2048,
        412,
    ),
    (
        "LAST",
        &[
            r##"{"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":"lo"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"index":0,"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":31,"candidatesTokenCount":3,"thoughtsTokenCount":7,"totalTokenCount":41,"promptTokensDetails":[{"modality":"TEXT","tokenCount":31}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
        ],
        31,
        10,
        0,
        7,
    ),
    (
        "SEPARATE",
        &[
            r##"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":""}],"role":"model"},"index":0,"finishReason":"STOP"}],"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
            r##"{"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":2,"thoughtsTokenCount":40,"toolUsePromptTokenCount":5,"totalTokenCount":59,"promptTokensDetails":[{"modality":"TEXT","tokenCount":12}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY","createTime":"2026-12-07T15:00:00.123456Z"}"##,
        ],
        17,
        42,
        0,
        40,
    ),
    (
        "BLOCKED",
        &[
            r##"{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT","safetyRatings":[{"category":"HARM_CATEGORY_HARASSMENT","probability":"HIGH"}]},"usageMetadata":{"promptTokenCount":9,"totalTokenCount":9,"promptTokensDetails":[{"modality":"TEXT","tokenCount":9}]},"modelVersion":"gemini-2.5-flash","responseId":"x7lBacq2Kf2Cz7IP0vbRkAY"}"##,
        ],
        9,
        0,
        0,
        0,
    ),
    (
        "SDK",
        &[
            r##"{"candidates":[{"content":{"parts":[{"text":"Thinking done."}],"role":"model"},"index":0}],"modelVersion":"gemini-2.5-pro","responseId":"sdk-1","usageMetadata":{"promptTokenCount":520,"totalTokenCount":520}}"##,
            r##"{"candidates":[{"content":{"parts":[{"text":" Answer: 42"}],"role":"model"},"finishReason":"STOP","index":0}],"modelVersion":"gemini-2.5-pro","responseId":"sdk-1","usageMetadata":{"cachedContentTokenCount":512,"candidatesTokenCount":6,"promptTokenCount":520,"thoughtsTokenCount":300,"toolUsePromptTokenCount":8,"totalTokenCount":834}}"##,
        ],
        528,
        306,
        512,
        300,
    ),
];
