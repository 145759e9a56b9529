//! Speech Commands (v0.01 and v0.02): a folder of `<word>/<speaker>_nohash_<n>.wav` clips.
//!
//! * **Split**: the official `validation_list.txt` / `testing_list.txt` when present; otherwise the
//!   dataset's own rule (`which_set` in its README): SHA-1 of the file name with `_nohash_.*`
//!   removed (so all clips of a speaker land in the same split), read as an integer, modulo 2^27,
//!   scaled to a percentage; below 10 is validation, below 20 testing, the rest training.
//!   Train = the training split (plus validation when `validation_into_train`); test = testing.
//!   Validation clips are otherwise left out.
//! * **Speaker split** ([`SplitRule::Speakers`], and what [`SplitRule::Auto`] falls back to when
//!   the rules above leave no training clip, as for the official *test* archive, where every
//!   speaker hashes to testing): every speaker (the file-name part before `_nohash_`) goes wholly
//!   to one side. Speakers are ordered by SHA-256 of `fedra-speaker-split/<speaker>` (a fixed,
//!   documented shuffle that does not depend on which other speakers the folder holds), and taken
//!   into test in that order until test holds at least [`SPEAKER_TEST_PERCENT`]% of the word
//!   clips; the rest is train. Background-noise slices keep their hash split (they have no
//!   speaker).
//! * **Classes**: the chosen keywords in the given order, then `_unknown_` (every clip of every
//!   other word, when `unknown`), then `_silence_` (when `silence`: every whole 1-s slice of the
//!   files in `_background_noise_/`, slice `k` of `noise.wav` split by `which_set("noise_<k>")`).
//! * **Features**: each clip zero-padded or trimmed to 16,000 samples, then MFCC (see
//!   [`crate::mfcc`]) of shape `[1, 49, 10]`, standardised per coefficient with the mean and
//!   standard deviation of the train split, applied to train and test. When the train split is
//!   empty — the official *test* archive, from which the shared subset comes, holds only
//!   testing-split speakers — the test split's own statistics are used, with a warning.
//! * **Cache**: raw MFCCs are cached in one file per (folder, options, file list) under
//!   [`FeatureCache`]'s folder — never inside the dataset folder.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha1::Digest as _;

use crate::dataset::{Dataset, TrainTest};
use crate::error::DataError;
use crate::files::{progress_bar, require_dir};
use crate::mfcc::{MFCC_COEFFS, MFCC_FRAMES_PER_SECOND, Mfcc};
use crate::wav::{SAMPLE_RATE, read_wav_mono16k};

/// The keywords of the study (and of the dataset's 10-word benchmark).
pub const STUDY_KEYWORDS: [&str; 10] = [
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
];
/// Name of the class of all non-keyword words.
pub const UNKNOWN_CLASS: &str = "_unknown_";
/// Name of the class of background-noise slices.
pub const SILENCE_CLASS: &str = "_silence_";
/// Folder of background-noise recordings.
pub const BACKGROUND_FOLDER: &str = "_background_noise_";
/// Clip length every example is padded or trimmed to (1 s at 16 kHz).
pub const CLIP_SAMPLES: usize = SAMPLE_RATE as usize;
/// Percentage of speakers in the validation split when no official lists exist.
pub const VALIDATION_PERCENT: f64 = 10.0;
/// Percentage of speakers in the testing split when no official lists exist.
pub const TESTING_PERCENT: f64 = 10.0;
/// Share of word clips (in percent) the speaker split puts in test.
pub const SPEAKER_TEST_PERCENT: usize = 20;
/// Bumped whenever the feature definition changes, so old cache files are never reused.
const CACHE_VERSION: &str = "fedra-mfcc-v1";

/// Where computed MFCCs are cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureCache {
    /// Compute every time.
    Disabled,
    /// `<default_data_dir()>/cache/mfcc/`.
    Default,
    /// This folder (created if needed).
    Dir(PathBuf),
}

/// What to load from a Speech Commands folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeechOptions {
    /// The keyword classes, in label order. Default: [`STUDY_KEYWORDS`].
    pub keywords: Vec<String>,
    /// Add an `_unknown_` class made of every clip of the other words.
    pub unknown: bool,
    /// Add a `_silence_` class made of 1-s slices of the background-noise files.
    pub silence: bool,
    /// Put the validation split into train (otherwise it is not loaded). Default `true`: fedra
    /// has no use for a held-out validation split, and this keeps every clip in train or test.
    pub validation_into_train: bool,
    /// How clips are split into train and test.
    pub split: SplitRule,
    /// Where to cache the MFCCs.
    pub cache: FeatureCache,
}

/// How a folder's clips are split into train and test (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitRule {
    /// The official split; when it leaves no training clip (the official test archive), the
    /// speaker split.
    #[default]
    Auto,
    /// The official lists, or without them the dataset's hash rule, whatever they give.
    Official,
    /// The speaker split, even when official lists exist. It has no validation split, so
    /// `validation_into_train` does not apply.
    Speakers,
}

impl Default for SpeechOptions {
    fn default() -> Self {
        SpeechOptions {
            keywords: STUDY_KEYWORDS.iter().map(|s| s.to_string()).collect(),
            unknown: false,
            silence: false,
            validation_into_train: true,
            split: SplitRule::Auto,
            cache: FeatureCache::Default,
        }
    }
}

/// Which of the dataset's three splits a clip belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpeechSplit {
    Training,
    Validation,
    Testing,
}

/// The dataset README's `which_set`: the split of a file from the hash of its speaker part.
pub fn which_set(file_name: &str, validation_percent: f64, testing_percent: f64) -> SpeechSplit {
    const MAX_NUM_WAVS_PER_CLASS: u64 = (1 << 27) - 1;
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    let hash_name = match base.find("_nohash_") {
        Some(i) => &base[..i],
        None => base,
    };
    let digest = sha1::Sha1::digest(hash_name.as_bytes());
    // int(hex, 16) % 2^27 only depends on the low 27 bits: the last four bytes suffice.
    let low = u32::from_be_bytes([digest[16], digest[17], digest[18], digest[19]]) as u64;
    let percentage =
        (low % (MAX_NUM_WAVS_PER_CLASS + 1)) as f64 * (100.0 / MAX_NUM_WAVS_PER_CLASS as f64);
    if percentage < validation_percent {
        SpeechSplit::Validation
    } else if percentage < testing_percent + validation_percent {
        SpeechSplit::Testing
    } else {
        SpeechSplit::Training
    }
}

/// One example to compute: a clip file (or a slice of a noise file), its label and split.
#[derive(Clone, Debug)]
struct Item {
    path: PathBuf,
    /// For silence: the sample offset of the slice.
    offset: Option<usize>,
    label: u16,
    split: SpeechSplit,
}

/// Loads Speech Commands from `dir` (see the module documentation for every rule).
pub fn load_speech_commands(dir: &Path, opts: &SpeechOptions) -> Result<TrainTest, DataError> {
    load_speech_commands_with_progress(dir, opts, false)
}

pub(crate) fn load_speech_commands_with_progress(
    dir: &Path,
    opts: &SpeechOptions,
    progress: bool,
) -> Result<TrainTest, DataError> {
    require_dir(dir, "Speech Commands word folders")?;
    let (items, class_names) = list_items(dir, opts)?;
    let mfccs = cached_mfccs(dir, opts, &items, progress)?;
    let per = MFCC_FRAMES_PER_SECOND * MFCC_COEFFS;
    let mut train = empty("speech-commands-train", &class_names);
    let mut test = empty("speech-commands-test", &class_names);
    for (item, feats) in items.iter().zip(mfccs.chunks_exact(per)) {
        let target = match item.split {
            SpeechSplit::Training => &mut train,
            SpeechSplit::Validation if opts.validation_into_train => &mut train,
            SpeechSplit::Validation => continue,
            SpeechSplit::Testing => &mut test,
        };
        target.features.extend_from_slice(feats);
        target.labels.push(item.label);
    }
    if train.is_empty() && test.is_empty() {
        return Err(DataError::Options {
            path: dir.to_path_buf(),
            reason: "no clip selected: both splits are empty".into(),
        });
    }
    if train.is_empty() {
        // The official *test* archive (like the shared subset) holds only testing-split speakers.
        tracing::warn!(
            "{}: the training split is empty (is this the official test archive?); standardising with the test split's statistics",
            dir.display()
        );
        let stats = coefficient_stats(&test);
        apply_stats(&stats, &mut test);
    } else {
        let stats = coefficient_stats(&train);
        apply_stats(&stats, &mut train);
        apply_stats(&stats, &mut test);
    }
    train.validate(dir)?;
    test.validate(dir)?;
    Ok(TrainTest { train, test })
}

fn empty(name: &str, class_names: &[String]) -> Dataset {
    Dataset {
        name: name.to_string(),
        shape: [1, MFCC_FRAMES_PER_SECOND, MFCC_COEFFS],
        features: Vec::new(),
        labels: Vec::new(),
        class_names: class_names.to_vec(),
    }
}

/// Per-coefficient (mean, std) over every frame of `set`.
fn coefficient_stats(set: &Dataset) -> [(f64, f64); MFCC_COEFFS] {
    let mut sum = [0f64; MFCC_COEFFS];
    let mut sum_sq = [0f64; MFCC_COEFFS];
    for row in set.features.chunks_exact(MFCC_COEFFS) {
        for c in 0..MFCC_COEFFS {
            let v = f64::from(row[c]);
            sum[c] += v;
            sum_sq[c] += v * v;
        }
    }
    let n = (set.features.len() / MFCC_COEFFS) as f64;
    let mut stats = [(0f64, 1f64); MFCC_COEFFS];
    for c in 0..MFCC_COEFFS {
        let mean = sum[c] / n;
        let var = (sum_sq[c] / n - mean * mean).max(0.0);
        // A constant coefficient carries no information; dividing by 1 keeps it finite.
        stats[c] = (mean, if var > 1e-12 { var.sqrt() } else { 1.0 });
    }
    stats
}

/// Standardises every coefficient of `set` with `stats`.
fn apply_stats(stats: &[(f64, f64); MFCC_COEFFS], set: &mut Dataset) {
    for row in set.features.chunks_exact_mut(MFCC_COEFFS) {
        for (v, (mean, std)) in row.iter_mut().zip(stats) {
            *v = ((f64::from(*v) - mean) / std) as f32;
        }
    }
}

fn read_list(path: &Path) -> Result<HashSet<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(text
        .lines()
        .map(|l| l.trim().replace('\\', "/"))
        .filter(|l| !l.is_empty())
        .collect())
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The class names `opts` gives: its keywords, then the unknown and silence classes if asked
/// for (the label order of [`load_speech_commands`]).
pub fn class_names(opts: &SpeechOptions) -> Vec<String> {
    let mut names = opts.keywords.clone();
    if opts.unknown {
        names.push(UNKNOWN_CLASS.to_string());
    }
    if opts.silence {
        names.push(SILENCE_CLASS.to_string());
    }
    names
}

/// Every example to load, in a fixed order (classes' folders and files sorted by name).
fn list_items(dir: &Path, opts: &SpeechOptions) -> Result<(Vec<Item>, Vec<String>), DataError> {
    let bad_opts = |reason: String| DataError::Options {
        path: dir.to_path_buf(),
        reason,
    };
    if opts.keywords.is_empty() {
        return Err(bad_opts("no keyword given".into()));
    }
    let mut class_names: Vec<String> = Vec::new();
    for k in &opts.keywords {
        if k.starts_with('_') || k.contains(['/', '\\']) {
            return Err(bad_opts(format!("{k:?} is not a word folder name")));
        }
        if class_names.contains(k) {
            return Err(bad_opts(format!("keyword {k:?} given twice")));
        }
        if !dir.join(k).is_dir() {
            return Err(DataError::NotFound {
                path: dir.join(k),
                what: format!("folder of keyword {k:?}"),
            });
        }
        class_names.push(k.clone());
    }
    let unknown_label = opts.unknown.then(|| {
        class_names.push(UNKNOWN_CLASS.to_string());
        (class_names.len() - 1) as u16
    });
    let silence_label = opts.silence.then(|| {
        class_names.push(SILENCE_CLASS.to_string());
        (class_names.len() - 1) as u16
    });

    let val_list = dir.join("validation_list.txt");
    let test_list = dir.join("testing_list.txt");
    let lists = match (val_list.is_file(), test_list.is_file()) {
        (true, true) => Some((read_list(&val_list)?, read_list(&test_list)?)),
        (false, false) => None,
        (true, false) => {
            return Err(DataError::NotFound {
                path: test_list,
                what: "validation_list.txt is present but its companion is missing".into(),
            });
        }
        (false, true) => {
            return Err(DataError::NotFound {
                path: val_list,
                what: "testing_list.txt is present but its companion is missing".into(),
            });
        }
    };
    let split_of = |word: &str, name: &str| match &lists {
        Some((val, test)) => {
            let rel = format!("{word}/{name}");
            if test.contains(&rel) {
                SpeechSplit::Testing
            } else if val.contains(&rel) {
                SpeechSplit::Validation
            } else {
                SpeechSplit::Training
            }
        }
        None => which_set(name, VALIDATION_PERCENT, TESTING_PERCENT),
    };

    let mut items = Vec::new();
    for word_dir in sorted_entries(dir)? {
        if !word_dir.is_dir() {
            continue;
        }
        let word = file_name(&word_dir);
        if word.starts_with('_') || word.starts_with('.') {
            continue;
        }
        let label = match opts.keywords.iter().position(|k| *k == word) {
            Some(i) => i as u16,
            None => match unknown_label {
                Some(l) => l,
                None => continue,
            },
        };
        for wav in sorted_entries(&word_dir)? {
            if wav.extension().is_none_or(|e| e != "wav") {
                continue;
            }
            let name = file_name(&wav);
            items.push(Item {
                split: split_of(&word, &name),
                path: wav,
                offset: None,
                label,
            });
        }
    }
    let no_training_clip = items.iter().all(|it| it.split == SpeechSplit::Testing);
    if opts.split == SplitRule::Speakers || (opts.split == SplitRule::Auto && no_training_clip) {
        let test = speaker_split(&mut items);
        if opts.split == SplitRule::Auto && !items.is_empty() {
            tracing::info!(
                "{}: the official split leaves no training clip (the official test archive?); \
                 split by speaker instead: {test} of {} clips in test",
                dir.display(),
                items.len()
            );
        }
    }
    if let Some(label) = silence_label {
        let noise_dir = dir.join(BACKGROUND_FOLDER);
        require_dir(
            &noise_dir,
            "background-noise WAV files (needed for _silence_)",
        )?;
        for wav in sorted_entries(&noise_dir)? {
            if wav.extension().is_none_or(|e| e != "wav") {
                continue;
            }
            let len = read_wav_mono16k(&wav)?.len();
            let stem = wav
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            for k in 0..len / CLIP_SAMPLES {
                items.push(Item {
                    split: which_set(&format!("{stem}_{k}"), VALIDATION_PERCENT, TESTING_PERCENT),
                    path: wav.clone(),
                    offset: Some(k * CLIP_SAMPLES),
                    label,
                });
            }
        }
    }
    for (i, name) in class_names.iter().enumerate() {
        if !items.iter().any(|it| it.label as usize == i) {
            return Err(bad_opts(format!("class {name:?} has no clip")));
        }
    }
    Ok((items, class_names))
}

/// The speaker of a clip file: its name's part before `_nohash_` (the whole name without one).
fn speaker_of(path: &Path) -> String {
    let name = file_name(path);
    match name.find("_nohash_") {
        Some(i) => name[..i].to_string(),
        None => name,
    }
}

/// Assigns every word clip of `items` to train or test by speaker (the module documentation
/// gives the rule); returns how many clips went to test.
fn speaker_split(items: &mut [Item]) -> usize {
    let mut clips_of: std::collections::BTreeMap<String, usize> = Default::default();
    for it in items.iter() {
        *clips_of.entry(speaker_of(&it.path)).or_default() += 1;
    }
    let mut order: Vec<([u8; 32], &String)> = clips_of
        .keys()
        .map(|s| {
            let d = sha2::Sha256::digest(format!("fedra-speaker-split/{s}").as_bytes());
            (d.into(), s)
        })
        .collect();
    order.sort();
    // Rounded up: a folder of one speaker puts its clips in test rather than nowhere.
    let want = (items.len() * SPEAKER_TEST_PERCENT).div_ceil(100);
    let mut test_speakers = HashSet::new();
    let mut test = 0;
    for (_, speaker) in order {
        if test >= want {
            break;
        }
        test += clips_of[speaker];
        test_speakers.insert(speaker.clone());
    }
    for it in items.iter_mut() {
        it.split = if test_speakers.contains(&speaker_of(&it.path)) {
            SpeechSplit::Testing
        } else {
            SpeechSplit::Training
        };
    }
    test
}

/// Every clip [`load_speech_commands`] would load from `dir` with `opts`, in load order, with
/// its split (a background-noise slice appears once per slice, under its file's path). Reads
/// only the folder listing and the noise files' lengths, no clip.
pub fn clip_splits(
    dir: &Path,
    opts: &SpeechOptions,
) -> Result<Vec<(PathBuf, SpeechSplit)>, DataError> {
    require_dir(dir, "Speech Commands word folders")?;
    let (items, _) = list_items(dir, opts)?;
    Ok(items.into_iter().map(|it| (it.path, it.split)).collect())
}

/// MFCCs of one item: its clip padded/trimmed to 1 s.
fn item_mfcc(item: &Item, mfcc: &Mfcc) -> Result<Vec<f32>, DataError> {
    let samples = read_wav_mono16k(&item.path)?;
    let start = item.offset.unwrap_or(0);
    let mut clip = vec![0f32; CLIP_SAMPLES];
    let available = samples.len().saturating_sub(start).min(CLIP_SAMPLES);
    clip[..available].copy_from_slice(&samples[start..start + available]);
    Ok(mfcc.compute(&clip))
}

/// The cache key: the definition version, the folder, the options and every file's identity.
fn cache_key(dir: &Path, opts: &SpeechOptions, items: &[Item]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(CACHE_VERSION.as_bytes());
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    h.update(canonical.to_string_lossy().as_bytes());
    h.update(format!(
        "{:?}|{}|{}",
        opts.keywords, opts.unknown, opts.silence
    ));
    for it in items {
        h.update(it.path.to_string_lossy().as_bytes());
        let meta = std::fs::metadata(&it.path).ok();
        let size = meta.as_ref().map_or(0, |m| m.len());
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.update(format!("|{:?}|{size}|{mtime}|{}\n", it.offset, it.label));
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

const CACHE_MAGIC: &[u8; 8] = b"FEDRAMF1";

fn cached_mfccs(
    dir: &Path,
    opts: &SpeechOptions,
    items: &[Item],
    progress: bool,
) -> Result<Vec<f32>, DataError> {
    let cache_dir = match &opts.cache {
        FeatureCache::Disabled => None,
        FeatureCache::Default => Some(crate::default_data_dir().join("cache").join("mfcc")),
        FeatureCache::Dir(d) => Some(d.clone()),
    };
    let per = MFCC_FRAMES_PER_SECOND * MFCC_COEFFS;
    let cache_file = cache_dir
        .as_ref()
        .map(|d| d.join(format!("mfcc-{}.bin", cache_key(dir, opts, items))));
    if let Some(file) = &cache_file
        && let Ok(bytes) = std::fs::read(file)
    {
        let expected = 16 + items.len() * per * 4;
        if bytes.len() == expected
            && &bytes[..8] == CACHE_MAGIC
            && bytes[8..16] == (items.len() as u64).to_le_bytes()
        {
            tracing::debug!("MFCC cache hit: {}", file.display());
            return Ok(bytes[16..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect());
        }
        tracing::warn!("{}: damaged MFCC cache file, recomputing", file.display());
    }
    let mfcc = Mfcc::new();
    let bar = progress_bar(items.len() as u64, "MFCC", progress);
    let per_item: Vec<Vec<f32>> = items
        .par_iter()
        .map(|it| {
            let r = item_mfcc(it, &mfcc);
            bar.inc(1);
            r
        })
        .collect::<Result<_, _>>()?;
    bar.finish_and_clear();
    let all: Vec<f32> = per_item.concat();
    if let (Some(dir), Some(file)) = (&cache_dir, &cache_file) {
        // A cache that cannot be written only costs time later; it is not an error.
        if let Err(e) = write_cache(dir, file, items.len(), &all) {
            tracing::warn!("{}: cannot write MFCC cache: {e}", file.display());
        }
    }
    Ok(all)
}

fn write_cache(dir: &Path, file: &Path, count: usize, values: &[f32]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let part = file.with_extension("bin.part");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&part)?);
        w.write_all(CACHE_MAGIC)?;
        w.write_all(&(count as u64).to_le_bytes())?;
        for v in values {
            w.write_all(&v.to_le_bytes())?;
        }
        w.flush()?;
    }
    std::fs::rename(&part, file)
}
