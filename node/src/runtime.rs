//! The configuration in force (pricing and rules, each with its committed version), published
//! through a `watch` channel so owners and receivers use a new version from their next message
//! on, without restart.
//!
//! Documents are part of the Raft-replicated cluster state: a write goes to the leader (from any
//! node), is committed by a majority, and every node applies it ([`ClusterConfig`]).

use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_cluster::{Cluster, ClusterError, Command, CommandResponse, Versioned};
use tollgate_rules::pricing::BUILT_IN_PRICING;
use tollgate_rules::{CompiledRules, PriceTable, PricingDocument, RulesConfig};
use tracing::{error, info};

/// The configuration every component reads.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Rules (routing, normalisation, sampling, catalogue) with their version.
    pub rules: Arc<CompiledRules>,
    /// Prices with their version.
    pub pricing: Arc<PriceTable>,
}

/// Publishes a configuration: its versions become self-metrics, then every component sees it.
pub fn publish(sender: &watch::Sender<Arc<RuntimeConfig>>, runtime: RuntimeConfig) {
    metrics::gauge!(crate::metrics::CONFIG_VERSION, "document" => "pricing").set(runtime.pricing.version() as f64);
    metrics::gauge!(crate::metrics::CONFIG_VERSION, "document" => "rules").set(runtime.rules.version as f64);
    sender.send_replace(Arc::new(runtime));
}

impl RuntimeConfig {
    /// The built-in rules and SkyWalking's shipped pricing, both at version 0.
    pub fn built_in() -> RuntimeConfig {
        RuntimeConfig {
            rules: Arc::new(CompiledRules::default()),
            pricing: Arc::new(PriceTable::parse(BUILT_IN_PRICING).expect("the built-in pricing is valid")),
        }
    }

    /// From committed documents (absent ones are the built-in defaults).
    pub fn from_documents(
        pricing: Option<&Versioned<PricingDocument>>,
        rules: Option<&Versioned<RulesConfig>>,
    ) -> Result<RuntimeConfig, Error> {
        let built_in = RuntimeConfig::built_in();
        let rules = match rules {
            Some(versioned) => Arc::new(
                CompiledRules::new(versioned.document.clone(), versioned.version)
                    .map_err(|e| Error::Internal(format!("committed rules are invalid: {e}")))?,
            ),
            None => built_in.rules,
        };
        let pricing = match pricing {
            Some(versioned) => Arc::new(
                PriceTable::new(versioned.document.clone())
                    .map_err(|e| Error::Internal(format!("committed pricing is invalid: {e}")))?
                    .with_version(versioned.version),
            ),
            None => built_in.pricing,
        };
        Ok(RuntimeConfig { rules, pricing })
    }
}

/// How current a read is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    /// Index of the last configuration change applied on this node.
    pub applied_index: Option<u64>,
    /// The leader this node follows, if it knows one.
    pub leader: Option<String>,
    /// False when this node is not in touch with a leader: it may have missed changes (it is
    /// cut off from the majority, or an election is running).
    pub up_to_date: bool,
}

/// A boxed future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads and writes configuration documents.
pub trait ConfigService: Send + Sync + std::fmt::Debug + 'static {
    /// The configuration in force, as it changes.
    fn watch(&self) -> watch::Receiver<Arc<RuntimeConfig>>;

    /// Validates, commits and applies a pricing document; returns its version.
    fn set_pricing(&self, document: PricingDocument) -> BoxFuture<'_, Result<u64, Error>>;

    /// Validates, commits and applies a rules document; returns its version.
    fn set_rules(&self, document: RulesConfig) -> BoxFuture<'_, Result<u64, Error>>;

    /// How current this node's configuration is.
    fn freshness(&self) -> Freshness;
}

/// Maps a cluster failure to the API's error taxonomy.
pub fn cluster_error(error: ClusterError) -> Error {
    match error {
        ClusterError::NoQuorum(message) => Error::Unavailable(message),
        ClusterError::Refused(message) => Error::Conflict(message),
        ClusterError::Failed(message) => Error::Internal(message),
    }
}

/// Configuration replicated through the cluster's Raft state.
#[derive(Debug)]
pub struct ClusterConfig {
    cluster: Arc<Cluster>,
    sender: watch::Sender<Arc<RuntimeConfig>>,
    follower: JoinHandle<()>,
}

impl Drop for ClusterConfig {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl ClusterConfig {
    /// Follows the documents of the applied cluster state.
    pub fn start(cluster: Arc<Cluster>) -> Result<ClusterConfig, Error> {
        let state = cluster.state();
        let runtime = RuntimeConfig::from_documents(state.pricing.as_ref(), state.rules.as_ref())?;
        let (sender, _) = watch::channel(Arc::new(RuntimeConfig::built_in()));
        publish(&sender, runtime);
        let follower = tokio::spawn(follow(cluster.applied(), sender.clone()));
        Ok(ClusterConfig { cluster, sender, follower })
    }

    async fn commit(&self, command: Command, applied: impl Fn(&RuntimeConfig) -> u64) -> Result<u64, Error> {
        let version = match self.cluster.write(command).await.map_err(cluster_error)? {
            CommandResponse::Applied { version } => version,
            CommandResponse::Refused { reason } => return Err(Error::InvalidArgument(reason)),
        };
        // Answer once this node applies it too, so a read after the write sees it here.
        let mut receiver = self.sender.subscribe();
        let waited = tokio::select! {
            waited = tokio::time::timeout(Duration::from_secs(30), receiver.wait_for(|r| applied(r) >= version)) => waited,
            // Its store failed while applying, say: this node will never apply the version.
            error = self.cluster.stopped() => {
                return Err(Error::Internal(format!("version {version} was committed, but raft stopped on this node: {error}")));
            }
        };
        match waited {
            Ok(Ok(_)) => Ok(version),
            _ => {
                Err(Error::Unavailable(format!("version {version} was committed but is not applied on this node yet")))
            }
        }
    }
}

async fn follow(
    mut applied: watch::Receiver<Arc<tollgate_cluster::raft_store::AppliedState>>,
    sender: watch::Sender<Arc<RuntimeConfig>>,
) {
    loop {
        if applied.changed().await.is_err() {
            return;
        }
        let state = Arc::clone(&applied.borrow_and_update());
        let current = Arc::clone(&sender.borrow());
        let pricing_version = state.state.pricing.as_ref().map_or(0, |v| v.version);
        let rules_version = state.state.rules.as_ref().map_or(0, |v| v.version);
        if pricing_version == current.pricing.version() && rules_version == current.rules.version {
            continue;
        }
        match RuntimeConfig::from_documents(state.state.pricing.as_ref(), state.state.rules.as_ref()) {
            Ok(runtime) => {
                info!(pricing = pricing_version, rules = rules_version, "configuration applied");
                publish(&sender, runtime);
            }
            Err(e) => error!(error = %e, "a committed configuration could not be applied"),
        }
    }
}

impl ConfigService for ClusterConfig {
    fn watch(&self) -> watch::Receiver<Arc<RuntimeConfig>> {
        self.sender.subscribe()
    }

    fn set_pricing(&self, document: PricingDocument) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(async move {
            document.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            self.commit(Command::SetPricing(document), |r| r.pricing.version()).await
        })
    }

    fn set_rules(&self, document: RulesConfig) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(async move {
            document.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            self.commit(Command::SetRules(document), |r| r.rules.version).await
        })
    }

    fn freshness(&self) -> Freshness {
        let status = self.cluster.status();
        // The leader this node is in touch with: one it only remembers is not followed.
        let leader = status.leader.and(self.cluster.leader()).map(|(_, node)| node.name);
        Freshness { applied_index: status.applied_index, up_to_date: status.in_contact, leader }
    }
}
