//! Size and time limits: the `limits` section validated into [`Limits`] (what bounds every
//! request's memory) and the reservation TTL.

use crate::admission::DEFAULT_RESERVATION_TTL_MS;

use super::ConfigError;
use super::raw::RawLimits;

/// Size limits that keep every request's memory bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request bodies above this are refused with 413 before they are buffered further.
    pub max_request_body_bytes: u64,
    /// Request body bytes one VM (one worker) holds at once, over its requests from their first
    /// body byte to their response's head; a body that would pass it is refused with 429.
    pub max_buffered_request_bytes: u64,
    /// JSON response bytes kept to read usage at the end; past it only a tail window is kept.
    pub max_response_buffer_bytes: u64,
    /// Longest SSE line (or event data) kept; longer ones are dropped and flagged.
    pub max_sse_line_bytes: u64,
    /// Decoded bytes read from one compressed (gzip/deflate) response; past it decoding stops
    /// and usage falls back (a decompression bomb costs at most this much work).
    pub max_decoded_response_bytes: u64,
    /// The most tokens one response may claim per field when the request gives no tighter bound
    /// (output: the request's max tokens; input: body bytes + this); more is charged at the bound
    /// and counted as a usage anomaly.
    pub max_reported_tokens: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_body_bytes: 4 * 1024 * 1024,
            max_buffered_request_bytes: 8 * 4 * 1024 * 1024,
            max_response_buffer_bytes: 1024 * 1024,
            max_sse_line_bytes: 1024 * 1024,
            max_decoded_response_bytes: 64 * 1024 * 1024,
            max_reported_tokens: 2_000_000,
        }
    }
}

/// The `limits` section's size limits, defaults where a field is absent.
pub(super) fn build_limits(raw: &RawLimits) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let limits = Limits {
        max_request_body_bytes: positive(
            "limits.max_request_body_bytes",
            raw.max_request_body_bytes,
            defaults.max_request_body_bytes,
        )?,
        max_buffered_request_bytes: 0, // set below, from the body cap
        max_response_buffer_bytes: positive(
            "limits.max_response_buffer_bytes",
            raw.max_response_buffer_bytes,
            defaults.max_response_buffer_bytes,
        )?,
        max_sse_line_bytes: positive(
            "limits.max_sse_line_bytes",
            raw.max_sse_line_bytes,
            defaults.max_sse_line_bytes,
        )?,
        max_decoded_response_bytes: positive(
            "limits.max_decoded_response_bytes",
            raw.max_decoded_response_bytes,
            defaults.max_decoded_response_bytes,
        )?,
        max_reported_tokens: match raw.max_reported_tokens {
            None => defaults.max_reported_tokens,
            Some(v) if (1..=u64::from(u32::MAX)).contains(&v) => v,
            Some(_) => {
                return Err(ConfigError::new(
                    "limits.max_reported_tokens",
                    "must be between 1 and 4294967295",
                ));
            }
        },
    };
    // Eight bodies at the cap by default; never below one.
    let body = limits.max_request_body_bytes;
    let max_buffered_request_bytes = match raw.max_buffered_request_bytes {
        None => body.saturating_mul(8),
        Some(v) if v >= body => v,
        Some(_) => {
            return Err(ConfigError::new(
                "limits.max_buffered_request_bytes",
                "must be at least limits.max_request_body_bytes",
            ));
        }
    };
    Ok(Limits {
        max_buffered_request_bytes,
        ..limits
    })
}

/// How long an unsettled reservation or concurrency slot lives, in milliseconds.
pub(super) fn reservation_ttl_ms(raw: &RawLimits) -> Result<u64, ConfigError> {
    let ttl_ms = match raw.reservation_ttl_seconds {
        None => DEFAULT_RESERVATION_TTL_MS,
        Some(s) if (7..=86_400).contains(&s) => s * 1000,
        Some(_) => {
            return Err(ConfigError::new(
                "limits.reservation_ttl_seconds",
                "must be between 7 and 86400 (keep it above the route timeout)",
            ));
        }
    };
    Ok(ttl_ms)
}

fn positive(field: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(v) if v > u64::from(u32::MAX) => Err(ConfigError::new(field, "must be below 4 GiB")),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    fn response_limits_are_read_and_checked() {
        let cfg = Config::from_json(
            br#"{"identity":{"source":"header","header":"x"},"limits":{"max_decoded_response_bytes":1000,"max_reported_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(cfg.limits.max_decoded_response_bytes, 1000);
        assert_eq!(cfg.limits.max_reported_tokens, 5);
        for bad in [
            r#""max_reported_tokens":0"#,
            r#""max_reported_tokens":4294967296"#,
        ] {
            let e = err(&format!(
                r#"{{"identity":{{"source":"header","header":"x"}},"limits":{{{bad}}}}}"#
            ));
            assert_eq!(e.field, "limits.max_reported_tokens");
        }
        let e = err(
            r#"{"identity":{"source":"header","header":"x"},"limits":{"max_decoded_response_bytes":0}}"#,
        );
        assert_eq!(e.field, "limits.max_decoded_response_bytes");
    }

    #[test]
    fn buffered_request_bytes_default_to_eight_bodies_and_hold_one() {
        let cfg = |limits: &str| {
            Config::from_json(
                format!(r#"{{"identity":{{"source":"header","header":"x"}},"limits":{limits}}}"#)
                    .as_bytes(),
            )
        };
        let limits = cfg("{}").unwrap().limits;
        assert_eq!(limits.max_buffered_request_bytes, 32 * 1024 * 1024);
        let limits = cfg(r#"{"max_request_body_bytes":1000}"#).unwrap().limits;
        assert_eq!(limits.max_buffered_request_bytes, 8000);
        let limits = cfg(r#"{"max_request_body_bytes":1000,"max_buffered_request_bytes":1000}"#);
        assert_eq!(limits.unwrap().limits.max_buffered_request_bytes, 1000);
        for bad in [
            r#"{"max_request_body_bytes":1000,"max_buffered_request_bytes":999}"#,
            r#"{"max_buffered_request_bytes":-1}"#,
        ] {
            let e = cfg(bad).expect_err(bad);
            assert_eq!(e.field, "limits.max_buffered_request_bytes", "{bad}");
        }
    }
}
