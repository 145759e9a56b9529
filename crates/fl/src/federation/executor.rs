//! Where a round's local training runs: the [`Executor`] a [`Federation`](super::Federation)
//! hands its jobs to (in-process threads in `fedra-sim`, remote clients in `fedra-net`), and the
//! reference executor that runs them one after the other on the calling thread.

use fedra_data::Dataset;
use fedra_nn::{EvalCounts, Model, ModelSpec, Trainer};

use super::{EVAL_BATCH, EVAL_MEMORY};
use crate::client::{FitConfig, FitResult};
use crate::error::FlError;

/// One unit of local training: start from `start`, train on `indices` as `config` says.
#[derive(Clone, Debug)]
pub struct FitJob<'a> {
    pub client: usize,
    pub indices: &'a [usize],
    pub start: Model,
    pub config: FitConfig,
}

/// Attempts at a round (the first sample, then new samples) before the run gives up on it.
pub const MAX_ROUND_ATTEMPTS: usize = 10;

/// Runs the local training of a round somewhere.
pub trait Executor {
    /// Run every job and return the results in job order. A client that could not deliver (a
    /// remote one that vanished or timed out) is an [`FlError::Dropped`] in its place: the
    /// round goes on without it. Any other error ends the run.
    fn fit(&self, jobs: Vec<FitJob<'_>>, data: &Dataset) -> Vec<Result<FitResult, FlError>>;

    /// Whether the clients keep their own state on their machines (over a network): FedBN's
    /// local layers (`model.bn = "local"`: they train from their own copy and return the
    /// server's values in its place; the round loop then neither stores the results' local
    /// layers nor measures their spread) and SCAFFOLD's control variates
    /// ([`Strategy::keep_controls_on_clients`]).
    fn clients_keep_local_state(&self) -> bool {
        false
    }

    /// The clients (of `clients`, by id) that can train now, in increasing order. In-process
    /// every client can; over a network, those connected (waiting for them if need be, and
    /// failing when they never come).
    fn available(&self, clients: usize) -> Result<Vec<usize>, FlError> {
        Ok((0..clients).collect())
    }

    /// Evaluate the model of `round` (rounds completed; 0 = the initial model) on the clients'
    /// own test data and return the sum of their counts; `model_for(client)` is the model that
    /// client evaluates (the global one; with FedBN, with the client's own normalisation
    /// layers). `Ok(None)`: this executor's clients do not evaluate (in-process clients hold no
    /// test data of their own; a server may be told to evaluate itself), and the round loop
    /// evaluates on the run's test set.
    fn evaluate(
        &self,
        round: usize,
        model_for: &dyn Fn(usize) -> Model,
    ) -> Result<Option<EvalCounts>, FlError> {
        let _ = (round, model_for);
        Ok(None)
    }
}

/// Run local training for `jobs` one after the other on the calling thread: the reference
/// executor (the simulation crate runs the same jobs in parallel).
pub struct SequentialExecutor {
    pub threads: usize,
}

impl Executor for SequentialExecutor {
    fn fit(&self, jobs: Vec<FitJob<'_>>, data: &Dataset) -> Vec<Result<FitResult, FlError>> {
        jobs.into_iter()
            .map(|job| run_job(job, data, self.threads))
            .collect()
    }
}

/// Train one job on this thread with a fresh trainer using `threads` GEMM threads.
pub fn run_job(job: FitJob<'_>, data: &Dataset, threads: usize) -> Result<FitResult, FlError> {
    let FitJob {
        client,
        indices,
        mut start,
        config,
    } = job;
    let batch = config.batch_size.min(indices.len()).max(1);
    let mut trainer = Trainer::new(start.spec(), batch).map_err(|e| match e {
        e @ fedra_nn::NnError::OutOfMemory { .. } => FlError::BatchTooBig {
            client,
            batch_size: config.batch_size,
            error: e,
        },
        e => e.into(),
    })?;
    trainer.set_threads(threads);
    crate::client::fit(client, indices, data, &mut start, &config, &mut trainer)
}

/// Evaluate `model` on all of `data` with `threads` GEMM threads, as counts that add up across
/// sites (what a client sends in federated evaluation).
pub fn evaluate_counts(
    model: &Model,
    data: &Dataset,
    threads: usize,
) -> Result<EvalCounts, FlError> {
    let mut trainer = eval_trainer(model.spec(), threads)?;
    let (stats, probs) = trainer.evaluate_with_probs(model, &data.features, &data.labels)?;
    Ok(EvalCounts::from_probs(
        &probs,
        &data.labels,
        model.spec().classes,
        stats.loss_sum,
        stats.correct,
    ))
}

/// Examples per forward pass when evaluating `spec`: [`EVAL_BATCH`], or fewer where that many
/// would not fit in [`EVAL_MEMORY`] (the cost of an example measured as the difference between
/// trainers for two examples and for one). Only the loss sum's rounding depends on it.
pub fn eval_batch(spec: &ModelSpec) -> Result<usize, FlError> {
    let one = Trainer::new(spec, 1)?.workspace_bytes();
    let per_example = Trainer::new(spec, 2)?.workspace_bytes().saturating_sub(one);
    Ok((EVAL_MEMORY.saturating_sub(one) / per_example.max(1)).clamp(1, EVAL_BATCH))
}

/// The trainer an evaluation runs on: [`eval_batch`] examples at a time, `threads` GEMM threads.
pub fn eval_trainer(spec: &ModelSpec, threads: usize) -> Result<Trainer, FlError> {
    let mut trainer = Trainer::new(spec, eval_batch(spec)?)?;
    trainer.set_threads(threads);
    Ok(trainer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_takes_fewer_examples_per_pass_only_where_500_would_not_fit() {
        for (name, input, classes) in [
            ("mnist-cnn", [1, 28, 28], 10),
            ("cifar-cnn-bn", [3, 32, 32], 10),
            ("resnet20", [3, 32, 32], 10),
            ("resnet18", [3, 28, 28], 5),
        ] {
            let spec = ModelSpec::by_name(name, input, classes).unwrap();
            assert_eq!(eval_batch(&spec).unwrap(), EVAL_BATCH, "{name}");
        }
        // An image folder at 224x224 through resnet18: 500 examples would need tens of GB.
        let spec = ModelSpec::by_name("resnet18", [3, 224, 224], 2).unwrap();
        let batch = eval_batch(&spec).unwrap();
        let bytes = Trainer::new(&spec, batch).unwrap().workspace_bytes();
        eprintln!(
            "resnet18 at 224x224: {batch} examples a pass, {} MB",
            bytes >> 20
        );
        assert!((8..EVAL_BATCH).contains(&batch), "{batch}");
        assert!(bytes <= EVAL_MEMORY, "{bytes}");
        let more = Trainer::new(&spec, batch * 2).unwrap().workspace_bytes();
        assert!(more > EVAL_MEMORY, "twice the batch would fit too: {more}");
    }
}
