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

use gemm::Parallelism;

use crate::kernels::{avx2_dispatch, matmul};
use crate::plan::ConvOp;

/// Winograd-domain values per chunk (tiles x N²). The transforms scatter each tile over N² rows
/// of a buffer of N² x channels x chunk tiles; at 6,912 values (1.8 MB with 64 channels) that
/// stays near the L2 cache. Measured with `fedra bench train` for F(2x2): 128-256 tiles of 36
/// within noise, 512 5-10% slower on cifar-cnn at B = 100, 1024 20% slower.
const POINT_BUDGET: usize = 192 * 36;

/// One scheme F(R x R, K x K): the 1-D transforms for N = R + K - 1 interpolation points. Rust
/// cannot size arrays by `R + K - 1` in generic code, so N is a parameter of its own.
trait Scheme<const R: usize, const N: usize, const K: usize> {
    /// `B^T d` for one N-vector.
    fn bt(d: [f32; N]) -> [f32; N];
    /// `A^T m` for one N-vector.
    fn at(m: [f32; N]) -> [f32; R];
    /// `A e` for one R-vector.
    fn a(e: [f32; R]) -> [f32; N];
    /// `G g` for one kernel row or column.
    fn g(g: [f32; K]) -> [f32; N];
    /// `G^T d` for one N-vector.
    fn gt(d: [f32; N]) -> [f32; K];
}

/// `G^T d` from the rows of `G`, skipping its zeros so no product with a zero is formed.
#[inline(always)]
fn gt_of<const N: usize, const K: usize>(g: &[[f32; K]; N], d: [f32; N]) -> [f32; K] {
    std::array::from_fn(|p| {
        let mut acc = 0.0;
        for (gi, dv) in g.iter().zip(d) {
            if gi[p] != 0.0 {
                acc += gi[p] * dv;
            }
        }
        acc
    })
}

/// F(2x2, 5x5): points 0, 1, -1, 2, -2, infinity.
struct F2;

/// Filter transform (6 x 5) of [`F2`].
const G2: [[f32; 5]; 6] = [
    [0.25, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];

impl Scheme<2, 6, 5> for F2 {
    #[inline(always)]
    fn bt(d: [f32; 6]) -> [f32; 6] {
        [
            4.0 * d[0] - 5.0 * d[2] + d[4],
            -4.0 * d[1] - 4.0 * d[2] + d[3] + d[4],
            4.0 * d[1] - 4.0 * d[2] - d[3] + d[4],
            -2.0 * d[1] - d[2] + 2.0 * d[3] + d[4],
            2.0 * d[1] - d[2] - 2.0 * d[3] + d[4],
            4.0 * d[1] - 5.0 * d[3] + d[5],
        ]
    }

    #[inline(always)]
    fn at(m: [f32; 6]) -> [f32; 2] {
        [
            m[0] + m[1] + m[2] + m[3] + m[4],
            m[1] - m[2] + 2.0 * m[3] - 2.0 * m[4] + m[5],
        ]
    }

    #[inline(always)]
    fn a(e: [f32; 2]) -> [f32; 6] {
        [
            e[0],
            e[0] + e[1],
            e[0] - e[1],
            e[0] + 2.0 * e[1],
            e[0] - 2.0 * e[1],
            e[1],
        ]
    }

    #[inline(always)]
    fn g(g: [f32; 5]) -> [f32; 6] {
        const S: f32 = 1.0 / 6.0;
        [
            0.25 * g[0],
            -S * (g[0] + g[1] + g[2] + g[3] + g[4]),
            -S * (g[0] - g[1] + g[2] - g[3] + g[4]),
            G2[3][0] * g[0] + G2[3][1] * g[1] + G2[3][2] * g[2] + G2[3][3] * g[3] + G2[3][4] * g[4],
            G2[4][0] * g[0] + G2[4][1] * g[1] + G2[4][2] * g[2] + G2[4][3] * g[3] + G2[4][4] * g[4],
            g[4],
        ]
    }

    #[inline(always)]
    fn gt(d: [f32; 6]) -> [f32; 5] {
        gt_of(&G2, d)
    }
}

/// F(4x4, 5x5): points 0, 1, -1, 2, -2, 1/2, -1/2, infinity (the points, and so the `B^T`, of
/// the common F(6x6, 3x3)).
struct F4;

/// Filter transform (8 x 5) of [`F4`].
const G4: [[f32; 5]; 8] = [
    [1.0, 0.0, 0.0, 0.0, 0.0],
    [-2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0, -2.0 / 9.0],
    [-2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0, 2.0 / 9.0, -2.0 / 9.0],
    [1.0 / 90.0, 1.0 / 45.0, 2.0 / 45.0, 4.0 / 45.0, 8.0 / 45.0],
    [1.0 / 90.0, -1.0 / 45.0, 2.0 / 45.0, -4.0 / 45.0, 8.0 / 45.0],
    [32.0 / 45.0, 16.0 / 45.0, 8.0 / 45.0, 4.0 / 45.0, 2.0 / 45.0],
    [
        32.0 / 45.0,
        -16.0 / 45.0,
        8.0 / 45.0,
        -4.0 / 45.0,
        2.0 / 45.0,
    ],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];

impl Scheme<4, 8, 5> for F4 {
    /// Rows in pairs for the points ±p: the even and odd parts of the row polynomial, added and
    /// subtracted.
    #[inline(always)]
    fn bt(d: [f32; 8]) -> [f32; 8] {
        let e1 = d[2] + d[6] - 4.25 * d[4];
        let o1 = d[1] + d[5] - 4.25 * d[3];
        let e2 = 0.25 * d[2] - 1.25 * d[4] + d[6];
        let o2 = 0.5 * d[1] - 2.5 * d[3] + 2.0 * d[5];
        let e3 = 4.0 * d[2] - 5.0 * d[4] + d[6];
        let o3 = 2.0 * d[1] - 2.5 * d[3] + 0.5 * d[5];
        [
            d[0] - d[6] + 5.25 * (d[4] - d[2]),
            e1 + o1,
            e1 - o1,
            e2 + o2,
            e2 - o2,
            e3 + o3,
            e3 - o3,
            d[7] - d[1] + 5.25 * (d[3] - d[5]),
        ]
    }

    #[inline(always)]
    fn at(m: [f32; 8]) -> [f32; 4] {
        let (s1, d1) = (m[1] + m[2], m[1] - m[2]);
        let (s2, d2) = (m[3] + m[4], m[3] - m[4]);
        let (s3, d3) = (m[5] + m[6], m[5] - m[6]);
        [
            m[0] + s1 + s2 + s3,
            d1 + 2.0 * d2 + 0.5 * d3,
            s1 + 4.0 * s2 + 0.25 * s3,
            d1 + 8.0 * d2 + 0.125 * d3 + m[7],
        ]
    }

    #[inline(always)]
    fn a(e: [f32; 4]) -> [f32; 8] {
        let (e1, o1) = (e[0] + e[2], e[1] + e[3]);
        let (e2, o2) = (e[0] + 4.0 * e[2], 2.0 * e[1] + 8.0 * e[3]);
        let (e3, o3) = (e[0] + 0.25 * e[2], 0.5 * e[1] + 0.125 * e[3]);
        [
            e[0],
            e1 + o1,
            e1 - o1,
            e2 + o2,
            e2 - o2,
            e3 + o3,
            e3 - o3,
            e[3],
        ]
    }

    #[inline(always)]
    fn g(g: [f32; 5]) -> [f32; 8] {
        let row =
            |r: &[f32; 5]| r[0] * g[0] + r[1] * g[1] + r[2] * g[2] + r[3] * g[3] + r[4] * g[4];
        const S: f32 = -2.0 / 9.0;
        [
            g[0],
            S * (g[0] + g[1] + g[2] + g[3] + g[4]),
            S * (g[0] - g[1] + g[2] - g[3] + g[4]),
            row(&G4[3]),
            row(&G4[4]),
            row(&G4[5]),
            row(&G4[6]),
            g[4],
        ]
    }

    #[inline(always)]
    fn gt(d: [f32; 8]) -> [f32; 5] {
        gt_of(&G4, d)
    }
}

/// F(2x2, 3x3): points 0, 1, -1, infinity (Lavin and Gray 2016).
struct F2K3;

/// Filter transform (4 x 3) of [`F2K3`].
const G2K3: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

impl Scheme<2, 4, 3> for F2K3 {
    #[inline(always)]
    fn bt(d: [f32; 4]) -> [f32; 4] {
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
    }

    #[inline(always)]
    fn at(m: [f32; 4]) -> [f32; 2] {
        [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
    }

    #[inline(always)]
    fn a(e: [f32; 2]) -> [f32; 4] {
        [e[0], e[0] + e[1], e[0] - e[1], -e[1]]
    }

    #[inline(always)]
    fn g(g: [f32; 3]) -> [f32; 4] {
        [
            g[0],
            0.5 * (g[0] + g[1] + g[2]),
            0.5 * (g[0] - g[1] + g[2]),
            g[2],
        ]
    }

    #[inline(always)]
    fn gt(d: [f32; 4]) -> [f32; 3] {
        gt_of(&G2K3, d)
    }
}

/// F(4x4, 3x3): points 0, 1, -1, 2, -2, infinity (the points, and so the `B^T`, of [`F2`]).
struct F4K3;

/// Filter transform (6 x 3) of [`F4K3`].
const G4K3: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

impl Scheme<4, 6, 3> for F4K3 {
    #[inline(always)]
    fn bt(d: [f32; 6]) -> [f32; 6] {
        F2::bt(d)
    }

    #[inline(always)]
    fn at(m: [f32; 6]) -> [f32; 4] {
        let (s1, d1) = (m[1] + m[2], m[1] - m[2]);
        let (s2, d2) = (m[3] + m[4], m[3] - m[4]);
        [
            m[0] + s1 + s2,
            d1 + 2.0 * d2,
            s1 + 4.0 * s2,
            d1 + 8.0 * d2 + m[5],
        ]
    }

    #[inline(always)]
    fn a(e: [f32; 4]) -> [f32; 6] {
        let (e1, o1) = (e[0] + e[2], e[1] + e[3]);
        let (e2, o2) = (e[0] + 4.0 * e[2], 2.0 * e[1] + 8.0 * e[3]);
        [e[0], e1 + o1, e1 - o1, e2 + o2, e2 - o2, e[3]]
    }

    #[inline(always)]
    fn g(g: [f32; 3]) -> [f32; 6] {
        const S: f32 = 1.0 / 6.0;
        let row = |r: &[f32; 3]| r[0] * g[0] + r[1] * g[1] + r[2] * g[2];
        [
            0.25 * g[0],
            -S * (g[0] + g[1] + g[2]),
            -S * (g[0] - g[1] + g[2]),
            row(&G4K3[3]),
            row(&G4K3[4]),
            g[2],
        ]
    }

    #[inline(always)]
    fn gt(d: [f32; 6]) -> [f32; 3] {
        gt_of(&G4K3, d)
    }
}

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

/// Vector lanes of the transforms: tiles next to each other in a tile row.
const L: usize = 8;
type V8 = [f32; L];

#[inline(always)]
fn load(s: &[f32], at: usize) -> V8 {
    s[at..at + L].try_into().expect("a slice of L values")
}

#[inline(always)]
fn store(d: &mut [f32], at: usize, v: V8) {
    d[at..at + L].copy_from_slice(&v);
}

/// A lane vector of `SEG` segments, segment g loaded from `s[at + g * stride..]`.
#[inline(always)]
fn load_segs<const SEG: usize>(s: &[f32], at: usize, stride: usize) -> V8 {
    if SEG == 1 {
        return load(s, at);
    }
    let w = L / SEG;
    let mut v = [0f32; L];
    for (g, vg) in v.chunks_exact_mut(w).enumerate() {
        vg.copy_from_slice(&s[at + g * stride..][..w]);
    }
    v
}

/// Stores the `SEG` segments of `v`, segment g at `d[at + g * stride..]`, in order of g.
#[inline(always)]
fn store_segs<const SEG: usize>(d: &mut [f32], at: usize, stride: usize, v: V8) {
    if SEG == 1 {
        return store(d, at, v);
    }
    let w = L / SEG;
    for (g, vg) in v.chunks_exact(w).enumerate() {
        d[at + g * stride..][..w].copy_from_slice(vg);
    }
}

/// A 1-D transform applied lane by lane to lane vectors.
#[inline(always)]
fn lanes<const I: usize, const O: usize>(d: [V8; I], f: impl Fn([f32; I]) -> [f32; O]) -> [V8; O] {
    let mut r = [[0f32; L]; O];
    for l in 0..L {
        let mut x = [0f32; I];
        for (xi, di) in x.iter_mut().zip(&d) {
            *xi = di[l];
        }
        let o = f(x);
        for (ri, ov) in r.iter_mut().zip(o) {
            ri[l] = ov;
        }
    }
    r
}

/// Width of the column-phase buffers: whole lane blocks of tiles plus one block, so the column
/// transform's loads at `tx + 1` (and `tx + 2` for R = 2) stay inside. With two segments a load
/// covers columns `j / R .. j / R + L / 2`, inside one block.
fn padded_width(t: &Tiling) -> usize {
    if t.seg == 2 {
        L
    } else {
        (t.tw.div_ceil(L) + 1) * L
    }
}

/// Row scratch for the input and output-gradient transforms, sized for the widest tiling of the
/// layer.
#[derive(Debug)]
struct Rows {
    /// Two planes' columns split by phase (column mod R), zero-padded: [2][R][rows][width]. The
    /// next plane is split while the current one is transformed, so the transforms' vector loads
    /// never wait on the split's scalar stores.
    phases: Vec<f32>,
    /// One tile row after the column transform, for each column j of the window (phase j mod R,
    /// shifted by j / R): [N][N][width]. The row transform loads exactly the vectors the column
    /// transform stored (an unaligned reload of them stalled on store forwarding).
    t_cols: Vec<f32>,
    /// One padded input row: [R * width].
    line: Vec<f32>,
}

impl Rows {
    fn new(tilings: &[Tiling], n: usize) -> Rows {
        let phases = tilings.iter().map(phases_len).max().unwrap_or(0);
        let width = tilings.iter().map(padded_width).max().unwrap_or(0);
        Rows {
            phases: vec![0.0; 2 * phases],
            t_cols: vec![0.0; n * n * width],
            line: vec![0.0; tilings.iter().map(|t| t.r).max().unwrap_or(0) * width],
        }
    }
    fn floats(&self) -> usize {
        self.phases.len() + self.t_cols.len() + self.line.len()
    }
}

/// Values of one split plane: R phases of `padded_rows x padded_width`.
fn phases_len(t: &Tiling) -> usize {
    t.r * t.padded_rows() * padded_width(t)
}

/// Plane `q` of the `total` planes of `src` (each `planes.h x planes.w`), split into its column
/// phases by [`split_columns`] (padding `pad`, `ph` rows, `width` phase columns). The two halves
/// of `phases` alternate: plane q + 1 is split into the other half before plane q is returned, so
/// the transforms' vector loads never wait on the split's stores (plane 0 is split when `q == 0`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn split_ahead<'a, const R: usize>(
    phases: &'a mut [f32],
    line: &mut [f32],
    src: &[f32],
    planes: Planes,
    pad: (usize, usize),
    ph: usize,
    width: usize,
    q: usize,
    total: usize,
) -> &'a [f32] {
    let len = R * ph * width;
    let hw = planes.h * planes.w;
    let (first, second) = phases[..2 * len].split_at_mut(len);
    let (cur, next) = if q.is_multiple_of(2) {
        (first, second)
    } else {
        (second, first)
    };
    if q == 0 {
        split_columns::<R>(&src[..hw], planes, pad.0, pad.1, ph, width, cur, line);
    }
    if q + 1 < total {
        let plane = &src[(q + 1) * hw..][..hw];
        split_columns::<R>(plane, planes, pad.0, pad.1, ph, width, next, line);
    }
    cur
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

/// `G g G^T` of one K x K kernel (row-major), into `out[xi * stride]`.
#[inline(always)]
fn kernel_transform<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    g: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    // Columns: t[i][q] = (G g)[i][q].
    let mut t = [[0f32; K]; N];
    for q in 0..K {
        let col = S::g(std::array::from_fn(|p| g[p * K + q]));
        for (ti, cv) in t.iter_mut().zip(col) {
            ti[q] = cv;
        }
    }
    for (i, ti) in t.iter().enumerate() {
        for (j, v) in S::g(*ti).into_iter().enumerate() {
            out[(i * N + j) * stride] = v;
        }
    }
}

/// Kernel transforms for forward (`u`) and, with `rotated`, for the input gradient (`u_rot`).
#[inline(always)]
fn transform_kernels<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    c: &ConvOp,
    w: &[f32],
    ws: &mut Workspace,
    rotated: bool,
) {
    let (cout, cin) = (c.cout, c.cin);
    let mut rot_buf = [0f32; 25];
    let rot = &mut rot_buf[..K * K];
    for k in 0..cout {
        for ch in 0..cin {
            let g = &w[(k * cin + ch) * K * K..][..K * K];
            if rotated {
                for (r, v) in rot.iter_mut().zip(g.iter().rev()) {
                    *r = *v;
                }
                kernel_transform::<R, N, K, S>(rot, &mut ws.u_rot[ch * cout + k..], cin * cout);
            } else {
                kernel_transform::<R, N, K, S>(g, &mut ws.u[k * cin + ch..], cout * cin);
            }
        }
    }
}

/// Splits one `inp.h x inp.w` plane into its R column phases, zero-padded by `pt` rows on top and
/// `pl` columns on the left: `phases[(p * ph + py) * width + xp]` is the padded plane at
/// (py, R xp + p), for `p < R`, `py < ph`, `xp < width`. Each row is first laid out padded in
/// `line` (R x width values), so the split itself is a fixed-stride copy without bounds checks.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn split_columns<const R: usize>(
    plane: &[f32],
    inp: Planes,
    pt: usize,
    pl: usize,
    ph: usize,
    width: usize,
    phases: &mut [f32],
    line: &mut [f32],
) {
    let phases = &mut phases[..R * ph * width];
    let line = &mut line[..R * width];
    // Columns of the plane that land inside the padded line (the rest is never read).
    let copied = inp.w.min((R * width).saturating_sub(pl));
    for py in 0..ph {
        let iy = py as isize - pt as isize;
        if iy < 0 || iy as usize >= inp.h {
            for p in 0..R {
                phases[(p * ph + py) * width..][..width].fill(0.0);
            }
            continue;
        }
        let src = &plane[iy as usize * inp.w..][..copied];
        line.fill(0.0);
        line[pl..pl + copied].copy_from_slice(src);
        for p in 0..R {
            let dst = &mut phases[(p * ph + py) * width..][..width];
            for (d, block) in dst.iter_mut().zip(line.chunks_exact(R)) {
                *d = block[p];
            }
        }
    }
}

/// Input transform `B^T d B` of every tile of `m` examples `x` of `inp`, into
/// `v[xi * set_spread(inp.c * lds) + ch * lds + col]` with `col = example * tiles + ty * tw + tx`.
///
/// Per plane, the column phases are split apart (with the zero padding) once. Column j of tile
/// `tx`'s window is phase `j % R` at phase column `tx + j / R`, so for each j a tile row's N input
/// rows go through B^T column-wise with tiles as lanes, and the row-wise B^T then combines the N
/// results of each tile, again with tiles as lanes; each Winograd position's tiles are stored as
/// one vector. Whole lane blocks are stored: past the row's last tile they write columns of a later
/// tile row (rewritten when that row comes) or the row's spare columns.
#[inline(always)]
fn input_transform<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    x: &[f32],
    inp: Planes,
    t: &Tiling,
    m: usize,
    v: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    if t.seg == 2 {
        input_transform_segs::<R, N, K, S, 2>(x, inp, t, m, v, lds, rows)
    } else {
        input_transform_segs::<R, N, K, S, 1>(x, inp, t, m, v, lds, rows)
    }
}

#[inline(always)]
fn input_transform_segs<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
    const SEG: usize,
>(
    x: &[f32],
    inp: Planes,
    t: &Tiling,
    m: usize,
    v: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    let tiles = t.tiles();
    let width = padded_width(t);
    let w = L / SEG;
    let blocks = t.tw.div_ceil(w);
    let ph = t.padded_rows();
    let total = m * inp.c;
    let pad = (t.pt, t.pl);
    for q in 0..total {
        let (s, ch) = (q / inp.c, q % inp.c);
        let Rows {
            phases,
            t_cols,
            line,
        } = &mut *rows;
        let split = split_ahead::<R>(phases, line, x, inp, pad, ph, width, q, total);
        for ty0 in (0..t.tile_rows()).step_by(SEG) {
            for j in 0..N {
                let src = &split[(j % R) * ph * width + j / R..];
                let dst = &mut t_cols[j * N * width..][..N * width];
                for blk in 0..blocks {
                    let x0 = blk * w;
                    let mut d = [[0f32; L]; N];
                    for (i, di) in d.iter_mut().enumerate() {
                        *di = load_segs::<SEG>(src, (R * ty0 + i) * width + x0, R * width);
                    }
                    let e = lanes(d, S::bt);
                    for (i, ei) in e.into_iter().enumerate() {
                        store(dst, i * width + blk * L, ei);
                    }
                }
            }
            for i in 0..N {
                for blk in 0..blocks {
                    let mut d = [[0f32; L]; N];
                    for (j, dj) in d.iter_mut().enumerate() {
                        *dj = load(t_cols, (j * N + i) * width + blk * L);
                    }
                    for (j, r) in lanes(d, S::bt).into_iter().enumerate() {
                        let row =
                            (i * N + j) * set_spread(inp.c * lds) + ch * lds + s * tiles + blk * w;
                        store_segs::<SEG>(v, row + ty0 * t.tw, t.tw, r);
                    }
                }
            }
        }
    }
}

/// Output transform `A^T M A` of the products `mprod[(xi * out.c + k) * ld + col]` into `m`
/// examples of `out`, adding `bias` and applying the ReLU when given. Tiles of a row are lanes;
/// only the final interleave into the output row is per value.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_transform<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    mprod: &[f32],
    ld: usize,
    out: Planes,
    t: &Tiling,
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    if t.seg == 2 {
        output_transform_segs::<R, N, K, S, 2>(mprod, ld, out, t, m, y, bias, relu)
    } else {
        output_transform_segs::<R, N, K, S, 1>(mprod, ld, out, t, m, y, bias, relu)
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_transform_segs<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
    const SEG: usize,
>(
    mprod: &[f32],
    ld: usize,
    out: Planes,
    t: &Tiling,
    m: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    let tiles = t.tiles();
    let w = L / SEG;
    for s in 0..m {
        for k in 0..out.c {
            let bb = bias.map_or(0.0, |b| b[k]);
            let plane = &mut y[s * out.len() + k * out.h * out.w..][..out.h * out.w];
            for ty0 in (0..t.tile_rows()).step_by(SEG) {
                for x0 in (0..t.tw).step_by(w) {
                    // r[a][j] = (A^T M)_{a, j}, lanes over tiles.
                    let mut r = [[[0f32; L]; N]; R];
                    for j in 0..N {
                        let mut mi = [[0f32; L]; N];
                        for (i, mv) in mi.iter_mut().enumerate() {
                            let row =
                                (i * N + j) * set_spread(out.c * ld) + k * ld + s * tiles + x0;
                            *mv = load_segs::<SEG>(mprod, row + ty0 * t.tw, t.tw);
                        }
                        for (ra, v) in r.iter_mut().zip(lanes(mi, S::at)) {
                            ra[j] = v;
                        }
                    }
                    let tiles_here = w.min(t.tw - x0);
                    for (a, ra) in r.iter().enumerate() {
                        let o = lanes(*ra, S::at);
                        for g in 0..SEG {
                            // Rows past the plane (R th >= ho) are dropped here.
                            let oy = R * (ty0 + g) + a;
                            if oy >= t.ho {
                                continue;
                            }
                            let orow = &mut plane[oy * out.w..(oy + 1) * out.w];
                            for l in 0..tiles_here {
                                let ox = R * (x0 + l);
                                for (b, ob) in o.iter().enumerate() {
                                    if ox + b < t.wo {
                                        let v = ob[g * w + l] + bb;
                                        orow[ox + b] = if relu { v.max(0.0) } else { v };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `A e A^T` of every R x R output-gradient tile (zero beyond the plane), into
/// `e_hat[xi * set_spread(out.c * lds) + k * lds + col]`, tiles of a row as lanes (whole lane
/// blocks stored, as in [`input_transform`]).
#[inline(always)]
fn grad_transform<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
    dy: &[f32],
    out: Planes,
    t: &Tiling,
    m: usize,
    e_hat: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    if t.seg == 2 {
        grad_transform_segs::<R, N, K, S, 2>(dy, out, t, m, e_hat, lds, rows)
    } else {
        grad_transform_segs::<R, N, K, S, 1>(dy, out, t, m, e_hat, lds, rows)
    }
}

#[inline(always)]
fn grad_transform_segs<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
    const SEG: usize,
>(
    dy: &[f32],
    out: Planes,
    t: &Tiling,
    m: usize,
    e_hat: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    let tiles = t.tiles();
    let width = padded_width(t);
    let w = L / SEG;
    let ph = R * t.tile_rows();
    // Column phases of each plane (zero past it), so each entry of neighbouring tiles' R x R
    // blocks is one contiguous load per segment.
    let total = m * out.c;
    for q in 0..total {
        let (s, k) = (q / out.c, q % out.c);
        let (phases, line) = (&mut rows.phases, &mut rows.line);
        let split = split_ahead::<R>(phases, line, dy, out, (0, 0), ph, width, q, total);
        for ty0 in (0..t.tile_rows()).step_by(SEG) {
            for x0 in (0..t.tw).step_by(w) {
                // c[b] = A (column b of the tiles' blocks).
                let mut c = [[[0f32; L]; N]; R];
                for (b, cb) in c.iter_mut().enumerate() {
                    let mut e = [[0f32; L]; R];
                    for (a, ea) in e.iter_mut().enumerate() {
                        let at = (b * ph + R * ty0 + a) * width + x0;
                        *ea = load_segs::<SEG>(split, at, R * width);
                    }
                    *cb = lanes(e, S::a);
                }
                for i in 0..N {
                    let mut ci = [[0f32; L]; R];
                    for (cv, cb) in ci.iter_mut().zip(&c) {
                        *cv = cb[i];
                    }
                    for (j, r) in lanes(ci, S::a).into_iter().enumerate() {
                        let row = (i * N + j) * set_spread(out.c * lds) + k * lds + s * tiles + x0;
                        store_segs::<SEG>(e_hat, row + ty0 * t.tw, t.tw, r);
                    }
                }
            }
        }
    }
}

/// The N² GEMMs `prod_xi [rows x ld] = kern_xi [rows x inner] x tiles_xi [inner x ld]`, the
/// tiles' rows `lds` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn products(
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
        products(par, N * N, &ws.u, &ws.a, lds, &mut ws.b, c.cout, c.cin, ld);
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
        for xi in 0..N * N {
            // dU_xi [cout x cin] (+)= E_xi [cout x tiles] x V_xi^T.
            matmul(
                par,
                c.cout,
                c.cin,
                ld,
                &mut ws.du[xi * c.cout * c.cin..(xi + 1) * c.cout * c.cin],
                start != last,
                &ws.b[xi * set_spread(c.cout * lds)..][..c.cout * lds],
                lds,
                1,
                &ws.a[xi * set_spread(c.cin * lds)..][..c.cin * lds],
                1,
                lds,
            );
        }
        if need_dx {
            let ld = m * bwd.tiles();
            let lds = ld + L;
            input_transform::<R, N, K, S>(dys, out, &bwd, m, &mut ws.b, lds, &mut ws.rows);
            products(
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
    fn values(n: usize, seed: u64) -> Vec<f32> {
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
