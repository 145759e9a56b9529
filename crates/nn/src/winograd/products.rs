//! The Winograd-domain products of the 3x3 layers, written for their shapes instead of going
//! through the `gemm` crate. A ResNet block's products are small: `[16 x 16] x [16 x 256]` per
//! Winograd position in resnet20's first stage, 16 of them per chunk and pass. Through `gemm`
//! each call packed its operands, allocated, and split 16 rows into 6 + 6 + 4, so a third of the
//! work went to edge kernels. Here the operands are read where the transforms left them (rows of
//! tiles, contiguous along the tiles), rows go in blocks of 4 (every ResNet width is a multiple
//! of 4) and columns in vectors of 8 tiles, the last one masked.
//!
//! Two shapes:
//! - [`nn`], `dst = A B` with `A [m x k]` small and row-major and `B [k x n]` rows of tiles: the
//!   forward and input-gradient products. Each output is one fused multiply-add chain over `k`
//!   in order, so the vector code and the scalar fallback give the same bits.
//! - [`nt`], `dst (+)= A B^T` with both operands rows of tiles: the weight gradient, summed over
//!   tiles in 8 lane-wise chains (tile `t` in chain `t mod 8`, missing tiles as zeros) added
//!   pairwise in one fixed order, the same in the fallback.
//!
//! Both use 256-bit AVX2 + FMA where the CPU has them (also on AVX-512 CPUs, so the bits do not
//! depend on which of the two a machine has) and scalar `mul_add` elsewhere.

use rayon::prelude::*;

use super::set_spread;

/// Tiles per vector.
const W: usize = 8;

/// `dst[i][j] = sum over l of a[i][l] b[l][j]` for `i < m`, `j < n`, with `a` row-major
/// `[m x k]`, `b`'s rows `ldb` apart and `dst`'s `ldd` apart. `b` must be readable up to a
/// whole vector past `n` on each row (the tile buffers' spare columns); those values only meet
/// outputs that are not stored.
#[allow(clippy::too_many_arguments)]
pub(super) fn nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0 && a.len() >= m * k, "nn: lhs too small");
    assert!(
        b.len() >= (k - 1) * ldb + n.next_multiple_of(W),
        "nn: rhs too small"
    );
    assert!(dst.len() >= (m - 1) * ldd + n, "nn: dst too small");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above), and the asserts bound every
        // access: `a` up to m*k, `b` up to (k-1)*ldb + n rounded up to a vector, `dst` up to
        // (m-1)*ldd + n (tail vectors are stored masked).
        unsafe { avx2::nn(m, n, k, a.as_ptr(), b.as_ptr(), ldb, dst.as_mut_ptr(), ldd) };
        return;
    }
    nn_scalar(m, n, k, a, b, ldb, dst, ldd);
}

/// `dst[i][c] = (accumulate ? dst[i][c] : 0) + sum over t < n of a[i][t] b[c][t]` for `i < m`,
/// `c < k`, with `a`'s rows `lda` apart, `b`'s `ldb` apart and `dst` row-major `[m x k]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn nt(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    if m == 0 || k == 0 {
        return;
    }
    assert!(dst.len() >= m * k, "nt: dst too small");
    assert!(n == 0 || a.len() >= (m - 1) * lda + n, "nt: lhs too small");
    assert!(n == 0 || b.len() >= (k - 1) * ldb + n, "nt: rhs too small");
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); the asserts bound every access
        // (a tail shorter than a vector is loaded masked).
        unsafe {
            avx2::nt(
                m,
                k,
                n,
                a.as_ptr(),
                lda,
                b.as_ptr(),
                ldb,
                dst.as_mut_ptr(),
                accumulate,
            )
        };
        return;
    }
    nt_scalar(m, k, n, a, lda, b, ldb, dst, accumulate);
}

/// [`nn`] one value at a time: the definition the vector code follows, and the fallback.
#[allow(clippy::too_many_arguments)]
fn nn_scalar(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    dst: &mut [f32],
    ldd: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for l in 0..k {
                acc = a[i * k + l].mul_add(b[l * ldb + j], acc);
            }
            dst[i * ldd + j] = acc;
        }
    }
}

/// [`nt`] one value at a time: the definition the vector code follows, and the fallback.
#[allow(clippy::too_many_arguments)]
fn nt_scalar(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    for i in 0..m {
        for c in 0..k {
            let mut lanes = [0f32; W];
            for t0 in (0..n).step_by(W) {
                for (l, acc) in lanes.iter_mut().enumerate() {
                    let t = t0 + l;
                    let (x, y) = if t < n {
                        (a[i * lda + t], b[c * ldb + t])
                    } else {
                        (0.0, 0.0)
                    };
                    *acc = x.mul_add(y, *acc);
                }
            }
            let s = lane_sum(lanes);
            let d = &mut dst[i * k + c];
            *d = if accumulate { *d + s } else { s };
        }
    }
}

/// The 8 chains of [`nt`] added in the order the vector code adds them.
fn lane_sum(l: [f32; W]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// [`nn`] for each of `xis` Winograd positions: `prod_xi [rows x ld] = kern_xi [rows x inner] x
/// tiles_xi [inner x ld]`, position xi's matrices `set_spread(len)` values apart, the tiles' rows
/// `lds` apart. With `threads > 1` the positions are shared out over rayon's pool; each is
/// computed the same way whichever thread takes it.
#[allow(clippy::too_many_arguments)]
pub(super) fn positions_nn(
    threads: usize,
    xis: usize,
    kern: &[f32],
    tiles: &[f32],
    lds: usize,
    prod: &mut [f32],
    rows: usize,
    inner: usize,
    ld: usize,
) {
    let (out_step, in_step) = (set_spread(rows * ld), set_spread(inner * lds));
    let one = |(xi, p): (usize, &mut [f32])| {
        nn(
            rows,
            ld,
            inner,
            &kern[xi * rows * inner..(xi + 1) * rows * inner],
            &tiles[xi * in_step..],
            lds,
            p,
            ld,
        );
    };
    let prod = &mut prod[..(xis - 1) * out_step + rows * ld];
    if threads > 1 {
        prod.par_chunks_mut(out_step).enumerate().for_each(one);
    } else {
        prod.chunks_mut(out_step).enumerate().for_each(one);
    }
}

/// [`nt`] for each of `xis` Winograd positions: `du_xi [rows x cols] (+)= e_xi [rows x ld] x
/// v_xi [cols x ld]^T`, both operands' rows `lds` apart and position xi's matrices `spread(len)`
/// values apart, shared out over rayon's pool with `threads > 1`.
#[allow(clippy::too_many_arguments)]
pub(super) fn positions_nt(
    threads: usize,
    xis: usize,
    e: &[f32],
    v: &[f32],
    lds: usize,
    du: &mut [f32],
    rows: usize,
    cols: usize,
    ld: usize,
    accumulate: bool,
) {
    let (e_step, v_step) = (set_spread(rows * lds), set_spread(cols * lds));
    let one = |(xi, d): (usize, &mut [f32])| {
        nt(
            rows,
            cols,
            ld,
            &e[xi * e_step..],
            lds,
            &v[xi * v_step..],
            lds,
            d,
            accumulate,
        );
    };
    let du = &mut du[..xis * rows * cols];
    if threads > 1 {
        du.par_chunks_mut(rows * cols).enumerate().for_each(one);
    } else {
        du.chunks_mut(rows * cols).enumerate().for_each(one);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The vector kernels. Every pointer offset they form stays inside the bounds their callers
    //! asserted.

    use std::arch::x86_64::*;

    use super::W;

    /// Lane masks: `MASKS[W - r..][..W]` enables the first `r` lanes.
    static MASKS: [i32; 2 * W] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    #[inline(always)]
    unsafe fn mask(r: usize) -> __m256i {
        // SAFETY: 1 <= r <= W, so the 8 values read lie inside MASKS.
        unsafe { _mm256_loadu_si256(MASKS.as_ptr().add(W - r).cast()) }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn nn(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
    ) {
        // Blocks of 6 rows by 2 vectors of tiles: 12 accumulators, 2 tile vectors and one
        // broadcast in 15 of the 16 registers (with 3 vectors the accumulators spill). The block
        // of `b` (k x 16 values, 4 KB at k = 64) stays in L1 while every row block uses it.
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(2 * W);
            let mut i = 0;
            // SAFETY (all calls): rows i.. < m, columns j.. inside the asserted bounds.
            unsafe {
                let (bj, at) = (b.add(j), |i: usize| (a.add(i * k), dst.add(i * ldd + j)));
                while m - i >= 6 {
                    let (ai, di) = at(i);
                    block_nn::<6>(k, ai, bj, ldb, di, ldd, cols);
                    i += 6;
                }
                if m - i >= 4 {
                    let (ai, di) = at(i);
                    block_nn::<4>(k, ai, bj, ldb, di, ldd, cols);
                    i += 4;
                }
                if m - i >= 2 {
                    let (ai, di) = at(i);
                    block_nn::<2>(k, ai, bj, ldb, di, ldd, cols);
                    i += 2;
                }
                if m - i >= 1 {
                    let (ai, di) = at(i);
                    block_nn::<1>(k, ai, bj, ldb, di, ldd, cols);
                }
            }
            j += cols;
        }
    }

    /// `MR` rows by `cols` (at most 16) columns of [`nn`].
    #[inline(always)]
    unsafe fn block_nn<const MR: usize>(
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
    ) {
        // SAFETY: the caller's bounds.
        unsafe {
            match cols.div_ceil(W) {
                2 => block_nn_v::<MR, 2>(k, a, b, ldb, dst, ldd, cols),
                _ => block_nn_v::<MR, 1>(k, a, b, ldb, dst, ldd, cols),
            }
        }
    }

    #[inline(always)]
    unsafe fn block_nn_v<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
        cols: usize,
    ) {
        // SAFETY: the caller's bounds; `b` is readable a whole vector past the last column.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            for l in 0..k {
                let row = b.add(l * ldb);
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(row.add(v * W));
                }
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(r * k + l));
                    for (x, bx) in acc_r.iter_mut().zip(&bv) {
                        *x = _mm256_fmadd_ps(av, *bx, *x);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                let out = dst.add(r * ldd);
                for (v, x) in acc_r.iter().enumerate() {
                    let left = cols - v * W;
                    if left >= W {
                        _mm256_storeu_ps(out.add(v * W), *x);
                    } else {
                        _mm256_maskstore_ps(out.add(v * W), mask(left), *x);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn nt(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        accumulate: bool,
    ) {
        // Blocks of 4 rows by 3 columns: 12 accumulators, 3 vectors of `b` and one of `a`.
        let i4 = m - m % 4;
        let c3 = k - k % 3;
        // SAFETY (all calls): rows < m, columns < k, tiles < n (the tail loaded masked).
        unsafe {
            let blk = |i: usize, c: usize| (a.add(i * lda), b.add(c * ldb), dst.add(i * k + c));
            for i in (0..i4).step_by(4) {
                for c in (0..c3).step_by(3) {
                    let (a, b, d) = blk(i, c);
                    block_nt::<4, 3>(n, a, lda, b, ldb, d, k, accumulate);
                }
                for c in c3..k {
                    let (a, b, d) = blk(i, c);
                    block_nt::<4, 1>(n, a, lda, b, ldb, d, k, accumulate);
                }
            }
            for i in i4..m {
                for c in (0..c3).step_by(3) {
                    let (a, b, d) = blk(i, c);
                    block_nt::<1, 3>(n, a, lda, b, ldb, d, k, accumulate);
                }
                for c in c3..k {
                    let (a, b, d) = blk(i, c);
                    block_nt::<1, 1>(n, a, lda, b, ldb, d, k, accumulate);
                }
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_nt<const MR: usize, const NC: usize>(
        n: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        dst: *mut f32,
        ldd: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's bounds; the partial last vector is loaded masked (zeros past n).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NC]; MR];
            let full = n - n % W;
            let mut t = 0;
            while t < full {
                step_nt::<MR, NC, false>(&mut acc, a.add(t), lda, b.add(t), ldb, mask(W));
                t += W;
            }
            if full < n {
                step_nt::<MR, NC, true>(
                    &mut acc,
                    a.add(full),
                    lda,
                    b.add(full),
                    ldb,
                    mask(n - full),
                );
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (c, x) in acc_r.iter().enumerate() {
                    let s = lane_sum(*x);
                    let d = dst.add(r * ldd + c);
                    *d = if accumulate { *d + s } else { s };
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn load<const MASKED: bool>(p: *const f32, mk: __m256i) -> __m256 {
        // SAFETY: the caller's bounds; a masked load touches only the enabled lanes.
        unsafe {
            if MASKED {
                _mm256_maskload_ps(p, mk)
            } else {
                _mm256_loadu_ps(p)
            }
        }
    }

    /// One vector of tiles into the accumulators, the loads masked with `MASKED`.
    #[inline(always)]
    unsafe fn step_nt<const MR: usize, const NC: usize, const MASKED: bool>(
        acc: &mut [[__m256; NC]; MR],
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        mk: __m256i,
    ) {
        // SAFETY: the caller's bounds; masked loads touch only the enabled lanes.
        unsafe {
            let mut bv = [_mm256_setzero_ps(); NC];
            for (c, x) in bv.iter_mut().enumerate() {
                *x = load::<MASKED>(b.add(c * ldb), mk);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = load::<MASKED>(a.add(r * lda), mk);
                for (x, bx) in acc_r.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, *bx, *x);
                }
            }
        }
    }

    /// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`, as [`super::lane_sum`].
    #[inline(always)]
    unsafe fn lane_sum(x: __m256) -> f32 {
        // SAFETY: register-only AVX operations, available under the callers' target features.
        unsafe {
            let h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::values;
    use super::*;

    /// The dispatched kernels (the vector ones on an AVX2 + FMA machine) give the scalar
    /// definitions' bits, for block-sized and ragged shapes (rows not a multiple of 4, columns
    /// not of 3, tiles not of 8 or 24), leave the values between output rows alone, and agree
    /// with f64 sums.
    #[test]
    fn kernels_match_the_scalar_definition_bit_for_bit() {
        for (m, k, n) in [
            (16, 16, 256),
            (20, 17, 45),
            (3, 5, 7),
            (64, 64, 432),
            (4, 3, 8),
        ] {
            let (ld, lds) = (n + 3, n + W);
            let a = values(m * k, 1);
            let b = values(k * lds, 2);
            let mut got = vec![7.0; m * ld];
            let mut want = got.clone();
            nn(m, n, k, &a, &b, lds, &mut got, ld);
            nn_scalar(m, n, k, &a, &b, lds, &mut want, ld);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "nn {m}x{k}x{n} at {i}");
                let (r, j) = (i / ld, i % ld);
                let exact: f64 = if j < n {
                    (0..k)
                        .map(|l| f64::from(a[r * k + l]) * f64::from(b[l * lds + j]))
                        .sum()
                } else {
                    7.0
                };
                assert!(
                    (f64::from(*g) - exact).abs() < 1e-4,
                    "nn {m}x{k}x{n} at {i}"
                );
            }

            let e = values(m * lds, 3);
            let v = values(k * lds, 4);
            for accumulate in [false, true] {
                let start = values(m * k, 5);
                let (mut got, mut want) = (start.clone(), start.clone());
                nt(m, k, n, &e, lds, &v, lds, &mut got, accumulate);
                nt_scalar(m, k, n, &e, lds, &v, lds, &mut want, accumulate);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "nt {m}x{k}x{n} at {i}");
                    let (r, c) = (i / k, i % k);
                    let exact: f64 = (0..n)
                        .map(|t| f64::from(e[r * lds + t]) * f64::from(v[c * lds + t]))
                        .sum::<f64>()
                        + if accumulate { f64::from(start[i]) } else { 0.0 };
                    assert!(
                        (f64::from(*g) - exact).abs() < 1e-4,
                        "nt {m}x{k}x{n} at {i}"
                    );
                }
            }
        }
    }

    /// Shared out over threads, every position's product has the bits of the one-thread run.
    #[test]
    fn positions_have_the_same_bits_on_any_number_of_threads() {
        let (xis, rows, inner, ld) = (16, 20, 16, 45);
        let lds = ld + W;
        let kern = values(xis * rows * inner, 6);
        let tiles = values(xis * set_spread(inner * lds), 7);
        let e = values(xis * set_spread(rows * lds), 8);
        let run = |threads| {
            let mut prod = vec![0f32; xis * set_spread(rows * ld)];
            positions_nn(threads, xis, &kern, &tiles, lds, &mut prod, rows, inner, ld);
            let mut du = vec![0f32; xis * rows * inner];
            positions_nt(
                threads, xis, &e, &tiles, lds, &mut du, rows, inner, ld, false,
            );
            (prod, du)
        };
        let (one, many) = (run(1), run(4));
        assert!(one.0.iter().any(|v| *v != 0.0) && one.1.iter().any(|v| *v != 0.0));
        assert_eq!(
            one.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            many.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            one.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            many.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
