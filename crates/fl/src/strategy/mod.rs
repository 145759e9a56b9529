//! Strategies, split as Flower splits them: *configure* a round (which clients take part, with
//! which local-training settings) and *aggregate* its results into the new global model.
//!
//! FedAvg is the sample-weighted mean of client weights. FedProx trains with a proximal term and
//! aggregates like FedAvg. FedAvgM and FedAdam treat the mean client update as a pseudo-gradient
//! for a server optimiser (Hsu et al. 2019; Reddi et al. 2021). What is aggregated at all is an
//! [`AggregationScope`]: with FedBN (`bn = "local"`) normalisation layers stay on the clients,
//! and buffers are averaged only when the run asks for it. SCAFFOLD steers each client with
//! control variates, kept by the server in-process and by each client over a network.
//!
//! Here: the [`Strategy`] trait, what is aggregated, client sampling, FedAvg and FedProx; the
//! server optimisers in `adaptive`, FedNova in `fednova`, SCAFFOLD in `scaffold`, the robust
//! aggregators and update clipping in `robust`.

use std::ops::Range;

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use fedra_nn::{BnPolicy, Model, TensorKind};

use crate::client::{FitResult, Steering};
use crate::config::{StrategyConfig, TrainConfig};
use crate::error::FlError;
use crate::seed::{Purpose, derive};

mod adaptive;
mod fednova;
mod robust;
mod scaffold;

pub use adaptive::{FedAdam, FedAvgM, SecondMoment};
pub use fednova::FedNova;
pub use robust::{CoordinateWise, Krum, clip_update, krum_scores};
pub use scaffold::{Scaffold, correction};

/// The parts of the parameter and buffer vectors that the server aggregates; the rest stay as
/// they are in the global model (and, for FedBN, on the clients).
#[derive(Clone, Debug, PartialEq)]
pub struct AggregationScope {
    pub params: Vec<Range<usize>>,
    pub buffers: Vec<Range<usize>>,
}

impl AggregationScope {
    /// The scope a BN policy implies: `local` keeps every normalisation tensor (affine weights
    /// and statistics) out; `frozen` never changes buffers; `train` averages buffers only when
    /// `average_buffers`.
    pub fn new(model: &Model, bn: BnPolicy, average_buffers: bool) -> AggregationScope {
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for t in model.tensors() {
            let keep = match (t.kind, bn) {
                (_, BnPolicy::Local) if t.norm => false,
                (TensorKind::Param, _) => true,
                (TensorKind::Buffer, BnPolicy::Train) => average_buffers,
                (TensorKind::Buffer, _) => false,
            };
            if keep {
                let range = t.offset..t.offset + t.len;
                match t.kind {
                    TensorKind::Param => params.push(range),
                    TensorKind::Buffer => buffers.push(range),
                }
            }
        }
        AggregationScope { params, buffers }
    }

    /// Every parameter and buffer.
    pub fn everything(model: &Model) -> AggregationScope {
        AggregationScope {
            params: std::iter::once(0..model.params().len()).collect(),
            buffers: std::iter::once(0..model.buffers().len()).collect(),
        }
    }
}

/// The clients of a round: a seeded sample of max(1, round(fraction * clients)) clients, in
/// increasing id order (aggregation runs in that order, so results do not depend on which
/// client finished first).
pub fn sample_clients(round: usize, clients: usize, fraction: f64, run_seed: u64) -> Vec<usize> {
    draw_clients(clients, fraction, run_seed, &[round as u64])
}

fn draw_clients(clients: usize, fraction: f64, run_seed: u64, coords: &[u64]) -> Vec<usize> {
    let take = ((fraction * clients as f64).round() as usize).clamp(1, clients);
    if take == clients {
        return (0..clients).collect();
    }
    let seed = derive(run_seed, Purpose::Sampling, coords);
    let mut chosen = sample(&mut ChaCha8Rng::seed_from_u64(seed), clients, take).into_vec();
    chosen.sort_unstable();
    chosen
}

/// The clients of attempt `attempt` (>= 1) at a round whose earlier attempts returned too few
/// results: a new seeded sample of the same size, drawn apart from the first.
pub fn resample_clients(
    round: usize,
    attempt: usize,
    clients: usize,
    fraction: f64,
    run_seed: u64,
) -> Vec<usize> {
    draw_clients(clients, fraction, run_seed, &[round as u64, attempt as u64])
}

/// A federated strategy.
pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    /// Which clients train in `round` (Flower's `configure_fit`).
    fn configure_round(
        &self,
        round: usize,
        clients: usize,
        fraction: f64,
        run_seed: u64,
    ) -> Vec<usize> {
        sample_clients(round, clients, fraction, run_seed)
    }

    /// The proximal weight clients add to their loss, if the strategy uses one.
    fn prox_mu(&self) -> Option<f32> {
        None
    }

    /// How client `client`'s local steps are steered, if the strategy steers clients (SCAFFOLD:
    /// the correction c - c_i over the whole parameter vector, or, once
    /// [`Strategy::keep_controls_on_clients`], the server's c for the client to form it).
    fn control(&self, client: usize) -> Option<Steering> {
        let _ = client;
        None
    }

    /// Whether the clients keep their own controls on their machines (over a network): the
    /// strategy then sends its own control instead of each client's correction, and keeps no
    /// client's. Set before every round; an error when the strategy's state (from a checkpoint)
    /// was made the other way.
    fn keep_controls_on_clients(&mut self, on_clients: bool) -> Result<(), FlError> {
        let _ = on_clients;
        Ok(())
    }

    /// Whether [`Strategy::control`] gives `client` a correction, without building it.
    fn has_control(&self, client: usize) -> bool {
        let _ = client;
        false
    }

    /// The fewest results a round can be aggregated from (a round with fewer is sampled again).
    fn min_results(&self) -> usize {
        1
    }

    /// Fold the round's results into `global` (Flower's `aggregate_fit`).
    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError>;

    /// Server-side optimiser state, for checkpoints.
    fn state(&self) -> Vec<(String, Vec<f32>)> {
        Vec::new()
    }

    /// Restore what [`Strategy::state`] returned. `scope` is the run's aggregation scope: state
    /// missing, or sized for another model, is an error, never silently reset.
    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        _scope: &AggregationScope,
    ) -> Result<(), FlError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(FlError::State(format!(
                "strategy {} keeps no state, but the checkpoint has {} tensors",
                self.name(),
                state.len()
            )))
        }
    }
}

/// Build the strategy a configuration names (`train`: how the clients train, which FedNova
/// needs to count their local steps).
pub fn from_config(
    config: &StrategyConfig,
    train: &TrainConfig,
    clients: usize,
) -> Result<Box<dyn Strategy>, FlError> {
    Ok(match config.name.as_str() {
        "fedavg" | "sgd" => Box::new(FedAvg),
        "fedprox" => Box::new(FedProx {
            mu: config.mu.unwrap_or(0.01),
        }),
        "fedavgm" => Box::new(FedAvgM {
            server_lr: config.server_lr.unwrap_or(1.0),
            momentum: config.server_momentum.unwrap_or(0.9),
            velocity: Vec::new(),
        }),
        name @ ("fedadam" | "fedyogi" | "fedadagrad") => Box::new(FedAdam {
            rule: match name {
                "fedadam" => SecondMoment::Adam,
                "fedyogi" => SecondMoment::Yogi,
                _ => SecondMoment::Adagrad,
            },
            server_lr: config.server_lr.unwrap_or(0.1),
            beta1: config.beta1.unwrap_or(0.9),
            beta2: config.beta2.unwrap_or(0.99),
            tau: config.tau.unwrap_or(1e-3),
            m: Vec::new(),
            v: Vec::new(),
        }),
        "median" => Box::new(CoordinateWise { trim: None }),
        "trimmed-mean" => Box::new(CoordinateWise {
            trim: Some(f64::from(config.trim.unwrap_or(0.1))),
        }),
        "fednova" => Box::new(FedNova {
            local_epochs: train.local_epochs,
            batch_size: train.batch_size,
            momentum: train.momentum,
        }),
        "scaffold" => Box::new(Scaffold::new(config, train, clients)),
        "krum" => Box::new(Krum {
            byzantine: config.byzantine.unwrap_or(0),
            keep: config.keep.unwrap_or(1),
        }),
        other => {
            return Err(FlError::State(format!("unknown strategy {other:?}")));
        }
    })
}

/// Reject results that cannot be averaged: wrong length or non-finite values (named by tensor).
pub fn check_results(round: usize, global: &Model, results: &[FitResult]) -> Result<(), FlError> {
    if results.is_empty() {
        return Err(FlError::NoResults { round });
    }
    for r in results {
        for (got, expected) in [
            (r.params.len(), global.params().len()),
            (r.buffers.len(), global.buffers().len()),
        ] {
            if got != expected {
                return Err(FlError::UpdateShape {
                    round,
                    client: r.client,
                    expected,
                    got,
                });
            }
        }
        for t in global.tensors() {
            let values = match t.kind {
                TensorKind::Param => &r.params[t.offset..t.offset + t.len],
                TensorKind::Buffer => &r.buffers[t.offset..t.offset + t.len],
            };
            if values.iter().any(|v| !v.is_finite()) {
                return Err(FlError::NonFiniteUpdate {
                    round,
                    client: r.client,
                    tensor: t.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// `out[range] = sum_k n_k * x_k[range] / sum_k n_k` over the results, for each range.
///
/// Accumulates in f64 in result order: each n_k * x_k is exact in f64 and so is their sum for
/// identical inputs, so averaging identical weights returns them bit for bit.
pub fn weighted_mean(
    results: &[FitResult],
    pick: impl Fn(&FitResult) -> &[f32],
    ranges: &[Range<usize>],
    out: &mut [f32],
) {
    let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
    for range in ranges {
        let mut acc = vec![0f64; range.len()];
        for r in results {
            let n = r.num_examples as f64;
            for (a, &x) in acc.iter_mut().zip(&pick(r)[range.clone()]) {
                *a += n * x as f64;
            }
        }
        for (o, a) in out[range.clone()].iter_mut().zip(acc) {
            *o = (a / total) as f32;
        }
    }
}

/// FedAvg (McMahan et al. 2017): the new global weights are the sample-weighted mean.
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        weighted_mean(results, |r| &r.params, &scope.params, global.params_mut());
        weighted_mean(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// FedProx (Li et al. 2020): FedAvg aggregation, clients minimise loss + mu/2 ||w - w_global||^2.
pub struct FedProx {
    pub mu: f32,
}

impl Strategy for FedProx {
    fn name(&self) -> &'static str {
        "fedprox"
    }

    fn prox_mu(&self) -> Option<f32> {
        Some(self.mu)
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        FedAvg.aggregate(round, global, results, scope)
    }
}

/// The mean client update as a pseudo-gradient: `delta = mean_k(w_k) - w_global` over the
/// scope's parameters (buffers are averaged plainly). Returns delta for the scope's parameter
/// positions, concatenated in range order.
fn mean_update(
    round: usize,
    global: &mut Model,
    results: &[FitResult],
    scope: &AggregationScope,
) -> Result<Vec<f32>, FlError> {
    check_results(round, global, results)?;
    let mut mean = global.params().to_vec();
    weighted_mean(results, |r| &r.params, &scope.params, &mut mean);
    weighted_mean(
        results,
        |r| &r.buffers,
        &scope.buffers,
        global.buffers_mut(),
    );
    let w = global.params();
    Ok(scope
        .params
        .iter()
        .flat_map(|range| range.clone().map(|i| mean[i] - w[i]))
        .collect())
}

fn scope_len(scope: &AggregationScope) -> usize {
    scope.params.iter().map(|r| r.len()).sum()
}

/// Apply `step(j, delta_j) -> change_j` to the scope's parameters of `global`.
fn apply_server_step(global: &mut Model, scope: &AggregationScope, change: &[f32]) {
    let w = global.params_mut();
    let mut j = 0;
    for range in &scope.params {
        for i in range.clone() {
            w[i] += change[j];
            j += 1;
        }
    }
}

/// Put checkpointed server-optimiser vectors back into `slots`: every slot must be present, with
/// one value per aggregated parameter (`len`).
fn restore_vectors(
    name: &str,
    state: Vec<(String, Vec<f32>)>,
    slots: &mut [(&str, &mut Vec<f32>)],
    len: usize,
) -> Result<(), FlError> {
    let mut restored = vec![false; slots.len()];
    for (key, values) in state {
        let Some(i) = slots.iter().position(|(k, _)| *k == key) else {
            return Err(FlError::State(format!(
                "checkpoint has tensor {key:?}, which strategy {name} does not keep"
            )));
        };
        if values.len() != len {
            return Err(FlError::State(format!(
                "server-optimiser state `{key}` of strategy {name} holds {} values, the model \
                 has {len} aggregated parameters",
                values.len()
            )));
        }
        *slots[i].1 = values;
        restored[i] = true;
    }
    if let Some(i) = restored.iter().position(|done| !done) {
        return Err(FlError::State(format!(
            "server-optimiser state `{}` of strategy {name} is missing",
            slots[i].0
        )));
    }
    Ok(())
}

/// Server state of the scope's length: zeros before the first round, an error (never a silent
/// reset) if it was sized for another model.
fn ensure_len(name: &str, key: &str, state: &mut Vec<f32>, len: usize) -> Result<(), FlError> {
    if state.is_empty() {
        *state = vec![0.0; len];
    } else if state.len() != len {
        return Err(FlError::State(format!(
            "server-optimiser state `{key}` of strategy {name} holds {} values, the model has \
             {len} aggregated parameters",
            state.len()
        )));
    }
    Ok(())
}

/// A client's result for the strategies' tests: `params` from `client`, which trained on
/// 100 (client + 1) examples.
#[cfg(test)]
fn test_result(client: usize, params: Vec<f32>) -> FitResult {
    FitResult {
        client,
        num_examples: 100 * (client + 1),
        params,
        buffers: Vec::new(),
        train_loss: 0.0,
        examples_seen: 0,
    }
}
