//! Winograd convolution for the stride-1 layers with many channels, where most of the study's
//! and the ResNets' arithmetic is: F(2x2, 5x5) and F(4x4, 5x5) for 5x5 kernels (the second
//! convolution of `mnist-cnn` and of `cifar-cnn`), F(2x2, 3x3) and F(4x4, 3x3) for 3x3 kernels
//! (every ResNet block). Through im2col an R x R block of outputs costs K² R² multiply-adds per
//! input and output channel; in the Winograd domain it costs N² with N = R + K - 1: for 5x5, 36
//! instead of 100 for R = 2, 64 instead of 400 for R = 4; for 3x3, 16 instead of 36 and 36
//! instead of 144. All three passes of training use it:
//! - forward: `Y = A^T [(G g G^T) ⊙ (B^T d B)] A` for each N x N input tile `d` and K x K kernel
//!   `g`, the element-wise products summed over input channels as N² GEMMs
//!   `[cout x cin] x [cin x tiles]`;
//! - input gradient: the same correlation of the output gradient with the kernel rotated by 180°
//!   and its channels swapped (stride 1 makes it a plain correlation with padding `K - 1 - pad`);
//! - weight gradient, by transposing the forward identity:
//!   `dW = G^T [sum over tiles of (A e A^T) ⊙ (B^T d B)] G` with `e` the tile's R x R output
//!   gradient, N² GEMMs `[cout x tiles] x [tiles x cin]`.
//!
//! Each layer uses the tile size with fewer Winograd-domain values over its output plane (R = 4
//! for both study models: 16 tiles of 64 instead of 49 of 36 on 14x14, 9 instead of 36 on 12x12),
//! except before a normalisation layer (see [`Workspace::new`]), so a ResNet's blocks run in
//! F(2x2, 3x3).
//! The matrices come from the interpolation points 0, ±1, ±2 (and ±1/2 for F(4x4, 5x5)) and
//! infinity: `B^T` and `A^T` hold small integers and powers of two, `G` the fractions. The result
//! differs from the direct convolution by float rounding only, larger than im2col's: against an
//! f64 direct convolution on values in [-1, 1], outputs and input gradients within a few 1e-6 of
//! the largest value (up to 5e-6 for F(4x4, 5x5)), weight gradients (sums over every tile, in the
//! transformed domain) within about 1e-5; the tests bound both, for both kernel sizes.
//!
//! The batch is processed in chunks of examples so the transformed tiles stay cache-sized;
//! backward walks the chunks in reverse, so the last chunk's transformed input is still there from
//! forward and earlier ones are transformed again.
//!
//! Here: the tile sizes, the per-layer workspace and the three passes; the schemes' 1-D transforms
//! in `schemes`, the tile transforms in `transforms`.

use gemm::Parallelism;

use crate::kernels::{avx2_dispatch, matmul};
use crate::plan::ConvOp;

mod products;
mod schemes;
mod transforms;

use schemes::{F2, F2K3, F4, F4K3, Scheme};
use transforms::{L, Rows, grad_transform, input_transform, output_transform, transform_kernels};

/// Winograd-domain values per chunk (tiles x N²). The transforms scatter each tile over N² rows
/// of a buffer of N² x channels x chunk tiles; at 6,912 values (1.8 MB with 64 channels) that
/// stays near the L2 cache. Measured with `fedra bench train` for F(2x2): 128-256 tiles of 36
/// within noise, 512 5-10% slower on cifar-cnn at B = 100, 1024 20% slower.
const POINT_BUDGET: usize = 192 * 36;

/// Output tile edge of a layer's Winograd scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TileSize {
    /// F(2x2, KxK).
    Two,
    /// F(4x4, KxK).
    Four,
}

impl TileSize {
    fn r(self) -> usize {
        match self {
            TileSize::Two => 2,
            TileSize::Four => 4,
        }
    }

    /// Interpolation points for a K x K kernel.
    fn n(self, k: usize) -> usize {
        self.r() + k - 1
    }

    /// The size with fewer Winograd-domain values over the layer's output plane (fewer GEMM
    /// multiply-adds and transform work); ties go to R = 2, whose rounding error is smaller.
    fn for_conv(c: &ConvOp) -> TileSize {
        let values =
            |t: TileSize| c.hout.div_ceil(t.r()) * c.wout.div_ceil(t.r()) * t.n(c.kh) * t.n(c.kh);
        if values(TileSize::Four) < values(TileSize::Two) {
            TileSize::Four
        } else {
            TileSize::Two
        }
    }
}

/// Whether a convolution goes through this module: 5x5 or 3x3, stride 1, padding at most K - 1
/// (so the input gradient's padding `K - 1 - pad` is not negative), and enough channels that the
/// N² GEMMs are not all overhead (the first layers, with 1 or 3 input channels, stay on im2col).
pub(crate) fn eligible(c: &ConvOp) -> bool {
    (c.kh == 5 || c.kh == 3)
        && c.kw == c.kh
        && (c.sh, c.sw) == (1, 1)
        && c.pt < c.kh
        && c.pl < c.kw
        && c.cin >= 16
        && c.cout >= 16
}

/// A plane stack: `c` channels of `h x w` per example.
#[derive(Clone, Copy)]
struct Planes {
    c: usize,
    h: usize,
    w: usize,
}

impl Planes {
    fn len(&self) -> usize {
        self.c * self.h * self.w
    }
}

/// Where the R x R output tiles of a correlation lie: `th x tw` tiles over an `ho x wo` output,
/// tile (ty, tx) reading the N x N input window at (R ty - pt, R tx - pl).
///
/// The transforms' lane vectors hold `seg` segments of `L / seg` tiles, each segment from its own
/// tile row: one segment of 8 tiles, or, when a tile row has at most 4 tiles (`mnist-cnn`'s 14x14
/// planes in 4x4 tiles), two tile rows of 4, so that no more than half the lanes are wasted.
#[derive(Clone, Copy)]
struct Tiling {
    r: usize,
    /// Rows and columns a window reaches past its tile: K - 1.
    halo: usize,
    seg: usize,
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
    pt: usize,
    pl: usize,
}

impl Tiling {
    fn new(r: usize, k: usize, ho: usize, wo: usize, pt: usize, pl: usize) -> Tiling {
        let tw = wo.div_ceil(r);
        Tiling {
            r,
            halo: k - 1,
            seg: if tw <= L / 2 { 2 } else { 1 },
            ho,
            wo,
            th: ho.div_ceil(r),
            tw,
            pt,
            pl,
        }
    }
    fn tiles(&self) -> usize {
        self.th * self.tw
    }
    /// Tile rows the transforms walk: `th` rounded up to whole segments (the extra row's lanes
    /// are computed and dropped, or stored where a later tile row or the spare columns go).
    fn tile_rows(&self) -> usize {
        self.th.next_multiple_of(self.seg)
    }
    /// Padded input rows the tiles read.
    fn padded_rows(&self) -> usize {
        self.r * self.tile_rows() + self.halo
    }
}

/// Per-layer buffers, sized at construction for the trainer's largest batch.
#[derive(Debug)]
pub(crate) struct Workspace {
    tile: TileSize,
    /// Examples per chunk.
    chunk: usize,
    /// Kernel in the Winograd domain, [N²][cout][cin].
    u: Vec<f32>,
    /// Rotated, channel-swapped kernel for the input gradient, [N²][cin][cout].
    u_rot: Vec<f32>,
    /// Weight gradient in the Winograd domain, [N²][cout][cin].
    du: Vec<f32>,
    /// Two tile buffers, [N²][channels][chunk tiles (+ L)] each: the forward input transform and
    /// the input-gradient products in `a`; the forward products and the output-gradient transforms
    /// in `b`. Transforms write whole lane blocks, so the rows they write have `L` spare columns
    /// (stride `ld + L`); the products are contiguous (stride `ld`) and read in whole lane blocks,
    /// so each buffer also has `L` spare values at its end.
    a: Vec<f32>,
    b: Vec<f32>,
    rows: Rows,
}

impl Workspace {
    /// The workspace of a layer, in 2x2 tiles when `normalised_next` (a BatchNorm or GroupNorm
    /// follows it): the normalisation recentres the layer's outputs on the next ReLU's kink, where
    /// F(4x4)'s larger rounding flips which units pass gradient. Seen in the PyTorch fixture of
    /// `cifar-cnn-bn`: with F(4x4) its two-step `conv1.weight` update missed the tolerance
    /// (1.3x), with F(2x2) it stays at 0.03 of it.
    pub(crate) fn new(c: &ConvOp, max_batch: usize, normalised_next: bool) -> Workspace {
        let tile = if normalised_next {
            TileSize::Two
        } else {
            TileSize::for_conv(c)
        };
        Workspace::with_tile(c, max_batch, tile)
    }

    pub(crate) fn with_tile(c: &ConvOp, max_batch: usize, tile: TileSize) -> Workspace {
        let (fwd, bwd) = tilings(c, tile.r());
        let xi = tile.n(c.kh) * tile.n(c.kh);
        let per = fwd.tiles().max(bwd.tiles());
        let chunk = (POINT_BUDGET / xi / per).clamp(1, max_batch);
        // Each matrix, padded by `set_spread` (up to 32 values).
        let tile_len = xi * (c.cin.max(c.cout) * (chunk * per + L) + 32) + L;
        Workspace {
            tile,
            chunk,
            u: vec![0.0; xi * c.cout * c.cin],
            u_rot: vec![0.0; xi * c.cout * c.cin],
            du: vec![0.0; xi * c.cout * c.cin],
            a: vec![0.0; tile_len],
            b: vec![0.0; tile_len],
            rows: Rows::new(&[fwd, bwd], tile.n(c.kh)),
        }
    }

    pub(crate) fn floats(&self) -> usize {
        self.u.len()
            + self.u_rot.len()
            + self.du.len()
            + self.a.len()
            + self.b.len()
            + self.rows.floats()
    }
}

/// The N² products `prod_xi [rows x ld] = kern_xi [rows x inner] x tiles_xi [inner x ld]`, the
/// tiles' rows `lds` apart. The 3x3 layers' (ResNet blocks, small products) go through
/// [`products`]; the 5x5 layers' through `gemm`, whose blocking suits their wider products and
/// whose bits the study models' committed results were made with.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn position_products<const K: usize>(
    par: Parallelism,
    xis: usize,
    kern: &[f32],
    tiles: &[f32],
    lds: usize,
    prod: &mut [f32],
    rows: usize,
    inner: usize,
    ld: usize,
) {
    if K == 3 {
        return products::positions_nn(threads(par), xis, kern, tiles, lds, prod, rows, inner, ld);
    }
    for xi in 0..xis {
        matmul(
            par,
            rows,
            ld,
            inner,
            &mut prod[xi * set_spread(rows * ld)..][..rows * ld],
            false,
            &kern[xi * rows * inner..(xi + 1) * rows * inner],
            inner,
            1,
            &tiles[xi * set_spread(inner * lds)..][..inner * lds],
            lds,
            1,
        );
    }
}

/// The N² weight-gradient products `du_xi [rows x cols] (+)= e_xi [rows x ld] x v_xi [cols x
/// ld]^T`, both operands' rows `lds` apart; as in [`position_products`], the 3x3 layers' through
/// [`products`], the 5x5 layers' through `gemm`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn position_weight_grads<const K: usize>(
    par: Parallelism,
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
    if K == 3 {
        return products::positions_nt(
            threads(par),
            xis,
            e,
            v,
            lds,
            du,
            rows,
            cols,
            ld,
            accumulate,
        );
    }
    for xi in 0..xis {
        matmul(
            par,
            rows,
            cols,
            ld,
            &mut du[xi * rows * cols..(xi + 1) * rows * cols],
            accumulate,
            &e[xi * set_spread(rows * lds)..][..rows * lds],
            lds,
            1,
            &v[xi * set_spread(cols * lds)..][..cols * lds],
            1,
            lds,
        );
    }
}

fn threads(par: Parallelism) -> usize {
    match par {
        Parallelism::Rayon(n) => n,
        _ => 1,
    }
}

/// The distance (in values) at which to lay out consecutive Winograd positions' matrices of `len`
/// values each: `len` rounded up to an odd multiple of 16 values (64 bytes, one cache line). The
/// transforms read or write the N² matrices as N² streams in step; at a distance that is a
/// multiple of 4 KiB (every ResNet layer's `channels x tiles` is a multiple of 1,024) the streams
/// all fall in one L1 cache set and evict each other; at an odd number of lines apart each falls in
/// its own set.
fn set_spread(len: usize) -> usize {
    let lines = len.div_ceil(16);
    (lines | 1) * 16
}

/// Forward tiling (over the output) and input-gradient tiling (over the input).
fn tilings(c: &ConvOp, r: usize) -> (Tiling, Tiling) {
    (
        Tiling::new(r, c.kh, c.hout, c.wout, c.pt, c.pl),
        Tiling::new(r, c.kh, c.hin, c.win, c.kh - 1 - c.pt, c.kw - 1 - c.pl),
    )
}

fn planes(c: &ConvOp) -> (Planes, Planes) {
    (
        Planes {
            c: c.cin,
            h: c.hin,
            w: c.win,
        },
        Planes {
            c: c.cout,
            h: c.hout,
            w: c.wout,
        },
    )
}

avx2_dispatch! {
    /// Forward of `n` examples `x` into `y` (bias and fused ReLU included). Leaves the last
    /// chunk's transformed input in the workspace for [`backward`].
    pub(crate) fn forward(
        par: Parallelism,
        c: &ConvOp,
        p: &[f32],
        x: &[f32],
        y: &mut [f32],
        ws: &mut Workspace,
        n: usize,
    ) {
        match (ws.tile, c.kh) {
            (TileSize::Two, 5) => forward_with::<2, 6, 5, F2>(par, c, p, x, y, ws, n),
            (TileSize::Four, 5) => forward_with::<4, 8, 5, F4>(par, c, p, x, y, ws, n),
            (TileSize::Two, _) => forward_with::<2, 4, 3, F2K3>(par, c, p, x, y, ws, n),
            (TileSize::Four, _) => forward_with::<4, 6, 3, F4K3>(par, c, p, x, y, ws, n),
        }
    }
}

#[inline(always)]
fn forward_with<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    par: Parallelism,
    c: &ConvOp,
    p: &[f32],
    x: &[f32],
    y: &mut [f32],
    ws: &mut Workspace,
    n: usize,
) {
    let (inp, out) = planes(c);
    let (t, _) = tilings(c, R);
    transform_kernels::<R, N, K, S>(c, &p[c.w..c.w + c.cout * c.cin * K * K], ws, false);
    let bias = c.bias.then(|| &p[c.b..c.b + c.cout]);
    for start in (0..n).step_by(ws.chunk) {
        let m = ws.chunk.min(n - start);
        let ld = m * t.tiles();
        let lds = ld + L;
        input_transform::<R, N, K, S>(
            &x[start * inp.len()..],
            inp,
            &t,
            m,
            &mut ws.a,
            lds,
            &mut ws.rows,
        );
        position_products::<K>(par, N * N, &ws.u, &ws.a, lds, &mut ws.b, c.cout, c.cin, ld);
        output_transform::<R, N, K, S>(
            &ws.b,
            ld,
            out,
            &t,
            m,
            &mut y[start * out.len()..],
            bias,
            c.relu,
        );
    }
}

avx2_dispatch! {
    /// Backward of `n` examples: bias and weight gradients into `grads`, and with `need_dx` the
    /// input gradient into `dx`. `dy` is the output gradient with the fused ReLU already masked,
    /// and `p` holds the weights forward used.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        par: Parallelism,
        c: &ConvOp,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        need_dx: bool,
    ) {
        match (ws.tile, c.kh) {
            (TileSize::Two, 5) => {
                backward_with::<2, 6, 5, F2>(par, c, p, grads, x, dy, dx, ws, n, need_dx)
            }
            (TileSize::Four, 5) => {
                backward_with::<4, 8, 5, F4>(par, c, p, grads, x, dy, dx, ws, n, need_dx)
            }
            (TileSize::Two, _) => {
                backward_with::<2, 4, 3, F2K3>(par, c, p, grads, x, dy, dx, ws, n, need_dx)
            }
            (TileSize::Four, _) => {
                backward_with::<4, 6, 3, F4K3>(par, c, p, grads, x, dy, dx, ws, n, need_dx)
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_with<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    par: Parallelism,
    c: &ConvOp,
    p: &[f32],
    grads: &mut [f32],
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    ws: &mut Workspace,
    n: usize,
    need_dx: bool,
) {
    let (inp, out) = planes(c);
    let hw = out.h * out.w;
    let bias_grads = if c.bias {
        &mut grads[c.b..c.b + c.cout]
    } else {
        &mut []
    };
    for (k, db) in bias_grads.iter_mut().enumerate() {
        *db = (0..n)
            .map(|s| crate::kernels::lane_sum(&dy[(s * c.cout + k) * hw..][..hw]))
            .sum();
    }
    let (fwd, bwd) = tilings(c, R);
    if need_dx {
        transform_kernels::<R, N, K, S>(c, &p[c.w..c.w + c.cout * c.cin * K * K], ws, true);
    }
    let last = (n - 1) / ws.chunk * ws.chunk;
    for start in (0..n).step_by(ws.chunk).rev() {
        let m = ws.chunk.min(n - start);
        let ld = m * fwd.tiles();
        let lds = ld + L;
        if start != last {
            input_transform::<R, N, K, S>(
                &x[start * inp.len()..],
                inp,
                &fwd,
                m,
                &mut ws.a,
                lds,
                &mut ws.rows,
            );
        }
        let dys = &dy[start * out.len()..];
        grad_transform::<R, N, K, S>(dys, out, &fwd, m, &mut ws.b, lds, &mut ws.rows);
        position_weight_grads::<K>(
            par,
            N * N,
            &ws.b,
            &ws.a,
            lds,
            &mut ws.du,
            c.cout,
            c.cin,
            ld,
            start != last,
        );
        if need_dx {
            let ld = m * bwd.tiles();
            let lds = ld + L;
            input_transform::<R, N, K, S>(dys, out, &bwd, m, &mut ws.b, lds, &mut ws.rows);
            position_products::<K>(
                par,
                N * N,
                &ws.u_rot,
                &ws.b,
                lds,
                &mut ws.a,
                c.cin,
                c.cout,
                ld,
            );
            output_transform::<R, N, K, S>(
                &ws.a,
                ld,
                inp,
                &bwd,
                m,
                &mut dx[start * inp.len()..],
                None,
                false,
            );
        }
    }
    // dW = G^T dU G for every (cout, cin) kernel.
    let stride = c.cout * c.cin;
    for (kc, dw) in grads[c.w..c.w + stride * K * K]
        .chunks_exact_mut(K * K)
        .enumerate()
    {
        // t[j][p] = (G^T dU)_{p, j}.
        let mut t = [[0f32; K]; N];
        for (j, tj) in t.iter_mut().enumerate() {
            *tj = S::gt(std::array::from_fn(|i| ws.du[(i * N + j) * stride + kc]));
        }
        for pp in 0..K {
            let row = S::gt(std::array::from_fn(|j| t[j][pp]));
            dw[pp * K..pp * K + K].copy_from_slice(&row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemes::{G2, G2K3, G4, G4K3};

    /// A^T [(G g) ⊙ (B^T d)] is the correlation of d with g, for basis vectors (G g in f64).
    fn identity_holds<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
        g_rows: &[[f32; K]; N],
    ) {
        for l in 0..N {
            for kk in 0..K {
                let mut d = [0f32; N];
                d[l] = 1.0;
                let mut g = [0f32; K];
                g[kk] = 1.0;
                let bd = S::bt(d);
                let gg: Vec<f64> = (0..N)
                    .map(|i| {
                        (0..K)
                            .map(|p| f64::from(g_rows[i][p]) * f64::from(g[p]))
                            .sum()
                    })
                    .collect();
                let prod: Vec<f32> = (0..N).map(|i| (gg[i] * f64::from(bd[i])) as f32).collect();
                let y = S::at(prod.try_into().unwrap());
                for (i, yv) in y.iter().enumerate() {
                    let want = if l == i + kk { 1.0 } else { 0.0 };
                    assert!(
                        (yv - want).abs() < 1e-6,
                        "R {R} d{l} g{kk} y{i}: {yv} vs {want}"
                    );
                }
                // The written-out G g agrees with the matrix.
                for (i, gv) in S::g(g).iter().enumerate() {
                    assert!((f64::from(*gv) - gg[i]).abs() < 1e-7, "R {R} G row {i}");
                }
            }
        }
        // A is the transpose of A^T, and G^T of G.
        for i in 0..R {
            let mut e = [0f32; R];
            e[i] = 1.0;
            let col = S::a(e);
            for (k, ak) in col.iter().enumerate() {
                let mut m = [0f32; N];
                m[k] = 1.0;
                assert_eq!(*ak, S::at(m)[i], "R {R} A[{k}][{i}]");
            }
        }
        for k in 0..N {
            let mut d = [0f32; N];
            d[k] = 1.0;
            assert_eq!(S::gt(d), g_rows[k], "R {R} G^T column {k}");
        }
    }

    #[test]
    fn one_dimensional_identity_holds() {
        identity_holds::<2, 6, 5, F2>(&G2);
        identity_holds::<4, 8, 5, F4>(&G4);
        identity_holds::<2, 4, 3, F2K3>(&G2K3);
        identity_holds::<4, 6, 3, F4K3>(&G4K3);
    }

    #[test]
    fn study_layers_take_four_by_four_tiles() {
        // mnist-cnn conv2 (14x14, 'same') and cifar-cnn conv2 (12x12, 'same').
        assert_eq!(
            TileSize::for_conv(&conv(32, 64, 14, 14, [2; 4], true)),
            TileSize::Four
        );
        assert_eq!(
            TileSize::for_conv(&conv(64, 64, 12, 12, [2; 4], true)),
            TileSize::Four
        );
        // 2x2 outputs: one tile of 36 beats one of 64.
        assert_eq!(
            TileSize::for_conv(&conv(16, 16, 6, 6, [0; 4], false)),
            TileSize::Two
        );
    }

    /// Deterministic values in [-1, 1).
    pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn conv(cin: usize, cout: usize, h: usize, w: usize, pad: [usize; 4], relu: bool) -> ConvOp {
        conv_k(5, cin, cout, h, w, pad, relu)
    }

    fn conv_k(
        k: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        pad: [usize; 4],
        relu: bool,
    ) -> ConvOp {
        let [pt, pb, pl, pr] = pad;
        ConvOp {
            cin,
            hin: h,
            win: w,
            cout,
            kh: k,
            kw: k,
            sh: 1,
            sw: 1,
            pt,
            pl,
            hout: h + pt + pb + 1 - k,
            wout: w + pl + pr + 1 - k,
            w: 0,
            b: cout * cin * k * k,
            bias: true,
            relu,
        }
    }

    /// Input value at padded position, zero outside the plane.
    fn at(x: &[f32], c: &ConvOp, s: usize, ch: usize, iy: isize, ix: isize) -> f64 {
        if iy < 0 || ix < 0 || iy as usize >= c.hin || ix as usize >= c.win {
            return 0.0;
        }
        f64::from(x[((s * c.cin + ch) * c.hin + iy as usize) * c.win + ix as usize])
    }

    /// Forward, weight, bias and input gradients of the direct convolution in f64.
    fn direct(c: &ConvOp, p: &[f32], x: &[f32], dy: &[f32], n: usize) -> [Vec<f64>; 4] {
        let (ho, wo) = (c.hout, c.wout);
        let mut y = vec![0f64; n * c.cout * ho * wo];
        let mut dw = vec![0f64; c.cout * c.cin * c.kh * c.kw];
        let mut db = vec![0f64; c.cout];
        let mut dx = vec![0f64; n * c.cin * c.hin * c.win];
        for s in 0..n {
            for k in 0..c.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let o = ((s * c.cout + k) * ho + oy) * wo + ox;
                        let g = f64::from(dy[o]);
                        let mut acc = f64::from(p[c.b + k]);
                        db[k] += g;
                        for ch in 0..c.cin {
                            for i in 0..c.kh {
                                for j in 0..c.kw {
                                    let iy = (oy + i) as isize - c.pt as isize;
                                    let ix = (ox + j) as isize - c.pl as isize;
                                    let wi = ((k * c.cin + ch) * c.kh + i) * c.kw + j;
                                    let xv = at(x, c, s, ch, iy, ix);
                                    acc += f64::from(p[wi]) * xv;
                                    dw[wi] += g * xv;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < c.hin
                                        && (ix as usize) < c.win
                                    {
                                        dx[((s * c.cin + ch) * c.hin + iy as usize) * c.win
                                            + ix as usize] += g * f64::from(p[wi]);
                                    }
                                }
                            }
                        }
                        y[o] = if c.relu { acc.max(0.0) } else { acc };
                    }
                }
            }
        }
        [y, dw, db, dx]
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], bound: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (f64::from(*g) - w).abs() / scale)
            .fold(0f64, f64::max);
        eprintln!("{what}: worst error {worst:.2e} of the largest value");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(*g) - w).abs();
            assert!(
                err <= bound * scale,
                "{what}[{i}]: winograd {g} vs direct {w} (|diff| {err:.3e}, scale {scale:.3e})"
            );
        }
    }

    /// Forward, weight/bias/input gradients match the direct convolution, for even and odd
    /// planes, symmetric and asymmetric padding, and batches of several chunks.
    #[test]
    fn matches_direct_convolution() {
        // (layer, examples, trainer batch, input gradient wanted)
        let cases = [
            (conv(16, 24, 14, 14, [2, 2, 2, 2], false), 23, 23, true),
            (conv(16, 24, 14, 14, [2, 2, 2, 2], false), 23, 10, true),
            (conv(16, 16, 12, 12, [2, 2, 2, 2], true), 5, 5, true),
            (conv(17, 16, 9, 11, [1, 3, 4, 0], false), 7, 7, true),
            (conv(16, 19, 20, 7, [0, 0, 3, 1], false), 3, 3, true),
            // Tile rows wider than one lane block (tw = 11 forward, 10 backward), ReLU, first
            // layer (no input gradient).
            (conv(16, 18, 6, 21, [2, 2, 2, 2], true), 4, 4, false),
            (conv(64, 64, 12, 12, [2, 2, 2, 2], false), 4, 4, true),
            // 3x3: ResNet 'same' layers (32x32 and 8x8 planes), asymmetric and no padding, odd
            // planes, several chunks.
            (conv_k(3, 16, 16, 32, 32, [1, 1, 1, 1], true), 3, 3, true),
            (conv_k(3, 64, 64, 8, 8, [1, 1, 1, 1], false), 9, 4, true),
            (conv_k(3, 17, 20, 9, 11, [0, 2, 2, 0], false), 5, 5, true),
            (conv_k(3, 16, 18, 7, 13, [0, 0, 0, 0], true), 4, 4, false),
        ];
        // Worst error allowed, of the largest value: outputs and input gradients, weight gradients.
        let bounds = |tile| match tile {
            TileSize::Two => (1e-5, 5e-5),
            TileSize::Four => (2e-5, 5e-5),
        };
        for (tile, (ci, (c, n, max_batch, need_dx))) in [TileSize::Two, TileSize::Four]
            .into_iter()
            .flat_map(|tile| {
                cases
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(move |case| (tile, case))
            })
        {
            let (bound, dw_bound) = bounds(tile);
            let (name, seed) = (format!("{tile:?} case {ci}"), ci as u64);
            assert!(eligible(&c));
            let p = values(c.b + c.cout, 1 + seed);
            let x = values(n * c.cin * c.hin * c.win, 100 + seed);
            let no_grad = vec![0.0; n * c.cout * c.hout * c.wout];
            let [y_want, ..] = direct(&c, &p, &x, &no_grad, n);
            let mut ws = Workspace::with_tile(&c, max_batch, tile);
            let mut y = vec![0f32; y_want.len()];
            // Trainer-sized calls: at most max_batch examples at a time.
            let mut done = 0;
            while done < n {
                let m = max_batch.min(n - done);
                let (xs, ys) = (
                    &x[done * c.cin * c.hin * c.win..][..m * c.cin * c.hin * c.win],
                    &mut y[done * c.cout * c.hout * c.wout..][..m * c.cout * c.hout * c.wout],
                );
                forward(Parallelism::None, &c, &p, xs, ys, &mut ws, m);
                done += m;
            }
            assert_close(&format!("{name} y"), &y, &y_want, bound);

            // Backward after a forward of the trainer's batch, as `Trainer::step` runs them; with
            // the fused ReLU the caller passes the output gradient already masked.
            let m = n.min(max_batch);
            if ci == 0 {
                assert!(ws.chunk < m, "case 0 runs backward over several chunks");
            }
            forward(Parallelism::None, &c, &p, &x, &mut y, &mut ws, m);
            let mut dy = values(m * c.cout * c.hout * c.wout, 200 + seed);
            if c.relu {
                for (d, o) in dy.iter_mut().zip(&y) {
                    if *o <= 0.0 {
                        *d = 0.0;
                    }
                }
            }
            let [_, dw_want, db_want, dx_want] = direct(&c, &p, &x, &dy, m);
            let mut grads = vec![0f32; p.len()];
            let mut dx = vec![f32::NAN; m * c.cin * c.hin * c.win];
            backward(
                Parallelism::None,
                &c,
                &p,
                &mut grads,
                &x,
                &dy,
                &mut dx,
                &mut ws,
                m,
                need_dx,
            );
            assert_close(&format!("{name} dW"), &grads[..c.b], &dw_want, dw_bound);
            assert_close(&format!("{name} db"), &grads[c.b..], &db_want, bound);
            if need_dx {
                assert_close(&format!("{name} dx"), &dx, &dx_want, bound);
            } else {
                assert!(dx.iter().all(|v| v.is_nan()), "{name}: dx left untouched");
            }
        }
    }
}
