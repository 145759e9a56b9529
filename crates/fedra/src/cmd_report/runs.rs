//! Reading run folders: finding them under the paths given, and each one's config, summary,
//! metrics and partition, named relative to the report.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use fedra_data::stats::PartitionStats;
use fedra_fl::ExperimentConfig;
use fedra_sim::Summary;

/// One row of `metrics.csv`.
#[derive(Clone, Debug)]
pub(super) struct Row {
    pub(super) round: usize,
    pub(super) accuracy: f64,
    pub(super) sgd_accuracy: Option<f64>,
    pub(super) divergence: Vec<(String, f64)>,
    /// ROC AUC on the test set (absent in runs made before fedra measured it).
    pub(super) auc: Option<f64>,
}

/// Everything a report needs from one run folder.
pub(super) struct RunInfo {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    /// The run folder relative to the report's folder (what the report prints: a report moved
    /// with its runs, or committed, names them the same on every machine).
    pub(super) rel: PathBuf,
    pub(super) config: ExperimentConfig,
    pub(super) summary: Summary,
    pub(super) rows: Vec<Row>,
    /// Absent for a federation whose server had no training set (the clients held the data).
    pub(super) partition: Option<PartitionStats>,
}

/// Compare names with their numbers as numbers, so `emd-0.36` sorts after `emd-0` and
/// `emd-1.764` before `emd-1.8`.
pub(super) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            if digits > 0 {
                let (number, tail) = rest.split_at(digits);
                let value = number.trim_end_matches('.').parse().unwrap_or(f64::MAX);
                out.push((String::new(), value));
                rest = tail;
            } else {
                let text = rest
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let (word, tail) = rest.split_at(text);
                out.push((word.to_string(), f64::MIN));
                rest = tail;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let order = x.0.cmp(&y.0).then(x.1.total_cmp(&y.1));
        if order.is_ne() {
            return order;
        }
    }
    ca.len().cmp(&cb.len()).then_with(|| a.cmp(b))
}

pub(super) fn find_runs(path: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.join("summary.json").exists() {
        found.push(path.to_path_buf());
        return Ok(());
    }
    if !path.is_dir() {
        bail!(
            "{} is neither a run folder nor a folder of runs",
            path.display()
        );
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    for entry in entries {
        find_runs(&entry, found)?;
    }
    Ok(())
}

fn read_metrics(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("{} is empty", path.display()))?
        .split(',')
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(round_col), Some(acc_col)) = (column("round"), column("test_accuracy")) else {
        bail!("{}: no round/test_accuracy columns", path.display());
    };
    let sgd_col = column("sgd_test_accuracy");
    let auc_col = column("test_auc");
    let mut rows = Vec::new();
    for (number, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != header.len() {
            bail!(
                "{} line {}: {} cells, the header has {}",
                path.display(),
                number + 2,
                cells.len(),
                header.len()
            );
        }
        let num = |i: usize| -> anyhow::Result<f64> {
            cells[i].parse::<f64>().with_context(|| {
                format!(
                    "{} line {}, column {}: {:?} is not a number",
                    path.display(),
                    number + 2,
                    header[i],
                    cells[i]
                )
            })
        };
        let divergence = header
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.strip_prefix("wd_").map(|n| (i, n)))
            .map(|(i, n)| Ok((n.to_string(), num(i)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push(Row {
            round: num(round_col)? as usize,
            accuracy: num(acc_col)?,
            sgd_accuracy: sgd_col.map(num).transpose()?,
            divergence,
            // An empty cell: AUC undefined on this test set (one class only).
            auc: auc_col
                .filter(|&i| !cells[i].is_empty())
                .map(num)
                .transpose()?,
        });
    }
    Ok(rows)
}

/// `target` as a path relative to `base` (both resolved first when they exist, so `..` and
/// symbolic links do not confuse the common part).
pub(super) fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let resolve = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let (target, base) = (resolve(target), resolve(base));
    let common = target
        .components()
        .zip(base.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::new();
    for _ in base.components().skip(common) {
        out.push("..");
    }
    for c in target.components().skip(common) {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

pub(super) fn read_run(dir: &Path, root: &Path, out: &Path) -> anyhow::Result<RunInfo> {
    let config = ExperimentConfig::from_file(&dir.join("config.toml"))?;
    let summary_path = dir.join("summary.json");
    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(&summary_path)
            .with_context(|| format!("cannot read {}", summary_path.display()))?,
    )
    .with_context(|| format!("{} is not a fedra summary", summary_path.display()))?;
    let partition_path = dir.join("partition.json");
    let partition: Option<PartitionStats> = if partition_path.exists() || summary.mean_emd.is_some()
    {
        Some(
            serde_json::from_str(
                &std::fs::read_to_string(&partition_path)
                    .with_context(|| format!("cannot read {}", partition_path.display()))?,
            )
            .with_context(|| format!("{} is not a fedra partition", partition_path.display()))?,
        )
    } else {
        None
    };
    let rows = read_metrics(&dir.join("metrics.csv"))?;
    let rel = relative_path(dir, out);
    // Inside the one folder given: the path below it; else the path from the report.
    let name = dir
        .strip_prefix(root)
        .ok()
        .filter(|p| !root.as_os_str().is_empty() && !p.as_os_str().is_empty())
        .unwrap_or(&rel)
        .display()
        .to_string();
    Ok(RunInfo {
        name,
        dir: dir.to_path_buf(),
        rel,
        config,
        summary,
        rows,
        partition,
    })
}
