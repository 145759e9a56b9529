//! In-process simulation of a federated run: clients of a round train in parallel, deterministically
//! whatever the number of threads, with checkpoint and resume.

pub mod checkpoint;
pub mod error;
pub mod executor;
pub mod run;

pub use error::SimError;
pub use executor::ParallelExecutor;
pub use run::{
    NOISE_KEY_FILE, RUN_FILES, Run, RunFolder, Summary, check_same_experiment, clear_run_files,
    finished_summary, metrics_csv, peak_rss_mib, write_atomic,
};
