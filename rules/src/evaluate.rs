//! Evaluation of a catalogue metric over merged states (SPEC §3, §7).
//!
//! Evaluation is two steps so that a cluster can split it: every node folds the states it
//! holds into a [`Partial`] (per output group and step: one merged [`Aggregate`]), partials
//! merge exactly, and [`Partial::finish`] turns the merged partial into the API's series.

use crate::aggregate::Aggregate;
use crate::catalogue::{step_value, Catalogue, ResolvedMetric, Scope, ValueKind};
use crate::series::SeriesKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Query resolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// One point per minute.
    #[default]
    Minute,
    /// One point per UTC hour.
    Hour,
    /// One point per UTC day.
    Day,
}

impl Step {
    /// Minutes in one step.
    pub fn minutes(self) -> i64 {
        match self {
            Step::Minute => 1,
            Step::Hour => 60,
            Step::Day => 1440,
        }
    }

    /// Seconds in one step.
    pub fn seconds(self) -> i64 {
        self.minutes() * 60
    }

    /// The start of the step containing `unix_seconds`.
    pub fn floor(self, unix_seconds: i64) -> i64 {
        unix_seconds.div_euclid(self.seconds()) * self.seconds()
    }

    /// `minute`, `hour` or `day`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Minute => "minute",
            Step::Hour => "hour",
            Step::Day => "day",
        }
    }

    /// From `minute`, `hour` or `day`.
    pub fn parse(value: &str) -> Option<Step> {
        match value {
            "minute" => Some(Step::Minute),
            "hour" => Some(Step::Hour),
            "day" => Some(Step::Day),
            _ => None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to evaluate: a metric for an entity over `[start, end)` (unix seconds) at a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricQuery {
    /// The metric.
    pub metric: ResolvedMetric,
    /// Service name.
    pub service: String,
    /// Instance name; required for instance-scope metrics, ignored otherwise.
    pub instance: Option<String>,
    /// First second (floored to the step).
    pub start: i64,
    /// End second, exclusive.
    pub end: i64,
    /// Resolution.
    pub step: Step,
}

impl MetricQuery {
    /// True when a series belongs to the queried entity and reads the rule's source metric.
    pub fn selects(&self, key: &SeriesKey) -> bool {
        if key.metric != self.metric.rule.source || key.entity.service != self.service {
            return false;
        }
        match self.metric.scope {
            Scope::Service => true,
            Scope::Instance => key.entity.instance.is_some() && key.entity.instance == self.instance,
        }
    }

    /// The step starts of the answer.
    pub fn step_starts(&self) -> impl Iterator<Item = i64> {
        let step = self.step.seconds();
        let first = self.step.floor(self.start);
        let end = self.end;
        (0..).map(move |i| first + i * step).take_while(move |t| *t < end)
    }

    /// True when a state starting at `unix_seconds` lies in one of the answer's steps. Steps are
    /// whole at both ends: the first from `start` rounded down, the last the one whose start is
    /// before `end` (so a step's value does not depend on whether its minutes were rolled up).
    pub fn covers(&self, unix_seconds: i64) -> bool {
        unix_seconds >= self.step.floor(self.start) && self.step.floor(unix_seconds) < self.end
    }

    /// The end of the answer's last step: `end` rounded up to a step boundary.
    pub fn steps_end(&self) -> i64 {
        self.step.floor(self.end - 1) + self.step.seconds()
    }

    /// The steps of the range: the values of one series of the answer.
    pub fn steps(&self) -> usize {
        ((self.steps_end() - self.step.floor(self.start)) / self.step.seconds()).max(0) as usize
    }

    /// The series of one group in the answer: one per percentile rank of a percentile metric,
    /// else one.
    pub fn series_per_group(&self) -> usize {
        let ranks =
            if self.metric.rule.value == ValueKind::Percentile { self.metric.rule.percentiles.len() } else { 1 };
        ranks.max(1)
    }

    /// The values of one group in the answer: a point per step, for each percentile rank of a
    /// percentile metric.
    pub fn values_per_group(&self) -> usize {
        self.steps().saturating_mul(self.series_per_group())
    }
}

/// Merged states of one query, per output group (label values) and step start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    /// Label values (in `group_by` order) → step start → merged state.
    pub groups: BTreeMap<Vec<String>, BTreeMap<i64, Aggregate>>,
}

impl Partial {
    /// Folds in the state of one series for the period starting at `unix_seconds` (a minute, or
    /// a stored hour/day roll-up that lies within one step). Series outside the query are
    /// ignored.
    pub fn add(
        &mut self,
        catalogue: &Catalogue,
        query: &MetricQuery,
        key: &SeriesKey,
        unix_seconds: i64,
        state: &Aggregate,
    ) {
        if !query.selects(key) || !query.covers(unix_seconds) {
            return;
        }
        // Tokens of priced models are not unpriced data: they must not show up as zeros.
        if query.metric.rule.value == ValueKind::Unpriced && state.unpriced.is_zero() {
            return;
        }
        let step_start = query.step.floor(unix_seconds);
        let Some(group) = catalogue.group_of(&query.metric.rule, &key.attributes) else {
            // The source has data for the entity in this step, none of it passing the filter: an
            // unlabelled rate is 0 there, not missing (a minute of requests without failures has
            // an `error_cpm` of 0). Averages and percentiles of nothing stay missing. A labelled
            // rule's series are the label values of data that passes its filter: a filter on the
            // label itself (`token_type in [input, output]`) must not bring in the others as 0.
            let rule = &query.metric.rule;
            if rule.group_by.is_empty() && matches!(rule.value, ValueKind::Count | ValueKind::Sum | ValueKind::Cost) {
                self.groups.entry(Vec::new()).or_default().entry(step_start).or_insert_with(Aggregate::empty);
            }
            return;
        };
        self.groups.entry(group).or_default().entry(step_start).or_insert_with(Aggregate::empty).merge(state);
    }

    /// Merges another node's partial of the same query.
    pub fn merge(&mut self, other: &Partial) {
        for (group, steps) in &other.groups {
            let mine = self.groups.entry(group.clone()).or_default();
            for (start, state) in steps {
                mine.entry(*start).or_insert_with(Aggregate::empty).merge(state);
            }
        }
    }

    /// The answer: one series per group (per group and rank for percentiles), one point per
    /// step, `None` where the step has no data. Unlabelled metrics always have their series,
    /// even without data.
    pub fn finish(&self, query: &MetricQuery) -> MetricResult {
        let rule = &query.metric.rule;
        let steps: Vec<i64> = query.step_starts().collect();
        let minutes = query.step.minutes();
        let empty = BTreeMap::new();
        let mut groups: Vec<(Vec<String>, &BTreeMap<i64, Aggregate>)> =
            self.groups.iter().map(|(labels, steps)| (labels.clone(), steps)).collect();
        if groups.is_empty() && rule.group_by.is_empty() {
            groups.push((Vec::new(), &empty));
        }
        // Percentile ranks in rank order, whatever the order of the rule's list.
        let mut ranks: Vec<Option<u32>> = if rule.value == ValueKind::Percentile {
            rule.percentiles.iter().map(|r| Some(*r)).collect()
        } else {
            vec![None]
        };
        ranks.sort_unstable();
        let mut series = Vec::new();
        for (values, states) in groups {
            for rank in &ranks {
                let mut labels: BTreeMap<String, String> =
                    rule.group_by.iter().cloned().zip(values.iter().cloned()).collect();
                if let Some(rank) = rank {
                    labels.insert("p".into(), rank.to_string());
                }
                let points = steps
                    .iter()
                    .map(|start| {
                        let value = states
                            .get(start)
                            .and_then(|state| step_value(rule.value, state, rule.scale, minutes, rank.unwrap_or(0)));
                        (*start, value)
                    })
                    .collect();
                series.push(OutputSeries { labels, points });
            }
        }
        MetricResult { name: query.metric.name.clone(), unit: rule.unit.clone(), step: query.step, series }
    }
}

/// The answer of `GET /api/v1/metrics/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricResult {
    /// Metric name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Step.
    pub step: Step,
    /// One entry per label combination.
    pub series: Vec<OutputSeries>,
}

/// One labelled series of points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputSeries {
    /// Label values.
    pub labels: BTreeMap<String, String>,
    /// `[unix_seconds, value or null]` per step.
    pub points: Vec<(i64, Option<f64>)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Bounds, Delta};
    use crate::attributes::AttributeSet;
    use crate::entity::Entity;
    use crate::fixed::Fixed;
    use std::sync::Arc;

    fn key(instance: &str, metric: &str, pairs: &[(&str, &str)]) -> SeriesKey {
        SeriesKey {
            entity: Entity::new("gw", Some(instance)),
            metric: metric.into(),
            attributes: AttributeSet::from_pairs(pairs.iter().copied()),
        }
    }

    fn state(count: u64, sum: f64, buckets: &[u64]) -> Aggregate {
        let bounds: Bounds = Arc::from(vec![0.1, 1.0]);
        Aggregate::from_delta(&Delta {
            count,
            sum: Fixed::from_f64(sum).unwrap(),
            min: None,
            max: None,
            bounds: &bounds,
            buckets,
            cost: Fixed::ZERO,
            unpriced: Fixed::ZERO,
        })
    }

    fn query(name: &str, instance: Option<&str>, start: i64, end: i64, step: Step) -> MetricQuery {
        let catalogue = Catalogue::default();
        MetricQuery {
            metric: catalogue.index()[name].clone(),
            service: "gw".into(),
            instance: instance.map(str::to_string),
            start,
            end,
            step,
        }
    }

    #[test]
    fn test_finish_gives_null_for_steps_without_data() {
        let catalogue = Catalogue::default();
        let q = query("meter_envoy_ai_gw_request_cpm", None, 600, 780, Step::Minute);
        let mut partial = Partial::default();
        partial.add(&catalogue, &q, &key("a", "gen_ai.server.request.duration", &[]), 660, &state(3, 1.0, &[1, 2, 0]));
        partial.add(&catalogue, &q, &key("b", "gen_ai.server.request.duration", &[]), 660, &state(2, 1.0, &[0, 2, 0]));
        partial.add(&catalogue, &q, &key("b", "gen_ai.client.token.usage", &[]), 660, &state(9, 9.0, &[0, 0, 9]));
        let result = partial.finish(&q);
        assert_eq!(result.series.len(), 1);
        assert_eq!(result.series[0].points, vec![(600, None), (660, Some(5.0)), (720, None)]);
    }

    /// An unlabelled filtered rate is 0 in a step where its source has data for the entity that
    /// the filter leaves out (requests, no failures); missing where the source has none. A
    /// labelled one has series only for label values with data that passes. An average of
    /// nothing stays missing.
    #[test]
    fn test_an_unlabelled_filtered_rate_is_zero_where_its_source_has_data() {
        let catalogue = Catalogue::default();
        let q = query("meter_envoy_ai_gw_error_cpm", None, 600, 780, Step::Minute);
        let mut partial = Partial::default();
        partial.add(&catalogue, &q, &key("a", "gen_ai.server.request.duration", &[]), 600, &state(3, 1.0, &[1, 2, 0]));
        let failed = [("error.type", "_OTHER")];
        partial.add(
            &catalogue,
            &q,
            &key("a", "gen_ai.server.request.duration", &failed),
            660,
            &state(2, 1.0, &[2, 0, 0]),
        );
        partial.add(&catalogue, &q, &key("a", "gen_ai.server.request.duration", &[]), 660, &state(4, 1.0, &[4, 0, 0]));
        partial.add(&catalogue, &q, &key("a", "gen_ai.client.token.usage", &[]), 720, &state(9, 9.0, &[0, 0, 9]));
        let result = partial.finish(&q);
        assert_eq!(result.series[0].points, vec![(600, Some(0.0)), (660, Some(2.0)), (720, None)]);

        // A labelled rule: only label values with data passing the filter have a series.
        let q = query("meter_envoy_ai_gw_mcp_backend_error_cpm", None, 600, 660, Step::Minute);
        let mut partial = Partial::default();
        let calls = |backend, status| [("mcp.backend", backend), ("status", status)];
        for (backend, status, calls_made) in [("a", "success", 5.0), ("b", "success", 1.0), ("b", "error", 2.0)] {
            let mut sum = state(0, 0.0, &[]);
            sum.sum = Fixed::from_f64(calls_made).unwrap();
            partial.add(&catalogue, &q, &key("a", "mcp.method.count", &calls(backend, status)), 600, &sum);
        }
        let result = partial.finish(&q);
        let by_backend: Vec<(String, Option<f64>)> =
            result.series.iter().map(|s| (s.labels["backend"].clone(), s.points[0].1)).collect();
        assert_eq!(by_backend, vec![("b".to_string(), Some(2.0))]);

        // A filtered average (a rules document may define one): nothing passed, nothing to average.
        let mut q = query("meter_envoy_ai_gw_error_cpm", None, 600, 660, Step::Minute);
        q.metric.rule.value = ValueKind::Mean;
        let mut partial = Partial::default();
        partial.add(&catalogue, &q, &key("a", "gen_ai.server.request.duration", &[]), 600, &state(3, 1.0, &[1, 2, 0]));
        assert_eq!(partial.finish(&q).series[0].points, vec![(600, None)]);
        assert!(partial.groups.is_empty());
    }

    #[test]
    fn test_steps_are_whole_at_both_ends() {
        let hour = |start, end| query("meter_envoy_ai_gw_request_cpm", None, start, end, Step::Hour);
        assert_eq!(hour(0, 3600).steps_end(), 3600);
        assert_eq!(hour(0, 3601).steps_end(), 7200);
        assert_eq!(query("meter_envoy_ai_gw_request_cpm", None, 0, 61, Step::Minute).steps_end(), 120);
        let q = hour(1800, 5400);
        assert!(q.covers(0) && q.covers(3540) && q.covers(3600) && q.covers(7140));
        assert!(!q.covers(-60) && !q.covers(7200));
        assert_eq!(q.step_starts().collect::<Vec<_>>(), vec![0, 3600]);
    }

    #[test]
    fn test_unlabelled_metric_without_data_still_has_its_series() {
        let q = query("meter_envoy_ai_gw_request_latency_percentile", None, 0, 120, Step::Minute);
        let result = Partial::default().finish(&q);
        assert_eq!(result.series.len(), 5);
        assert_eq!(result.series[0].labels.get("p").map(String::as_str), Some("50"));
        assert!(result.series.iter().all(|s| s.points.iter().all(|(_, v)| v.is_none())));
        let labelled = query("meter_envoy_ai_gw_model_request_cpm", None, 0, 120, Step::Minute);
        assert!(Partial::default().finish(&labelled).series.is_empty());
    }

    /// A rule that lists its ranks out of order answers them in rank order, as the API says.
    #[test]
    fn test_percentile_series_come_in_rank_order() {
        let mut q = query("meter_envoy_ai_gw_request_latency_percentile", None, 0, 120, Step::Minute);
        q.metric.rule.percentiles = vec![99, 1, 50];
        let result = Partial::default().finish(&q);
        let ranks: Vec<&str> = result.series.iter().map(|s| s.labels["p"].as_str()).collect();
        assert_eq!(ranks, ["1", "50", "99"]);
    }

    #[test]
    fn test_instance_scope_selects_one_instance() {
        let catalogue = Catalogue::default();
        let q = query("meter_envoy_ai_gw_instance_request_cpm", Some("a"), 0, 60, Step::Minute);
        let mut partial = Partial::default();
        partial.add(&catalogue, &q, &key("a", "gen_ai.server.request.duration", &[]), 0, &state(3, 1.0, &[1, 2, 0]));
        partial.add(&catalogue, &q, &key("b", "gen_ai.server.request.duration", &[]), 0, &state(2, 1.0, &[0, 2, 0]));
        assert_eq!(partial.finish(&q).series[0].points, vec![(0, Some(3.0))]);
    }

    #[test]
    fn test_hour_step_rates_are_per_minute_averages_and_means_merge() {
        let catalogue = Catalogue::default();
        let cpm = query("meter_envoy_ai_gw_request_cpm", None, 3600, 7200, Step::Hour);
        let avg = query("meter_envoy_ai_gw_request_latency_avg", None, 3600, 7200, Step::Hour);
        let mut cpm_partial = Partial::default();
        let mut avg_partial = Partial::default();
        for (minute, s) in [(3600, state(60, 6.0, &[0, 60, 0])), (3660, state(60, 18.0, &[0, 60, 0]))] {
            let k = key("a", "gen_ai.server.request.duration", &[]);
            cpm_partial.add(&catalogue, &cpm, &k, minute, &s);
            avg_partial.add(&catalogue, &avg, &k, minute, &s);
        }
        assert_eq!(cpm_partial.finish(&cpm).series[0].points, vec![(3600, Some(2.0))]);
        assert_eq!(avg_partial.finish(&avg).series[0].points, vec![(3600, Some(200.0))]);
    }

    #[test]
    fn test_partials_merge_like_one() {
        let catalogue = Catalogue::default();
        let q = query("meter_envoy_ai_gw_provider_request_cpm", None, 0, 120, Step::Minute);
        let k1 = key("a", "gen_ai.server.request.duration", &[("gen_ai.provider.name", "openai")]);
        let k2 = key("b", "gen_ai.server.request.duration", &[("gen_ai.provider.name", "anthropic")]);
        let mut whole = Partial::default();
        whole.add(&catalogue, &q, &k1, 0, &state(1, 0.5, &[0, 1, 0]));
        whole.add(&catalogue, &q, &k2, 60, &state(2, 0.5, &[0, 2, 0]));
        let mut left = Partial::default();
        left.add(&catalogue, &q, &k1, 0, &state(1, 0.5, &[0, 1, 0]));
        let mut right = Partial::default();
        right.add(&catalogue, &q, &k2, 60, &state(2, 0.5, &[0, 2, 0]));
        left.merge(&right);
        assert_eq!(left, whole);
        let result = whole.finish(&q);
        assert_eq!(result.series.len(), 2);
        assert_eq!(result.series[0].labels["provider"], "anthropic");
    }

    #[test]
    fn test_step_floor_and_starts() {
        assert_eq!(Step::Hour.floor(7199), 3600);
        assert_eq!(Step::Day.floor(-1), -86_400);
        let q = query("meter_envoy_ai_gw_request_cpm", None, 90, 200, Step::Minute);
        assert_eq!(q.step_starts().collect::<Vec<_>>(), vec![60, 120, 180]);
    }
}
