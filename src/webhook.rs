//! Alert webhooks (`alerts.cluster`): one JSON event per budget alert crossing, POSTed by the
//! worker that recorded the crossing in shared data (so once per Envoy across its workers), from
//! the worker's root context on its timer: never on a request's path. Bounded per worker: at
//! most `max_queued` events wait or are out, at most `max_in_flight` calls are out, each event is
//! tried at most `1 + retries` times, backing off 0.5 s, 1 s, 2 s … (at most 30 s) after a
//! failure (no answer in `timeout_ms`, 408, 429 or 5xx). Any other status is final: 2xx
//! delivered, another 4xx refused by the receiver.

use std::collections::VecDeque;

use hashbrown::HashMap;
use serde::Serialize;

use crate::budget::{Limit, Unit};

/// The version of the event's shape (`version` in every event).
pub const PAYLOAD_VERSION: u32 = 1;
/// The first retry waits this long; each later one twice the one before, at most [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: u64 = 500;
pub const MAX_BACKOFF_MS: u64 = 30_000;

/// `alerts`: where the events go and the bounds on sending them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhooks {
    /// The Envoy cluster the receiver is behind.
    pub cluster: String,
    /// The request's `:path` and `:authority`.
    pub path: String,
    pub authority: String,
    pub timeout_ms: u64,
    pub retries: u8,
    pub max_in_flight: usize,
    pub max_queued: usize,
    /// This Envoy's name in the events (`None`: Envoy's node id).
    pub replica: Option<String>,
}

impl Webhooks {
    /// The request's headers: a JSON POST to `path` at `authority`.
    pub fn headers(&self) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":path", &self.path),
            (":authority", &self.authority),
            ("content-type", "application/json"),
            ("user-agent", "tollgate"),
        ]
    }

    /// An HTTP status as the call's answer gives it (`None`: none, or not a number).
    pub fn status(status: Option<&[u8]>) -> Option<u16> {
        std::str::from_utf8(status?).ok()?.parse().ok()
    }

    /// The wait before attempt `attempt` (1: the first retry).
    pub fn backoff_ms(attempt: u8) -> u64 {
        let doublings = u32::from(attempt.saturating_sub(1)).min(16);
        (FIRST_BACKOFF_MS << doublings).min(MAX_BACKOFF_MS)
    }
}

/// A threshold crossed, as its event reports it.
#[derive(Debug, Clone, Copy)]
pub struct Crossing<'a> {
    /// The tenant whose budget the limit is (an ancestor's for an inherited limit).
    pub tenant: &'a str,
    pub limit: &'a Limit,
    /// The threshold, in thousandths of the limit's amount.
    pub permille: u16,
    /// What the limit holds this window, charged and reserved, in its unit.
    pub used: u64,
    pub window_start: u64,
    pub replica: &'a str,
    pub worker: &'a str,
    pub now_ms: u64,
}

/// A quantity in the limit's unit: tokens, or USD (from picodollars: an alert's figure, not an
/// invoice's).
#[derive(Serialize)]
#[serde(untagged)]
enum Quantity {
    Tokens(u64),
    Usd(f64),
}

/// The event, version [`PAYLOAD_VERSION`] (docs/budgets.md#alert-webhooks).
#[derive(Serialize)]
struct Event<'a> {
    version: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    tenant: &'a str,
    limit: &'a str,
    threshold: f64,
    used: Quantity,
    amount: Quantity,
    unit: &'static str,
    window: String,
    window_start: String,
    resets_at: String,
    global: bool,
    shadow: bool,
    replica: &'a str,
    worker: &'a str,
    at: String,
}

/// The event's JSON body.
pub fn event(c: &Crossing<'_>) -> Vec<u8> {
    use crate::window::rfc3339;
    let quantity = |v: u64| match c.limit.unit {
        Unit::Tokens => Quantity::Tokens(v),
        Unit::PicoUsd => Quantity::Usd(v as f64 / 1e12),
    };
    let window_start = rfc3339(c.window_start);
    let id = format!(
        "{}/{}/{}/{window_start}/{}",
        c.tenant,
        c.limit.name,
        crate::alerts::label(c.permille),
        c.replica
    );
    let event = Event {
        version: PAYLOAD_VERSION,
        kind: "budget_alert",
        id,
        tenant: c.tenant,
        limit: &c.limit.name,
        threshold: f64::from(c.permille) / 1000.0,
        used: quantity(c.used),
        amount: quantity(c.limit.amount),
        unit: c.limit.unit.as_str(),
        window: c.limit.window.as_str(),
        window_start,
        resets_at: rfc3339(c.limit.window.end(c.window_start)),
        global: c.limit.global.is_some(),
        shadow: c.limit.shadow,
        replica: c.replica,
        worker: c.worker,
        at: rfc3339(c.now_ms),
    };
    serde_json::to_vec(&event).unwrap_or_default()
}

/// One event on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    pub body: Vec<u8>,
    /// Attempts made so far.
    attempts: u8,
    /// Not to be sent before (ms since the epoch); when sent, when.
    at_ms: u64,
}

/// What became of an event after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// It failed and will be tried again.
    Retrying,
    /// It failed for good: out of retries, or refused by the receiver (a 4xx but 408 and 429).
    Failed,
}

/// One worker's events waiting, and its calls out (bounded by `alerts`).
#[derive(Debug, Default)]
pub struct Outbox {
    waiting: VecDeque<Post>,
    out: HashMap<u32, Post>,
}

impl Outbox {
    /// Queues an event; `false` (dropped) when `max_queued` events are already waiting or out.
    pub fn push(&mut self, hooks: &Webhooks, body: Vec<u8>, now_ms: u64) -> bool {
        if self.waiting.len() + self.out.len() >= hooks.max_queued {
            return false;
        }
        self.waiting.push_back(Post {
            body,
            attempts: 0,
            at_ms: now_ms,
        });
        true
    }

    /// The events to send now, oldest first, within `max_in_flight`: the host sends each and
    /// hands it back with [`Outbox::sent`] or [`Outbox::unsent`].
    pub fn due(&mut self, hooks: &Webhooks, now_ms: u64) -> Vec<Post> {
        let room = hooks.max_in_flight.saturating_sub(self.out.len());
        let mut due = Vec::new();
        let mut i = 0;
        while due.len() < room && i < self.waiting.len() {
            match self.waiting.get(i) {
                Some(post) if post.at_ms <= now_ms => due.extend(self.waiting.remove(i)),
                _ => i += 1,
            }
        }
        due
    }

    /// The host sent `post` as call `token`.
    pub fn sent(&mut self, token: u32, mut post: Post, now_ms: u64) {
        post.attempts = post.attempts.saturating_add(1);
        post.at_ms = now_ms;
        self.out.insert(token, post);
    }

    /// The host could not send `post` (no such cluster): an attempt that failed.
    pub fn unsent(&mut self, hooks: &Webhooks, mut post: Post, now_ms: u64) -> Outcome {
        post.attempts = post.attempts.saturating_add(1);
        self.failed(hooks, post, now_ms)
    }

    /// Call `token` answered with HTTP `status` (`None`: no answer: reset, timeout). `None` when
    /// the call is not this outbox's.
    pub fn answered(
        &mut self,
        hooks: &Webhooks,
        token: u32,
        status: Option<u16>,
        now_ms: u64,
    ) -> Option<Outcome> {
        let post = self.out.remove(&token)?;
        Some(match status {
            Some(200..=299) => Outcome::Delivered,
            Some(s @ 400..=499) if s != 408 && s != 429 => Outcome::Failed,
            _ => self.failed(hooks, post, now_ms),
        })
    }

    /// Calls out for longer than their timeout and a second: Envoy answers every call, so this
    /// only guards the bound on calls out. Each counts as failed.
    pub fn overdue(&mut self, hooks: &Webhooks, now_ms: u64) -> Vec<Outcome> {
        let deadline = hooks.timeout_ms.saturating_add(1_000);
        let late: Vec<u32> = (self.out.iter())
            .filter(|(_, p)| now_ms.saturating_sub(p.at_ms) > deadline)
            .map(|(token, _)| *token)
            .collect();
        let posts: Vec<Post> = late.iter().filter_map(|t| self.out.remove(t)).collect();
        (posts.into_iter())
            .map(|post| self.failed(hooks, post, now_ms))
            .collect()
    }

    fn failed(&mut self, hooks: &Webhooks, mut post: Post, now_ms: u64) -> Outcome {
        if post.attempts > hooks.retries {
            return Outcome::Failed;
        }
        post.at_ms = now_ms.saturating_add(Webhooks::backoff_ms(post.attempts));
        self.waiting.push_back(post);
        Outcome::Retrying
    }

    /// How long the host's timer may sleep (ms): until the next event is due (at most a second
    /// while calls are out, for [`Outbox::overdue`]); `None` when there is nothing to do.
    pub fn next_tick(&self, now_ms: u64) -> Option<u64> {
        let next = self.waiting.iter().map(|p| p.at_ms).min();
        match next {
            Some(at) => Some(at.saturating_sub(now_ms).clamp(1, 1_000)),
            None => (!self.out.is_empty()).then_some(1_000),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Window;

    fn hooks() -> Webhooks {
        Webhooks {
            cluster: "alerts".into(),
            path: "/".into(),
            authority: "alerts".into(),
            timeout_ms: 1000,
            retries: 2,
            max_in_flight: 2,
            max_queued: 3,
            replica: None,
        }
    }

    #[test]
    fn an_event_is_tried_at_most_one_plus_retries_times_with_backoff() {
        let (h, mut o) = (hooks(), Outbox::default());
        assert!(o.push(&h, b"a".to_vec(), 0));
        let post = o.due(&h, 0).pop().unwrap_or_else(unreachable_post);
        o.sent(1, post, 0);
        assert_eq!(o.answered(&h, 1, Some(503), 10), Some(Outcome::Retrying));
        assert_eq!(o.due(&h, 10), vec![], "backs off");
        assert_eq!(o.next_tick(10), Some(500));
        let post = o.due(&h, 510).pop().unwrap_or_else(unreachable_post);
        o.sent(2, post, 510);
        assert_eq!(o.answered(&h, 2, None, 600), Some(Outcome::Retrying));
        let post = o.due(&h, 1600).pop().unwrap_or_else(unreachable_post);
        assert_eq!(
            o.unsent(&h, post, 1600),
            Outcome::Failed,
            "three attempts: done"
        );
        assert_eq!(o.next_tick(1600), None);
        assert_eq!(o.answered(&h, 2, Some(200), 1700), None, "answered once");
    }

    fn unreachable_post() -> Post {
        Post {
            body: Vec::new(),
            attempts: 99,
            at_ms: 0,
        }
    }

    #[test]
    fn the_outbox_is_bounded_and_a_4xx_is_final() {
        let (h, mut o) = (hooks(), Outbox::default());
        for i in 0..5u8 {
            assert_eq!(o.push(&h, vec![i], 0), i < 3, "max_queued 3");
        }
        let due = o.due(&h, 0);
        assert_eq!(due.len(), 2, "max_in_flight 2");
        for (token, post) in (1..).zip(due) {
            o.sent(token, post, 0);
        }
        assert_eq!(o.due(&h, 0), vec![]);
        assert!(!o.push(&h, vec![9], 0), "out calls count against the bound");
        assert_eq!(o.answered(&h, 1, Some(400), 5), Some(Outcome::Failed));
        assert_eq!(o.answered(&h, 2, Some(204), 5), Some(Outcome::Delivered));
        assert_eq!(o.overdue(&h, 5), vec![]);
        let post = o.due(&h, 5).pop().unwrap_or_else(unreachable_post);
        assert_eq!(post.body, vec![2]);
        o.sent(3, post, 5);
        assert_eq!(o.overdue(&h, 2006), vec![Outcome::Retrying]);
        assert_eq!(Webhooks::backoff_ms(1), 500);
        assert_eq!(Webhooks::backoff_ms(7), 30_000);
    }

    #[test]
    fn the_event_names_the_crossing() {
        let limit = Limit {
            name: "usd-month".into(),
            unit: Unit::PicoUsd,
            amount: 500_000_000_000_000,
            window: Window::Month,
            model: None,
            global: None,
            owner: None,
            shadow: false,
            per_user: false,
            alert_at: vec![800],
        };
        let crossing = Crossing {
            tenant: "team-a",
            limit: &limit,
            permille: 875,
            used: 437_500_000_000_000,
            window_start: 1_764_547_200_000, // 2025-12-01
            replica: "envoy-1",
            worker: "0badcafe",
            now_ms: 1_765_000_000_000,
        };
        let event: serde_json::Value =
            serde_json::from_slice(&event(&crossing)).unwrap_or_default();
        assert_eq!(event["version"], 1);
        assert_eq!(
            event["id"],
            "team-a/usd-month/87_5/2025-12-01T00:00:00Z/envoy-1"
        );
        assert_eq!(event["threshold"], 0.875);
        assert_eq!(event["used"], 437.5);
        assert_eq!(event["amount"], 500.0);
        assert_eq!(event["unit"], "usd");
        assert_eq!(event["window"], "month");
        assert_eq!(event["resets_at"], "2026-01-01T00:00:00Z");
        assert_eq!(event["global"], false);
    }
}
