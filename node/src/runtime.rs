//! The configuration in force (pricing and rules, each with its committed version), published
//! through a `watch` channel so owners and receivers use a new version from their next message
//! on, without restart.
//!
//! [`ConfigService`] is how documents are read and written. [`LocalConfig`] keeps them in the
//! node's own store (a single node); the cluster replaces it with a Raft-replicated service.

use crate::error::Error;
use crate::store::{durable, Op, Storage, StoreBatch};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{watch, Mutex};
use tollgate_rules::pricing::BUILT_IN_PRICING;
use tollgate_rules::{CompiledRules, PriceTable, PricingDocument, RulesConfig};

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

    /// From stored documents.
    pub fn from_documents(stored: &StoredDocuments) -> Result<RuntimeConfig, Error> {
        let built_in = RuntimeConfig::built_in();
        let rules = match &stored.rules {
            Some(versioned) => Arc::new(
                CompiledRules::new(versioned.document.clone(), versioned.version)
                    .map_err(|e| Error::Internal(format!("stored rules are invalid: {e}")))?,
            ),
            None => built_in.rules,
        };
        let pricing = match &stored.pricing {
            Some(versioned) => Arc::new(
                PriceTable::new(versioned.document.clone())
                    .map_err(|e| Error::Internal(format!("stored pricing is invalid: {e}")))?
                    .with_version(versioned.version),
            ),
            None => built_in.pricing,
        };
        Ok(RuntimeConfig { rules, pricing })
    }
}

/// A document and the version it was committed as.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Version, starting at 1 for the first written document (0 is the built-in one).
    pub version: u64,
    /// The document.
    pub document: T,
}

/// The written documents (absent ones are the built-in defaults).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredDocuments {
    /// Pricing, if ever written.
    pub pricing: Option<Versioned<PricingDocument>>,
    /// Rules, if ever written.
    pub rules: Option<Versioned<RulesConfig>>,
}

/// How current a read is (a single node is always current; a cluster follower may lag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freshness {
    /// Index of the last applied configuration change on this node.
    pub applied_index: u64,
    /// True when this node knows it has applied everything committed so far.
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

const META_KEY: &str = "config/documents";

/// Configuration kept in this node's store.
#[derive(Debug)]
pub struct LocalConfig {
    store: Arc<dyn Storage>,
    documents: Mutex<StoredDocuments>,
    sender: watch::Sender<Arc<RuntimeConfig>>,
}

impl LocalConfig {
    /// Loads the stored documents (or the built-in ones).
    pub fn load(store: Arc<dyn Storage>) -> Result<LocalConfig, Error> {
        let documents: StoredDocuments = match store.meta(META_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Internal(format!("stored configuration is corrupt: {e}")))?,
            None => StoredDocuments::default(),
        };
        let runtime = RuntimeConfig::from_documents(&documents)?;
        let (sender, _) = watch::channel(Arc::new(RuntimeConfig::built_in()));
        publish(&sender, runtime);
        Ok(LocalConfig { store, documents: Mutex::new(documents), sender })
    }

    async fn commit(&self, update: impl FnOnce(&mut StoredDocuments) -> u64) -> Result<u64, Error> {
        let mut documents = self.documents.lock().await;
        let mut next = documents.clone();
        let version = update(&mut next);
        let runtime = RuntimeConfig::from_documents(&next)?;
        let bytes = serde_json::to_vec(&next).map_err(|e| Error::Internal(e.to_string()))?;
        let mut batch = StoreBatch::default();
        batch.push(Op::Meta { key: META_KEY.into(), value: bytes });
        durable(self.store.commit(batch).await?).await?;
        *documents = next;
        publish(&self.sender, runtime);
        Ok(version)
    }
}

impl ConfigService for LocalConfig {
    fn watch(&self) -> watch::Receiver<Arc<RuntimeConfig>> {
        self.sender.subscribe()
    }

    fn set_pricing(&self, document: PricingDocument) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(async move {
            document.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            self.commit(|documents| {
                let version = documents.pricing.as_ref().map_or(0, |v| v.version) + 1;
                documents.pricing = Some(Versioned { version, document });
                version
            })
            .await
        })
    }

    fn set_rules(&self, document: RulesConfig) -> BoxFuture<'_, Result<u64, Error>> {
        Box::pin(async move {
            document.validate().map_err(|e| Error::InvalidArgument(e.to_string()))?;
            self.commit(|documents| {
                let version = documents.rules.as_ref().map_or(0, |v| v.version) + 1;
                documents.rules = Some(Versioned { version, document });
                version
            })
            .await
        })
    }

    fn freshness(&self) -> Freshness {
        Freshness { applied_index: 0, up_to_date: true }
    }
}
