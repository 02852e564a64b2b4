//! The metric catalogue (SPEC §3) as data.
//!
//! A rule says which source metric it reads, which series it keeps (`filter`), how it groups
//! them (`group_by`, named labels derived from attributes) and which value it computes. The
//! built-in Envoy AI Gateway rules are [`Catalogue::default`]; a replacement travels through
//! Raft as part of the rules document and applies at runtime.

use crate::aggregate::Aggregate;
use crate::attributes::AttributeSet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Source metric of the log-derived request counter (one increment per LLM/MCP record).
pub const LOG_REQUESTS_METRIC: &str = "tollgate.log.requests";
/// Source metric of the log-derived keep counter (one increment per keep reason).
pub const LOG_SAMPLED_METRIC: &str = "tollgate.log.sampled";

/// Service or instance level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// All series of a service, every instance and none.
    Service,
    /// The series of one instance.
    Instance,
}

impl Scope {
    /// `service` or `instance`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Service => "service",
            Scope::Instance => "instance",
        }
    }
}

/// What a rule computes from the merged state of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// Σ count per minute (calls/min).
    Count,
    /// Σ sum per minute (tokens/min, or a counter's increase per minute).
    Sum,
    /// Σ sum / Σ count (absent when the count is 0).
    Mean,
    /// Bucket percentiles, one series per rank (SPEC §3.1).
    Percentile,
    /// Σ estimated cost per minute (micro-units/min).
    Cost,
    /// Σ input and output tokens of unpriced models per minute.
    Unpriced,
}

impl ValueKind {
    /// Rates are averaged per minute over hour and day steps; the others come from the merge.
    pub fn is_rate(self) -> bool {
        matches!(self, ValueKind::Count | ValueKind::Sum | ValueKind::Cost | ValueKind::Unpriced)
    }
}

/// A condition on a point attribute; exactly one of `equals`, `in`, `present` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The attribute key.
    pub attribute: String,
    /// The attribute has this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The attribute has one of these values.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// `true`: the attribute is present and non-empty; `false`: it is missing or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

impl Condition {
    fn matches(&self, attributes: &AttributeSet) -> bool {
        let value = attributes.get(&self.attribute);
        if let Some(expected) = &self.equals {
            return value == Some(expected.as_str());
        }
        if let Some(values) = &self.one_of {
            return value.is_some_and(|v| values.iter().any(|candidate| candidate == v));
        }
        let is_present = value.is_some_and(|v| !v.is_empty());
        self.present == Some(is_present)
    }
}

/// How a label value is derived from a series' attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSource {
    /// The first of these attributes that is present, non-empty and not skipped gives the value.
    pub attributes: Vec<String>,
    /// Values that count as missing (`unknown` for models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip_values: Vec<String>,
    /// The value when no attribute qualifies.
    #[serde(default = "default_label_value")]
    pub default: String,
}

fn default_label_value() -> String {
    "unknown".to_string()
}

impl LabelSource {
    /// The label value for a series.
    pub fn value<'a>(&'a self, attributes: &'a AttributeSet) -> &'a str {
        self.attributes
            .iter()
            .filter_map(|key| attributes.get(key))
            .find(|value| !value.is_empty() && !self.skip_values.iter().any(|skip| skip == value))
            .unwrap_or(&self.default)
    }
}

/// One output metric, available at the scopes listed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricRule {
    /// Name without prefix (`request_cpm`).
    pub name: String,
    /// Unit shown in the catalogue (`calls/min`, `ms`).
    pub unit: String,
    /// Source metric (`gen_ai.server.request.duration`).
    pub source: String,
    /// Series conditions, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<Condition>,
    /// Output labels, by name from [`Catalogue::labels`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_by: Vec<String>,
    /// The value function.
    pub value: ValueKind,
    /// Factor applied to the value (1000 turns seconds into ms).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Ranks of a percentile rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub percentiles: Vec<u32>,
    /// Where the metric exists.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<Scope>,
    /// What it means.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

fn default_scale() -> f64 {
    1.0
}

fn default_scopes() -> Vec<Scope> {
    vec![Scope::Service, Scope::Instance]
}

/// Rules sharing name prefixes (SkyWalking's `metricPrefix` per rule file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricGroup {
    /// Prefix of service-level names, joined with `_`.
    pub service_prefix: String,
    /// Prefix of instance-level names, joined with `_`.
    pub instance_prefix: String,
    /// The rules.
    pub metrics: Vec<MetricRule>,
}

/// Which series carry token counts and how their cost is looked up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostRule {
    /// The token usage metric.
    #[serde(default = "default_cost_metric")]
    pub metric: String,
    /// The attribute holding the token type.
    #[serde(default = "default_token_type_attribute")]
    pub token_type_attribute: String,
    /// The label whose value is looked up in the price table.
    #[serde(default = "default_model_label")]
    pub model_label: String,
}

fn default_cost_metric() -> String {
    "gen_ai.client.token.usage".into()
}
fn default_token_type_attribute() -> String {
    "gen_ai.token.type".into()
}
fn default_model_label() -> String {
    "model".into()
}

impl Default for CostRule {
    fn default() -> Self {
        CostRule {
            metric: default_cost_metric(),
            token_type_attribute: default_token_type_attribute(),
            model_label: default_model_label(),
        }
    }
}

/// The whole catalogue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Named labels available to `group_by`.
    pub labels: BTreeMap<String, LabelSource>,
    /// Cost computation.
    #[serde(default)]
    pub cost: CostRule,
    /// Rule groups.
    pub groups: Vec<MetricGroup>,
}

/// One catalogue entry as the API lists it (`GET /api/v1/metrics`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    /// Full metric name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// `service` or `instance`.
    pub scope: Scope,
    /// Label names of its series (`p` for percentiles).
    pub labels: Vec<String>,
}

/// A catalogue metric resolved from its full name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolvedMetric {
    /// Full name.
    pub name: String,
    /// Scope.
    pub scope: Scope,
    /// The rule.
    pub rule: MetricRule,
}

impl Catalogue {
    /// Full name of a rule at a scope.
    fn full_name(group: &MetricGroup, rule: &MetricRule, scope: Scope) -> String {
        let prefix = match scope {
            Scope::Service => &group.service_prefix,
            Scope::Instance => &group.instance_prefix,
        };
        format!("{prefix}_{}", rule.name)
    }

    /// Every metric with its full name.
    pub fn entries(&self) -> Vec<CatalogueEntry> {
        let mut out = Vec::new();
        for group in &self.groups {
            for rule in &group.metrics {
                for scope in &rule.scopes {
                    let mut labels = rule.group_by.clone();
                    if rule.value == ValueKind::Percentile {
                        labels.push("p".into());
                    }
                    out.push(CatalogueEntry {
                        name: Catalogue::full_name(group, rule, *scope),
                        unit: rule.unit.clone(),
                        scope: *scope,
                        labels,
                    });
                }
            }
        }
        out
    }

    /// Index of full names, built once per catalogue version, with the instance aliases of
    /// [`Catalogue::instance_alias`].
    pub fn index(&self) -> HashMap<String, ResolvedMetric> {
        let mut out = HashMap::new();
        let mut aliases = Vec::new();
        for group in &self.groups {
            for rule in &group.metrics {
                for scope in &rule.scopes {
                    let name = Catalogue::full_name(group, rule, *scope);
                    let resolved = ResolvedMetric { name: name.clone(), scope: *scope, rule: rule.clone() };
                    if *scope == Scope::Instance {
                        if let Some(alias) = self.instance_alias(group, rule) {
                            aliases.push((alias, resolved.clone()));
                        }
                    }
                    out.insert(name, resolved);
                }
            }
        }
        for (alias, resolved) in aliases {
            out.entry(alias).or_insert(resolved);
        }
        out
    }

    /// A second name for an instance metric of a group whose service prefix extends the first
    /// group's: SPEC §3 names instance metrics `<first instance prefix>_<name>`, where the name
    /// of an MCP metric is `mcp_<rule>` (`meter_envoy_ai_gw_instance_mcp_request_cpm`), while
    /// SkyWalking, whose names the group uses, names it `meter_envoy_ai_gw_mcp_instance_request_cpm`.
    /// Both answer; a name of the catalogue's own is never shadowed.
    fn instance_alias(&self, group: &MetricGroup, rule: &MetricRule) -> Option<String> {
        let first = self.groups.first()?;
        let infix = group.service_prefix.strip_prefix(&first.service_prefix)?.strip_prefix('_')?;
        (!infix.is_empty()).then(|| format!("{}_{infix}_{}", first.instance_prefix, rule.name))
    }

    /// The source metrics any rule reads (plus the cost metric): only these are stored.
    pub fn source_metrics(&self) -> BTreeSet<String> {
        let mut out: BTreeSet<String> =
            self.groups.iter().flat_map(|g| g.metrics.iter().map(|r| r.source.clone())).collect();
        out.insert(self.cost.metric.clone());
        out
    }

    /// The source metrics that must be histograms, each with the first rule that reads its
    /// counts (a count, mean or percentile: a sum's point has no count, and merged into such a
    /// series it made a mean of a sum over no calls). The others (read for their sums: rates,
    /// cost) may be sums or histograms.
    pub fn histogram_sources(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for rule in self.groups.iter().flat_map(|g| g.metrics.iter()) {
            if matches!(rule.value, ValueKind::Count | ValueKind::Mean | ValueKind::Percentile) {
                out.entry(rule.source.clone()).or_insert_with(|| rule.name.clone());
            }
        }
        out
    }

    /// The label values of `rule`'s groups for a series, or `None` when the series does not
    /// pass the rule's filter.
    pub fn group_of(&self, rule: &MetricRule, attributes: &AttributeSet) -> Option<Vec<String>> {
        if !rule.filter.iter().all(|condition| condition.matches(attributes)) {
            return None;
        }
        Some(
            rule.group_by
                .iter()
                .map(|label| {
                    self.labels.get(label).map(|source| source.value(attributes).to_string()).unwrap_or_default()
                })
                .collect(),
        )
    }

    /// The value of label `name` for a series.
    pub fn label_value<'a>(&'a self, name: &str, attributes: &'a AttributeSet) -> Option<&'a str> {
        self.labels.get(name).map(|source| source.value(attributes))
    }

    /// Checks names, references and parameters; the message names the rule and field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, source) in &self.labels {
            if name.is_empty() || name == "p" {
                return Err(format!("catalogue.labels.{name:?}: label names must be non-empty and not \"p\""));
            }
            if source.attributes.is_empty() {
                return Err(format!("catalogue.labels.{name}.attributes: must name at least one attribute"));
            }
        }
        if !self.labels.contains_key(&self.cost.model_label) {
            return Err(format!("catalogue.cost.model_label: no label named {:?}", self.cost.model_label));
        }
        let mut seen = BTreeSet::new();
        for (g, group) in self.groups.iter().enumerate() {
            if group.service_prefix.is_empty()
                || group.instance_prefix.is_empty()
                || group.service_prefix == group.instance_prefix
            {
                return Err(format!(
                    "catalogue.groups[{g}]: service_prefix and instance_prefix must be non-empty and different"
                ));
            }
            for (r, rule) in group.metrics.iter().enumerate() {
                let at = format!("catalogue.groups[{g}].metrics[{r}] ({})", rule.name);
                rule_problem(self, rule).map_or(Ok(()), |problem| Err(format!("{at}: {problem}")))?;
                for scope in &rule.scopes {
                    let full = Catalogue::full_name(group, rule, *scope);
                    if !seen.insert(full.clone()) {
                        return Err(format!("{at}: metric name {full} is defined twice"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Catalogue {
    /// Checks only a new document gets (`PUT`, a file), beyond [`Catalogue::validate`], which a
    /// committed document passed and must keep passing when the Raft log is replayed (so it is
    /// never tightened): each percentile rank once (a repeated one answered two series with the
    /// same labels), and a `scale` between 1e-12 and 1e12 in size (1e308 turned every value into
    /// infinity, answered as null).
    pub fn check_new(&self) -> Result<(), String> {
        for (g, group) in self.groups.iter().enumerate() {
            for (r, rule) in group.metrics.iter().enumerate() {
                let at = format!("catalogue.groups[{g}].metrics[{r}] ({})", rule.name);
                if !(MIN_SCALE..=MAX_SCALE).contains(&rule.scale.abs()) {
                    return Err(format!("{at}: scale {:e} is not between 1e-12 and 1e12 in size", rule.scale));
                }
                let mut ranks = BTreeSet::new();
                if let Some(rank) = rule.percentiles.iter().find(|rank| !ranks.insert(**rank)) {
                    return Err(format!("{at}: percentile {rank} is listed twice"));
                }
            }
        }
        Ok(())
    }
}

/// Smallest and largest size of a rule's `scale` a new document may give.
const MIN_SCALE: f64 = 1e-12;
const MAX_SCALE: f64 = 1e12;

fn rule_problem(catalogue: &Catalogue, rule: &MetricRule) -> Option<String> {
    if rule.name.is_empty() || !rule.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some("name must be non-empty letters, digits and _".into());
    }
    if rule.source.is_empty() {
        return Some("source must name a metric".into());
    }
    if !rule.scale.is_finite() || rule.scale == 0.0 {
        return Some(format!("scale {} must be a non-zero number", rule.scale));
    }
    if rule.scopes.is_empty() {
        return Some("scopes must list service and/or instance".into());
    }
    if let Some(label) = rule.group_by.iter().find(|label| !catalogue.labels.contains_key(*label)) {
        return Some(format!("group_by names unknown label {label:?}"));
    }
    for (index, condition) in rule.filter.iter().enumerate() {
        let set = [condition.equals.is_some(), condition.one_of.is_some(), condition.present.is_some()];
        if set.iter().filter(|s| **s).count() != 1 {
            return Some(format!("filter[{index}] must set exactly one of equals, in, present"));
        }
    }
    match (rule.value, rule.percentiles.is_empty()) {
        (ValueKind::Percentile, true) => return Some("a percentile rule needs percentiles".into()),
        (ValueKind::Percentile, false) => {
            if let Some(rank) = rule.percentiles.iter().find(|r| **r == 0 || **r > 100) {
                return Some(format!("percentile {rank} is not between 1 and 100"));
            }
        }
        (_, false) => return Some("percentiles only apply to value: percentile".into()),
        (_, true) => {}
    }
    None
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ValueKind::Count => "count",
            ValueKind::Sum => "sum",
            ValueKind::Mean => "mean",
            ValueKind::Percentile => "percentile",
            ValueKind::Cost => "cost",
            ValueKind::Unpriced => "unpriced",
        };
        f.write_str(name)
    }
}

/// The value of `kind` for one merged step, `minutes` long.
pub fn step_value(kind: ValueKind, state: &Aggregate, scale: f64, minutes: i64, rank: u32) -> Option<f64> {
    let per_minute = |total: f64| Some(total * scale / minutes as f64);
    match kind {
        ValueKind::Count => per_minute(state.count as f64),
        ValueKind::Sum => per_minute(state.sum.to_f64()),
        ValueKind::Cost => per_minute(state.cost.to_f64()),
        ValueKind::Unpriced => per_minute(state.unpriced.to_f64()),
        ValueKind::Mean => state.mean(scale),
        ValueKind::Percentile => state.percentile(rank, scale),
    }
}

const DURATION: &str = "gen_ai.server.request.duration";
const TOKENS: &str = "gen_ai.client.token.usage";
const TTFT: &str = "gen_ai.server.time_to_first_token";
const TPOT: &str = "gen_ai.server.time_per_output_token";
const MCP_DURATION: &str = "mcp.request.duration";
const MCP_METHODS: &str = "mcp.method.count";
const MCP_INIT: &str = "mcp.initialization.duration";
const MCP_CAPABILITIES: &str = "mcp.capabilities.negotiated";
const RANKS: [u32; 5] = [50, 75, 90, 95, 99];

struct RuleBuilder(MetricRule);

fn rule(name: &str, unit: &str, source: &str, value: ValueKind, description: &str) -> RuleBuilder {
    RuleBuilder(MetricRule {
        name: name.into(),
        unit: unit.into(),
        source: source.into(),
        filter: Vec::new(),
        group_by: Vec::new(),
        value,
        scale: 1.0,
        percentiles: if value == ValueKind::Percentile { RANKS.to_vec() } else { Vec::new() },
        scopes: default_scopes(),
        description: description.into(),
    })
}

impl RuleBuilder {
    fn ms(mut self) -> RuleBuilder {
        self.0.scale = 1000.0;
        self
    }
    fn by(mut self, labels: &[&str]) -> RuleBuilder {
        self.0.group_by = labels.iter().map(|l| l.to_string()).collect();
        self
    }
    fn equals(mut self, attribute: &str, value: &str) -> RuleBuilder {
        self.0.filter.push(Condition {
            attribute: attribute.into(),
            equals: Some(value.into()),
            one_of: None,
            present: None,
        });
        self
    }
    fn one_of(mut self, attribute: &str, values: &[&str]) -> RuleBuilder {
        let values = values.iter().map(|v| v.to_string()).collect();
        self.0.filter.push(Condition {
            attribute: attribute.into(),
            equals: None,
            one_of: Some(values),
            present: None,
        });
        self
    }
    fn present(mut self, attribute: &str) -> RuleBuilder {
        self.0.filter.push(Condition { attribute: attribute.into(), equals: None, one_of: None, present: Some(true) });
        self
    }
}

fn label(attributes: &[&str], skip_values: &[&str]) -> LabelSource {
    LabelSource {
        attributes: attributes.iter().map(|a| a.to_string()).collect(),
        skip_values: skip_values.iter().map(|v| v.to_string()).collect(),
        default: default_label_value(),
    }
}

impl Default for Catalogue {
    /// The built-in Envoy AI Gateway catalogue (SPEC §3, UPSTREAM-NOTES §5).
    fn default() -> Self {
        use ValueKind::*;
        let token_type = "gen_ai.token.type";
        let genai = vec![
            rule("request_cpm", "calls/min", DURATION, Count, "Requests per minute."),
            rule("request_latency_avg", "ms", DURATION, Mean, "Mean request duration.").ms(),
            rule(
                "request_latency_percentile",
                "ms",
                DURATION,
                Percentile,
                "Request duration percentiles (bucket upper bounds).",
            )
            .ms(),
            rule("error_cpm", "calls/min", DURATION, Count, "Failed requests (with error.type) per minute.")
                .present("error.type"),
            rule("input_token_rate", "tokens/min", TOKENS, Sum, "Input tokens per minute (cached ones included).")
                .equals(token_type, "input"),
            rule("output_token_rate", "tokens/min", TOKENS, Sum, "Output tokens per minute (reasoning ones included).")
                .equals(token_type, "output"),
            rule("total_token_rate", "tokens/min", TOKENS, Sum, "Input plus output tokens per minute.")
                .one_of(token_type, &["input", "output"]),
            rule("ttft_avg", "ms", TTFT, Mean, "Mean time to first token (streaming requests).").ms(),
            rule("ttft_percentile", "ms", TTFT, Percentile, "Time to first token percentiles.").ms(),
            rule("tpot_avg", "ms", TPOT, Mean, "Mean time per output token (streaming requests).").ms(),
            rule("tpot_percentile", "ms", TPOT, Percentile, "Time per output token percentiles.").ms(),
            rule(
                "estimated_cost",
                "micro-units/min",
                TOKENS,
                Cost,
                "Estimated cost per minute, in millionths of the pricing currency.",
            ),
            rule("provider_request_cpm", "calls/min", DURATION, Count, "Requests per minute by provider.")
                .by(&["provider"]),
            rule("provider_token_rate", "tokens/min", TOKENS, Sum, "Tokens per minute by provider and token type.")
                .by(&["provider", "token_type"]),
            rule("provider_latency_avg", "ms", DURATION, Mean, "Mean request duration by provider.")
                .ms()
                .by(&["provider"]),
            rule("provider_estimated_cost", "micro-units/min", TOKENS, Cost, "Estimated cost per minute by provider.")
                .by(&["provider"]),
            rule("model_request_cpm", "calls/min", DURATION, Count, "Requests per minute by model.").by(&["model"]),
            rule("model_token_rate", "tokens/min", TOKENS, Sum, "Tokens per minute by model and token type.")
                .by(&["model", "token_type"]),
            rule("model_latency_avg", "ms", DURATION, Mean, "Mean request duration by model.").ms().by(&["model"]),
            rule("model_ttft_avg", "ms", TTFT, Mean, "Mean time to first token by model.").ms().by(&["model"]),
            rule("model_tpot_avg", "ms", TPOT, Mean, "Mean time per output token by model.").ms().by(&["model"]),
            rule("model_estimated_cost", "micro-units/min", TOKENS, Cost, "Estimated cost per minute by model.")
                .by(&["model"]),
            rule(
                "unpriced_token_rate",
                "tokens/min",
                TOKENS,
                Unpriced,
                "Input plus output tokens per minute of models without a price.",
            )
            .by(&["model"]),
            rule(
                "log_request_cpm",
                "calls/min",
                LOG_REQUESTS_METRIC,
                Sum,
                "Access-log records per minute by status class.",
            )
            .by(&["status_class"]),
            rule(
                "log_sampled_cpm",
                "records/min",
                LOG_SAMPLED_METRIC,
                Sum,
                "Kept access-log records per minute by keep reason.",
            )
            .by(&["reason"]),
        ];
        let mcp = vec![
            rule("request_cpm", "calls/min", MCP_DURATION, Count, "MCP requests per minute."),
            rule("request_latency_avg", "ms", MCP_DURATION, Mean, "Mean MCP request duration.").ms(),
            rule("request_latency_percentile", "ms", MCP_DURATION, Percentile, "MCP request duration percentiles.")
                .ms(),
            rule("method_cpm", "calls/min", MCP_METHODS, Sum, "MCP method calls per minute by method.").by(&["method"]),
            rule("error_cpm", "calls/min", MCP_METHODS, Sum, "MCP method calls with status error per minute.")
                .equals("status", "error"),
            rule("initialization_latency_avg", "ms", MCP_INIT, Mean, "Mean MCP session initialization duration.").ms(),
            rule(
                "initialization_latency_percentile",
                "ms",
                MCP_INIT,
                Percentile,
                "MCP initialization duration percentiles.",
            )
            .ms(),
            rule(
                "capabilities_cpm",
                "calls/min",
                MCP_CAPABILITIES,
                Sum,
                "Negotiated MCP capabilities per minute by type.",
            )
            .by(&["capability_type"]),
            rule("backend_request_cpm", "calls/min", MCP_DURATION, Count, "MCP requests per minute by backend.")
                .by(&["backend"]),
            rule("backend_request_latency_avg", "ms", MCP_DURATION, Mean, "Mean MCP request duration by backend.")
                .ms()
                .by(&["backend"]),
            rule(
                "backend_method_cpm",
                "calls/min",
                MCP_METHODS,
                Sum,
                "MCP method calls per minute by backend and method.",
            )
            .by(&["backend", "method"]),
            rule("backend_error_cpm", "calls/min", MCP_METHODS, Sum, "MCP error calls per minute by backend.")
                .equals("status", "error")
                .by(&["backend"]),
            rule(
                "backend_initialization_latency_avg",
                "ms",
                MCP_INIT,
                Mean,
                "Mean MCP initialization duration by backend.",
            )
            .ms()
            .by(&["backend"]),
        ];
        let labels = BTreeMap::from([
            ("provider".to_string(), label(&["gen_ai.provider.name"], &[])),
            ("model".to_string(), label(&["gen_ai.response.model", "gen_ai.request.model"], &["unknown"])),
            ("token_type".to_string(), label(&[token_type], &[])),
            ("method".to_string(), label(&["mcp.method.name"], &[])),
            ("backend".to_string(), label(&["mcp.backend"], &[])),
            ("capability_type".to_string(), label(&["capability.type"], &[])),
            ("status_class".to_string(), label(&["status_class"], &[])),
            ("reason".to_string(), label(&["reason"], &[])),
        ]);
        Catalogue {
            labels,
            cost: CostRule::default(),
            groups: vec![
                MetricGroup {
                    service_prefix: "meter_envoy_ai_gw".into(),
                    instance_prefix: "meter_envoy_ai_gw_instance".into(),
                    metrics: genai.into_iter().map(|b| b.0).collect(),
                },
                MetricGroup {
                    service_prefix: "meter_envoy_ai_gw_mcp".into(),
                    instance_prefix: "meter_envoy_ai_gw_mcp_instance".into(),
                    metrics: mcp.into_iter().map(|b| b.0).collect(),
                },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mcp_instance_metrics_answer_to_the_spec_name_too() {
        let index = Catalogue::default().index();
        let upstream = &index["meter_envoy_ai_gw_mcp_instance_request_cpm"];
        let spec = &index["meter_envoy_ai_gw_instance_mcp_request_cpm"];
        assert_eq!(spec, upstream);
        assert_eq!(spec.scope, Scope::Instance);
        assert!(!index.contains_key("meter_envoy_ai_gw_mcp_mcp_request_cpm"), "no service alias");
        assert!(!index.contains_key("meter_envoy_ai_gw_instance_instance_request_cpm"), "no alias for the first group");
        let names = Catalogue::default().entries().len();
        let mcp_instance = index.keys().filter(|name| name.starts_with("meter_envoy_ai_gw_mcp_instance_")).count();
        assert_eq!(index.len(), names + mcp_instance, "one alias per MCP instance metric, listed once");
    }

    #[test]
    fn test_default_catalogue_is_valid_and_complete() {
        let catalogue = Catalogue::default();
        catalogue.validate().unwrap();
        let index = catalogue.index();
        for name in [
            "meter_envoy_ai_gw_request_cpm",
            "meter_envoy_ai_gw_instance_request_latency_percentile",
            "meter_envoy_ai_gw_total_token_rate",
            "meter_envoy_ai_gw_estimated_cost",
            "meter_envoy_ai_gw_instance_model_estimated_cost",
            "meter_envoy_ai_gw_unpriced_token_rate",
            "meter_envoy_ai_gw_mcp_backend_method_cpm",
            "meter_envoy_ai_gw_mcp_instance_request_cpm",
            "meter_envoy_ai_gw_log_sampled_cpm",
        ] {
            assert!(index.contains_key(name), "{name} missing");
        }
        let entries = catalogue.entries();
        assert_eq!(entries.len(), 2 * (25 + 13));
        let percentile = entries.iter().find(|e| e.name == "meter_envoy_ai_gw_ttft_percentile").unwrap();
        assert_eq!(percentile.labels, vec!["p".to_string()]);
        assert_eq!(percentile.unit, "ms");
    }

    #[test]
    fn test_catalogue_round_trips_through_yaml_and_json() {
        let catalogue = Catalogue::default();
        let json = serde_json::to_string(&catalogue).unwrap();
        let back: Catalogue = serde_json::from_str(&json).unwrap();
        assert_eq!(back, catalogue);
        let yaml = serde_saphyr::to_string(&catalogue).unwrap();
        let back: Catalogue = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, catalogue);
    }

    #[test]
    fn test_model_label_falls_back_to_request_model() {
        let catalogue = Catalogue::default();
        let attrs =
            AttributeSet::from_pairs([("gen_ai.response.model", "unknown"), ("gen_ai.request.model", "gpt-4o")]);
        assert_eq!(catalogue.label_value("model", &attrs), Some("gpt-4o"));
        let attrs =
            AttributeSet::from_pairs([("gen_ai.response.model", "gpt-4o-2024"), ("gen_ai.request.model", "gpt-4o")]);
        assert_eq!(catalogue.label_value("model", &attrs), Some("gpt-4o-2024"));
        let attrs = AttributeSet::from_pairs([("gen_ai.response.model", "")]);
        assert_eq!(catalogue.label_value("model", &attrs), Some("unknown"));
    }

    #[test]
    fn test_filters_select_series() {
        let catalogue = Catalogue::default();
        let index = catalogue.index();
        let error = &index["meter_envoy_ai_gw_error_cpm"].rule;
        let ok = AttributeSet::from_pairs([("gen_ai.provider.name", "openai")]);
        let failed = AttributeSet::from_pairs([("gen_ai.provider.name", "openai"), ("error.type", "_OTHER")]);
        assert_eq!(catalogue.group_of(error, &ok), None);
        assert_eq!(catalogue.group_of(error, &failed), Some(vec![]));
        let total = &index["meter_envoy_ai_gw_total_token_rate"].rule;
        let cached = AttributeSet::from_pairs([("gen_ai.token.type", "cached_input")]);
        let output = AttributeSet::from_pairs([("gen_ai.token.type", "output")]);
        assert_eq!(catalogue.group_of(total, &cached), None);
        assert_eq!(catalogue.group_of(total, &output), Some(vec![]));
        let by_provider = &index["meter_envoy_ai_gw_provider_token_rate"].rule;
        assert_eq!(catalogue.group_of(by_provider, &failed), Some(vec!["openai".to_string(), "unknown".to_string()]));
    }

    #[test]
    fn test_validate_reports_rule_and_field() {
        let mut catalogue = Catalogue::default();
        catalogue.groups[0].metrics[0].group_by = vec!["nope".into()];
        let error = catalogue.validate().unwrap_err();
        assert!(error.contains("groups[0].metrics[0] (request_cpm)") && error.contains("\"nope\""), "{error}");

        let mut catalogue = Catalogue::default();
        let duplicate = catalogue.groups[0].metrics[0].clone();
        catalogue.groups[0].metrics.push(duplicate);
        assert!(catalogue.validate().unwrap_err().contains("defined twice"));

        let mut catalogue = Catalogue::default();
        catalogue.groups[0].metrics[2].percentiles = vec![0];
        assert!(catalogue.validate().unwrap_err().contains("percentile 0"));

        let mut catalogue = Catalogue::default();
        catalogue.groups[0].metrics[3].filter[0].equals = Some("x".into());
        assert!(catalogue.validate().unwrap_err().contains("exactly one of"));
    }

    /// A new document's repeated percentile rank and a scale of absurd size are refused, while
    /// a committed document with them still passes `validate` (a replayed Raft entry must apply
    /// as it did).
    #[test]
    fn test_new_documents_get_the_stricter_checks() {
        assert_eq!(Catalogue::default().check_new(), Ok(()));
        let mut catalogue = Catalogue::default();
        catalogue.groups[0].metrics[2].percentiles = vec![50, 99, 50];
        assert_eq!(catalogue.validate(), Ok(()));
        let error = catalogue.check_new().unwrap_err();
        assert!(error.contains("metrics[2]") && error.contains("percentile 50 is listed twice"), "{error}");
        for (scale, accepted) in
            [(1e12, true), (-1e-12, true), (1e-3, true), (1e308, false), (-1e13, false), (1e-13, false)]
        {
            let mut catalogue = Catalogue::default();
            catalogue.groups[0].metrics[0].scale = scale;
            assert_eq!(catalogue.validate(), Ok(()), "{scale}");
            assert_eq!(catalogue.check_new().is_ok(), accepted, "{scale}");
        }
        let mut document = crate::config::RulesConfig::default();
        document.catalogue.groups[0].metrics[0].scale = 1e308;
        let yaml = serde_saphyr::to_string(&document).unwrap();
        let error = crate::config::RulesConfig::parse(&yaml).unwrap_err().to_string();
        assert!(error.contains("scale 1e308 is not between"), "{error}");
    }

    #[test]
    fn test_step_value_rates_are_per_minute_averages() {
        let mut state = Aggregate::empty();
        state.count = 120;
        assert_eq!(step_value(ValueKind::Count, &state, 1.0, 60, 0), Some(2.0));
        assert_eq!(step_value(ValueKind::Mean, &state, 1.0, 60, 0), Some(0.0));
        assert_eq!(step_value(ValueKind::Mean, &Aggregate::empty(), 1.0, 1, 0), None);
    }
}
