//! fedra over the network. The server runs the same round loop as `fedra run` with a
//! [`server::NetExecutor`] in place of in-process threads; each client (`fedra join`) keeps one
//! gRPC session open, trains the tasks it is sent with the same client code as the simulation,
//! and returns its update. TLS is on and mutual (off only with `--insecure`, on loopback): a
//! client's identity is the one in its certificate. The protocol is `proto/fedra/v1/federation.proto`.
//!
//! Modules by job: [`proto`] (the generated messages and service), [`wire`] (weights to
//! chunks and back, with every check a decoder of untrusted bytes needs), [`pki`] (a
//! federation's certificates, TLS settings, identities), [`metered`] (bytes on the wire),
//! [`local_state`] (FedBN's layers on the client's disk),
//! [`server`] and [`client`].

pub mod client;
pub mod controls;
pub mod error;
pub mod local_state;
pub mod metered;
pub mod pki;
pub mod proto;
pub mod server;
pub mod wire;

pub use error::NetError;

/// The protocol version this build speaks (`Hello.protocol`, `Welcome.protocol`).
pub const PROTOCOL: u32 = 3;

/// Largest gRPC message either side accepts: a weights chunk ([`wire::CHUNK_VALUES`] f32 values)
/// plus room for the experiment's TOML and headers. Set explicitly, not left to tonic's default.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;
