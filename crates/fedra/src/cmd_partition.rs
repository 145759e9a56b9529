//! `fedra partition`: split a dataset's training set over clients with a scheme and show the
//! result to a person: the client x class table with sizes and EMD (printed), the same numbers
//! as JSON (`--json`, the `partition.json` format of a run), and a heat-map (`--plot`). The
//! partitioners and statistics live in `fedra-data`; this module parses arguments and writes.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fedra_data::partition::{Scheme, partition};
use fedra_data::stats::partition_stats;
use fedra_data::{DatasetName, LoadOptions, load};

use crate::plot;

/// Arguments of `fedra partition`.
#[derive(Args, Debug)]
pub struct PartitionArgs {
    /// Dataset: mnist, cifar10, speech-commands, a MedMNIST name or imagefolder (its training
    /// set is partitioned).
    #[arg(long)]
    dataset: DatasetName,
    #[command(flatten)]
    image: crate::cmd_data::ImageArgs,
    /// The dataset's folder, or a data folder holding it. Without it, MNIST is the embedded
    /// subset (10,000 training images) and the others are looked up in the per-user cache.
    #[arg(long, env = "FEDRA_DATA")]
    data_dir: Option<PathBuf>,
    /// Number of clients.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Partition scheme: iid, classes:K, shards:SIZE:PER_CLIENT, dirichlet:ALPHA[:MIN],
    /// lognormal:SIGMA, powerlaw:A, emd:TARGET[:M], matrix:FILE.csv|FILE.json.
    #[arg(long, default_value = "iid")]
    scheme: String,
    /// Seed of the partition (same seed, same partition).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the statistics as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the client x class heat-map to this file (.svg or .png).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// Run `fedra partition`.
pub fn run(args: PartitionArgs) -> anyhow::Result<()> {
    // Parse the scheme (and validate the output paths) before the possibly slow load.
    let scheme: Scheme = args.scheme.parse()?;
    if let Some(p) = &args.plot {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if !matches!(ext.as_deref(), Some("svg" | "png")) {
            anyhow::bail!(
                "--plot {}: the picture must end in .svg or .png",
                p.display()
            );
        }
        if args.clients > plot::MAX_HEATMAP_CLIENTS {
            anyhow::bail!(
                "--plot {}: a heat-map shows at most {} clients, --clients is {}",
                p.display(),
                plot::MAX_HEATMAP_CLIENTS,
                args.clients
            );
        }
    }
    let opts = LoadOptions {
        progress: true,
        image: args.image.options(),
        ..LoadOptions::default()
    };
    let data = load(args.dataset, args.data_dir.as_deref(), &opts)
        .with_context(|| format!("cannot load {}", args.dataset))?;
    let train = &data.train;
    let source = match &args.data_dir {
        Some(d) => d.display().to_string(),
        None if args.dataset == DatasetName::Mnist => "embedded subset".to_string(),
        None => "default data folder".to_string(),
    };
    let part = partition(
        &train.labels,
        train.num_classes(),
        args.clients,
        &scheme,
        args.seed,
    )?;
    let stats = partition_stats(&train.labels, &part);
    println!(
        "{} training set ({source}): {} examples, {} classes; {} clients, scheme {}, seed {}",
        args.dataset,
        train.len(),
        train.num_classes(),
        args.clients,
        part.scheme,
        args.seed
    );
    let used = part.total_len();
    if used != train.len() {
        println!(
            "{used} of the {} examples are assigned to clients",
            train.len()
        );
    }
    println!();
    print!("{}", stats.to_table(&train.class_names));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&stats)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        // A matrix scheme prints its whole matrix; keep the title to one line.
        let shown = if part.scheme.chars().count() > 48 {
            format!("{}...", part.scheme.chars().take(45).collect::<String>())
        } else {
            part.scheme.clone()
        };
        let title = format!(
            "{} {shown} over {} clients (seed {})",
            args.dataset, args.clients, args.seed
        );
        plot::partition_heatmap_file(path, &stats, &train.class_names, Some(&title))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PartitionArgs,
    }

    fn args(extra: &[&str]) -> PartitionArgs {
        let mut argv = vec!["fedra-partition"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    fn mnist_dir() -> String {
        let root = std::env::var("FEDRA_TEST_DATA").expect(
            "FEDRA_TEST_DATA is not set: point it at the shared datasets folder (e.g. ../shared/datasets)",
        );
        let root = PathBuf::from(root);
        let root = if root.is_relative() {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(root)
        } else {
            root
        };
        root.join("mnist").display().to_string()
    }

    #[test]
    fn writes_the_stats_json_and_the_heatmap() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("p.json");
        let png = dir.path().join("p.png");
        let data = mnist_dir();
        run(args(&[
            "--dataset",
            "mnist",
            "--data-dir",
            &data,
            "--clients",
            "10",
            "--scheme",
            "classes:1",
            "--seed",
            "5",
            "--json",
            json.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ]))
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "clients", "max_emd", "mean_emd", "min_emd", "scheme", "seed"
            ]
        );
        assert_eq!(v["scheme"], "classes:1");
        assert_eq!(v["seed"], 5);
        let clients = v["clients"].as_array().unwrap();
        assert_eq!(clients.len(), 10);
        let client_keys: Vec<&str> = clients[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(client_keys, ["class_counts", "emd", "id", "size"]);
        let total: u64 = clients.iter().map(|c| c["size"].as_u64().unwrap()).sum();
        assert_eq!(total, 60_000);
        assert!((v["mean_emd"].as_f64().unwrap() - 1.799424).abs() < 1e-6);
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn bad_arguments_fail_clearly_before_loading() {
        let err = run(args(&["--dataset", "mnist", "--scheme", "classes:zero"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"classes:zero\""), "{err}");
        let err = run(args(&["--dataset", "mnist", "--plot", "/tmp/x.jpg"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.jpg") && err.contains(".svg or .png"),
            "{err}"
        );
        let data = mnist_dir();
        let err = run(args(&[
            "--dataset",
            "mnist",
            "--data-dir",
            &data,
            "--clients",
            "0",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("got 0"), "{err}");
        let err = run(args(&[
            "--dataset",
            "mnist",
            "--data-dir",
            &data,
            "--clients",
            "60001",
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("60001 clients but only 60000 examples"),
            "{err}"
        );
    }
}
