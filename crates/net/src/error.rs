//! Errors of the network layer.

use std::path::PathBuf;

/// What can go wrong setting up or running a networked federation.
#[derive(thiserror::Error, Debug)]
pub enum NetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("making certificates: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS set-up: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("address {addr}: {message}")]
    Address { addr: String, message: String },
    /// The server refused this client for who it is (certificate, allow-list): final, never
    /// retried.
    #[error("refused by the server: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error(transparent)]
    Fl(#[from] fedra_fl::FlError),
    #[error(transparent)]
    Config(#[from] fedra_fl::ConfigError),
    #[error(transparent)]
    Nn(#[from] fedra_nn::NnError),
    #[error("{0}")]
    Other(String),
}

/// `map_err` helper: an I/O error on `path`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::Io {
        path: path.to_path_buf(),
        source,
    }
}
