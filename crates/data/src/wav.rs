//! Reads the WAV clips of Speech Commands: RIFF/WAVE, PCM, mono, 16 kHz, 16-bit — the only format
//! the dataset uses. Parsing is done by the `hound` crate; anything else (float or compressed
//! samples, stereo, another rate or bit depth, a truncated data chunk) is rejected with an error
//! naming the file, because silently resampling or mixing down would change the features.

use std::path::Path;

use crate::error::DataError;

/// The sample rate every clip must have.
pub const SAMPLE_RATE: u32 = 16_000;

/// Reads a 16 kHz mono 16-bit PCM WAV file and returns its samples scaled to `[-1, 1)`
/// (divided by 32768).
pub fn read_wav_mono16k(path: &Path) -> Result<Vec<f32>, DataError> {
    let bad = |reason: String| DataError::format(path, reason);
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) => DataError::io(path, io),
        other => bad(format!("not a readable PCM WAV file: {other}")),
    })?;
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Int {
        return Err(bad(
            "WAV samples are floating point; only PCM (integer) samples are supported".into(),
        ));
    }
    if spec.channels != 1 {
        return Err(bad(format!(
            "WAV has {} channels; Speech Commands clips must be mono",
            spec.channels
        )));
    }
    if spec.sample_rate != SAMPLE_RATE {
        return Err(bad(format!(
            "WAV sample rate is {} Hz; expected {SAMPLE_RATE} Hz",
            spec.sample_rate
        )));
    }
    if spec.bits_per_sample != 16 {
        return Err(bad(format!(
            "WAV has {}-bit samples; expected 16-bit",
            spec.bits_per_sample
        )));
    }
    reader
        .into_samples::<i16>()
        .map(|s| s.map(|v| f32::from(v) / 32768.0))
        .collect::<Result<Vec<f32>, _>>()
        .map_err(|e| bad(format!("cannot read the WAV samples (truncated?): {e}")))
}
