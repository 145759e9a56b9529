//! The error type of `fedra-nn`: every failure a caller can provoke (bad spec or TOML field, wrong
//! input shape, out-of-range label, non-finite loss, malformed safetensors) is reported here with
//! the field, tensor or file it concerns, never as a panic.

use std::path::PathBuf;

/// Everything that can go wrong in `fedra-nn`.
#[derive(thiserror::Error, Debug)]
pub enum NnError {
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("model spec: field `{field}`: {msg}")]
    Spec { field: String, msg: String },
    #[error("model spec TOML: {0}")]
    Toml(String),
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("label {label} of example {index} is out of range (model has {classes} classes)")]
    Label {
        index: usize,
        label: u16,
        classes: usize,
    },
    #[error(
        "buffers for batches of {batch} examples do not fit in memory ({:.1} GB asked for one \
         of them); use smaller batches",
        *bytes as f64 / 1e9
    )]
    OutOfMemory { batch: usize, bytes: u128 },
    #[error("batch of {batch} examples exceeds this trainer's max_batch {max}")]
    BatchTooLarge { batch: usize, max: usize },
    #[error(
        "the model ({model:?}) does not have the spec this trainer was built for ({trainer:?})"
    )]
    SpecMismatch { trainer: String, model: String },
    #[error("non-finite value: {what}")]
    NonFinite { what: String },
    #[error("SGD config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("safetensors {origin}{}: {msg}", tensor.as_ref().map(|t| format!(", tensor {t}")).unwrap_or_default())]
    Safetensors {
        origin: String,
        tensor: Option<String>,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn spec_err(field: impl Into<String>, msg: impl Into<String>) -> NnError {
    NnError::Spec {
        field: field.into(),
        msg: msg.into(),
    }
}
