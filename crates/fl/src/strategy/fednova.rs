//! FedNova (Wang et al. 2020): each client's update normalised by its number of local steps, so
//! clients that train longer do not pull the average towards their own optimum.

use fedra_nn::Model;

use super::{AggregationScope, Strategy, check_results, weighted_mean};
use crate::client::FitResult;
use crate::error::FlError;

/// FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
/// Federated Optimization"): clients that take more local steps (more data under quantity skew)
/// move further, and FedAvg's mean is pulled towards their objectives. FedNova divides each
/// client's update by its step count a_i before averaging and rescales by the mean count:
/// `w = w_global + tau_eff * sum_i p_i (w_i - w_global) / a_i`, `p_i = n_i / n`,
/// `tau_eff = sum_i p_i a_i`. With plain SGD a_i = tau_i, the client's number of local steps;
/// with momentum rho, `a_i = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)` (the paper's
/// Section 4). The server counts the steps itself from the epochs, the batch size and the
/// client's example count (which already sets its weight p_i), so a client cannot shrink a_i to
/// amplify its update without shrinking p_i too. When every client takes the same number of
/// steps it is FedAvg. Buffers are averaged as FedAvg averages them.
pub struct FedNova {
    pub local_epochs: usize,
    pub batch_size: usize,
    pub momentum: f32,
}

impl FedNova {
    /// Local steps of a client holding `examples` that processed `examples_seen`: per epoch,
    /// its examples in batches of `batch_size`, less a last batch of one when the client skipped
    /// it (BatchNorm after a Linear layer in train mode).
    pub fn steps(&self, examples: usize, examples_seen: usize) -> usize {
        let (epochs, batch) = (self.local_epochs.max(1), self.batch_size.max(1));
        let skipped_one = examples % batch == 1
            && examples > 1
            && examples_seen == epochs.saturating_mul(examples - 1);
        let per_epoch = if skipped_one { examples - 1 } else { examples };
        epochs.saturating_mul(per_epoch.div_ceil(batch))
    }

    /// The paper's a_i for `steps` local steps.
    pub fn normaliser(&self, steps: usize) -> f64 {
        let rho = f64::from(self.momentum);
        let tau = steps as f64;
        if rho == 0.0 {
            tau
        } else {
            (tau - rho * (1.0 - rho.powf(tau)) / (1.0 - rho)) / (1.0 - rho)
        }
    }
}

impl Strategy for FedNova {
    fn name(&self) -> &'static str {
        "fednova"
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        check_results(round, global, results)?;
        let total: f64 = results.iter().map(|r| r.num_examples as f64).sum();
        let weights: Vec<(f64, f64)> = results
            .iter()
            .map(|r| {
                let p = r.num_examples as f64 / total;
                let steps = self.steps(r.num_examples, r.examples_seen);
                (p, self.normaliser(steps).max(1e-12))
            })
            .collect();
        let tau_eff: f64 = weights.iter().map(|(p, a)| p * a).sum();
        let g = global.params().to_vec();
        let w = global.params_mut();
        for i in scope.params.iter().flat_map(|r| r.clone()) {
            let step: f64 = results
                .iter()
                .zip(&weights)
                .map(|(r, (p, a))| p * (f64::from(r.params[i]) - f64::from(g[i])) / a)
                .sum();
            w[i] = (f64::from(g[i]) + tau_eff * step) as f32;
        }
        weighted_mean(
            results,
            |r| &r.buffers,
            &scope.buffers,
            global.buffers_mut(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! FedNova's step count, normaliser and aggregate worked by hand.

    use super::*;
    use crate::strategy::test_result as result;

    #[test]
    fn fednova_normalises_by_local_steps() {
        let nova = FedNova {
            local_epochs: 2,
            batch_size: 10,
            momentum: 0.0,
        };
        // 25 examples, 2 epochs: 3 batches an epoch. 21 examples of which the last batch of one
        // was skipped each epoch: 2 batches an epoch.
        assert_eq!(nova.steps(25, 50), 6);
        assert_eq!(nova.steps(21, 40), 4);
        assert_eq!(nova.steps(21, 42), 6);
        assert_eq!(nova.steps(20, 40), 4);
        // Momentum 0.5 over 3 steps: (3 - 0.5 (1 - 0.125) / 0.5) / 0.5 = 4.25.
        let heavy = FedNova {
            momentum: 0.5,
            ..nova
        };
        assert!((heavy.normaliser(3) - 4.25).abs() < 1e-12);

        let spec = fedra_nn::ModelSpec::by_name("logreg", [1, 1, 1], 2).unwrap();
        let mut global = Model::new(&spec, 0).unwrap();
        let len = global.params().len();
        global.params_mut().fill(1.0);
        let scope = AggregationScope::everything(&global);
        // Client 0: 10 examples, 2 steps (epochs 2, batch 10), moved +4. Client 1: 30 examples,
        // 6 steps, moved -12. p = (1/4, 3/4); tau_eff = 2/4 + 18/4 = 5;
        // step = 1/4 * 4/2 + 3/4 * (-12)/6 = 0.5 - 1.5 = -1; w = 1 + 5 * (-1) = -4.
        // (FedAvg: 1 + 1/4 * 4 + 3/4 * (-12) = -7.)
        let mut a = result(0, vec![5.0; len]);
        a.num_examples = 10;
        a.examples_seen = 20;
        let mut b = result(1, vec![-11.0; len]);
        b.num_examples = 30;
        b.examples_seen = 60;
        FedNova { ..nova }
            .aggregate(0, &mut global, &[a.clone(), b.clone()], &scope)
            .unwrap();
        assert!(
            global.params().iter().all(|&v| (v + 4.0).abs() < 1e-6),
            "{:?}",
            global.params()
        );
        // Equal steps: FedAvg's weighted mean.
        global.params_mut().fill(1.0);
        b.examples_seen = 20;
        b.num_examples = 10;
        FedNova { ..nova }
            .aggregate(0, &mut global, &[a, b], &scope)
            .unwrap();
        assert!(
            global.params().iter().all(|&v| (v + 3.0).abs() < 1e-6),
            "{:?}",
            global.params()
        );
    }
}
