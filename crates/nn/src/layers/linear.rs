//! Fully connected layers: one GEMM per batch and pass, the bias and fused ReLU applied while the
//! output is transposed back, and an optional plain-SGD update fused into the weight-gradient GEMM.

use gemm::Parallelism;

use crate::kernels::{matmul, matmul_scaled};
use crate::plan::LinearOp;

/// `y = x W^T + b` (then ReLU if fused), `tmp` holding the transposed output [fout, n].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn linear_forward(
    par: Parallelism,
    l: &LinearOp,
    p: &[f32],
    x: &[f32],
    y: &mut [f32],
    tmp: &mut [f32],
    n: usize,
) {
    // y^T [fout, n] = W x^T: in this orientation gemm streams W as it is stored instead of
    // repacking all of it for a handful of rows.
    let yt = &mut tmp[..l.fout * n];
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

/// Bias gradient, input gradient (with `need_dx`, from the weights before any update) and weight
/// gradient; `dy` already masked by the fused ReLU. With `plain_lr`, the weights are updated by the
/// weight-gradient GEMM itself, `W -= lr * dy^T x`, and their gradient is never formed.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn linear_backward(
    par: Parallelism,
    l: &LinearOp,
    params: &mut [f32],
    grads: &mut [f32],
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    n: usize,
    need_dx: bool,
    plain_lr: Option<f32>,
) {
    let dy = &dy[..n * l.fout];
    let db = &mut grads[l.b..l.b + l.fout];
    db.fill(0.0);
    for row in dy.chunks_exact(l.fout) {
        for (d, g) in db.iter_mut().zip(row) {
            *d += g;
        }
    }
    if need_dx {
        let w = &params[l.w..l.w + l.fout * l.fin];
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
        Some(lr) => (&mut params[l.w..l.w + l.fout * l.fin], true, -lr),
        None => (&mut grads[l.w..l.w + l.fout * l.fin], false, 1.0),
    };
    matmul_scaled(
        par, l.fout, l.fin, n, dst, accumulate, scale, dy, 1, l.fout, x, l.fin, 1,
    );
}
