//! Max pooling (any window, stride and padding, with its argmax kept for backward) and global
//! average pooling.

// Kernels index several parallel arrays (input, output, saved state) with one index.
#![allow(clippy::needless_range_loop)]

use crate::kernels::avx2_dispatch;
use crate::plan::PoolOp;

avx2_dispatch! {
    /// Any max-pool: the first valid element of the window starts, a later one wins when greater or
    /// NaN (ties go to the first in row-major window order). Windows clipped by the padding take
    /// the checked path; the others (all but an edge row and column for the study's 3x3/2 'SAME'
    /// pool) run without bounds checks, and with a column stride of 2, eight outputs at a time: the
    /// plane's even and odd columns are split apart first (into `cols`), so each window element of
    /// eight neighbouring outputs is one contiguous load.
    pub(crate) fn pool_forward(
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
pub(crate) fn pool_cols_len(pl: &PoolOp) -> usize {
    2 * pl.hin * pl.win.div_ceil(2)
}

/// Lanes of the strided max-pool path.
const POOL_LANES: usize = 8;

avx2_dispatch! {
    /// The common 2x2/2 unpadded max-pool; ties go to the first element in row-major window order,
    /// as in the general path. Kept out of line: inlined into the big forward, its loop state
    /// spills.
    #[inline(never)]
    pub(crate) fn pool2x2_forward(
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
pub(crate) fn pool2x2_backward(pl: &PoolOp, dy: &[f32], arg: &[u32], dx: &mut [f32], n: usize) {
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

/// Backward of any max-pool: each output gradient goes to its window's argmax. 2x2/2 windows that
/// tile the input exactly take [`pool2x2_backward`].
pub(crate) fn pool_backward(pl: &PoolOp, dy: &[f32], arg: &[u32], dx: &mut [f32], n: usize) {
    let out = n * pl.c * pl.hout * pl.wout;
    let tiles = (pl.kh, pl.kw, pl.sh, pl.sw, pl.pt, pl.pl) == (2, 2, 2, 2, 0, 0);
    if tiles && pl.hin.is_multiple_of(2) && pl.win.is_multiple_of(2) {
        // No window overlaps another, so each plane is zeroed and stored into while it is in L1.
        pool2x2_backward(pl, dy, arg, dx, n);
    } else {
        dx[..n * pl.c * pl.hin * pl.win].fill(0.0);
        for (a, g) in arg[..out].iter().zip(&dy[..out]) {
            dx[*a as usize] += g;
        }
    }
}

/// Global average pooling: the mean of each of `n * c` planes of `hw` values (summed in f64).
pub(crate) fn global_avg_pool_forward(x: &[f32], y: &mut [f32], planes: usize, hw: usize) {
    for (o, plane) in y[..planes].iter_mut().zip(x.chunks_exact(hw)) {
        *o = (plane.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64) as f32;
    }
}

/// Each plane's input gradient is its output gradient over `hw`.
pub(crate) fn global_avg_pool_backward(dy: &[f32], dx: &mut [f32], planes: usize, hw: usize) {
    let scale = 1.0 / hw as f32;
    for (g, plane) in dy[..planes].iter().zip(dx.chunks_exact_mut(hw)) {
        plane.fill(g * scale);
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
