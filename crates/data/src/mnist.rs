//! MNIST in its official IDX format: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each either gzip'd (`.gz`, as distributed)
//! or raw. IDX is big-endian: a magic number (`0x00000803` for 3-D `u8` images, `0x00000801` for
//! 1-D `u8` labels), the dimensions, then the data. Every header field is checked against the
//! file's length so a truncated or padded file is an error, never silently cut.
//!
//! Pixels become `f32` in `[0, 1]` (divided by 255), shape `[1, 28, 28]`, as the study's CNN expects.

use std::path::Path;

use crate::dataset::{Dataset, TrainTest};
use crate::error::DataError;
use crate::files::{find_first, gunzip, read_maybe_gz, require_dir};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The class names of MNIST: the digits.
pub fn mnist_class_names() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}

/// Base names of the four files: (train images, train labels, test images, test labels).
pub(crate) const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads MNIST from a folder holding the four IDX files, gzip'd or raw (both names are tried;
/// some tools unpack to `train-images.idx3-ubyte`, which is accepted too).
pub fn load_mnist(dir: &Path) -> Result<TrainTest, DataError> {
    require_dir(dir, "the four MNIST IDX files")?;
    let find = |base: &str| {
        let dotted = base.replace("-idx", ".idx");
        let names = [
            format!("{base}.gz"),
            base.to_string(),
            format!("{dotted}.gz"),
            dotted,
        ];
        find_first(dir, &names).ok_or_else(|| DataError::NotFound {
            path: dir.join(format!("{base}.gz")),
            what: format!("MNIST file {base}(.gz) is missing from this folder"),
        })
    };
    let paths: Vec<_> = MNIST_FILES
        .iter()
        .map(|b| find(b))
        .collect::<Result<_, _>>()?;
    let bytes: Vec<Vec<u8>> = paths
        .iter()
        .map(|p| read_maybe_gz(p))
        .collect::<Result<_, _>>()?;
    let train = split_from_idx(
        "mnist-train",
        (&bytes[0], &paths[0]),
        (&bytes[1], &paths[1]),
    )?;
    let test = split_from_idx("mnist-test", (&bytes[2], &paths[2]), (&bytes[3], &paths[3]))?;
    Ok(TrainTest { train, test })
}

/// Builds one split from gzip'd IDX bytes held in memory (the embedded subset uses this).
pub(crate) fn split_from_gz_bytes(
    name: &str,
    images: (&[u8], &Path),
    labels: (&[u8], &Path),
) -> Result<Dataset, DataError> {
    let img = gunzip(images.0, images.1)?;
    let lbl = gunzip(labels.0, labels.1)?;
    split_from_idx(name, (&img, images.1), (&lbl, labels.1))
}

fn split_from_idx(
    name: &str,
    images: (&[u8], &Path),
    labels: (&[u8], &Path),
) -> Result<Dataset, DataError> {
    let (n_img, rows, cols, pixels) = parse_idx_images(images.0, images.1)?;
    let label_bytes = parse_idx_labels(labels.0, labels.1)?;
    if label_bytes.len() != n_img {
        return Err(DataError::format(
            labels.1,
            format!(
                "{} labels but {} holds {} images; the files do not belong together",
                label_bytes.len(),
                images.1.display(),
                n_img
            ),
        ));
    }
    if rows != 28 || cols != 28 {
        return Err(DataError::format(
            images.1,
            format!("images are {rows}x{cols}, MNIST images are 28x28"),
        ));
    }
    let features: Vec<f32> = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Ok(Dataset {
        name: name.to_string(),
        shape: [1, rows, cols],
        features,
        labels: label_bytes.iter().map(|&l| u16::from(l)).collect(),
        class_names: mnist_class_names(),
    })
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses an IDX3 `u8` image file: returns (count, rows, cols, pixel bytes).
pub(crate) fn parse_idx_images<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<(usize, usize, usize, &'a [u8]), DataError> {
    if bytes.len() < 16 {
        return Err(DataError::format(
            path,
            format!(
                "IDX image file too short for its 16-byte header ({} bytes)",
                bytes.len()
            ),
        ));
    }
    let magic = be_u32(bytes, 0);
    if magic != IMAGES_MAGIC {
        return Err(DataError::format(
            path,
            format!(
                "wrong magic number 0x{magic:08x}, expected 0x{IMAGES_MAGIC:08x} (IDX3 u8 images)"
            ),
        ));
    }
    let n = be_u32(bytes, 4) as usize;
    let rows = be_u32(bytes, 8) as usize;
    let cols = be_u32(bytes, 12) as usize;
    let expected = n
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(cols))
        .ok_or_else(|| DataError::format(path, "header dimensions overflow"))?;
    let body = &bytes[16..];
    if body.len() != expected {
        return Err(DataError::format(
            path,
            format!(
                "header says {n} images of {rows}x{cols} = {expected} bytes but the file holds {} bytes of pixels ({})",
                body.len(),
                if body.len() < expected {
                    "truncated"
                } else {
                    "trailing garbage"
                }
            ),
        ));
    }
    Ok((n, rows, cols, body))
}

/// Parses an IDX1 `u8` label file, checking every label is a digit.
pub(crate) fn parse_idx_labels<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8], DataError> {
    if bytes.len() < 8 {
        return Err(DataError::format(
            path,
            format!(
                "IDX label file too short for its 8-byte header ({} bytes)",
                bytes.len()
            ),
        ));
    }
    let magic = be_u32(bytes, 0);
    if magic != LABELS_MAGIC {
        return Err(DataError::format(
            path,
            format!(
                "wrong magic number 0x{magic:08x}, expected 0x{LABELS_MAGIC:08x} (IDX1 u8 labels)"
            ),
        ));
    }
    let n = be_u32(bytes, 4) as usize;
    let body = &bytes[8..];
    if body.len() != n {
        return Err(DataError::format(
            path,
            format!(
                "header says {n} labels but the file holds {} ({})",
                body.len(),
                if body.len() < n {
                    "truncated"
                } else {
                    "trailing garbage"
                }
            ),
        ));
    }
    if let Some(i) = body.iter().position(|&l| l >= 10) {
        return Err(DataError::format(
            path,
            format!("label {} at index {i} is not a digit 0-9", body[i]),
        ));
    }
    Ok(body)
}
