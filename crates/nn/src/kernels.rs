//! Low-level kernels: the GEMM wrapper over the `gemm` crate and im2col/col2im for convolutions.
//! Everything works on plain f32 slices; bounds are asserted once per call so the unsafe GEMM call
//! can never read or write outside its slices.

use gemm::Parallelism;

/// Defines `fn $name(args) { body }` so that the body runs compiled for AVX2 when the CPU has it,
/// and as built otherwise. Only the code generation changes: Rust never contracts `a*b+c` into an
/// FMA and LLVM keeps the order of float reductions, so results are bit-identical either way.
macro_rules! avx2_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// `dst[m x n] (row-major, contiguous) = (accumulate ? dst : 0) + A[m x k] * B[k x n]`, with A and B
/// given by base slice and (row, column) strides, so transposed operands cost nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    par: Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    matmul_scaled(
        par, m, n, k, dst, accumulate, 1.0, a, a_rs, a_cs, b, b_rs, b_cs,
    );
}

/// [`matmul`] with the product scaled: `dst = (accumulate ? dst : 0) + scale * A * B`. With
/// `accumulate`, gemm combines as one fused multiply-add per element (`scale * ab + dst`), so
/// `dst -= lr * A * B` here is not bit-identical to forming `A * B` first and subtracting.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_scaled(
    par: Parallelism,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    scale: f32,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "matmul: dst too small");
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        (m - 1) * a_rs + (k - 1) * a_cs < a.len(),
        "matmul: lhs out of bounds"
    );
    assert!(
        (k - 1) * b_rs + (n - 1) * b_cs < b.len(),
        "matmul: rhs out of bounds"
    );
    // SAFETY: the asserts above bound every index gemm touches: dst (i*n + j), lhs (i*a_rs +
    // l*a_cs) and rhs (l*b_rs + j*b_cs) for i < m, j < n, l < k lie inside their slices, and dst
    // does not alias the inputs (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// Geometry of one convolution's input/output plane.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// Range of output columns `ow` whose input column `ow*sw + kj - pl` is inside [0, w).
    #[inline]
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        // ow*sw + kj >= pl  and  ow*sw + kj < w + pl
        let lo = if kj >= self.pl {
            0
        } else {
            (self.pl - kj).div_ceil(self.sw)
        };
        let hi = if self.w + self.pl > kj {
            (self.w + self.pl - kj).div_ceil(self.sw).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// `dst.copy_from_slice(src)` for short rows (tens of values), where a memcpy call costs more
/// than the copy: whole 8-float blocks, the last one overlapping the previous when the length is
/// not a multiple of 8 (rewriting a few values with the same data).
#[inline(always)]
fn copy_short(src: &[f32], dst: &mut [f32]) {
    let n = src.len();
    assert_eq!(n, dst.len(), "copy_short: length mismatch");
    if n < 8 {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
        return;
    }
    let mut i = 0;
    while i + 8 <= n {
        dst[i..i + 8].copy_from_slice(&src[i..i + 8]);
        i += 8;
    }
    if i < n {
        dst[n - 8..].copy_from_slice(&src[n - 8..]);
    }
}

/// Unfolds one example `x` [c,h,w] into the `ho*wo` columns starting at `col[0]` of a
/// [c*kh*kw, ld] matrix (row stride `ld`; zero where the window hits padding), so several examples
/// can sit side by side.
#[inline(always)]
pub(crate) fn im2col(g: &Geom, x: &[f32], col: &mut [f32], ld: usize) {
    let hw_out = g.ho * g.wo;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ld..row * ld + hw_out];
                let (lo, hi) = g.valid_cols(kj);
                for oh in 0..g.ho {
                    let out = &mut dst[oh * g.wo..(oh + 1) * g.wo];
                    let ih = (oh * g.sh + ki) as isize - g.pt as isize;
                    if ih < 0 || ih as usize >= g.h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    for o in &mut out[..lo] {
                        *o = 0.0;
                    }
                    for o in &mut out[hi..] {
                        *o = 0.0;
                    }
                    // No output reads this kernel column (`lo == hi`, possibly with `lo + kj`
                    // still left of the padding: a kernel wider than its input) when none of the
                    // branches runs.
                    if g.sw == 1 && hi > lo {
                        let start = lo + kj - g.pl;
                        copy_short(&src[start..start + (hi - lo)], &mut out[lo..hi]);
                    } else if g.sw == 2 && hi > lo {
                        // Every other input, eight at a time from fixed-size arrays, so the
                        // copy is vector shuffles without bounds checks.
                        let (start, n) = (lo * 2 + kj - g.pl, hi - lo);
                        let taken = &src[start..start + 2 * n - 1];
                        let out = &mut out[lo..hi];
                        for b in 0..n / 8 {
                            let i: &[f32; 15] = taken[16 * b..16 * b + 15].try_into().unwrap();
                            let o: &mut [f32; 8] = (&mut out[8 * b..8 * b + 8]).try_into().unwrap();
                            for k in 0..8 {
                                o[k] = i[2 * k];
                            }
                        }
                        for j in n / 8 * 8..n {
                            out[j] = taken[2 * j];
                        }
                    } else if hi > lo {
                        // Strided reads without a bounds check per element.
                        let start = lo * g.sw + kj - g.pl;
                        let taken = src[start..].iter().step_by(g.sw);
                        for (o, v) in out[lo..hi].iter_mut().zip(taken) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// Folds the `ho*wo` columns starting at `col[0]` of a [c*kh*kw, ld] matrix back into `dx` [c,h,w],
/// summing overlapping windows; `dx` is overwritten.
#[inline(always)]
pub(crate) fn col2im(g: &Geom, col: &[f32], ld: usize, dx: &mut [f32]) {
    dx[..g.c * g.h * g.w].fill(0.0);
    let hw_out = g.ho * g.wo;
    for c in 0..g.c {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &col[row * ld..row * ld + hw_out];
                let (lo, hi) = g.valid_cols(kj);
                for oh in 0..g.ho {
                    let ih = (oh * g.sh + ki) as isize - g.pt as isize;
                    if ih < 0 || ih as usize >= g.h {
                        continue;
                    }
                    let dst = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let s = &src[oh * g.wo..(oh + 1) * g.wo];
                    if g.sw == 1 && hi > lo {
                        let start = lo + kj - g.pl;
                        for (d, v) in dst[start..start + (hi - lo)].iter_mut().zip(&s[lo..hi]) {
                            *d += v;
                        }
                    } else if g.sw == 2 && hi > lo {
                        // As im2col's stride-2 copy: eight at a time from fixed-size arrays.
                        let (start, n) = (lo * 2 + kj - g.pl, hi - lo);
                        let hit = &mut dst[start..start + 2 * n - 1];
                        let s = &s[lo..hi];
                        for b in 0..n / 8 {
                            let d: &mut [f32; 15] =
                                (&mut hit[16 * b..16 * b + 15]).try_into().unwrap();
                            let v: &[f32; 8] = s[8 * b..8 * b + 8].try_into().unwrap();
                            for k in 0..8 {
                                d[2 * k] += v[k];
                            }
                        }
                        for j in n / 8 * 8..n {
                            hit[2 * j] += s[j];
                        }
                    } else if hi > lo {
                        let start = lo * g.sw + kj - g.pl;
                        let hit = dst[start..].iter_mut().step_by(g.sw);
                        for (d, v) in hit.zip(&s[lo..hi]) {
                            *d += v;
                        }
                    }
                }
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
