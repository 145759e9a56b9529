//! Elementwise layers: ReLU, dropout, and the residual join (a sum, with an optional fused ReLU).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[inline(always)]
pub(crate) fn relu_forward(x: &[f32], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = v.max(0.0);
    }
}

/// `dx = dy` where the output `y` is positive, else 0.
#[inline(always)]
pub(crate) fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((d, g), o) in dx.iter_mut().zip(dy).zip(y) {
        *d = if *o > 0.0 { *g } else { 0.0 };
    }
}

/// Training: draws the keep mask (0 or 1/(1-p)) from `rng` and applies it; evaluation: a copy.
#[inline(always)]
pub(crate) fn dropout_forward(
    x: &[f32],
    y: &mut [f32],
    mask: &mut [f32],
    p: f32,
    train: Option<&mut ChaCha8Rng>,
) {
    match train {
        Some(rng) => {
            let keep = 1.0 / (1.0 - p);
            for m in mask.iter_mut() {
                *m = if rng.random::<f32>() < p { 0.0 } else { keep };
            }
            for ((o, v), m) in y.iter_mut().zip(x).zip(&*mask) {
                *o = v * m;
            }
        }
        None => y.copy_from_slice(x),
    }
}

#[inline(always)]
pub(crate) fn dropout_backward(mask: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((d, g), m) in dx.iter_mut().zip(dy).zip(mask) {
        *d = g * m;
    }
}

/// The residual join: `y = a + b` (then ReLU if `relu`).
#[inline(always)]
pub(crate) fn add_forward(a: &[f32], b: &[f32], y: &mut [f32], relu: bool) {
    if relu {
        for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
            *o = (u + v).max(0.0);
        }
    } else {
        for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
            *o = u + v;
        }
    }
}

/// `acc += g`: a gradient arriving at an activation that another reader has already sent one to.
#[inline(always)]
pub(crate) fn accumulate(acc: &mut [f32], g: &[f32]) {
    for (a, v) in acc.iter_mut().zip(g) {
        *a += v;
    }
}
