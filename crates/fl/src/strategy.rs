//! Strategies, split as Flower splits them: *configure* a round (which clients take part, with
//! which local-training settings) and *aggregate* its results into the new global model.
//!
//! FedAvg is the sample-weighted mean of client weights. FedProx trains with a proximal term and
//! aggregates like FedAvg. FedAvgM and FedAdam treat the mean client update as a pseudo-gradient
//! for a server optimiser (Hsu et al. 2019; Reddi et al. 2021). What is aggregated at all is an
//! [`AggregationScope`]: with FedBN (`bn = "local"`) normalisation layers stay on the clients,
//! and buffers are averaged only when the run asks for it. SCAFFOLD steers each client with
//! control variates, kept by the server in-process and by each client over a network.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use fedra_nn::{BnPolicy, Model, TensorKind};

use crate::client::{FitResult, Steering};
use crate::config::{StrategyConfig, TrainConfig};
use crate::error::FlError;
use crate::seed::{Purpose, derive};

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

/// FedAvgM (Hsu et al. 2019): server momentum on the averaged update.
pub struct FedAvgM {
    pub server_lr: f32,
    pub momentum: f32,
    velocity: Vec<f32>,
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        let delta = mean_update(round, global, results, scope)?;
        ensure_len("fedavgm", "velocity", &mut self.velocity, scope_len(scope))?;
        for (v, d) in self.velocity.iter_mut().zip(&delta) {
            *v = self.momentum * *v + d;
        }
        let change: Vec<f32> = self.velocity.iter().map(|v| self.server_lr * v).collect();
        apply_server_step(global, scope, &change);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![("velocity".into(), self.velocity.clone())]
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        restore_vectors(
            "fedavgm",
            state,
            &mut [("velocity", &mut self.velocity)],
            scope_len(scope),
        )
    }
}

/// How an adaptive server optimiser updates its second moment v from the mean update d
/// (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondMoment {
    /// FedAdam: v = beta2 v + (1 - beta2) d^2.
    Adam,
    /// FedYogi: v = v - (1 - beta2) d^2 sign(v - d^2).
    Yogi,
    /// FedAdagrad: v = v + d^2.
    Adagrad,
}

/// FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021): an adaptive optimiser on the server over
/// the averaged update d, with m = beta1 m + (1 - beta1) d, the second moment by `rule`, and the
/// step server_lr * m / (sqrt(v) + tau). No bias correction, as in the paper.
pub struct FedAdam {
    pub rule: SecondMoment,
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdam {
    /// A fresh optimiser (zero moments).
    pub fn new(rule: SecondMoment, server_lr: f32, beta1: f32, beta2: f32, tau: f32) -> FedAdam {
        FedAdam {
            rule,
            server_lr,
            beta1,
            beta2,
            tau,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedAdam {
    fn name(&self) -> &'static str {
        match self.rule {
            SecondMoment::Adam => "fedadam",
            SecondMoment::Yogi => "fedyogi",
            SecondMoment::Adagrad => "fedadagrad",
        }
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        let delta = mean_update(round, global, results, scope)?;
        let n = scope_len(scope);
        let name = self.name();
        ensure_len(name, "m", &mut self.m, n)?;
        ensure_len(name, "v", &mut self.v, n)?;
        let mut change = vec![0f32; n];
        for j in 0..n {
            let d = delta[j];
            let d2 = d * d;
            self.m[j] = self.beta1 * self.m[j] + (1.0 - self.beta1) * d;
            let v = self.v[j];
            self.v[j] = match self.rule {
                SecondMoment::Adam => self.beta2 * v + (1.0 - self.beta2) * d2,
                SecondMoment::Yogi => {
                    // sign(0) = 0: v stays where it is when it equals d^2.
                    let sign = if v > d2 {
                        1.0
                    } else if v < d2 {
                        -1.0
                    } else {
                        0.0
                    };
                    v - (1.0 - self.beta2) * d2 * sign
                }
                SecondMoment::Adagrad => v + d2,
            };
            change[j] = self.server_lr * self.m[j] / (self.v[j].sqrt() + self.tau);
        }
        apply_server_step(global, scope, &change);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![("m".into(), self.m.clone()), ("v".into(), self.v.clone())]
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        restore_vectors(
            self.name(),
            state,
            &mut [("m", &mut self.m), ("v", &mut self.v)],
            scope_len(scope),
        )
    }
}

/// Byzantine-robust coordinate-wise rules (Yin et al. 2018, "Byzantine-Robust Distributed
/// Learning"): every parameter (and averaged buffer) of the new global model is, over the
/// clients' values of that coordinate, the median (`trim` = `None`) or the mean after dropping
/// the `floor(trim * K)` largest and as many smallest of the K values. Clients count equally,
/// whatever their example counts: weighting by a count the client reports would hand an attacker
/// the weight it claims.
pub struct CoordinateWise {
    pub trim: Option<f64>,
}

impl CoordinateWise {
    /// The rule applied to one coordinate's values (sorted in place).
    pub fn combine(&self, values: &mut [f32]) -> f32 {
        values.sort_unstable_by(f32::total_cmp);
        let k = values.len();
        match self.trim {
            None if k % 2 == 1 => values[k / 2],
            None => ((f64::from(values[k / 2 - 1]) + f64::from(values[k / 2])) / 2.0) as f32,
            Some(trim) => {
                let cut = ((trim * k as f64).floor() as usize).min((k - 1) / 2);
                let kept = &values[cut..k - cut];
                (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
            }
        }
    }

    fn apply(
        &self,
        results: &[FitResult],
        pick: impl Fn(&FitResult) -> &[f32],
        ranges: &[Range<usize>],
        out: &mut [f32],
    ) {
        let mut column = vec![0f32; results.len()];
        for range in ranges {
            for i in range.clone() {
                for (c, r) in column.iter_mut().zip(results) {
                    *c = pick(r)[i];
                }
                out[i] = self.combine(&mut column);
            }
        }
    }
}

impl Strategy for CoordinateWise {
    fn name(&self) -> &'static str {
        if self.trim.is_some() {
            "trimmed-mean"
        } else {
            "median"
        }
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        self.apply(results, |r| &r.params, &scope.params, global.params_mut());
        self.apply(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
/// Federated Optimization"): clients that take more local steps (more data under quantity skew)
/// move further, and FedAvg's mean is pulled towards their objectives. FedNova divides each
/// client's update by its step count a_i before averaging and rescales by the mean count:
/// `w = w_global + tau_eff * sum_i p_i (w_i - w_global) / a_i`, `p_i = n_i / n`,
/// `tau_eff = sum_i p_i a_i`. With plain SGD a_i = tau_i, the client's number of local steps;
/// with momentum rho, `a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)` (the paper's
/// Section 4). The server counts the steps itself from the epochs, the batch size and the
/// client's example count (which already sets its weight p_i), so a client cannot shrink a_i to
/// amplify its update without shrinking p_i too. When every client takes the same number of
/// steps it is FedAvg. Buffers are averaged as FedAvg averages them.
pub struct FedNova {
    pub local_epochs: usize,
    pub batch_size: usize,
    pub momentum: f32,
}

impl FedNova {
    /// Local steps of a client holding `examples` that processed `examples_seen`: per epoch,
    /// its examples in batches of `batch_size`, less a last batch of one when the client skipped
    /// it (BatchNorm after a Linear layer in train mode).
    pub fn steps(&self, examples: usize, examples_seen: usize) -> usize {
        let (epochs, batch) = (self.local_epochs.max(1), self.batch_size.max(1));
        let skipped_one = examples % batch == 1
            && examples > 1
            && examples_seen == epochs.saturating_mul(examples - 1);
        let per_epoch = if skipped_one { examples - 1 } else { examples };
        epochs.saturating_mul(per_epoch.div_ceil(batch))
    }

    /// The paper's a_i for `steps` local steps.
    pub fn normaliser(&self, steps: usize) -> f64 {
        let rho = f64::from(self.momentum);
        let tau = steps as f64;
        if rho == 0.0 {
            tau
        } else {
            (tau - rho * (1.0 - rho.powf(tau)) / (1.0 - rho)) / (1.0 - rho)
        }
    }
}

impl Strategy for FedNova {
    fn name(&self) -> &'static str {
        "fednova"
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
        let weights: Vec<(f64, f64)> = results
            .iter()
            .map(|r| {
                let p = r.num_examples as f64 / total;
                let steps = self.steps(r.num_examples, r.examples_seen);
                (p, self.normaliser(steps).max(1e-12))
            })
            .collect();
        let tau_eff: f64 = weights.iter().map(|(p, a)| p * a).sum();
        let g = global.params().to_vec();
        let w = global.params_mut();
        for i in scope.params.iter().flat_map(|r| r.clone()) {
            let step: f64 = results
                .iter()
                .zip(&weights)
                .map(|(r, (p, a))| p * (f64::from(r.params[i]) - f64::from(g[i])) / a)
                .sum();
            w[i] = (f64::from(g[i]) + tau_eff * step) as f32;
        }
        weighted_mean(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
/// Learning"), option II. Each client i carries a control variate c_i and the server one, c; a
/// client adds c - c_i to every gradient, which steers its local steps towards the global
/// objective rather than its own (the client drift label skew causes). After client i takes K_i
/// local steps at learning rate lr from x to y_i, its control becomes
/// `c_i+ = c_i - c + (x - y_i) / (K_i lr)`; the server moves x by `server_lr` times the
/// sample-weighted mean of the y_i - x (with `server_lr` = 1: FedAvg's mean, bit for bit) and c
/// by `|S| / N` times the mean of the c_i+ - c_i over the round's |S| of the N clients. Every
/// control starts at zero, so the first round is FedAvg's. In-process the server keeps the clients'
/// controls (one model-sized vector per client that has trained); over a network
/// ([`Strategy::keep_controls_on_clients`]) each client keeps its own and the server sends c,
/// computing the change of c from each update ([`Scaffold::client_step`] is the client's
/// side, with the same arithmetic). Either way the server counts K_i itself, as FedNova does;
/// with momentum on the clients the formula is applied as it stands. Buffers are averaged as
/// FedAvg averages them.
pub struct Scaffold {
    pub server_lr: f32,
    /// Counts clients' local steps.
    pub steps: FedNova,
    /// The clients' training settings (their learning rate schedule).
    pub train: TrainConfig,
    /// N, every client of the federation.
    pub clients: usize,
    /// The server's control c (empty until the first aggregate).
    pub c: Vec<f32>,
    /// Each client's control c_i (absent: zero), when the server keeps them (in-process).
    pub client_c: BTreeMap<usize, Vec<f32>>,
    /// The clients keep their own c_i ([`Strategy::keep_controls_on_clients`]).
    pub on_clients: bool,
    /// Then: the last round whose aggregate took each client's result, the round of the c_i
    /// the client must train with next.
    pub aggregated_in: BTreeMap<usize, usize>,
}

impl Scaffold {
    /// SCAFFOLD with `strategy.server_lr` for `clients` clients trained by `train`, every control
    /// zero.
    pub fn new(config: &StrategyConfig, train: &TrainConfig, clients: usize) -> Scaffold {
        Scaffold {
            server_lr: config.server_lr.unwrap_or(1.0),
            steps: FedNova {
                local_epochs: train.local_epochs,
                batch_size: train.batch_size,
                momentum: train.momentum,
            },
            train: train.clone(),
            clients,
            c: Vec::new(),
            client_c: BTreeMap::new(),
            on_clients: false,
            aggregated_in: BTreeMap::new(),
        }
    }

    /// The learning rate of `round`, which the control step divides by.
    fn lr(&self, round: usize) -> Result<f64, FlError> {
        let lr = f64::from(self.train.lr_at(round));
        if !(lr.is_finite() && lr > 0.0) {
            return Err(FlError::State(format!(
                "strategy scaffold: the learning rate of round {round} is {lr}; the controls \
                 divide by it (a train.lr_decay that reaches 0?)"
            )));
        }
        Ok(lr)
    }

    /// A client's side of a round over a network: its control `own` (c_i, zero if empty) after
    /// training from the global weights `x` of `round` to `result` with the server's control
    /// `c`, over the aggregated parameters `params`; the same arithmetic as the server's
    /// in-process [`Strategy::aggregate`], so the bits agree.
    pub fn client_step(
        &self,
        round: usize,
        c: &[f32],
        x: &[f32],
        result: &FitResult,
        params: &[Range<usize>],
        own: &mut Vec<f32>,
    ) -> Result<(), FlError> {
        let n = x.len();
        if c.len() != n || result.params.len() != n {
            return Err(FlError::State(format!(
                "strategy scaffold: a control of {} values for a model of {n} parameters",
                c.len()
            )));
        }
        if own.is_empty() {
            own.resize(n, 0.0);
        }
        if own.len() != n {
            return Err(FlError::State(format!(
                "strategy scaffold: this client's control has {} values, the model {n}",
                own.len()
            )));
        }
        let lr = self.lr(round)?;
        let steps = self
            .steps
            .steps(result.num_examples, result.examples_seen)
            .max(1) as f64;
        control_step(c, x, &result.params, steps * lr, params, Some(own), None);
        Ok(())
    }
}

/// SCAFFOLD's correction c - c_i (c itself for a client without a control yet).
pub fn correction(c: &[f32], own: Option<&[f32]>) -> Vec<f32> {
    match own {
        Some(own) => c.iter().zip(own).map(|(c, o)| c - o).collect(),
        None => c.to_vec(),
    }
}

/// Option II's control change of one client, over `params`: after K local steps at `lr` from x
/// to y, delta = -c + (x - y) / (K lr) (`k_lr` = K lr), added to `own` (c_i) and to `sum`.
fn control_step(
    c: &[f32],
    x: &[f32],
    y: &[f32],
    k_lr: f64,
    params: &[Range<usize>],
    mut own: Option<&mut [f32]>,
    mut sum: Option<&mut [f64]>,
) {
    for i in params.iter().flat_map(|range| range.clone()) {
        let delta = -f64::from(c[i]) + (f64::from(x[i]) - f64::from(y[i])) / k_lr;
        if let Some(own) = own.as_deref_mut() {
            own[i] = (f64::from(own[i]) + delta) as f32;
        }
        if let Some(sum) = sum.as_deref_mut() {
            sum[i] += delta;
        }
    }
}

impl Strategy for Scaffold {
    fn name(&self) -> &'static str {
        "scaffold"
    }

    fn has_control(&self, _client: usize) -> bool {
        !self.c.is_empty()
    }

    fn control(&self, client: usize) -> Option<Steering> {
        if self.c.is_empty() {
            return None;
        }
        if self.on_clients {
            return Some(Steering::ServerControl {
                c: Arc::new(self.c.clone()),
                since: self.aggregated_in.get(&client).copied(),
            });
        }
        Some(Steering::Correction(Arc::new(correction(
            &self.c,
            self.client_c.get(&client).map(Vec::as_slice),
        ))))
    }

    fn keep_controls_on_clients(&mut self, on_clients: bool) -> Result<(), FlError> {
        if on_clients && !self.client_c.is_empty() {
            return Err(FlError::State(
                "strategy scaffold: this checkpoint holds the clients' controls, made in-process; \
                 over a network the clients keep their own, so it can only be continued by \
                 `fedra run --resume`"
                    .into(),
            ));
        }
        if !on_clients && !self.aggregated_in.is_empty() {
            return Err(FlError::State(
                "strategy scaffold: this checkpoint comes from a server whose clients keep their \
                 own controls; it can only be continued by `fedra serve --resume`"
                    .into(),
            ));
        }
        self.on_clients = on_clients;
        Ok(())
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let x = global.params().to_vec();
        if self.c.is_empty() {
            self.c = vec![0.0; x.len()];
        }
        if self.c.len() != x.len() {
            return Err(FlError::State(format!(
                "strategy scaffold: a control of {} values for a model of {} parameters",
                self.c.len(),
                x.len()
            )));
        }
        let lr = self.lr(round)?;
        let mut c_step = vec![0f64; x.len()];
        for r in results {
            let steps = self.steps.steps(r.num_examples, r.examples_seen).max(1) as f64;
            let own = if self.on_clients {
                self.aggregated_in.insert(r.client, round);
                None
            } else {
                Some(
                    self.client_c
                        .entry(r.client)
                        .or_insert_with(|| vec![0.0; x.len()])
                        .as_mut_slice(),
                )
            };
            control_step(
                &self.c,
                &x,
                &r.params,
                steps * lr,
                &scope.params,
                own,
                Some(&mut c_step),
            );
        }
        let share = results.len() as f64 / self.clients.max(1) as f64;
        let n = results.len().max(1) as f64;
        for i in scope.params.iter().flat_map(|range| range.clone()) {
            self.c[i] = (f64::from(self.c[i]) + share * c_step[i] / n) as f32;
        }
        if let Some(i) = self.c.iter().position(|v| !v.is_finite()) {
            return Err(FlError::State(format!(
                "strategy scaffold: the server control became {} at parameter {i} in round \
                 {round}",
                self.c[i]
            )));
        }
        weighted_mean(results, |r| &r.params, &scope.params, global.params_mut());
        if self.server_lr != 1.0 {
            let eta = f64::from(self.server_lr);
            let w = global.params_mut();
            for i in scope.params.iter().flat_map(|range| range.clone()) {
                w[i] = (f64::from(x[i]) + eta * (f64::from(w[i]) - f64::from(x[i]))) as f32;
            }
        }
        weighted_mean(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        if self.c.is_empty() {
            return Vec::new();
        }
        let mut state = vec![("scaffold.c".to_string(), self.c.clone())];
        for (k, c) in &self.client_c {
            state.push((format!("scaffold.c.{k}"), c.clone()));
        }
        // Round numbers as f32 are exact below 2^24 rounds.
        for (k, &round) in &self.aggregated_in {
            state.push((format!("scaffold.aggregated_in.{k}"), vec![round as f32]));
        }
        state
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        self.c.clear();
        self.client_c.clear();
        self.aggregated_in.clear();
        for (name, values) in state {
            if name == "scaffold.c" {
                self.c = values;
            } else if let Some(k) = name
                .strip_prefix("scaffold.aggregated_in.")
                .and_then(|k| k.parse::<usize>().ok())
            {
                match values[..] {
                    [round] if round >= 0.0 && round.fract() == 0.0 && round < 16_777_216.0 => {
                        self.aggregated_in.insert(k, round as usize);
                    }
                    _ => {
                        return Err(FlError::State(format!(
                            "strategy scaffold: checkpoint tensor {name:?} is not a round number"
                        )));
                    }
                }
            } else if let Some(k) = name
                .strip_prefix("scaffold.c.")
                .and_then(|k| k.parse::<usize>().ok())
            {
                self.client_c.insert(k, values);
            } else {
                return Err(FlError::State(format!(
                    "strategy scaffold: unexpected checkpoint tensor {name:?}"
                )));
            }
        }
        let len = self.c.len();
        let needed = scope.params.iter().map(|r| r.end).max().unwrap_or(0);
        if len != 0 && len < needed {
            return Err(FlError::State(format!(
                "strategy scaffold: the checkpoint's control has {len} values, the model {needed}"
            )));
        }
        if len == 0 && !(self.client_c.is_empty() && self.aggregated_in.is_empty()) {
            return Err(FlError::State(
                "strategy scaffold: the checkpoint has client controls but no server control"
                    .into(),
            ));
        }
        if let Some((k, _)) = self.client_c.iter().find(|(_, c)| c.len() != len) {
            return Err(FlError::State(format!(
                "strategy scaffold: client {k}'s control does not match the server's size {len}"
            )));
        }
        Ok(())
    }
}

/// Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
/// Tolerant Gradient Descent"). Each of the n results is scored by the sum of its squared
/// Euclidean distances (over the aggregated parameters) to its n - f - 2 nearest other results,
/// f = `byzantine`; the new global model is the result of lowest score (Krum, `keep` = 1) or the
/// plain mean of the `keep` results of lowest scores (multi-Krum), ties going to the lower
/// client id. Like the coordinate-wise rules, example counts do not weigh: a count is what a
/// client claims.
pub struct Krum {
    pub byzantine: usize,
    pub keep: usize,
}

/// Krum scores of `n` points whose squared distances `dist2(i, j)` are given, with `byzantine`
/// = f: point i's score sums its n - f - 2 smallest squared distances to the others.
pub fn krum_scores(n: usize, byzantine: usize, dist2: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let neighbours = n.saturating_sub(byzantine + 2);
    let mut table = vec![0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d = dist2(i, j);
            table[i * n + j] = d;
            table[j * n + i] = d;
        }
    }
    (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| table[i * n + j])
                .collect();
            others.sort_unstable_by(f64::total_cmp);
            others[..neighbours.min(others.len())].iter().sum()
        })
        .collect()
}

/// The plain (unweighted) mean of `chosen`'s values over `ranges`, accumulated in f64.
fn plain_mean(
    chosen: &[&FitResult],
    pick: impl Fn(&FitResult) -> &[f32],
    ranges: &[Range<usize>],
    out: &mut [f32],
) {
    let k = chosen.len() as f64;
    for range in ranges {
        for i in range.clone() {
            let sum: f64 = chosen.iter().map(|r| f64::from(pick(r)[i])).sum();
            out[i] = (sum / k) as f32;
        }
    }
}

impl Strategy for Krum {
    fn name(&self) -> &'static str {
        "krum"
    }

    fn min_results(&self) -> usize {
        let f = self.byzantine;
        f.saturating_mul(2)
            .saturating_add(3)
            .max(self.keep.saturating_add(f))
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let n = results.len();
        let f = self.byzantine;
        // Krum's guarantee needs n >= 2f + 3, and multi-Krum may keep at most n - f (fewer
        // than all the honest results it can count on).
        let needed = self.min_results();
        if n < needed {
            return Err(FlError::State(format!(
                "round {round}: krum with byzantine = {f} and keep = {} needs at least {needed} \
                 results, and the round has {n}",
                self.keep
            )));
        }
        let scores = krum_scores(n, f, |i, j| {
            let (a, b) = (&results[i].params, &results[j].params);
            scope
                .params
                .iter()
                .flat_map(|r| r.clone())
                .map(|k| {
                    let d = f64::from(a[k]) - f64::from(b[k]);
                    d * d
                })
                .sum()
        });
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            scores[a]
                .total_cmp(&scores[b])
                .then(results[a].client.cmp(&results[b].client))
        });
        let chosen: Vec<&FitResult> = order[..self.keep].iter().map(|&i| &results[i]).collect();
        tracing::info!(
            round,
            "krum kept client(s) {:?}",
            chosen.iter().map(|r| r.client).collect::<Vec<_>>()
        );
        plain_mean(&chosen, |r| &r.params, &scope.params, global.params_mut());
        plain_mean(
            &chosen,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// Scale `params`' update against `global` (over `ranges`) down to L2 norm `max_norm` when it is
/// longer: `w = g + (w - g) * max_norm / ||w - g||`. Returns the update's norm before clipping.
pub fn clip_update(
    global: &[f32],
    params: &mut [f32],
    ranges: &[Range<usize>],
    max_norm: f32,
) -> f64 {
    let norm = ranges
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| {
            let d = f64::from(params[i]) - f64::from(global[i]);
            d * d
        })
        .sum::<f64>()
        .sqrt();
    let max = f64::from(max_norm);
    if norm > max {
        let scale = max / norm;
        for i in ranges.iter().flat_map(|r| r.clone()) {
            let g = f64::from(global[i]);
            params[i] = (g + (f64::from(params[i]) - g) * scale) as f32;
        }
    }
    norm
}

#[cfg(test)]
mod robust_tests {
    //! Krum and update clipping against numbers worked by hand from their definitions.

    use super::*;

    #[test]
    fn krum_scores_by_hand() {
        // Points 0, 1, 2, 10, 100 on a line, f = 1: each score sums the n - f - 2 = 2 smallest
        // squared distances. 0: {1, 4, 100, 10000} -> 5; 1: {1, 1, 81, 9801} -> 2;
        // 2: {4, 1, 64, 9604} -> 5; 10: {100, 81, 64, 8100} -> 145;
        // 100: {10000, 9801, 9604, 8100} -> 17704.
        let x = [0f64, 1.0, 2.0, 10.0, 100.0];
        let scores = krum_scores(5, 1, |i, j| (x[i] - x[j]).powi(2));
        assert_eq!(scores, [5.0, 2.0, 5.0, 145.0, 17704.0]);
    }

    fn result(client: usize, params: Vec<f32>) -> FitResult {
        FitResult {
            client,
            num_examples: 100 * (client + 1),
            params,
            buffers: Vec::new(),
            train_loss: 0.0,
            examples_seen: 0,
        }
    }

    #[test]
    fn krum_keeps_the_best_scored_and_multi_krum_averages_them_plainly() {
        let spec = fedra_nn::ModelSpec::by_name("logreg", [1, 1, 1], 2).unwrap();
        let mut global = Model::new(&spec, 0).unwrap();
        let len = global.params().len();
        // Every coordinate of client k is x_k (the line above); the attacker (100) is far off.
        let x = [0f32, 1.0, 2.0, 10.0, 100.0];
        let results: Vec<FitResult> = x
            .iter()
            .enumerate()
            .map(|(k, &v)| result(k, vec![v; len]))
            .collect();
        let scope = AggregationScope::everything(&global);
        let mut krum = Krum {
            byzantine: 1,
            keep: 1,
        };
        krum.aggregate(0, &mut global, &results, &scope).unwrap();
        assert!(global.params().iter().all(|&v| v == 1.0));
        // keep 3: clients 1 (score 2), then 0 and 2 (5 each, lower id first): their plain mean
        // is 1, whatever their example counts (100, 200, 300).
        let mut multi = Krum {
            byzantine: 1,
            keep: 3,
        };
        multi.aggregate(0, &mut global, &results, &scope).unwrap();
        assert!(global.params().iter().all(|&v| v == 1.0));
        let mut four = Krum {
            byzantine: 1,
            keep: 4,
        };
        four.aggregate(0, &mut global, &results, &scope).unwrap();
        // Clients 1, 0, 2 and 3 (score 145): (1 + 0 + 2 + 10) / 4.
        assert!(global.params().iter().all(|&v| v == 3.25));
        // Too few results for f = 2 (2f + 3 = 7).
        let mut strict = Krum {
            byzantine: 2,
            keep: 1,
        };
        let e = strict
            .aggregate(3, &mut global, &results, &scope)
            .unwrap_err()
            .to_string();
        assert!(e.contains("round 3") && e.contains("at least 7"), "{e}");
    }

    #[test]
    fn fednova_normalises_by_local_steps() {
        let nova = FedNova {
            local_epochs: 2,
            batch_size: 10,
            momentum: 0.0,
        };
        // 25 examples, 2 epochs: 3 batches an epoch. 21 examples of which the last batch of one
        // was skipped each epoch: 2 batches an epoch.
        assert_eq!(nova.steps(25, 50), 6);
        assert_eq!(nova.steps(21, 40), 4);
        assert_eq!(nova.steps(21, 42), 6);
        assert_eq!(nova.steps(20, 40), 4);
        // Momentum 0.5 over 3 steps: (3 - 0.5 (1 - 0.125) / 0.5) / 0.5 = 4.25.
        let heavy = FedNova {
            momentum: 0.5,
            ..nova
        };
        assert!((heavy.normaliser(3) - 4.25).abs() < 1e-12);

        let spec = fedra_nn::ModelSpec::by_name("logreg", [1, 1, 1], 2).unwrap();
        let mut global = Model::new(&spec, 0).unwrap();
        let len = global.params().len();
        global.params_mut().fill(1.0);
        let scope = AggregationScope::everything(&global);
        // Client 0: 10 examples, 2 steps (epochs 2, batch 10), moved +4. Client 1: 30 examples,
        // 6 steps, moved -12. p = (1/4, 3/4); tau_eff = 2/4 + 18/4 = 5;
        // step = 1/4 * 4/2 + 3/4 * (-12)/6 = 0.5 - 1.5 = -1; w = 1 + 5 * (-1) = -4.
        // (FedAvg: 1 + 1/4 * 4 + 3/4 * (-12) = -7.)
        let mut a = result(0, vec![5.0; len]);
        a.num_examples = 10;
        a.examples_seen = 20;
        let mut b = result(1, vec![-11.0; len]);
        b.num_examples = 30;
        b.examples_seen = 60;
        FedNova { ..nova }
            .aggregate(0, &mut global, &[a.clone(), b.clone()], &scope)
            .unwrap();
        assert!(
            global.params().iter().all(|&v| (v + 4.0).abs() < 1e-6),
            "{:?}",
            global.params()
        );
        // Equal steps: FedAvg's weighted mean.
        global.params_mut().fill(1.0);
        b.examples_seen = 20;
        b.num_examples = 10;
        FedNova { ..nova }
            .aggregate(0, &mut global, &[a, b], &scope)
            .unwrap();
        assert!(
            global.params().iter().all(|&v| (v + 3.0).abs() < 1e-6),
            "{:?}",
            global.params()
        );
    }

    #[test]
    fn clipping_scales_long_updates_to_the_bound_and_leaves_short_ones() {
        // Update (3, 4) from the origin has norm 5; clipped to 1 it is (0.6, 0.8).
        let global = [1.0f32, 1.0, 7.0];
        let first_two: Vec<Range<usize>> = std::iter::once(0..2).collect();
        let mut w = [4.0f32, 5.0, 9.0];
        let norm = clip_update(&global, &mut w, &first_two, 1.0);
        assert_eq!(norm, 5.0);
        assert!(
            (w[0] - 1.6).abs() < 1e-6 && (w[1] - 1.8).abs() < 1e-6,
            "{w:?}"
        );
        // Outside the ranges nothing changes.
        assert_eq!(w[2], 9.0);
        let mut short = [1.3f32, 1.4, 0.0];
        let before = short;
        assert!((clip_update(&global, &mut short, &first_two, 1.0) - 0.5).abs() < 1e-6);
        assert_eq!(short, before);
    }
}
