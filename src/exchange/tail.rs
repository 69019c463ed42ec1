//! The bounded copy of a JSON response body an exchange reads usage from: the whole body up to
//! the buffer cap, then only its tail.

/// How much of an over-long JSON response is kept: usage sits at the end of every API's body.
pub(super) const JSON_TAIL_BYTES: usize = 64 * 1024;

/// A bounded copy of a JSON response body: everything up to the cap, then only a tail of at
/// least `keep = min(64 KiB, cap)` and at most `2 × keep` bytes (so the front is cut once per
/// `keep` bytes, not on every chunk: linear work for any body size).
#[derive(Debug, Default)]
pub(super) struct TailBuffer {
    pub(super) bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    pub(super) fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            bytes: Vec::new(),
            cap,
            truncated: false,
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        if !self.truncated && self.bytes.len().saturating_add(chunk.len()) <= self.cap {
            self.bytes.extend_from_slice(chunk);
            return;
        }
        if !self.truncated {
            // Leaving the whole-body copy: give its memory back.
            self.truncated = true;
            let keep = self.keep();
            let from = self.bytes.len().saturating_sub(keep);
            let tail = self.bytes.get(from..).unwrap_or_default().to_vec();
            self.bytes = tail;
        }
        let keep = self.keep();
        if chunk.len() >= keep {
            self.bytes.clear();
            let from = chunk.len().saturating_sub(keep);
            self.bytes
                .extend_from_slice(chunk.get(from..).unwrap_or_default());
            return;
        }
        if self.bytes.len().saturating_add(chunk.len()) > keep.saturating_mul(2) {
            let excess = self
                .bytes
                .len()
                .saturating_add(chunk.len())
                .saturating_sub(keep);
            self.bytes.drain(..excess.min(self.bytes.len()));
        }
        self.bytes.extend_from_slice(chunk);
    }

    /// The copy holds the body from its first byte (it never went past the cap).
    pub(super) fn holds_the_start(&self) -> bool {
        !self.truncated
    }

    fn keep(&self) -> usize {
        JSON_TAIL_BYTES.min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiKind;
    use crate::exchange::BodyReader;
    use crate::exchange::testing::exchange;

    proptest::proptest! {
        /// The tail buffer always ends with the body's last bytes and stays within its bound.
        #[test]
        fn tail_buffer_keeps_the_last_bytes(
            cap in 1usize..200_000,
            sizes in proptest::collection::vec(0usize..80_000, 0..8),
        ) {
            let mut buf = TailBuffer::new(cap);
            let mut all = Vec::new();
            for (i, n) in sizes.into_iter().enumerate() {
                let chunk: Vec<u8> = (0..n).map(|j| (i * 7 + j) as u8).collect();
                buf.push(&chunk);
                all.extend_from_slice(&chunk);
                let keep = JSON_TAIL_BYTES.min(cap);
                proptest::prop_assert!(buf.bytes.len() <= cap.max(2 * keep));
                proptest::prop_assert!(all.ends_with(&buf.bytes));
                proptest::prop_assert!(buf.bytes.len() >= keep.min(all.len()));
                proptest::prop_assert_eq!(buf.truncated, all.len() > cap);
                if !buf.truncated {
                    proptest::prop_assert_eq!(&buf.bytes, &all);
                }
            }
        }
    }

    #[test]
    fn long_json_keeps_only_a_bounded_tail() {
        let mut x = exchange(ApiKind::ChatCompletions);
        x.limits.max_response_buffer_bytes = 1000;
        x.on_response_headers(200, Some(b"application/json"), None);
        let filler = format!(
            r#"{{"choices":[{{"message":{{"content":"{}"}}}}],"#,
            "a".repeat(200_000)
        );
        for chunk in filler.as_bytes().chunks(4096) {
            x.on_response_body(chunk);
            if let BodyReader::Json(buf) = &x.body {
                assert!(buf.bytes.len() <= 1000 + 4096);
            }
        }
        x.on_response_body(br#""usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        x.on_response_complete();
        assert_eq!(x.finish(false).0.output, 2);
    }
}
