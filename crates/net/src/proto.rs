//! The protocol's messages and service, generated at build time from
//! `proto/fedra/v1/federation.proto` (package `fedra.v1`).

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("fedra.v1");
