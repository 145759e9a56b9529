//! The round loop. A [`Federation`] owns the global model, the strategy and the per-client state
//! that must survive between rounds (FedBN's local normalisation layers); each round it builds
//! one [`FitJob`] per sampled client (plus one for the SGD twin), hands them to an [`Executor`]
//! (in-process threads in `fedra-sim`, remote clients over a network elsewhere), aggregates the
//! results in client-id order and evaluates.
//!
//! Here: the run's state and one round (sample, train, aggregate); setting a run up (partition,
//! initial model, warm-up) in `setup`; evaluating in `evaluate`; the [`Executor`] interface and
//! the reference executor in `executor`; selecting tensors by name (`model.freeze`,
//! `model.freeze_statistics`) and packing FedBN's local layers in `select`.

mod evaluate;
mod executor;
mod select;
mod setup;

pub use executor::{
    Executor, FitJob, MAX_ROUND_ATTEMPTS, SequentialExecutor, eval_batch, eval_trainer,
    evaluate_counts, run_job,
};
pub use select::{compile_patterns, frozen_ranges, frozen_statistics, gather, scatter};

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use fedra_data::partition::Partition;
use fedra_data::{Dataset, TrainTest};
use fedra_nn::{ClinicalMetrics, Model, ModelSpec, SgdConfig, TensorKind};

use crate::client::{CENTRAL_ID, FitConfig, FitResult};
use crate::config::AttackKind;
use crate::config::ExperimentConfig;
use crate::divergence::{Divergence, statistics_spread};
use crate::error::FlError;
use crate::privacy::{NoiseKey, NoiseSource, Randomness, poisson_sample, private_mean};
use crate::seed::{Purpose, derive};
use crate::strategy::{AggregationScope, Strategy, clip_update, resample_clients};

/// Examples per forward pass when evaluating, when they fit in [`EVAL_MEMORY`].
const EVAL_BATCH: usize = 500;

/// Bytes an evaluation's trainer may hold. 500 examples of every built-in model on the study's
/// and MedMNIST's images fit (resnet20 on 32x32: ~2 GB); larger images (an image folder at
/// 224x224 through resnet18: ~50 MB an example) take fewer examples per pass instead of
/// exhausting the machine's memory at the first evaluation.
const EVAL_MEMORY: usize = 4 << 30;

/// The "round" coordinate of the warm-up's seeds, apart from every real round.
const WARMUP_ROUND: usize = usize::MAX - 1;

/// Normalisation tensors a FedBN client keeps for itself.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalState {
    pub params: Vec<f32>,
    pub buffers: Vec<f32>,
}

/// What one evaluated round measured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundMetrics {
    /// Rounds completed (0 = the initial model).
    pub round: usize,
    /// Learning rate used in this round (the first round's for round 0).
    pub lr: f32,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Sample-weighted mean of the clients' last-epoch training losses (none at round 0).
    pub train_loss: Option<f64>,
    /// Wall time of the rounds since the previous evaluated row, training and evaluation.
    pub seconds: f64,
    /// Training examples processed by clients since the previous row.
    pub examples: usize,
    pub sgd_test_accuracy: Option<f64>,
    pub divergence: Vec<Divergence>,
    /// ROC AUC, balanced accuracy, per-class sensitivity and specificity on the test set.
    #[serde(default)]
    pub clinical: ClinicalMetrics,
    /// With `[privacy]`: the epsilon spent so far (at `privacy.delta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Spread of the BatchNorm running means the clients of this row's round returned
    /// ([`statistics_spread`]); none at round 0 and for models without running statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_spread: Option<f64>,
    /// Bytes the server sent to clients since the run began, up to this row ([`Traffic`]).
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes the server received from clients since the run began, up to this row.
    #[serde(default)]
    pub bytes_received: u64,
}

/// What a run's aggregated rounds moved, in the tensors `fedra serve` sends: the whole model
/// (parameters and buffers) as f32 to every client whose update the round aggregated and back,
/// SCAFFOLD's control down with each task that carries one (from round 2: c - c_i in-process,
/// c over a network; the server computes the change of c from the update, so nothing extra
/// comes back, where the paper's clients upload the change of c_i), and
/// with data sharing the examples of G each client received (f32 features and a 4-byte label),
/// counted before round 1. It is what the algorithm costs, not a wire meter: protocol and TLS
/// framing (0.3%, measured in the README), models sent to clients whose results were lost or
/// came too late, rounds sampled again and evaluation tasks are not included (`fedra serve`
/// logs the bytes on the wire per client and round).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// A federated run in progress.
pub struct Federation {
    pub config: ExperimentConfig,
    pub spec: ModelSpec,
    pub partition: Partition,
    /// With data sharing: the clients' own data before the share of G was mixed in.
    pub before_share: Option<Partition>,
    pub global: Model,
    pub twin: Option<Model>,
    pub strategy: Box<dyn Strategy>,
    pub local: BTreeMap<usize, LocalState>,
    pub history: Vec<RoundMetrics>,
    pub rounds_done: usize,
    scope: AggregationScope,
    local_params: Vec<Range<usize>>,
    local_buffers: Vec<Range<usize>>,
    /// Parameters `model.freeze` keeps fixed.
    frozen: Vec<Range<usize>>,
    /// BatchNorm layers `model.freeze_statistics` keeps fixed.
    frozen_statistics: Vec<String>,
    all_indices: Vec<usize>,
    threads: usize,
    /// Wall time of the rounds run since the last evaluated row (it goes into the next row's
    /// `seconds`); a checkpoint carries it.
    pub pending_seconds: f64,
    /// Training examples processed since the last evaluated row (the next row's `examples`).
    pub pending_examples: usize,
    /// Bytes sent and received since the run began; a checkpoint carries them.
    pub traffic: Traffic,
    /// With `privacy.noise = "secret"`: the key its rounds draw from ([`Federation::set_noise_key`]).
    noise_key: Option<NoiseKey>,
}

/// The parameters a run's strategy aggregates (ranges of the parameter vector): those its
/// BatchNorm policy shares, less the `frozen` ones (which never change on any client: the
/// server leaves them as they are, as an average of equal values need not be exactly that value
/// in floating point).
pub fn aggregated_params(
    model: &Model,
    config: &ExperimentConfig,
    frozen: &[Range<usize>],
) -> Vec<Range<usize>> {
    let mut params =
        AggregationScope::new(model, config.model.bn, config.model.average_buffers).params;
    params.retain(|r| !frozen.contains(r));
    params
}

/// The model spec a configuration names: a built-in name, or a TOML spec file.
pub fn model_spec(config: &ExperimentConfig, train: &Dataset) -> Result<ModelSpec, FlError> {
    let name = &config.model.name;
    let spec = if name.ends_with(".toml") {
        let text = std::fs::read_to_string(name)
            .map_err(|e| FlError::State(format!("cannot read model spec {name}: {e}")))?;
        ModelSpec::from_toml_str(&text)?
    } else {
        ModelSpec::by_name(name, train.shape, train.num_classes())?
    };
    if spec.input != train.shape {
        return Err(FlError::State(format!(
            "model {} expects input {:?}, dataset {} has rows of {:?}",
            spec.name, spec.input, train.name, train.shape
        )));
    }
    Ok(spec)
}

impl Federation {
    /// The key a `privacy.noise = "secret"` run draws its sampling and noise from (the run
    /// folder keeps it while the run lasts; a checkpoint does not).
    pub fn set_noise_key(&mut self, key: NoiseKey) {
        self.noise_key = Some(key);
    }

    /// Where this private run's randomness comes from; a secret run without its key is an error.
    fn privacy_randomness(&self) -> Result<Randomness, FlError> {
        let noise = self.config.privacy.as_ref().and_then(|p| p.noise);
        match (noise, &self.noise_key) {
            (Some(NoiseSource::Secret), Some(key)) => Ok(Randomness::Secret(key.clone())),
            (Some(NoiseSource::Secret), None) => Err(FlError::State(
                "privacy.noise = \"secret\" but the run has no noise key (a run folder makes \
                 one when the run starts)"
                    .into(),
            )),
            _ => Ok(Randomness::Seeded(self.config.run.seed)),
        }
    }

    /// Lengths of one client's packed local (FedBN) parameters and buffers.
    pub fn local_lengths(&self) -> (usize, usize) {
        let len = |ranges: &[Range<usize>]| ranges.iter().map(|r| r.len()).sum();
        (len(&self.local_params), len(&self.local_buffers))
    }

    /// Give the strategy back its server-optimiser state (from a checkpoint); state sized for
    /// another model than this run's aggregation scope is an error.
    pub fn restore_strategy(&mut self, state: Vec<(String, Vec<f32>)>) -> Result<(), FlError> {
        self.strategy.restore(state, &self.scope)
    }

    /// Whether this run is the centralised SGD baseline rather than a federation.
    pub fn is_central(&self) -> bool {
        self.config.strategy.name == "sgd"
    }

    /// Batch size of centralised runs (the baseline and the twin): 10 x B, as in the study.
    pub fn central_batch(&self) -> usize {
        self.config.train.batch_size * 10
    }

    fn fit_config(&self, round: usize, batch_size: usize) -> FitConfig {
        let t = &self.config.train;
        FitConfig {
            round,
            run_seed: self.config.run.seed,
            local_epochs: t.local_epochs,
            batch_size,
            sgd: SgdConfig {
                lr: self.config.lr_at(round),
                momentum: t.momentum,
                weight_decay: t.weight_decay,
            },
            bn: self.config.model.bn,
            prox_mu: self.strategy.prox_mu(),
            control: None,
            frozen: self.frozen.clone(),
            frozen_statistics: self.frozen_statistics.clone(),
            flip_labels: false,
        }
    }

    /// Parameters trained (not frozen) and parameters in all.
    pub fn trainable_params(&self) -> (usize, usize) {
        let all = self.global.params().len();
        (
            all - self.frozen.iter().map(|r| r.len()).sum::<usize>(),
            all,
        )
    }

    /// Run one round; returns the metrics row if the round was evaluated.
    pub fn run_round(
        &mut self,
        data: &TrainTest,
        executor: &dyn Executor,
    ) -> Result<Option<RoundMetrics>, FlError> {
        self.evaluate_initial(data, executor)?;
        let started = Instant::now();
        let round = self.rounds_done;
        let (results, twin_result) = if self.is_central() {
            let job = FitJob {
                client: CENTRAL_ID,
                indices: &self.all_indices,
                start: self.global.clone(),
                config: self.fit_config(round, self.central_batch()),
            };
            let result = executor.fit(vec![job], &data.train).pop();
            let result = result.ok_or(FlError::NoResults { round })??;
            (vec![result], None)
        } else {
            self.strategy
                .keep_controls_on_clients(executor.clients_keep_local_state())?;
            self.fit_clients(round, data, executor)?
        };
        let mut results = results;
        self.corrupt(round, &mut results);
        if let Some(max_norm) = self.config.strategy.clip_update_norm {
            for r in &mut results {
                let norm = clip_update(
                    self.global.params(),
                    &mut r.params,
                    &self.scope.params,
                    max_norm,
                );
                if norm > f64::from(max_norm) {
                    tracing::debug!(
                        round,
                        client = r.client,
                        norm,
                        "update clipped to {max_norm}"
                    );
                }
            }
        }
        let examples = results
            .iter()
            .fold(0usize, |n, r| n.saturating_add(r.examples_seen));
        if !self.is_central() {
            let each = 4 * (self.global.params().len() + self.global.buffers().len()) as u64;
            let both = each.saturating_mul(results.len() as u64);
            // The corrections the tasks carried (the strategy's state is still the one the
            // round's tasks were made from: it changes in `aggregate` below).
            let steered = results
                .iter()
                .filter(|r| self.strategy.has_control(r.client))
                .count() as u64;
            let controls = steered.saturating_mul(4 * self.global.params().len() as u64);
            self.traffic.sent = self
                .traffic
                .sent
                .saturating_add(both)
                .saturating_add(controls);
            self.traffic.received = self.traffic.received.saturating_add(both);
        }
        let remote_layers = executor.clients_keep_local_state()
            && (!self.local_params.is_empty() || !self.local_buffers.is_empty());
        let buffers: Vec<&[f32]> = results.iter().map(|r| r.buffers.as_slice()).collect();
        let bn_spread = if remote_layers {
            None
        } else {
            statistics_spread(&self.global, &buffers)
        };
        let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
        // A private round may sample no client at all.
        let train_loss = (total > 0.0).then(|| {
            results
                .iter()
                .map(|r| r.train_loss * r.num_examples as f64)
                .sum::<f64>()
                / total
        });
        let private;
        let aggregated: &[FitResult] = match &self.config.privacy {
            Some(privacy) => {
                let expected = self.config.train.fraction * self.partition.clients.len() as f64;
                let (mean, clipped) = private_mean(
                    &self.global,
                    &results,
                    &self.scope,
                    privacy,
                    expected,
                    round,
                    &self.privacy_randomness()?,
                );
                tracing::debug!(
                    round,
                    "private mean of {} updates ({clipped} clipped to {})",
                    results.len(),
                    privacy.clip
                );
                private = [mean];
                &private
            }
            None => &results,
        };
        self.strategy
            .aggregate(round, &mut self.global, aggregated, &self.scope)?;
        // Client updates were checked finite; a server step (FedAvgM, FedAdam) can still
        // overflow, and the error must name the strategy, not next round's clients.
        if let Some(t) = self.global.tensors().iter().find(|t| {
            let values = match t.kind {
                TensorKind::Param => self.global.params(),
                TensorKind::Buffer => self.global.buffers(),
            };
            values[t.offset..t.offset + t.len]
                .iter()
                .any(|v| !v.is_finite())
        }) {
            return Err(FlError::NonFiniteGlobal {
                round,
                strategy: self.config.strategy.name.clone(),
                tensor: t.name.clone(),
            });
        }
        if (!self.local_params.is_empty() || !self.local_buffers.is_empty()) && !remote_layers {
            for r in &results {
                self.local.insert(
                    r.client,
                    LocalState {
                        params: gather(&r.params, &self.local_params),
                        buffers: gather(&r.buffers, &self.local_buffers),
                    },
                );
            }
        }
        if let (Some(twin), Some(result)) = (self.twin.as_mut(), twin_result) {
            twin.params_mut().copy_from_slice(&result.params);
            twin.buffers_mut().copy_from_slice(&result.buffers);
        }
        self.rounds_done += 1;
        self.pending_seconds += started.elapsed().as_secs_f64();
        self.pending_examples = self.pending_examples.saturating_add(examples);
        let last = self.rounds_done == self.config.train.rounds;
        if self.rounds_done.is_multiple_of(self.config.eval.every) || last {
            let eval_started = Instant::now();
            let mut row = self.evaluate(data, executor, train_loss)?;
            row.seconds = self.pending_seconds + eval_started.elapsed().as_secs_f64();
            row.examples = self.pending_examples;
            row.bn_spread = bn_spread;
            self.pending_seconds = 0.0;
            self.pending_examples = 0;
            self.history.push(row.clone());
            return Ok(Some(row));
        }
        Ok(None)
    }

    /// The client part of a round: sample among the available clients, train, keep the results
    /// that arrived. With fewer than `deploy.min_fit_clients` results the round is run again
    /// with a new sample (attempt 0 is the sample a simulation draws, so a run without faults
    /// is the simulation). The SGD twin trains once, with the first attempt.
    fn fit_clients(
        &self,
        round: usize,
        data: &TrainTest,
        executor: &dyn Executor,
    ) -> Result<(Vec<FitResult>, Option<FitResult>), FlError> {
        // A private round takes whom Poisson sampling gives it, even no one: sampling again
        // would change the mechanism the accountant measures.
        let needed = match (&self.config.privacy, &self.config.deploy) {
            (Some(_), _) => 0,
            (None, deploy) => deploy
                .as_ref()
                .map_or(1, |d| d.min_fit_clients)
                .max(self.strategy.min_results()),
        };
        let mut twin_result = None;
        let (mut got, mut attempts) = (0, 0);
        for attempt in 0..MAX_ROUND_ATTEMPTS {
            let available = executor.available(self.partition.clients.len())?;
            if available.is_empty() {
                if attempts == 0 {
                    return Err(FlError::NoClientsAvailable { round: round + 1 });
                }
                break;
            }
            attempts += 1;
            let picks: Vec<usize> = if self.config.privacy.is_some() {
                // Over every client of the partition, not only those here: a sampled client
                // that is away is a dropout, and nobody's chance of being sampled exceeds q.
                let sampled = poisson_sample(
                    round,
                    self.partition.clients.len(),
                    self.config.train.fraction,
                    &self.privacy_randomness()?,
                );
                let (here, away): (Vec<usize>, Vec<usize>) = sampled
                    .into_iter()
                    .partition(|c| available.binary_search(c).is_ok());
                if !away.is_empty() {
                    // A count, not who: the sample is part of what the noise protects.
                    tracing::warn!(round, "{} sampled clients are not connected", away.len());
                }
                here
            } else {
                let picks = if attempt == 0 {
                    self.strategy.configure_round(
                        round,
                        available.len(),
                        self.config.train.fraction,
                        self.config.run.seed,
                    )
                } else {
                    resample_clients(
                        round,
                        attempt,
                        available.len(),
                        self.config.train.fraction,
                        self.config.run.seed,
                    )
                };
                picks.into_iter().map(|i| available[i]).collect()
            };
            let mut jobs = Vec::new();
            for client in picks {
                let mut config = self.fit_config(round, self.config.train.batch_size);
                config.flip_labels = self.attacks(client, AttackKind::LabelFlip);
                config.control = self.strategy.control(client);
                jobs.push(FitJob {
                    client,
                    indices: &self.partition.clients[client],
                    start: self.with_local_state(client),
                    config,
                });
            }
            if let (Some(twin), 0) = (&self.twin, attempt) {
                let mut config = self.fit_config(round, self.central_batch());
                config.prox_mu = None;
                jobs.push(FitJob {
                    client: CENTRAL_ID,
                    indices: &self.all_indices,
                    start: twin.clone(),
                    config,
                });
            }
            let mut results = Vec::new();
            for outcome in executor.fit(jobs, &data.train) {
                match outcome {
                    Ok(result) if result.client == CENTRAL_ID => twin_result = Some(result),
                    Ok(result) => results.push(result),
                    Err(FlError::Dropped {
                        round,
                        client,
                        reason,
                    }) => {
                        tracing::warn!(round, client, attempt, "client dropped: {reason}");
                    }
                    Err(e) => return Err(e),
                }
            }
            got = results.len();
            if got >= needed {
                return Ok((results, twin_result));
            }
            tracing::warn!(
                round,
                attempt,
                "{got} of the {needed} client results a round needs; sampling again"
            );
        }
        Err(FlError::TooFewResults {
            round: round + 1,
            got,
            needed,
            attempts,
        })
    }

    /// Whether `client` is one of the `[attack]` clients, attacking by `kind`.
    fn attacks(&self, client: usize, kind: AttackKind) -> bool {
        self.config
            .attack
            .as_ref()
            .is_some_and(|a| a.kind == kind && a.clients.contains(&client))
    }

    /// The `[attack]` clients' corrupted updates (sign-flip, scale, random) in place of their
    /// honest ones, over the aggregated parameters. The noise of `random` is seeded by (run
    /// seed, round, client).
    fn corrupt(&self, round: usize, results: &mut [FitResult]) {
        let Some(attack) = &self.config.attack else {
            return;
        };
        let factor = attack.factor.unwrap_or(1.0);
        let global = self.global.params();
        for r in results
            .iter_mut()
            .filter(|r| attack.clients.contains(&r.client))
        {
            let seed = derive(
                self.config.run.seed,
                Purpose::Attack,
                &[round as u64, r.client as u64],
            );
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let noise = Normal::new(0.0, f64::from(factor).abs()).expect("finite factor");
            for i in self.scope.params.iter().flat_map(|range| range.clone()) {
                let (g, w) = (f64::from(global[i]), f64::from(r.params[i]));
                let corrupted = match attack.kind {
                    AttackKind::SignFlip => g - f64::from(factor) * (w - g),
                    AttackKind::Scale => g + f64::from(factor) * (w - g),
                    AttackKind::Random => g + noise.sample(&mut rng),
                    AttackKind::LabelFlip => w,
                };
                r.params[i] = corrupted as f32;
            }
        }
    }

    /// Whether every configured round has run.
    /// All `train.rounds` run, or converged by `eval.stop_when_converged`.
    pub fn finished(&self) -> bool {
        self.rounds_done >= self.config.train.rounds || self.converged_round().is_some()
    }

    /// With `eval.stop_when_converged`: the round just run, if it met the criterion (the run
    /// stops there).
    pub fn converged_round(&self) -> Option<usize> {
        let criterion = self.config.eval.stop_when_converged?;
        if self.history.last()?.round != self.rounds_done {
            return None;
        }
        let history: Vec<(usize, f64)> = self
            .history
            .iter()
            .map(|r| (r.round, r.test_accuracy))
            .collect();
        criterion.met_at(&history)
    }
}
