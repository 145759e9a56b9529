//! Aggregation that tolerates bad updates: the coordinate-wise median and trimmed mean, Krum and
//! Multi-Krum (Blanchard et al. 2017), and clipping each update to a norm bound.

use std::ops::Range;

use fedra_nn::Model;

use super::{AggregationScope, Strategy, check_results};
use crate::client::FitResult;
use crate::error::FlError;

/// Byzantine-robust coordinate-wise rules (Yin et al. 2018, "Byzantine-Robust Distributed
/// Learning"): every parameter (and averaged buffer) of the new global model is, over the
/// clients' values of that coordinate, the median (`trim` = `None`) or the mean after dropping
/// the `floor(trim * K)` largest and as many smallest of the K values. Clients count equally,
/// whatever their example counts: weighting by a count the client reports would hand an attacker
/// the weight it claims.
pub struct CoordinateWise {
    pub trim: Option<f64>,
}

impl CoordinateWise {
    /// The rule applied to one coordinate's values (sorted in place).
    pub fn combine(&self, values: &mut [f32]) -> f32 {
        values.sort_unstable_by(f32::total_cmp);
        let k = values.len();
        match self.trim {
            None if k % 2 == 1 => values[k / 2],
            None => ((f64::from(values[k / 2 - 1]) + f64::from(values[k / 2])) / 2.0) as f32,
            Some(trim) => {
                let cut = ((trim * k as f64).floor() as usize).min((k - 1) / 2);
                let kept = &values[cut..k - cut];
                (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
            }
        }
    }

    fn apply(
        &self,
        results: &[FitResult],
        pick: impl Fn(&FitResult) -> &[f32],
        ranges: &[Range<usize>],
        out: &mut [f32],
    ) {
        let mut column = vec![0f32; results.len()];
        for range in ranges {
            for i in range.clone() {
                for (c, r) in column.iter_mut().zip(results) {
                    *c = pick(r)[i];
                }
                out[i] = self.combine(&mut column);
            }
        }
    }
}

impl Strategy for CoordinateWise {
    fn name(&self) -> &'static str {
        if self.trim.is_some() {
            "trimmed-mean"
        } else {
            "median"
        }
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        self.apply(results, |r| &r.params, &scope.params, global.params_mut());
        self.apply(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
/// Tolerant Gradient Descent"). Each of the n results is scored by the sum of its squared
/// Euclidean distances (over the aggregated parameters) to its n - f - 2 nearest other results,
/// f = `byzantine`; the new global model is the result of lowest score (Krum, `keep` = 1) or the
/// plain mean of the `keep` results of lowest scores (multi-Krum), ties going to the lower
/// client id. Like the coordinate-wise rules, example counts do not weigh: a count is what a
/// client claims.
pub struct Krum {
    pub byzantine: usize,
    pub keep: usize,
}

/// Krum scores of `n` points whose squared distances `dist2(i, j)` are given, with `byzantine`
/// = f: point i's score sums its n - f - 2 smallest squared distances to the others.
pub fn krum_scores(n: usize, byzantine: usize, dist2: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let neighbours = n.saturating_sub(byzantine + 2);
    let mut table = vec![0f64; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d = dist2(i, j);
            table[i * n + j] = d;
            table[j * n + i] = d;
        }
    }
    (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| table[i * n + j])
                .collect();
            others.sort_unstable_by(f64::total_cmp);
            others[..neighbours.min(others.len())].iter().sum()
        })
        .collect()
}

/// The plain (unweighted) mean of `chosen`'s values over `ranges`, accumulated in f64.
fn plain_mean(
    chosen: &[&FitResult],
    pick: impl Fn(&FitResult) -> &[f32],
    ranges: &[Range<usize>],
    out: &mut [f32],
) {
    let k = chosen.len() as f64;
    for range in ranges {
        for i in range.clone() {
            let sum: f64 = chosen.iter().map(|r| f64::from(pick(r)[i])).sum();
            out[i] = (sum / k) as f32;
        }
    }
}

impl Strategy for Krum {
    fn name(&self) -> &'static str {
        "krum"
    }

    fn min_results(&self) -> usize {
        let f = self.byzantine;
        f.saturating_mul(2)
            .saturating_add(3)
            .max(self.keep.saturating_add(f))
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let n = results.len();
        let f = self.byzantine;
        // Krum's guarantee needs n >= 2f + 3, and multi-Krum may keep at most n - f (fewer
        // than all the honest results it can count on).
        let needed = self.min_results();
        if n < needed {
            return Err(FlError::State(format!(
                "round {round}: krum with byzantine = {f} and keep = {} needs at least {needed} \
                 results, and the round has {n}",
                self.keep
            )));
        }
        let scores = krum_scores(n, f, |i, j| {
            let (a, b) = (&results[i].params, &results[j].params);
            scope
                .params
                .iter()
                .flat_map(|r| r.clone())
                .map(|k| {
                    let d = f64::from(a[k]) - f64::from(b[k]);
                    d * d
                })
                .sum()
        });
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            scores[a]
                .total_cmp(&scores[b])
                .then(results[a].client.cmp(&results[b].client))
        });
        let chosen: Vec<&FitResult> = order[..self.keep].iter().map(|&i| &results[i]).collect();
        tracing::info!(
            round,
            "krum kept client(s) {:?}",
            chosen.iter().map(|r| r.client).collect::<Vec<_>>()
        );
        plain_mean(&chosen, |r| &r.params, &scope.params, global.params_mut());
        plain_mean(
            &chosen,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

/// Scale `params`' update against `global` (over `ranges`) down to L2 norm `max_norm` when it is
/// longer: `w = g + (w - g) * max_norm / ||w - g||`. Returns the update's norm before clipping.
pub fn clip_update(
    global: &[f32],
    params: &mut [f32],
    ranges: &[Range<usize>],
    max_norm: f32,
) -> f64 {
    let norm = ranges
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| {
            let d = f64::from(params[i]) - f64::from(global[i]);
            d * d
        })
        .sum::<f64>()
        .sqrt();
    let max = f64::from(max_norm);
    if norm > max {
        let scale = max / norm;
        for i in ranges.iter().flat_map(|r| r.clone()) {
            let g = f64::from(global[i]);
            params[i] = (g + (f64::from(params[i]) - g) * scale) as f32;
        }
    }
    norm
}

#[cfg(test)]
mod robust_tests {
    //! Krum and update clipping against numbers worked by hand from their definitions.

    use super::*;
    use crate::strategy::test_result as result;

    #[test]
    fn krum_scores_by_hand() {
        // Points 0, 1, 2, 10, 100 on a line, f = 1: each score sums the n - f - 2 = 2 smallest
        // squared distances. 0: {1, 4, 100, 10000} -> 5; 1: {1, 1, 81, 9801} -> 2;
        // 2: {4, 1, 64, 9604} -> 5; 10: {100, 81, 64, 8100} -> 145;
        // 100: {10000, 9801, 9604, 8100} -> 17704.
        let x = [0f64, 1.0, 2.0, 10.0, 100.0];
        let scores = krum_scores(5, 1, |i, j| (x[i] - x[j]).powi(2));
        assert_eq!(scores, [5.0, 2.0, 5.0, 145.0, 17704.0]);
    }

    #[test]
    fn krum_keeps_the_best_scored_and_multi_krum_averages_them_plainly() {
        let spec = fedra_nn::ModelSpec::by_name("logreg", [1, 1, 1], 2).unwrap();
        let mut global = Model::new(&spec, 0).unwrap();
        let len = global.params().len();
        // Every coordinate of client k is x_k (the line above); the attacker (100) is far off.
        let x = [0f32, 1.0, 2.0, 10.0, 100.0];
        let results: Vec<FitResult> = x
            .iter()
            .enumerate()
            .map(|(k, &v)| result(k, vec![v; len]))
            .collect();
        let scope = AggregationScope::everything(&global);
        let mut krum = Krum {
            byzantine: 1,
            keep: 1,
        };
        krum.aggregate(0, &mut global, &results, &scope).unwrap();
        assert!(global.params().iter().all(|&v| v == 1.0));
        // keep 3: clients 1 (score 2), then 0 and 2 (5 each, lower id first): their plain mean
        // is 1, whatever their example counts (100, 200, 300).
        let mut multi = Krum {
            byzantine: 1,
            keep: 3,
        };
        multi.aggregate(0, &mut global, &results, &scope).unwrap();
        assert!(global.params().iter().all(|&v| v == 1.0));
        let mut four = Krum {
            byzantine: 1,
            keep: 4,
        };
        four.aggregate(0, &mut global, &results, &scope).unwrap();
        // Clients 1, 0, 2 and 3 (score 145): (1 + 0 + 2 + 10) / 4.
        assert!(global.params().iter().all(|&v| v == 3.25));
        // Too few results for f = 2 (2f + 3 = 7).
        let mut strict = Krum {
            byzantine: 2,
            keep: 1,
        };
        let e = strict
            .aggregate(3, &mut global, &results, &scope)
            .unwrap_err()
            .to_string();
        assert!(e.contains("round 3") && e.contains("at least 7"), "{e}");
    }

    #[test]
    fn clipping_scales_long_updates_to_the_bound_and_leaves_short_ones() {
        // Update (3, 4) from the origin has norm 5; clipped to 1 it is (0.6, 0.8).
        let global = [1.0f32, 1.0, 7.0];
        let first_two: Vec<Range<usize>> = std::iter::once(0..2).collect();
        let mut w = [4.0f32, 5.0, 9.0];
        let norm = clip_update(&global, &mut w, &first_two, 1.0);
        assert_eq!(norm, 5.0);
        assert!(
            (w[0] - 1.6).abs() < 1e-6 && (w[1] - 1.8).abs() < 1e-6,
            "{w:?}"
        );
        // Outside the ranges nothing changes.
        assert_eq!(w[2], 9.0);
        let mut short = [1.3f32, 1.4, 0.0];
        let before = short;
        assert!((clip_update(&global, &mut short, &first_two, 1.0) - 0.5).abs() < 1e-6);
        assert_eq!(short, before);
    }
}
