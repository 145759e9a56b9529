//! Label statistics of a partition: per-client class counts and class distributions, and the
//! study's earth mover's distance `EMD_k = sum_i |p_k(y=i) - p(y=i)|` between client k's label
//! distribution and the whole training set's. (For 10 balanced classes it runs from 0 for IID
//! clients to 1.8 for one-class clients; a balanced two-class client has 1.6.) Over clients the
//! mean is weighted by client size, as in the study.
//!
//! [`PartitionStats`] is what `fedra partition --json` and a run's `partition.json` hold.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::partition::Partition;

/// How many of `indices` carry each label `0..num_classes`.
///
/// # Panics
/// If an index is out of range or a label is `>= num_classes` (a caller bug: [`crate::partition::partition`]
/// checks both).
pub fn class_counts(labels: &[u16], indices: &[usize], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0usize; num_classes];
    for &i in indices {
        counts[labels[i] as usize] += 1;
    }
    counts
}

/// Counts as proportions summing to 1 (all zeros when every count is zero).
pub fn distribution(counts: &[usize]) -> Vec<f64> {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return vec![0.0; counts.len()];
    }
    counts.iter().map(|&c| c as f64 / total as f64).collect()
}

/// The study's EMD between two class distributions: `sum_i |p_i - q_i|`. A class missing from
/// the shorter slice counts as probability 0.
pub fn emd(p: &[f64], q: &[f64]) -> f64 {
    let len = p.len().max(q.len());
    (0..len)
        .map(|i| (p.get(i).copied().unwrap_or(0.0) - q.get(i).copied().unwrap_or(0.0)).abs())
        .sum()
}

/// One client's label statistics.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ClientStats {
    pub id: usize,
    pub size: usize,
    pub class_counts: Vec<usize>,
    /// EMD of this client's label distribution against the whole training set's.
    pub emd: f64,
}

/// The label statistics of a whole partition.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PartitionStats {
    pub scheme: String,
    pub seed: u64,
    pub clients: Vec<ClientStats>,
    /// Client-size-weighted mean EMD (0 when no client holds an example).
    pub mean_emd: f64,
    /// Smallest client EMD (0 when there are no clients).
    pub min_emd: f64,
    /// Largest client EMD (0 when there are no clients).
    pub max_emd: f64,
}

/// Statistics of `partition`, whose indices point into `labels` (the whole training set, whose
/// label distribution is the reference of every EMD).
///
/// # Panics
/// If the partition holds an index out of range of `labels` or a label `>= num_classes` (it
/// was then not made from these labels).
pub fn partition_stats(labels: &[u16], partition: &Partition) -> PartitionStats {
    let k = partition.num_classes;
    let all: Vec<usize> = (0..labels.len()).collect();
    let population = distribution(&class_counts(labels, &all, k));
    let clients: Vec<ClientStats> = partition
        .clients
        .iter()
        .enumerate()
        .map(|(id, indices)| {
            let counts = class_counts(labels, indices, k);
            ClientStats {
                id,
                size: indices.len(),
                emd: emd(&distribution(&counts), &population),
                class_counts: counts,
            }
        })
        .collect();
    let total: usize = clients.iter().map(|c| c.size).sum();
    let mean_emd = if total == 0 {
        0.0
    } else {
        clients.iter().map(|c| c.emd * c.size as f64).sum::<f64>() / total as f64
    };
    let emds = clients.iter().map(|c| c.emd);
    let (min_emd, max_emd) = if clients.is_empty() {
        (0.0, 0.0)
    } else {
        (
            emds.clone().fold(f64::INFINITY, f64::min),
            emds.fold(f64::NEG_INFINITY, f64::max),
        )
    };
    PartitionStats {
        scheme: partition.scheme.clone(),
        seed: partition.seed,
        clients,
        mean_emd,
        min_emd,
        max_emd,
    }
}

impl PartitionStats {
    /// Number of classes (the length of the clients' count vectors).
    pub fn num_classes(&self) -> usize {
        self.clients.first().map_or(0, |c| c.class_counts.len())
    }

    /// The readable client x class table: one row per client with its size, its count of every
    /// class (`.` for none) and its EMD, then a row of totals and the EMD summary. Columns are
    /// headed by `class_names` when there is one name per class, else by the class numbers.
    pub fn to_table(&self, class_names: &[String]) -> String {
        let k = self.num_classes();
        let headers: Vec<String> = if class_names.len() == k {
            class_names.to_vec()
        } else {
            (0..k).map(|c| c.to_string()).collect()
        };
        let totals: Vec<usize> = (0..k)
            .map(|c| self.clients.iter().map(|cl| cl.class_counts[c]).sum())
            .collect();
        let total_size: usize = self.clients.iter().map(|c| c.size).sum();
        let count_width = totals
            .iter()
            .map(|t| t.to_string().len())
            .max()
            .unwrap_or(1);
        let width: Vec<usize> = headers
            .iter()
            .map(|h| h.chars().count().max(count_width))
            .collect();
        let size_width = total_size.to_string().len().max(4);
        let id_width = "client".len().max(self.clients.len().to_string().len());
        let mut out = String::new();
        let _ = write!(out, "{:>id_width$}  {:>size_width$} |", "client", "size");
        for (h, w) in headers.iter().zip(&width) {
            let _ = write!(out, " {h:>w$}");
        }
        let _ = writeln!(out, " |    EMD");
        let rule_len = out.trim_end().chars().count();
        let rule = "-".repeat(rule_len);
        let _ = writeln!(out, "{rule}");
        for c in &self.clients {
            let _ = write!(out, "{:>id_width$}  {:>size_width$} |", c.id, c.size);
            for (count, w) in c.class_counts.iter().zip(&width) {
                if *count == 0 {
                    let _ = write!(out, " {:>w$}", ".");
                } else {
                    let _ = write!(out, " {count:>w$}");
                }
            }
            let _ = writeln!(out, " | {:>6.4}", c.emd);
        }
        let _ = writeln!(out, "{rule}");
        let _ = write!(out, "{:>id_width$}  {:>size_width$} |", "all", total_size);
        for (t, w) in totals.iter().zip(&width) {
            let _ = write!(out, " {t:>w$}");
        }
        let _ = writeln!(out, " |");
        let _ = writeln!(
            out,
            "scheme {}, seed {}, {} clients: mean EMD {:.4} (weighted by client size), min {:.4}, max {:.4}",
            self.scheme,
            self.seed,
            self.clients.len(),
            self.mean_emd,
            self.min_emd,
            self.max_emd
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emd_of_one_class_against_ten_balanced_is_1_8() {
        let uniform = vec![0.1; 10];
        let mut one = vec![0.0; 10];
        one[3] = 1.0;
        assert!((emd(&one, &uniform) - 1.8).abs() < 1e-12);
        let mut two = vec![0.0; 10];
        two[1] = 0.5;
        two[7] = 0.5;
        assert!((emd(&two, &uniform) - 1.6).abs() < 1e-12);
        assert_eq!(emd(&[0.5, 0.5], &[0.5, 0.5, 0.0]), 0.0);
    }

    #[test]
    fn stats_weight_the_mean_by_size_and_table_shows_every_client() {
        // Labels 0,0,0,1: client 0 holds the three zeros, client 1 the one.
        let labels = [0u16, 0, 0, 1];
        let partition = Partition {
            scheme: "matrix:[[3,0],[0,1]]".into(),
            seed: 7,
            num_classes: 2,
            clients: vec![vec![0, 1, 2], vec![3]],
        };
        let s = partition_stats(&labels, &partition);
        assert_eq!(s.clients[0].class_counts, vec![3, 0]);
        assert!((s.clients[0].emd - 0.5).abs() < 1e-12);
        assert!((s.clients[1].emd - 1.5).abs() < 1e-12);
        assert!((s.mean_emd - (3.0 * 0.5 + 1.5) / 4.0).abs() < 1e-12);
        assert_eq!((s.min_emd, s.max_emd), (0.5, 1.5));
        let table = s.to_table(&["zero".into(), "one".into()]);
        assert!(table.contains("zero") && table.contains("one"), "{table}");
        assert_eq!(table.lines().count(), 2 + 2 + 2 + 1, "{table}");
        assert!(table.contains("mean EMD 0.7500"), "{table}");
    }
}
