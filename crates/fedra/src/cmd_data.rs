//! `fedra data`: look at a dataset (`info`: sizes, shape, per-class counts of train and test) and
//! fetch the official archives (`download`). Loading and downloading live in `fedra-data`; this
//! module only parses arguments and prints.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedra_data::{
    Dataset, DatasetName, FeatureCache, LoadOptions, SpeechOptions, SplitRule, TrainTest,
};

/// Arguments of `fedra data`.
#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// The `fedra data` subcommands.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Load a dataset and print its sizes, example shape and per-class counts of train and test.
    Info {
        /// Dataset: mnist, cifar10, speech-commands, a MedMNIST name (pneumoniamnist, ...) or
        /// imagefolder.
        name: DatasetName,
        /// The dataset's folder (CIFAR-10: also its .tar.gz archive; MedMNIST: also its .npz), or
        /// a data folder holding it where `fedra data download` puts it. Without it, MNIST is the embedded subset (first
        /// 10,000 train / 2,000 test images) and the others are looked up in the per-user cache.
        #[arg(long, env = "FEDRA_DATA")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        speech: SpeechArgs,
        #[command(flatten)]
        image: ImageArgs,
    },
    /// Download the official archives (SHA-256-, MD5- or gzip-verified, atomic, cached).
    Download {
        /// Dataset: mnist, cifar10, speech-commands or a MedMNIST name (pneumoniamnist, ...).
        name: DatasetName,
        /// Data folder to download into (a sub-folder named after the dataset is used);
        /// default: the per-user cache folder.
        #[arg(long, env = "FEDRA_DATA")]
        data_dir: Option<PathBuf>,
        /// Base URL of a mirror serving the same file names (default: the official hosts).
        #[arg(long, env = "FEDRA_MIRROR")]
        mirror: Option<String>,
    },
}

/// Speech Commands options of `fedra data info`.
#[derive(Args, Debug)]
pub struct SpeechArgs {
    /// Speech Commands: comma-separated keywords (default: the study's 10 words).
    #[arg(long, value_delimiter = ',')]
    keywords: Option<Vec<String>>,
    /// Speech Commands: add an `_unknown_` class made of every other word.
    #[arg(long)]
    unknown: bool,
    /// Speech Commands: add a `_silence_` class made of background-noise slices.
    #[arg(long)]
    silence: bool,
    /// Speech Commands: leave the validation split out instead of adding it to train.
    #[arg(long)]
    no_validation_in_train: bool,
    /// Speech Commands: how clips are split into train and test: `auto` (the official split;
    /// by speaker when that leaves no training clip, as for the official test archive),
    /// `official`, or `speakers` (20% of clips to test, no speaker on both sides).
    #[arg(long, value_enum, default_value_t = SplitArg::Auto)]
    split: SplitArg,
    /// Speech Commands: do not read or write the MFCC cache.
    #[arg(long)]
    no_cache: bool,
}

/// `--split` of Speech Commands.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SplitArg {
    Auto,
    Official,
    Speakers,
}

/// Image-folder options of `fedra data info`.
#[derive(Args, Debug)]
pub(crate) struct ImageArgs {
    /// imagefolder: resize every image to H,W (default: all images must share one size).
    #[arg(long, value_name = "H,W", value_parser = parse_size)]
    image_size: Option<[usize; 2]>,
    /// imagefolder: 1 (gray) or 3 (RGB); default 1 when every image is gray.
    #[arg(long)]
    channels: Option<usize>,
    /// imagefolder: skip (and count) images that cannot be decoded.
    #[arg(long)]
    skip_unreadable: bool,
    /// imagefolder: the class names in label order (default: the sorted class folders).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
}

/// `H,W` (or `HxW`) as two positive numbers.
fn parse_size(text: &str) -> Result<[usize; 2], String> {
    let parts: Vec<&str> = text.split([',', 'x']).map(str::trim).collect();
    match parts[..] {
        [h, w] => match (h.parse::<usize>(), w.parse::<usize>()) {
            (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok([h, w]),
            _ => Err(format!(
                "{text:?}: expected two positive numbers H,W such as 28,28"
            )),
        },
        _ => Err(format!("{text:?}: expected H,W such as 28,28")),
    }
}

impl ImageArgs {
    pub(crate) fn options(&self) -> fedra_data::ImageFolderOptions {
        fedra_data::ImageFolderOptions {
            size: self.image_size,
            channels: self.channels,
            skip_unreadable: self.skip_unreadable,
            classes: self.classes.clone(),
        }
    }
}

impl SpeechArgs {
    fn options(&self) -> SpeechOptions {
        let defaults = SpeechOptions::default();
        SpeechOptions {
            keywords: self.keywords.clone().unwrap_or(defaults.keywords),
            unknown: self.unknown,
            silence: self.silence,
            validation_into_train: !self.no_validation_in_train,
            split: match self.split {
                SplitArg::Auto => SplitRule::Auto,
                SplitArg::Official => SplitRule::Official,
                SplitArg::Speakers => SplitRule::Speakers,
            },
            cache: if self.no_cache {
                FeatureCache::Disabled
            } else {
                FeatureCache::Default
            },
        }
    }
}

/// Runs `fedra data ...`.
pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Info {
            name,
            data_dir,
            speech,
            image,
        } => {
            let opts = LoadOptions {
                speech: speech.options(),
                image: image.options(),
                progress: true,
            };
            let start = Instant::now();
            // MedMNIST's validation split is shown too (it is never trained or reported on).
            let (data, val) = match name {
                DatasetName::MedMnist(which) => {
                    let dir = data_dir
                        .clone()
                        .unwrap_or_else(fedra_data::default_data_dir);
                    let fedra_data::MedMnistSplits { train, val, test } =
                        fedra_data::load_medmnist(&dir, which)
                            .with_context(|| format!("cannot load {name}"))?;
                    (TrainTest { train, test }, Some(val))
                }
                _ => (
                    fedra_data::load(name, data_dir.as_deref(), &opts)
                        .with_context(|| format!("cannot load {name}"))?,
                    None,
                ),
            };
            let source = match &data_dir {
                Some(d) => d.display().to_string(),
                None if name == DatasetName::Mnist => {
                    "embedded subset (first 10,000 train / 2,000 test of the official files)"
                        .to_string()
                }
                None => fedra_data::default_data_dir().display().to_string(),
            };
            let text = format!(
                "{}loaded in {:.2} s\n",
                info_table(name, &source, &data, val.as_ref()),
                start.elapsed().as_secs_f64()
            );
            print_stdout(&text)
        }
        DataCommand::Download {
            name,
            data_dir,
            mirror,
        } => {
            let dir = data_dir.unwrap_or_else(fedra_data::default_data_dir);
            let path = fedra_data::download(name, &dir, mirror.as_deref(), true)
                .with_context(|| format!("cannot download {name}"))?;
            print_stdout(&format!(
                "{name}: ready at {}\nload it with: fedra data info {name} --data-dir {}\n",
                path.display(),
                path.display()
            ))
        }
    }
}

/// Writes `text` to stdout; a closed pipe (`fedra data info ... | head`) is not an error.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// The text `fedra data info` prints; `val` is a validation split shown beside train and test.
fn info_table(name: DatasetName, source: &str, data: &TrainTest, val: Option<&Dataset>) -> String {
    use std::fmt::Write;
    let TrainTest { train, test } = data;
    let mut out = String::new();
    let shape = train.shape;
    let _ = writeln!(out, "dataset  {name}");
    let _ = writeln!(out, "source   {source}");
    let _ = writeln!(
        out,
        "shape    {} x {} x {} (C x H x W) = {} values per example",
        shape[0],
        shape[1],
        shape[2],
        train.example_len()
    );
    let _ = writeln!(out, "train    {} examples", train.len());
    if let Some(val) = val {
        let _ = writeln!(
            out,
            "val      {} examples (for choosing a round; never reported)",
            val.len()
        );
    }
    let _ = writeln!(out, "test     {} examples", test.len());
    let _ = writeln!(out, "classes  {}", train.num_classes());
    let _ = writeln!(out);
    let width = train
        .class_names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(5)
        .max(5);
    let mut sets = vec![("train", train)];
    sets.extend(val.map(|v| ("val", v)));
    sets.push(("test", test));
    let mut header = format!("{:>5}  {:<width$}", "label", "class");
    for (title, _) in &sets {
        let _ = write!(header, "  {title:>8}");
    }
    let _ = writeln!(out, "{header}  {:>8}", "total");
    let counts: Vec<Vec<usize>> = sets.iter().map(|(_, d)| d.class_counts()).collect();
    let mut row = |label: &str, class: &str, values: Vec<usize>| {
        let mut line = format!("{label:>5}  {class:<width$}");
        for v in &values {
            let _ = write!(line, "  {v:>8}");
        }
        let _ = writeln!(out, "{line}  {:>8}", values.iter().sum::<usize>());
    };
    for (i, class) in train.class_names.iter().enumerate() {
        row(&i.to_string(), class, counts.iter().map(|c| c[i]).collect());
    }
    row("", "all", sets.iter().map(|(_, d)| d.len()).collect());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(labels: Vec<u16>) -> Dataset {
        Dataset {
            name: "t".into(),
            shape: [1, 1, 2],
            features: vec![0.0; labels.len() * 2],
            labels,
            class_names: vec!["cat".into(), "airplane".into()],
        }
    }

    #[test]
    fn info_table_lists_every_class_with_totals() {
        let data = TrainTest {
            train: tiny(vec![0, 1, 1]),
            test: tiny(vec![1]),
        };
        let text = info_table(DatasetName::Cifar10, "here", &data, None);
        assert!(text.contains("train    3 examples"), "{text}");
        assert!(
            text.contains("    0  cat              1         0         1"),
            "{text}"
        );
        assert!(
            text.contains("    1  airplane         2         1         3"),
            "{text}"
        );
        assert!(
            text.contains("       all              3         1         4"),
            "{text}"
        );
    }
}
