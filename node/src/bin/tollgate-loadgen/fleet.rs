//! A fleet of Envoy AI Gateway pods exporting their GenAI histograms
//! ([`tollgate_rules::fleet::GatewayPod`]: the four histograms, the gateway's bucket bounds and
//! attributes, delta or cumulative), spread over lanes.

use crate::run::{Export, Lane};
use prost::Message;
use tollgate_rules::fleet::GatewayPod;

/// What the fleet looks like.
#[derive(Clone, Debug)]
pub struct FleetSpec {
    /// Prefix of service names (runs against the same node use different prefixes).
    pub prefix: String,
    /// Gateways (services).
    pub services: usize,
    /// Pods over all services, assigned round-robin (so services differ by at most one pod).
    pub pods: usize,
    /// Models each pod serves (1..=6); every model adds 9 series per pod.
    pub models: usize,
    /// Cumulative temporality (the gateway's default) or delta.
    pub cumulative: bool,
    /// Data time between two exports of a pod, seconds.
    pub interval_seconds: u64,
    /// Exports per pod.
    pub rounds: u64,
    /// Unix seconds of the pods' start; export `i` of a pod is at `started + (i + 1) × interval`.
    pub started: u64,
}

impl FleetSpec {
    /// The pods, named `<prefix>-<service>` / `<prefix>-<service>-pod-<n>`.
    pub fn pods(&self) -> Vec<GatewayPod> {
        self.pods_where(|_, _| true)
    }

    /// The pods, named as by [`FleetSpec::pods`] but skipping the `(service, instance)` names
    /// `keep` refuses: a service's ordinals go on until it has its share of pods (so `keep` must
    /// accept some names of every service).
    pub fn pods_where(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<GatewayPod> {
        let services = self.services.max(1);
        let mut next_ordinal = vec![0usize; services];
        (0..self.pods)
            .map(|pod| {
                let service = pod % services;
                let name = format!("{}-{service:03}", self.prefix);
                let instance = loop {
                    let instance = format!("{name}-pod-{:04}", next_ordinal[service]);
                    next_ordinal[service] += 1;
                    if keep(&name, &instance) {
                        break instance;
                    }
                };
                GatewayPod::new(&name, &instance, self.models, self.cumulative, self.interval_seconds, self.started)
            })
            .collect()
    }

    /// Series the fleet creates: 9 per model per pod.
    pub fn series(&self) -> u64 {
        self.pods as u64 * self.models.clamp(1, 6) as u64 * 9
    }

    /// Data points over all rounds.
    pub fn points(&self) -> u64 {
        self.series() * self.rounds
    }
}

fn encode(pod: &mut GatewayPod, round: u64) -> Export {
    let request = pod.export(round);
    Export { body: request.encode_to_vec().into(), items: pod.points_per_export() as u64 }
}

/// Every export of the fleet, encoded up front (on all cores), split into `lanes` lanes: lane `l`
/// holds pods `l, l + lanes, ...` and sends round by round.
pub fn pregenerate(spec: &FleetSpec, lanes: usize) -> Vec<Vec<Export>> {
    pregenerate_pods(&spec.pods(), spec.rounds, lanes)
}

/// [`pregenerate`] for the given pods, `rounds` exports each.
pub fn pregenerate_pods(pods: &[GatewayPod], rounds: u64, lanes: usize) -> Vec<Vec<Export>> {
    let lanes = lanes.max(1);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Per pod, its exports in round order.
    let mut per_pod: Vec<Vec<Export>> = vec![Vec::new(); pods.len()];
    std::thread::scope(|scope| {
        let chunk = pods.len().div_ceil(threads).max(1);
        let handles: Vec<_> = pods
            .chunks(chunk)
            .map(|chunk| {
                let mut chunk = chunk.to_vec();
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .map(|pod| (0..rounds).map(|round| encode(pod, round)).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut index = 0;
        for handle in handles {
            for exports in handle.join().expect("generator thread") {
                per_pod[index] = exports;
                index += 1;
            }
        }
    });
    let mut result: Vec<Vec<Export>> = vec![Vec::new(); lanes];
    let mut iterators: Vec<std::vec::IntoIter<Export>> = per_pod.into_iter().map(Vec::into_iter).collect();
    for _ in 0..rounds {
        for (pod, exports) in iterators.iter_mut().enumerate() {
            if let Some(export) = exports.next() {
                result[pod % lanes].push(export);
            }
        }
    }
    result
}

/// Pre-generated lanes as lane sources (clones the bodies' handles, not the bytes).
pub fn lanes_of(pregenerated: &[Vec<Export>]) -> Vec<Lane> {
    pregenerated.iter().map(|lane| Box::new(lane.clone().into_iter()) as Lane).collect()
}

/// Lanes that generate each export just before sending it (no memory up front, but the
/// generator's CPU is spent during the run).
pub fn live_lanes(spec: &FleetSpec, lanes: usize) -> Vec<Lane> {
    let lanes = lanes.max(1);
    let mut grouped: Vec<Vec<GatewayPod>> = vec![Vec::new(); lanes];
    for (index, pod) in spec.pods().into_iter().enumerate() {
        grouped[index % lanes].push(pod);
    }
    let rounds = spec.rounds;
    grouped
        .into_iter()
        .map(|mut pods| {
            let iterator = (0..rounds)
                .flat_map(move |round| pods.iter_mut().map(|pod| encode(pod, round)).collect::<Vec<_>>().into_iter());
            Box::new(iterator) as Lane
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

    #[test]
    fn test_pregenerate_sends_every_point_once_with_each_pod_in_order() {
        let spec = FleetSpec {
            prefix: "t".into(),
            services: 3,
            pods: 7,
            models: 2,
            cumulative: true,
            interval_seconds: 10,
            rounds: 4,
            started: 1_764_151_200,
        };
        let lanes = pregenerate(&spec, 3);
        assert_eq!(lanes.iter().flatten().map(|e| e.items).sum::<u64>(), spec.points());
        assert_eq!(spec.series(), 7 * 2 * 9);
        for lane in &lanes {
            let mut last_time: std::collections::HashMap<String, u64> = Default::default();
            for export in lane {
                let request = ExportMetricsServiceRequest::decode(export.body.clone()).expect("valid OTLP");
                let resource = &request.resource_metrics[0];
                let instance = format!("{:?}", resource.resource.as_ref().unwrap().attributes[2].value);
                let metric = &resource.scope_metrics[0].metrics[0];
                let time = match &metric.data {
                    Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) => {
                        h.data_points[0].time_unix_nano
                    }
                    _ => panic!("histogram expected"),
                };
                let previous = last_time.insert(instance, time).unwrap_or(0);
                assert!(time > previous, "a pod's exports stay in order in its lane");
            }
        }
    }
}
