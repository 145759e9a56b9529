//! The side-by-side section: runs that differ in one thing (a remedy, a batch size) over the same
//! partitions, one table and one chart per partition, plus the matrix of last-five-round means.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::pct;
use super::runs::{Row, RunInfo};
use crate::charts;

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
pub(super) fn write_side_by_side(
    md: &mut String,
    runs: &[RunInfo],
    out: &Path,
) -> anyhow::Result<()> {
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
         FedAvg's best* (where a run is labelled `fedavg`): the first round that reached the \
         best accuracy FedAvg reached in that partition (– never); *MB to / from a client*: what the \
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
        // Without a run labelled `fedavg` (a batch-size sweep, whose runs are all FedAvg) there
        // is no baseline to reach: the column is left out rather than filled with dashes.
        let (reach_head, reach_rule) = target.map_or((String::new(), ""), |t| {
            (format!(" rounds to FedAvg's best ({}) |", pct(t)), "---|")
        });
        writeln!(
            md,
            "| run | rounds | final acc | last 5 | best acc (round) |{reach_head} MB to / from a client |"
        )?;
        writeln!(md, "|---|---|---|---|---|{reach_rule}---|")?;
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
            let reached = reached.map_or(String::new(), |round| format!(" {round} |"));
            writeln!(
                md,
                "| {label} | {} | {} | {} | {} ({best_round}) |{reached} {traffic} |",
                r.summary.rounds,
                pct(r.summary.final_accuracy),
                last5.map_or("–".to_string(), pct),
                pct(best),
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
    use super::super::runs::Row;
    use super::{first_best, side_label, tail_mean};
    use std::path::Path;

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
}
