//! The training engine: a per-client [`Trainer`] workspace that runs forward, softmax
//! cross-entropy, backward and the SGD update on a [`Model`], and evaluation. All activation,
//! gradient and scratch buffers are sized for `max_batch` at construction, so a step allocates
//! nothing. This module holds the public API, the input pipeline (crop, flip), the loss and the
//! optimiser; `graph` walks the compiled ops forward and backward, calling the kernels of
//! `crate::layers`.
//!
//! Determinism: the only randomness (augmentation, dropout) comes from the step's `seed`; GEMMs
//! never split their reduction dimension across threads, so results do not depend on
//! `set_threads`.

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

mod graph;

use gemm::Parallelism;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::layers::norm;
use crate::layers::pool::pool_cols_len;
use crate::model::Model;
use crate::plan::{Op, Plan};
use crate::spec::ModelSpec;
use crate::winograd;

/// BatchNorm policy for training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BnPolicy {
    /// Batch statistics; running buffers updated.
    Train,
    /// Stored running statistics used in the training forward, never updated (affine still learns).
    Frozen,
    /// Trains like `Train`; keeping statistics and BN affine on the client is the FL layer's job.
    Local,
}

/// PyTorch SGD: `g = grad + wd*w; buf = momentum*buf + g (buf = g on the first step); w -= lr*buf`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// Hook so FedProx (proximal term) and SCAFFOLD (control variates) need no engine change: called
/// after backward, before the SGD update (and before weight decay is added).
pub trait GradCorrection: Sync {
    fn correct(&self, params: &[f32], grads: &mut [f32]);
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    pub correct: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalStats {
    pub loss_sum: f64,
    pub correct: usize,
    pub count: usize,
}

impl EvalStats {
    /// Fraction correct (0 when empty).
    pub fn accuracy(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.correct as f64 / self.count as f64
        }
    }
    /// Mean loss (0 when empty).
    pub fn mean_loss(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.loss_sum / self.count as f64
        }
    }
}

/// Floats of unfolded input per conv GEMM chunk (1 MB: with the weights and the chunk's output it
/// stays in a 2 MB L2; larger chunks measured slower on cifar-cnn, one example's col may exceed it).
const COL_BUDGET: usize = 1 << 18;

/// Per-op saved state between forward and backward.
#[derive(Debug)]
enum Scratch {
    None,
    /// Flat input index of each output's max.
    Pool(Vec<u32>),
    /// LRN: denominator base s = bias + alpha*sum, and s^-beta.
    Lrn {
        s: Vec<f32>,
        pw: Vec<f32>,
        t: Vec<f32>,
    },
    /// BatchNorm: per-channel inverse std, mean and biased variance used (backward recomputes
    /// the normalised input from them and the input).
    Bn {
        invstd: Vec<f32>,
        mean: Vec<f32>,
        var: Vec<f32>,
    },
    /// GroupNorm: normalised input and per-(example, group) inverse std.
    Gn {
        xhat: Vec<f32>,
        invstd: Vec<f32>,
    },
    /// Dropout multipliers (0 or 1/(1-p)).
    Drop(Vec<f32>),
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Train(BnPolicy),
    Eval,
}

/// Per-client workspace: scratch buffers and optimiser state.
pub struct Trainer {
    spec: ModelSpec,
    plan: Plan,
    max_batch: usize,
    threads: usize,
    /// acts[0] = network input (after crop/flip); acts[i+1] = output of op i.
    acts: Vec<Vec<f32>>,
    /// Values per example of each act.
    act_len: Vec<usize>,
    /// Gradients w.r.t. acts (gacts[0] is never computed).
    gacts: Vec<Vec<f32>>,
    /// Backward: whether an act's gradient already holds a later reader's contribution (a residual
    /// block's input has two readers; the second adds its part through `gsum`).
    has_grad: Vec<bool>,
    /// An input gradient that is added to, not stored in, its act's gradient (empty when every
    /// act has one reader).
    gsum: Vec<f32>,
    scratch: Vec<Scratch>,
    /// Per op: a conv's unfolded input for one chunk of `chunk[i]` examples (empty otherwise).
    cols: Vec<Vec<f32>>,
    chunk: Vec<usize>,
    /// Column scratch of the strided max-pool path (sized for the largest pool plane).
    pool_cols: Vec<f32>,
    /// Per op: the workspace of a conv that runs as Winograd convolution (`None` otherwise).
    wino: Vec<Option<winograd::Workspace>>,
    /// A conv's output (forward) or masked output gradient (backward) for one chunk, [cout, m*hw],
    /// followed in backward by its transposed weight gradient [k, cout]; a linear layer's
    /// transposed output [fout, n].
    tmp: Vec<f32>,
    grads: Vec<f32>,
    momentum: Vec<f32>,
    momentum_started: bool,
    /// The ops' parameter ranges cover every parameter, so backward can apply SGD layer by layer.
    fused_sgd: bool,
    /// Parameters SGD never changes (sorted, disjoint ranges of the parameter vector).
    frozen: Vec<std::ops::Range<usize>>,
    /// Per op: a BatchNorm that normalises with its stored statistics in training too and never
    /// updates them (see [`Trainer::set_frozen_statistics`]).
    frozen_stats: Vec<bool>,
    row_len: usize,
    in_len: usize,
}

fn in_len_of(plan: &Plan) -> usize {
    plan.net_input.iter().product()
}

/// How a trainer computes the convolutions Winograd's algorithm can take (3x3 and 5x5, stride 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Winograd where it applies, im2col + GEMM elsewhere: the fast default.
    #[default]
    Fastest,
    /// im2col + GEMM for every convolution: the direct sums, rounded as PyTorch's CPU path
    /// rounds them more nearly; for comparisons and for measuring what Winograd gains.
    Im2col,
}

/// Values whose all-zero bit pattern is zero: what [`batch_zeros`] may hand out.
///
/// # Safety
/// Implementors must be valid, with the value zero, when every byte is 0.
unsafe trait Zeroable: Copy {}
// SAFETY: 0.0f32 and 0u32 are the all-zero bit patterns.
unsafe impl Zeroable for f32 {}
unsafe impl Zeroable for u32 {}

/// `vec![0; batch * per_example]`, or [`NnError::OutOfMemory`] where `vec!` would abort the
/// process: the size of a training batch comes from a config, and a batch too big for the machine
/// is a config error to report, not a crash.
fn batch_zeros<T: Zeroable>(batch: usize, per_example: usize) -> Result<Vec<T>, NnError> {
    zeros(batch, batch as u128 * per_example as u128)
}

/// `vec![0; values]` for a trainer of `batch` examples, or [`NnError::OutOfMemory`]. Zeroed like
/// `vec!` (calloc), so pages a buffer never touches cost nothing.
fn zeros<T: Zeroable>(batch: usize, values: u128) -> Result<Vec<T>, NnError> {
    let oom = || NnError::OutOfMemory {
        batch,
        bytes: values.saturating_mul(std::mem::size_of::<T>() as u128),
    };
    let n = usize::try_from(values).map_err(|_| oom())?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
    // SAFETY: the layout's size is non-zero (n > 0 and T is f32 or u32).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(oom());
    }
    // SAFETY: `ptr` comes from the global allocator with T's alignment and room for exactly n
    // values, all bytes zero, which is a valid T (`Zeroable`); the Vec frees it with that layout.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

impl Trainer {
    pub fn new(spec: &ModelSpec, max_batch: usize) -> Result<Trainer, NnError> {
        Trainer::with_conv(spec, max_batch, ConvAlgorithm::Fastest)
    }

    /// [`Trainer::new`] computing convolutions by `conv`.
    pub fn with_conv(
        spec: &ModelSpec,
        max_batch: usize,
        conv: ConvAlgorithm,
    ) -> Result<Trainer, NnError> {
        let winograd_for =
            |c: &crate::plan::ConvOp| conv == ConvAlgorithm::Fastest && winograd::eligible(c);
        if max_batch == 0 {
            return Err(NnError::Config {
                field: "max_batch".into(),
                msg: "must be >= 1".into(),
            });
        }
        let plan = Plan::build(spec)?;
        let in_len = in_len_of(&plan);
        let mut lens = vec![in_len];
        let mut cols = Vec::new();
        let mut chunk = Vec::new();
        let mut tmp = 0u128;
        let mut scratch = Vec::new();
        let mut wino = Vec::new();
        for (i, op) in plan.ops.iter().enumerate() {
            let prev = lens[plan.inputs[i]];
            let out = op.out_len();
            wino.push(match op {
                Op::Conv(c) if winograd_for(c) => {
                    let normalised_next = matches!(
                        plan.ops.get(i + 1),
                        Some(Op::BatchNorm(_) | Op::GroupNorm(_))
                    );
                    Some(winograd::Workspace::new(c, max_batch, normalised_next))
                }
                _ => None,
            });
            let (col_len, ch) = match op {
                Op::Conv(c) if winograd_for(c) => (0, 0),
                Op::Conv(c) => {
                    let per = c.k() * c.hout * c.wout;
                    let ch = (COL_BUDGET / per).clamp(1, max_batch);
                    tmp = tmp.max((c.cout * (c.hout * c.wout * ch + c.k())) as u128);
                    (per * ch, ch)
                }
                Op::Linear(l) => {
                    tmp = tmp.max(l.fout as u128 * max_batch as u128);
                    (0, 0)
                }
                _ => (0, 0),
            };
            cols.push(vec![0.0; col_len]);
            chunk.push(ch);
            scratch.push(match op {
                Op::Pool(_) => Scratch::Pool(batch_zeros(max_batch, out)?),
                Op::Lrn { .. } => Scratch::Lrn {
                    s: batch_zeros(max_batch, out)?,
                    pw: batch_zeros(max_batch, out)?,
                    t: vec![0.0; out],
                },
                Op::BatchNorm(b) => Scratch::Bn {
                    invstd: vec![0.0; b.c],
                    mean: vec![0.0; b.c],
                    var: vec![0.0; b.c],
                },
                Op::GroupNorm(g) => Scratch::Gn {
                    xhat: batch_zeros(max_batch, out)?,
                    invstd: batch_zeros(max_batch, g.groups)?,
                },
                Op::Dropout { .. } => Scratch::Drop(batch_zeros(max_batch, prev)?),
                _ => Scratch::None,
            });
            lens.push(out);
        }
        let acts = lens
            .iter()
            .map(|&l| batch_zeros(max_batch, l))
            .collect::<Result<Vec<_>, _>>()?;
        // The input's gradient is never formed.
        let gacts = std::iter::once(Ok(Vec::new()))
            .chain(lens[1..].iter().map(|&l| batch_zeros(max_batch, l)))
            .collect::<Result<Vec<_>, _>>()?;
        let readers = crate::plan::readers(&plan.ops, &plan.inputs);
        let gsum_len = (1..lens.len())
            .filter(|&a| readers[a] > 1)
            .map(|a| lens[a])
            .max()
            .unwrap_or(0);
        Ok(Trainer {
            spec: spec.clone(),
            max_batch,
            threads: 1,
            acts,
            has_grad: vec![false; lens.len()],
            act_len: lens,
            gacts,
            gsum: batch_zeros(max_batch, gsum_len)?,
            scratch,
            cols,
            chunk,
            wino,
            pool_cols: vec![
                0.0;
                plan.ops
                    .iter()
                    .map(|o| match o {
                        Op::Pool(pl) => pool_cols_len(pl),
                        _ => 0,
                    })
                    .max()
                    .unwrap_or(0)
            ],
            tmp: zeros(max_batch, tmp)?,
            grads: zeros(max_batch, plan.num_params as u128)?,
            momentum: zeros(max_batch, plan.num_params as u128)?,
            momentum_started: false,
            fused_sgd: plan
                .ops
                .iter()
                .flat_map(Op::param_ranges)
                .map(|(_, len)| len)
                .sum::<usize>()
                == plan.num_params,
            frozen: Vec::new(),
            frozen_stats: vec![false; plan.ops.len()],
            row_len: spec.input.iter().product(),
            in_len,
            plan,
        })
    }

    /// Threads for the GEMMs inside this trainer (default 1); results are bit-identical whatever
    /// the value.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Parameters (ranges of the parameter vector) that training steps must leave unchanged:
    /// they get no update, no momentum and no weight decay. Their gradients are still computed
    /// where earlier layers need them.
    pub fn set_frozen(&mut self, mut ranges: Vec<std::ops::Range<usize>>) {
        ranges.retain(|r| !r.is_empty());
        ranges.sort_by_key(|r| r.start);
        self.frozen = ranges;
    }

    /// BatchNorm layers, by module name (`bn1`, `layer1.0.bn2`, `layer2.0.downsample.1`), that
    /// normalise with their stored running statistics while training too and never update them,
    /// whatever the step's [`BnPolicy`]: eval-mode BatchNorm for part of a network, such as a
    /// frozen pre-trained backbone. Their affine weight and bias still train unless frozen with
    /// [`Trainer::set_frozen`]. Replaces the previous list; a name that is not a BatchNorm layer
    /// of the model is an error and changes nothing.
    pub fn set_frozen_statistics(&mut self, layers: &[String]) -> Result<(), NnError> {
        let name_of = |op: &Op| match op {
            Op::BatchNorm(b) => self
                .plan
                .tensors
                .iter()
                .find(|t| t.buffer && t.offset == b.rm)
                .map(|t| t.layer.as_str()),
            _ => None,
        };
        let mut frozen = vec![false; self.plan.ops.len()];
        for layer in layers {
            let mut found = false;
            for (flag, op) in frozen.iter_mut().zip(&self.plan.ops) {
                if name_of(op) == Some(layer.as_str()) {
                    *flag = true;
                    found = true;
                }
            }
            if !found {
                return Err(NnError::Config {
                    field: "frozen statistics".into(),
                    msg: format!("model {} has no BatchNorm layer {layer:?}", self.spec.name),
                });
            }
        }
        self.frozen_stats = frozen;
        Ok(())
    }

    /// Whether op `i` normalises with batch statistics (and updates its running ones) under `mode`.
    fn batch_stats(&self, i: usize, mode: Mode) -> bool {
        matches!(mode, Mode::Train(BnPolicy::Train | BnPolicy::Local)) && !self.frozen_stats[i]
    }

    /// The parameter ranges SGD updates: everything outside the frozen ranges.
    fn trainable_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut at = 0;
        for r in &self.frozen {
            if r.start > at {
                out.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < self.plan.num_params {
            out.push(at..self.plan.num_params);
        }
        out
    }

    /// Zeroes the momentum buffers (the next step starts momentum afresh, as a new optimiser).
    pub fn reset_optimizer(&mut self) {
        self.momentum.fill(0.0);
        self.momentum_started = false;
    }

    /// Bytes held by this trainer's buffers (activations, gradients, scratch, optimiser state).
    pub fn workspace_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let vecs: usize = self
            .acts
            .iter()
            .chain(&self.gacts)
            .map(Vec::len)
            .sum::<usize>()
            + self.gsum.len();
        let scratch: usize = self
            .scratch
            .iter()
            .map(|s| match s {
                Scratch::None => 0,
                Scratch::Pool(v) => v.len(),
                Scratch::Lrn { s, pw, t } => s.len() + pw.len() + t.len(),
                Scratch::Bn { invstd, mean, var } => invstd.len() + mean.len() + var.len(),
                Scratch::Gn { xhat, invstd } => xhat.len() + invstd.len(),
                Scratch::Drop(v) => v.len(),
            })
            .sum();
        let cols: usize = self.cols.iter().map(Vec::len).sum::<usize>()
            + self
                .wino
                .iter()
                .flatten()
                .map(winograd::Workspace::floats)
                .sum::<usize>();
        f * (vecs
            + scratch
            + cols
            + self.pool_cols.len()
            + self.tmp.len()
            + self.grads.len()
            + self.momentum.len())
    }

    /// The gradient of the last `train_step` or `loss_and_grad` (same layout as `params()`).
    /// After a `train_step` with plain SGD (no momentum, weight decay or correction hook) the
    /// linear layers' weight gradients are not formed (the update is fused into their GEMM), so
    /// those ranges hold stale values.
    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    fn par(&self) -> Parallelism {
        if self.threads > 1 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }

    /// Whether a training batch of one example is undefined for this model under `bn`:
    /// BatchNorm over a single value per channel (BatchNorm1d after a Linear layer, or on 1x1
    /// maps) in train mode has zero batch variance, and PyTorch raises there. Such a step is an
    /// error; callers that split data into mini-batches should skip a last batch of one.
    pub fn single_example_batch_undefined(&self, bn: BnPolicy) -> bool {
        self.plan.ops.iter().enumerate().any(|(i, o)| {
            matches!(o, Op::BatchNorm(b) if b.hw == 1) && self.batch_stats(i, Mode::Train(bn))
        })
    }

    fn check_inputs(&self, model: &Model, x: &[f32], y: &[u16]) -> Result<(), NnError> {
        if model.spec() != &self.spec {
            return Err(NnError::SpecMismatch {
                trainer: self.spec.name.clone(),
                model: model.spec().name.clone(),
            });
        }
        if x.len() != y.len() * self.row_len {
            return Err(NnError::Shape {
                what: format!("x for {} labels of shape {:?}", y.len(), self.spec.input),
                expected: y.len() * self.row_len,
                got: x.len(),
            });
        }
        if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
            return Err(NnError::NonFinite {
                what: format!(
                    "input value {} of example {} is {}",
                    pos % self.row_len,
                    pos / self.row_len,
                    x[pos]
                ),
            });
        }
        if let Some((index, &label)) = y
            .iter()
            .enumerate()
            .find(|(_, l)| usize::from(**l) >= self.spec.classes)
        {
            return Err(NnError::Label {
                index,
                label,
                classes: self.spec.classes,
            });
        }
        Ok(())
    }

    /// Forward, loss and backward on one batch without updating anything but BatchNorm running
    /// statistics (per `bn`); the gradient is then in [`Trainer::grads`]. Returns the mean loss.
    pub fn loss_and_grad(
        &mut self,
        model: &mut Model,
        x: &[f32],
        y: &[u16],
        bn: BnPolicy,
        seed: u64,
    ) -> Result<StepStats, NnError> {
        self.step(model, x, y, bn, seed, None)
    }

    /// `loss_and_grad`; with `sgd`, also the SGD update, each layer's parameters updated as soon as
    /// backward has its gradient (still cache-warm) and no later layer needs its weights.
    fn step(
        &mut self,
        model: &mut Model,
        x: &[f32],
        y: &[u16],
        bn: BnPolicy,
        seed: u64,
        sgd: Option<&SgdConfig>,
    ) -> Result<StepStats, NnError> {
        self.check_inputs(model, x, y)?;
        let n = y.len();
        if n == 0 {
            return Err(NnError::Shape {
                what: "training batch".into(),
                expected: 1,
                got: 0,
            });
        }
        if n > self.max_batch {
            return Err(NnError::BatchTooLarge {
                batch: n,
                max: self.max_batch,
            });
        }
        if n == 1 && self.single_example_batch_undefined(bn) {
            return Err(NnError::Shape {
                what: "batch for BatchNorm1d in train mode (needs more than 1 value per channel)"
                    .into(),
                expected: 2,
                got: 1,
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.load_input(x, n, Some(&mut rng));
        self.forward(
            model.params(),
            model.buffers(),
            n,
            Mode::Train(bn),
            &mut rng,
        );
        let (loss_sum, correct) = self.loss(y, true);
        if !loss_sum.is_finite() {
            return Err(NnError::NonFinite {
                what: format!("training loss {loss_sum} (diverged or non-finite weights/inputs)"),
            });
        }
        self.backward(model.params_mut(), n, bn, sgd);
        if sgd.is_some_and(|s| s.momentum != 0.0) {
            self.momentum_started = true;
        }
        self.update_running_stats(model.buffers_mut(), n, bn);
        Ok(StepStats {
            loss: (loss_sum / n as f64) as f32,
            correct,
        })
    }

    /// One SGD step on a batch (`x`: batch * C*H*W values in the dataset's layout, `y`: labels).
    /// `seed` drives augmentation and dropout for this step.
    #[allow(clippy::too_many_arguments)]
    pub fn train_step(
        &mut self,
        model: &mut Model,
        x: &[f32],
        y: &[u16],
        sgd: &SgdConfig,
        bn: BnPolicy,
        seed: u64,
        correction: Option<&dyn GradCorrection>,
    ) -> Result<StepStats, NnError> {
        check_sgd(sgd)?;
        if correction.is_none() && self.fused_sgd && self.frozen.is_empty() {
            // No hook between backward and update: backward applies the update layer by layer.
            return self.step(model, x, y, bn, seed, Some(sgd));
        }
        let stats = self.loss_and_grad(model, x, y, bn, seed)?;
        if let Some(c) = correction {
            c.correct(model.params(), &mut self.grads);
        }
        let first = !self.momentum_started;
        for r in self.trainable_ranges() {
            sgd_update(
                &mut model.params_mut()[r.clone()],
                &self.grads[r.clone()],
                &mut self.momentum[r],
                sgd,
                first,
            );
        }
        if sgd.momentum != 0.0 {
            self.momentum_started = true;
        }
        Ok(stats)
    }

    /// Forward in eval mode (running statistics, no dropout, centre crop) over any number of
    /// examples, batched internally.
    pub fn evaluate(&mut self, model: &Model, x: &[f32], y: &[u16]) -> Result<EvalStats, NnError> {
        self.evaluate_inner(model, x, y, None)
    }

    /// [`Trainer::evaluate`], also returning each example's class probabilities (softmax of the
    /// logits, in f64; `y.len()` rows of `classes` values) for ranking metrics such as AUC.
    pub fn evaluate_with_probs(
        &mut self,
        model: &Model,
        x: &[f32],
        y: &[u16],
    ) -> Result<(EvalStats, Vec<f64>), NnError> {
        let mut probs = Vec::with_capacity(y.len() * self.spec.classes);
        let stats = self.evaluate_inner(model, x, y, Some(&mut probs))?;
        Ok((stats, probs))
    }

    fn evaluate_inner(
        &mut self,
        model: &Model,
        x: &[f32],
        y: &[u16],
        mut probs: Option<&mut Vec<f64>>,
    ) -> Result<EvalStats, NnError> {
        self.check_inputs(model, x, y)?;
        let mut stats = EvalStats::default();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (xc, yc) in x
            .chunks(self.max_batch * self.row_len)
            .zip(y.chunks(self.max_batch))
        {
            let n = yc.len();
            self.load_input(xc, n, None);
            self.forward(model.params(), model.buffers(), n, Mode::Eval, &mut rng);
            let (loss, correct) = self.loss(yc, false);
            stats.loss_sum += loss;
            stats.correct += correct;
            stats.count += n;
            if let Some(out) = probs.as_deref_mut() {
                let k = self.spec.classes;
                let logits = &self.acts[self.acts.len() - 1][..n * k];
                for row in logits.chunks_exact(k) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let start = out.len();
                    out.extend(row.iter().map(|&v| f64::from(v - max).exp()));
                    let sum: f64 = out[start..].iter().sum();
                    out[start..].iter_mut().for_each(|p| *p /= sum);
                }
            }
        }
        if !stats.loss_sum.is_finite() {
            return Err(NnError::NonFinite {
                what: format!("evaluation loss sum {}", stats.loss_sum),
            });
        }
        Ok(stats)
    }

    /// Copies rows into acts[0], cropping/flipping: random with `rng` (training), centre without.
    fn load_input(&mut self, x: &[f32], n: usize, rng: Option<&mut ChaCha8Rng>) {
        let [c, h, w] = self.spec.input;
        let [_, ch, cw] = self.plan.net_input;
        let dst = &mut self.acts[0];
        if ch == h && cw == w && !(self.spec.augment.hflip && rng.is_some()) {
            dst[..n * self.in_len].copy_from_slice(&x[..n * self.in_len]);
            return;
        }
        let mut rng = rng;
        for s in 0..n {
            let (oy, ox, flip) = match rng.as_deref_mut() {
                Some(r) => {
                    let oy = r.random_range(0..=h - ch);
                    let ox = r.random_range(0..=w - cw);
                    let flip = self.spec.augment.hflip && r.random_bool(0.5);
                    (oy, ox, flip)
                }
                None => ((h - ch) / 2, (w - cw) / 2, false),
            };
            for k in 0..c {
                for i in 0..ch {
                    let src = &x[s * self.row_len + k * h * w + (oy + i) * w + ox..][..cw];
                    let d = &mut dst[s * self.in_len + (k * ch + i) * cw..][..cw];
                    if flip {
                        for (dv, sv) in d.iter_mut().zip(src.iter().rev()) {
                            *dv = *sv;
                        }
                    } else {
                        d.copy_from_slice(src);
                    }
                }
            }
        }
    }

    /// Softmax cross-entropy on the last activations: (loss sum, correct); with `grad`, writes
    /// d(mean loss)/d(logits) into the last gradient buffer.
    fn loss(&mut self, y: &[u16], grad: bool) -> (f64, usize) {
        let k = self.spec.classes;
        let n = y.len();
        let last = self.acts.len() - 1;
        let logits = &self.acts[last][..n * k];
        let g = &mut self.gacts[last];
        let mut loss = 0f64;
        let mut correct = 0;
        for (s, (row, &label)) in logits.chunks_exact(k).zip(y).enumerate() {
            let label = usize::from(label);
            let (mut best, mut arg) = (row[0], 0);
            for (j, &v) in row.iter().enumerate() {
                if v > best {
                    best = v;
                    arg = j;
                }
            }
            if arg == label {
                correct += 1;
            }
            let sum: f64 = row.iter().map(|&v| f64::from(v - best).exp()).sum();
            let lse = sum.ln() + f64::from(best);
            loss += lse - f64::from(row[label]);
            if grad {
                let gr = &mut g[s * k..(s + 1) * k];
                for (j, (gv, &v)) in gr.iter_mut().zip(row).enumerate() {
                    let pr = (f64::from(v) - lse).exp();
                    let t = if j == label { 1.0 } else { 0.0 };
                    *gv = ((pr - t) / n as f64) as f32;
                }
            }
        }
        (loss, correct)
    }

    fn update_running_stats(&self, buf: &mut [f32], n: usize, bn: BnPolicy) {
        for (i, (op, sc)) in self.plan.ops.iter().zip(&self.scratch).enumerate() {
            if !self.batch_stats(i, Mode::Train(bn)) {
                continue;
            }
            if let (Op::BatchNorm(b), Scratch::Bn { mean, var, .. }) = (op, sc) {
                norm::bn_update_running_stats(b, buf, mean, var, n);
            }
        }
    }
}

/// PyTorch SGD on one slice of parameters (see [`SgdConfig`]); `first` starts the momentum buffer.
#[inline(always)]
fn sgd_update(w: &mut [f32], g: &[f32], buf: &mut [f32], sgd: &SgdConfig, first: bool) {
    let (lr, mom, wd) = (sgd.lr, sgd.momentum, sgd.weight_decay);
    if mom == 0.0 {
        for (w, g) in w.iter_mut().zip(g) {
            *w -= lr * (g + wd * *w);
        }
    } else {
        for ((w, g), b) in w.iter_mut().zip(g).zip(buf) {
            let d = g + wd * *w;
            *b = if first { d } else { mom * *b + d };
            *w -= lr * *b;
        }
    }
}

fn check_sgd(sgd: &SgdConfig) -> Result<(), NnError> {
    let bad = |field: &str, msg: &str| {
        Err(NnError::Config {
            field: field.into(),
            msg: msg.into(),
        })
    };
    if !(sgd.lr.is_finite() && sgd.lr >= 0.0) {
        return bad("lr", "must be finite and >= 0");
    }
    if !(0.0..1.0).contains(&sgd.momentum) {
        return bad("momentum", "must be in [0, 1)");
    }
    if !(sgd.weight_decay.is_finite() && sgd.weight_decay >= 0.0) {
        return bad("weight_decay", "must be finite and >= 0");
    }
    Ok(())
}
