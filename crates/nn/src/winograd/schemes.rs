//! The four Winograd schemes as 1-D transforms: F(2x2, 5x5) and F(4x4, 5x5), F(2x2, 3x3) and
//! F(4x4, 3x3), each from its interpolation points, with the filter matrices `G` the tests check
//! the identity against.

/// One scheme F(R x R, K x K): the 1-D transforms for N = R + K - 1 interpolation points. Rust
/// cannot size arrays by `R + K - 1` in generic code, so N is a parameter of its own.
pub(super) trait Scheme<const R: usize, const N: usize, const K: usize> {
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
pub(super) struct F2;

/// Filter transform (6 x 5) of [`F2`].
pub(super) const G2: [[f32; 5]; 6] = [
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
pub(super) struct F4;

/// Filter transform (8 x 5) of [`F4`].
pub(super) const G4: [[f32; 5]; 8] = [
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
pub(super) struct F2K3;

/// Filter transform (4 x 3) of [`F2K3`].
pub(super) const G2K3: [[f32; 3]; 4] = [
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
pub(super) struct F4K3;

/// Filter transform (6 x 3) of [`F4K3`].
pub(super) const G4K3: [[f32; 3]; 6] = [
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
