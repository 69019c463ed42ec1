//! The response: headers for the client (served model, cache status, rate limits), the body
//! watched for usage (and rewritten when Tollgate asked for a usage chunk the client did not).

use super::{Effects, Gateway, Headers, Host, Request, State};
use crate::metrics::{Histogram, Stat, StatUpdate};

/// What the pipeline reads of the response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseHead<'a> {
    pub status: u32,
    pub content_type: Option<&'a [u8]>,
    pub content_encoding: Option<&'a [u8]>,
}

impl<'a> ResponseHead<'a> {
    /// From the `:status`, `content-type` and `content-encoding` headers.
    pub fn of(headers: &'a Headers) -> ResponseHead<'a> {
        let status = headers
            .get(":status")
            .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        ResponseHead {
            status,
            content_type: headers.get("content-type"),
            content_encoding: headers.get("content-encoding"),
        }
    }
}

impl Request {
    /// The response headers arrived: the header edits for the client, and the record when the
    /// response has no body.
    /// `headers`: all of them, read in one host call; edited, they come back whole in
    /// [`Effects::header_map`] (one host call instead of one per edit).
    pub fn on_response_headers<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        mut headers: Headers,
        end_of_stream: bool,
    ) -> Effects<'g> {
        // The upstream has read the request: Envoy no longer holds its body.
        self.hold = None;
        let upstream_ms = headers.get("x-envoy-upstream-service-time");
        if let Some(ms) = upstream_ms.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()) {
            self.seen
                .push(("tollgate.upstream_ms", crate::ledger::Fact::Count(ms)));
        }
        let head = ResponseHead::of(&headers);
        let State::Active(active) = &mut self.state else {
            return Effects::proceed();
        };
        // Kills this VM while the request holds its reservation and concurrency slot, as a
        // decompression bomb once did: the e2e suite proves that nothing stays held.
        #[cfg(feature = "test-trap")]
        #[allow(clippy::panic)]
        if self.trap {
            panic!("tollgate test trap: this VM dies mid-exchange");
        }
        let exchange = &mut active.exchange;
        exchange.on_response_headers(head.status, head.content_type, head.content_encoding);
        if let Some([input, output]) = exchange.kind.dialect().usage_headers() {
            let count = |name| {
                let value = std::str::from_utf8(headers.get(name)?).ok()?;
                value.trim().parse::<u64>().ok()
            };
            exchange.set_header_usage(count(input), count(output));
        }
        let mut edits: Vec<(&'g str, Option<Vec<u8>>)> = Vec::new();
        if let Some(routing) = &gateway.config.routing {
            let model = exchange.served_model().as_bytes().to_vec();
            edits.push((routing.model_header.as_str(), Some(model)));
        }
        if exchange.rewrites_response_body() {
            edits.push(("content-length", None));
        }
        if !matches!(active.cache, super::CacheStatus::Off) {
            let status = active.cache.as_str().as_bytes().to_vec();
            edits.push(("x-tollgate-cache", Some(status)));
        }
        // As of admission, like the remaining they go with (no clock read here).
        if let Some(rate) = active.admitted.rate {
            let reset_in = rate.reset_ms.saturating_sub(active.started_ms);
            let headers = exchange.kind.family().rate_limit_headers(
                rate.limit,
                rate.remaining,
                rate.reset_ms,
                reset_in,
            );
            if let Some(headers) = headers {
                edits.extend(headers.map(|(n, v)| (n, Some(v.into_bytes()))));
            }
        }
        headers.apply(&edits);
        let mut effects = Effects {
            header_map: (!edits.is_empty()).then_some(headers),
            headers: edits,
            ..Effects::default()
        };
        if end_of_stream {
            active.exchange.on_response_complete();
            effects.record = self.finalize(gateway, host, false);
        }
        effects
    }

    /// Whether the response body must be read (for usage, the cache copy or a rewrite).
    pub fn wants_response_body(&self) -> bool {
        matches!(&self.state, State::Active(a) if a.exchange.wants_response_body())
    }

    /// A response body chunk (`chunk` is empty when the body is not wanted): the replacement
    /// chunk when the client must see other bytes, and the record at the end.
    pub fn on_response_body<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        body_size: usize,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Effects<'g> {
        let State::Active(active) = &mut self.state else {
            return Effects::proceed();
        };
        let mut effects = Effects::proceed();
        // Time to first token: streams only (for a JSON answer the first byte is the last).
        if !active.first_byte_seen && body_size > 0 && active.exchange.facts.stream {
            active.first_byte_seen = true;
            let ttft = host.now_ms().saturating_sub(active.started_ms);
            let stat = Stat::Histogram(Histogram::TimeToFirstTokenMs, active.label);
            host.stat(StatUpdate::Sample(stat, ttft));
        }
        if active.exchange.wants_response_body() {
            // An empty last chunk still has to flush what the usage-chunk stripper holds.
            effects.body = active.exchange.on_response_chunk(chunk, end_of_stream);
        }
        if end_of_stream {
            active.exchange.on_response_complete();
            effects.record = self.finalize(gateway, host, false);
        }
        effects
    }
}
