//! `fedra report`: read run folders and write `report.md` with pictures, every measured number
//! printed beside the study's.
//!
//! Here: the command, the runs table, the accuracy curves and the partition pictures; reading the
//! run folders in `runs`; the study's Figure 2, Table 2 and data-sharing sections in `study`; the
//! clinical metrics in `clinical`; remedies side by side in `side_by_side`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use fedra_fl::ExperimentConfig;
use fedra_fl::config::Convergence;

use crate::charts;
use crate::paper;
use crate::plot;

mod clinical;
mod runs;
mod side_by_side;
mod study;

use clinical::write_clinical;
use runs::{Row, RunInfo, find_runs, read_run};
use side_by_side::write_side_by_side;
use study::{write_divergence, write_emd_sweep, write_sharing};

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Run folders (as `fedra run` writes them), or folders holding run folders (searched
    /// recursively for `summary.json`).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where to write report.md and the pictures.
    #[arg(long, default_value = "report")]
    out: PathBuf,
}

/// What the study calls this run in Table 1, if anything: only a run with the study's model and
/// learning-rate settings for its dataset (plain SGD, the study's lr and decay) on the whole
/// dataset (no `data.train_examples` / `data.test_examples` cut) is set beside the study's number.
fn table1_kind(c: &ExperimentConfig) -> Option<&'static str> {
    if c.share.is_some() || c.data.train_examples.is_some() || c.data.test_examples.is_some() {
        return None;
    }
    let (model, lr, lr_decay) = paper::setup(&c.data.dataset.to_string())?;
    let t = &c.train;
    if c.model.name != model
        || t.lr != lr
        || t.lr_decay != lr_decay
        || t.momentum != 0.0
        || t.weight_decay != 0.0
    {
        return None;
    }
    if c.strategy.name == "sgd" {
        return Some("sgd");
    }
    if c.strategy.name != "fedavg" || c.partition.clients != 10 || c.train.fraction < 1.0 {
        return None;
    }
    match c.partition.scheme.as_str() {
        "iid" if c.model.init.is_none() => Some("iid"),
        "classes:2" if c.model.init.is_none() => Some("classes:2"),
        "classes:1" if c.model.init.is_none() => Some("classes:1"),
        "classes:1" => Some("pretrained"),
        _ => None,
    }
}

fn emd_target(c: &ExperimentConfig) -> Option<f64> {
    let rest = c.partition.scheme.strip_prefix("emd:")?;
    rest.split(':').next()?.parse().ok()
}

fn pct(v: f64) -> String {
    format!("{:.2}", v * 100.0)
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let mut dirs = Vec::new();
    for path in &args.runs {
        find_runs(path, &mut dirs)?;
    }
    if dirs.is_empty() {
        bail!("no finished runs (folders with summary.json) under the given paths");
    }
    let root = if args.runs.len() == 1 {
        args.runs[0].clone()
    } else {
        PathBuf::new()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let runs: Vec<RunInfo> = dirs
        .iter()
        .map(|d| read_run(d, &root, &args.out))
        .collect::<anyhow::Result<_>>()?;
    let mut md = String::new();
    writeln!(md, "# fedra report\n")?;
    writeln!(
        md,
        "{} runs; measured numbers beside the study's (Zhao et al. 2018, `shared/docs/PAPER.md`). \
         Accuracies are test accuracy in %, final = after the last round run.\n",
        runs.len()
    )?;
    write_runs_table(&mut md, &runs)?;
    write_curves(&mut md, &runs, &args.out)?;
    write_divergence(&mut md, &runs, &args.out)?;
    write_emd_sweep(&mut md, &runs, &args.out)?;
    write_sharing(&mut md, &runs, &args.out)?;
    write_clinical(&mut md, &runs, &args.out)?;
    write_side_by_side(&mut md, &runs, &args.out)?;
    write_heatmaps(&mut md, &runs, &args.out)?;
    let path = args.out.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {} ({} runs)", path.display(), runs.len());
    Ok(())
}

/// The report's convergence criterion: test accuracy within 0.2 points over 20 rounds.
const CONVERGED: Convergence = Convergence {
    window: 20,
    within: 0.2,
};

/// The first round at which `rows` met [`CONVERGED`], if any.
fn converged_at(rows: &[Row]) -> Option<usize> {
    CONVERGED.first_met(&accuracy_history(rows))
}

fn accuracy_history(rows: &[Row]) -> Vec<(usize, f64)> {
    rows.iter().map(|r| (r.round, r.accuracy)).collect()
}

/// Whether and when `rows` met [`CONVERGED`], and the spread over the last 20 rounds run.
fn convergence_cells(rows: &[Row]) -> (String, String) {
    let history = accuracy_history(rows);
    let met = CONVERGED
        .first_met(&history)
        .map_or_else(|| "no".to_string(), |r| format!("round {r}"));
    let spread = CONVERGED
        .spread_at(&history)
        .map_or_else(|| "–".to_string(), |s| format!("{:.2}", s * 100.0));
    (met, spread)
}

fn write_runs_table(md: &mut String, runs: &[RunInfo]) -> anyhow::Result<()> {
    writeln!(md, "## Runs (Table 1)\n")?;
    writeln!(
        md,
        "| run | dataset | training | B | E | rounds | converged | last-20 spread | mean EMD | final acc | best acc | study | difference |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in runs {
        let c = &r.config;
        let dataset = c.data.dataset.to_string();
        let kind = table1_kind(c);
        let study =
            kind.and_then(|k| paper::table1(&dataset, k, c.train.batch_size, c.train.local_epochs));
        let training = match (c.strategy.name.as_str(), kind) {
            ("sgd", _) => format!("SGD (batch {})", c.train.batch_size * 10),
            (_, Some("pretrained")) => "pre-trained, 1-class".to_string(),
            (name, _) => format!("{name} {}", c.partition.scheme),
        };
        let (converged, spread) = convergence_cells(&r.rows);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} |",
            r.name,
            dataset,
            training,
            c.train.batch_size,
            c.train.local_epochs,
            r.summary.rounds,
            converged,
            spread,
            r.summary.mean_emd.unwrap_or(f64::NAN),
            pct(r.summary.final_accuracy),
            pct(r.summary.best_accuracy),
            study.map_or("–".into(), |s| format!("{s:.2}")),
            study.map_or("–".into(), |s| format!(
                "{:+.2}",
                r.summary.final_accuracy * 100.0 - s
            )),
        )?;
    }
    writeln!(
        md,
        "\nThe study ran 500 rounds; a run with fewer rounds is not expected to reach its number. \
         A study number is shown only for runs with the study's model, learning rate and decay \
         (plain SGD). *Converged*: the first evaluated round r whose test accuracies from round \
         r - 20 to r lie within 0.2 points of each other (\"no\": never, in the rounds run); \
         *last-20 spread*: max - min of the test accuracy over the last 20 rounds run, in \
         points. On a test set of n examples one example is 100/n points.\n"
    )?;
    Ok(())
}

fn write_curves(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    writeln!(md, "## Test accuracy per round\n")?;
    let mut by_dataset: BTreeMap<String, Vec<&RunInfo>> = BTreeMap::new();
    for r in runs {
        by_dataset
            .entry(r.config.data.dataset.to_string())
            .or_default()
            .push(r);
    }
    for (dataset, group) in by_dataset {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = group
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.rows
                        .iter()
                        .map(|row| (row.round as f64, row.accuracy * 100.0))
                        .collect(),
                )
            })
            .collect();
        for r in &group {
            if r.rows.iter().any(|row| row.sgd_accuracy.is_some()) {
                series.push((
                    format!("{} (SGD twin)", r.name),
                    r.rows
                        .iter()
                        .filter_map(|row| row.sgd_accuracy.map(|a| (row.round as f64, a * 100.0)))
                        .collect(),
                ));
            }
        }
        let stem = format!("accuracy-{dataset}");
        charts::lines(
            out,
            &stem,
            &format!("{dataset}: test accuracy per round"),
            "round",
            "test accuracy (%)",
            &series,
        )?;
        writeln!(md, "![{stem}]({stem}.png)\n")?;
    }
    Ok(())
}

fn write_heatmaps(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    writeln!(md, "## Client x class matrices\n")?;
    // One picture per distinct client x class matrix (runs of a sweep often share one); a
    // name used twice (same scheme, other seed or sharing) gets a counter.
    let mut seen: Vec<(String, Vec<Vec<usize>>)> = Vec::new();
    let mut stems: Vec<String> = Vec::new();
    for (r, partition) in runs.iter().filter_map(|r| Some((r, r.partition.as_ref()?))) {
        let dataset = r.config.data.dataset.to_string();
        let matrix: Vec<Vec<usize>> = partition
            .clients
            .iter()
            .map(|c| c.class_counts.clone())
            .collect();
        let key = (dataset.clone(), matrix);
        if seen.contains(&key) {
            continue;
        }
        let base = format!(
            "partition-{dataset}-{}",
            partition.scheme.replace([':', '/', '.'], "-")
        );
        let mut stem = base.clone();
        let mut n = 1;
        while stems.contains(&stem) {
            n += 1;
            stem = format!("{base}-{n}");
        }
        plot::partition_heatmap(out, &stem, partition)?;
        writeln!(
            md,
            "![{stem}]({stem}.png) ({dataset}, {}, seed {} from {})\n",
            partition.scheme,
            partition.seed,
            r.rel.display()
        )?;
        seen.push(key);
        stems.push(stem);
    }
    Ok(())
}

/// How a run trained, in a few words: strategy, partition, sharing.
fn training_label(c: &ExperimentConfig) -> String {
    if c.strategy.name == "sgd" {
        return format!("SGD (batch {})", c.train.batch_size * 10);
    }
    let mut label = format!("{} {}", c.strategy.name, c.partition.scheme);
    if let Some(share) = &c.share {
        label.push_str(&format!(
            " + share β {:.0}% α {:.0}%",
            share.beta * 100.0,
            share.alpha * 100.0
        ));
        if share.warmup_epochs > 0 {
            label.push_str(&format!(", warm-up {}", share.warmup_epochs));
        }
    }
    label
}

#[cfg(test)]
mod tests {
    use super::runs::{natural_cmp, relative_path};
    use super::{Row, convergence_cells, table1_kind};
    use fedra_fl::ExperimentConfig;
    use fedra_fl::sweep::expand;
    use std::path::Path;

    fn table1_cells() -> Vec<(String, ExperimentConfig)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
        let mut cells = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !(name.starts_with("table1-") && name.ends_with(".toml")) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for cell in expand(&text, &name, None).unwrap() {
                cells.push((format!("{name} {}", cell.name), cell.config));
            }
        }
        assert!(cells.len() >= 30, "{} cells", cells.len());
        cells
    }

    #[test]
    fn every_table1_experiment_is_a_table1_row() {
        for (name, config) in table1_cells() {
            let kind = table1_kind(&config);
            assert!(kind.is_some(), "{name}");
            let study = crate::paper::table1(
                &config.data.dataset.to_string(),
                kind.unwrap(),
                config.train.batch_size,
                config.train.local_epochs,
            );
            assert!(study.is_some(), "{name}: {kind:?}");
        }
    }

    #[test]
    fn another_model_or_learning_rate_is_not_the_studys_row() {
        for (name, config) in table1_cells() {
            type Change = fn(&mut ExperimentConfig);
            let changes: [(&str, Change); 8] = [
                ("model", |c| c.model.name = "mlp".into()),
                ("training set", |c| c.data.train_examples = Some(10_000)),
                ("test set", |c| c.data.test_examples = Some(2_000)),
                ("bn model", |c| {
                    c.model.name = format!("{}-bn", c.model.name)
                }),
                ("lr", |c| c.train.lr *= 2.0),
                ("lr_decay", |c| c.train.lr_decay = 1.0),
                ("momentum", |c| c.train.momentum = 0.9),
                ("weight_decay", |c| c.train.weight_decay = 1e-4),
            ];
            for (what, change) in changes {
                let mut other = config.clone();
                change(&mut other);
                assert_eq!(table1_kind(&other), None, "{name} with another {what}");
            }
        }
        // Another dataset's settings: MNIST trained at CIFAR-10's lr and decay.
        let (_, mut mnist) = table1_cells()
            .into_iter()
            .find(|(n, c)| n.starts_with("table1-mnist.toml") && c.partition.scheme == "iid")
            .unwrap();
        assert_eq!(table1_kind(&mnist), Some("iid"));
        mnist.train.lr = 0.1;
        mnist.train.lr_decay = 0.992;
        assert_eq!(table1_kind(&mnist), None);
    }

    #[test]
    fn run_names_sort_with_numbers_as_numbers() {
        let mut names = vec![
            "scheme-emd-1.8_seed-0",
            "scheme-emd-0.36_seed-0",
            "scheme-emd-1.764_seed-0",
            "scheme-emd-0_seed-0",
            "batch_size-100",
            "batch_size-10",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "batch_size-10",
                "batch_size-100",
                "scheme-emd-0_seed-0",
                "scheme-emd-0.36_seed-0",
                "scheme-emd-1.764_seed-0",
                "scheme-emd-1.8_seed-0",
            ]
        );
    }

    #[test]
    fn run_folders_are_named_relative_to_the_report() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("results/x/runs/table1/scheme-iid");
        let report = tmp.path().join("results/x");
        let elsewhere = tmp.path().join("reports/y");
        for d in [&run, &report, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        assert_eq!(
            relative_path(&run, &report),
            Path::new("runs/table1/scheme-iid")
        );
        assert_eq!(
            relative_path(&run, &elsewhere),
            Path::new("../../results/x/runs/table1/scheme-iid")
        );
        assert_eq!(relative_path(&report, &report), Path::new("."));
        // A `..` in the given path is resolved, not kept.
        let roundabout = report.join("../x/runs/table1/scheme-iid");
        assert_eq!(
            relative_path(&roundabout, &report),
            Path::new("runs/table1/scheme-iid")
        );
    }

    #[test]
    fn convergence_is_the_first_flat_twenty_rounds() {
        let row = |round: usize, accuracy: f64| Row {
            round,
            accuracy,
            sgd_accuracy: None,
            divergence: Vec::new(),
            auc: None,
        };
        // Every 5 rounds: rising to round 20, then within 0.1 points from round 20 on.
        let mut rows: Vec<Row> = [0.1, 0.5, 0.8, 0.9, 0.95]
            .iter()
            .enumerate()
            .map(|(i, &a)| row(5 * i, a))
            .collect();
        for (k, a) in [0.9505, 0.9495, 0.9502, 0.9508, 0.9501].iter().enumerate() {
            rows.push(row(25 + 5 * k, *a));
        }
        let (met, spread) = convergence_cells(&rows);
        assert_eq!(met, "round 40", "rounds 20..40 are the first flat window");
        assert_eq!(spread, "0.13", "last 20 rounds: 0.9495..0.9508");
        let (met, spread) = convergence_cells(&rows[..6]);
        assert_eq!((met.as_str(), spread.as_str()), ("no", "45.05"));
        let (met, spread) = convergence_cells(&rows[..2]);
        assert_eq!((met.as_str(), spread.as_str()), ("no", "–"));
    }

    #[test]
    fn two_experiment_folders_with_the_same_run_names_stay_apart() {
        // Two copies of committed runs, as two sweeps would leave them.
        let tmp = tempfile::tempdir().unwrap();
        let source =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../results/remedies-mnist/runs");
        for set in ["first", "second"] {
            for run in ["fedavg_scheme-classes-1", "fedprox_scheme-classes-1"] {
                let to = tmp.path().join(set).join(run);
                std::fs::create_dir_all(&to).unwrap();
                for file in std::fs::read_dir(source.join(run)).unwrap() {
                    let file = file.unwrap().path();
                    std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
                }
            }
        }
        let out = tmp.path().join("report");
        super::run(super::ReportArgs {
            runs: vec![tmp.path().join("first"), tmp.path().join("second")],
            out: out.clone(),
        })
        .unwrap();
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        for set in ["first", "second"] {
            let heading = format!("### mnist (../{set}), classes:1\n");
            let at = md
                .find(&heading)
                .unwrap_or_else(|| panic!("no {heading:?} in\n{md}"));
            let section = &md[at + heading.len()..];
            let section = &section[..section.find("###").unwrap_or(section.len())];
            assert_eq!(section.matches("\n| fedavg |").count(), 1, "{section}");
            assert_eq!(section.matches("\n| fedprox |").count(), 1, "{section}");
        }
        // Run folders are named from the report's folder, not by an absolute path.
        assert!(md.contains("| ../first/fedavg_scheme-classes-1 |"), "{md}");
        assert!(!md.contains(&tmp.path().display().to_string()), "{md}");
        // A run labelled `fedavg` is the baseline the other runs are timed against.
        assert_eq!(md.matches("| rounds to FedAvg's best (").count(), 2, "{md}");
    }

    #[test]
    fn a_batch_size_sweep_side_by_side_has_no_fedavg_baseline_column() {
        // A sweep over batch size, whose runs are all FedAvg: no run is labelled `fedavg`.
        let tmp = tempfile::tempdir().unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../results/remedies-mnist/runs/fedavg_scheme-classes-1");
        for run in [
            "scheme-classes-1_batch_size-10",
            "scheme-classes-1_batch_size-100",
        ] {
            let to = tmp.path().join("sweep").join(run);
            std::fs::create_dir_all(&to).unwrap();
            for file in std::fs::read_dir(&source).unwrap() {
                let file = file.unwrap().path();
                std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
            }
        }
        let out = tmp.path().join("report");
        super::run(super::ReportArgs {
            runs: vec![tmp.path().join("sweep")],
            out: out.clone(),
        })
        .unwrap();
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        let at = md
            .find("### mnist, classes:1\n")
            .expect("a side-by-side section");
        let section = &md[at..];
        let section = &section[..section.find("![").unwrap_or(section.len())];
        assert!(!section.contains("FedAvg's best"), "{section}");
        assert!(!section.contains("no FedAvg run"), "{section}");
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 4, "{section}");
        for row in rows {
            assert_eq!(row.matches('|').count(), 7, "six columns: {row}");
        }
        assert!(section.contains("\n| batch_size-10 |"), "{section}");
    }
}
