//! MNIST loader and embedded subset, on the real shared files and on corrupted temp copies.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::*;
use fedra_data::{DataError, DatasetName, LoadOptions, embedded_mnist, load, load_mnist};

fn gunzip_file(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A temp folder holding the four files decompressed (raw IDX), for corruption tests.
fn raw_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        let bytes = gunzip_file(&mnist_dir().join(format!("{f}.gz")));
        std::fs::write(tmp.path().join(f), bytes).unwrap();
    }
    tmp
}

#[test]
fn full_mnist_matches_readme_counts() {
    let tt = load_mnist(&mnist_dir()).unwrap();
    assert_eq!(tt.train.len(), 60_000);
    assert_eq!(tt.test.len(), 10_000);
    assert_eq!(tt.train.shape, [1, 28, 28]);
    assert_eq!(tt.train.class_counts(), MNIST_TRAIN_COUNTS);
    assert_eq!(tt.test.class_counts(), MNIST_TEST_COUNTS);
    assert_eq!(&tt.train.labels[..10], &[5, 0, 4, 1, 9, 2, 1, 3, 1, 4]);
    assert!(tt.train.features.iter().all(|&x| (0.0..=1.0).contains(&x)));
    // Both ends of the range occur: pixels really are /255, not /256 or raw bytes.
    assert!(tt.train.features.contains(&1.0));
    assert!(tt.train.features.contains(&0.0));
    // Raw (decompressed) files load identically.
    let raw = raw_copy();
    assert_eq!(load_mnist(raw.path()).unwrap(), tt);
}

#[test]
fn load_finds_mnist_in_folder_or_embedded() {
    let opts = LoadOptions::default();
    let tt = load(DatasetName::Mnist, Some(&mnist_dir()), &opts).unwrap();
    assert_eq!(tt.train.len(), 60_000);
    let emb = load(DatasetName::Mnist, None, &opts).unwrap();
    assert_eq!(emb.train.len(), 10_000);
}

#[test]
fn embedded_subset_is_the_first_rows_of_the_official_files() {
    let full = load_mnist(&mnist_dir()).unwrap();
    let emb = embedded_mnist().unwrap();
    assert_eq!(emb.train.len(), 10_000);
    assert_eq!(emb.test.len(), 2_000);
    let first_train: Vec<usize> = (0..10_000).collect();
    let first_test: Vec<usize> = (0..2_000).collect();
    assert_eq!(
        emb.train.class_counts(),
        full.train.subset(&first_train).class_counts()
    );
    assert_eq!(
        emb.test.class_counts(),
        full.test.subset(&first_test).class_counts()
    );
    assert_eq!(emb.train.features[..], full.train.features[..10_000 * 784]);
    assert_eq!(emb.test.features[..], full.test.features[..2_000 * 784]);
}

#[test]
fn subset_and_example_copy_rows() {
    let emb = embedded_mnist().unwrap();
    let s = emb.train.subset(&[3, 1, 3]);
    assert_eq!(s.len(), 3);
    assert_eq!(s.example(0), emb.train.example(3));
    assert_eq!(s.example(1), emb.train.example(1));
    assert_eq!(
        s.labels,
        vec![
            emb.train.labels[3],
            emb.train.labels[1],
            emb.train.labels[3]
        ]
    );
    assert_eq!(s.example_len(), 784);
    assert_eq!(s.num_classes(), 10);
}

fn expect_format_error(dir: &Path, file: &str, needle: &str) {
    let err = load_mnist(dir).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
    assert!(msg.contains(needle), "error does not say {needle:?}: {msg}");
}

#[test]
fn truncated_images_are_an_error_naming_the_file() {
    let tmp = raw_copy();
    let p = tmp.path().join("t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    expect_format_error(tmp.path(), "t10k-images-idx3-ubyte", "truncated");
}

#[test]
fn truncated_labels_are_an_error_naming_the_file() {
    let tmp = raw_copy();
    let p = tmp.path().join("train-labels-idx1-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
    expect_format_error(tmp.path(), "train-labels-idx1-ubyte", "truncated");
}

#[test]
fn wrong_magic_is_an_error_naming_the_file() {
    let tmp = raw_copy();
    let p = tmp.path().join("train-images-idx3-ubyte");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[3] = 0x01;
    std::fs::write(&p, &bytes).unwrap();
    expect_format_error(tmp.path(), "train-images-idx3-ubyte", "magic");
}

#[test]
fn mismatched_image_and_label_counts_are_an_error() {
    let tmp = raw_copy();
    // Drop the last label and fix the header count, so the file itself is well-formed.
    let p = tmp.path().join("t10k-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.pop();
    bytes[4..8].copy_from_slice(&9_999u32.to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    expect_format_error(tmp.path(), "t10k-labels-idx1-ubyte", "9999 labels but");
}

#[test]
fn label_out_of_range_is_an_error() {
    let tmp = raw_copy();
    let p = tmp.path().join("t10k-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8 + 17] = 10;
    std::fs::write(&p, &bytes).unwrap();
    expect_format_error(tmp.path(), "t10k-labels-idx1-ubyte", "index 17");
}

#[test]
fn corrupt_gzip_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(mnist_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let p = tmp.path().join("t10k-labels-idx1-ubyte.gz");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let err = load_mnist(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    assert!(
        err.to_string().contains("t10k-labels-idx1-ubyte.gz"),
        "{err}"
    );
}

#[test]
fn missing_file_and_folder_are_errors() {
    let tmp = raw_copy();
    std::fs::remove_file(tmp.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let err = load_mnist(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("t10k-labels-idx1-ubyte"), "{err}");
    let gone = tmp.path().join("no-such-folder");
    let err = load_mnist(&gone).unwrap_err();
    assert!(err.to_string().contains("no-such-folder"), "{err}");
}

#[test]
fn dotted_file_names_are_accepted() {
    // Some unpackers write `train-images.idx3-ubyte`; the loader accepts that spelling too.
    let tmp = raw_copy();
    for f in std::fs::read_dir(tmp.path()).unwrap() {
        let p = f.unwrap().path();
        let name = p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("-idx", ".idx");
        std::fs::rename(&p, tmp.path().join(name)).unwrap();
    }
    assert!(tmp.path().join("t10k-labels.idx1-ubyte").is_file());
    let tt = load_mnist(tmp.path()).unwrap();
    assert_eq!(tt.test.class_counts(), MNIST_TEST_COUNTS);
}
