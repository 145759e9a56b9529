//! A small real subset of MNIST compiled into the binary, so fedra runs on a machine with no
//! network and no data folder. It is the FIRST 10,000 training and the FIRST 2,000 test
//! images/labels of the official MNIST files, unchanged, stored as gzip'd IDX files in
//! `crates/data/assets/` (only the count in each IDX header was rewritten to match).

use crate::dataset::{Dataset, TrainTest, embedded_path};
use crate::error::DataError;
use crate::mnist::split_from_gz_bytes;

const TRAIN_IMAGES: &[u8] = include_bytes!("../assets/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] = include_bytes!("../assets/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] = include_bytes!("../assets/t10k-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] = include_bytes!("../assets/t10k-labels-idx1-ubyte.gz");

/// Number of training examples in the embedded subset (the first 10,000 of MNIST's 60,000).
pub const EMBEDDED_TRAIN_LEN: usize = 10_000;
/// Number of test examples in the embedded subset (the first 2,000 of MNIST's 10,000).
pub const EMBEDDED_TEST_LEN: usize = 2_000;

/// The embedded MNIST subset: the first 10,000 train and first 2,000 test examples of the
/// official files, normalised exactly as [`crate::load_mnist`] does.
pub fn embedded_mnist() -> Result<TrainTest, DataError> {
    let split =
        |name: &str, img: &[u8], lbl: &[u8], files: (&str, &str)| -> Result<Dataset, DataError> {
            split_from_gz_bytes(
                name,
                (img, &embedded_path(files.0)),
                (lbl, &embedded_path(files.1)),
            )
        };
    Ok(TrainTest {
        train: split(
            "mnist-embedded-train",
            TRAIN_IMAGES,
            TRAIN_LABELS,
            ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        )?,
        test: split(
            "mnist-embedded-test",
            TEST_IMAGES,
            TEST_LABELS,
            ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        )?,
    })
}
