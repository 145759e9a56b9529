//! `fedra run`: run experiments from TOML files into run folders, or resume one.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use fedra_data::{LoadOptions, TrainTest, load};
use fedra_fl::sweep::expand;
use fedra_fl::{ExperimentConfig, RoundMetrics};
use fedra_sim::{Run, RunFolder, Summary, clear_run_files};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Experiment files (TOML). With several files, or a file with a [sweep] grid, each run goes
    /// into a sub-folder of --out named after the file (and grid cell), finished runs are
    /// skipped, interrupted ones resume, and a comparison table is printed at the end.
    #[arg(required_unless_present = "resume")]
    configs: Vec<PathBuf>,
    /// Dataset folder; overrides the experiment's `data.data_dir`. Without any, MNIST uses the
    /// subset embedded in fedra.
    #[arg(long, env = "FEDRA_DATA")]
    data_dir: Option<PathBuf>,
    /// Run folder (default: runs/<experiment name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override `train.rounds`.
    #[arg(long)]
    rounds: Option<usize>,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Override `run.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Apply the `[profile.NAME]` overrides of the experiment files (e.g. `short`).
    #[arg(long)]
    profile: Option<String>,
    /// Run only the grid cells whose name contains every one of these texts (e.g.
    /// `--only batch_size-100 --only classes-1`); the others are left for a later call.
    #[arg(long)]
    only: Vec<String>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, conflicts_with = "configs")]
    resume: Option<PathBuf>,
}

fn threads(args: &RunArgs) -> usize {
    args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

pub(crate) fn load_data(config: &ExperimentConfig) -> anyhow::Result<TrainTest> {
    let opts = LoadOptions {
        progress: std::io::stderr().is_terminal(),
        ..config.data.load_options()
    };
    load(config.data.dataset, config.data.data_dir.as_deref(), &opts)
        .with_context(|| format!("loading {}", config.data.dataset))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into())
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let threads = threads(&args);
    if let Some(dir) = &args.resume {
        let config = ExperimentConfig::from_file(&dir.join("config.toml"))?;
        let data = load_data(&config)?;
        let run = Run::resume(dir, data, threads)?;
        eprintln!(
            "resuming {} after round {}",
            dir.display(),
            run.federation.rounds_done
        );
        let summary = drive(run)?;
        print_summary(&dir.display().to_string(), &summary);
        return Ok(());
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let mut cells = Vec::new();
    for path in &args.configs {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment {}", path.display()))?;
        for cell in expand(&text, &path.display().to_string(), args.profile.as_deref())? {
            cells.push((path.clone(), cell));
        }
    }
    if !args.only.is_empty() {
        let before = cells.len();
        cells.retain(|(path, cell)| {
            let name = run_name(path, &cell.name);
            args.only.iter().all(|part| name.contains(part.as_str()))
        });
        if cells.is_empty() {
            bail!("--only {:?} matches none of the {before} runs", args.only);
        }
    }
    let single = cells.len() == 1 && args.only.is_empty();
    // Two cells writing one folder would make the second "already finished": refuse up front.
    let mut seen = std::collections::HashMap::new();
    for (path, cell) in &cells {
        let name = run_name(path, &cell.name);
        if let Some(other) = seen.insert(name.clone(), path.clone()) {
            bail!(
                "{} and {} both name a run {name}; give the files different names",
                other.display(),
                path.display()
            );
        }
    }
    let mut done: Vec<(String, Summary)> = Vec::new();
    for (path, cell) in cells {
        let mut config = cell.config;
        if let Some(rounds) = args.rounds {
            config.train.rounds = rounds;
        }
        if let Some(seed) = args.seed {
            config.run.seed = seed;
        }
        if args.data_dir.is_some() {
            config.data.data_dir = args.data_dir.clone();
        }
        config.validate(&path.display().to_string())?;
        let name = run_name(&path, &cell.name);
        let dir = match (&args.out, single) {
            (Some(out), true) => out.clone(),
            (Some(out), false) => out.join(&name),
            (None, _) => PathBuf::from("runs").join(&name),
        };
        let folder = Run::inspect(&dir, &config)?;
        if let RunFolder::Finished(summary) = folder {
            eprintln!("{name}: already finished in {}, skipped", dir.display());
            done.push((name, *summary));
            continue;
        }
        let data = load_data(&config)?;
        let run = if matches!(folder, RunFolder::Checkpointed) {
            eprintln!("{name}: resuming {} from its checkpoint", dir.display());
            Run::resume(&dir, data, threads)?
        } else {
            if matches!(folder, RunFolder::Unfinished) {
                eprintln!(
                    "{name}: {} holds an unfinished run with no checkpoint; starting it again",
                    dir.display()
                );
                // Only what fedra itself writes: --out may be a folder holding other things.
                clear_run_files(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
            }
            eprintln!(
                "{name}: {} ({} train / {} test), {} clients, scheme {}, {} rounds, {threads} threads -> {}",
                config.data.dataset,
                config.data.train_examples.unwrap_or(data.train.len()),
                config.data.test_examples.unwrap_or(data.test.len()),
                config.partition.clients,
                config.partition.scheme,
                config.train.rounds,
                dir.display()
            );
            let run = Run::start(config, data, &dir, threads)?;
            let (trainable, all) = run.federation.trainable_params();
            if trainable < all {
                eprintln!(
                    "{name}: {trainable} of {all} parameters trainable ({} frozen by model.freeze)",
                    all - trainable
                );
            }
            run
        };
        let summary = drive(run)?;
        print_summary(&name, &summary);
        done.push((name, summary));
    }
    if !single {
        print_comparison(&done);
    }
    Ok(())
}

/// A cell's run name: the file's stem, then the sweep cell's name.
fn run_name(path: &Path, cell: &str) -> String {
    if cell.is_empty() {
        stem(path)
    } else {
        format!("{}/{cell}", stem(path))
    }
}

fn drive(mut run: Run) -> anyhow::Result<Summary> {
    let total = run.federation.config.train.rounds as u64;
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "round {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta_precise} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_position(run.federation.rounds_done as u64);
        bar
    } else {
        ProgressBar::hidden()
    };
    while !run.federation.finished() {
        let row = run.step()?;
        bar.set_position(run.federation.rounds_done as u64);
        if let Some(row) = row {
            bar.set_message(format!("acc {:.2}%", row.test_accuracy * 100.0));
            let line = describe(&row);
            if terminal {
                bar.println(line);
            } else {
                eprintln!("{line}");
            }
        }
    }
    bar.finish_and_clear();
    Ok(run.finish()?)
}

pub(crate) fn describe(row: &RoundMetrics) -> String {
    let mut line = format!(
        "round {:>4}  lr {:.5}  test acc {:6.2}%  test loss {:.4}",
        row.round,
        row.lr,
        row.test_accuracy * 100.0,
        row.test_loss
    );
    if let Some(auc) = row.clinical.auc {
        line.push_str(&format!("  auc {auc:.4}"));
    }
    if let Some(loss) = row.train_loss {
        line.push_str(&format!("  train loss {loss:.4}"));
    }
    if let Some(sgd) = row.sgd_test_accuracy {
        line.push_str(&format!("  sgd acc {:6.2}%", sgd * 100.0));
    }
    if let Some(eps) = row.epsilon {
        line.push_str(&format!("  epsilon {eps:.3}"));
    }
    if let Some(spread) = row.bn_spread {
        line.push_str(&format!("  bn spread {spread:.3}"));
    }
    line.push_str(&format!("  {:.1}s", row.seconds));
    line
}

pub(crate) fn print_summary(name: &str, s: &Summary) {
    println!(
        "{name}: {} rounds, final test accuracy {:.2}% (best {:.2}% at round {}), {}, {:.1}s training, {:.0} samples/s",
        s.rounds,
        s.final_accuracy * 100.0,
        s.best_accuracy * 100.0,
        s.best_round,
        s.mean_emd.map_or_else(
            || "mean EMD unknown (the clients hold the data)".to_string(),
            |emd| format!("mean EMD {emd:.3}")
        ),
        s.total_seconds,
        s.samples_per_s
    );
    if let Some(round) = s.converged_round {
        println!("{name}: converged at round {round} (eval.stop_when_converged)");
    }
    if let (Some(auc), Some(best)) = (s.final_auc, s.best_auc) {
        let mut line = format!(
            "{name}: final AUC {auc:.4} (best {best:.4} at round {})",
            s.best_auc_round.unwrap_or(0)
        );
        if let Some(ba) = s.final_balanced_accuracy {
            line.push_str(&format!(", balanced accuracy {:.2}%", ba * 100.0));
        }
        let per_class: Vec<String> = s
            .final_per_class
            .iter()
            .filter_map(|c| {
                Some(format!(
                    "{} {:.1}/{:.1}",
                    c.class,
                    c.sensitivity? * 100.0,
                    c.specificity? * 100.0
                ))
            })
            .collect();
        if !per_class.is_empty() && per_class.len() <= 10 {
            line.push_str(&format!(
                "; sensitivity/specificity % {}",
                per_class.join(", ")
            ));
        }
        println!("{line}");
    }
    if let (Some(eps), Some(delta)) = (s.final_epsilon, s.privacy_delta) {
        println!("{name}: client-level differential privacy ({eps:.3}, {delta:e})");
    }
    if let Some(mib) = s.peak_rss_mib {
        println!("{name}: peak memory (RSS) of this process so far {mib:.0} MiB");
    }
}

fn print_comparison(done: &[(String, Summary)]) {
    let best = done
        .iter()
        .map(|(_, s)| s.final_accuracy)
        .fold(f64::NEG_INFINITY, f64::max);
    println!();
    println!(
        "{:<24} {:>9} {:>10} {:>12}",
        "experiment", "mean EMD", "final acc", "gap to best"
    );
    for (name, s) in done {
        println!(
            "{:<24} {:>9.3} {:>9.2}% {:>10.2} pt",
            name,
            s.mean_emd.unwrap_or(f64::NAN),
            s.final_accuracy * 100.0,
            (s.final_accuracy - best) * 100.0
        );
    }
}
