//! The shared golden aggregation cases, replayed into the real binary over OTLP/gRPC exactly as
//! the gateway would send them, and read back through the HTTP API: every value exact.

mod common;

use common::TestNode;
use serde_json::json;
use tollgate_rules::testing::{self, Convention};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_golden_cases_over_grpc_read_back_over_http() {
    let cases = testing::aggregation_cases();
    for convention in [Convention::JobName, Convention::AigwService] {
        for case in &cases.cases {
            let node = TestNode::start_with(&common::KEEP_OLD_DATA, &[]).await;
            let (status, body) = node.put("/api/v1/config/pricing", &cases.pricing.to_string(), None).await;
            assert_eq!(status, 200, "{body}");
            // Alternate between the two gRPC listeners (4317 and 11800 in production).
            let mut clients = [node.metrics_client(0).await, node.metrics_client(1).await];
            for (index, point) in case.points.iter().enumerate() {
                let response =
                    clients[index % 2].export(point.request(convention)).await.expect("export accepted").into_inner();
                assert!(response.partial_success.is_none(), "{}: {:?}", case.name, response.partial_success);
            }
            let mut failures = Vec::new();
            for expect in &case.expect {
                let labels = json!(expect.labels);
                let actual = node
                    .value(&expect.metric, &expect.service, expect.instance.as_deref(), &labels, expect.minute)
                    .await;
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
}
