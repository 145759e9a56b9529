//! Running the compiled graph (`crate::plan`): forward over the ops in order, each reading its
//! input act (and a join its skip act) and writing the next; backward in reverse, each op's input
//! gradient stored into its input act's gradient, or added to it when a later reader (a residual
//! join) got there first. With a plain SGD config the update of each op's parameters is applied
//! as soon as backward has their gradient.

use rand_chacha::ChaCha8Rng;

use super::{BnPolicy, Mode, Scratch, SgdConfig, Trainer, sgd_update};
use crate::layers::conv::{conv_backward, conv_forward};
use crate::layers::elementwise::{
    accumulate, add_forward, dropout_backward, dropout_forward, relu_backward, relu_forward,
};
use crate::layers::linear::{linear_backward, linear_forward};
use crate::layers::lrn::{lrn_backward, lrn_forward};
use crate::layers::norm::{BnSaved, bn_backward, bn_forward, gn_backward, gn_forward};
use crate::layers::pool::{
    global_avg_pool_backward, global_avg_pool_forward, pool_backward, pool_forward, pool2x2_forward,
};
use crate::plan::Op;
use crate::winograd;

impl Trainer {
    pub(super) fn forward(
        &mut self,
        p: &[f32],
        buf: &[f32],
        n: usize,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) {
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
            let x = &lo[self.plan.inputs[i]];
            let y = &mut hi[0];
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
                    } else {
                        pool_forward(pl, x, y, arg, n, &mut self.pool_cols);
                    }
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
                Op::Relu { len } => relu_forward(&x[..n * len], &mut y[..n * len]),
                Op::Linear(l) => linear_forward(par, l, p, x, y, &mut self.tmp, n),
                Op::Dropout { p: prob, len } => {
                    let Scratch::Drop(mask) = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    let train = matches!(mode, Mode::Train(_)).then_some(&mut *rng);
                    dropout_forward(
                        &x[..n * len],
                        &mut y[..n * len],
                        &mut mask[..n * len],
                        *prob,
                        train,
                    );
                }
                Op::BatchNorm(b) => {
                    let Scratch::Bn { invstd, mean, var } = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    let batch_stats =
                        matches!(mode, Mode::Train(BnPolicy::Train | BnPolicy::Local))
                            && !self.frozen_stats[i];
                    let saved = BnSaved { invstd, mean, var };
                    bn_forward(b, p, buf, x, y, saved, n, batch_stats);
                }
                Op::GroupNorm(g) => {
                    let Scratch::Gn { xhat, invstd } = &mut self.scratch[i] else {
                        unreachable!()
                    };
                    gn_forward(g, p, x, y, xhat, invstd, n);
                }
                Op::GlobalAvgPool { c, hw } => global_avg_pool_forward(x, y, n * c, *hw),
                Op::Add { len, skip, relu } => {
                    let len = n * len;
                    add_forward(&x[..len], &lo[*skip][..len], &mut y[..len], *relu);
                }
            }
        }
    }

    /// Backward into `self.grads`; with `sgd`, each op's parameters are updated right after its
    /// gradients and input gradient are computed (nothing later in backward reads them).
    pub(super) fn backward(
        &mut self,
        p: &mut [f32],
        n: usize,
        bn: BnPolicy,
        sgd: Option<&SgdConfig>,
    ) {
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
        let has_grad = &mut self.has_grad;
        has_grad.fill(false);
        has_grad[self.plan.ops.len()] = true;
        let mut no_dx: [f32; 0] = [];
        for i in (0..self.plan.ops.len()).rev() {
            let op = &self.plan.ops[i];
            if let (Some(sgd), Some(next)) = (sgd, self.plan.ops.get(i + 1)) {
                // The update of op i+1 (whose backward has just finished) before op i runs.
                update_op(
                    next,
                    in_gemm(next),
                    pm,
                    grads,
                    &mut self.momentum,
                    sgd,
                    first,
                );
            }
            let input = self.plan.inputs[i];
            let need_dx = input > 0;
            let (glo, ghi) = self.gacts.split_at_mut(i + 1);
            let yv = &self.acts[i + 1];
            // Fused ReLUs are masked here, except an im2col conv's, masked while it gathers its
            // output gradient.
            let masked_here = match op {
                Op::Linear(l) => l.relu,
                Op::Conv(c) => c.relu && self.wino[i].is_some(),
                Op::Add { relu, .. } => *relu,
                _ => false,
            };
            if masked_here {
                let len = n * op.out_len();
                for (d, o) in ghi[0][..len].iter_mut().zip(&yv[..len]) {
                    *d = if *o <= 0.0 { 0.0 } else { *d };
                }
            }
            let dy = &ghi[0];
            let added = need_dx && has_grad[input];
            // A join passes its output gradient unchanged to both inputs: the main input takes
            // the buffer itself (swapped in below, after the shortcut's copy), not a copy.
            let join_hands_over =
                need_dx && !added && matches!(op, Op::Add { skip, .. } if *skip != input);
            let dx: &mut [f32] = if !need_dx {
                &mut no_dx
            } else if added {
                &mut self.gsum
            } else {
                &mut glo[input]
            };
            let x = &self.acts[input];
            let in_len = n * self.act_len[input];
            match op {
                Op::Conv(c) if self.wino[i].is_some() => {
                    let ws = self.wino[i].as_mut().expect("checked just above");
                    winograd::backward(par, c, pm, grads, x, dy, dx, ws, n, need_dx);
                }
                Op::Conv(c) => conv_backward(
                    par,
                    c,
                    pm,
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
                        pool_backward(pl, dy, arg, dx, n);
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
                        let len = n * len;
                        relu_backward(&yv[..len], &dy[..len], &mut dx[..len]);
                    }
                }
                Op::Linear(l) => {
                    linear_backward(par, l, pm, grads, x, dy, dx, n, need_dx, plain_lr);
                }
                Op::Dropout { len, .. } => {
                    if need_dx {
                        let Scratch::Drop(mask) = &self.scratch[i] else {
                            unreachable!()
                        };
                        let len = n * len;
                        dropout_backward(&mask[..len], &dy[..len], &mut dx[..len]);
                    }
                }
                Op::BatchNorm(b) => {
                    let Scratch::Bn { invstd, mean, .. } = &self.scratch[i] else {
                        unreachable!()
                    };
                    let batch_stats =
                        matches!(bn, BnPolicy::Train | BnPolicy::Local) && !self.frozen_stats[i];
                    bn_backward(
                        b,
                        pm,
                        grads,
                        dy,
                        dx,
                        (x, mean, invstd),
                        n,
                        batch_stats,
                        need_dx,
                    );
                }
                Op::GroupNorm(g) => {
                    let Scratch::Gn { xhat, invstd } = &self.scratch[i] else {
                        unreachable!()
                    };
                    gn_backward(g, pm, grads, dy, dx, xhat, invstd, n, need_dx);
                }
                Op::GlobalAvgPool { c, hw } => {
                    if need_dx {
                        global_avg_pool_backward(dy, dx, n * c, *hw);
                    }
                }
                Op::Add { len, .. } => {
                    if need_dx && !join_hands_over {
                        let len = n * len;
                        dx[..len].copy_from_slice(&dy[..len]);
                    }
                }
            }
            if added {
                accumulate(&mut glo[input][..in_len], &self.gsum[..in_len]);
            }
            if need_dx {
                has_grad[input] = true;
            }
            if let Op::Add { len, skip, .. } = *op
                && skip > 0
            {
                // The shortcut's gradient is the join's too.
                let len = n * len;
                if has_grad[skip] {
                    accumulate(&mut glo[skip][..len], &dy[..len]);
                } else {
                    glo[skip][..len].copy_from_slice(&dy[..len]);
                    has_grad[skip] = true;
                }
            }
            if join_hands_over {
                // Both buffers hold this many values (a join's input and output have one shape),
                // and nothing reads the join's output gradient after its own backward.
                std::mem::swap(&mut glo[input], &mut ghi[0]);
            }
        }
        if let (Some(sgd), Some(op)) = (sgd, self.plan.ops.first()) {
            update_op(op, in_gemm(op), pm, grads, &mut self.momentum, sgd, first);
        }
    }
}

/// SGD on one op's parameters, except the tensor at offset `done` (already updated by its
/// weight-gradient GEMM).
#[inline(always)]
fn update_op(
    op: &Op,
    done: Option<usize>,
    params: &mut [f32],
    grads: &[f32],
    momentum: &mut [f32],
    sgd: &SgdConfig,
    first: bool,
) {
    for (off, len) in op.param_ranges() {
        if done == Some(off) || len == 0 {
            continue;
        }
        let r = off..off + len;
        sgd_update(
            &mut params[r.clone()],
            &grads[r.clone()],
            &mut momentum[r],
            sgd,
            first,
        );
    }
}
