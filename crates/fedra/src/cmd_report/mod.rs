//! `fedra report`: read run folders and write `report.md` with pictures, every measured number
//! printed beside the study's.
//!
//! Here: the command, the study-comparison sections and the charts' tables; reading the run folders
//! in `runs`, the clinical section in `clinical`.

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

use clinical::write_clinical;
use runs::{Row, RunInfo, find_runs, read_run};

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

/// Whether and when `rows` met [`CONVERGED`], and the spread over the last 20 rounds run.
fn convergence_cells(rows: &[Row]) -> (String, String) {
    let history: Vec<(usize, f64)> = rows.iter().map(|r| (r.round, r.accuracy)).collect();
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

fn write_divergence(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    let with: Vec<&RunInfo> = runs
        .iter()
        .filter(|r| r.rows.last().is_some_and(|row| !row.divergence.is_empty()))
        .collect();
    if with.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Weight divergence (Figure 2)\n")?;
    writeln!(
        md,
        "||w_FedAvg − w_SGD|| / ||w_SGD|| per layer after the last evaluated round; the study finds \
         IID < 2-class < 1-class in every layer, most in conv1 and the last fc.\n"
    )?;
    // Layers = divergence names without a '.', in model order.
    let layers: Vec<String> = with[0]
        .rows
        .last()
        .unwrap()
        .divergence
        .iter()
        .filter(|(n, _)| !n.contains('.'))
        .map(|(n, _)| n.clone())
        .collect();
    write!(md, "| run | round |")?;
    for l in &layers {
        write!(md, " {l} |")?;
    }
    writeln!(md)?;
    writeln!(md, "|---|---|{}", "---|".repeat(layers.len()))?;
    let mut series = Vec::new();
    for r in &with {
        let last = r.rows.last().unwrap();
        write!(md, "| {} | {} |", r.name, last.round)?;
        let mut values = Vec::new();
        for l in &layers {
            let v = last
                .divergence
                .iter()
                .find(|(n, _)| n == l)
                .map_or(f64::NAN, |d| d.1);
            write!(md, " {v:.4} |")?;
            values.push(v);
        }
        writeln!(md)?;
        series.push((r.name.clone(), values));
    }
    charts::grouped_bars(
        out,
        "divergence",
        "weight divergence per layer",
        "||w_FedAvg - w_SGD|| / ||w_SGD||",
        &layers,
        &series,
    )?;
    writeln!(md, "\n![divergence](divergence.png)\n")?;
    Ok(())
}

/// One seed's run of a sweep cell, as [`seed_cells`] needs it.
struct SeedRun<'a> {
    rounds: usize,
    final_accuracy: f64,
    rows: &'a [Row],
}

/// The per-seed columns of a sweep cell: rounds run (a range when the seeds stopped at different
/// rounds), how many met the convergence criterion, each final accuracy in run order, and their
/// range, the number that says whether two cells are within noise of each other.
struct SeedCells {
    rounds: String,
    converged: String,
    finals: String,
    range: String,
}

fn seed_cells(seeds: &[SeedRun]) -> SeedCells {
    let lo = seeds.iter().map(|s| s.rounds).min().unwrap_or(0);
    let hi = seeds.iter().map(|s| s.rounds).max().unwrap_or(0);
    let met = seeds
        .iter()
        .filter(|s| convergence_cells(s.rows).0 != "no")
        .count();
    let finals: Vec<String> = seeds.iter().map(|s| pct(s.final_accuracy)).collect();
    let min = seeds
        .iter()
        .map(|s| s.final_accuracy)
        .fold(f64::INFINITY, f64::min);
    let max = seeds
        .iter()
        .map(|s| s.final_accuracy)
        .fold(f64::NEG_INFINITY, f64::max);
    SeedCells {
        rounds: if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        },
        converged: format!("{met} of {}", seeds.len()),
        finals: finals.join(", "),
        range: if seeds.len() > 1 {
            format!("{:.2}", (max - min) * 100.0)
        } else {
            "–".to_string()
        },
    }
}

fn write_emd_sweep(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    let mut cells: BTreeMap<(String, i64), Vec<(&RunInfo, f64)>> = BTreeMap::new();
    for r in runs {
        if let Some(target) = emd_target(&r.config) {
            cells
                .entry((
                    r.config.data.dataset.to_string(),
                    (target * 1000.0).round() as i64,
                ))
                .or_default()
                .push((r, target));
        }
    }
    if cells.is_empty() {
        return Ok(());
    }
    writeln!(md, "## EMD sweep (Table 2)\n")?;
    writeln!(
        md,
        "Each target EMD is one row; its runs are the seeds (other class distributions and \
         initial weights). \"converged\" counts the runs whose test accuracy held within 0.2 \
         points over 20 rounds; \"range\" is the largest final accuracy minus the smallest.\n"
    )?;
    writeln!(
        md,
        "| dataset | target EMD | achieved mean EMD | runs | rounds | converged | final acc per run | range | mean acc | study | difference |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for ((dataset, _), group) in &cells {
        let target = group[0].1;
        let n = group.len() as f64;
        let acc = group
            .iter()
            .map(|(r, _)| r.summary.final_accuracy)
            .sum::<f64>()
            / n;
        let emd = group
            .iter()
            .map(|(r, _)| r.summary.mean_emd.unwrap_or(f64::NAN))
            .sum::<f64>()
            / n;
        let seeds: Vec<SeedRun> = group
            .iter()
            .map(|(r, _)| SeedRun {
                rounds: r.summary.rounds,
                final_accuracy: r.summary.final_accuracy,
                rows: &r.rows,
            })
            .collect();
        let cells = seed_cells(&seeds);
        let study = paper::emd_sweep(dataset, target);
        writeln!(
            md,
            "| {dataset} | {target} | {emd:.3} | {} | {} | {} | {} | {} | {} | {} | {} |",
            group.len(),
            cells.rounds,
            cells.converged,
            cells.finals,
            cells.range,
            pct(acc),
            study.map_or("–".into(), pct),
            study.map_or("–".into(), |s| format!("{:+.2}", (acc - s) * 100.0)),
        )?;
        series
            .entry(dataset.clone())
            .or_default()
            .push((emd, acc * 100.0));
        if let Some(s) = study {
            series
                .entry(format!("{dataset} (study)"))
                .or_default()
                .push((target, s * 100.0));
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = series.into_iter().collect();
    charts::lines(
        out,
        "emd",
        "test accuracy vs EMD",
        "mean EMD",
        "test accuracy (%)",
        &series,
    )?;
    writeln!(md, "\n![emd](emd.png)\n")?;
    Ok(())
}

fn write_sharing(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    let with: Vec<&RunInfo> = runs.iter().filter(|r| r.config.share.is_some()).collect();
    if with.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Data sharing (Figure 7)\n")?;
    writeln!(
        md,
        "The study's points (CIFAR-10, 1-class non-IID, B = 100, E = 1, 300 rounds):\n"
    )?;
    writeln!(md, "| study | beta | alpha | accuracy |")?;
    writeln!(md, "|---|---|---|---|")?;
    for (what, beta, alpha, accuracy) in paper::SHARING {
        let alpha = if alpha.is_nan() {
            "best of sweep".to_string()
        } else {
            format!("{:.0}%", alpha * 100.0)
        };
        writeln!(
            md,
            "| {what} | {:.0}% | {alpha} | {accuracy:.2}% |",
            beta * 100.0
        )?;
    }
    writeln!(md, "\nfedra's runs:\n")?;
    writeln!(
        md,
        "| run | beta | alpha | warm-up epochs | mean EMD before → after | rounds | final acc |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let mut by_beta: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut by_alpha: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &with {
        let s = r.config.share.as_ref().unwrap();
        writeln!(
            md,
            "| {} | {:.1}% | {:.0}% | {} | {:.3} → {:.3} | {} | {} |",
            r.name,
            s.beta * 100.0,
            s.alpha * 100.0,
            s.warmup_epochs,
            r.summary.mean_emd_before_share.unwrap_or(f64::NAN),
            r.summary.mean_emd.unwrap_or(f64::NAN),
            r.summary.rounds,
            pct(r.summary.final_accuracy)
        )?;
        let warm = if s.warmup_epochs > 0 { ", warm-up" } else { "" };
        by_beta
            .entry(format!("alpha {:.0}%{warm}", s.alpha * 100.0))
            .or_default()
            .push((s.beta * 100.0, r.summary.final_accuracy * 100.0));
        by_alpha
            .entry(format!("beta {:.0}%{warm}", s.beta * 100.0))
            .or_default()
            .push((s.alpha * 100.0, r.summary.final_accuracy * 100.0));
    }
    writeln!(md)?;
    for (stem, title, x, map) in [
        ("sharing-beta", "test accuracy vs beta", "beta (%)", by_beta),
        (
            "sharing-alpha",
            "test accuracy vs alpha",
            "alpha (%)",
            by_alpha,
        ),
    ] {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = map.into_iter().collect();
        for s in &mut series {
            s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        // A sweep curve needs two x values somewhere; a lone point per line says nothing.
        if series.iter().all(|s| s.1.len() < 2) {
            continue;
        }
        charts::lines(out, stem, title, x, "test accuracy (%)", &series)?;
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

/// What sets a run apart from the others of its partition: its folder name without the
/// `scheme-...` part a sweep over `partition.scheme` gives it (a remedies comparison's folders
/// are `VARIANT_scheme-SCHEME`); `None` when nothing is left.
fn side_label(dir: &Path) -> Option<String> {
    let folder = dir.file_name()?.to_str()?;
    if !folder.split('_').any(|part| part.starts_with("scheme-")) {
        return None;
    }
    let rest: Vec<&str> = folder
        .split('_')
        .filter(|part| !part.starts_with("scheme-"))
        .collect();
    (!rest.is_empty()).then(|| rest.join("_"))
}

/// Mean test accuracy of the last `n` evaluated rounds (non-IID curves swing from round to
/// round, so a single final value can mislead).
fn tail_mean(rows: &[Row], n: usize) -> Option<f64> {
    let trained: Vec<&Row> = rows.iter().filter(|r| r.round > 0).collect();
    let tail = &trained[trained.len().saturating_sub(n)..];
    (!tail.is_empty()).then(|| tail.iter().map(|r| r.accuracy).sum::<f64>() / tail.len() as f64)
}

/// The best test accuracy in `rows` and the first round that reached it, read from the same
/// rounded values as every other row (the summary's best is unrounded and names the last tie).
fn first_best(rows: &[Row]) -> Option<(f64, usize)> {
    rows.iter().fold(None, |best, r| match best {
        Some((b, _)) if r.accuracy <= b => best,
        _ if r.accuracy.is_nan() => best,
        _ => Some((r.accuracy, r.round)),
    })
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// Runs of a sweep over `partition.scheme` side by side (a remedies comparison): per dataset and
/// partition, one accuracy chart with a line per run and a table of final, last-5 mean and best
/// accuracy, rounds to reach FedAvg's best accuracy in that partition, and megabytes to and
/// from each client; then one table of last-5 means, remedy by partition, the best of each
/// partition in bold.
fn write_side_by_side(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    type Group<'a> = Vec<(String, &'a RunInfo)>;
    // Runs of several experiment folders (say two sweeps that both hold a `fedavg_scheme-iid`)
    // are compared within their own folder: the group is named by dataset and folder.
    let folder = |r: &RunInfo| r.rel.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut folders: Vec<PathBuf> = runs
        .iter()
        .filter(|r| side_label(&r.dir).is_some())
        .map(folder)
        .collect();
    folders.sort();
    folders.dedup();
    let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
    for r in runs {
        if let Some(label) = side_label(&r.dir) {
            let dataset = r.config.data.dataset.to_string();
            let set = if folders.len() > 1 {
                format!("{dataset} ({})", folder(r).display())
            } else {
                dataset
            };
            groups
                .entry((set, r.config.partition.scheme.clone()))
                .or_default()
                .push((label, r));
        }
    }
    groups.retain(|_, g| g.len() >= 2);
    // By label, as the matrix below: folder order puts "fedavg-bn_..." before "fedavg_...".
    for group in groups.values_mut() {
        group.sort_by(|a, b| a.0.cmp(&b.0));
    }
    if groups.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Side by side, per partition\n")?;
    writeln!(
        md,
        "Runs of the same dataset and partition scheme, named by what else sets them apart. \
         *last 5*: mean test accuracy of the last five evaluated rounds (curves under label skew \
         swing from round to round); *best*: the first round that reached it; *rounds to \
         FedAvg's best*: the first round that reached the best \
         accuracy FedAvg reached in that partition (– never); *MB to / from a client*: what the \
         server sent to and received from each client over the run (the model as f32 each way, \
         SCAFFOLD's correction down from round 2, data sharing's examples; mean over clients).\n"
    )?;
    let mut matrix: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    for ((dataset, scheme), group) in &groups {
        writeln!(md, "### {dataset}, {scheme}\n")?;
        let target = group
            .iter()
            .find(|(label, _)| label == "fedavg")
            .and_then(|(_, r)| first_best(&r.rows))
            .map(|(best, _)| best);
        writeln!(
            md,
            "| run | rounds | final acc | last 5 | best acc (round) | rounds to FedAvg's best{} | MB to / from a client |",
            target.map_or(String::new(), |t| format!(" ({})", pct(t)))
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for (label, r) in group {
            let last5 = tail_mean(&r.rows, 5);
            if let Some(v) = last5 {
                matrix
                    .entry(dataset.clone())
                    .or_default()
                    .entry(label.clone())
                    .or_default()
                    .insert(scheme.clone(), v);
            }
            let reached = target.map(|t| {
                r.rows
                    .iter()
                    .find(|row| row.round > 0 && row.accuracy >= t)
                    .map_or("–".to_string(), |row| row.round.to_string())
            });
            let traffic = r.summary.bytes_per_client.map_or("–".to_string(), |t| {
                format!("{} / {}", mb(t.sent), mb(t.received))
            });
            let (best, best_round) =
                first_best(&r.rows).unwrap_or((r.summary.best_accuracy, r.summary.best_round));
            writeln!(
                md,
                "| {label} | {} | {} | {} | {} ({best_round}) | {} | {traffic} |",
                r.summary.rounds,
                pct(r.summary.final_accuracy),
                last5.map_or("–".to_string(), pct),
                pct(best),
                reached.unwrap_or_else(|| "no FedAvg run".to_string()),
            )?;
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = group
            .iter()
            .map(|(label, r)| {
                let points = r
                    .rows
                    .iter()
                    .map(|row| (row.round as f64, row.accuracy * 100.0))
                    .collect();
                (label.clone(), points)
            })
            .collect();
        let stem: String = format!("side-{dataset}-{scheme}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        charts::lines(
            out,
            &stem,
            &format!("{dataset}, {scheme}: test accuracy per round"),
            "round",
            "test accuracy (%)",
            &series,
        )?;
        writeln!(md, "\n![{stem}]({stem}.png)\n")?;
    }
    for (dataset, rows) in &matrix {
        let schemes: Vec<&String> = groups
            .keys()
            .filter(|(d, _)| d == dataset)
            .map(|(_, s)| s)
            .collect();
        if schemes.len() < 2 {
            continue;
        }
        writeln!(
            md,
            "### {dataset}: last-5 mean accuracy, run by partition\n"
        )?;
        let best: Vec<f64> = schemes
            .iter()
            .map(|s| {
                rows.values()
                    .filter_map(|by| by.get(*s))
                    .fold(f64::NEG_INFINITY, |a, &b| a.max(b))
            })
            .collect();
        let header: Vec<&str> = schemes.iter().map(|s| s.as_str()).collect();
        writeln!(md, "| run | {} |", header.join(" | "))?;
        writeln!(md, "|---|{}", "---|".repeat(schemes.len()))?;
        for (label, by) in rows {
            let cells: Vec<String> = schemes
                .iter()
                .zip(&best)
                .map(|(s, &b)| match by.get(*s) {
                    Some(&v) if v == b => format!("**{}**", pct(v)),
                    Some(&v) => pct(v),
                    None => "–".to_string(),
                })
                .collect();
            writeln!(md, "| {label} | {} |", cells.join(" | "))?;
        }
        writeln!(md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::runs::{natural_cmp, relative_path};
    use super::{
        Row, SeedRun, convergence_cells, first_best, seed_cells, side_label, table1_kind, tail_mean,
    };
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
    fn side_by_side_names_runs_by_what_is_not_the_partition() {
        let label = |p: &str| side_label(Path::new(p));
        assert_eq!(
            label("runs/x/fedprox_scheme-classes-1").as_deref(),
            Some("fedprox")
        );
        assert_eq!(
            label("runs/scheme-iid_batch_size-10").as_deref(),
            Some("batch_size-10")
        );
        assert_eq!(label("runs/scheme-iid"), None);
        assert_eq!(label("runs/fedavg"), None);
        let rows: Vec<Row> = [0.1, 0.5, 0.7, 0.2, 0.4, 0.6, 0.8]
            .iter()
            .enumerate()
            .map(|(round, &accuracy)| Row {
                round,
                accuracy,
                sgd_accuracy: None,
                divergence: Vec::new(),
                auc: None,
            })
            .collect();
        // Rounds 2..=6 (round 0 is the untrained model).
        assert!((tail_mean(&rows, 5).unwrap() - 0.54).abs() < 1e-12);
        assert!((tail_mean(&rows[..3], 5).unwrap() - 0.6).abs() < 1e-12);
        assert_eq!(tail_mean(&rows[..1], 5), None);
        // The best is the first round that reached it (a tie later does not move it).
        let mut tied = rows.clone();
        tied[4].accuracy = 0.8;
        assert_eq!(first_best(&tied), Some((0.8, 4)));
        assert_eq!(first_best(&rows[..3]), Some((0.7, 2)));
        assert_eq!(first_best(&[]), None);
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
    fn a_sweep_cell_lists_its_seeds_and_their_range() {
        let rows = |accs: &[f64]| -> Vec<Row> {
            accs.iter()
                .enumerate()
                .map(|(i, &accuracy)| Row {
                    round: 5 * i,
                    accuracy,
                    sgd_accuracy: None,
                    divergence: Vec::new(),
                    auc: None,
                })
                .collect()
        };
        // Seed 0 flat from round 10 to 30: converged at round 30; seed 1 still swinging.
        let flat = rows(&[0.1, 0.9, 0.95, 0.951, 0.9505, 0.9502, 0.9504]);
        let swinging = rows(&[0.1, 0.5, 0.8, 0.6, 0.85, 0.7, 0.9, 0.8, 0.88]);
        let cells = seed_cells(&[
            SeedRun {
                rounds: 30,
                final_accuracy: 0.9504,
                rows: &flat,
            },
            SeedRun {
                rounds: 40,
                final_accuracy: 0.88,
                rows: &swinging,
            },
        ]);
        assert_eq!(cells.rounds, "30-40");
        assert_eq!(cells.converged, "1 of 2");
        assert_eq!(cells.finals, "95.04, 88.00");
        assert_eq!(cells.range, "7.04");
        let one = seed_cells(&[SeedRun {
            rounds: 30,
            final_accuracy: 0.9504,
            rows: &flat,
        }]);
        assert_eq!(
            (
                one.rounds.as_str(),
                one.converged.as_str(),
                one.range.as_str()
            ),
            ("30", "1 of 1", "–")
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
    }
}
