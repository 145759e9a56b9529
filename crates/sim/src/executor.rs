//! Runs a round's local training in parallel on a rayon pool: one client per worker, kernels
//! single-threaded inside a client unless the round has only one job (the centralised baseline),
//! which then gets every thread. Results come back in job order, so aggregation does not depend
//! on which worker finished first.

use rayon::prelude::*;

use fedra_data::Dataset;
use fedra_fl::{Executor, FitJob, FitResult, FlError, run_job};

/// An executor over a private pool of `threads` workers.
pub struct ParallelExecutor {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl ParallelExecutor {
    pub fn new(threads: usize) -> Result<ParallelExecutor, rayon::ThreadPoolBuildError> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fedra-client-{i}"))
            .build()?;
        Ok(ParallelExecutor { pool, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl Executor for ParallelExecutor {
    fn fit(&self, jobs: Vec<FitJob<'_>>, data: &Dataset) -> Vec<Result<FitResult, FlError>> {
        let per_job = if jobs.len() == 1 { self.threads } else { 1 };
        self.pool.install(|| {
            jobs.into_par_iter()
                .with_max_len(1)
                .map(|job| run_job(job, data, per_job))
                .collect()
        })
    }
}
