//! BatchNorm (2d over [C,H,W] maps, 1d over vectors) and GroupNorm: forward, backward, and
//! BatchNorm's running statistics. Statistics are reduced in f64, so they do not depend on the
//! batch's order of magnitude, over interleaved partial sums, so the reductions are vector code.

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

use crate::plan::{BnOp, GnOp};

/// Partial sums per lane: element `j` of a reduction goes to lane `j % LANES`, and the lanes are
/// added in order at the end. A fixed order (so the same bits whatever the CPU) that, unlike one
/// running sum, is a loop LLVM turns into vector adds: one f64 chain per element would cost
/// an add's latency per element, more than the rest of a normalisation layer together.
const LANES: usize = 16;

/// `acc[j % LANES] += f(xs[j])` (lanes counted from the start of `xs`).
#[inline(always)]
fn add_lanes(acc: &mut [f64; LANES], xs: &[f32], f: impl Fn(f32) -> f64) {
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f(v);
    }
}

/// Backward's two sums in one pass: `sdy[j % LANES] += d` and `sdyx[j % LANES] += d * xhat` (the
/// product in f32, as before the lanes), where `(d, xhat) = at(dy[j], v[j])` gives the output
/// gradient that passed the fused ReLU, if any, and the normalised input, from `v` (the stored
/// normalised input, or the input it is recomputed from).
#[inline(always)]
fn add_dy_dyx(
    sdy: &mut [f64; LANES],
    sdyx: &mut [f64; LANES],
    dy: &[f32],
    v: &[f32],
    at: impl Fn(f32, f32) -> (f32, f32),
) {
    assert_eq!(dy.len(), v.len());
    let (cd, cv) = (dy.chunks_exact(LANES), v.chunks_exact(LANES));
    let (rd, rv) = (cd.remainder(), cv.remainder());
    for (d, v) in cd.zip(cv) {
        for l in 0..LANES {
            let (d, xh) = at(d[l], v[l]);
            sdy[l] += f64::from(d);
            sdyx[l] += f64::from(d * xh);
        }
    }
    for (l, (&d, &v)) in rd.iter().zip(rv).enumerate() {
        let (d, xh) = at(d, v);
        sdy[l] += f64::from(d);
        sdyx[l] += f64::from(d * xh);
    }
}

/// ReLU's backward on a normalisation's output `out` (before the ReLU): the gradient passes
/// where `max(out, 0)` is positive, i.e. where `out > 0` (a NaN `out` gives 0, so it is masked
/// too); without a fused ReLU, always.
#[inline(always)]
fn relu_passes<const RELU: bool>(out: f32) -> bool {
    !RELU || out > 0.0
}

/// One channel's normalisation, as forward computes it and backward recomputes it (the same
/// expressions, so the same bits): `xhat = (x - mean) * invstd`, the output `gamma * xhat + beta`,
/// and whether a fused ReLU passes it (the output is positive).
#[derive(Clone, Copy)]
struct Affine {
    mean: f32,
    invstd: f32,
    gamma: f32,
    beta: f32,
}

impl Affine {
    #[inline(always)]
    fn xhat(self, x: f32) -> f32 {
        (x - self.mean) * self.invstd
    }

    #[inline(always)]
    fn out(self, xhat: f32) -> f32 {
        self.gamma * xhat + self.beta
    }

    /// The output gradient that passed the fused ReLU, if any (its mask recomputed instead of
    /// stored), and xhat, at input `x`.
    #[inline(always)]
    fn dy_xhat<const RELU: bool>(self, dy: f32, x: f32) -> (f32, f32) {
        let xh = self.xhat(x);
        (
            if relu_passes::<RELU>(self.out(xh)) {
                dy
            } else {
                0.0
            },
            xh,
        )
    }
}

/// The lanes' total, added in lane order.
#[inline(always)]
fn total(acc: [f64; LANES]) -> f64 {
    acc.iter().sum()
}

pub(crate) const BN_EPS: f32 = 1e-5;
pub(crate) const BN_MOMENTUM: f32 = 0.1;
pub(crate) const GN_EPS: f32 = 1e-5;

/// What BatchNorm's forward keeps for backward and for the running statistics. The normalised
/// input is not kept: backward recomputes it from the input, which the graph keeps anyway.
pub(crate) struct BnSaved<'a> {
    /// Per-channel inverse standard deviation.
    pub invstd: &'a mut [f32],
    /// Per-channel mean and biased variance used (the batch's, or the running ones).
    pub mean: &'a mut [f32],
    pub var: &'a mut [f32],
}

/// `batch_stats`: normalise with the batch's statistics (training with `train`/`local`);
/// otherwise with the running ones in `buf` (evaluation, or training with `frozen`). The fused
/// ReLU, if any, is applied to the output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn bn_forward(
    b: &BnOp,
    p: &[f32],
    buf: &[f32],
    x: &[f32],
    y: &mut [f32],
    saved: BnSaved<'_>,
    n: usize,
    batch_stats: bool,
) {
    let BnSaved { invstd, mean, var } = saved;
    let m = (n * b.hw) as f64;
    for ch in 0..b.c {
        let (mu, v) = if batch_stats {
            let mut s = [0f64; LANES];
            for smp in 0..n {
                let off = (smp * b.c + ch) * b.hw;
                add_lanes(&mut s, &x[off..off + b.hw], f64::from);
            }
            let mu = total(s) / m;
            let mut q = [0f64; LANES];
            for smp in 0..n {
                let off = (smp * b.c + ch) * b.hw;
                add_lanes(&mut q, &x[off..off + b.hw], |v| {
                    let d = f64::from(v) - mu;
                    d * d
                });
            }
            (mu as f32, (total(q) / m) as f32)
        } else {
            (buf[b.rm + ch], buf[b.rv + ch])
        };
        mean[ch] = mu;
        var[ch] = v;
        let is = 1.0 / (v + BN_EPS).sqrt();
        invstd[ch] = is;
        let a = Affine {
            mean: mu,
            invstd: is,
            gamma: p[b.w + ch],
            beta: p[b.b + ch],
        };
        for smp in 0..n {
            let r = (smp * b.c + ch) * b.hw..(smp * b.c + ch + 1) * b.hw;
            // Zipped slices: no per-element bounds check, so the loop is vector code.
            let (y, x) = (&mut y[r.clone()], &x[r]);
            if b.relu {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = a.out(a.xhat(v)).max(0.0);
                }
            } else {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = a.out(a.xhat(v));
                }
            }
        }
    }
}

/// Weight and bias gradients into `grads`; with `need_dx`, the input gradient into `dx` (through
/// the batch statistics when `batch_stats`, else a per-channel scale). `x` is the forward's
/// input and `mean`, `invstd` what forward saved; `dy` is the gradient of the output after the
/// fused ReLU, if any.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn bn_backward(
    b: &BnOp,
    p: &[f32],
    grads: &mut [f32],
    dy: &[f32],
    dx: &mut [f32],
    saved: (&[f32], &[f32], &[f32]),
    n: usize,
    batch_stats: bool,
    need_dx: bool,
) {
    if b.relu {
        bn_backward_with::<true>(b, p, grads, dy, dx, saved, n, batch_stats, need_dx);
    } else {
        bn_backward_with::<false>(b, p, grads, dy, dx, saved, n, batch_stats, need_dx);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bn_backward_with<const RELU: bool>(
    b: &BnOp,
    p: &[f32],
    grads: &mut [f32],
    dy: &[f32],
    dx: &mut [f32],
    (x, mean, invstd): (&[f32], &[f32], &[f32]),
    n: usize,
    batch_stats: bool,
    need_dx: bool,
) {
    let m = (n * b.hw) as f32;
    for ch in 0..b.c {
        let a = Affine {
            mean: mean[ch],
            invstd: invstd[ch],
            gamma: p[b.w + ch],
            beta: p[b.b + ch],
        };
        let (mut ady, mut adyx) = ([0f64; LANES], [0f64; LANES]);
        for smp in 0..n {
            let off = (smp * b.c + ch) * b.hw;
            let (dy, x) = (&dy[off..off + b.hw], &x[off..off + b.hw]);
            add_dy_dyx(&mut ady, &mut adyx, dy, x, |d, v| a.dy_xhat::<RELU>(d, v));
        }
        let (sdy, sdyx) = (total(ady), total(adyx));
        grads[b.w + ch] = sdyx as f32;
        grads[b.b + ch] = sdy as f32;
        if !need_dx {
            continue;
        }
        let k = a.gamma * a.invstd;
        let (mdy, mdyx) = ((sdy / f64::from(m)) as f32, (sdyx / f64::from(m)) as f32);
        for smp in 0..n {
            let r = (smp * b.c + ch) * b.hw..(smp * b.c + ch + 1) * b.hw;
            let (dx, dy, x) = (&mut dx[r.clone()], &dy[r.clone()], &x[r]);
            if batch_stats {
                for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                    let (g, xh) = a.dy_xhat::<RELU>(g, v);
                    *d = k * (g - mdy - xh * mdyx);
                }
            } else {
                for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                    *d = k * a.dy_xhat::<RELU>(g, v).0;
                }
            }
        }
    }
}

/// PyTorch's running-statistics update after a training forward with batch statistics: momentum
/// 0.1, the variance unbiased, `num_batches_tracked` counted.
pub(crate) fn bn_update_running_stats(
    b: &BnOp,
    buf: &mut [f32],
    mean: &[f32],
    var: &[f32],
    n: usize,
) {
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

/// GroupNorm forward; keeps the normalised input and per-(example, group) inverse std. The fused
/// ReLU, if any, is applied to the output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gn_forward(
    g: &GnOp,
    p: &[f32],
    x: &[f32],
    y: &mut [f32],
    xhat: &mut [f32],
    invstd: &mut [f32],
    n: usize,
) {
    let cpg = g.c / g.groups;
    let block = cpg * g.hw;
    for sg in 0..n * g.groups {
        let xs = &x[sg * block..(sg + 1) * block];
        let mut s = [0f64; LANES];
        add_lanes(&mut s, xs, f64::from);
        let mu = total(s) / block as f64;
        let mut q = [0f64; LANES];
        add_lanes(&mut q, xs, |v| {
            let d = f64::from(v) - mu;
            d * d
        });
        let var = total(q) / block as f64;
        let is = 1.0 / (var as f32 + GN_EPS).sqrt();
        invstd[sg] = is;
        let mu = mu as f32;
        let first_c = (sg % g.groups) * cpg;
        for k in 0..cpg {
            let (gm, be) = (p[g.w + first_c + k], p[g.b + first_c + k]);
            for j in sg * block + k * g.hw..sg * block + (k + 1) * g.hw {
                let xh = (x[j] - mu) * is;
                xhat[j] = xh;
                let o = gm * xh + be;
                y[j] = if g.relu { o.max(0.0) } else { o };
            }
        }
    }
}

/// GroupNorm backward; `dy` is the gradient of the output after the fused ReLU, if any, whose
/// mask is recomputed from the normalised input (the forward's expression, so the same bits).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gn_backward(
    g: &GnOp,
    p: &[f32],
    grads: &mut [f32],
    dy: &[f32],
    dx: &mut [f32],
    xhat: &[f32],
    invstd: &[f32],
    n: usize,
    need_dx: bool,
) {
    if g.relu {
        gn_backward_with::<true>(g, p, grads, dy, dx, xhat, invstd, n, need_dx);
    } else {
        gn_backward_with::<false>(g, p, grads, dy, dx, xhat, invstd, n, need_dx);
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gn_backward_with<const RELU: bool>(
    g: &GnOp,
    p: &[f32],
    grads: &mut [f32],
    dy: &[f32],
    dx: &mut [f32],
    xhat: &[f32],
    invstd: &[f32],
    n: usize,
    need_dx: bool,
) {
    let cpg = g.c / g.groups;
    let block = cpg * g.hw;
    grads[g.w..g.w + g.c].fill(0.0);
    grads[g.b..g.b + g.c].fill(0.0);
    for sg in 0..n * g.groups {
        let first_c = (sg % g.groups) * cpg;
        let (mut a, mut bsum) = (0f64, 0f64);
        for k in 0..cpg {
            let (gm, be) = (p[g.w + first_c + k], p[g.b + first_c + k]);
            let range = sg * block + k * g.hw..sg * block + (k + 1) * g.hw;
            let (mut ady, mut adyx) = ([0f64; LANES], [0f64; LANES]);
            let (dy, xhat) = (&dy[range.clone()], &xhat[range]);
            add_dy_dyx(&mut ady, &mut adyx, dy, xhat, |d, xh| {
                (
                    if relu_passes::<RELU>(gm * xh + be) {
                        d
                    } else {
                        0.0
                    },
                    xh,
                )
            });
            let (sdy, sdyx) = (total(ady) as f32, total(adyx) as f32);
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
            let (gm, be) = (p[g.w + first_c + k], p[g.b + first_c + k]);
            let range = sg * block + k * g.hw..sg * block + (k + 1) * g.hw;
            let (dx, dy, xhat) = (&mut dx[range.clone()], &dy[range.clone()], &xhat[range]);
            for ((d, &gy), &xh) in dx.iter_mut().zip(dy).zip(xhat) {
                let gy = if relu_passes::<RELU>(gm * xh + be) {
                    gy
                } else {
                    0.0
                };
                *d = is * (gm * gy - ma - xh * mb);
            }
        }
    }
}
