//! Queries across the cluster (SPEC §6): every member folds what it stores, partial results
//! merge exactly (minutes of one series can sit on two nodes after a vnode moved), and the
//! answer says which members could not be asked.
//!
//! Data of departed nodes is held by a member (after a drain). Which member answers for it is
//! read from the applied state of the node asking, once per query, and sent along with the
//! query: a query sees the leaving node's data or its copy, never both and never neither.

use crate::error::Error;
use crate::query::{LogPage, LogQuery, QueryEngine, ServiceView, MAX_LOG_PAGE_BYTES};
use crate::store::EntityRecord;
use crate::wire;
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_cluster::transport::TransportError;
use tollgate_cluster::{Cluster, ClusterState, NodeId};
use tollgate_proto::peer::{QueryKind, QueryRequest};
use tollgate_rules::{MetricQuery, MetricResult, Partial};
use tracing::warn;

/// A cluster-wide answer and the members that did not contribute.
#[derive(Debug)]
pub struct Answer<T> {
    /// The merged answer.
    pub value: T,
    /// Names of members that could not be asked: the answer may miss their data.
    pub missing: Vec<String>,
}

/// How long a member that could not be reached by the last query has to say who it is before
/// it is asked the next one.
const SUSPECT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Fans queries out to every member.
#[derive(Clone, Debug)]
pub struct Fanout {
    local: QueryEngine,
    cluster: Arc<Cluster>,
    /// Members the last query could not reach. A query waits for a member's answer up to 30 s
    /// (queries do real work), and a member that is paused or cut off by a partition never
    /// answers: every read waited about 20 s before answering without it. Such a member is first
    /// asked who it is ([`SUSPECT_PROBE_TIMEOUT`]); without an answer the read goes on without
    /// it, and once it answers a query it is asked as any other.
    suspects: Arc<Mutex<HashSet<NodeId>>>,
}

impl Fanout {
    /// Queries over `local` and the other members of `cluster`.
    pub fn new(local: QueryEngine, cluster: Arc<Cluster>) -> Fanout {
        Fanout { local, cluster, suspects: Arc::default() }
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashSet<NodeId>> {
        self.suspects.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node's query engine.
    pub fn local(&self) -> &QueryEngine {
        &self.local
    }

    /// The cluster state a read goes by. Refused on a node that left the cluster: a member holds
    /// its data and answers for it, and it no longer follows the cluster (its answers counted its
    /// own data beside that member's copy).
    fn state(&self) -> Result<ClusterState, Error> {
        let state = self.cluster.state();
        if state.departed.contains(&self.cluster.id) {
            return Err(Error::Unavailable(format!(
                "this node left the cluster: its data is held by another member; query a member ({})",
                state.member_names()
            )));
        }
        Ok(state)
    }

    /// Refuses, as [`Fanout::state`] does, on a node that left the cluster: configuration reads
    /// (it no longer follows the cluster's changes) and writes go to a member.
    pub fn refuse_if_departed(&self) -> Result<(), Error> {
        self.state().map(|_| ())
    }

    async fn remote<T: DeserializeOwned>(
        &self,
        state: &ClusterState,
        kind: QueryKind,
        payload: Vec<u8>,
    ) -> Result<(Vec<T>, Vec<String>), Error> {
        let me = self.cluster.id;
        let suspects = self.suspects().clone();
        let calls = state.nodes.iter().filter(|(id, _)| **id != me).map(|(id, node)| {
            let transport = Arc::clone(self.cluster.transport());
            let suspect = suspects.contains(id);
            let id = *id;
            let request = QueryRequest {
                kind: kind as i32,
                payload: payload.clone(),
                holders: state.held_by_member(id),
                target: id,
                max_page_bytes: MAX_LOG_PAGE_BYTES as u64,
            };
            let node = node.clone();
            async move {
                if suspect {
                    let addr = &node.cluster_addr;
                    match tokio::time::timeout(SUSPECT_PROBE_TIMEOUT, transport.identify(addr)).await {
                        // Any answer, an error included, is a member that answers.
                        Ok(Ok(_) | Err(TransportError::Refused { .. } | TransportError::Backpressure { .. })) => {}
                        Ok(Err(error)) => return (id, node.name, Err(error)),
                        Err(_) => {
                            let reason = format!(
                                "it did not answer the last query, and not now within {SUSPECT_PROBE_TIMEOUT:?}"
                            );
                            return (id, node.name, Err(TransportError::Unreachable { addr: addr.clone(), reason }));
                        }
                    }
                }
                let result = transport.query(&node.cluster_addr, request).await;
                (id, node.name, result)
            }
        });
        let answers = futures_util::future::join_all(calls).await;
        {
            let mut suspects = self.suspects();
            // Members that left are forgotten.
            suspects.retain(|id| state.nodes.contains_key(id));
            for (id, _, result) in &answers {
                match result {
                    Err(TransportError::Unreachable { .. }) => suspects.insert(*id),
                    _ => suspects.remove(id),
                };
            }
        }
        let mut values = Vec::new();
        let mut missing = Vec::new();
        for (_, name, result) in answers {
            let decoded = match result {
                // The query itself is refused (its answer would be too large, say): so it is
                // here, whatever the other members say.
                Err(TransportError::Refused { code, message, .. }) if code == "InvalidArgument" => {
                    return Err(Error::InvalidArgument(message));
                }
                Err(error) => Err(error.to_string()),
                Ok(response) => wire::decode::<T>("query answer", &response.payload),
            };
            match decoded {
                Ok(value) => values.push(value),
                Err(error) => {
                    warn!(node = %name, %error, "a member did not answer a query");
                    missing.push(name);
                }
            }
        }
        Ok((values, missing))
    }

    /// A metric over every member's data.
    pub async fn metric(&self, query: MetricQuery) -> Result<Answer<MetricResult>, Error> {
        let state = self.state()?;
        let (remote, missing) = self.remote::<Partial>(&state, QueryKind::Metric, wire::encode_json(&query)).await?;
        let engine = self.local.clone();
        let local_query = query.clone();
        let holders = state.held_by_member(self.cluster.id);
        let mut partial = self.local.run(move || engine.partial_held(&local_query, &holders)).await?;
        for other in &remote {
            partial.merge(other);
            self.local.check_answer(&query, &partial)?;
        }
        Ok(Answer { value: partial.finish(&query), missing })
    }

    /// A page of kept logs over every member's data.
    pub async fn logs(&self, query: LogQuery) -> Result<Answer<LogPage>, Error> {
        let state = self.state()?;
        let engine = self.local.clone();
        let local_query = query.clone();
        let holders = state.held_by_member(self.cluster.id);
        let local = self.local.run(move || engine.logs_held(&local_query, &holders, MAX_LOG_PAGE_BYTES)).await?;
        let (remote, missing) = self.remote::<LogPage>(&state, QueryKind::Logs, wire::encode(&query)).await?;
        let page = QueryEngine::merge_log_pages(std::iter::once(local).chain(remote), query.limit, MAX_LOG_PAGE_BYTES);
        Ok(Answer { value: page, missing })
    }

    /// Services and instances over every member's data.
    pub async fn services(&self) -> Result<Answer<Vec<ServiceView>>, Error> {
        let state = self.state()?;
        let engine = self.local.clone();
        let holders = state.held_by_member(self.cluster.id);
        let local = self.local.run(move || engine.entities_held(&holders)).await?;
        let (remote, missing) = self.remote::<Vec<EntityRecord>>(&state, QueryKind::Entities, Vec::new()).await?;
        let all = local.into_iter().chain(remote.into_iter().flatten());
        Ok(Answer { value: QueryEngine::services_of(all), missing })
    }
}
