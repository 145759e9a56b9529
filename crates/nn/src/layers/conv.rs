//! Convolution by im2col + GEMM: a chunk of examples is unfolded side by side and multiplied by
//! the weights in one GEMM per chunk and pass; the last chunk's unfolded input is kept from forward
//! for the weight gradient. (5x5 stride-1 convolutions run as Winograd convolution instead, in
//! `crate::winograd`.)

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

use gemm::Parallelism;

use crate::kernels::{Geom, col2im, im2col, lane_sum, matmul};
use crate::plan::ConvOp;

pub(crate) fn geom(c: &ConvOp) -> Geom {
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

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn conv_forward(
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
    let bias = |co: usize| if c.bias { p[c.b + co] } else { 0.0 };
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
            for (co, row) in ys.chunks_exact_mut(hw).enumerate() {
                let bb = bias(co);
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
pub(crate) fn conv_backward(
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
    if c.bias {
        grads[c.b..c.b + c.cout].fill(0.0);
    }
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
                if c.bias {
                    grads[c.b + co] += lane_sum(dst);
                }
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
