//! The rules document (routing, normalisation windows, sampling thresholds, metric catalogue)
//! and its compiled form. It is one unit of replicated configuration (SPEC §6).

use crate::catalogue::{Catalogue, ResolvedMetric};
use crate::entity::RoutingRules;
use crate::normalize::NormalizeConfig;
use crate::sampling::SamplingRules;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// The rules document. Every section has built-in defaults, so `{}` is a valid document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Which resources are gateway resources and how they map to entities.
    #[serde(default)]
    pub routing: RoutingRules,
    /// Lateness, future and cumulative windows, cardinality limit.
    #[serde(default)]
    pub normalize: NormalizeConfig,
    /// Access-log keep rules.
    #[serde(default)]
    pub sampling: SamplingRules,
    /// Output metrics.
    #[serde(default)]
    pub catalogue: Catalogue,
}

/// Why a rules document was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid rules: {0}")]
pub struct RulesError(pub String);

impl RulesConfig {
    /// Parses YAML or JSON and validates it as a new document: [`RulesConfig::validate`], which
    /// committed documents pass, and the checks only new ones get ([`Catalogue::check_new`]).
    pub fn parse(text: &str) -> Result<RulesConfig, RulesError> {
        let config: RulesConfig = parse_yaml(text).map_err(RulesError)?;
        config.validate()?;
        config.catalogue.check_new().map_err(RulesError)?;
        Ok(config)
    }

    /// Checks every section.
    pub fn validate(&self) -> Result<(), RulesError> {
        self.routing.validate().map_err(RulesError)?;
        self.normalize.validate().map_err(RulesError)?;
        self.sampling.validate().map_err(RulesError)?;
        self.catalogue.validate().map_err(RulesError)?;
        Ok(())
    }
}

/// A validated rules document with its lookup tables, tagged with the version under which it
/// was committed.
#[derive(Clone, Debug)]
pub struct CompiledRules {
    /// The document.
    pub config: RulesConfig,
    /// Committed version (0 for the built-in defaults).
    pub version: u64,
    metrics: HashMap<String, ResolvedMetric>,
    sources: HashSet<String>,
    histogram_sources: HashMap<String, String>,
}

impl CompiledRules {
    /// Compiles a document after validating it.
    pub fn new(config: RulesConfig, version: u64) -> Result<CompiledRules, RulesError> {
        config.validate()?;
        let metrics = config.catalogue.index();
        let sources = config.catalogue.source_metrics().into_iter().collect();
        let histogram_sources = config.catalogue.histogram_sources().into_iter().collect();
        Ok(CompiledRules { config, version, metrics, sources, histogram_sources })
    }

    /// The metric with this full name.
    pub fn metric(&self, name: &str) -> Option<&ResolvedMetric> {
        self.metrics.get(name)
    }

    /// True when some rule reads this source metric (only those are stored).
    pub fn is_source(&self, metric: &str) -> bool {
        self.sources.contains(metric)
    }

    /// The rule that needs this source metric to be a histogram, if one does
    /// ([`Catalogue::histogram_sources`]).
    ///
    /// [`Catalogue::histogram_sources`]: crate::catalogue::Catalogue::histogram_sources
    pub fn histogram_reader(&self, metric: &str) -> Option<&str> {
        self.histogram_sources.get(metric).map(String::as_str)
    }
}

impl Default for CompiledRules {
    fn default() -> Self {
        CompiledRules::new(RulesConfig::default(), 0).expect("the built-in rules are valid")
    }
}

/// Parses YAML (or JSON, a subset) into `T`, with serde-saphyr's input budgets; the error text
/// carries the parser's location and, for type errors, the offending field, in the words meant
/// for a document's author (the library's own advice to programmers, such as which function or
/// option to call instead, left out).
///
/// The budget of nodes and events is sized for the largest document the API takes (4 MiB,
/// which holds at most about two million nodes): the library's default of 250 000 nodes refused
/// a 3.5 MB pricing document of 40 000 models. Aliases and anchors keep their default limits,
/// which guard against documents that expand.
pub(crate) fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(MAX_DOCUMENT_NODES);
    budget.max_events = budget.max_events.max(2 * MAX_DOCUMENT_NODES);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let document: Option<T> =
        deserialize_yaml(text, options, |error| error.render_with_formatter(&serde_saphyr::UserMessageFormatter))?;
    // A document of only comments (a file whose entries are all commented out), or `null`, read
    // as an empty one and replaced the whole configuration with the built-in rules or no prices.
    document.ok_or_else(|| {
        "the document is empty: it has no content, only comments or null (`{}` is the empty document)".into()
    })
}

/// Deserializes YAML with serde-saphyr and `options`; an error is `render`ed and prefixed with
/// the path of the field it is about (`sampling.slow_threshold_ms`, `providers[0].models[2].name`),
/// when it is about one: serde-saphyr names the line and column, and for a type error only the
/// type (`invalid u64`), which in a one-line JSON document says nothing of the field.
pub fn deserialize_yaml<T: DeserializeOwned>(
    text: &str,
    options: serde_saphyr::Options,
    render: impl FnOnce(&serde_saphyr::Error) -> String,
) -> Result<T, String> {
    let path = std::cell::RefCell::new(None);
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |deserializer| {
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            *path.borrow_mut() = Some(field_path(error.path())).filter(|path| !path.is_empty());
            error.into_inner()
        })
    })
    .map_err(|error| match path.into_inner() {
        Some(path) => format!("{path}: {}", render(&error)),
        None => render(&error),
    })
}

/// `limits.max_request_bytes`, `providers[0].models[2]`: the known part of a field's path (the
/// library marks a key it could not read, such as a duplicate one, as unknown: the path stops
/// before it).
fn field_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => break,
        }
    }
    out
}

/// Most YAML nodes (scalars, sequences, mappings) in a configuration document: one per byte of
/// the largest document the API takes.
const MAX_DOCUMENT_NODES: usize = 4 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_empty_mapping_gives_the_built_in_rules() {
        let config = RulesConfig::parse("{}").unwrap();
        assert_eq!(config, RulesConfig::default());
        assert_eq!(config.sampling.token_threshold, Some(10_000));
        assert_eq!(config.normalize.max_lateness_seconds, 600);
    }

    #[test]
    fn test_partial_sections_keep_other_defaults() {
        let config = RulesConfig::parse("sampling:\n  token_threshold: 5000\n  cost_threshold: 250000\n").unwrap();
        assert_eq!(config.sampling.token_threshold, Some(5000));
        assert_eq!(config.sampling.cost_threshold, Some(250_000.0));
        assert_eq!(config.sampling.slow_threshold_ms, Some(30_000));
        assert_eq!(config.catalogue, Catalogue::default());
    }

    #[test]
    fn test_unknown_fields_and_bad_values_are_named() {
        let error = RulesConfig::parse("sampling:\n  token_treshold: 5000\n").unwrap_err().to_string();
        assert!(error.contains("token_treshold"), "{error}");
        // A type error names the field's path, also in a one-line JSON document.
        let error = RulesConfig::parse("normalize:\n  max_lateness_seconds: -1\n").unwrap_err().to_string();
        assert!(error.contains("normalize.max_lateness_seconds: ") && error.contains("line 2"), "{error}");
        let error = RulesConfig::parse(r#"{"sampling": {"slow_threshold_ms": "slow"}}"#).unwrap_err().to_string();
        assert!(error.contains("sampling.slow_threshold_ms: "), "{error}");
        let error = RulesConfig::parse("routing:\n  instance_attributes: [a, 5, [b]]\n").unwrap_err().to_string();
        assert!(error.contains("routing.instance_attributes[2]: "), "{error}");
        let error = RulesConfig::parse("normalize:\n  max_lateness_seconds: 999999\n").unwrap_err().to_string();
        assert!(error.contains("normalize.max_lateness_seconds"), "{error}");
        let error = RulesConfig::parse("sampling:\n  cost_threshold: -5\n").unwrap_err().to_string();
        assert!(error.contains("sampling.cost_threshold"), "{error}");
        assert!(RulesConfig::parse("").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn test_a_document_of_only_comments_is_empty() {
        for text in [
            "# sampling:\n#   token_threshold: 5000\n",
            "---\n# nothing\n...\n",
            "--- # only a marker\n  \n",
            "\u{feff}# after a byte order mark\n",
            "%YAML 1.2\n---\n# nothing\n",
            "null",
            "~\n",
            "",
            "  \n\t\n",
        ] {
            let error = RulesConfig::parse(text).unwrap_err().to_string();
            assert!(error.contains("the document is empty: it has no content"), "{text:?}: {error}");
        }
        for text in [
            "# the defaults\n{}\n",
            "--- {}",
            "---\nsampling: # below\n  token_threshold: 5000\n",
            "# rules version 3\rsampling:\r  token_threshold: 5000\r",
            "%YAML 1.2\n---\nsampling: {token_threshold: 5000}\n",
        ] {
            assert!(RulesConfig::parse(text).is_ok(), "{text:?}: {:?}", RulesConfig::parse(text));
        }
        // Not a rules document at all.
        assert!(!RulesConfig::parse("---x").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn test_rules_round_trip_as_yaml() {
        let config = RulesConfig::default();
        let yaml = serde_saphyr::to_string(&config).unwrap();
        assert_eq!(RulesConfig::parse(&yaml).unwrap(), config);
    }
}
