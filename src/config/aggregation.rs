//! `[aggregations.NAME]`: which sources a call fans out to, and how their
//! failures count.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::{ConfigError, Validator, source::SourceSpec};
use crate::transform::Filter;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AggregationModel {
    pub(super) sources: Vec<String>,
    #[serde(default)]
    pub(super) optional: Vec<String>,
    #[serde(default)]
    pub(super) mode: Mode,
    #[serde(default = "default_aggregation_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
    #[serde(default = "default_min_success")]
    pub(super) min_success: usize,
    /// Where each source lands in `Aggregate`'s document (default: its name).
    #[serde(default)]
    pub(super) keys: BTreeMap<String, String>,
    /// Reshapes `Aggregate`'s merged document.
    pub(super) transform: Option<String>,
}

/// How failures of sources affect a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The first failure of a required source cancels the rest and fails the call.
    #[default]
    FailFast,
    /// Every source runs to completion; failures are reported per source.
    BestEffort,
}

#[derive(Debug)]
pub struct AggregationSpec {
    pub name: Arc<str>,
    /// Sources in configured order, each with whether it is optional.
    pub members: Vec<(Arc<SourceSpec>, bool)>,
    pub mode: Mode,
    /// Cap on the whole call; a shorter caller deadline wins.
    pub timeout: Duration,
    /// Sources of a call that must succeed (capped at the call's number of
    /// sources), or the call fails.
    pub min_success: usize,
    /// By member: the members it reads (indices into `members`).
    pub deps: Vec<Vec<usize>>,
    /// By member: where it lands in `Aggregate`'s document; `""` merges the
    /// fields of its (object) result into the top level.
    pub landing: Vec<Arc<str>>,
    /// Reshapes `Aggregate`'s merged document; must yield an object.
    pub transform: Option<Filter>,
}

fn default_aggregation_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_min_success() -> usize {
    1
}

impl Validator<'_> {
    pub(super) fn aggregation(
        &self,
        name: String,
        model: AggregationModel,
        sources: &[Arc<SourceSpec>],
    ) -> Result<AggregationSpec, ConfigError> {
        self.name("aggregations", &name)?;
        let key = |field: &str| format!("aggregations.{name}.{field}");
        if model.sources.is_empty() {
            return Err(self.err(key("sources"), "list at least one source"));
        }
        let known = || {
            sources
                .iter()
                .map(|s| &*s.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut seen = HashSet::new();
        let members = model
            .sources
            .iter()
            .map(|s| {
                if !seen.insert(s.as_str()) {
                    return Err(self.err(key("sources"), format!("source '{s}' is listed twice")));
                }
                let spec = sources
                    .iter()
                    .find(|spec| &*spec.name == s)
                    .ok_or_else(|| {
                        self.err(
                            key("sources"),
                            format!("unknown source '{s}' (known: {})", known()),
                        )
                    })?;
                Ok((spec.clone(), model.optional.contains(s)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(stray) = model.optional.iter().find(|o| !seen.contains(o.as_str())) {
            return Err(self.err(
                key("optional"),
                format!("'{stray}' is not one of this aggregation's sources"),
            ));
        }
        if model.timeout.is_zero() {
            return Err(self.err(key("timeout"), "must be greater than zero"));
        }
        if model.min_success > members.len() {
            return Err(self.err(
                key("min_success"),
                format!(
                    "{} is more than the aggregation's {} sources",
                    model.min_success,
                    members.len()
                ),
            ));
        }
        let deps = self.graph(&name, &members)?;
        let landing = self.landing(&name, &members, &model.keys)?;
        let transform = self.filter(&key("transform"), model.transform.as_deref())?;
        Ok(AggregationSpec {
            name: name.into(),
            members,
            mode: model.mode,
            timeout: model.timeout,
            min_success: model.min_success,
            deps,
            landing,
            transform,
        })
    }
}
