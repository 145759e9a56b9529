//! Speech Commands loader, WAV reader and MFCC, on the real shared subset and corrupted copies.

mod common;

use std::path::Path;

use common::*;
use fedra_data::mfcc::{MFCC_COEFFS, MFCC_FRAMES_PER_SECOND, Mfcc};
use fedra_data::speech::{SpeechSplit, clip_splits, which_set};
use fedra_data::wav::read_wav_mono16k;
use fedra_data::{DataError, FeatureCache, SpeechOptions, SplitRule, load_speech_commands};

fn no_cache() -> SpeechOptions {
    SpeechOptions {
        cache: FeatureCache::Disabled,
        ..SpeechOptions::default()
    }
}

/// MFCCs agree with librosa + scipy (fixtures/make_mfcc_fixture.py) on real clips.
/// Tolerance: 1e-4 absolute plus 1e-6 of the value (coefficients range over about +-100; the
/// observed worst difference is ~4e-6, f32 rounding of fedra's output).
#[test]
fn mfcc_matches_librosa_fixture() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mfcc_fixture.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let clips = fixture["clips"].as_array().unwrap();
    assert_eq!(clips.len(), 4);
    let mfcc = Mfcc::new();
    let mut worst = 0f64;
    for clip in clips {
        let file = clip["file"].as_str().unwrap();
        let mut samples = read_wav_mono16k(&speech_dir().join(file)).unwrap();
        samples.resize(16_000, 0.0);
        let ours = mfcc.compute(&samples);
        let rows = clip["mfcc"].as_array().unwrap();
        assert_eq!(rows.len(), MFCC_FRAMES_PER_SECOND, "{file}");
        assert_eq!(ours.len(), MFCC_FRAMES_PER_SECOND * MFCC_COEFFS);
        for (t, row) in rows.iter().enumerate() {
            for (c, v) in row.as_array().unwrap().iter().enumerate() {
                let expected = v.as_f64().unwrap();
                let got = f64::from(ours[t * MFCC_COEFFS + c]);
                let diff = (got - expected).abs();
                worst = worst.max(diff);
                assert!(
                    diff < 1e-4 + 1e-6 * expected.abs(),
                    "{file} frame {t} coefficient {c}: fedra {got}, librosa {expected}"
                );
            }
        }
    }
    eprintln!("worst |fedra - librosa| = {worst:e}");
}

/// Splits computed by the README's Python `which_set` (hashlib SHA-1, int(hex, 16), 2^27).
#[test]
fn which_set_matches_the_reference_python() {
    let cases = [
        ("00000000_nohash_0.wav", SpeechSplit::Validation),
        ("9e3779b1_nohash_0.wav", SpeechSplit::Validation),
        ("2e2ac0ea_nohash_3.wav", SpeechSplit::Validation),
        ("be1e0823_nohash_0.wav", SpeechSplit::Testing),
        ("c6ef3620_nohash_0.wav", SpeechSplit::Testing),
        ("0c40e715_nohash_2.wav", SpeechSplit::Testing),
        ("3c6ef362_nohash_0.wav", SpeechSplit::Training),
        ("daa66d13_nohash_1.wav", SpeechSplit::Training),
        ("0a7c2a8d_nohash_0.wav", SpeechSplit::Training),
    ];
    for (name, expected) in cases {
        assert_eq!(which_set(name, 10.0, 10.0), expected, "{name}");
        assert_eq!(
            which_set(&format!("yes/{name}"), 10.0, 10.0),
            expected,
            "{name}"
        );
    }
}

#[test]
fn which_set_is_by_speaker_and_roughly_ten_percent() {
    // All clips of one speaker share a split.
    assert_eq!(
        which_set("022cd682_nohash_0.wav", 10.0, 10.0),
        which_set("022cd682_nohash_4.wav", 10.0, 10.0)
    );
    let mut counts = [0usize; 3];
    for i in 0..20_000u32 {
        let s = which_set(&format!("{i:08x}_nohash_0.wav"), 10.0, 10.0);
        counts[s as usize] += 1;
    }
    // Training, Validation, Testing in declaration order.
    assert!(
        (15_600..16_400).contains(&counts[SpeechSplit::Training as usize]),
        "{counts:?}"
    );
    assert!(
        (1_800..2_200).contains(&counts[SpeechSplit::Validation as usize]),
        "{counts:?}"
    );
    assert!(
        (1_800..2_200).contains(&counts[SpeechSplit::Testing as usize]),
        "{counts:?}"
    );
}

/// Per-coefficient mean and std of a set's features.
fn coefficient_moments(features: &[f32]) -> Vec<(f64, f64)> {
    (0..MFCC_COEFFS)
        .map(|c| {
            let vals: Vec<f64> = features[c..]
                .iter()
                .step_by(MFCC_COEFFS)
                .map(|&v| f64::from(v))
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            (mean, var.sqrt())
        })
        .collect()
}

/// Clips of each class, train and test together.
fn clips_per_class(tt: &fedra_data::TrainTest) -> Vec<usize> {
    let test = tt.test.class_counts();
    tt.train
        .class_counts()
        .iter()
        .zip(test)
        .map(|(a, b)| a + b)
        .collect()
}

/// The speaker of a clip path (the file-name part before `_nohash_`).
fn speaker(path: &Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name.split("_nohash_").next().unwrap().to_string()
}

#[test]
fn subset_splits_by_speaker_since_the_official_split_has_no_training_clip() {
    let tt = load_speech_commands(&speech_dir(), &no_cache()).unwrap();
    assert_eq!(tt.train.shape, [1, 49, 10]);
    assert_eq!(tt.train.class_names, fedra_data::speech::STUDY_KEYWORDS);
    let per_class = clips_per_class(&tt);
    assert_eq!(per_class, vec![160; 10]);
    let splits = clip_splits(&speech_dir(), &no_cache()).unwrap();
    assert_eq!(splits.len(), 1600);
    let side = |want: SpeechSplit| -> std::collections::BTreeSet<String> {
        splits
            .iter()
            .filter(|(_, s)| *s == want)
            .map(|(p, _)| speaker(p))
            .collect()
    };
    let (train_speakers, test_speakers) = (side(SpeechSplit::Training), side(SpeechSplit::Testing));
    assert_eq!(train_speakers.len() + test_speakers.len(), 193);
    assert!(train_speakers.is_disjoint(&test_speakers));
    // At least 20% of the clips in test, and the last speaker taken adds fewer than 20 clips.
    let n_test = splits
        .iter()
        .filter(|(_, s)| *s == SpeechSplit::Testing)
        .count();
    assert_eq!(tt.test.len(), n_test);
    assert!((320..340).contains(&n_test), "{n_test} test clips");
    // Every keyword on both sides.
    assert!(
        tt.test.class_counts().iter().all(|&c| c >= 10),
        "{:?}",
        tt.test.class_counts()
    );
    // The standardisation is train's: train's coefficients have mean 0 and std 1.
    for (c, (mean, std)) in coefficient_moments(&tt.train.features)
        .into_iter()
        .enumerate()
    {
        assert!(mean.abs() < 1e-4, "coefficient {c} mean {mean}");
        assert!((std - 1.0).abs() < 1e-3, "coefficient {c} std {std}");
    }
    // Deterministic: loading again gives the same bits.
    assert_eq!(
        load_speech_commands(&speech_dir(), &no_cache()).unwrap(),
        tt
    );
}

#[test]
fn subset_loads_with_160_clips_per_keyword_under_the_official_split() {
    let opts = SpeechOptions {
        split: SplitRule::Official,
        ..no_cache()
    };
    let tt = load_speech_commands(&speech_dir(), &opts).unwrap();
    assert_eq!(tt.test.shape, [1, 49, 10]);
    assert_eq!(tt.test.class_names, fedra_data::speech::STUDY_KEYWORDS);
    // The subset comes from the official test archive: the hash split puts every speaker in
    // the testing split, so train is empty and test holds all 160 clips of each keyword.
    assert_eq!(tt.train.len(), 0);
    assert_eq!(tt.test.class_counts(), vec![160; 10]);
    // Standardised (with the test split's own statistics, train being empty).
    for (c, (mean, std)) in coefficient_moments(&tt.test.features)
        .into_iter()
        .enumerate()
    {
        assert!(mean.abs() < 1e-4, "coefficient {c} mean {mean}");
        assert!((std - 1.0).abs() < 1e-3, "coefficient {c} std {std}");
    }
}

#[test]
fn train_statistics_standardise_both_splits() {
    // Official lists turn 20 clips of "yes"/"no" into 14 train, 2 validation, 4 test.
    let tmp = small_copy(10);
    let mut rel: Vec<String> = Vec::new();
    for word in ["yes", "no"] {
        let mut files: Vec<_> = std::fs::read_dir(tmp.path().join(word))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        rel.extend(files.iter().map(|f| format!("{word}/{f}")));
    }
    let test_list = [&rel[0], &rel[1], &rel[10], &rel[11]];
    let val_list = [&rel[2], &rel[12]];
    let join = |l: &[&String]| l.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n");
    std::fs::write(tmp.path().join("testing_list.txt"), join(&test_list)).unwrap();
    std::fs::write(tmp.path().join("validation_list.txt"), join(&val_list)).unwrap();
    let with_val = load_speech_commands(tmp.path(), &two_words()).unwrap();
    assert_eq!((with_val.train.len(), with_val.test.len()), (16, 4));
    let opts = SpeechOptions {
        validation_into_train: false,
        ..two_words()
    };
    let tt = load_speech_commands(tmp.path(), &opts).unwrap();
    assert_eq!((tt.train.len(), tt.test.len()), (14, 4));
    assert_eq!(tt.test.class_counts(), vec![2, 2]);
    for (c, (mean, std)) in coefficient_moments(&tt.train.features)
        .into_iter()
        .enumerate()
    {
        assert!(mean.abs() < 1e-4, "coefficient {c} mean {mean}");
        assert!((std - 1.0).abs() < 1e-3, "coefficient {c} std {std}");
    }
    // Test is standardised with train's statistics, not its own: its moments differ.
    let test_moments = coefficient_moments(&tt.test.features);
    assert!(
        test_moments.iter().any(|(m, _)| m.abs() > 0.01),
        "{test_moments:?}"
    );
}

#[test]
fn keywords_unknown_silence_and_cache() {
    let cache = tempfile::tempdir().unwrap();
    let opts = SpeechOptions {
        keywords: vec!["yes".into(), "no".into()],
        unknown: true,
        silence: true,
        validation_into_train: true,
        split: SplitRule::Auto,
        cache: FeatureCache::Dir(cache.path().to_path_buf()),
    };
    let tt = load_speech_commands(&speech_dir(), &opts).unwrap();
    assert_eq!(
        tt.train.class_names,
        ["yes", "no", "_unknown_", "_silence_"]
    );
    let total = clips_per_class(&tt);
    // 8 other words x 160 clips; the 60-s noise file gives 60 one-second slices.
    assert_eq!(total, [160, 160, 1280, 60]);
    let cached: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache file written");
    // Second load comes from the cache and is bit-identical.
    let again = load_speech_commands(&speech_dir(), &opts).unwrap();
    assert_eq!(again, tt);
    // A damaged cache file is ignored and rewritten, never trusted.
    let file = cached[0].as_ref().unwrap().path();
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::write(&file, b"FEDRAMF1 broken").unwrap();
    let recomputed = load_speech_commands(&speech_dir(), &opts).unwrap();
    assert_eq!(recomputed, tt);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), len);
    // Nothing was written into the dataset folder.
    assert!(
        !speech_dir()
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().contains("mfcc") })
    );
}

/// A copy of two keyword folders (a few clips each) to corrupt.
fn small_copy(per_word: usize) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for word in ["yes", "no"] {
        std::fs::create_dir(tmp.path().join(word)).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(speech_dir().join(word))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(per_word) {
            std::fs::copy(f, tmp.path().join(word).join(f.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

fn two_words() -> SpeechOptions {
    SpeechOptions {
        keywords: vec!["yes".into(), "no".into()],
        ..no_cache()
    }
}

/// A minimal WAV header + data with the given format fields.
fn wav_bytes(format: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&format.to_le_bytes());
    v.extend_from_slice(&channels.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    v.extend_from_slice(&block.to_le_bytes());
    v.extend_from_slice(&bits.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn expect_bad_wav(bytes: Vec<u8>, needle: &str) {
    let tmp = small_copy(3);
    let bad = tmp.path().join("no").join("badbad00_nohash_0.wav");
    std::fs::write(&bad, bytes).unwrap();
    let err = load_speech_commands(tmp.path(), &two_words()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("badbad00_nohash_0.wav"),
        "error does not name the file: {msg}"
    );
    assert!(msg.contains(needle), "error does not say {needle:?}: {msg}");
}

#[test]
fn small_copy_loads_and_short_clips_are_padded() {
    let tmp = small_copy(3);
    // A 0.5-s clip is zero-padded to 1 s rather than rejected.
    let half = vec![0u8; 16_000];
    std::fs::write(
        tmp.path().join("yes").join("short000_nohash_0.wav"),
        wav_bytes(1, 1, 16_000, 16, &half),
    )
    .unwrap();
    let tt = load_speech_commands(tmp.path(), &two_words()).unwrap();
    assert_eq!(tt.train.len() + tt.test.len(), 7);
}

#[test]
fn float_wav_is_rejected() {
    expect_bad_wav(
        wav_bytes(3, 1, 16_000, 32, &[0u8; 64_000]),
        "floating point",
    );
}

#[test]
fn non_pcm_wav_is_rejected() {
    // Format 6 = A-law: compressed, not PCM.
    expect_bad_wav(wav_bytes(6, 1, 16_000, 8, &[0u8; 16_000]), "PCM");
}

#[test]
fn stereo_wav_is_rejected() {
    expect_bad_wav(wav_bytes(1, 2, 16_000, 16, &[0u8; 64_000]), "2 channels");
}

#[test]
fn wrong_rate_and_depth_are_rejected() {
    expect_bad_wav(wav_bytes(1, 1, 8_000, 16, &[0u8; 16_000]), "8000 Hz");
    expect_bad_wav(wav_bytes(1, 1, 16_000, 8, &[0u8; 16_000]), "8-bit");
}

#[test]
fn truncated_wav_is_rejected() {
    let real = std::fs::read(speech_dir().join("yes/022cd682_nohash_0.wav")).unwrap();
    expect_bad_wav(real[..real.len() / 2].to_vec(), "badbad00");
}

#[test]
fn missing_folders_are_errors() {
    let tmp = small_copy(2);
    let opts = SpeechOptions {
        keywords: vec!["yes".into(), "up".into()],
        ..no_cache()
    };
    let err = load_speech_commands(tmp.path(), &opts).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("up"), "{err}");
    let err = load_speech_commands(&tmp.path().join("nowhere"), &two_words()).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
    // _silence_ needs the background-noise folder.
    let opts = SpeechOptions {
        silence: true,
        ..two_words()
    };
    let err = load_speech_commands(tmp.path(), &opts).unwrap_err();
    assert!(err.to_string().contains("_background_noise_"), "{err}");
}

#[test]
fn official_lists_decide_the_split() {
    let tmp = small_copy(3);
    let mut names: Vec<String> = Vec::new();
    for word in ["yes", "no"] {
        let mut files: Vec<_> = std::fs::read_dir(tmp.path().join(word))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        names.push(format!("{word}/{}", files[0]));
    }
    std::fs::write(tmp.path().join("testing_list.txt"), names.join("\n")).unwrap();
    std::fs::write(tmp.path().join("validation_list.txt"), "").unwrap();
    let tt = load_speech_commands(tmp.path(), &two_words()).unwrap();
    assert_eq!(tt.test.len(), 2);
    assert_eq!(tt.train.len(), 4);
    // Asked for, the speaker split overrides the lists: 20% of 6 clips rounds up to 2, so the
    // first speaker in the split's order goes to test with all its clips, whatever the lists say.
    let opts = SpeechOptions {
        split: SplitRule::Speakers,
        ..two_words()
    };
    let splits = clip_splits(tmp.path(), &opts).unwrap();
    let test: Vec<String> = splits
        .iter()
        .filter(|(_, s)| *s == SpeechSplit::Testing)
        .map(|(p, _)| speaker(p))
        .collect();
    assert!(!test.is_empty());
    for (p, s) in &splits {
        assert_eq!(
            *s == SpeechSplit::Testing,
            test.contains(&speaker(p)),
            "{}",
            p.display()
        );
    }
    let by_speaker = load_speech_commands(tmp.path(), &opts).unwrap();
    assert_eq!(by_speaker.test.len(), test.len());
    // Only one of the two lists: an error naming the missing one.
    std::fs::remove_file(tmp.path().join("validation_list.txt")).unwrap();
    let err = load_speech_commands(tmp.path(), &two_words()).unwrap_err();
    assert!(err.to_string().contains("validation_list.txt"), "{err}");
}
