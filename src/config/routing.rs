//! Model routing's configuration: the `routing` section (headers, models, aliases, the unknown
//! model route) validated into [`Routing`], and the alias tables tenants may override.

use std::collections::BTreeMap;

use hashbrown::HashMap;

use crate::api::Family;
use crate::routing::{Alias, ModelRoute, Routing, Target, UnknownModel};

use super::raw::{RawAlias, RawRouting};
use super::{ConfigError, check_header_name};

pub(super) fn build_routing(raw: &RawRouting) -> Result<Routing, ConfigError> {
    let header_field = |name: &str, value: &Option<String>, default: &str| match value {
        None => Ok(default.to_string()),
        Some(h) => check_header_name(h).map_err(|r| ConfigError::new(format!("routing.{name}"), r)),
    };
    if raw.models.is_empty() {
        return Err(ConfigError::new(
            "routing.models",
            "name at least one model",
        ));
    }
    let mut models = HashMap::with_capacity(raw.models.len());
    for (name, m) in &raw.models {
        if m.route.is_empty() {
            return Err(ConfigError::new(
                format!("routing.models.{name}.route"),
                "must not be empty",
            ));
        }
        let api = match m.api.as_deref() {
            None => None,
            Some("openai") => Some(Family::OpenAi),
            Some("anthropic") => Some(Family::Anthropic),
            Some("google") => Some(Family::Google),
            Some("bedrock") => Some(Family::Aws),
            Some(other) => {
                return Err(ConfigError::new(
                    format!("routing.models.{name}.api"),
                    format!("\"{other}\" is not one of openai, anthropic, google, bedrock"),
                ));
            }
        };
        models.insert(
            name.clone(),
            ModelRoute {
                route: m.route.clone(),
                upstream_model: m.upstream_model.clone().unwrap_or_else(|| name.clone()),
                api,
            },
        );
    }
    let aliases = aliases("routing.aliases", &raw.aliases, &models)?;
    Ok(Routing {
        header: header_field("header", &raw.header, "x-tollgate-route")?,
        model_header: header_field("model_header", &raw.model_header, "x-tollgate-model")?,
        conversation_header: raw
            .conversation_header
            .as_ref()
            .map(|h| {
                check_header_name(h).map_err(|r| ConfigError::new("routing.conversation_header", r))
            })
            .transpose()?,
        models,
        aliases,
        unknown: match &raw.unknown_model_route {
            None => UnknownModel::Reject,
            Some(route) if route.is_empty() => {
                return Err(ConfigError::new(
                    "routing.unknown_model_route",
                    "must not be empty",
                ));
            }
            Some(route) => UnknownModel::Route(route.clone()),
        },
    })
}

pub(super) fn aliases(
    at: &str,
    raw: &BTreeMap<String, RawAlias>,
    models: &HashMap<String, ModelRoute>,
) -> Result<HashMap<String, Alias>, ConfigError> {
    let mut out = HashMap::with_capacity(raw.len());
    for (name, a) in raw {
        let at = format!("{at}.{name}");
        if models.contains_key(name) {
            return Err(ConfigError::new(
                at,
                "an alias cannot have the name of a model",
            ));
        }
        if a.targets.is_empty() {
            return Err(ConfigError::new(
                format!("{at}.targets"),
                "name at least one target",
            ));
        }
        let known = |field: String, model: &str| {
            if models.contains_key(model) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("\"{model}\" is not a model of routing.models"),
                ))
            }
        };
        let mut targets = Vec::with_capacity(a.targets.len());
        for (i, t) in a.targets.iter().enumerate() {
            known(format!("{at}.targets[{i}].model"), &t.model)?;
            let weight = t.weight.unwrap_or(1);
            if weight == 0 || weight > 1_000_000 {
                return Err(ConfigError::new(
                    format!("{at}.targets[{i}].weight"),
                    "must be between 1 and 1000000",
                ));
            }
            targets.push(Target {
                model: t.model.clone(),
                weight,
            });
        }
        if let Some(cheaper) = &a.downgrade_to {
            known(format!("{at}.downgrade_to"), cheaper)?;
        }
        // Routing stays within one API: an alias whose models are served through different
        // families (declared with `api`) could send a Gemini body to an OpenAI upstream.
        let family = |model: &str| models.get(model).and_then(|m| m.api);
        let named = targets
            .iter()
            .map(|t| t.model.as_str())
            .chain(a.downgrade_to.as_deref());
        let mut first: Option<(&str, Family)> = None;
        for (i, model) in named.enumerate() {
            let Some(api) = family(model) else { continue };
            match first {
                None => first = Some((model, api)),
                Some((other, want)) if want != api => {
                    let field = match targets.get(i) {
                        Some(_) => format!("{at}.targets[{i}].model"),
                        None => format!("{at}.downgrade_to"),
                    };
                    return Err(ConfigError::new(
                        field,
                        format!(
                            "\"{model}\" is served through another API than \"{other}\"; an alias routes within one API"
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        out.insert(
            name.clone(),
            Alias {
                targets,
                downgrade_to: a.downgrade_to.clone(),
            },
        );
    }
    Ok(out)
}
