//! Conversations that cannot run away: per conversation (the conversation header's id), at most
//! `max_requests` steps, `tokens`, `usd` and `max_age_seconds` of wall clock since its first
//! request, in a bounded number of slots per tenant recycled once idle.
//!
//! One shared-data key per slot holds the whole conversation: who owns it (a fingerprint of
//! the id), when it started and was last active, its steps, what it used, what its requests in
//! flight hold (by epoch, so a dead VM's holdings expire), and which cost thresholds it crossed.
//! Admission and settlement are one compare-and-swap each, exact across workers.
//!
//! A slot is recycled only when idle (no activity for `idle_seconds` and nothing in flight):
//! a new id never resets a live conversation. An id that hashes to a slot another live
//! conversation holds shares it (its steps, tokens and cost), which is stricter for both, never
//! looser; a client sending a new id per request cannot free a runaway conversation's budget.

use sha2::{Digest, Sha256};

use crate::holdings::{RING_BYTES, Ring};
use crate::store::{SharedStore, UpdateError, update};

/// A tenant's `conversation_limits` (all optional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversationLimits {
    /// Requests (agent steps) per conversation.
    pub max_requests: Option<u64>,
    /// Input + output tokens per conversation.
    pub tokens: Option<u64>,
    /// Cost per conversation, in picodollars.
    pub pico_usd: Option<u64>,
    /// Wall clock since the conversation's first request.
    pub max_age_ms: Option<u64>,
}

/// The `conversations` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversations {
    /// The request header naming the conversation (lower case).
    pub header: String,
    /// Slots per tenant scope.
    pub slots: u64,
    /// A slot without activity (and nothing in flight) this long is recycled.
    pub idle_ms: u64,
    /// Running costs (picodollars, ascending) whose crossing is counted per conversation.
    pub cost_thresholds: Vec<u64>,
    /// The thresholds as metric label values (`0_50` for $0.50).
    pub threshold_labels: Vec<String>,
}

/// Which conversation limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    MaxRequests,
    Tokens,
    Usd,
    MaxAge,
}

impl Spent {
    /// The limit's field name (`conversation_limits.<name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Spent::MaxRequests => "max_requests",
            Spent::Tokens => "tokens",
            Spent::Usd => "usd",
            Spent::MaxAge => "max_age_seconds",
        }
    }
}

/// One slot's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    fingerprint: u64,
    /// 0: never used.
    started_ms: u64,
    last_ms: u64,
    steps: u64,
    tokens: u64,
    pico_usd: u64,
    /// Bit `i`: cost threshold `i` crossed.
    crossed: u64,
    held_tokens: Ring,
    held_pico_usd: Ring,
}

const SLOT_BYTES: usize = 7 * 8 + 2 * RING_BYTES;

impl Slot {
    fn decode(bytes: Option<&[u8]>) -> Slot {
        let Some(bytes) = bytes.filter(|b| b.len() == SLOT_BYTES) else {
            return Slot::default();
        };
        let (words, rings) = bytes.split_at(7 * 8);
        let (tokens_ring, usd_ring) = rings.split_at(RING_BYTES);
        let mut w = words
            .chunks_exact(8)
            .filter_map(|c| <[u8; 8]>::try_from(c).ok())
            .map(u64::from_le_bytes);
        let mut next = || w.next().unwrap_or(0);
        Slot {
            fingerprint: next(),
            started_ms: next(),
            last_ms: next(),
            steps: next(),
            tokens: next(),
            pico_usd: next(),
            crossed: next(),
            held_tokens: Ring::decode(tokens_ring),
            held_pico_usd: Ring::decode(usd_ring),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SLOT_BYTES);
        for word in [
            self.fingerprint,
            self.started_ms,
            self.last_ms,
            self.steps,
            self.tokens,
            self.pico_usd,
            self.crossed,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        self.held_tokens.encode_into(&mut out);
        self.held_pico_usd.encode_into(&mut out);
        out
    }
}

/// A conversation id: its slot and fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationId {
    pub slot: u64,
    pub fingerprint: u64,
}

impl Conversations {
    pub fn id(&self, id: &[u8]) -> ConversationId {
        let digest: [u8; 32] = Sha256::digest(id).into();
        let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, ..] = digest;
        ConversationId {
            slot: u64::from_le_bytes([a, b, c, d, e, f, g, h]) % self.slots.max(1),
            // Never 0, so a fresh slot is never "owned" by an id.
            fingerprint: u64::from_le_bytes([i, j, k, l, m, n, o, p]).max(1),
        }
    }
}

/// The shared-data key of a tenant scope's conversation slot.
pub fn slot_key(scope: &str, slot: u64) -> String {
    format!("tg:cv2:{scope}:{slot}")
}

/// What one request asks of its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub id: ConversationId,
    pub tokens: u64,
    pub pico_usd: u64,
    pub now_ms: u64,
    pub epoch: u64,
}

/// An admitted request's place in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Its step number (1 for the first request).
    pub step: u64,
    /// The conversation started with this request.
    pub started: bool,
    /// The slot was another live conversation's: shared.
    pub shared: bool,
    /// Identifies the conversation at settlement (a recycled slot is not this one).
    pub started_ms: u64,
    /// The epoch of the holdings, and what was held.
    pub epoch: u64,
    pub tokens: u64,
    pub pico_usd: u64,
    /// The slot's previous activity (for the active count), 0 when new.
    pub last_ms: u64,
}

/// Admits a request in its conversation's slot, or says which limit is spent.
pub fn admit<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    limits: &ConversationLimits,
    idle_ms: u64,
    ask: Ask,
) -> Result<Step, Option<Spent>> {
    let result = update(store, key, |bytes| {
        let mut slot = Slot::decode(bytes);
        slot.held_tokens.advance(ask.epoch);
        slot.held_pico_usd.advance(ask.epoch);
        let in_flight = slot.held_tokens.total() > 0 || slot.held_pico_usd.total() > 0;
        let idle = slot.started_ms == 0
            || (ask.now_ms.saturating_sub(slot.last_ms) >= idle_ms && !in_flight);
        let last_ms = if idle { 0 } else { slot.last_ms };
        let started = idle;
        if idle {
            slot = Slot {
                fingerprint: ask.id.fingerprint,
                started_ms: ask.now_ms.max(1),
                last_ms: ask.now_ms,
                held_tokens: slot.held_tokens,
                held_pico_usd: slot.held_pico_usd,
                ..Slot::default()
            };
        }
        let shared = slot.fingerprint != ask.id.fingerprint;
        let over = |used: u64, held: u64, asked: u64, limit: Option<u64>| {
            limit.is_some_and(|l| used.saturating_add(held).saturating_add(asked) > l)
        };
        if limits
            .max_age_ms
            .is_some_and(|age| ask.now_ms.saturating_sub(slot.started_ms) > age)
        {
            return Err(Spent::MaxAge);
        }
        if limits.max_requests.is_some_and(|max| slot.steps >= max) {
            return Err(Spent::MaxRequests);
        }
        if over(
            slot.tokens,
            slot.held_tokens.total(),
            ask.tokens,
            limits.tokens,
        ) {
            return Err(Spent::Tokens);
        }
        if over(
            slot.pico_usd,
            slot.held_pico_usd.total(),
            ask.pico_usd,
            limits.pico_usd,
        ) {
            return Err(Spent::Usd);
        }
        slot.steps = slot.steps.saturating_add(1);
        slot.last_ms = slot.last_ms.max(ask.now_ms);
        let epoch = slot.held_tokens.hold(ask.tokens);
        slot.held_pico_usd.hold(ask.pico_usd);
        let step = Step {
            step: slot.steps,
            started,
            shared,
            started_ms: slot.started_ms,
            epoch,
            tokens: ask.tokens,
            pico_usd: ask.pico_usd,
            last_ms,
        };
        Ok((slot.encode(), step))
    });
    result.map_err(|err| match err {
        UpdateError::Refused(spent) => Some(spent),
        UpdateError::Contended => None,
    })
}

/// What a settlement left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The conversation's running cost, picodollars.
    pub pico_usd: u64,
    /// The cost thresholds (indices) this settlement crossed.
    pub crossed: Vec<usize>,
}

/// Replaces a request's holding with what it used; `None` when the slot was recycled since
/// (the conversation is gone) or under endless contention.
pub fn settle<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    step: &Step,
    used: (u64, u64),
    thresholds: &[u64],
    (now_ms, epoch): (u64, u64),
) -> Option<Settled> {
    let result: Result<Settled, UpdateError<()>> = update(store, key, |bytes| {
        let mut slot = Slot::decode(bytes);
        if slot.started_ms != step.started_ms {
            return Err(());
        }
        slot.held_tokens.advance(epoch);
        slot.held_pico_usd.advance(epoch);
        slot.held_tokens.release(step.epoch, step.tokens);
        slot.held_pico_usd.release(step.epoch, step.pico_usd);
        slot.tokens = slot.tokens.saturating_add(used.0);
        slot.pico_usd = slot.pico_usd.saturating_add(used.1);
        slot.last_ms = slot.last_ms.max(now_ms);
        let mut crossed = Vec::new();
        for (i, &threshold) in thresholds.iter().enumerate().take(64) {
            let bit = 1u64 << i;
            if slot.crossed & bit == 0 && slot.pico_usd >= threshold {
                slot.crossed |= bit;
                crossed.push(i);
            }
        }
        let settled = Settled {
            pico_usd: slot.pico_usd,
            crossed,
        };
        Ok((slot.encode(), settled))
    });
    result.ok()
}

/// The shared count of a tenant scope's active conversations: a ring of conversations by the
/// epoch of their last activity (epochs of `idle_ms / 7`), so those idle longer drop out.
pub fn active_key(scope: &str) -> String {
    format!("tg:ca2:{scope}")
}

/// Moves a conversation last active at `last_ms` (0: new) into the current epoch of the active
/// count; returns the count, or `None` when nothing changed (or under endless contention).
pub fn touch_active<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    idle_ms: u64,
    last_ms: u64,
    now_ms: u64,
) -> Option<u64> {
    let epoch_ms = crate::holdings::epoch_ms_for_ttl(idle_ms);
    let now_epoch = now_ms / epoch_ms;
    let last_epoch = (last_ms > 0).then(|| last_ms / epoch_ms);
    if last_epoch == Some(now_epoch) {
        return None;
    }
    let result: Result<u64, UpdateError<()>> = update(store, key, |bytes| {
        let mut ring = Ring::decode(bytes.unwrap_or_default());
        ring.advance(now_epoch);
        if let Some(last) = last_epoch {
            ring.release(last, 1);
        }
        ring.hold(1);
        let mut out = Vec::with_capacity(RING_BYTES);
        ring.encode_into(&mut out);
        Ok((out, ring.total()))
    });
    result.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn conversations(slots: u64) -> Conversations {
        Conversations {
            header: "x-conversation-id".into(),
            slots,
            idle_ms: 60_000,
            cost_thresholds: vec![500_000_000_000, 1_000_000_000_000],
            threshold_labels: vec!["0_50".into(), "1_00".into()],
        }
    }

    fn ask(c: &Conversations, id: &str, tokens: u64, now_ms: u64) -> Ask {
        Ask {
            id: c.id(id.as_bytes()),
            tokens,
            pico_usd: tokens * 1_000_000,
            now_ms,
            epoch: now_ms / 10_000,
        }
    }

    #[test]
    fn a_runaway_conversation_is_stopped_by_steps_and_tokens() {
        let c = conversations(16);
        let store = MemStore::default();
        let limits = ConversationLimits {
            max_requests: Some(3),
            tokens: Some(1_000),
            ..ConversationLimits::default()
        };
        let key = slot_key("t", c.id(b"loop").slot);
        for n in 1..=3 {
            let step = admit(&store, &key, &limits, c.idle_ms, ask(&c, "loop", 100, n)).unwrap();
            assert_eq!((step.step, step.started), (n, n == 1));
            settle(&store, &key, &step, (100, 0), &[], (n, 0)).unwrap();
        }
        assert_eq!(
            admit(&store, &key, &limits, c.idle_ms, ask(&c, "loop", 100, 4)),
            Err(Some(Spent::MaxRequests))
        );
        let tokens = ConversationLimits {
            tokens: Some(1_000),
            ..ConversationLimits::default()
        };
        let key = slot_key("t", c.id(b"big").slot);
        let step = admit(&store, &key, &tokens, c.idle_ms, ask(&c, "big", 600, 1)).unwrap();
        // What is in flight counts: a second request at once does not fit.
        assert_eq!(
            admit(&store, &key, &tokens, c.idle_ms, ask(&c, "big", 600, 2)),
            Err(Some(Spent::Tokens))
        );
        settle(&store, &key, &step, (300, 0), &[], (3, 0)).unwrap();
        assert!(admit(&store, &key, &tokens, c.idle_ms, ask(&c, "big", 600, 4)).is_ok());
    }

    #[test]
    fn age_idle_recycling_and_costs_crossed_once() {
        let c = conversations(16);
        let store = MemStore::default();
        let limits = ConversationLimits {
            max_age_ms: Some(30_000),
            ..ConversationLimits::default()
        };
        let key = slot_key("t", c.id(b"a").slot);
        let first = admit(&store, &key, &limits, c.idle_ms, ask(&c, "a", 1, 1_000)).unwrap();
        let done = settle(
            &store,
            &key,
            &first,
            (1, 600_000_000_000),
            &c.cost_thresholds,
            (1_000, 0),
        )
        .unwrap();
        assert_eq!(done.crossed, [0]);
        let second = admit(&store, &key, &limits, c.idle_ms, ask(&c, "a", 1, 20_000)).unwrap();
        let done = settle(
            &store,
            &key,
            &second,
            (1, 600_000_000_000),
            &c.cost_thresholds,
            (20_000, 0),
        )
        .unwrap();
        assert_eq!((done.crossed, done.pico_usd), (vec![1], 1_200_000_000_000));
        // Past its age: refused, though it is active.
        assert_eq!(
            admit(&store, &key, &limits, c.idle_ms, ask(&c, "a", 1, 40_000)),
            Err(Some(Spent::MaxAge))
        );
        // Idle for a minute: the slot is recycled, a new conversation starts.
        let later = admit(&store, &key, &limits, c.idle_ms, ask(&c, "a", 1, 90_000)).unwrap();
        assert!(later.started && later.step == 1);
        // The old request's settlement (its conversation is gone) touches nothing.
        assert_eq!(
            settle(&store, &key, &second, (1, 1), &[], (90_001, 0)),
            None
        );
    }

    #[test]
    fn a_new_id_never_resets_a_live_conversation() {
        let c = conversations(1);
        let store = MemStore::default();
        let limits = ConversationLimits {
            max_requests: Some(2),
            ..ConversationLimits::default()
        };
        let key = slot_key("t", 0);
        let a = admit(&store, &key, &limits, c.idle_ms, ask(&c, "a", 1, 1)).unwrap();
        // One slot: every other id shares it, and the runaway stays stopped.
        let b = admit(&store, &key, &limits, c.idle_ms, ask(&c, "b", 1, 2)).unwrap();
        assert!(b.shared && !b.started && b.step == 2);
        for n in 0..1000 {
            let id = format!("flood-{n}");
            assert_eq!(
                admit(&store, &key, &limits, c.idle_ms, ask(&c, &id, 1, 3 + n)),
                Err(Some(Spent::MaxRequests))
            );
        }
        settle(&store, &key, &a, (1, 0), &[], (5, 0)).unwrap();
    }

    #[test]
    fn the_active_count_follows_activity_epochs() {
        let store = MemStore::default();
        let idle = 70_000; // epochs of 10 s
        assert_eq!(touch_active(&store, "k", idle, 0, 1_000), Some(1));
        assert_eq!(touch_active(&store, "k", idle, 0, 2_000), Some(2));
        // Same epoch as its last activity: nothing to move.
        assert_eq!(touch_active(&store, "k", idle, 1_000, 5_000), None);
        // A later epoch: moved, not added.
        assert_eq!(touch_active(&store, "k", idle, 1_000, 15_000), Some(2));
        // Idle past the ring: gone.
        assert_eq!(touch_active(&store, "k", idle, 0, 200_000), Some(1));
    }

    #[test]
    fn garbage_slots_read_as_fresh() {
        assert_eq!(Slot::decode(Some(b"junk")), Slot::default());
        let s = Slot {
            fingerprint: 7,
            started_ms: 9,
            steps: 3,
            ..Slot::default()
        };
        assert_eq!(Slot::decode(Some(&s.encode())), s);
    }
}
