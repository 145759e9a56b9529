//! MedMNIST v2 in its official `.npz` form: a zip of NumPy `.npy` arrays `train_images`,
//! `val_images`, `test_images` (`uint8`, `(N, H, W)` gray or `(N, H, W, 3)` RGB, channels last)
//! and `train_labels`, `val_labels`, `test_labels` (`uint8`, `(N, 1)`). The zip is read with the
//! `zip` crate and each array with `npyz`; nothing here parses either format by hand.
//!
//! The official train / validation / test splits are kept as published. [`crate::load`] returns
//! train and test (what a run trains and reports on); [`load_medmnist`] also returns the
//! validation split, which exists to pick a round or stop early and is never to be reported.
//!
//! Features are laid out channels first (`[C, H, W]`, RGB in that order) and scaled as MedMNIST's
//! own examples do: `(x / 255 - 0.5) / 0.5`, so every value lies in `[-1, 1]`.
//!
//! ChestMNIST is multi-label (14 findings per image, any number of them true): a single-label
//! classifier cannot learn it, so it is refused with an error saying so rather than read wrongly.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::dataset::{Dataset, TrainTest};
use crate::error::DataError;

/// The 2D MedMNIST v2 datasets, named as MedMNIST names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MedMnist {
    Path,
    Chest,
    Derma,
    Oct,
    Pneumonia,
    Retina,
    Breast,
    Blood,
    Tissue,
    OrganA,
    OrganC,
    OrganS,
}

/// What MedMNIST's `info.py` (v2.1.0) publishes for one dataset.
struct Info {
    /// The official file name, `<name>.npz`.
    file: &'static str,
    md5: &'static str,
    channels: usize,
    classes: &'static [&'static str],
    multi_label: bool,
}

const ORGANS: &[&str] = &[
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
];

impl MedMnist {
    /// All 2D datasets, in MedMNIST's order.
    pub const ALL: [MedMnist; 12] = [
        MedMnist::Path,
        MedMnist::Chest,
        MedMnist::Derma,
        MedMnist::Oct,
        MedMnist::Pneumonia,
        MedMnist::Retina,
        MedMnist::Breast,
        MedMnist::Blood,
        MedMnist::Tissue,
        MedMnist::OrganA,
        MedMnist::OrganC,
        MedMnist::OrganS,
    ];

    fn info(self) -> Info {
        let info = |file, md5, channels, classes, multi_label| Info {
            file,
            md5,
            channels,
            classes,
            multi_label,
        };
        match self {
            MedMnist::Path => info(
                "pathmnist.npz",
                "a8b06965200029087d5bd730944a56c1",
                3,
                &[
                    "adipose",
                    "background",
                    "debris",
                    "lymphocytes",
                    "mucus",
                    "smooth muscle",
                    "normal colon mucosa",
                    "cancer-associated stroma",
                    "colorectal adenocarcinoma epithelium",
                ],
                false,
            ),
            MedMnist::Chest => info(
                "chestmnist.npz",
                "02c8a6516a18b556561a56cbdd36c4a8",
                1,
                &[
                    "atelectasis",
                    "cardiomegaly",
                    "effusion",
                    "infiltration",
                    "mass",
                    "nodule",
                    "pneumonia",
                    "pneumothorax",
                    "consolidation",
                    "edema",
                    "emphysema",
                    "fibrosis",
                    "pleural",
                    "hernia",
                ],
                true,
            ),
            MedMnist::Derma => info(
                "dermamnist.npz",
                "0744692d530f8e62ec473284d019b0c7",
                3,
                &[
                    "actinic keratoses and intraepithelial carcinoma",
                    "basal cell carcinoma",
                    "benign keratosis-like lesions",
                    "dermatofibroma",
                    "melanoma",
                    "melanocytic nevi",
                    "vascular lesions",
                ],
                false,
            ),
            MedMnist::Oct => info(
                "octmnist.npz",
                "c68d92d5b585d8d81f7112f81e2d0842",
                1,
                &[
                    "choroidal neovascularization",
                    "diabetic macular edema",
                    "drusen",
                    "normal",
                ],
                false,
            ),
            MedMnist::Pneumonia => info(
                "pneumoniamnist.npz",
                "28209eda62fecd6e6a2d98b1501bb15f",
                1,
                &["normal", "pneumonia"],
                false,
            ),
            MedMnist::Retina => info(
                "retinamnist.npz",
                "bd4c0672f1bba3e3a89f0e4e876791e4",
                3,
                &["0", "1", "2", "3", "4"],
                false,
            ),
            MedMnist::Breast => info(
                "breastmnist.npz",
                "750601b1f35ba3300ea97c75c52ff8f6",
                1,
                &["malignant", "normal, benign"],
                false,
            ),
            MedMnist::Blood => info(
                "bloodmnist.npz",
                "7053d0359d879ad8a5505303e11de1dc",
                3,
                &[
                    "basophil",
                    "eosinophil",
                    "erythroblast",
                    "immature granulocytes",
                    "lymphocyte",
                    "monocyte",
                    "neutrophil",
                    "platelet",
                ],
                false,
            ),
            MedMnist::Tissue => info(
                "tissuemnist.npz",
                "ebe78ee8b05294063de985d821c1c34b",
                1,
                &[
                    "Collecting Duct, Connecting Tubule",
                    "Distal Convoluted Tubule",
                    "Glomerular endothelial cells",
                    "Interstitial endothelial cells",
                    "Leukocytes",
                    "Podocytes",
                    "Proximal Tubule Segments",
                    "Thick Ascending Limb",
                ],
                false,
            ),
            MedMnist::OrganA => info(
                "organamnist.npz",
                "866b832ed4eeba67bfb9edee1d5544e6",
                1,
                ORGANS,
                false,
            ),
            MedMnist::OrganC => info(
                "organcmnist.npz",
                "0afa5834fb105f7705a7d93372119a21",
                1,
                ORGANS,
                false,
            ),
            MedMnist::OrganS => info(
                "organsmnist.npz",
                "e5c39f1af030238290b9557d9503af9d",
                1,
                ORGANS,
                false,
            ),
        }
    }

    /// MedMNIST's own name, e.g. `pneumoniamnist`.
    pub fn as_str(self) -> &'static str {
        let file = self.info().file;
        &file[..file.len() - ".npz".len()]
    }

    /// The official file name, e.g. `pneumoniamnist.npz`.
    pub fn file_name(self) -> &'static str {
        self.info().file
    }

    /// The MD5 MedMNIST publishes for the official 28 x 28 file.
    pub fn md5(self) -> &'static str {
        self.info().md5
    }

    /// Channels of an image: 1 (gray) or 3 (RGB).
    pub fn channels(self) -> usize {
        self.info().channels
    }

    /// Class names in label order, as MedMNIST's `info.py` gives them.
    pub fn class_names(self) -> Vec<String> {
        self.info().classes.iter().map(|s| s.to_string()).collect()
    }

    /// True for ChestMNIST, whose labels are 14 independent yes/no findings.
    pub fn is_multi_label(self) -> bool {
        self.info().multi_label
    }
}

impl fmt::Display for MedMnist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MedMnist {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        MedMnist::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or(())
    }
}

/// The three official splits of a MedMNIST file.
#[derive(Clone, Debug, PartialEq)]
pub struct MedMnistSplits {
    pub train: Dataset,
    /// For choosing a round or stopping early; never for reporting.
    pub val: Dataset,
    pub test: Dataset,
}

impl MedMnistSplits {
    /// Train and test, the pair every run uses.
    pub fn train_test(self) -> TrainTest {
        TrainTest {
            train: self.train,
            test: self.test,
        }
    }
}

/// Finds `which`'s file: `path` itself when it is a file, else `path/<name>.npz`, else
/// `path/medmnist/<name>.npz` (where `fedra data download` puts it).
pub fn find_medmnist(path: &Path, which: MedMnist) -> Result<PathBuf, DataError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let file = which.file_name();
    for candidate in [path.join(file), path.join("medmnist").join(file)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::NotFound {
        path: path.join(file),
        what: format!(
            "expected the official {file} here or in {}/medmnist/ (fedra data download {which})",
            path.display()
        ),
    })
}

/// Loads the official train, validation and test splits of `which` from `path` (the `.npz` file
/// or a folder holding it, see [`find_medmnist`]).
pub fn load_medmnist(path: &Path, which: MedMnist) -> Result<MedMnistSplits, DataError> {
    if which.is_multi_label() {
        return Err(DataError::format(
            path,
            format!(
                "{which} is multi-label (each image has {} independent yes/no findings); fedra trains single-label classifiers and cannot use it",
                which.class_names().len()
            ),
        ));
    }
    let file = find_medmnist(path, which)?;
    let mut npz = Npz::open(&file)?;
    let mut split = |split: &str| -> Result<Dataset, DataError> {
        let images = npz.array(&format!("{split}_images"))?;
        let labels = npz.array(&format!("{split}_labels"))?;
        to_dataset(&file, which, split, images, labels)
    };
    let train = split("train")?;
    let val = split("val")?;
    let test = split("test")?;
    if train.shape != test.shape || val.shape != test.shape {
        return Err(DataError::format(
            &file,
            format!(
                "splits differ in image shape: train {:?}, val {:?}, test {:?}",
                train.shape, val.shape, test.shape
            ),
        ));
    }
    Ok(MedMnistSplits { train, val, test })
}

/// An opened `.npz` (a zip archive of `.npy` files).
struct Npz {
    path: PathBuf,
    zip: zip::ZipArchive<std::io::BufReader<std::fs::File>>,
}

/// One `uint8` array read from an `.npz`: its shape and its values in C order.
struct Array {
    key: String,
    shape: Vec<usize>,
    values: Vec<u8>,
}

impl Npz {
    fn open(path: &Path) -> Result<Npz, DataError> {
        let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| {
            DataError::format(
                path,
                format!("not a readable .npz (zip) archive, truncated or corrupt: {e}"),
            )
        })?;
        Ok(Npz {
            path: path.to_path_buf(),
            zip,
        })
    }

    /// Reads array `key` (member `key.npy`), which must hold `uint8` values in C order.
    fn array(&mut self, key: &str) -> Result<Array, DataError> {
        let member = format!("{key}.npy");
        let bad = |reason: String| DataError::format(&self.path, format!("array {key}: {reason}"));
        let mut entry = match self.zip.by_name(&member) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(bad(format!(
                    "missing (the archive has no {member}); is this an official MedMNIST file?"
                )));
            }
            Err(e) => return Err(bad(format!("cannot read {member}: {e}"))),
        };
        // The declared size sets the first allocation (capped); deflate's ratio (at most ~1,000:1)
        // bounds what a small damaged member can decompress to.
        let mut bytes = Vec::with_capacity(entry.size().min(1 << 28) as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("corrupt or truncated data in {member}: {e}")))?;
        // npyz multiplies the header's dimensions while parsing it; a damaged header with huge
        // dimensions overflows there (a panic where overflow checks are on), so the parse runs
        // under catch_unwind and the product is checked again below.
        let parsed = std::panic::catch_unwind(|| npyz::NpyFile::new(&bytes[..]))
            .map_err(|_| bad("damaged .npy header (its shape overflows)".into()))?;
        let npy = parsed.map_err(|e| bad(format!("not a valid .npy array: {e}")))?;
        let dtype = npy.dtype();
        let is_u8 = matches!(&dtype, npyz::DType::Plain(t) if t.to_string() == "|u1");
        if !is_u8 {
            return Err(bad(format!(
                "expected uint8 values (|u1), found {}",
                dtype.descr()
            )));
        }
        if npy.order() != npyz::Order::C {
            return Err(bad(
                "stored in Fortran order; expected C order as numpy.savez writes".into(),
            ));
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let expected = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "shape {shape:?} needs more values than the {} bytes stored",
                    bytes.len()
                ))
            })?;
        let values = npy
            .into_vec::<u8>()
            .map_err(|e| bad(format!("truncated or unreadable values: {e}")))?;
        if values.len() != expected {
            return Err(bad(format!("{} values for shape {shape:?}", values.len())));
        }
        Ok(Array {
            key: key.to_string(),
            shape,
            values,
        })
    }
}

/// Builds one split: images `(N, H, W)` or `(N, H, W, 3)` become `[C, H, W]` rows scaled to
/// `[-1, 1]`; labels `(N,)` or `(N, 1)` must be below the class count.
fn to_dataset(
    path: &Path,
    which: MedMnist,
    split: &str,
    images: Array,
    labels: Array,
) -> Result<Dataset, DataError> {
    let bad = |key: &str, reason: String| DataError::format(path, format!("array {key}: {reason}"));
    let (n, h, w, c) = match images.shape[..] {
        [n, h, w] => (n, h, w, 1),
        [n, h, w, c] => (n, h, w, c),
        _ => {
            return Err(bad(
                &images.key,
                format!(
                    "shape {:?}, expected (N, H, W) or (N, H, W, 3)",
                    images.shape
                ),
            ));
        }
    };
    if h == 0 || w == 0 {
        return Err(bad(
            &images.key,
            format!("shape {:?}: images of height or width 0", images.shape),
        ));
    }
    if c != which.channels() {
        return Err(bad(
            &images.key,
            format!(
                "shape {:?}: {which} images have {} channel(s)",
                images.shape,
                which.channels()
            ),
        ));
    }
    let label_count = match labels.shape[..] {
        [m] | [m, 1] => m,
        _ => {
            return Err(bad(
                &labels.key,
                format!("shape {:?}, expected (N, 1)", labels.shape),
            ));
        }
    };
    if label_count != n {
        return Err(bad(
            &labels.key,
            format!("{label_count} labels for {n} images in {}", images.key),
        ));
    }
    let classes = which.class_names();
    if let Some((i, &l)) = labels
        .values
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= classes.len())
    {
        return Err(bad(
            &labels.key,
            format!(
                "label {l} at row {i} is out of range: {which} has {} classes",
                classes.len()
            ),
        ));
    }
    let table: [f32; 256] = std::array::from_fn(|v| (v as f32 / 255.0 - 0.5) / 0.5);
    let plane = h * w;
    let mut features = Vec::with_capacity(n * c * plane);
    for image in images.values.chunks_exact(c * plane) {
        // Channels last in the file, channels first in fedra.
        for ch in 0..c {
            features.extend(
                image[ch..]
                    .iter()
                    .step_by(c)
                    .map(|&v| table[usize::from(v)]),
            );
        }
    }
    Ok(Dataset {
        name: format!("{which}-{split}"),
        shape: [c, h, w],
        features,
        labels: labels.values.iter().map(|&l| u16::from(l)).collect(),
        class_names: classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_chest_is_multi_label() {
        for m in MedMnist::ALL {
            assert_eq!(m.as_str().parse::<MedMnist>(), Ok(m));
            assert!(m.as_str().ends_with("mnist"));
            assert_eq!(m.md5().len(), 32);
        }
        assert!(MedMnist::Chest.is_multi_label());
        assert_eq!(
            MedMnist::ALL.iter().filter(|m| m.is_multi_label()).count(),
            1
        );
        assert_eq!(MedMnist::Retina.channels(), 3);
        assert_eq!(MedMnist::Pneumonia.class_names(), ["normal", "pneumonia"]);
    }
}
