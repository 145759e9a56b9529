//! The one error type of the data layer. Every variant names the file (or URL) it is about and
//! says what is wrong with it, so a user can fix their data without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong while finding, reading, decoding or downloading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder the loader needs is not there.
    #[error("{path}: not found ({what})")]
    NotFound { path: PathBuf, what: String },
    /// The operating system refused a read or write.
    /// (The cause is part of the message rather than a `source()`, so it is never printed twice.)
    #[error("{path}: I/O error: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A gzip stream is damaged (bad header, bad deflate data, CRC mismatch, truncated).
    #[error("{path}: corrupt or truncated gzip data: {cause}")]
    Gzip {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The bytes were read but are not what the format says they must be.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// A downloaded or cached file does not have the expected checksum.
    #[error(
        "{path}: {algorithm} mismatch (expected {expected}, got {actual}); the file is damaged or not the official one"
    )]
    Checksum {
        path: PathBuf,
        /// `SHA-256` or `MD5`.
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    /// An HTTP transfer failed.
    #[error("{url} -> {path}: download failed: {reason}")]
    Download {
        url: String,
        path: PathBuf,
        reason: String,
    },
    /// The options given to a loader make no sense for the data found at `path`.
    #[error("{path}: invalid options: {reason}")]
    Options { path: PathBuf, reason: String },
}

impl DataError {
    /// Wraps an I/O error, turning "no such file" into the clearer [`DataError::NotFound`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound {
                path,
                what: "no such file or directory".into(),
            }
        } else {
            DataError::Io {
                path,
                cause: source,
            }
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
