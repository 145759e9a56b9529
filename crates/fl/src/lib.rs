//! Federated learning proper: the client (local training on its own indices), strategies that
//! configure a round and aggregate its results (FedAvg and friends), the round loop, data sharing
//! and weight-divergence metrics.
//!
//! This crate knows nothing of threads or sockets: `fedra-sim` runs clients in-process and a
//! transport crate runs them across machines, both through the same types.
