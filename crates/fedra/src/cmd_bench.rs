//! `fedra bench train`: training throughput of fedra's engine (samples/s, GFLOP/s) per model and
//! batch size, one client on one thread and two clients in parallel (one thread and one trainer
//! each), with the single-thread sgemm peak measured on this machine and the workspace memory per
//! client. Measured on synthetic inputs; each figure is the best of `--repeats` runs because other
//! work on the machine makes single timings noisy.

use clap::{Args, Subcommand};
use fedra_nn::{BenchEffort, ModelSpec, bench_train, gemm_gflops};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Local-training throughput of the built-in models.
    Train(TrainArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Models to measure (repeatable); default mnist-cnn and cifar-cnn.
    #[arg(long)]
    model: Vec<String>,
    /// Batch sizes (repeatable); default 10 and 100.
    #[arg(long)]
    batch: Vec<usize>,
    /// Parallel client counts (repeatable); default 1 and 2.
    #[arg(long)]
    clients: Vec<usize>,
    /// Repeats per configuration; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Training examples per client per timed repeat.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// The input shape each model is measured on: its dataset's, and for resnet18 64x64 images (as in
/// its PyTorch fixture and `bench/torch_train.py`).
fn input_of(model: &str) -> [usize; 3] {
    if model == "resnet18" {
        [3, 64, 64]
    } else if model.starts_with("cifar") || model.starts_with("resnet") {
        [3, 32, 32]
    } else if model.starts_with("kws") {
        [1, 49, 10]
    } else {
        [1, 28, 28]
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchWhat::Train(a) = args.what;
    let models = if a.model.is_empty() {
        vec!["mnist-cnn".to_string(), "cifar-cnn".to_string()]
    } else {
        a.model.clone()
    };
    let batches = if a.batch.is_empty() {
        vec![10, 100]
    } else {
        a.batch.clone()
    };
    let clients = if a.clients.is_empty() {
        vec![1, 2]
    } else {
        a.clients.clone()
    };
    if batches.contains(&0) || clients.contains(&0) {
        anyhow::bail!("--batch and --clients must be >= 1");
    }
    let effort = BenchEffort {
        warmup_steps: 3,
        min_samples: a.samples.max(1),
        repeats: a.repeats.max(1),
    };
    let specs = models
        .iter()
        .map(|name| ModelSpec::by_name(name, input_of(name), 10))
        .collect::<Result<Vec<_>, _>>()?;
    if !a.json {
        let square = gemm_gflops(512, 512, 512, a.repeats.max(1));
        let conv2 = gemm_gflops(64, 196, 800, a.repeats.max(1));
        println!(
            "sgemm peak, one thread: {square:.1} GFLOP/s (512x512x512), {conv2:.1} GFLOP/s \
             (64x196x800, mnist-cnn conv2 per example)"
        );
        println!(
            "{:<14} {:>6} {:>8} {:>8} {:>12} {:>9} {:>16}",
            "model", "batch", "threads", "clients", "samples/s", "GFLOP/s", "workspace/client"
        );
    }
    for spec in &specs {
        for &batch in &batches {
            for &c in &clients {
                let row = bench_train(spec, batch, c, effort)?;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "model": row.model,
                            "batch": row.batch,
                            "threads": row.threads,
                            "clients": row.clients,
                            "samples_per_s": row.samples_per_s,
                            "gflops": row.gflops,
                        })
                    );
                } else {
                    println!(
                        "{:<14} {:>6} {:>8} {:>8} {:>12.0} {:>9.1} {:>13.1} MB",
                        row.model,
                        row.batch,
                        row.threads,
                        row.clients,
                        row.samples_per_s,
                        row.gflops,
                        row.workspace_bytes as f64 / 1e6
                    );
                }
            }
        }
    }
    Ok(())
}
