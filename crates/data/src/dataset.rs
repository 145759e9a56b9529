//! The one in-memory representation shared by every dataset: dense `f32` features, one row
//! per example laid out as `[C, H, W]`, a `u16` label per row and the class names in label order.
//! Loaders produce it already normalised the way the study's models expect, so downstream crates
//! never need to know which file format a dataset came from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::DataError;
use crate::medmnist::MedMnist;

/// A dataset in memory: dense f32 features, one row per example, shape `[C, H, W]` per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Human-readable name, e.g. `"mnist-train"`.
    pub name: String,
    /// Shape of one example, channels first.
    pub shape: [usize; 3],
    /// `len() * example_len()` values, example after example.
    pub features: Vec<f32>,
    /// One label per example, each `< class_names.len()`.
    pub labels: Vec<u16>,
    /// Class names in label order.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the dataset holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of values in one example: `C * H * W`.
    pub fn example_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The features of example `i`.
    ///
    /// # Panics
    /// If `i >= self.len()` (a caller bug, not a data problem).
    pub fn example(&self, i: usize) -> &[f32] {
        let n = self.example_len();
        &self.features[i * n..(i + 1) * n]
    }

    /// Number of classes (the length of `class_names`, whether or not every class occurs).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// How many examples carry each label, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.num_classes()];
        for &label in &self.labels {
            counts[label as usize] += 1;
        }
        counts
    }

    /// A new dataset holding copies of the rows `indices`, in that order (repeats allowed).
    ///
    /// # Panics
    /// If an index is out of range (a caller bug, not a data problem).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.example_len();
        let mut features = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.example(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            features,
            labels,
            class_names: self.class_names.clone(),
        }
    }

    /// Checks the invariants every loader promises: sizes agree, labels are in range, and all
    /// features are finite. `source` names the file or folder the data came from.
    pub fn validate(&self, source: &std::path::Path) -> Result<(), DataError> {
        let err = |reason: String| DataError::format(source, reason);
        if self.features.len() != self.len() * self.example_len() {
            return Err(err(format!(
                "{} feature values for {} examples of shape {:?}",
                self.features.len(),
                self.len(),
                self.shape
            )));
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= self.num_classes())
        {
            return Err(err(format!(
                "example {i} has label {l} but there are only {} classes",
                self.num_classes()
            )));
        }
        if let Some(i) = self.features.iter().position(|x| !x.is_finite()) {
            return Err(err(format!(
                "example {} has a non-finite feature value",
                i / self.example_len().max(1)
            )));
        }
        Ok(())
    }
}

/// A train split and a test split of one dataset, sharing shape and class names.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainTest {
    pub train: Dataset,
    pub test: Dataset,
}

/// A dataset fedra can load: the reference study's three, the 2D MedMNIST v2 sets, and a
/// folder of images sorted into one sub-folder per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetName {
    Mnist,
    Cifar10,
    SpeechCommands,
    /// One of MedMNIST's 2D datasets (official `.npz` files).
    MedMnist(MedMnist),
    /// `ROOT/<class>/*.png|jpg|jpeg|bmp` (see [`crate::imagefolder`]).
    ImageFolder,
}

impl DatasetName {
    /// The reference study's datasets, in its order.
    pub const STUDY: [DatasetName; 3] = [
        DatasetName::Mnist,
        DatasetName::Cifar10,
        DatasetName::SpeechCommands,
    ];

    /// Every name fedra accepts.
    pub fn all() -> impl Iterator<Item = DatasetName> {
        DatasetName::STUDY
            .into_iter()
            .chain(MedMnist::ALL.into_iter().map(DatasetName::MedMnist))
            .chain(std::iter::once(DatasetName::ImageFolder))
    }

    /// The spelling used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Mnist => "mnist",
            DatasetName::Cifar10 => "cifar10",
            DatasetName::SpeechCommands => "speech-commands",
            DatasetName::MedMnist(m) => m.as_str(),
            DatasetName::ImageFolder => "imagefolder",
        }
    }
}

impl fmt::Display for DatasetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an unknown dataset name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown dataset {0:?}: expected mnist, cifar10, speech-commands, imagefolder or a MedMNIST name (pneumoniamnist, breastmnist, retinamnist, dermamnist, bloodmnist, pathmnist, octmnist, tissuemnist, organamnist, organcmnist, organsmnist)"
)]
pub struct UnknownDatasetName(pub String);

impl FromStr for DatasetName {
    type Err = UnknownDatasetName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetName::all()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| UnknownDatasetName(s.to_string()))
    }
}

impl serde::Serialize for DatasetName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for DatasetName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A placeholder path for data that does not come from a file (the embedded subset).
pub(crate) fn embedded_path(name: &str) -> PathBuf {
    PathBuf::from(format!("<embedded>/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            name: "tiny".into(),
            shape: [1, 1, 2],
            features: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            labels: vec![1, 0, 1],
            class_names: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn dataset_name_round_trips_through_text_and_serde() {
        for name in DatasetName::all() {
            assert_eq!(name.to_string().parse::<DatasetName>().unwrap(), name);
            let json = serde_json::to_string(&name).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<DatasetName>(&json).unwrap(), name);
        }
        let err = "cifar100".parse::<DatasetName>().unwrap_err();
        assert!(err.to_string().contains("cifar100"), "{err}");
    }

    #[test]
    fn counts_examples_and_subsets() {
        let d = tiny();
        assert_eq!((d.len(), d.example_len(), d.num_classes()), (3, 2, 2));
        assert_eq!(d.class_counts(), vec![1, 2]);
        assert_eq!(d.example(2), &[4.0, 5.0]);
        let s = d.subset(&[2, 0]);
        assert_eq!(s.features, vec![4.0, 5.0, 0.0, 1.0]);
        assert_eq!(s.labels, vec![1, 1]);
        assert!(d.subset(&[]).is_empty());
    }

    #[test]
    fn validate_rejects_bad_label_size_and_nan() {
        let src = std::path::Path::new("some/file");
        assert!(tiny().validate(src).is_ok());
        let mut d = tiny();
        d.labels[2] = 2;
        let e = d.validate(src).unwrap_err().to_string();
        assert!(
            e.contains("some/file") && e.contains("example 2 has label 2"),
            "{e}"
        );
        let mut d = tiny();
        d.features.pop();
        assert!(d.validate(src).is_err());
        let mut d = tiny();
        d.features[3] = f32::NAN;
        let e = d.validate(src).unwrap_err().to_string();
        assert!(e.contains("example 1"), "{e}");
    }
}
