//! TensorFlow local response normalisation across channels.

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn lrn_forward(
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
pub(crate) fn lrn_backward(
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
