//! Model routing: the requested model (or alias) resolves to a served model, the Envoy route that
//! serves it (the routing header's value) and the model name the upstream expects. Aliases pick
//! among weighted targets (canary) and may downgrade to a cheaper target when a tenant nears its
//! budget.
//!
//! Weighted draws: a request with a conversation id draws from the SHA-256 of that id, so a
//! conversation stays on one target; other requests draw from a per-worker Weyl sequence
//! (`n × 2^64/φ`), which spreads any run of requests over the targets in proportion to their
//! weights far more evenly than independent random draws would.

use crate::api::Family;
use hashbrown::HashMap;

use crate::tenant::KeyDigest;

/// A model Tollgate knows: the route (routing-header value) and the upstream's model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    pub route: String,
    pub upstream_model: String,
    /// The API family the model is served through (`routing.models.M.api`), when declared:
    /// a request of another family is refused, an alias may not mix families.
    pub api: Option<Family>,
}

/// One weighted target of an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub model: String,
    pub weight: u64,
}

/// An alias: weighted targets and an optional cheaper target for tenants near their budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub targets: Vec<Target>,
    pub downgrade_to: Option<String>,
}

/// What to do with a model that is neither a model nor an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownModel {
    /// 400 `model_not_found` in the API's shape.
    Reject,
    /// Send it to this route under its own name.
    Route(String),
}

/// The routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// Request header carrying the route to Envoy's route table.
    pub header: String,
    /// Request and response header naming the served model.
    pub model_header: String,
    /// Request header whose value keeps a conversation on one weighted target.
    pub conversation_header: Option<String>,
    pub models: HashMap<String, ModelRoute>,
    pub aliases: HashMap<String, Alias>,
    pub unknown: UnknownModel,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The served model (a key of `models`, or the requested name on the default route).
    pub model: String,
    pub route: String,
    pub upstream_model: String,
    /// The served model's declared API family.
    pub api: Option<Family>,
    /// Resolved to the alias's downgrade target.
    pub downgraded: bool,
}

/// How a weighted target is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw<'a> {
    /// Sticky: the conversation id.
    Conversation(&'a [u8]),
    /// The n-th draw of this worker.
    Sequence(u64),
}

impl Draw<'_> {
    /// A uniform 64-bit value.
    fn value(self) -> u64 {
        match self {
            Draw::Conversation(id) => KeyDigest::of_key(id).prefix_u64(),
            // 2^64 / golden ratio: consecutive multiples are maximally spread (Weyl sequence).
            Draw::Sequence(n) => n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }
}

impl Alias {
    /// Picks a target: the draw's position in [0, 1) times the total weight.
    pub fn pick(&self, draw: Draw<'_>) -> Option<&str> {
        let total: u64 = self.targets.iter().map(|t| t.weight).sum();
        let point =
            u64::try_from((u128::from(draw.value()) * u128::from(total)) >> 64).unwrap_or(0);
        let mut acc = 0u64;
        self.targets
            .iter()
            .find(|t| {
                acc = acc.saturating_add(t.weight);
                point < acc
            })
            .or(self.targets.last())
            .map(|t| t.model.as_str())
    }
}

impl Routing {
    /// Resolves `requested`. `aliases` are the tenant's overrides (looked up first);
    /// `downgrade` says the tenant is past its downgrade threshold. `None`: unknown model and
    /// the policy is to reject.
    pub fn resolve(
        &self,
        overrides: Option<&HashMap<String, Alias>>,
        requested: &str,
        draw: Draw<'_>,
        downgrade: bool,
    ) -> Option<Resolved> {
        let alias = overrides
            .and_then(|o| o.get(requested))
            .or_else(|| self.aliases.get(requested));
        let (model, downgraded) = match alias {
            Some(alias) => match (&alias.downgrade_to, downgrade) {
                (Some(cheaper), true) => (cheaper.as_str(), true),
                _ => (alias.pick(draw)?, false),
            },
            None => (requested, false),
        };
        match self.models.get(model) {
            Some(route) => Some(Resolved {
                model: model.to_string(),
                route: route.route.clone(),
                upstream_model: route.upstream_model.clone(),
                api: route.api,
                downgraded,
            }),
            None => match &self.unknown {
                UnknownModel::Route(route) => Some(Resolved {
                    model: model.to_string(),
                    route: route.clone(),
                    upstream_model: model.to_string(),
                    api: None,
                    downgraded,
                }),
                UnknownModel::Reject => None,
            },
        }
    }

    /// Whether `name` has a downgrade target for this tenant (so the budget is worth reading).
    pub fn may_downgrade(&self, overrides: Option<&HashMap<String, Alias>>, name: &str) -> bool {
        overrides
            .and_then(|o| o.get(name))
            .or_else(|| self.aliases.get(name))
            .is_some_and(|a| a.downgrade_to.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Routing {
        let mut models = HashMap::new();
        for (name, route, up) in [
            ("gpt-4o", "openai", "gpt-4o-2024-11-20"),
            ("gpt-4o-mini", "openai", "gpt-4o-mini"),
            ("llama", "selfhosted", "meta-llama/Llama-3.3-70B-Instruct"),
        ] {
            models.insert(
                name.to_string(),
                ModelRoute {
                    route: route.into(),
                    upstream_model: up.into(),
                    api: None,
                },
            );
        }
        let mut aliases = HashMap::new();
        aliases.insert(
            "smart".to_string(),
            Alias {
                targets: vec![
                    Target {
                        model: "gpt-4o".into(),
                        weight: 90,
                    },
                    Target {
                        model: "llama".into(),
                        weight: 10,
                    },
                ],
                downgrade_to: Some("gpt-4o-mini".into()),
            },
        );
        Routing {
            header: "x-tollgate-route".into(),
            model_header: "x-tollgate-model".into(),
            conversation_header: Some("x-conversation-id".into()),
            models,
            aliases,
            unknown: UnknownModel::Reject,
        }
    }

    #[test]
    fn models_resolve_to_route_and_upstream_name() {
        let r = table()
            .resolve(None, "llama", Draw::Sequence(0), false)
            .unwrap();
        assert_eq!(
            (r.route.as_str(), r.upstream_model.as_str()),
            ("selfhosted", "meta-llama/Llama-3.3-70B-Instruct")
        );
        assert!(
            table()
                .resolve(None, "nope", Draw::Sequence(0), false)
                .is_none()
        );
        let mut t = table();
        t.unknown = UnknownModel::Route("openai".into());
        let r = t.resolve(None, "nope", Draw::Sequence(0), false).unwrap();
        assert_eq!(
            (r.route.as_str(), r.upstream_model.as_str()),
            ("openai", "nope")
        );
    }

    #[test]
    fn weighted_alias_splits_evenly_over_any_run() {
        let t = table();
        for start in [0u64, 1, 12345, u64::MAX - 2000] {
            let canary = (start..start.wrapping_add(1000))
                .filter(|n| {
                    t.resolve(None, "smart", Draw::Sequence(*n), false)
                        .unwrap()
                        .model
                        == "llama"
                })
                .count();
            assert!(
                (95..=105).contains(&canary),
                "{canary} of 1000 from {start}"
            );
        }
    }

    #[test]
    fn conversations_are_sticky() {
        let t = table();
        for id in ["conv-1", "conv-2", "conv-3"] {
            let first = t
                .resolve(None, "smart", Draw::Conversation(id.as_bytes()), false)
                .unwrap();
            for _ in 0..10 {
                assert_eq!(
                    t.resolve(None, "smart", Draw::Conversation(id.as_bytes()), false)
                        .unwrap(),
                    first
                );
            }
        }
    }

    #[test]
    fn downgrade_and_tenant_overrides() {
        let t = table();
        let r = t.resolve(None, "smart", Draw::Sequence(0), true).unwrap();
        assert_eq!((r.model.as_str(), r.downgraded), ("gpt-4o-mini", true));
        let mut mine = HashMap::new();
        mine.insert(
            "smart".to_string(),
            Alias {
                targets: vec![Target {
                    model: "llama".into(),
                    weight: 1,
                }],
                downgrade_to: None,
            },
        );
        assert_eq!(
            t.resolve(Some(&mine), "smart", Draw::Sequence(0), true)
                .unwrap()
                .model,
            "llama"
        );
        assert!(t.may_downgrade(None, "smart") && !t.may_downgrade(Some(&mine), "smart"));
    }

    proptest::proptest! {
        #[test]
        fn pick_always_returns_a_target(draw in proptest::prelude::any::<u64>(), weights in proptest::collection::vec(1u64..1000, 1..5)) {
            let alias = Alias {
                targets: weights.iter().enumerate().map(|(i, w)| Target { model: i.to_string(), weight: *w }).collect(),
                downgrade_to: None,
            };
            proptest::prop_assert!(alias.pick(Draw::Sequence(draw)).is_some());
        }
    }
}
