//! Winograd F(2x2, 5x5) convolution for the 5x5, stride-1 layers with many channels (the second
//! convolution of `mnist-cnn` and of `cifar-cnn`, where most of their arithmetic is). Through
//! im2col a 2x2 block of outputs costs 4 x 25 = 100 multiply-adds per input and output channel; in
//! the Winograd domain it costs 36, and all three passes of training use it:
//! - forward: `Y = A^T [(G g G^T) ⊙ (B^T d B)] A` for each 6x6 input tile `d` and 5x5 kernel `g`,
//!   the element-wise products summed over input channels as 36 GEMMs
//!   `[cout x cin] x [cin x tiles]`;
//! - input gradient: the same correlation of the output gradient with the kernel rotated by 180°
//!   and its channels swapped (stride 1 makes it a plain correlation with padding `4 - pad`);
//! - weight gradient, by transposing the forward identity:
//!   `dW = G^T [sum over tiles of (A e A^T) ⊙ (B^T d B)] G` with `e` the tile's 2x2 output
//!   gradient, 36 GEMMs `[cout x tiles] x [tiles x cin]`.
//!
//! The matrices come from the interpolation points 0, 1, -1, 2, -2 and infinity: `B^T` and `A^T`
//! hold small integers, `G` the fractions. The result differs from the direct convolution by float
//! rounding only, larger than im2col's: against an f64 direct convolution, outputs and input
//! gradients within a few 1e-6 of the largest value, weight gradients (sums over every tile, in
//! the transformed domain) within a few 1e-5; the tests bound both.
//!
//! The batch is processed in chunks of examples so the transformed tiles stay cache-sized;
//! backward walks the chunks in reverse, so the last chunk's transformed input is still there from
//! forward and earlier ones are transformed again.

use gemm::Parallelism;

use crate::kernels::{avx2_dispatch, matmul};
use crate::spec::ConvOp;

/// Winograd-domain positions of a 6x6 tile.
const XI: usize = 36;
/// Tiles per chunk. The transforms scatter each tile over 36 rows of a buffer of
/// 36 x channels x chunk tiles; at 192 tiles (1.8 MB with 64 channels) that stays near the L2
/// cache. Measured with `fedra bench train` on this repository's machine: 128-256 within noise,
/// 512 5-10% slower on cifar-cnn at B = 100, 1024 20% slower.
const TILE_BUDGET: usize = 192;

/// Filter transform (6 x 5) for F(2, 5) with points 0, 1, -1, 2, -2, infinity.
const G: [[f32; 5]; 6] = [
    [0.25, 0.0, 0.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0, -1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 0.0, 0.0, 1.0],
];

/// Whether a convolution goes through this module: 5x5, stride 1, padding at most 4 (so the input
/// gradient's padding `4 - pad` is not negative), and enough channels that the 36 GEMMs are not
/// all overhead (the first layers, with 1 or 3 input channels, stay on im2col).
pub(crate) fn eligible(c: &ConvOp) -> bool {
    (c.kh, c.kw, c.sh, c.sw) == (5, 5, 1, 1)
        && c.pt <= 4
        && c.pl <= 4
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

/// Where the 2x2 output tiles of a correlation lie: `th x tw` tiles over an `ho x wo` output,
/// tile (ty, tx) reading the 6x6 input window at (2ty - pt, 2tx - pl).
#[derive(Clone, Copy)]
struct Tiling {
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
    pt: usize,
    pl: usize,
}

impl Tiling {
    fn new(ho: usize, wo: usize, pt: usize, pl: usize) -> Tiling {
        Tiling {
            ho,
            wo,
            th: ho.div_ceil(2),
            tw: wo.div_ceil(2),
            pt,
            pl,
        }
    }
    fn tiles(&self) -> usize {
        self.th * self.tw
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

/// Row scratch for the input and output-gradient transforms, sized for the widest tiling of the
/// layer.
#[derive(Debug)]
struct Rows {
    /// A plane's even and odd columns, zero-padded: [2*th + 4][whp] each.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// One tile row after the column transform, even and odd columns: [6][whp] each.
    t_even: Vec<f32>,
    t_odd: Vec<f32>,
}

/// Width of the even/odd column buffers: whole lane blocks of tiles plus one block, so the
/// row transform's loads at `tx + 1` and `tx + 2` stay inside.
fn padded_half_width(t: &Tiling) -> usize {
    (t.tw.div_ceil(L) + 1) * L
}

impl Rows {
    fn new(tilings: &[Tiling]) -> Rows {
        let ph = tilings.iter().map(|t| 2 * t.th + 4).max().unwrap_or(0);
        let whp = tilings.iter().map(padded_half_width).max().unwrap_or(0);
        Rows {
            even: vec![0.0; ph * whp],
            odd: vec![0.0; ph * whp],
            t_even: vec![0.0; 6 * whp],
            t_odd: vec![0.0; 6 * whp],
        }
    }
    fn floats(&self) -> usize {
        self.even.len() + self.odd.len() + self.t_even.len() + self.t_odd.len()
    }
}

/// Per-layer buffers, sized at construction for the trainer's largest batch.
#[derive(Debug)]
pub(crate) struct Workspace {
    /// Examples per chunk.
    chunk: usize,
    /// Kernel in the Winograd domain, [36][cout][cin].
    u: Vec<f32>,
    /// Rotated, channel-swapped kernel for the input gradient, [36][cin][cout].
    u_rot: Vec<f32>,
    /// Weight gradient in the Winograd domain, [36][cout][cin].
    du: Vec<f32>,
    /// Two tile buffers, [36][channels][chunk tiles (+ L)] each: the forward input transform and
    /// the input-gradient products in `a`; the forward products and the output-gradient transforms
    /// in `b`. Transforms write whole lane blocks, so the rows they write have `L` spare columns
    /// (stride `ld + L`); the products are contiguous (stride `ld`) and read in whole lane blocks,
    /// so each buffer also has `L` spare values at its end.
    a: Vec<f32>,
    b: Vec<f32>,
    rows: Rows,
}

impl Workspace {
    pub(crate) fn new(c: &ConvOp, max_batch: usize) -> Workspace {
        let (fwd, bwd) = tilings(c);
        let per = fwd.tiles().max(bwd.tiles());
        let chunk = (TILE_BUDGET / per).clamp(1, max_batch);
        let tile_len = XI * c.cin.max(c.cout) * (chunk * per + L) + L;
        Workspace {
            chunk,
            u: vec![0.0; XI * c.cout * c.cin],
            u_rot: vec![0.0; XI * c.cout * c.cin],
            du: vec![0.0; XI * c.cout * c.cin],
            a: vec![0.0; tile_len],
            b: vec![0.0; tile_len],
            rows: Rows::new(&[fwd, bwd]),
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

/// `B^T d` for one 6-vector.
#[inline(always)]
fn bt6(d: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * d[1] - 4.0 * d[2] + d[3] + d[4],
        4.0 * d[1] - 4.0 * d[2] - d[3] + d[4],
        -2.0 * d[1] - d[2] + 2.0 * d[3] + d[4],
        2.0 * d[1] - d[2] - 2.0 * d[3] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// `A^T m` for one 6-vector.
#[inline(always)]
fn at6(m: [f32; 6]) -> [f32; 2] {
    [
        m[0] + m[1] + m[2] + m[3] + m[4],
        m[1] - m[2] + 2.0 * m[3] - 2.0 * m[4] + m[5],
    ]
}

/// `A e` for one 2-vector.
#[inline(always)]
fn a2(e: [f32; 2]) -> [f32; 6] {
    [
        e[0],
        e[0] + e[1],
        e[0] - e[1],
        e[0] + 2.0 * e[1],
        e[0] - 2.0 * e[1],
        e[1],
    ]
}

/// `G g` for one 5-vector (the rows of [`G`] written out, so no product with a zero is formed).
#[inline(always)]
fn g6(g: [f32; 5]) -> [f32; 6] {
    const S: f32 = 1.0 / 6.0;
    [
        0.25 * g[0],
        -S * (g[0] + g[1] + g[2] + g[3] + g[4]),
        -S * (g[0] - g[1] + g[2] - g[3] + g[4]),
        G[3][0] * g[0] + G[3][1] * g[1] + G[3][2] * g[2] + G[3][3] * g[3] + G[3][4] * g[4],
        G[4][0] * g[0] + G[4][1] * g[1] + G[4][2] * g[2] + G[4][3] * g[3] + G[4][4] * g[4],
        g[4],
    ]
}

/// `G^T d` for one 6-vector.
#[inline(always)]
fn gt6(d: [f32; 6]) -> [f32; 5] {
    std::array::from_fn(|p| {
        let mut acc = 0.0;
        for (i, dv) in d.iter().enumerate() {
            if G[i][p] != 0.0 {
                acc += G[i][p] * dv;
            }
        }
        acc
    })
}

/// A 6-to-6 transform applied lane by lane to six lane vectors.
#[inline(always)]
fn lanes6(d: [V8; 6], f: impl Fn([f32; 6]) -> [f32; 6]) -> [V8; 6] {
    let mut r = [[0f32; L]; 6];
    for l in 0..L {
        let o = f([d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]]);
        for (ri, ov) in r.iter_mut().zip(o) {
            ri[l] = ov;
        }
    }
    r
}

/// `A^T` applied lane by lane to six lane vectors.
#[inline(always)]
fn at6_lanes(m: [V8; 6]) -> [V8; 2] {
    let mut r = [[0f32; L]; 2];
    for l in 0..L {
        let o = at6([m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]]);
        r[0][l] = o[0];
        r[1][l] = o[1];
    }
    r
}

/// `A` applied lane by lane to two lane vectors.
#[inline(always)]
fn a2_lanes(e0: V8, e1: V8) -> [V8; 6] {
    let mut r = [[0f32; L]; 6];
    for l in 0..L {
        let o = a2([e0[l], e1[l]]);
        for (ri, ov) in r.iter_mut().zip(o) {
            ri[l] = ov;
        }
    }
    r
}

/// `G g G^T` of one 5x5 kernel (row-major), into `out[xi * stride]`.
#[inline(always)]
fn kernel_transform(g: &[f32], out: &mut [f32], stride: usize) {
    // Columns: t[i][q] = (G g)[i][q].
    let mut t = [[0f32; 5]; 6];
    for q in 0..5 {
        let col = g6(std::array::from_fn(|p| g[p * 5 + q]));
        for (ti, cv) in t.iter_mut().zip(col) {
            ti[q] = cv;
        }
    }
    for (i, ti) in t.iter().enumerate() {
        for (j, v) in g6(*ti).into_iter().enumerate() {
            out[(i * 6 + j) * stride] = v;
        }
    }
}

/// Kernel transforms for forward (`u`) and, with `rotated`, for the input gradient (`u_rot`).
#[inline(always)]
fn transform_kernels(c: &ConvOp, w: &[f32], ws: &mut Workspace, rotated: bool) {
    let (cout, cin) = (c.cout, c.cin);
    let mut rot = [0f32; 25];
    for k in 0..cout {
        for ch in 0..cin {
            let g = &w[(k * cin + ch) * 25..][..25];
            if rotated {
                for (r, v) in rot.iter_mut().zip(g.iter().rev()) {
                    *r = *v;
                }
                kernel_transform(&rot, &mut ws.u_rot[ch * cout + k..], cin * cout);
            } else {
                kernel_transform(g, &mut ws.u[k * cin + ch..], cout * cin);
            }
        }
    }
}

/// Splits one `inp.h x inp.w` plane into its even and odd columns, zero-padded by `pt` rows on
/// top and `pl` columns on the left: `rows.even[py * whp + xp]` is the padded plane at
/// (py, 2 xp), `rows.odd` at (py, 2 xp + 1), for `py < ph`, `xp < whp`.
#[inline(always)]
fn split_columns(
    plane: &[f32],
    inp: Planes,
    pt: usize,
    pl: usize,
    ph: usize,
    whp: usize,
    rows: &mut Rows,
) {
    // Half-columns xp whose even (2xp - pl) and odd (2xp + 1 - pl) columns are both inside;
    // past `hi` both are outside (2 * hi >= w + pl - 1), so only `xp < lo` and `xp == hi` need
    // checks and the rest is zero or a plain copy.
    let lo = pl.div_ceil(2);
    let hi = ((inp.w + pl) / 2).clamp(lo, whp);
    for py in 0..ph {
        let er = &mut rows.even[py * whp..(py + 1) * whp];
        let or = &mut rows.odd[py * whp..(py + 1) * whp];
        er.fill(0.0);
        or.fill(0.0);
        let iy = py as isize - pt as isize;
        if iy < 0 || iy as usize >= inp.h {
            continue;
        }
        let src = &plane[iy as usize * inp.w..(iy as usize + 1) * inp.w];
        let at = |ix: isize| {
            if ix >= 0 && (ix as usize) < inp.w {
                src[ix as usize]
            } else {
                0.0
            }
        };
        for xp in (0..lo).chain(hi..(hi + 1).min(whp)) {
            let ix = (2 * xp) as isize - pl as isize;
            er[xp] = at(ix);
            or[xp] = at(ix + 1);
        }
        let inner = &src[2 * lo - pl..];
        for (k, xp) in (lo..hi).enumerate() {
            er[xp] = inner[2 * k];
            or[xp] = inner[2 * k + 1];
        }
    }
}

/// Input transform `B^T d B` of every tile of `m` examples `x` of `inp`, into
/// `v[(xi * inp.c + ch) * lds + col]` with `col = example * tiles + ty * tw + tx`.
///
/// Per plane, the even and odd columns are split apart (with the zero padding) once. A tile row's
/// six input rows then go through B^T column-wise, lanes over columns; the row-wise B^T of tile
/// `tx` reads even/odd columns `tx, tx + 1, tx + 2`, so it too runs with tiles as lanes, and each
/// Winograd position's tiles are stored as one vector. Whole lane blocks are stored: past the
/// row's last tile they write columns of a later tile row (rewritten when that row comes) or the
/// row's spare columns.
#[inline(always)]
fn input_transform(
    x: &[f32],
    inp: Planes,
    t: &Tiling,
    m: usize,
    v: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    let tiles = t.tiles();
    let whp = padded_half_width(t);
    let blocks = t.tw.div_ceil(L);
    let ph = 2 * t.th + 4;
    for s in 0..m {
        for ch in 0..inp.c {
            let plane = &x[s * inp.len() + ch * inp.h * inp.w..][..inp.h * inp.w];
            split_columns(plane, inp, t.pt, t.pl, ph, whp, rows);
            for ty in 0..t.th {
                let base = 2 * ty * whp;
                // The row transform reads half-columns up to tw + 2 (rounded up to lane blocks).
                for c8 in (0..t.tw + 2).step_by(L) {
                    let e = lanes6(
                        std::array::from_fn(|i| load(&rows.even, base + i * whp + c8)),
                        bt6,
                    );
                    let o = lanes6(
                        std::array::from_fn(|i| load(&rows.odd, base + i * whp + c8)),
                        bt6,
                    );
                    for i in 0..6 {
                        store(&mut rows.t_even, i * whp + c8, e[i]);
                        store(&mut rows.t_odd, i * whp + c8, o[i]);
                    }
                }
                let col = s * tiles + ty * t.tw;
                for i in 0..6 {
                    let te = &rows.t_even[i * whp..(i + 1) * whp];
                    let to = &rows.t_odd[i * whp..(i + 1) * whp];
                    for blk in 0..blocks {
                        let x0 = blk * L;
                        let d = [
                            load(te, x0),
                            load(to, x0),
                            load(te, x0 + 1),
                            load(to, x0 + 1),
                            load(te, x0 + 2),
                            load(to, x0 + 2),
                        ];
                        for (j, r) in lanes6(d, bt6).into_iter().enumerate() {
                            store(v, ((i * 6 + j) * inp.c + ch) * lds + col + x0, r);
                        }
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
fn output_transform(
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
    for s in 0..m {
        for k in 0..out.c {
            let bb = bias.map_or(0.0, |b| b[k]);
            let plane = &mut y[s * out.len() + k * out.h * out.w..][..out.h * out.w];
            for ty in 0..t.th {
                let col = s * tiles + ty * t.tw;
                for x0 in (0..t.tw).step_by(L) {
                    // r[a][j] = (A^T M)_{a, j}, lanes over tiles.
                    let mut r = [[[0f32; L]; 6]; 2];
                    let [r0, r1] = &mut r;
                    for (j, (r0j, r1j)) in r0.iter_mut().zip(r1.iter_mut()).enumerate() {
                        let mi = std::array::from_fn(|i| {
                            load(mprod, ((i * 6 + j) * out.c + k) * ld + col + x0)
                        });
                        [*r0j, *r1j] = at6_lanes(mi);
                    }
                    let lanes = L.min(t.tw - x0);
                    for (a, ra) in r.iter().enumerate() {
                        let oy = 2 * ty + a;
                        if oy >= t.ho {
                            continue;
                        }
                        let [o0, o1] = at6_lanes(*ra);
                        let orow = &mut plane[oy * out.w..(oy + 1) * out.w];
                        for l in 0..lanes {
                            let ox = 2 * (x0 + l);
                            for (b, ov) in [o0[l], o1[l]].into_iter().enumerate() {
                                if ox + b < t.wo {
                                    let v = ov + bb;
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

/// `A e A^T` of every 2x2 output-gradient tile (zero beyond the plane), into
/// `e_hat[(xi * out.c + k) * lds + col]`, tiles of a row as lanes (whole lane blocks stored, as in
/// [`input_transform`]).
#[inline(always)]
fn grad_transform(
    dy: &[f32],
    out: Planes,
    t: &Tiling,
    m: usize,
    e_hat: &mut [f32],
    lds: usize,
    rows: &mut Rows,
) {
    let tiles = t.tiles();
    let whp = padded_half_width(t);
    for s in 0..m {
        for k in 0..out.c {
            let plane = &dy[s * out.len() + k * out.h * out.w..][..out.h * out.w];
            // Even/odd columns of the plane (zero past it), so each entry of eight neighbouring
            // tiles' 2x2 blocks is one contiguous load.
            split_columns(plane, out, 0, 0, 2 * t.th, whp, rows);
            for ty in 0..t.th {
                let col = s * tiles + ty * t.tw;
                let (r0, r1) = (2 * ty * whp, (2 * ty + 1) * whp);
                for x0 in (0..t.tw).step_by(L) {
                    let c0 = a2_lanes(load(&rows.even, r0 + x0), load(&rows.even, r1 + x0));
                    let c1 = a2_lanes(load(&rows.odd, r0 + x0), load(&rows.odd, r1 + x0));
                    for i in 0..6 {
                        for (j, r) in a2_lanes(c0[i], c1[i]).into_iter().enumerate() {
                            store(e_hat, ((i * 6 + j) * out.c + k) * lds + col + x0, r);
                        }
                    }
                }
            }
        }
    }
}

/// The 36 GEMMs `prod_xi [rows x ld] = kern_xi [rows x inner] x tiles_xi [inner x ld]`, the
/// tiles' rows `lds` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn products(
    par: Parallelism,
    kern: &[f32],
    tiles: &[f32],
    lds: usize,
    prod: &mut [f32],
    rows: usize,
    inner: usize,
    ld: usize,
) {
    for xi in 0..XI {
        matmul(
            par,
            rows,
            ld,
            inner,
            &mut prod[xi * rows * ld..(xi + 1) * rows * ld],
            false,
            &kern[xi * rows * inner..(xi + 1) * rows * inner],
            inner,
            1,
            &tiles[xi * inner * lds..(xi + 1) * inner * lds],
            lds,
            1,
        );
    }
}

/// Forward tiling (over the output) and input-gradient tiling (over the input).
fn tilings(c: &ConvOp) -> (Tiling, Tiling) {
    (
        Tiling::new(c.hout, c.wout, c.pt, c.pl),
        Tiling::new(c.hin, c.win, 4 - c.pt, 4 - c.pl),
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
        let (inp, out) = planes(c);
        let (t, _) = tilings(c);
        transform_kernels(c, &p[c.w..c.w + c.cout * c.cin * 25], ws, false);
        let bias = &p[c.b..c.b + c.cout];
        for start in (0..n).step_by(ws.chunk) {
            let m = ws.chunk.min(n - start);
            let ld = m * t.tiles();
            let lds = ld + L;
            input_transform(
                &x[start * inp.len()..],
                inp,
                &t,
                m,
                &mut ws.a,
                lds,
                &mut ws.rows,
            );
            products(par, &ws.u, &ws.a, lds, &mut ws.b, c.cout, c.cin, ld);
            output_transform(
                &ws.b,
                ld,
                out,
                &t,
                m,
                &mut y[start * out.len()..],
                Some(bias),
                c.relu,
            );
        }
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
        let (inp, out) = planes(c);
        let hw = out.h * out.w;
        for (k, db) in grads[c.b..c.b + c.cout].iter_mut().enumerate() {
            *db = (0..n)
                .map(|s| crate::train::lane_sum(&dy[(s * c.cout + k) * hw..][..hw]))
                .sum();
        }
        let (fwd, bwd) = tilings(c);
        if need_dx {
            transform_kernels(c, &p[c.w..c.w + c.cout * c.cin * 25], ws, true);
        }
        let last = (n - 1) / ws.chunk * ws.chunk;
        for start in (0..n).step_by(ws.chunk).rev() {
            let m = ws.chunk.min(n - start);
            let ld = m * fwd.tiles();
            let lds = ld + L;
            if start != last {
                input_transform(
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
            grad_transform(dys, out, &fwd, m, &mut ws.b, lds, &mut ws.rows);
            for xi in 0..XI {
                // dU_xi [cout x cin] (+)= E_xi [cout x tiles] x V_xi^T.
                matmul(
                    par,
                    c.cout,
                    c.cin,
                    ld,
                    &mut ws.du[xi * c.cout * c.cin..(xi + 1) * c.cout * c.cin],
                    start != last,
                    &ws.b[xi * c.cout * lds..(xi + 1) * c.cout * lds],
                    lds,
                    1,
                    &ws.a[xi * c.cin * lds..(xi + 1) * c.cin * lds],
                    1,
                    lds,
                );
            }
            if need_dx {
                let ld = m * bwd.tiles();
                let lds = ld + L;
                input_transform(dys, out, &bwd, m, &mut ws.b, lds, &mut ws.rows);
                products(par, &ws.u_rot, &ws.b, lds, &mut ws.a, c.cin, c.cout, ld);
                output_transform(
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
        for (kc, dw) in grads[c.w..c.w + stride * 25]
            .chunks_exact_mut(25)
            .enumerate()
        {
            // t[j][p] = (G^T dU)_{p, j}.
            let mut t = [[0f32; 5]; 6];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = gt6(std::array::from_fn(|i| ws.du[(i * 6 + j) * stride + kc]));
            }
            for pp in 0..5 {
                let row = gt6(std::array::from_fn(|j| t[j][pp]));
                dw[pp * 5..pp * 5 + 5].copy_from_slice(&row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A^T [(G g) ⊙ (B^T d)] is the correlation of d with g, for basis vectors in f64.
    #[test]
    fn one_dimensional_identity_holds() {
        for l in 0..6 {
            for kk in 0..5 {
                let mut d = [0f32; 6];
                d[l] = 1.0;
                let mut g = [0f32; 5];
                g[kk] = 1.0;
                let bd = bt6(d);
                let gg: Vec<f64> = (0..6)
                    .map(|i| (0..5).map(|p| f64::from(G[i][p]) * f64::from(g[p])).sum())
                    .collect();
                let prod: Vec<f32> = (0..6).map(|i| (gg[i] * f64::from(bd[i])) as f32).collect();
                let y = at6(prod.try_into().unwrap());
                for (i, yv) in y.iter().enumerate() {
                    let want = if l == i + kk { 1.0 } else { 0.0 };
                    assert!((yv - want).abs() < 1e-6, "d{l} g{kk} y{i}: {yv} vs {want}");
                }
            }
        }
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
        let [pt, pb, pl, pr] = pad;
        ConvOp {
            cin,
            hin: h,
            win: w,
            cout,
            kh: 5,
            kw: 5,
            sh: 1,
            sw: 1,
            pt,
            pl,
            hout: h + pt + pb - 4,
            wout: w + pl + pr - 4,
            w: 0,
            b: cout * cin * 25,
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
        let mut dw = vec![0f64; c.cout * c.cin * 25];
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
                            for i in 0..5 {
                                for j in 0..5 {
                                    let iy = (oy + i) as isize - c.pt as isize;
                                    let ix = (ox + j) as isize - c.pl as isize;
                                    let wi = ((k * c.cin + ch) * 5 + i) * 5 + j;
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

    fn assert_close(what: &str, got: &[f32], want: &[f64]) {
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
                err <= 1e-4 * scale,
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
        ];
        for (ci, (c, n, max_batch, need_dx)) in cases.into_iter().enumerate() {
            assert!(eligible(&c));
            let p = values(c.b + c.cout, 1 + ci as u64);
            let x = values(n * c.cin * c.hin * c.win, 100 + ci as u64);
            let no_grad = vec![0.0; n * c.cout * c.hout * c.wout];
            let [y_want, ..] = direct(&c, &p, &x, &no_grad, n);
            let mut ws = Workspace::new(&c, max_batch);
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
            assert_close(&format!("case {ci} y"), &y, &y_want);

            // Backward after a forward of the trainer's batch, as `Trainer::step` runs them; with
            // the fused ReLU the caller passes the output gradient already masked.
            let m = n.min(max_batch);
            if ci == 0 {
                assert!(ws.chunk < m, "case 0 runs backward over several chunks");
            }
            forward(Parallelism::None, &c, &p, &x, &mut y, &mut ws, m);
            let mut dy = values(m * c.cout * c.hout * c.wout, 200 + ci as u64);
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
            assert_close(&format!("case {ci} dW"), &grads[..c.b], &dw_want);
            assert_close(&format!("case {ci} db"), &grads[c.b..], &db_want);
            if need_dx {
                assert_close(&format!("case {ci} dx"), &dx, &dx_want);
            } else {
                assert!(
                    dx.iter().all(|v| v.is_nan()),
                    "case {ci}: dx left untouched"
                );
            }
        }
    }
}
