//! The shared golden cases (vendored in `tests/cases/`), run through the in-memory pipeline:
//! OTLP requests in, catalogue metrics out.

use opentelemetry_proto::tonic::common::v1::KeyValue;
use tollgate_rules::pricing::{PricingDocument, TokenType};
use tollgate_rules::sampling::{decide, SamplingRules};
use tollgate_rules::testing::{self, Convention};
use tollgate_rules::{CompiledRules, MemoryPipeline, PriceTable, Step};

fn case_pricing(value: &serde_json::Value) -> PriceTable {
    let document: PricingDocument = serde_json::from_value(value.clone()).expect("pricing document of the cases");
    PriceTable::new(document).expect("valid pricing")
}

fn run_aggregation(convention: Convention) {
    let cases = testing::aggregation_cases();
    assert_eq!(cases.cases.len(), 3);
    for case in &cases.cases {
        let mut pipeline = MemoryPipeline::new(CompiledRules::default(), case_pricing(&cases.pricing));
        for point in &case.points {
            let now = (point.time + 1) * 1_000_000_000;
            let report = pipeline.ingest(point.request(convention), now);
            assert_eq!(report.rejected_total(), 0, "{}: {}", case.name, report.error_message("points"));
        }
        let mut failures = Vec::new();
        for expect in &case.expect {
            let result = pipeline
                .query(
                    &expect.metric,
                    &expect.service,
                    expect.instance.as_deref(),
                    expect.minute,
                    expect.minute + 60,
                    Step::Minute,
                )
                .unwrap_or_else(|| panic!("{}: unknown metric {}", case.name, expect.metric));
            let series = result.series.iter().find(|s| s.labels == expect.labels);
            let actual = series.and_then(|s| s.points.iter().find(|(t, _)| *t == expect.minute)).and_then(|(_, v)| *v);
            if let Err(problem) = expect.check(actual) {
                failures.push(problem);
            }
        }
        assert!(
            failures.is_empty(),
            "{} ({convention:?}): {} of {} expectations failed:\n{}",
            case.name,
            failures.len(),
            case.expect.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn test_golden_aggregation_job_name_convention() {
    run_aggregation(Convention::JobName);
}

#[test]
fn test_golden_aggregation_aigw_service_convention() {
    run_aggregation(Convention::AigwService);
}

#[test]
fn test_golden_aggregation_duplicates_are_really_in_the_input() {
    // The duplicated-exports case must contain repeated points, or it proves nothing.
    let cases = testing::aggregation_cases();
    let case = cases.cases.iter().find(|c| c.name.contains("duplicated")).expect("a duplicates case");
    let mut seen = std::collections::HashSet::new();
    let repeats = case
        .points
        .iter()
        .filter(|p| !seen.insert(format!("{:?}", (&p.instance, &p.metric, &p.attrs, p.start, p.time))))
        .count();
    assert!(repeats > 0);
    let mut pipeline = MemoryPipeline::new(CompiledRules::default(), case_pricing(&cases.pricing));
    let mut duplicates = 0;
    for point in &case.points {
        duplicates += pipeline.ingest(point.request(Convention::JobName), (point.time + 1) * 1_000_000_000).duplicates;
    }
    assert_eq!(duplicates, repeats as u64);
}

#[test]
fn test_golden_pricing() {
    let cases = testing::pricing_cases();
    let table = case_pricing(&cases.pricing);
    for request in &cases.requests {
        let matched = table.lookup(&request.model);
        assert_eq!(matched.map(|m| m.key.as_str()), request.matched.as_deref(), "model {}", request.model);
        let cost = matched
            .map(|price| {
                price.request_cost(&tollgate_rules::pricing::RequestTokens {
                    input: request.input_tokens,
                    output: request.output_tokens,
                    ..Default::default()
                })
            })
            .map(|c| c.to_f64())
            .unwrap_or(0.0);
        assert!(
            (cost - request.cost_micro).abs() <= 1e-6,
            "model {}: cost {cost}, expected {}",
            request.model,
            request.cost_micro
        );
    }
    for adjustment in &cases.cached_token_adjustments {
        let price = table.lookup(&adjustment.model).expect("priced model");
        let token_type = TokenType::parse(&adjustment.token_type).expect("token type");
        let change =
            tollgate_rules::Fixed::from_int(adjustment.tokens as i64).mul_price(price.price_per_m(token_type)).to_f64();
        assert!(
            (change - adjustment.cost_micro_adjustment).abs() <= 1e-6,
            "{} {}: {change}, expected {}",
            adjustment.model,
            adjustment.token_type,
            adjustment.cost_micro_adjustment
        );
    }
}

#[test]
fn test_golden_sampling() {
    let cases = testing::sampling_cases();
    let rules = SamplingRules::default();
    assert_eq!(rules.token_threshold, cases.defaults.token_threshold);
    assert_eq!(rules.slow_threshold_ms, cases.defaults.slow_threshold_ms);
    assert_eq!(rules.mcp_slow_threshold_ms, cases.defaults.mcp_slow_threshold_ms);
    assert_eq!(rules.cost_threshold, cases.defaults.cost_threshold);
    let pricing = PriceTable::default();
    for (index, case) in cases.cases.iter().enumerate() {
        let attributes: Vec<KeyValue> = case
            .attributes
            .iter()
            .map(|(k, v)| KeyValue { key: k.clone(), value: Some(v.any_value()), ..Default::default() })
            .collect();
        let decision = decide(&attributes, &rules, &pricing);
        let reasons: Vec<&str> = decision.reasons.iter().map(|r| r.as_str()).collect();
        assert_eq!(decision.kind.map(|k| k.as_str()), case.kind.as_deref(), "case {index}: {:?}", case.attributes);
        assert_eq!(decision.keep(), case.keep, "case {index}: {:?}", case.attributes);
        assert_eq!(reasons, case.reasons, "case {index}: {:?}", case.attributes);
    }
}
