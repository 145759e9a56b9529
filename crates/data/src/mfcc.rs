//! MFCC features for keyword spotting, computed in Rust with a real FFT (`realfft`).
//!
//! # Exact definition
//! For a signal `x` of 16 kHz samples scaled to `[-1, 1)` (a 1-s clip has 16,000 samples):
//! 1. **Frames**: frame `t` is `x[320 t .. 320 t + 480]` (30 ms window, 20 ms stride), no padding
//!    of the signal, so a clip of `n` samples has `1 + (n - 480) / 320` frames: 49 for 1 s.
//! 2. **Window**: periodic Hann, `w[i] = 0.5 - 0.5 cos(2 pi i / 480)`, `i = 0..480`.
//! 3. **Spectrum**: the windowed frame zero-padded at the end to 512 samples, real FFT, power
//!    `|X[k]|^2` for `k = 0..=256` (no scaling by the FFT size).
//! 4. **Mel filterbank**: 40 triangular filters on the HTK mel scale
//!    `mel(f) = 2595 log10(1 + f / 700)`, with 42 edge frequencies equally spaced in mel from
//!    20 Hz to 4000 Hz; filter `m` rises linearly from edge `m` to peak 1 at edge `m+1` and falls to
//!    0 at edge `m+2`, evaluated at the FFT bin frequencies `k * 16000 / 512` (unnormalised:
//!    peak 1, no area normalisation). This is `librosa.filters.mel(sr=16000, n_fft=512,
//!    n_mels=40, fmin=20, fmax=4000, htk=True, norm=None)`.
//! 5. **Log**: `ln(E + 1e-6)` of each filter's energy; the floor keeps silent (zero-padded)
//!    frames finite.
//! 6. **DCT**: orthonormal DCT-II of the 40 log energies (`scipy.fft.dct(type=2, norm="ortho")`),
//!    keeping coefficients 0..10.
//!
//! The output of a clip is frame-major: `49 x 10` values, row = frame. All arithmetic is `f64`;
//! results are returned as `f32`. `fixtures/make_mfcc_fixture.py` computes the same definition
//! with librosa + scipy and the tests compare the two.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// Sample rate the definition assumes.
pub const MFCC_SAMPLE_RATE: usize = 16_000;
/// Window length in samples (30 ms).
pub const MFCC_WINDOW: usize = 480;
/// Stride between frames in samples (20 ms).
pub const MFCC_STRIDE: usize = 320;
/// FFT size (window zero-padded to this).
pub const MFCC_FFT: usize = 512;
/// Number of mel filters.
pub const MFCC_MEL_FILTERS: usize = 40;
/// Lowest filter edge in Hz.
pub const MFCC_FMIN: f64 = 20.0;
/// Highest filter edge in Hz.
pub const MFCC_FMAX: f64 = 4000.0;
/// Number of cepstral coefficients kept.
pub const MFCC_COEFFS: usize = 10;
/// Added to filter energies before the log.
pub const MFCC_LOG_FLOOR: f64 = 1e-6;
/// Frames of a 1-s clip: `1 + (16000 - 480) / 320`.
pub const MFCC_FRAMES_PER_SECOND: usize = 1 + (MFCC_SAMPLE_RATE - MFCC_WINDOW) / MFCC_STRIDE;

/// A reusable MFCC extractor (FFT plan, window, filterbank and DCT matrix built once).
#[derive(Clone)]
pub struct Mfcc {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    /// Per filter: first FFT bin and the weights from that bin on (only the non-zero span).
    filters: Vec<(usize, Vec<f64>)>,
    /// `MFCC_COEFFS x MFCC_MEL_FILTERS`, row-major.
    dct: Vec<f64>,
}

impl std::fmt::Debug for Mfcc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mfcc").finish_non_exhaustive()
    }
}

impl Default for Mfcc {
    fn default() -> Self {
        Self::new()
    }
}

fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

impl Mfcc {
    /// Builds the extractor of the definition in the module documentation.
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(MFCC_FFT);
        let window = (0..MFCC_WINDOW)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / MFCC_WINDOW as f64).cos())
            .collect();
        let (mel_lo, mel_hi) = (hz_to_mel(MFCC_FMIN), hz_to_mel(MFCC_FMAX));
        let edges: Vec<f64> = (0..MFCC_MEL_FILTERS + 2)
            .map(|i| {
                mel_to_hz(mel_lo + (mel_hi - mel_lo) * i as f64 / (MFCC_MEL_FILTERS + 1) as f64)
            })
            .collect();
        let bins = MFCC_FFT / 2 + 1;
        let bin_hz = |k: usize| k as f64 * MFCC_SAMPLE_RATE as f64 / MFCC_FFT as f64;
        let filters = (0..MFCC_MEL_FILTERS)
            .map(|m| {
                let (lo, mid, hi) = (edges[m], edges[m + 1], edges[m + 2]);
                let weights: Vec<f64> = (0..bins)
                    .map(|k| {
                        let f = bin_hz(k);
                        let rising = (f - lo) / (mid - lo);
                        let falling = (hi - f) / (hi - mid);
                        rising.min(falling).max(0.0)
                    })
                    .collect();
                let first = weights.iter().position(|&w| w > 0.0).unwrap_or(0);
                let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
                (first, weights[first..=last.max(first)].to_vec())
            })
            .collect();
        let n = MFCC_MEL_FILTERS as f64;
        let mut dct = Vec::with_capacity(MFCC_COEFFS * MFCC_MEL_FILTERS);
        for k in 0..MFCC_COEFFS {
            let scale = if k == 0 {
                (1.0 / n).sqrt()
            } else {
                (2.0 / n).sqrt()
            };
            for i in 0..MFCC_MEL_FILTERS {
                dct.push(
                    scale
                        * (std::f64::consts::PI * k as f64 * (2.0 * i as f64 + 1.0) / (2.0 * n))
                            .cos(),
                );
            }
        }
        Mfcc {
            fft,
            window,
            filters,
            dct,
        }
    }

    /// Number of frames for a signal of `len` samples (0 if shorter than one window).
    pub fn frames(len: usize) -> usize {
        if len < MFCC_WINDOW {
            0
        } else {
            1 + (len - MFCC_WINDOW) / MFCC_STRIDE
        }
    }

    /// MFCCs of `signal`: `frames(signal.len()) x 10` values, frame-major.
    pub fn compute(&self, signal: &[f32]) -> Vec<f32> {
        let frames = Self::frames(signal.len());
        let mut out = Vec::with_capacity(frames * MFCC_COEFFS);
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut power = vec![0f64; MFCC_FFT / 2 + 1];
        let mut log_mel = [0f64; MFCC_MEL_FILTERS];
        for t in 0..frames {
            let frame = &signal[t * MFCC_STRIDE..t * MFCC_STRIDE + MFCC_WINDOW];
            for (i, slot) in input.iter_mut().enumerate() {
                *slot = if i < MFCC_WINDOW {
                    f64::from(frame[i]) * self.window[i]
                } else {
                    0.0
                };
            }
            // Input and output lengths come from the plan itself, so this cannot fail.
            self.fft
                .process(&mut input, &mut spectrum)
                .expect("buffers made by the FFT plan have the plan's lengths");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            for (slot, (first, weights)) in log_mel.iter_mut().zip(&self.filters) {
                let energy: f64 = weights
                    .iter()
                    .zip(&power[*first..])
                    .map(|(w, p)| w * p)
                    .sum();
                *slot = (energy + MFCC_LOG_FLOOR).ln();
            }
            for row in self.dct.chunks_exact(MFCC_MEL_FILTERS) {
                let c: f64 = row.iter().zip(&log_mel).map(|(a, b)| a * b).sum();
                out.push(c as f32);
            }
        }
        out
    }
}
