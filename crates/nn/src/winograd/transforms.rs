//! Moving tiles in and out of the Winograd domain: the kernel transform, the input and
//! output-gradient transforms (planes split into column phases, tiles of a row as vector lanes,
//! each Winograd position's tiles stored as one vector) and the output transform with bias and
//! ReLU.

use super::schemes::Scheme;
use super::{Planes, Tiling, Workspace, set_spread};
use crate::plan::ConvOp;

/// Vector lanes of the transforms: tiles next to each other in a tile row.
pub(super) const L: usize = 8;
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
pub(super) struct Rows {
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
    pub(super) fn new(tilings: &[Tiling], n: usize) -> Rows {
        let phases = tilings.iter().map(phases_len).max().unwrap_or(0);
        let width = tilings.iter().map(padded_width).max().unwrap_or(0);
        Rows {
            phases: vec![0.0; 2 * phases],
            t_cols: vec![0.0; n * n * width],
            line: vec![0.0; tilings.iter().map(|t| t.r).max().unwrap_or(0) * width],
        }
    }
    pub(super) fn floats(&self) -> usize {
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
pub(super) fn transform_kernels<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
>(
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
pub(super) fn input_transform<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
>(
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
            if N == 4 {
                // F(2x2, 3x3): a lane block's 16 column-transformed vectors fit the registers,
                // so the row transform takes them from there, not through `t_cols`.
                for blk in 0..blocks {
                    let x0 = blk * w;
                    // by_row[i][j]: column j's transform, entry i.
                    let mut by_row = [[[0f32; L]; N]; N];
                    for j in 0..N {
                        let src = &split[(j % R) * ph * width + j / R..];
                        let mut d = [[0f32; L]; N];
                        for (i, di) in d.iter_mut().enumerate() {
                            *di = load_segs::<SEG>(src, (R * ty0 + i) * width + x0, R * width);
                        }
                        for (row, e) in by_row.iter_mut().zip(lanes(d, S::bt)) {
                            row[j] = e;
                        }
                    }
                    for (i, d) in by_row.into_iter().enumerate() {
                        for (j, r) in lanes(d, S::bt).into_iter().enumerate() {
                            let row = (i * N + j) * set_spread(inp.c * lds)
                                + ch * lds
                                + s * tiles
                                + blk * w;
                            store_segs::<SEG>(v, row + ty0 * t.tw, t.tw, r);
                        }
                    }
                }
                continue;
            }
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
pub(super) fn output_transform<
    const R: usize,
    const N: usize,
    const K: usize,
    S: Scheme<R, N, K>,
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
pub(super) fn grad_transform<const R: usize, const N: usize, const K: usize, S: Scheme<R, N, K>>(
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
