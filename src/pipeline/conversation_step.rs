//! A request's step in its conversation: admitted after its budgets (a refusal releases them),
//! settled with its exchange, counted in the conversation metrics.

use super::{Gateway, Host};
use crate::admission::{self, Admitted, TenantKeys, TenantPolicy};
use crate::api::Usage;
use crate::conversation::{self, Ask, Spent, Step};
use crate::cost::{self, Price};
use crate::metrics::{LabelId, Stat, StatUpdate};
use crate::reply::Refusal;

/// An admitted request's conversation: its slot key and step.
pub(super) struct InConversation {
    key: String,
    step: Step,
}

/// Why a conversation did not admit a request: the refusal, and the limit (`tenant/limit`).
pub(super) type NotAdmitted = (Refusal, Option<String>);

/// Admits the request `id` names in its conversation (`None` when conversations are not
/// tracked for this tenant, or the request names none).
#[allow(clippy::too_many_arguments)]
pub(super) fn admit<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    (policy, keys): (&TenantPolicy, &TenantKeys),
    label: LabelId,
    id: Option<&[u8]>,
    admitted: &Admitted,
    price: Option<&Price>,
    now: u64,
) -> Result<Option<InConversation>, NotAdmitted> {
    let (Some(conversations), Some(limits), Some(id)) =
        (&gateway.config.conversations, &policy.conversation, id)
    else {
        return Ok(None);
    };
    if limits.pico_usd.is_some() && price.is_none() {
        return Err((
            Refusal::BadRequest {
                param: Some("model".into()),
                message:
                    "This model has no price, so the conversation's USD budget cannot be enforced."
                        .into(),
            },
            None,
        ));
    }
    let (input, output) = (admitted.plan.prompt_tokens, admitted.plan.output_tokens);
    let estimate = Usage {
        input,
        output,
        ..Usage::default()
    };
    let pico_usd = admission::pico_usd(&estimate, price, policy.strict);
    let cid = conversations.id(id);
    let key = conversation::slot_key(&keys.scope, cid.slot);
    let ask = Ask {
        id: cid,
        tokens: input.saturating_add(output),
        pico_usd,
        now_ms: now,
        epoch: policy.epoch(now),
    };
    match conversation::admit(host, &key, limits, conversations.idle_ms, ask) {
        Ok(step) => {
            if step.started {
                host.stat(StatUpdate::Add(Stat::ConversationsStarted(label), 1));
            }
            let active = conversation::active_key(&keys.scope);
            let idle = conversations.idle_ms;
            if let Some(count) = conversation::touch_active(host, &active, idle, step.last_ms, now)
            {
                host.stat(StatUpdate::Set(Stat::ConversationsActive(label), count));
            }
            Ok(Some(InConversation { key, step }))
        }
        Err(Some(spent)) => Err((
            Refusal::ConversationSpent {
                message: spent_message(spent),
            },
            Some(format!("{}/conversation.{}", keys.scope, spent.as_str())),
        )),
        Err(None) => Err((
            Refusal::RateLimited {
                message: "The conversation store is busy; please retry.".into(),
                retry_after_secs: 1,
                kind: "requests",
            },
            None,
        )),
    }
}

fn spent_message(spent: Spent) -> String {
    let what = match spent {
        Spent::MaxRequests => "reached its maximum number of requests",
        Spent::Tokens => "spent its token budget",
        Spent::Usd => "spent its USD budget",
        Spent::MaxAge => "is older than its maximum age",
    };
    format!(
        "This conversation {what} ('conversation_limits.{}'); start a new conversation.",
        spent.as_str()
    )
}

/// Settles the request's step with what it was charged; its record fields.
pub(super) fn settle<H: Host + ?Sized>(
    gateway: &Gateway,
    host: &H,
    in_conversation: &InConversation,
    label: LabelId,
    (charged, price): (&Usage, Option<&Price>),
    (now, epoch): (u64, u64),
) -> crate::ledger::Record {
    let Some(conversations) = &gateway.config.conversations else {
        return Vec::new();
    };
    let tokens = charged.input.saturating_add(charged.output);
    let pico_usd = admission::pico_usd(charged, price, false);
    let step = &in_conversation.step;
    let mut fields: crate::ledger::Record = vec![(
        "tollgate.conversation_step",
        crate::ledger::Fact::Count(step.step),
    )];
    let settled = conversation::settle(
        host,
        &in_conversation.key,
        step,
        (tokens, pico_usd),
        &conversations.cost_thresholds,
        (now, epoch),
    );
    if let Some(settled) = settled {
        // As `llm_cost_usd`: micro-USD, rounded half-up.
        let micro = cost::billed_micro_usd(u128::from(settled.pico_usd));
        fields.push((
            "tollgate.conversation_cost_usd",
            crate::ledger::Fact::Usd(cost::format_micro_usd(micro)),
        ));
        for i in settled.crossed {
            let index = u8::try_from(i).unwrap_or(u8::MAX);
            host.stat(StatUpdate::Add(Stat::ConversationsOver(label, index), 1));
        }
    }
    fields
}
