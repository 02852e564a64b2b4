//! The Tollgate node: everything one node does, as a library (the `tollgate` binary is a thin
//! command line over it, and tests embed it).
//!
//! Parts, in the order an export flows through them:
//! - [`receiver`]: OTLP/gRPC and OTLP/HTTP endpoints; decoding, size limits, the byte budget
//!   ([`budget`]).
//! - [`ingest`]: extraction with the rules crate, grouping by vnode, waiting for every owner.
//! - [`owner`]: one ractor actor per vnode that normalises, merges and samples, and writes.
//! - [`store`]: durable state behind our own trait, on sled with a group-commit writer.
//! - [`query`] and [`api`]: reading back over HTTP; [`fanout`]: the same across the cluster;
//!   [`runtime`]: pricing and rules in force, replicated through the cluster.
//! - [`peer`]: the node-to-node service (Raft, forwarded data, queries, hand-overs); [`wire`]:
//!   what travels on it; [`mover`]: taking vnodes over.
//! - [`server`]: starting and stopping all of it; [`config`]: options from file, environment and
//!   flags; [`cli`]: the command line; [`net`]: listening sockets; [`metrics`]: self-metric
//!   names; [`os`]: process settings; [`clock`], [`error`].

pub mod api;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod fanout;
pub mod ingest;
pub mod metrics;
pub mod mover;
pub mod net;
pub mod os;
pub mod owner;
pub mod peer;
pub mod query;
pub mod receiver;
pub mod runtime;
pub mod server;
pub mod store;
pub mod wire;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::NodeConfig;
pub use error::Error;
pub use server::{Endpoints, Node};
