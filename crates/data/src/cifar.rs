//! CIFAR-10 in its official binary format. Accepted sources: the official
//! `cifar-10-binary.tar.gz` archive, an extracted `cifar-10-batches-bin/` folder whose batches are
//! `.bin` or `.bin.gz`, or a folder holding either of those. Each batch file is a sequence of
//! 3073-byte records: one label byte, then 1024 red, 1024 green and 1024 blue bytes (row-major
//! 32x32). `batches.meta.txt` gives the class names in label order (the standard names are used
//! when it is absent).
//!
//! Features keep the file's CHW layout, shape `[3, 32, 32]`, normalised per channel as
//! `(x/255 - mean) / std` with the training-set mean and std stated in the datasets README
//! (R 0.4914, G 0.4822, B 0.4465; std 0.2470, 0.2435, 0.2616), applied to train and test alike.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::dataset::{Dataset, TrainTest};
use crate::error::DataError;
use crate::files::{find_first, is_gz, progress_bar, read_maybe_gz};
use indicatif::ProgressBar;

/// Bytes per record: 1 label byte + 3 x 32 x 32 pixel bytes.
pub const CIFAR_RECORD_LEN: usize = 1 + 3 * 32 * 32;
/// Per-channel (R, G, B) mean of the training images on `[0, 1]`.
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// Per-channel (R, G, B) standard deviation of the training images on `[0, 1]`.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// Name of the official archive.
pub const CIFAR10_ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// Name of the folder inside the archive.
pub const CIFAR10_FOLDER: &str = "cifar-10-batches-bin";

const TRAIN_BATCHES: [&str; 5] = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
];
const TEST_BATCH: &str = "test_batch";

/// The standard CIFAR-10 class names, in label order.
pub fn cifar10_class_names() -> Vec<String> {
    [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Loads CIFAR-10 from the official archive, an extracted `cifar-10-batches-bin/` folder, or a
/// folder containing either.
pub fn load_cifar10(path: &Path) -> Result<TrainTest, DataError> {
    load_cifar10_with_progress(path, false)
}

/// [`load_cifar10`] with a progress bar over the batches (drawn only on a terminal).
pub(crate) fn load_cifar10_with_progress(
    path: &Path,
    progress: bool,
) -> Result<TrainTest, DataError> {
    let bar = progress_bar(6, "CIFAR-10 batches", progress);
    let result = find_and_load(path, &bar);
    bar.finish_and_clear();
    result
}

fn find_and_load(path: &Path, bar: &ProgressBar) -> Result<TrainTest, DataError> {
    if path.is_file() {
        return load_archive(path, bar);
    }
    if !path.is_dir() {
        return Err(DataError::NotFound {
            path: path.to_path_buf(),
            what: format!("expected {CIFAR10_ARCHIVE} or a {CIFAR10_FOLDER}/ folder"),
        });
    }
    if has_batches(path) {
        return load_folder(path, bar);
    }
    let inner = path.join(CIFAR10_FOLDER);
    if inner.is_dir() {
        return load_folder(&inner, bar);
    }
    let archive = path.join(CIFAR10_ARCHIVE);
    if archive.is_file() {
        return load_archive(&archive, bar);
    }
    Err(DataError::NotFound {
        path: path.join(format!("{}.bin", TRAIN_BATCHES[0])),
        what: format!(
            "no CIFAR-10 batches here: expected data_batch_1..5 and test_batch (.bin or .bin.gz), a {CIFAR10_FOLDER}/ folder or {CIFAR10_ARCHIVE}"
        ),
    })
}

fn batch_file(dir: &Path, base: &str) -> Option<PathBuf> {
    find_first(dir, &[format!("{base}.bin"), format!("{base}.bin.gz")])
}

fn has_batches(dir: &Path) -> bool {
    batch_file(dir, TRAIN_BATCHES[0]).is_some() || batch_file(dir, TEST_BATCH).is_some()
}

fn load_folder(dir: &Path, bar: &ProgressBar) -> Result<TrainTest, DataError> {
    let need = |base: &str| {
        batch_file(dir, base).ok_or_else(|| DataError::NotFound {
            path: dir.join(format!("{base}.bin")),
            what: format!("CIFAR-10 batch {base}(.bin or .bin.gz) is missing"),
        })
    };
    let meta = dir.join("batches.meta.txt");
    let class_names = if meta.is_file() {
        let text = std::fs::read(&meta).map_err(|e| DataError::io(&meta, e))?;
        parse_meta(&text, &meta)?
    } else {
        cifar10_class_names()
    };
    let mut train_batches = Vec::new();
    for base in TRAIN_BATCHES {
        let p = need(base)?;
        train_batches.push((read_maybe_gz(&p)?, p));
        bar.inc(1);
    }
    let test_path = need(TEST_BATCH)?;
    let test_bytes = read_maybe_gz(&test_path)?;
    bar.inc(1);
    assemble(train_batches, (test_bytes, test_path), class_names)
}

fn load_archive(archive: &Path, bar: &ProgressBar) -> Result<TrainTest, DataError> {
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let reader: Box<dyn Read> = if is_gz(archive) {
        Box::new(GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut tar = tar::Archive::new(reader);
    let bad = |e: std::io::Error| DataError::Format {
        path: archive.to_path_buf(),
        reason: format!("cannot read the tar.gz archive: {e}"),
    };
    let mut batches: Vec<(String, Vec<u8>)> = Vec::new();
    let mut meta: Option<Vec<u8>> = None;
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry
            .path()
            .map_err(bad)?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let wanted = name == "batches.meta.txt"
            || TRAIN_BATCHES
                .iter()
                .chain(std::iter::once(&TEST_BATCH))
                .any(|b| name == format!("{b}.bin"));
        if !wanted {
            continue;
        }
        let mut buf = Vec::new();
        entry.read_to_end(&mut buf).map_err(bad)?;
        if name == "batches.meta.txt" {
            meta = Some(buf);
        } else {
            batches.push((name, buf));
            bar.inc(1);
        }
    }
    let member = |base: &str| archive.join(CIFAR10_FOLDER).join(format!("{base}.bin"));
    let mut take = |base: &str| -> Result<(Vec<u8>, PathBuf), DataError> {
        let file = format!("{base}.bin");
        let idx = batches
            .iter()
            .position(|(n, _)| *n == file)
            .ok_or_else(|| DataError::NotFound {
                path: member(base),
                what: "batch missing from the archive".into(),
            })?;
        Ok((batches.swap_remove(idx).1, member(base)))
    };
    let mut train = Vec::new();
    for base in TRAIN_BATCHES {
        train.push(take(base)?);
    }
    let test = take(TEST_BATCH)?;
    let class_names = match meta {
        Some(text) => parse_meta(
            &text,
            &archive.join(CIFAR10_FOLDER).join("batches.meta.txt"),
        )?,
        None => cifar10_class_names(),
    };
    assemble(train, test, class_names)
}

fn parse_meta(text: &[u8], path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::str::from_utf8(text)
        .map_err(|_| DataError::format(path, "class-name file is not UTF-8 text"))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != 10 {
        return Err(DataError::format(
            path,
            format!("expected 10 class names, found {}", names.len()),
        ));
    }
    Ok(names)
}

fn assemble(
    train: Vec<(Vec<u8>, PathBuf)>,
    test: (Vec<u8>, PathBuf),
    class_names: Vec<String>,
) -> Result<TrainTest, DataError> {
    let mut train_set = empty("cifar10-train", class_names.clone());
    for (bytes, path) in &train {
        append_records(&mut train_set, bytes, path)?;
    }
    let mut test_set = empty("cifar10-test", class_names);
    append_records(&mut test_set, &test.0, &test.1)?;
    Ok(TrainTest {
        train: train_set,
        test: test_set,
    })
}

fn empty(name: &str, class_names: Vec<String>) -> Dataset {
    Dataset {
        name: name.to_string(),
        shape: [3, 32, 32],
        features: Vec::new(),
        labels: Vec::new(),
        class_names,
    }
}

/// Decodes the records of one batch file into `set`, normalising every pixel.
fn append_records(set: &mut Dataset, bytes: &[u8], path: &Path) -> Result<(), DataError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD_LEN) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {CIFAR_RECORD_LEN}-byte CIFAR-10 records (truncated or not a CIFAR-10 batch)",
                bytes.len()
            ),
        ));
    }
    // Lookup tables: one (x/255 - mean)/std per channel and byte value, so decoding is a copy.
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        for (v, out) in row.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c];
        }
    }
    let n = bytes.len() / CIFAR_RECORD_LEN;
    set.features.reserve(n * 3072);
    set.labels.reserve(n);
    for (i, record) in bytes.chunks_exact(CIFAR_RECORD_LEN).enumerate() {
        let label = record[0];
        if label as usize >= set.class_names.len() {
            return Err(DataError::format(
                path,
                format!("record {i} has label {label}, CIFAR-10 labels are 0-9"),
            ));
        }
        set.labels.push(u16::from(label));
        for (c, plane) in record[1..].chunks_exact(1024).enumerate() {
            set.features
                .extend(plane.iter().map(|&b| table[c][b as usize]));
        }
    }
    Ok(())
}
