//! A cache hit: the answer comes from the cache, with no upstream and (unless
//! `cache.charge_hits`) no charge.

use super::{Effects, Gateway, Host, Request, State};
use crate::admission::{self, Denied, Plan};
use crate::api::request::RequestFacts;
use crate::api::{ApiKind, Usage};
use crate::cache::{CacheKey, Hit};
use crate::cost;
use crate::exchange::{Exchange, record_fields};
use crate::metrics::{Counter, LabelId, Stat, StatUpdate};
use crate::reply::LocalReply;
use crate::routing::Resolved;

impl Request {
    /// Answers from the cache. Hits are free unless `cache.charge_hits`; either way they count
    /// as saved tokens and saved cost at the served model's price. A charged hit whose global
    /// lease is short gives its tenant back with the limit and the need (see
    /// [`Request::wait_for_lease`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_hit<'g, H: Host + ?Sized>(
        &mut self,
        gateway: &'g Gateway,
        host: &H,
        kind: ApiKind,
        who: Option<(String, LabelId)>,
        facts: RequestFacts,
        resolved: Option<Resolved>,
        served: String,
        hit: Hit,
        key: CacheKey,
        plan: Plan,
        now: u64,
    ) -> Result<Effects<'g>, (String, usize, u64)> {
        let config = &gateway.config;
        let Some((tenant, label)) = who else {
            return Ok(Effects::proceed());
        };
        // The usage the cached answer stands for, read like any response.
        let mut probe = Exchange::new(kind, tenant, facts, config.limits);
        probe.on_response_headers(hit.status, Some(hit.content_type.as_bytes()), None);
        probe.on_response_body(&hit.body);
        probe.on_response_complete();
        let (usage, _) = probe.finish(false);
        let price = config.price(&served);
        let saved_micro = price.map_or(0, |p| cost::billed_micro_usd(p.cost(&usage)));
        let (mut charged, mut billed) = (Usage::default(), 0);
        if config.cache.as_ref().is_some_and(|c| c.charge_hits) {
            let user = gateway.user_of(probe.facts.user.as_deref());
            let (policy, keys) = gateway.budget(&probe.tenant, user.as_ref());
            match admission::admit(host, policy, &keys, &served, price, plan, now) {
                Ok(admitted) => {
                    admission::settle(host, policy, &keys, &admitted, &usage, price, now);
                    (charged, billed) = (usage, saved_micro);
                }
                Err(Denied::Short { limit, need }) => return Err((probe.tenant, limit, need)),
                Err(Denied::Refused(refusal)) => {
                    let model = Some(probe.facts.model);
                    return Ok(self.refuse(kind, Some((probe.tenant, label)), model, &refusal));
                }
                Err(Denied::Spent { refusal, by }) => {
                    let model = Some(probe.facts.model);
                    let who = Some((probe.tenant, label));
                    return Ok(self.refuse_by(kind, who, model, &refusal, Some(by)));
                }
            }
        }
        let model = config.labels.model_id(&served);
        for (counter, value) in [
            (Counter::Requests, 1),
            (Counter::CacheHits, 1),
            (
                Counter::CacheSavedTokens,
                usage.input.saturating_add(usage.output),
            ),
            (Counter::CacheSavedMicroUsd, saved_micro),
            (Counter::InputTokens, charged.input),
            (Counter::OutputTokens, charged.output),
            (Counter::CostMicroUsd, billed),
        ] {
            if value > 0 {
                host.stat(StatUpdate::Add(Stat::Counter(counter, label, model), value));
            }
        }
        log::debug!("tollgate cache hit {}", key.to_hex());
        let route = resolved.map(|r| r.route).unwrap_or_default();
        let mut record = record_fields(&probe, &served, &route, &charged, "cache");
        record.extend([
            (
                "tollgate.llm_cost_usd",
                crate::ledger::Fact::Usd(cost::format_micro_usd(billed)),
            ),
            ("tollgate.cache", "hit".into()),
            ("tollgate.decision", "admitted".into()),
        ]);
        self.state = State::Answered(record);
        let reply = LocalReply {
            status: hit.status,
            headers: vec![
                ("content-type", hit.content_type),
                ("x-tollgate-cache", "hit".to_string()),
                ("age", (hit.age_ms / 1000).to_string()),
            ],
            body: hit.body,
            reason: "cache_hit",
        };
        let mut effects = Effects::reply(reply);
        if let Some(routing) = &config.routing {
            effects
                .headers
                .push((routing.model_header.as_str(), Some(served.into_bytes())));
        }
        Ok(effects)
    }
}
