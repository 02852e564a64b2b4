//! Access-log classification and sampling (SPEC §5).
//!
//! [`decide`] reads one OTLP log record's attributes and says what kind of record it is, which
//! keep reasons apply, and the facts stored with a kept record (tokens, per-request cost, ...).
//! It never fails: a value that does not parse is treated as absent and reported in
//! [`LogDecision::malformed`].

use crate::attributes::{AttributeValue, Attributes};
use crate::fixed::Fixed;
use crate::pricing::{PriceTable, RequestTokens};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// Thresholds and attribute names of log sampling. Part of the replicated rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingRules {
    /// Keep records with `response_code >= 400`.
    #[serde(default = "yes")]
    pub keep_errors: bool,
    /// Keep records with an upstream transport failure.
    #[serde(default = "yes")]
    pub keep_upstream_failures: bool,
    /// Keep LLM records at least this slow (ms); `null` turns the reason off.
    #[serde(default = "default_slow_threshold_ms")]
    pub slow_threshold_ms: Option<u64>,
    /// Keep MCP records at least this slow (ms); `null` turns the reason off.
    #[serde(default = "default_mcp_slow_threshold_ms")]
    pub mcp_slow_threshold_ms: Option<u64>,
    /// Keep LLM records with at least this many input + output tokens; `null` turns it off.
    #[serde(default = "default_token_threshold")]
    pub token_threshold: Option<u64>,
    /// Keep LLM records whose cost is at least this many micro-units; `null` (default) is off.
    #[serde(default)]
    pub cost_threshold: Option<f64>,
    /// Which attributes hold what.
    #[serde(default)]
    pub attributes: LogAttributeNames,
}

fn yes() -> bool {
    true
}
fn default_slow_threshold_ms() -> Option<u64> {
    Some(30_000)
}
fn default_mcp_slow_threshold_ms() -> Option<u64> {
    Some(5_000)
}
fn default_token_threshold() -> Option<u64> {
    Some(10_000)
}

impl Default for SamplingRules {
    fn default() -> Self {
        SamplingRules {
            keep_errors: true,
            keep_upstream_failures: true,
            slow_threshold_ms: default_slow_threshold_ms(),
            mcp_slow_threshold_ms: default_mcp_slow_threshold_ms(),
            token_threshold: default_token_threshold(),
            cost_threshold: None,
            attributes: LogAttributeNames::default(),
        }
    }
}

impl SamplingRules {
    /// Checks the thresholds; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(cost) = self.cost_threshold {
            if !cost.is_finite() || cost < 0.0 {
                return Err(format!("sampling.cost_threshold: {cost} must be a non-negative number of micro-units"));
            }
        }
        self.attributes.validate()
    }
}

/// The log attribute keys Tollgate reads (Envoy AI Gateway's access-log format by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogAttributeNames {
    /// Present on LLM records.
    pub request_model: String,
    /// The model that answered.
    pub response_model: String,
    /// LLM provider (backend name).
    pub provider: String,
    /// Present on MCP records.
    pub mcp_method: String,
    /// MCP backend.
    pub mcp_provider: String,
    /// HTTP status.
    pub response_code: String,
    /// Request duration in ms.
    pub duration: String,
    /// Envoy's upstream transport failure reason.
    pub upstream_failure: String,
    /// Input tokens (including cached ones).
    pub input_tokens: String,
    /// Output tokens (including reasoning ones).
    pub output_tokens: String,
    /// Cache-read input tokens (optional in the gateway's log format).
    pub cached_input_tokens: String,
    /// Cache-creation input tokens (optional in the gateway's log format).
    pub cache_creation_input_tokens: String,
    /// Session id of LLM records.
    pub session_id: String,
    /// Session id of MCP records, when `session_id` is absent.
    pub mcp_session_id: String,
}

impl Default for LogAttributeNames {
    fn default() -> Self {
        LogAttributeNames {
            request_model: "gen_ai.request.model".into(),
            response_model: "gen_ai.response.model".into(),
            provider: "gen_ai.provider.name".into(),
            mcp_method: "mcp.method.name".into(),
            mcp_provider: "mcp.provider.name".into(),
            response_code: "response_code".into(),
            duration: "duration".into(),
            upstream_failure: "upstream_transport_failure_reason".into(),
            input_tokens: "gen_ai.usage.input_tokens".into(),
            output_tokens: "gen_ai.usage.output_tokens".into(),
            cached_input_tokens: "gen_ai.usage.cache_read.input_tokens".into(),
            cache_creation_input_tokens: "gen_ai.usage.cache_creation.input_tokens".into(),
            session_id: "session.id".into(),
            mcp_session_id: "mcp.session.id".into(),
        }
    }
}

impl LogAttributeNames {
    fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("request_model", &self.request_model),
            ("mcp_method", &self.mcp_method),
            ("response_code", &self.response_code),
        ] {
            if value.is_empty() {
                return Err(format!("sampling.attributes.{field}: must not be empty"));
            }
        }
        Ok(())
    }
}

/// LLM or MCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// A model request (`gen_ai.request.model` present).
    Llm,
    /// An MCP request (`mcp.method.name` present).
    Mcp,
}

impl LogKind {
    /// `llm` or `mcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Llm => "llm",
            LogKind::Mcp => "mcp",
        }
    }

    /// From `llm` / `mcp`.
    pub fn parse(value: &str) -> Option<LogKind> {
        match value {
            "llm" => Some(LogKind::Llm),
            "mcp" => Some(LogKind::Mcp),
            _ => None,
        }
    }
}

/// Why a record was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// `response_code >= 400`.
    Error,
    /// `upstream_transport_failure_reason` present.
    UpstreamFailure,
    /// Duration at or above the threshold.
    Slow,
    /// Input + output tokens at or above the threshold.
    HighTokens,
    /// Request cost at or above the threshold.
    HighCost,
}

impl KeepReason {
    /// Every reason, in the order they are reported.
    pub const ALL: [KeepReason; 5] = [
        KeepReason::Error,
        KeepReason::UpstreamFailure,
        KeepReason::Slow,
        KeepReason::HighTokens,
        KeepReason::HighCost,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Error => "error",
            KeepReason::UpstreamFailure => "upstream_failure",
            KeepReason::Slow => "slow",
            KeepReason::HighTokens => "high_tokens",
            KeepReason::HighCost => "high_cost",
        }
    }

    /// From the snake_case name.
    pub fn parse(value: &str) -> Option<KeepReason> {
        KeepReason::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything [`decide`] found out about one record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogDecision {
    /// LLM, MCP, or neither (`None`: dropped, counted).
    pub kind: Option<LogKind>,
    /// Keep reasons in [`KeepReason::ALL`] order; empty means drop.
    pub reasons: Vec<KeepReason>,
    /// Response model, falling back to the request model (LLM records only).
    pub model: Option<String>,
    /// Provider (LLM records) or MCP backend (MCP records).
    pub provider: Option<String>,
    /// Input tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
    /// Input + output, when either is present.
    pub total_tokens: Option<u64>,
    /// Cost in micro-units, when the model is priced and a token count is present.
    pub cost: Option<Fixed>,
    /// HTTP status.
    pub response_code: Option<i64>,
    /// Duration in ms.
    pub duration_ms: Option<u64>,
    /// Session id.
    pub session_id: Option<String>,
    /// Attribute keys whose value was present but did not parse as a number.
    pub malformed: Vec<&'static str>,
}

impl LogDecision {
    /// True when the record is kept.
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// `2xx` … `5xx` for HTTP statuses, `none` when there is no usable status.
    pub fn status_class(&self) -> &'static str {
        match self.response_code {
            Some(100..=199) => "1xx",
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            _ => "none",
        }
    }
}

/// The text of an attribute, or `None` when it is absent: missing, empty, or `-`.
fn present<'a, A: Attributes + ?Sized>(attributes: &'a A, key: &str) -> Option<Cow<'a, str>> {
    attributes.get(key).map(AttributeValue::into_text).filter(|v| !v.is_empty() && v.as_ref() != "-")
}

/// A number from a string or an int (or an integral double). `Err` when present but unusable.
fn number<A: Attributes + ?Sized>(attributes: &A, key: &str) -> Result<Option<i64>, ()> {
    let Some(value) = attributes.get(key) else { return Ok(None) };
    let text = |s: &str| match s {
        "" | "-" => Ok(None),
        s => s.trim().parse::<i64>().map(Some).map_err(|_| ()),
    };
    match value {
        AttributeValue::Str(s) => text(s),
        AttributeValue::Other(value) => match value.value.as_ref() {
            Some(Value::IntValue(i)) => Ok(Some(*i)),
            Some(Value::DoubleValue(d)) if d.fract() == 0.0 && d.abs() < 9.0e15 => Ok(Some(*d as i64)),
            Some(Value::StringValue(s)) => text(s),
            None => Ok(None),
            Some(_) => Err(()),
        },
    }
}

fn non_negative<A: Attributes + ?Sized>(
    attributes: &A,
    key: &str,
    malformed: &mut Vec<&'static str>,
    label: &'static str,
) -> Option<u64> {
    match number(attributes, key) {
        Ok(Some(v)) if v >= 0 => Some(v as u64),
        Ok(None) => None,
        _ => {
            malformed.push(label);
            None
        }
    }
}

/// Classifies one record and decides whether to keep it.
pub fn decide(attributes: &[KeyValue], rules: &SamplingRules, pricing: &PriceTable) -> LogDecision {
    decide_on(attributes, rules, pricing)
}

/// [`decide`], on attributes looked up in any form (an encoded record's, see
/// [`crate::logrecord::LogView`]).
pub fn decide_on<A: Attributes + ?Sized>(attributes: &A, rules: &SamplingRules, pricing: &PriceTable) -> LogDecision {
    let names = &rules.attributes;
    let mut decision = LogDecision::default();
    let kind = if present(attributes, &names.request_model).is_some() {
        LogKind::Llm
    } else if present(attributes, &names.mcp_method).is_some() {
        LogKind::Mcp
    } else {
        return decision;
    };
    decision.kind = Some(kind);
    let malformed = &mut decision.malformed;
    decision.response_code = match number(attributes, &names.response_code) {
        Ok(code) => code,
        Err(()) => {
            malformed.push("response_code");
            None
        }
    };
    decision.duration_ms = non_negative(attributes, &names.duration, malformed, "duration");
    let upstream_failure = present(attributes, &names.upstream_failure).is_some();

    match kind {
        LogKind::Llm => {
            decision.model = llm_model(attributes, names);
            // Without a provider attribute, the pricing file's `prefix-match` names it (as
            // SkyWalking does for spans without `gen_ai.provider.name`).
            decision.provider = present(attributes, &names.provider)
                .map(Cow::into_owned)
                .or_else(|| decision.model.as_deref().and_then(|m| pricing.provider_of(m)).map(str::to_string));
            decision.session_id = present(attributes, &names.session_id).map(Cow::into_owned);
            decision.input_tokens = non_negative(attributes, &names.input_tokens, malformed, "input_tokens");
            decision.output_tokens = non_negative(attributes, &names.output_tokens, malformed, "output_tokens");
            let cached = non_negative(attributes, &names.cached_input_tokens, malformed, "cached_input_tokens");
            let creation =
                non_negative(attributes, &names.cache_creation_input_tokens, malformed, "cache_creation_input_tokens");
            if decision.input_tokens.is_some() || decision.output_tokens.is_some() {
                decision.total_tokens =
                    Some(decision.input_tokens.unwrap_or(0).saturating_add(decision.output_tokens.unwrap_or(0)));
            }
            let any_tokens = decision.total_tokens.is_some() || cached.is_some() || creation.is_some();
            if let (Some(model), true) = (decision.model.as_deref(), any_tokens) {
                if let Some(price) = pricing.lookup(model) {
                    decision.cost = Some(price.request_cost(&RequestTokens {
                        input: decision.input_tokens.unwrap_or(0),
                        output: decision.output_tokens.unwrap_or(0),
                        cached_input: cached.unwrap_or(0),
                        cache_creation_input: creation.unwrap_or(0),
                    }));
                }
            }
        }
        LogKind::Mcp => {
            decision.provider = present(attributes, &names.mcp_provider).map(Cow::into_owned);
            decision.session_id = present(attributes, &names.session_id)
                .or_else(|| present(attributes, &names.mcp_session_id))
                .map(Cow::into_owned);
        }
    }

    let slow_threshold = match kind {
        LogKind::Llm => rules.slow_threshold_ms,
        LogKind::Mcp => rules.mcp_slow_threshold_ms,
    };
    let mut reasons = Vec::new();
    if rules.keep_errors && decision.response_code.is_some_and(|code| code >= 400) {
        reasons.push(KeepReason::Error);
    }
    if rules.keep_upstream_failures && upstream_failure {
        reasons.push(KeepReason::UpstreamFailure);
    }
    if let (Some(threshold), Some(duration)) = (slow_threshold, decision.duration_ms) {
        if duration >= threshold {
            reasons.push(KeepReason::Slow);
        }
    }
    if kind == LogKind::Llm {
        if let (Some(threshold), Some(total)) = (rules.token_threshold, decision.total_tokens) {
            if total >= threshold {
                reasons.push(KeepReason::HighTokens);
            }
        }
        if let (Some(threshold), Some(cost)) = (rules.cost_threshold, decision.cost) {
            if cost.to_f64() >= threshold {
                reasons.push(KeepReason::HighCost);
            }
        }
    }
    decision.reasons = reasons;
    decision
}

/// The model of an LLM record: the response model unless absent or `unknown`, else the
/// request model (as for the `model` metric label).
fn llm_model<A: Attributes + ?Sized>(attributes: &A, names: &LogAttributeNames) -> Option<String> {
    present(attributes, &names.response_model)
        .filter(|m| m.as_ref() != "unknown")
        .or_else(|| present(attributes, &names.request_model))
        .map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::AnyValue;

    fn s(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(Value::StringValue(value.into())) }),
            ..Default::default()
        }
    }

    fn i(key: &str, value: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(Value::IntValue(value)) }),
            ..Default::default()
        }
    }

    fn pricing() -> PriceTable {
        PriceTable::parse(
            "providers:\n  - provider: openai\n    models:\n      - name: gpt-4o\n        input-estimated-cost-per-m: 2.5\n        output-estimated-cost-per-m: 10\n        cached-input-estimated-cost-per-m: 1.25\n",
        )
        .unwrap()
    }

    #[test]
    fn test_decide_absent_values_are_missing_empty_or_dash() {
        let rules = SamplingRules::default();
        for code in ["", "-"] {
            let d = decide(&[s("gen_ai.request.model", "m"), s("response_code", code)], &rules, &pricing());
            assert_eq!(d.response_code, None);
            assert!(d.malformed.is_empty());
        }
        let d = decide(&[s("gen_ai.request.model", "-"), s("mcp.method.name", "")], &rules, &pricing());
        assert_eq!(d.kind, None);
    }

    #[test]
    fn test_decide_non_numeric_is_absent_and_counted_malformed() {
        let rules = SamplingRules::default();
        let d = decide(
            &[
                s("gen_ai.request.model", "m"),
                s("response_code", "oops"),
                s("duration", "1.5s"),
                s("gen_ai.usage.input_tokens", "-3"),
            ],
            &rules,
            &pricing(),
        );
        assert_eq!((d.response_code, d.duration_ms, d.input_tokens), (None, None, None));
        assert_eq!(d.malformed, vec!["response_code", "duration", "input_tokens"]);
        assert!(!d.keep());
    }

    #[test]
    fn test_decide_ints_and_strings_both_parse() {
        let rules = SamplingRules::default();
        let from_strings = decide(&[s("gen_ai.request.model", "m"), s("response_code", "503")], &rules, &pricing());
        let from_ints = decide(&[s("gen_ai.request.model", "m"), i("response_code", 503)], &rules, &pricing());
        assert_eq!(from_strings.reasons, vec![KeepReason::Error]);
        assert_eq!(from_ints.reasons, vec![KeepReason::Error]);
    }

    #[test]
    fn test_decide_thresholds_are_inclusive_and_configurable() {
        let mut rules =
            SamplingRules { token_threshold: Some(100), slow_threshold_ms: Some(1000), ..Default::default() };
        let record = [
            s("gen_ai.request.model", "m"),
            s("gen_ai.usage.input_tokens", "60"),
            s("gen_ai.usage.output_tokens", "40"),
            s("duration", "1000"),
        ];
        assert_eq!(decide(&record, &rules, &pricing()).reasons, vec![KeepReason::Slow, KeepReason::HighTokens]);
        rules.token_threshold = None;
        rules.slow_threshold_ms = None;
        assert!(!decide(&record, &rules, &pricing()).keep());
    }

    #[test]
    fn test_decide_llm_cost_uses_response_model_and_cached_tokens() {
        let rules = SamplingRules { cost_threshold: Some(7000.0), ..Default::default() };
        let record = [
            s("gen_ai.request.model", "gpt"),
            s("gen_ai.response.model", "gpt-4o-2024-08-06"),
            s("gen_ai.usage.input_tokens", "1000"),
            s("gen_ai.usage.output_tokens", "500"),
            s("gen_ai.usage.cache_read.input_tokens", "400"),
            s("response_code", "200"),
        ];
        let d = decide(&record, &rules, &pricing());
        assert_eq!(d.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(d.cost, Some(Fixed::from_int(7000)));
        assert_eq!(d.total_tokens, Some(1500));
        assert_eq!(d.reasons, vec![KeepReason::HighCost]);
        let unknown_response = [
            s("gen_ai.request.model", "gpt-4o"),
            s("gen_ai.response.model", "unknown"),
            s("gen_ai.usage.output_tokens", "1"),
        ];
        let d = decide(&unknown_response, &rules, &pricing());
        assert_eq!(d.model.as_deref(), Some("gpt-4o"));
        assert_eq!(d.cost, Some(Fixed::from_int(10)));
        let unpriced = [s("gen_ai.request.model", "llama"), s("gen_ai.usage.output_tokens", "1")];
        assert_eq!(decide(&unpriced, &rules, &pricing()).cost, None);
        let no_tokens = [s("gen_ai.request.model", "gpt-4o")];
        assert_eq!(decide(&no_tokens, &rules, &pricing()).cost, None);
    }

    #[test]
    fn test_decide_mcp_uses_its_own_slow_threshold_and_no_token_reasons() {
        let rules = SamplingRules { token_threshold: Some(1), ..Default::default() };
        let record = [
            s("mcp.method.name", "tools/call"),
            s("duration", "4999"),
            s("gen_ai.usage.input_tokens", "5"),
            s("mcp.session.id", "s-1"),
        ];
        let d = decide(&record, &rules, &pricing());
        assert_eq!(d.kind, Some(LogKind::Mcp));
        assert!(!d.keep());
        assert_eq!(d.session_id.as_deref(), Some("s-1"));
    }

    #[test]
    fn test_decide_provider_falls_back_to_prefix_match() {
        let pricing = PriceTable::parse("providers:\n  - provider: openai\n    prefix-match: [gpt]\n").unwrap();
        let rules = SamplingRules::default();
        let d = decide(&[s("gen_ai.request.model", "gpt-4o")], &rules, &pricing);
        assert_eq!(d.provider.as_deref(), Some("openai"));
        let d = decide(&[s("gen_ai.request.model", "gpt-4o"), s("gen_ai.provider.name", "azure")], &rules, &pricing);
        assert_eq!(d.provider.as_deref(), Some("azure"));
        let d = decide(&[s("gen_ai.request.model", "llama")], &rules, &pricing);
        assert_eq!(d.provider, None);
    }

    #[test]
    fn test_status_class() {
        let rules = SamplingRules::default();
        let class = |code: &str| {
            decide(&[s("gen_ai.request.model", "m"), s("response_code", code)], &rules, &pricing()).status_class()
        };
        assert_eq!(class("200"), "2xx");
        assert_eq!(class("404"), "4xx");
        assert_eq!(class("0"), "none");
        assert_eq!(class("-"), "none");
    }
}
