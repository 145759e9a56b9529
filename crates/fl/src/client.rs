//! A client's local training: E epochs of mini-batch SGD over its own examples, starting from the
//! weights the server sent. Everything random (the order of examples, augmentation, dropout) is
//! drawn from seeds derived from (run seed, round, client, epoch, step), so a client's result does
//! not depend on which thread ran it or on what ran before.
//!
//! One batch is skipped: a last mini-batch of exactly one example when the model has BatchNorm
//! over a single value per channel (BatchNorm1d after a Linear layer) in train mode (`bn` =
//! `train` or `local`). Its batch variance is zero and the step undefined (PyTorch raises), so it
//! is dropped, as `drop_last` would, for that case only; every other batch, seed and step number
//! stays as it is.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use fedra_data::Dataset;
use fedra_nn::{BnPolicy, GradCorrection, Model, SgdConfig, Trainer};

use crate::error::FlError;
use crate::seed::{Purpose, derive};

/// Client id used for the centralised SGD runs (the baseline and the divergence twin), so their
/// seeds never collide with a real client's.
pub const CENTRAL_ID: usize = usize::MAX;

/// How one client trains in one round.
#[derive(Clone, Debug, PartialEq)]
pub struct FitConfig {
    pub round: usize,
    pub run_seed: u64,
    pub local_epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    pub bn: BnPolicy,
    /// FedProx: add mu * (w - w_global) to every gradient.
    pub prox_mu: Option<f32>,
    /// SCAFFOLD's steering of the local steps.
    pub control: Option<Steering>,
    /// Parameters (ranges of the parameter vector) that training leaves unchanged
    /// (`model.freeze`).
    pub frozen: Vec<std::ops::Range<usize>>,
    /// BatchNorm layers whose running statistics stay as they are and normalise in training
    /// (`model.freeze_statistics`).
    pub frozen_statistics: Vec<String>,
    /// Train on labels turned around (class c as classes - 1 - c): a label-flipping attacker
    /// (`[attack] kind = "label-flip"`, simulation only).
    pub flip_labels: bool,
}

/// SCAFFOLD's steering of one client's local steps.
#[derive(Clone, Debug, PartialEq)]
pub enum Steering {
    /// The correction c - c_i (one value per parameter), added to every gradient.
    Correction(std::sync::Arc<Vec<f32>>),
    /// The server's control c, for a client that keeps its own c_i on its machine (over a
    /// network): the c_i it computed in round `since`, the last round whose aggregate took its
    /// result (none: zero). The client forms the correction before training.
    ServerControl {
        c: std::sync::Arc<Vec<f32>>,
        since: Option<usize>,
    },
}

/// What a client sends back: its new weights and how much data produced them.
#[derive(Clone, Debug)]
pub struct FitResult {
    pub client: usize,
    pub num_examples: usize,
    pub params: Vec<f32>,
    pub buffers: Vec<f32>,
    /// Mean training loss over the examples trained in the last local epoch.
    pub train_loss: f64,
    /// Examples processed (epochs x examples, less a skipped last batch of one), for throughput
    /// figures.
    pub examples_seen: usize,
}

/// SCAFFOLD's correction: grad += c - c_i.
struct Control<'a> {
    shift: &'a [f32],
}

impl GradCorrection for Control<'_> {
    fn correct(&self, _params: &[f32], grads: &mut [f32]) {
        for (g, &d) in grads.iter_mut().zip(self.shift) {
            *g += d;
        }
    }
}

/// FedProx's proximal term as a gradient correction: grad += mu * (w - w_global).
struct Proximal<'a> {
    mu: f32,
    global: &'a [f32],
}

impl GradCorrection for Proximal<'_> {
    fn correct(&self, params: &[f32], grads: &mut [f32]) {
        for ((g, &w), &w0) in grads.iter_mut().zip(params).zip(self.global) {
            *g += self.mu * (w - w0);
        }
    }
}

/// Train `model` (already holding the start weights) on the examples `indices` of `data`.
pub fn fit(
    client: usize,
    indices: &[usize],
    data: &Dataset,
    model: &mut Model,
    config: &FitConfig,
    trainer: &mut Trainer,
) -> Result<FitResult, FlError> {
    let fail = |message: String| FlError::Client {
        client,
        round: config.round,
        message,
    };
    if indices.is_empty() {
        return Err(fail("has no training examples".into()));
    }
    if config.batch_size == 0 {
        return Err(fail("batch size 0".into()));
    }
    let skip_single = trainer.single_example_batch_undefined(config.bn);
    if skip_single && (indices.len() == 1 || config.batch_size == 1) {
        return Err(fail(format!(
            "every training batch would hold one example ({} examples, batch size {}), and \
             BatchNorm after a Linear layer in train mode needs at least 2 per batch; use a \
             larger batch, more data or bn = \"frozen\"",
            indices.len(),
            config.batch_size
        )));
    }
    let row = data.example_len();
    let last_class = data.num_classes().saturating_sub(1) as u16;
    let global = config.prox_mu.map(|_| model.params().to_vec());
    let proximal = match (config.prox_mu, global.as_deref()) {
        (Some(mu), Some(global)) => Some(Proximal { mu, global }),
        _ => None,
    };
    let control = match &config.control {
        None => None,
        Some(Steering::Correction(shift)) => Some(Control {
            shift: shift.as_slice(),
        }),
        Some(Steering::ServerControl { .. }) => {
            return Err(fail(
                "SCAFFOLD's server control reached local training: the client forms c - c_i \
                 from its own control first"
                    .into(),
            ));
        }
    };
    if control.is_some() && proximal.is_some() {
        return Err(fail(
            "SCAFFOLD's control and FedProx's proximal term together".into(),
        ));
    }
    if let Some(c) = &control
        && c.shift.len() != model.params().len()
    {
        return Err(fail(format!(
            "control of {} values for a model of {} parameters",
            c.shift.len(),
            model.params().len()
        )));
    }
    let correction = match (&proximal, &control) {
        (Some(p), _) => Some(p as &dyn GradCorrection),
        (None, Some(c)) => Some(c as &dyn GradCorrection),
        (None, None) => None,
    };

    trainer.reset_optimizer();
    trainer.set_frozen(config.frozen.clone());
    trainer
        .set_frozen_statistics(&config.frozen_statistics)
        .map_err(|e| fail(e.to_string()))?;
    let mut order = indices.to_vec();
    let mut x = vec![0f32; config.batch_size.min(indices.len()) * row];
    let mut y = vec![0u16; config.batch_size.min(indices.len())];
    let mut last_epoch_loss = 0f64;
    let mut seen = 0usize;
    for epoch in 0..config.local_epochs {
        let shuffle_seed = derive(
            config.run_seed,
            Purpose::Shuffle,
            &[config.round as u64, client as u64, epoch as u64],
        );
        order.copy_from_slice(indices);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(shuffle_seed));
        let mut loss_sum = 0f64;
        let mut trained = 0usize;
        for (step, batch) in order.chunks(config.batch_size).enumerate() {
            let n = batch.len();
            if n == 1 && skip_single {
                // Only the last batch can be this short (batch size >= 2, checked above).
                continue;
            }
            for (slot, &i) in batch.iter().enumerate() {
                x[slot * row..(slot + 1) * row].copy_from_slice(data.example(i));
                y[slot] = if config.flip_labels {
                    last_class - data.labels[i]
                } else {
                    data.labels[i]
                };
            }
            let step_seed = derive(
                config.run_seed,
                Purpose::Step,
                &[
                    config.round as u64,
                    client as u64,
                    epoch as u64,
                    step as u64,
                ],
            );
            let stats = trainer
                .train_step(
                    model,
                    &x[..n * row],
                    &y[..n],
                    &config.sgd,
                    config.bn,
                    step_seed,
                    correction,
                )
                .map_err(|e| fail(e.to_string()))?;
            if !stats.loss.is_finite() {
                return Err(fail(format!(
                    "training loss became {} in epoch {epoch}, step {step}",
                    stats.loss
                )));
            }
            loss_sum += stats.loss as f64 * n as f64;
            trained += n;
        }
        seen += trained;
        last_epoch_loss = loss_sum / trained as f64;
    }
    Ok(FitResult {
        client,
        num_examples: indices.len(),
        params: model.params().to_vec(),
        buffers: model.buffers().to_vec(),
        train_loss: last_epoch_loss,
        examples_seen: seen,
    })
}
