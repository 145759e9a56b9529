//! Datasets for fedra: loaders for the real distribution formats of the study's three datasets
//! (MNIST IDX, CIFAR-10 binary, Speech Commands WAV turned into MFCC features), of MedMNIST's
//! official `.npz` files and of plain image folders; the partitioners that split a training set
//! over clients, and the label statistics (EMD) that describe a split.
//!
//! Everything here is plain data: this crate knows nothing of models, training or federation.

pub mod cifar;
pub mod dataset;
pub mod download;
pub mod embedded;
pub mod error;
mod files;
pub mod imagefolder;
pub mod medmnist;
pub mod mfcc;
pub mod mnist;
pub mod partition;
pub mod speech;
pub mod stats;
pub mod wav;

use std::path::{Path, PathBuf};

pub use cifar::load_cifar10;
pub use dataset::{Dataset, DatasetName, TrainTest, UnknownDatasetName};
pub use download::download;
pub use embedded::embedded_mnist;
pub use error::DataError;
pub use imagefolder::{ImageFolderOptions, load_image_folder};
pub use medmnist::{MedMnist, MedMnistSplits, load_medmnist};
pub use mnist::load_mnist;
pub use partition::{Partition, PartitionError, Scheme, partition};
pub use speech::{FeatureCache, SpeechOptions, SplitRule, load_speech_commands};
pub use stats::{PartitionStats, partition_stats};

/// Environment variable overriding [`default_data_dir`].
pub const DATA_DIR_ENV: &str = "FEDRA_DATA";

/// Options of [`load`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Speech Commands options (ignored for the other datasets).
    pub speech: SpeechOptions,
    /// Image-folder options (ignored for the other datasets).
    pub image: ImageFolderOptions,
    /// Draw progress bars (only ever drawn when stdout is a terminal).
    pub progress: bool,
}

/// Where datasets live when no folder is given: `$FEDRA_DATA`, else a per-user cache folder
/// (`~/.cache/fedra` on Linux), else `./fedra-data` if the system has no home folder.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    directories::ProjectDirs::from("", "", "fedra")
        .map(|d| d.cache_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("fedra-data"))
}

/// Loads a dataset. `data_dir` may be the dataset's own folder (or, for CIFAR-10, its archive)
/// or a data folder holding it in the sub-folder [`download::download`] uses (`mnist/`,
/// `cifar10/`, `speech-commands/`, `medmnist/`); for a MedMNIST set it may also be the `.npz`
/// file, and for `imagefolder` it is the folder of class folders. With `data_dir` `None`, MNIST is the embedded subset
/// ([`embedded_mnist`]) and the others are looked up under [`default_data_dir`].
pub fn load(
    name: DatasetName,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
) -> Result<TrainTest, DataError> {
    let dir = match data_dir {
        Some(d) => d.to_path_buf(),
        None if name == DatasetName::Mnist => return embedded_mnist(),
        None if name == DatasetName::ImageFolder => {
            return Err(DataError::Options {
                path: PathBuf::from("imagefolder"),
                reason: "an image folder needs its path (data.data_dir or --data-dir)".into(),
            });
        }
        None => default_data_dir(),
    };
    let sub = dir.join(download::dataset_subdir(name));
    match name {
        DatasetName::Mnist => {
            let own = mnist::MNIST_FILES
                .iter()
                .any(|f| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file());
            load_mnist(if !own && sub.is_dir() { &sub } else { &dir })
        }
        DatasetName::Cifar10 => {
            let r = cifar::load_cifar10_with_progress(&dir, opts.progress);
            match r {
                Err(DataError::NotFound { .. }) if sub.exists() => {
                    cifar::load_cifar10_with_progress(&sub, opts.progress)
                }
                other => other,
            }
        }
        DatasetName::SpeechCommands => {
            let downloaded = sub.join(download::SPEECH_FOLDER);
            let folder = if opts.speech.keywords.iter().any(|k| dir.join(k).is_dir()) {
                dir
            } else if downloaded.is_dir() {
                downloaded
            } else {
                dir
            };
            speech::load_speech_commands_with_progress(&folder, &opts.speech, opts.progress)
        }
        DatasetName::MedMnist(which) => load_medmnist(&dir, which).map(MedMnistSplits::train_test),
        DatasetName::ImageFolder => load_image_folder(&dir, &opts.image),
    }
}

/// The shape of a dataset's examples and its class names, as a [`TrainTest`] of no examples,
/// without reading any file: what a federation server needs to build the model when its
/// clients hold all the data. An image folder's come from its options (`size`, `channels` and
/// `classes`, all required); a MedMNIST set's are those of its official 28 x 28 file; Speech
/// Commands' from its keywords and the unknown/silence options.
pub fn describe(name: DatasetName, opts: &LoadOptions) -> Result<TrainTest, DataError> {
    let (shape, class_names) = match name {
        DatasetName::Mnist => ([1, 28, 28], mnist::mnist_class_names()),
        DatasetName::Cifar10 => ([3, 32, 32], cifar::cifar10_class_names()),
        DatasetName::SpeechCommands => {
            let names = speech::class_names(&opts.speech);
            let mut sorted = opts.speech.keywords.clone();
            sorted.sort();
            sorted.dedup();
            if opts.speech.keywords.is_empty() || sorted.len() != opts.speech.keywords.len() {
                return Err(DataError::Options {
                    path: PathBuf::from("speech-commands"),
                    reason: "the keywords must be given, each once".into(),
                });
            }
            ([1, mfcc::MFCC_FRAMES_PER_SECOND, mfcc::MFCC_COEFFS], names)
        }
        DatasetName::MedMnist(which) if which.is_multi_label() => {
            return Err(DataError::Options {
                path: PathBuf::from(which.file_name()),
                reason: format!("{which} is multi-label; fedra trains single-label classifiers"),
            });
        }
        DatasetName::MedMnist(which) => ([which.channels(), 28, 28], which.class_names()),
        DatasetName::ImageFolder => {
            let image = &opts.image;
            match (image.size, image.channels, &image.classes) {
                (Some([h, w]), Some(c), Some(classes)) => ([c, h, w], classes.clone()),
                _ => {
                    return Err(DataError::Options {
                        path: PathBuf::from("imagefolder"),
                        reason: "without the images, their size, channels and classes must be \
                                 given (data.image_size, data.channels, data.classes)"
                            .into(),
                    });
                }
            }
        }
    };
    let empty = |split: &str| Dataset {
        name: format!("{name}-{split}"),
        shape,
        features: Vec::new(),
        labels: Vec::new(),
        class_names: class_names.clone(),
    };
    Ok(TrainTest {
        train: empty("train"),
        test: empty("test"),
    })
}
