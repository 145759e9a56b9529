//! The sections that set a sweep beside the study's figures: weight divergence per layer
//! (Figure 2), accuracy against EMD (Table 2) and data sharing (Figures 6-7).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::runs::{Row, RunInfo};
use super::{converged_at, emd_target, pct};
use crate::{charts, paper};

pub(super) fn write_divergence(
    md: &mut String,
    runs: &[RunInfo],
    out: &Path,
) -> anyhow::Result<()> {
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
        .filter(|s| converged_at(s.rows).is_some())
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

pub(super) fn write_emd_sweep(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
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

pub(super) fn write_sharing(md: &mut String, runs: &[RunInfo], out: &Path) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::super::runs::Row;
    use super::{SeedRun, seed_cells};

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
}
