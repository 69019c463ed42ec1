//! The `conversations` section: the conversation header (`routing.conversation_header` still
//! works), slots per tenant, when a conversation is idle, and the cost thresholds counted.

use crate::conversation::Conversations;
use crate::cost;

use super::raw::RawConversations;
use super::{ConfigError, check_header_name};

/// At most this many cost thresholds.
pub const MAX_THRESHOLDS: usize = 16;

/// `None` when conversations are neither configured nor limited anywhere (`limited`).
pub(super) fn build_conversations(
    raw: Option<&RawConversations>,
    routing_header: Option<&str>,
    limited: Option<&str>,
) -> Result<Option<Conversations>, ConfigError> {
    if raw.is_none() && limited.is_none() {
        return Ok(None);
    }
    let header = match (raw.and_then(|r| r.header.as_deref()), routing_header) {
        (Some(h), _) => {
            check_header_name(h).map_err(|r| ConfigError::new("conversations.header", r))?
        }
        (None, Some(h)) => h.to_string(),
        (None, None) => {
            let at = limited.unwrap_or("conversations.header");
            return Err(ConfigError::new(
                at,
                "needs a conversation header: `conversations.header` (or `routing.conversation_header`)",
            ));
        }
    };
    let slots = match raw.and_then(|r| r.slots) {
        None => 4096,
        Some(n) if (1..=65536).contains(&n) => n,
        Some(_) => {
            return Err(ConfigError::new(
                "conversations.slots",
                "must be between 1 and 65536",
            ));
        }
    };
    let idle_seconds = match raw.and_then(|r| r.idle_seconds) {
        None => 1800,
        Some(n) if (60..=2_592_000).contains(&n) => n,
        Some(_) => {
            return Err(ConfigError::new(
                "conversations.idle_seconds",
                "must be between 60 and 2592000 (30 days)",
            ));
        }
    };
    let raw_thresholds = raw
        .and_then(|r| r.cost_thresholds_usd.as_deref())
        .unwrap_or_default();
    if raw_thresholds.len() > MAX_THRESHOLDS {
        return Err(ConfigError::new(
            "conversations.cost_thresholds_usd",
            format!("at most {MAX_THRESHOLDS} thresholds"),
        ));
    }
    let mut cost_thresholds: Vec<u64> = Vec::with_capacity(raw_thresholds.len());
    for (i, usd) in raw_thresholds.iter().enumerate() {
        let at = format!("conversations.cost_thresholds_usd[{i}]");
        let pico = cost::parse_usd(usd).map_err(|r| ConfigError::new(at.as_str(), r))?;
        if pico == 0 || cost_thresholds.last().is_some_and(|&last| pico <= last) {
            return Err(ConfigError::new(
                at,
                "thresholds are greater than 0 and in ascending order",
            ));
        }
        cost_thresholds.push(pico);
    }
    Ok(Some(Conversations {
        header,
        slots,
        idle_ms: idle_seconds.saturating_mul(1000),
        threshold_labels: raw_thresholds.iter().map(|t| t.replace('.', "_")).collect(),
        cost_thresholds,
    }))
}
