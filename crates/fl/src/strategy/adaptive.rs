//! Server optimisers: the mean client update as a pseudo-gradient for momentum (FedAvgM, Hsu
//! et al. 2019) or Adam, Yogi and Adagrad (FedAdam and its kin, Reddi et al. 2021).

use fedra_nn::Model;

use super::{
    AggregationScope, Strategy, apply_server_step, ensure_len, mean_update, restore_vectors,
    scope_len,
};
use crate::client::FitResult;
use crate::error::FlError;

/// FedAvgM (Hsu et al. 2019): server momentum on the averaged update.
pub struct FedAvgM {
    pub server_lr: f32,
    pub momentum: f32,
    pub(super) velocity: Vec<f32>,
}

impl Strategy for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        let delta = mean_update(round, global, results, scope)?;
        ensure_len("fedavgm", "velocity", &mut self.velocity, scope_len(scope))?;
        for (v, d) in self.velocity.iter_mut().zip(&delta) {
            *v = self.momentum * *v + d;
        }
        let change: Vec<f32> = self.velocity.iter().map(|v| self.server_lr * v).collect();
        apply_server_step(global, scope, &change);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![("velocity".into(), self.velocity.clone())]
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        restore_vectors(
            "fedavgm",
            state,
            &mut [("velocity", &mut self.velocity)],
            scope_len(scope),
        )
    }
}

/// How an adaptive server optimiser updates its second moment v from the mean update d
/// (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondMoment {
    /// FedAdam: v = beta2 v + (1 - beta2) d^2.
    Adam,
    /// FedYogi: v = v - (1 - beta2) d^2 sign(v - d^2).
    Yogi,
    /// FedAdagrad: v = v + d^2.
    Adagrad,
}

/// FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021): an adaptive optimiser on the server over
/// the averaged update d, with m = beta1 m + (1 - beta1) d, the second moment by `rule`, and the
/// step server_lr * m / (sqrt(v) + tau). No bias correction, as in the paper.
pub struct FedAdam {
    pub rule: SecondMoment,
    pub server_lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    pub(super) m: Vec<f32>,
    pub(super) v: Vec<f32>,
}

impl FedAdam {
    /// A fresh optimiser (zero moments).
    pub fn new(rule: SecondMoment, server_lr: f32, beta1: f32, beta2: f32, tau: f32) -> FedAdam {
        FedAdam {
            rule,
            server_lr,
            beta1,
            beta2,
            tau,
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl Strategy for FedAdam {
    fn name(&self) -> &'static str {
        match self.rule {
            SecondMoment::Adam => "fedadam",
            SecondMoment::Yogi => "fedyogi",
            SecondMoment::Adagrad => "fedadagrad",
        }
    }

    fn aggregate(
        &mut self,
        round: usize,
        global: &mut Model,
        results: &[FitResult],
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        let delta = mean_update(round, global, results, scope)?;
        let n = scope_len(scope);
        let name = self.name();
        ensure_len(name, "m", &mut self.m, n)?;
        ensure_len(name, "v", &mut self.v, n)?;
        let mut change = vec![0f32; n];
        for j in 0..n {
            let d = delta[j];
            let d2 = d * d;
            self.m[j] = self.beta1 * self.m[j] + (1.0 - self.beta1) * d;
            let v = self.v[j];
            self.v[j] = match self.rule {
                SecondMoment::Adam => self.beta2 * v + (1.0 - self.beta2) * d2,
                SecondMoment::Yogi => {
                    // sign(0) = 0: v stays where it is when it equals d^2.
                    let sign = if v > d2 {
                        1.0
                    } else if v < d2 {
                        -1.0
                    } else {
                        0.0
                    };
                    v - (1.0 - self.beta2) * d2 * sign
                }
                SecondMoment::Adagrad => v + d2,
            };
            change[j] = self.server_lr * self.m[j] / (self.v[j].sqrt() + self.tau);
        }
        apply_server_step(global, scope, &change);
        Ok(())
    }

    fn state(&self) -> Vec<(String, Vec<f32>)> {
        vec![("m".into(), self.m.clone()), ("v".into(), self.v.clone())]
    }

    fn restore(
        &mut self,
        state: Vec<(String, Vec<f32>)>,
        scope: &AggregationScope,
    ) -> Result<(), FlError> {
        restore_vectors(
            self.name(),
            state,
            &mut [("m", &mut self.m), ("v", &mut self.v)],
            scope_len(scope),
        )
    }
}
