//! CIFAR-10 loader on the real shared batches (folder of .bin.gz), an extracted .bin folder, a
//! tar.gz archive built from a small slice, and corrupted copies.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::*;
use fedra_data::cifar::{CIFAR_RECORD_LEN, CIFAR10_MEAN, CIFAR10_STD};
use fedra_data::{DataError, DatasetName, LoadOptions, load, load_cifar10};

const BATCHES: [&str; 6] = [
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
];

fn gunzip_file(p: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The first `records` records of every shared batch, as raw `.bin` files.
fn small_bins(records: usize) -> Vec<(String, Vec<u8>)> {
    BATCHES
        .iter()
        .map(|b| {
            let all = gunzip_file(&cifar_dir().join(format!("{b}.bin.gz")));
            (
                format!("{b}.bin"),
                all[..records * CIFAR_RECORD_LEN].to_vec(),
            )
        })
        .collect()
}

fn write_folder(dir: &Path, bins: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in bins {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn full_shared_batches_load_with_ten_per_cent_per_class() {
    let tt = load_cifar10(&cifar_dir()).unwrap();
    assert_eq!(tt.train.len(), 50_000);
    assert_eq!(tt.test.len(), 10_000);
    assert_eq!(tt.train.shape, [3, 32, 32]);
    assert_eq!(tt.train.class_counts(), vec![5_000; 10]);
    assert_eq!(tt.test.class_counts(), vec![1_000; 10]);
    assert_eq!(tt.train.class_names[0], "airplane");
    assert_eq!(tt.train.class_names[9], "truck");
    // Normalised with the README's train statistics: each channel ~ mean 0, std 1 on train.
    let per_channel = 1024;
    for c in 0..3 {
        let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0f64);
        for i in 0..tt.train.len() {
            for &v in &tt.train.example(i)[c * per_channel..(c + 1) * per_channel] {
                sum += f64::from(v);
                sum_sq += f64::from(v) * f64::from(v);
                n += 1.0;
            }
        }
        let mean = sum / n;
        let std = (sum_sq / n - mean * mean).sqrt();
        assert!(mean.abs() < 2e-3, "channel {c} mean {mean}");
        assert!((std - 1.0).abs() < 2e-3, "channel {c} std {std}");
    }
    // The shared folder also loads through `load` given the datasets root.
    let via_root = load(
        DatasetName::Cifar10,
        Some(&test_data()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(via_root.test.labels, tt.test.labels);
}

#[test]
fn raw_folder_and_archive_agree_and_decode_pixels() {
    let bins = small_bins(50);
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("cifar-10-batches-bin");
    write_folder(&folder, &bins);
    let from_folder = load_cifar10(&folder).unwrap();
    assert_eq!(from_folder.train.len(), 250);
    assert_eq!(from_folder.test.len(), 50);
    // Pixel 0 of the first test image, red channel: (x/255 - mean)/std.
    let raw = &bins[5].1;
    let expected = (f32::from(raw[1]) / 255.0 - CIFAR10_MEAN[0]) / CIFAR10_STD[0];
    assert_eq!(from_folder.test.example(0)[0], expected);
    let blue_last =
        (f32::from(raw[CIFAR_RECORD_LEN - 1]) / 255.0 - CIFAR10_MEAN[2]) / CIFAR10_STD[2];
    assert_eq!(from_folder.test.example(0)[3071], blue_last);
    assert_eq!(from_folder.test.labels[0], u16::from(raw[0]));

    // The official archive layout: cifar-10-binary.tar.gz holding cifar-10-batches-bin/*.bin.
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&archive).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in &bins {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            &bytes[..],
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    let from_archive = load_cifar10(&archive).unwrap();
    assert_eq!(from_archive, from_folder);
    // A folder holding only the archive is found too.
    let only_archive = tempfile::tempdir().unwrap();
    std::fs::copy(&archive, only_archive.path().join("cifar-10-binary.tar.gz")).unwrap();
    assert_eq!(load_cifar10(only_archive.path()).unwrap(), from_folder);
}

#[test]
fn truncated_batch_is_an_error_naming_the_file() {
    let mut bins = small_bins(5);
    let last = bins[2].1.len() - 7;
    bins[2].1.truncate(last);
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path(), &bins);
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("data_batch_3.bin"), "{msg}");
    assert!(msg.contains("3073-byte"), "{msg}");
}

#[test]
fn bad_label_and_corrupt_gzip_are_errors() {
    let mut bins = small_bins(5);
    bins[5].1[2 * CIFAR_RECORD_LEN] = 12;
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path(), &bins);
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("test_batch.bin"), "{err}");
    assert!(err.to_string().contains("record 2"), "{err}");

    // A .bin.gz whose deflate stream is damaged.
    let bins = small_bins(5);
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path(), &bins[1..]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&bins[0].1).unwrap();
    let mut bytes = gz.finish().unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 32] {
        *b ^= 0xff;
    }
    std::fs::write(tmp.path().join("data_batch_1.bin.gz"), bytes).unwrap();
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::Gzip { .. }), "{err:?}");
    assert!(err.to_string().contains("data_batch_1.bin.gz"), "{err}");
}

#[test]
fn missing_batch_and_folder_are_errors() {
    let bins = small_bins(2);
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path(), &bins[..5]);
    let err = load_cifar10(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("test_batch"), "{err}");
    let err = load_cifar10(&tmp.path().join("absent")).unwrap_err();
    assert!(err.to_string().contains("absent"), "{err}");
}
