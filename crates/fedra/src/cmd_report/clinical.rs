//! The report's clinical section: accuracy, AUC, balanced accuracy and per-class sensitivity /
//! specificity of each run, and AUC by round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::{RunInfo, pct, training_label};
use crate::charts;

/// The clinical table (runs whose metrics hold an AUC): per dataset, each run's accuracy, AUC,
/// balanced accuracy, per-class sensitivity / specificity, and the first round its AUC reached
/// 95% of the final AUC of the dataset's FedAvg IID run; and AUC-per-round charts.
pub(super) fn write_clinical(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
    let mut by_dataset: BTreeMap<String, Vec<&RunInfo>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.summary.final_auc.is_some()) {
        by_dataset
            .entry(r.config.data.dataset.to_string())
            .or_default()
            .push(r);
    }
    if by_dataset.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Clinical metrics
"
    )?;
    writeln!(
        md,
        "On the test split, after the last round: accuracy, ROC AUC (binary: of class 1; more \
         classes: macro one-vs-rest), balanced accuracy (mean sensitivity), and sensitivity / \
         specificity per class in %. *Rounds to 95%*: the first round whose AUC reached 95% of the \
         final AUC of the dataset's FedAvg IID run (– if none did).\n"
    )?;
    for (dataset, group) in &by_dataset {
        let iid_auc = group
            .iter()
            .find(|r| {
                let c = &r.config;
                c.strategy.name == "fedavg" && c.partition.scheme == "iid" && c.share.is_none()
            })
            .and_then(|r| r.summary.final_auc);
        writeln!(md, "### {dataset}\n")?;
        let classes: Vec<String> = group[0]
            .summary
            .final_per_class
            .iter()
            .map(|c| c.class.clone())
            .collect();
        writeln!(
            md,
            "| run | training | mean EMD | rounds | acc | AUC | best AUC (round) | balanced acc | sens / spec: {} | rounds to 95% of IID AUC |",
            classes.join(" · ")
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
        for r in group {
            let s = &r.summary;
            let per_class: Vec<String> = s
                .final_per_class
                .iter()
                .map(|c| {
                    let v =
                        |x: Option<f64>| x.map_or("–".into(), |x| format!("{:.0}", x * 100.0));
                    format!("{}/{}", v(c.sensitivity), v(c.specificity))
                })
                .collect();
            let reached = iid_auc.and_then(|target| {
                r.rows
                    .iter()
                    .find(|row| row.auc.is_some_and(|a| a >= 0.95 * target))
                    .map(|row| row.round)
            });
            writeln!(
                md,
                "| {} | {} | {:.3} | {} | {} | {} | {} ({}) | {} | {} | {} |",
                r.name,
                training_label(&r.config),
                s.mean_emd.unwrap_or(f64::NAN),
                s.rounds,
                pct(s.final_accuracy),
                s.final_auc.map_or("–".into(), |a| format!("{a:.3}")),
                s.best_auc.map_or("–".into(), |a| format!("{a:.3}")),
                s.best_auc_round.map_or("–".into(), |r| r.to_string()),
                s.final_balanced_accuracy.map_or("–".into(), pct),
                per_class.join(" · "),
                match (iid_auc, reached) {
                    (None, _) => "no IID run".to_string(),
                    (Some(_), None) => "–".to_string(),
                    (Some(_), Some(round)) => round.to_string(),
                },
            )?;
        }
        let series: Vec<(String, Vec<(f64, f64)>)> = group
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.rows
                        .iter()
                        .filter_map(|row| row.auc.map(|a| (row.round as f64, a)))
                        .collect(),
                )
            })
            .collect();
        let stem = format!("auc-{dataset}");
        charts::lines(
            out,
            &stem,
            &format!("{dataset}: test ROC AUC per round"),
            "round",
            "ROC AUC",
            &series,
        )?;
        writeln!(md, "\n![{stem}]({stem}.png)\n")?;
    }
    Ok(())
}
