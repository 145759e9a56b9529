//! The training engine: a per-client [`Trainer`] workspace that runs forward, softmax
//! cross-entropy, backward and the SGD update on a [`Model`], and evaluation. All activation,
//! gradient and scratch buffers are sized for `max_batch` at construction, so a step allocates
//! nothing. Convolutions unfold a chunk of examples side by side (im2col) and run one GEMM per
//! chunk and pass; the last chunk's unfolded input is kept from forward for the weight gradient.
//! Linear layers are one GEMM per batch.
//!
//! Determinism: the only randomness (augmentation, dropout) comes from the step's `seed`; GEMMs
//! never split their reduction dimension across threads, so results do not depend on
//! `set_threads`.

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

use gemm::Parallelism;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::kernels::{Geom, avx2_dispatch, col2im, im2col, matmul, matmul_scaled};
use crate::model::Model;
use crate::spec::{ConvOp, ModelSpec, Op, Plan, PoolOp};
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

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;
const GN_EPS: f32 = 1e-5;
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
    /// BatchNorm: normalised input, per-channel inverse std, batch mean and biased variance.
    Bn {
        xhat: Vec<f32>,
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
    /// Gradients w.r.t. acts (gacts[0] is never computed).
    gacts: Vec<Vec<f32>>,
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
    row_len: usize,
    in_len: usize,
}

fn in_len_of(plan: &Plan) -> usize {
    plan.net_input.iter().product()
}

impl Trainer {
    pub fn new(spec: &ModelSpec, max_batch: usize) -> Result<Trainer, NnError> {
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
        let mut tmp = 0;
        let mut scratch = Vec::new();
        let mut wino = Vec::new();
        for (i, op) in plan.ops.iter().enumerate() {
            let prev = *lens.last().unwrap_or(&0);
            let out = op.out_len();
            wino.push(match op {
                Op::Conv(c) if winograd::eligible(c) => {
                    let normalised_next = matches!(
                        plan.ops.get(i + 1),
                        Some(Op::BatchNorm(_) | Op::GroupNorm(_))
                    );
                    Some(winograd::Workspace::new(c, max_batch, normalised_next))
                }
                _ => None,
            });
            let (col_len, ch) = match op {
                Op::Conv(c) if winograd::eligible(c) => (0, 0),
                Op::Conv(c) => {
                    let per = c.k() * c.hout * c.wout;
                    let ch = (COL_BUDGET / per).clamp(1, max_batch);
                    tmp = tmp.max(c.cout * (c.hout * c.wout * ch + c.k()));
                    (per * ch, ch)
                }
                Op::Linear(l) => {
                    tmp = tmp.max(l.fout * max_batch);
                    (0, 0)
                }
                _ => (0, 0),
            };
            cols.push(vec![0.0; col_len]);
            chunk.push(ch);
            scratch.push(match op {
                Op::Pool(_) => Scratch::Pool(vec![0; max_batch * out]),
                Op::Lrn { .. } => Scratch::Lrn {
                    s: vec![0.0; max_batch * out],
                    pw: vec![0.0; max_batch * out],
                    t: vec![0.0; out],
                },
                Op::BatchNorm(b) => Scratch::Bn {
                    xhat: vec![0.0; max_batch * out],
                    invstd: vec![0.0; b.c],
                    mean: vec![0.0; b.c],
                    var: vec![0.0; b.c],
                },
                Op::GroupNorm(g) => Scratch::Gn {
                    xhat: vec![0.0; max_batch * out],
                    invstd: vec![0.0; max_batch * g.groups],
                },
                Op::Dropout { .. } => Scratch::Drop(vec![0.0; max_batch * prev]),
                _ => Scratch::None,
            });
            lens.push(out);
        }
        let acts: Vec<Vec<f32>> = lens.iter().map(|l| vec![0.0; max_batch * l]).collect();
        let mut gacts: Vec<Vec<f32>> = lens.iter().map(|l| vec![0.0; max_batch * l]).collect();
        gacts[0] = Vec::new();
        Ok(Trainer {
            spec: spec.clone(),
            max_batch,
            threads: 1,
            acts,
            gacts,
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
            tmp: vec![0.0; tmp],
            grads: vec![0.0; plan.num_params],
            momentum: vec![0.0; plan.num_params],
            momentum_started: false,
            fused_sgd: plan
                .ops
                .iter()
                .flat_map(Op::param_ranges)
                .map(|(_, len)| len)
                .sum::<usize>()
                == plan.num_params,
            frozen: Vec::new(),
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
        let vecs: usize = self.acts.iter().chain(&self.gacts).map(Vec::len).sum();
        let scratch: usize = self
            .scratch
            .iter()
            .map(|s| match s {
                Scratch::None => 0,
                Scratch::Pool(v) => v.len(),
                Scratch::Lrn { s, pw, t } => s.len() + pw.len() + t.len(),
                Scratch::Bn {
                    xhat,
                    invstd,
                    mean,
                    var,
                } => xhat.len() + invstd.len() + mean.len() + var.len(),
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
        matches!(bn, BnPolicy::Train | BnPolicy::Local)
            && self
                .plan
                .ops
                .iter()
                .any(|o| matches!(o, Op::BatchNorm(b) if b.hw == 1))
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
        if matches!(bn, BnPolicy::Train | BnPolicy::Local) {
            self.update_running_stats(model.buffers_mut(), n);
        }
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

    fn forward(&mut self, p: &[f32], buf: &[f32], n: usize, mode: Mode, rng: &mut ChaCha8Rng) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { self.forward_avx2(p, buf, n, mode, rng) };
        }
        self.forward_impl(p, buf, n, mode, rng);
    }

    /// `forward_impl` compiled for AVX2. Only the code generation changes: Rust never contracts
    /// a*b+c into an FMA and LLVM keeps the order of float reductions, so results are bit-identical
    /// to the baseline build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn forward_avx2(&mut self, p: &[f32], buf: &[f32], n: usize, mode: Mode, rng: &mut ChaCha8Rng) {
        self.forward_impl(p, buf, n, mode, rng);
    }

    #[inline(always)]
    fn forward_impl(&mut self, p: &[f32], buf: &[f32], n: usize, mode: Mode, rng: &mut ChaCha8Rng) {
        let par = self.par();
        for (i, op) in self.plan.ops.iter().enumerate() {
            let (lo, hi) = self.acts.split_at_mut(i + 1);
            let x = &lo[i];
            let y = &mut hi[0];
            let out_len = op.out_len();
            match op {
                Op::Conv(c) if self.wino[i].is_some() => {
                    let ws = self.wino[i].as_mut().expect("checked just above");
                    winograd::forward(par, c, p, x, y, ws, n);
                }
                Op::Conv(c) => conv_forward(
                    par,
                    c,
                    p,
                    x,
                    y,
                    &mut self.cols[i],
                    &mut self.tmp,
                    self.chunk[i],
                    n,
                ),
                Op::Pool(pl) => {
                    let Scratch::Pool(arg) = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    if (pl.kh, pl.kw, pl.sh, pl.sw, pl.pt, pl.pl) == (2, 2, 2, 2, 0, 0) {
                        // The common 2x2/2 unpadded pool: no bounds checks; ties go to the first
                        // element in row-major window order, as in the general path.
                        pool2x2_forward(pl, x, y, arg, n);
                        continue;
                    }
                    pool_forward(pl, x, y, arg, n, &mut self.pool_cols);
                }
                Op::Lrn {
                    c,
                    hw,
                    radius,
                    bias,
                    alpha,
                    beta,
                } => {
                    let Scratch::Lrn { s, pw, .. } = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    lrn_forward(x, y, s, pw, n, *c, *hw, *radius, *bias, *alpha, *beta);
                }
                Op::Relu { len } => {
                    for (o, v) in y[..n * len].iter_mut().zip(&x[..n * len]) {
                        *o = v.max(0.0);
                    }
                }
                Op::Linear(l) => {
                    // y^T [fout, n] = W x^T: in this orientation gemm streams W as it is stored
                    // instead of repacking all of it for a handful of rows.
                    let yt = &mut self.tmp[..l.fout * n];
                    let w = &p[l.w..l.w + l.fout * l.fin];
                    matmul(par, l.fout, n, l.fin, yt, false, w, l.fin, 1, x, 1, l.fin);
                    let b = &p[l.b..l.b + l.fout];
                    for (s, row) in y[..n * l.fout].chunks_exact_mut(l.fout).enumerate() {
                        for (j, (v, bb)) in row.iter_mut().zip(b).enumerate() {
                            let t = yt[j * n + s] + bb;
                            *v = if l.relu { t.max(0.0) } else { t };
                        }
                    }
                }
                Op::Dropout { p: prob, len } => {
                    let Scratch::Drop(mask) = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    if matches!(mode, Mode::Train(_)) {
                        let keep = 1.0 / (1.0 - prob);
                        for m in &mut mask[..n * len] {
                            *m = if rng.random::<f32>() < *prob {
                                0.0
                            } else {
                                keep
                            };
                        }
                        for ((o, v), m) in y[..n * len].iter_mut().zip(&x[..n * len]).zip(&*mask) {
                            *o = v * m;
                        }
                    } else {
                        y[..n * len].copy_from_slice(&x[..n * len]);
                    }
                }
                Op::BatchNorm(b) => {
                    let Scratch::Bn {
                        xhat,
                        invstd,
                        mean,
                        var,
                    } = &mut self.scratch[i]
                    else {
                        unreachable!()
                    };
                    let batch_stats =
                        matches!(mode, Mode::Train(BnPolicy::Train | BnPolicy::Local));
                    let m = (n * b.hw) as f64;
                    for ch in 0..b.c {
                        let (mu, v) = if batch_stats {
                            let mut s = 0f64;
                            for smp in 0..n {
                                let off = (smp * b.c + ch) * b.hw;
                                s += x[off..off + b.hw]
                                    .iter()
                                    .map(|&v| f64::from(v))
                                    .sum::<f64>();
                            }
                            let mu = s / m;
                            let mut q = 0f64;
                            for smp in 0..n {
                                let off = (smp * b.c + ch) * b.hw;
                                q += x[off..off + b.hw]
                                    .iter()
                                    .map(|&v| (f64::from(v) - mu).powi(2))
                                    .sum::<f64>();
                            }
                            (mu as f32, (q / m) as f32)
                        } else {
                            (buf[b.rm + ch], buf[b.rv + ch])
                        };
                        mean[ch] = mu;
                        var[ch] = v;
                        let is = 1.0 / (v + BN_EPS).sqrt();
                        invstd[ch] = is;
                        let (g, be) = (p[b.w + ch], p[b.b + ch]);
                        for smp in 0..n {
                            let off = (smp * b.c + ch) * b.hw;
                            for j in off..off + b.hw {
                                let xh = (x[j] - mu) * is;
                                xhat[j] = xh;
                                y[j] = g * xh + be;
                            }
                        }
                    }
                }
                Op::GroupNorm(g) => {
                    let Scratch::Gn { xhat, invstd } = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    let cpg = g.c / g.groups;
                    let block = cpg * g.hw;
                    for sg in 0..n * g.groups {
                        let xs = &x[sg * block..(sg + 1) * block];
                        let mu = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / block as f64;
                        let var = xs.iter().map(|&v| (f64::from(v) - mu).powi(2)).sum::<f64>()
                            / block as f64;
                        let is = 1.0 / (var as f32 + GN_EPS).sqrt();
                        invstd[sg] = is;
                        let mu = mu as f32;
                        let first_c = (sg % g.groups) * cpg;
                        for k in 0..cpg {
                            let (gm, be) = (p[g.w + first_c + k], p[g.b + first_c + k]);
                            for j in sg * block + k * g.hw..sg * block + (k + 1) * g.hw {
                                let xh = (x[j] - mu) * is;
                                xhat[j] = xh;
                                y[j] = gm * xh + be;
                            }
                        }
                    }
                }
            }
            debug_assert!(y.len() >= n * out_len);
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

    /// Backward into `self.grads`; with `sgd`, each op's parameters are updated right after its
    /// gradients and input gradient are computed (nothing later in backward reads them).
    fn backward(&mut self, p: &mut [f32], n: usize, bn: BnPolicy, sgd: Option<&SgdConfig>) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { self.backward_avx2(p, n, bn, sgd) };
        }
        self.backward_impl(p, n, bn, sgd);
    }

    /// `backward_impl` compiled for AVX2 (bit-identical results, see `forward_avx2`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn backward_avx2(&mut self, p: &mut [f32], n: usize, bn: BnPolicy, sgd: Option<&SgdConfig>) {
        self.backward_impl(p, n, bn, sgd);
    }

    #[inline(always)]
    fn backward_impl(&mut self, pm: &mut [f32], n: usize, bn: BnPolicy, sgd: Option<&SgdConfig>) {
        let par = self.par();
        let grads = &mut self.grads;
        let first = !self.momentum_started;
        // Plain SGD (no momentum, no weight decay): a linear layer's weights are updated by the
        // weight-gradient GEMM itself, W -= lr * dy^T x, in one pass over W instead of writing
        // the gradient and reading it back (fc1 is megabytes, and at small batches that traffic
        // costs as much as the arithmetic). Its weight gradient is then never formed.
        let plain_lr = sgd
            .filter(|s| s.momentum == 0.0 && s.weight_decay == 0.0)
            .map(|s| s.lr);
        let in_gemm = |op: &Op| match op {
            Op::Linear(l) if plain_lr.is_some() => Some(l.w),
            _ => None,
        };
        for i in (0..self.plan.ops.len()).rev() {
            let op = &self.plan.ops[i];
            if let Some(sgd) = sgd {
                // The update of op i+1 (whose backward has just finished) before op i runs.
                if let Some(next) = self.plan.ops.get(i + 1) {
                    let done = in_gemm(next);
                    for (off, len) in next.param_ranges() {
                        if done == Some(off) {
                            continue;
                        }
                        let r = off..off + len;
                        sgd_update(
                            &mut pm[r.clone()],
                            &grads[r.clone()],
                            &mut self.momentum[r],
                            sgd,
                            first,
                        );
                    }
                }
            }
            let p: &[f32] = pm;
            let need_dx = i > 0;
            let (glo, ghi) = self.gacts.split_at_mut(i + 1);
            let yv = &self.acts[i + 1];
            // An im2col conv masks its fused ReLU while gathering its output gradient.
            let masked_here = match op {
                Op::Linear(l) => l.relu,
                Op::Conv(c) => c.relu && self.wino[i].is_some(),
                _ => false,
            };
            if masked_here {
                let len = n * op.out_len();
                for (d, o) in ghi[0][..len].iter_mut().zip(&yv[..len]) {
                    *d = if *o <= 0.0 { 0.0 } else { *d };
                }
            }
            let dy = &ghi[0];
            let dx = &mut glo[i];
            let x = &self.acts[i];
            match op {
                Op::Conv(c) if self.wino[i].is_some() => {
                    let ws = self.wino[i].as_mut().expect("checked just above");
                    winograd::backward(par, c, p, grads, x, dy, dx, ws, n, need_dx);
                }
                Op::Conv(c) => conv_backward(
                    par,
                    c,
                    p,
                    grads,
                    x,
                    yv,
                    dy,
                    dx,
                    &mut self.cols[i],
                    &mut self.tmp,
                    self.chunk[i],
                    n,
                    need_dx,
                ),
                Op::Pool(pl) => {
                    if need_dx {
                        let Scratch::Pool(arg) = &self.scratch[i] else {
                            unreachable!()
                        };
                        let out = n * pl.c * pl.hout * pl.wout;
                        let tiles =
                            (pl.kh, pl.kw, pl.sh, pl.sw, pl.pt, pl.pl) == (2, 2, 2, 2, 0, 0);
                        if tiles && pl.hin % 2 == 0 && pl.win % 2 == 0 {
                            // 2x2/2 windows tile the input exactly: no window overlaps another,
                            // so each plane is zeroed and stored into while it is in L1.
                            pool2x2_backward(pl, dy, arg, dx, n);
                        } else {
                            dx[..n * pl.c * pl.hin * pl.win].fill(0.0);
                            for (a, g) in arg[..out].iter().zip(&dy[..out]) {
                                dx[*a as usize] += g;
                            }
                        }
                    }
                }
                Op::Lrn {
                    c,
                    hw,
                    radius,
                    alpha,
                    beta,
                    ..
                } => {
                    if need_dx {
                        let Scratch::Lrn { s, pw, t } = &mut self.scratch[i] else {
                            unreachable!()
                        };
                        lrn_backward(x, dy, dx, s, pw, t, n, *c, *hw, *radius, *alpha, *beta);
                    }
                }
                Op::Relu { len } => {
                    if need_dx {
                        for ((d, g), o) in dx[..n * len]
                            .iter_mut()
                            .zip(&dy[..n * len])
                            .zip(&yv[..n * len])
                        {
                            *d = if *o > 0.0 { *g } else { 0.0 };
                        }
                    }
                }
                Op::Linear(l) => {
                    let dy = &dy[..n * l.fout];
                    let db = &mut grads[l.b..l.b + l.fout];
                    db.fill(0.0);
                    for row in dy.chunks_exact(l.fout) {
                        for (d, g) in db.iter_mut().zip(row) {
                            *d += g;
                        }
                    }
                    if need_dx {
                        // Before the weights change (the fused update below).
                        let w = &p[l.w..l.w + l.fout * l.fin];
                        matmul(
                            par,
                            n,
                            l.fin,
                            l.fout,
                            &mut dx[..n * l.fin],
                            false,
                            dy,
                            l.fout,
                            1,
                            w,
                            l.fin,
                            1,
                        );
                    }
                    let (dst, accumulate, scale) = match plain_lr {
                        Some(lr) => (&mut pm[l.w..l.w + l.fout * l.fin], true, -lr),
                        None => (&mut grads[l.w..l.w + l.fout * l.fin], false, 1.0),
                    };
                    matmul_scaled(
                        par, l.fout, l.fin, n, dst, accumulate, scale, dy, 1, l.fout, x, l.fin, 1,
                    );
                }
                Op::Dropout { len, .. } => {
                    if need_dx {
                        let Scratch::Drop(mask) = &self.scratch[i] else {
                            unreachable!()
                        };
                        for ((d, g), m) in dx[..n * len].iter_mut().zip(&dy[..n * len]).zip(mask) {
                            *d = g * m;
                        }
                    }
                }
                Op::BatchNorm(b) => {
                    let Scratch::Bn { xhat, invstd, .. } = &self.scratch[i] else {
                        unreachable!()
                    };
                    let batch_stats = matches!(bn, BnPolicy::Train | BnPolicy::Local);
                    let m = (n * b.hw) as f32;
                    for ch in 0..b.c {
                        let (mut sdy, mut sdyx) = (0f64, 0f64);
                        for smp in 0..n {
                            let off = (smp * b.c + ch) * b.hw;
                            for j in off..off + b.hw {
                                sdy += f64::from(dy[j]);
                                sdyx += f64::from(dy[j] * xhat[j]);
                            }
                        }
                        grads[b.w + ch] = sdyx as f32;
                        grads[b.b + ch] = sdy as f32;
                        if !need_dx {
                            continue;
                        }
                        let g = p[b.w + ch];
                        let k = g * invstd[ch];
                        let (mdy, mdyx) =
                            ((sdy / f64::from(m)) as f32, (sdyx / f64::from(m)) as f32);
                        for smp in 0..n {
                            let off = (smp * b.c + ch) * b.hw;
                            for j in off..off + b.hw {
                                dx[j] = if batch_stats {
                                    k * (dy[j] - mdy - xhat[j] * mdyx)
                                } else {
                                    k * dy[j]
                                };
                            }
                        }
                    }
                }
                Op::GroupNorm(g) => {
                    let Scratch::Gn { xhat, invstd } = &self.scratch[i] else {
                        unreachable!()
                    };
                    let cpg = g.c / g.groups;
                    let block = cpg * g.hw;
                    grads[g.w..g.w + g.c].fill(0.0);
                    grads[g.b..g.b + g.c].fill(0.0);
                    for sg in 0..n * g.groups {
                        let first_c = (sg % g.groups) * cpg;
                        let (mut a, mut bsum) = (0f64, 0f64);
                        for k in 0..cpg {
                            let gm = p[g.w + first_c + k];
                            let (mut sdy, mut sdyx) = (0f32, 0f32);
                            for j in sg * block + k * g.hw..sg * block + (k + 1) * g.hw {
                                sdy += dy[j];
                                sdyx += dy[j] * xhat[j];
                            }
                            grads[g.w + first_c + k] += sdyx;
                            grads[g.b + first_c + k] += sdy;
                            a += f64::from(gm * sdy);
                            bsum += f64::from(gm * sdyx);
                        }
                        if !need_dx {
                            continue;
                        }
                        let is = invstd[sg];
                        let (ma, mb) = ((a / block as f64) as f32, (bsum / block as f64) as f32);
                        for k in 0..cpg {
                            let gm = p[g.w + first_c + k];
                            for j in sg * block + k * g.hw..sg * block + (k + 1) * g.hw {
                                dx[j] = is * (gm * dy[j] - ma - xhat[j] * mb);
                            }
                        }
                    }
                }
            }
        }
        if let (Some(sgd), Some(op)) = (sgd, self.plan.ops.first()) {
            let done = in_gemm(op);
            for (off, len) in op.param_ranges() {
                if done == Some(off) {
                    continue;
                }
                let r = off..off + len;
                sgd_update(
                    &mut pm[r.clone()],
                    &grads[r.clone()],
                    &mut self.momentum[r],
                    sgd,
                    first,
                );
            }
        }
    }

    fn update_running_stats(&self, buf: &mut [f32], n: usize) {
        for (op, sc) in self.plan.ops.iter().zip(&self.scratch) {
            if let (Op::BatchNorm(b), Scratch::Bn { mean, var, .. }) = (op, sc) {
                let m = (n * b.hw) as f32;
                let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
                for ch in 0..b.c {
                    let rm = &mut buf[b.rm + ch];
                    *rm = (1.0 - BN_MOMENTUM) * *rm + BN_MOMENTUM * mean[ch];
                    let rv = &mut buf[b.rv + ch];
                    *rv = (1.0 - BN_MOMENTUM) * *rv + BN_MOMENTUM * var[ch] * unbias;
                }
                buf[b.nbt] += 1.0;
            }
        }
    }
}

/// Sum in eight interleaved lanes (vectorisable; a fixed order, so still deterministic).
#[inline(always)]
pub(crate) fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail
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

fn geom(c: &ConvOp) -> Geom {
    Geom {
        c: c.cin,
        h: c.hin,
        w: c.win,
        kh: c.kh,
        kw: c.kw,
        sh: c.sh,
        sw: c.sw,
        pt: c.pt,
        pl: c.pl,
        ho: c.hout,
        wo: c.wout,
    }
}

avx2_dispatch! {
    /// Any max-pool: the first valid element of the window starts, a later one wins when greater or
    /// NaN (ties go to the first in row-major window order). Windows clipped by the padding take
    /// the checked path; the others (all but an edge row and column for the study's 3x3/2 'SAME'
    /// pool) run without bounds checks, and with a column stride of 2, eight outputs at a time: the
    /// plane's even and odd columns are split apart first (into `cols`), so each window element of
    /// eight neighbouring outputs is one contiguous load.
    fn pool_forward(
        pl: &PoolOp,
        x: &[f32],
        y: &mut [f32],
        arg: &mut [u32],
        n: usize,
        cols: &mut [f32],
    ) {
        let in_plane = pl.hin * pl.win;
        // Output rows/columns whose whole window is inside the input.
        let inside =
            |o: usize, s: usize, p: usize, k: usize, len: usize| o * s >= p && o * s - p + k <= len;
        let half = pl.win.div_ceil(2);
        let lanes = pl.sw == 2 && cols.len() >= pool_cols_len(pl);
        let (even, odd) = cols.split_at_mut(cols.len() / 2);
        for sc in 0..n * pl.c {
            let xs = &x[sc * in_plane..(sc + 1) * in_plane];
            if lanes {
                for r in 0..pl.hin {
                    let row = &xs[r * pl.win..(r + 1) * pl.win];
                    for (j, pair) in row.chunks(2).enumerate() {
                        even[r * half + j] = pair[0];
                        odd[r * half + j] = *pair.get(1).unwrap_or(&0.0);
                    }
                }
            }
            for oh in 0..pl.hout {
                let row_in = inside(oh, pl.sh, pl.pt, pl.kh, pl.hin);
                let mut ow = 0;
                while ow < pl.wout {
                    let o = sc * pl.hout * pl.wout + oh * pl.wout + ow;
                    if lanes
                        && row_in
                        && ow + POOL_LANES <= pl.wout
                        && inside(ow, pl.sw, pl.pl, pl.kw, pl.win)
                        && inside(ow + POOL_LANES - 1, pl.sw, pl.pl, pl.kw, pl.win)
                    {
                        let ih0 = oh * pl.sh - pl.pt;
                        let mut best = [0f32; POOL_LANES];
                        let mut at = [0u32; POOL_LANES];
                        for ki in 0..pl.kh {
                            for kj in 0..pl.kw {
                                // Input column 2*(ow + l) + kj - pl, from the even or odd half.
                                let c0 = 2 * ow + kj - pl.pl;
                                let src = if c0.is_multiple_of(2) { &*even } else { &*odd };
                                let start = (ih0 + ki) * half + c0 / 2;
                                let vals = &src[start..start + POOL_LANES];
                                let base = ((ih0 + ki) * pl.win + c0) as u32;
                                if ki == 0 && kj == 0 {
                                    best.copy_from_slice(vals);
                                    for (l, a) in at.iter_mut().enumerate() {
                                        *a = base + 2 * l as u32;
                                    }
                                    continue;
                                }
                                for l in 0..POOL_LANES {
                                    let v = vals[l];
                                    let take = (((v > best[l]) | v.is_nan()) as u32).wrapping_neg();
                                    best[l] = f32::from_bits(
                                        (v.to_bits() & take) | (best[l].to_bits() & !take),
                                    );
                                    at[l] = ((base + 2 * l as u32) & take) | (at[l] & !take);
                                }
                            }
                        }
                        y[o..o + POOL_LANES].copy_from_slice(&best);
                        for (a, v) in arg[o..o + POOL_LANES].iter_mut().zip(at) {
                            *a = (sc * in_plane) as u32 + v;
                        }
                        ow += POOL_LANES;
                        continue;
                    }
                    let at = if row_in && inside(ow, pl.sw, pl.pl, pl.kw, pl.win) {
                        let corner = (oh * pl.sh - pl.pt) * pl.win + ow * pl.sw - pl.pl;
                        let (mut best, mut at) = (xs[corner], corner as u32);
                        for ki in 0..pl.kh {
                            let row = &xs[corner + ki * pl.win..][..pl.kw];
                            for (kj, &v) in row.iter().enumerate() {
                                // Branch-free select, as in `pool2x2_forward` (the first element
                                // compares with itself and loses).
                                let take = (((v > best) | v.is_nan()) as u32).wrapping_neg();
                                let idx = (corner + ki * pl.win + kj) as u32;
                                best = f32::from_bits(
                                    (v.to_bits() & take) | (best.to_bits() & !take),
                                );
                                at = (idx & take) | (at & !take);
                            }
                        }
                        y[o] = best;
                        at as usize
                    } else {
                        let mut best = f32::NEG_INFINITY;
                        let mut at = usize::MAX;
                        for ki in 0..pl.kh {
                            let ih = (oh * pl.sh + ki) as isize - pl.pt as isize;
                            if ih < 0 || ih as usize >= pl.hin {
                                continue;
                            }
                            for kj in 0..pl.kw {
                                let iw = (ow * pl.sw + kj) as isize - pl.pl as isize;
                                if iw < 0 || iw as usize >= pl.win {
                                    continue;
                                }
                                let idx = ih as usize * pl.win + iw as usize;
                                let v = xs[idx];
                                if v > best || at == usize::MAX || v.is_nan() {
                                    best = v;
                                    at = idx;
                                }
                            }
                        }
                        y[o] = best;
                        at
                    };
                    arg[o] = (sc * in_plane + at) as u32;
                    ow += 1;
                }
            }
        }
    }
}

/// Floats of column scratch [`pool_forward`] needs for `pl`.
fn pool_cols_len(pl: &PoolOp) -> usize {
    2 * pl.hin * pl.win.div_ceil(2)
}

/// Lanes of the strided max-pool path.
const POOL_LANES: usize = 8;

avx2_dispatch! {
    /// The common 2x2/2 unpadded max-pool; ties go to the first element in row-major window order,
    /// as in the general path. Kept out of line: inlined into the big forward, its loop state
    /// spills.
    #[inline(never)]
    fn pool2x2_forward(
        pl: &PoolOp,
        x: &[f32],
        y: &mut [f32],
        arg: &mut [u32],
        n: usize,
    ) {
        let (win, wout) = (pl.win, pl.wout);
        let in_plane = pl.hin * win;
        let out_plane = pl.hout * wout;
        // Candidates after the first, in row-major window order (offsets from the window's corner).
        let offs = [1u32, win as u32, win as u32 + 1];
        for sc in 0..n * pl.c {
            let xs = &x[sc * in_plane..(sc + 1) * in_plane];
            for oh in 0..pl.hout {
                let r0 = &xs[2 * oh * win..][..2 * wout];
                let r1 = &xs[(2 * oh + 1) * win..][..2 * wout];
                let o = sc * out_plane + oh * wout;
                let yrow = &mut y[o..o + wout];
                let arow = &mut arg[o..o + wout];
                let base = (sc * in_plane + 2 * oh * win) as u32;
                for ow in 0..wout {
                    let (mut best, mut at) = (r0[2 * ow], 0u32);
                    for (v, off) in [r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]]
                        .into_iter()
                        .zip(offs)
                    {
                        // All-ones mask when v wins (ties keep the first; NaN wins); integer blends
                        // keep LLVM from turning the selects into unpredictable branches.
                        let take = (((v > best) | v.is_nan()) as u32).wrapping_neg();
                        best = f32::from_bits((v.to_bits() & take) | (best.to_bits() & !take));
                        at = (off & take) | (at & !take);
                    }
                    yrow[ow] = best;
                    arow[ow] = base + 2 * ow as u32 + at;
                }
            }
        }
    }
}

/// Backward of [`pool2x2_forward`] when the windows tile the input exactly, plane by plane: zero
/// the plane (while it is in L1) and store each output gradient at its argmax, the one input of
/// its window that receives it. One vector fill and one store per output, where selecting each
/// of the four window values with compares took four stores and was ~4x slower.
#[inline(never)]
fn pool2x2_backward(pl: &PoolOp, dy: &[f32], arg: &[u32], dx: &mut [f32], n: usize) {
    let in_plane = pl.hin * pl.win;
    let out_plane = pl.hout * pl.wout;
    for sc in 0..n * pl.c {
        let plane = &mut dx[sc * in_plane..][..in_plane];
        plane.fill(0.0);
        let (g, a) = (
            &dy[sc * out_plane..][..out_plane],
            &arg[sc * out_plane..][..out_plane],
        );
        let first = sc * in_plane;
        for (gv, av) in g.iter().zip(a) {
            plane[*av as usize - first] = *gv;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn conv_forward(
    par: Parallelism,
    c: &ConvOp,
    p: &[f32],
    x: &[f32],
    y: &mut [f32],
    col: &mut [f32],
    tmp: &mut [f32],
    chunk: usize,
    n: usize,
) {
    let g = geom(c);
    let (k, hw) = (c.k(), c.hout * c.wout);
    let in_len = c.cin * c.hin * c.win;
    let out_len = c.cout * hw;
    let w = &p[c.w..c.w + c.cout * k];
    let b = &p[c.b..c.b + c.cout];
    for start in (0..n).step_by(chunk) {
        let m = chunk.min(n - start);
        let ld = m * hw;
        for s in 0..m {
            let xs = &x[(start + s) * in_len..(start + s + 1) * in_len];
            im2col(&g, xs, &mut col[s * hw..], ld);
        }
        matmul(par, c.cout, ld, k, tmp, false, w, k, 1, col, ld, 1);
        // Scatter [cout, m*hw] to [m, cout, hw], adding the bias (and the fused ReLU).
        for s in 0..m {
            let ys = &mut y[(start + s) * out_len..(start + s + 1) * out_len];
            for (co, (row, bb)) in ys.chunks_exact_mut(hw).zip(b).enumerate() {
                let src = &tmp[co * ld + s * hw..co * ld + (s + 1) * hw];
                if c.relu {
                    for (o, v) in row.iter_mut().zip(src) {
                        *o = (v + bb).max(0.0);
                    }
                } else {
                    for (o, v) in row.iter_mut().zip(src) {
                        *o = v + bb;
                    }
                }
            }
        }
    }
}

/// Backward of a conv over chunks in reverse order: the last chunk's unfolded input is still in
/// `col` from forward, earlier chunks are unfolded again. `y` is the layer's output (for the fused
/// ReLU's mask).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn conv_backward(
    par: Parallelism,
    c: &ConvOp,
    p: &[f32],
    grads: &mut [f32],
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    col: &mut [f32],
    tmp: &mut [f32],
    chunk: usize,
    n: usize,
    need_dx: bool,
) {
    let g = geom(c);
    let (k, hw) = (c.k(), c.hout * c.wout);
    let in_len = c.cin * c.hin * c.win;
    let out_len = c.cout * hw;
    let w = &p[c.w..c.w + c.cout * k];
    grads[c.b..c.b + c.cout].fill(0.0);
    let last = (n - 1) / chunk * chunk;
    for start in (0..n).step_by(chunk).rev() {
        let m = chunk.min(n - start);
        let ld = m * hw;
        if start != last {
            for s in 0..m {
                let xs = &x[(start + s) * in_len..(start + s + 1) * in_len];
                im2col(&g, xs, &mut col[s * hw..], ld);
            }
        }
        // Gather dy [m, cout, hw] into [cout, m*hw], masking the fused ReLU; bias gradient.
        for s in 0..m {
            let off = (start + s) * out_len;
            let dys = &dy[off..off + out_len];
            let ys = &y[off..off + out_len];
            for (co, (drow, yrow)) in dys.chunks_exact(hw).zip(ys.chunks_exact(hw)).enumerate() {
                let dst = &mut tmp[co * ld + s * hw..co * ld + (s + 1) * hw];
                if c.relu {
                    for ((d, v), o) in dst.iter_mut().zip(drow).zip(yrow) {
                        *d = if *o <= 0.0 { 0.0 } else { *v };
                    }
                } else {
                    dst.copy_from_slice(drow);
                }
                grads[c.b + co] += lane_sum(dst);
            }
        }
        // dW^T [k, cout] = col dy^T: in this orientation gemm reads the unfolded input in place
        // instead of repacking it.
        let (dyc, wgt) = tmp.split_at_mut(c.cout * chunk.min(n) * hw);
        matmul(
            par,
            k,
            c.cout,
            ld,
            wgt,
            start != last,
            col,
            ld,
            1,
            dyc,
            1,
            ld,
        );
        if need_dx {
            matmul(par, k, ld, c.cout, col, false, w, 1, k, dyc, ld, 1);
            for s in 0..m {
                let dxs = &mut dx[(start + s) * in_len..(start + s + 1) * in_len];
                col2im(&g, &col[s * hw..], ld, dxs);
            }
        }
    }
    let wgt = &tmp[c.cout * chunk.min(n) * hw..][..k * c.cout];
    for (co, row) in grads[c.w..c.w + c.cout * k].chunks_exact_mut(k).enumerate() {
        for (kk, v) in row.iter_mut().enumerate() {
            *v = wgt[kk * c.cout + co];
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn lrn_forward(
    x: &[f32],
    y: &mut [f32],
    s: &mut [f32],
    pw: &mut [f32],
    n: usize,
    c: usize,
    hw: usize,
    radius: usize,
    bias: f32,
    alpha: f32,
    beta: f32,
) {
    for smp in 0..n {
        let base = smp * c * hw;
        for ch in 0..c {
            let srow = &mut s[base + ch * hw..base + (ch + 1) * hw];
            srow.fill(0.0);
            for cc in ch.saturating_sub(radius)..(ch + radius + 1).min(c) {
                let xr = &x[base + cc * hw..base + (cc + 1) * hw];
                for (sv, xv) in srow.iter_mut().zip(xr) {
                    *sv += xv * xv;
                }
            }
            let off = base + ch * hw;
            // The branch stays outside the loop: inside, the vectoriser computes both sides and
            // calls powf for every value.
            if beta == 0.75 {
                for j in off..off + hw {
                    let sv = bias + alpha * s[j];
                    s[j] = sv;
                    let r = sv.sqrt();
                    let pv = 1.0 / (r * r.sqrt());
                    pw[j] = pv;
                    y[j] = x[j] * pv;
                }
            } else {
                for j in off..off + hw {
                    let sv = bias + alpha * s[j];
                    s[j] = sv;
                    let pv = sv.powf(-beta);
                    pw[j] = pv;
                    y[j] = x[j] * pv;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn lrn_backward(
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    s: &[f32],
    pw: &[f32],
    t: &mut [f32],
    n: usize,
    c: usize,
    hw: usize,
    radius: usize,
    alpha: f32,
    beta: f32,
) {
    // dx_j = dy_j s_j^-beta - 2 alpha beta x_j sum_{|c-j|<=r} t_c, t_c = dy_c x_c s_c^-beta / s_c.
    let k = 2.0 * alpha * beta;
    for smp in 0..n {
        let base = smp * c * hw;
        for (j, tv) in t[..c * hw].iter_mut().enumerate() {
            let g = base + j;
            *tv = dy[g] * x[g] * pw[g] / s[g];
        }
        for ch in 0..c {
            let off = base + ch * hw;
            let d = &mut dx[off..off + hw];
            for (j, dv) in d.iter_mut().enumerate() {
                *dv = dy[off + j] * pw[off + j];
            }
            for cc in ch.saturating_sub(radius)..(ch + radius + 1).min(c) {
                let tr = &t[cc * hw..(cc + 1) * hw];
                for ((dv, tv), xv) in d.iter_mut().zip(tr).zip(&x[off..off + hw]) {
                    *dv -= k * xv * tv;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The max-pool definition, checked at every element: the first valid element of the window
    /// starts, a later one wins when greater or NaN.
    fn pool_reference(pl: &PoolOp, x: &[f32], n: usize) -> (Vec<f32>, Vec<u32>) {
        let (mut y, mut arg) = (Vec::new(), Vec::new());
        for sc in 0..n * pl.c {
            for oh in 0..pl.hout {
                for ow in 0..pl.wout {
                    let mut best: Option<(f32, usize)> = None;
                    for ki in 0..pl.kh {
                        for kj in 0..pl.kw {
                            let ih = (oh * pl.sh + ki) as isize - pl.pt as isize;
                            let iw = (ow * pl.sw + kj) as isize - pl.pl as isize;
                            if ih < 0 || iw < 0 || ih as usize >= pl.hin || iw as usize >= pl.win {
                                continue;
                            }
                            let idx = (sc * pl.hin + ih as usize) * pl.win + iw as usize;
                            let v = x[idx];
                            if best.is_none_or(|(b, _)| v > b || v.is_nan()) {
                                best = Some((v, idx));
                            }
                        }
                    }
                    let (v, idx) = best.expect("every window has a valid element");
                    y.push(v);
                    arg.push(idx as u32);
                }
            }
        }
        (y, arg)
    }

    /// The strided eight-lane path and the unchecked path give the definition's values and argmax,
    /// ties (few distinct values), NaN and -inf included.
    #[test]
    fn pool_paths_match_the_definition() {
        let pool = |hin, win, kh, kw, sh, sw, pt, pl, hout, wout| PoolOp {
            c: 3,
            hin,
            win,
            kh,
            kw,
            sh,
            sw,
            pt,
            pl,
            hout,
            wout,
        };
        let cases = [
            // The study's 3x3/2 'SAME' pools (TF pads bottom/right).
            pool(24, 24, 3, 3, 2, 2, 0, 0, 12, 12),
            pool(12, 12, 3, 3, 2, 2, 0, 0, 6, 6),
            // Wide planes, odd widths, padding on the left, stride 1 rows.
            pool(9, 41, 3, 3, 1, 2, 1, 1, 9, 21),
            pool(7, 38, 2, 4, 2, 2, 0, 2, 3, 19),
            pool(5, 33, 3, 3, 2, 3, 1, 1, 3, 11),
        ];
        for (ci, pl) in cases.iter().enumerate() {
            let n = 2;
            let len = n * pl.c * pl.hin * pl.win;
            let mut state = 0x2545_F491_4F6C_DD1Du64 + ci as u64;
            let x: Vec<f32> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    match state % 50 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        r => (r % 4) as f32,
                    }
                })
                .collect();
            let (want_y, want_arg) = pool_reference(pl, &x, n);
            let out = n * pl.c * pl.hout * pl.wout;
            for with_lanes in [true, false] {
                let mut cols = vec![0.0; if with_lanes { pool_cols_len(pl) } else { 0 }];
                let (mut y, mut arg) = (vec![0.0; out], vec![0u32; out]);
                pool_forward(pl, &x, &mut y, &mut arg, n, &mut cols);
                assert_eq!(arg, want_arg, "case {ci}, lanes {with_lanes}: argmax");
                for (i, (a, b)) in y.iter().zip(&want_y).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "case {ci}, lanes {with_lanes}: y[{i}]"
                    );
                }
            }
        }
    }
}
