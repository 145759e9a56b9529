//! `emd:TARGET[:M]`: the study's EMD sweep. One class distribution P is drawn, client j gets P
//! cyclically shifted by j classes, and the mean EMD of the clients against the population
//! distribution p equals TARGET.
//!
//! Construction. Draw a random shape D ~ Dir(1, ..., 1) over the classes and let c be its
//! largest class. Peaked shapes Q(t) = (1 - t) D + t e_c run from D to the one-hot e_c. Client
//! j's distribution is `P_j = (1 - w) p + w shift_j(Q)`, so `P_j - p = w (shift_j(Q) - p)` and
//! `EMD(P_j, p) = w * EMD(shift_j(Q), p)`: the EMD is linear in the mixing weight w. With
//! `reach(Q)` the mean of `EMD(shift_j(Q), p)` over the clients, `w = TARGET / reach(Q)` hits
//! the target exactly. Q = D when `reach(D) >= TARGET`; otherwise t is found by bisection so
//! that `reach(Q(t)) = TARGET` with w = 1 (reach is convex in t, below the target at 0 and at
//! or above it at 1). When even the one-hot on c falls short, the one-hot class with the largest
//! reach is used; if that falls short too, the target is above what these labels allow and the
//! error says the maximum.
//!
//! With 10 balanced classes p is uniform, so `P_j` is exactly P = (1 - w) u + w Q shifted by j
//! classes, as in the study; TARGET = 1.8 gives one class per client and TARGET = 0 gives every
//! client the population distribution. Randomness (the seed) is in D: which classes are peaked
//! and by how much. The counts of client j are `M * P_j` rounded to whole examples summing to M
//! (largest remainder), which moves the achieved EMD by O(classes / M) from the target.

use rand_chacha::ChaCha8Rng;

use super::skew::dirichlet_draw;
use super::{PartitionError, Scheme, draw_counts};

fn emd(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum()
}

/// `q` shifted cyclically by `j` classes: the mass of class i moves to class i + j.
fn shifted(q: &[f64], j: usize) -> Vec<f64> {
    let c = q.len();
    (0..c).map(|i| q[(i + c - j % c) % c]).collect()
}

/// Mean EMD of the shifted copies of `q` against `p`, over `clients` clients.
fn reach(q: &[f64], p: &[f64], clients: usize) -> f64 {
    (0..clients).map(|j| emd(&shifted(q, j), p)).sum::<f64>() / clients as f64
}

fn mix(a: &[f64], b: &[f64], t: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| (1.0 - t) * x + t * y)
        .collect()
}

fn one_hot(c: usize, classes: usize) -> Vec<f64> {
    let mut v = vec![0.0; classes];
    v[c] = 1.0;
    v
}

/// Non-negative integers summing to `total`, proportional to `values` (which sum to ~1):
/// floors first, then the largest remainders (ties to the lower class).
fn round_to_sum(values: &[f64], total: usize) -> Vec<usize> {
    let scaled: Vec<f64> = values.iter().map(|v| v.max(0.0) * total as f64).collect();
    let mut out: Vec<usize> = scaled.iter().map(|s| s.floor() as usize).collect();
    while out.iter().sum::<usize>() > total {
        let j = (0..out.len()).max_by_key(|&j| out[j]).unwrap_or(0);
        out[j] -= 1;
    }
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = scaled[a] - scaled[a].floor();
        let rb = scaled[b] - scaled[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut left = total - out.iter().sum::<usize>();
    for &j in order.iter().cycle() {
        if left == 0 {
            break;
        }
        out[j] += 1;
        left -= 1;
    }
    out
}

/// The class distribution of every client (before rounding to whole examples).
fn client_distributions(
    p: &[f64],
    clients: usize,
    target: f64,
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<f64>>, PartitionError> {
    let classes = p.len();
    let d = dirichlet_draw(1.0, classes, rng);
    let peak = (0..classes)
        .max_by(|&a, &b| d[a].total_cmp(&d[b]).then(b.cmp(&a)))
        .unwrap_or(0);
    // Floating-point slack: the one-hot of 10 balanced classes has reach 1.8 up to rounding.
    const SLACK: f64 = 1e-9;
    let (q, w) = if reach(&d, p, clients) >= target {
        let r = reach(&d, p, clients);
        (d, if r > 0.0 { target / r } else { 0.0 })
    } else {
        let mut c = peak;
        if reach(&one_hot(c, classes), p, clients) < target - SLACK {
            let best = (0..classes)
                .max_by(|&a, &b| {
                    reach(&one_hot(a, classes), p, clients)
                        .total_cmp(&reach(&one_hot(b, classes), p, clients))
                        .then(b.cmp(&a))
                })
                .unwrap_or(0);
            let best_reach = reach(&one_hot(best, classes), p, clients);
            if best_reach < target - SLACK {
                return Err(PartitionError::infeasible(
                    scheme,
                    format!(
                        "the largest mean EMD these labels allow with {clients} clients is {best_reach:.4}"
                    ),
                ));
            }
            c = best;
        }
        let hot = one_hot(c, classes);
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if reach(&mix(&d, &hot, mid), p, clients) >= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let q = mix(&d, &hot, hi);
        let r = reach(&q, p, clients);
        (q, (target / r).min(1.0))
    };
    Ok((0..clients).map(|j| mix(p, &shifted(&q, j), w)).collect())
}

pub(super) fn target_emd(
    labels: &[u16],
    num_classes: usize,
    clients: usize,
    target: f64,
    per_client: Option<usize>,
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut class_sizes = vec![0usize; num_classes];
    for &l in labels {
        class_sizes[l as usize] += 1;
    }
    let n = labels.len() as f64;
    let p: Vec<f64> = class_sizes.iter().map(|&s| s as f64 / n).collect();
    let dists = client_distributions(&p, clients, target, scheme, rng)?;
    let counts_for =
        |m: usize| -> Vec<Vec<usize>> { dists.iter().map(|d| round_to_sum(d, m)).collect() };
    let overdrawn = |counts: &[Vec<usize>]| -> Option<(usize, usize)> {
        (0..num_classes)
            .map(|c| (c, counts.iter().map(|row| row[c]).sum::<usize>()))
            .find(|&(c, asked)| asked > class_sizes[c])
    };
    let counts = match per_client {
        Some(m) if m > labels.len() => {
            return Err(PartitionError::infeasible(
                scheme,
                format!(
                    "M = {m} examples per client, more than the {} there are",
                    labels.len()
                ),
            ));
        }
        Some(m) => {
            let counts = counts_for(m);
            if let Some((c, asked)) = overdrawn(&counts) {
                return Err(PartitionError::infeasible(
                    scheme,
                    format!(
                        "{clients} clients x {m} examples ask for {asked} examples of class {c} but only {} exist; lower M or leave it out to use the largest M that fits",
                        class_sizes[c]
                    ),
                ));
            }
            counts
        }
        None => {
            // The largest M before rounding; rounding can overdraw a class by up to one example
            // per client, so step down until nothing is overdrawn.
            let demand: Vec<f64> = (0..num_classes)
                .map(|c| dists.iter().map(|d| d[c]).sum())
                .collect();
            let mut m = (0..num_classes)
                .filter(|&c| demand[c] > 1e-12)
                .map(|c| (class_sizes[c] as f64 / demand[c]).floor() as usize)
                .min()
                .unwrap_or(0)
                .min(labels.len() / clients);
            loop {
                if m == 0 {
                    return Err(PartitionError::infeasible(
                        scheme,
                        format!(
                            "not even one example per client fits the requested class distributions with {clients} clients"
                        ),
                    ));
                }
                let counts = counts_for(m);
                if overdrawn(&counts).is_none() {
                    break counts;
                }
                m -= 1;
            }
        }
    };
    let lists = draw_counts(labels, num_classes, &counts, scheme, rng)?;
    let achieved = counts
        .iter()
        .map(|row| {
            let m: usize = row.iter().sum();
            let q: Vec<f64> = row.iter().map(|&c| c as f64 / m as f64).collect();
            emd(&q, &p)
        })
        .sum::<f64>()
        / clients as f64;
    tracing::info!(
        scheme = %scheme,
        target,
        achieved,
        per_client = counts[0].iter().sum::<usize>(),
        "target-EMD partition"
    );
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_moves_mass_up_by_j() {
        assert_eq!(shifted(&[1.0, 0.0, 0.0], 1), vec![0.0, 1.0, 0.0]);
        assert_eq!(shifted(&[1.0, 0.0, 0.0], 5), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn round_to_sum_keeps_the_total() {
        assert_eq!(round_to_sum(&[0.5, 0.25, 0.25], 10), vec![5, 3, 2]);
        assert_eq!(round_to_sum(&[1.0 / 3.0; 3], 10).iter().sum::<usize>(), 10);
    }
}
