//! Helpers shared by the data-crate integration tests: where the real datasets are.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared datasets folder from `FEDRA_TEST_DATA` (relative paths are taken from the
/// repository root, as CI sets them). Fails loudly when unset: these tests must not pass silently.
pub fn test_data() -> PathBuf {
    let raw = std::env::var_os("FEDRA_TEST_DATA").expect(
        "FEDRA_TEST_DATA is not set: point it at the shared datasets folder, e.g. FEDRA_TEST_DATA=../shared/datasets (relative to the repo root)",
    );
    let p = PathBuf::from(raw);
    let p = if p.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(p)
    } else {
        p
    };
    assert!(
        p.is_dir(),
        "FEDRA_TEST_DATA={} is not a folder",
        p.display()
    );
    p
}

pub fn mnist_dir() -> PathBuf {
    test_data().join("mnist")
}

pub fn cifar_dir() -> PathBuf {
    test_data().join("cifar-10-batches-bin")
}

pub fn speech_dir() -> PathBuf {
    test_data().join("speech_commands_subset")
}

/// The MNIST label counts stated in the datasets README.
pub const MNIST_TRAIN_COUNTS: [usize; 10] =
    [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949];
pub const MNIST_TEST_COUNTS: [usize; 10] = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009];
