//! Errors of the simulation: the federated layer's, plus files of a run folder.

use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum SimError {
    #[error(transparent)]
    Fl(#[from] fedra_fl::FlError),
    #[error(transparent)]
    Config(#[from] fedra_fl::ConfigError),
    #[error(transparent)]
    Nn(#[from] fedra_nn::NnError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(
        "{} holds a run of a different experiment:\n{differences}\nchoose another --out, or delete the folder to start over",
        dir.display()
    )]
    DifferentExperiment { dir: PathBuf, differences: String },
    #[error("{} is not a fedra summary: {message}", path.display())]
    NotASummary { path: PathBuf, message: String },
    #[error("cannot start the worker pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_path_buf(),
        source,
    }
}
