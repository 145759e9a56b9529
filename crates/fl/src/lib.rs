//! Federated learning proper: the client (local training on its own indices), strategies that
//! configure a round and aggregate its results (FedAvg and friends), the round loop, data sharing
//! and weight-divergence metrics.
//!
//! This crate knows nothing of threads or sockets: `fedra-sim` runs clients in-process and a
//! transport crate runs them across machines, both through the same types.

pub mod client;
pub mod config;
pub mod divergence;
pub mod error;
pub mod federation;
pub mod privacy;
pub mod seed;
pub mod share;
pub mod strategy;
pub mod sweep;

pub use client::{CENTRAL_ID, FitConfig, FitResult, Steering, fit};
pub use config::{ConfigError, ExperimentConfig};
pub use divergence::{Divergence, statistics_spread, weight_divergence};
pub use error::FlError;
pub use federation::{
    Executor, Federation, FitJob, LocalState, RoundMetrics, SequentialExecutor, run_job,
};
pub use share::ShareConfig;
pub use strategy::{AggregationScope, Strategy, sample_clients, weighted_mean};
