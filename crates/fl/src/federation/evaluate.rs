//! Evaluating the global model after a round: on the clients' own test data when the executor's
//! clients evaluate, else on the run's test set (with FedBN, the mean over the clients of the
//! global weights with each client's own normalisation layers), with the SGD twin's accuracy and
//! the weight divergence to it.

use fedra_data::TrainTest;
use fedra_nn::{ClinicalMetrics, Model, Trainer, clinical_metrics};

use super::{Executor, Federation, RoundMetrics, scatter};
use crate::divergence::weight_divergence;
use crate::error::FlError;
use crate::privacy::epsilon;

impl Federation {
    pub(super) fn with_local_state(&self, client: usize) -> Model {
        let mut model = self.global.clone();
        if let Some(state) = self.local.get(&client) {
            scatter(&state.params, &self.local_params, model.params_mut());
            scatter(&state.buffers, &self.local_buffers, model.buffers_mut());
        }
        model
    }

    /// Evaluate the initial model (round 0) if it has not been.
    pub fn evaluate_initial(
        &mut self,
        data: &TrainTest,
        executor: &dyn Executor,
    ) -> Result<(), FlError> {
        if self.history.is_empty() && self.rounds_done == 0 {
            let row = self.evaluate(data, executor, None)?;
            self.history.push(row);
        }
        Ok(())
    }

    pub(super) fn eval_trainer(&self) -> Result<Trainer, FlError> {
        super::eval_trainer(&self.spec, self.threads)
    }

    pub(super) fn evaluate(
        &self,
        data: &TrainTest,
        executor: &dyn Executor,
        train_loss: Option<f64>,
    ) -> Result<RoundMetrics, FlError> {
        let mut trainer = self.eval_trainer()?;
        let test = &data.test;
        let classes = self.spec.classes;
        let federated = executor.evaluate(self.rounds_done, &|c| self.with_local_state(c))?;
        let (test_accuracy, test_loss, clinical) = if let Some(counts) = federated {
            (counts.accuracy(), counts.mean_loss(), counts.clinical())
        } else if self.local_params.is_empty() && self.local_buffers.is_empty()
            || self.local.is_empty()
        {
            let (stats, probs) =
                trainer.evaluate_with_probs(&self.global, &test.features, &test.labels)?;
            let clinical = clinical_metrics(&probs, &test.labels, classes);
            (stats.accuracy(), stats.mean_loss(), clinical)
        } else {
            // FedBN: no global normalisation layers exist; report the mean over the clients of
            // the global weights combined with each client's own normalisation layers.
            let (mut acc, mut loss, mut each) = (0f64, 0f64, Vec::new());
            for &client in self.local.keys() {
                let model = self.with_local_state(client);
                let (stats, probs) =
                    trainer.evaluate_with_probs(&model, &test.features, &test.labels)?;
                acc += stats.accuracy();
                loss += stats.mean_loss();
                each.push(clinical_metrics(&probs, &test.labels, classes));
            }
            let n = self.local.len() as f64;
            (acc / n, loss / n, mean_clinical(&each))
        };
        let (sgd_test_accuracy, divergence) = match &self.twin {
            Some(twin) => {
                let stats = trainer.evaluate(twin, &test.features, &test.labels)?;
                (
                    Some(stats.accuracy()),
                    weight_divergence(&self.global, twin),
                )
            }
            None => (None, Vec::new()),
        };
        Ok(RoundMetrics {
            round: self.rounds_done,
            lr: self.config.lr_at(self.rounds_done.saturating_sub(1)),
            test_accuracy,
            test_loss,
            train_loss,
            seconds: 0.0,
            examples: 0,
            sgd_test_accuracy,
            divergence,
            clinical,
            epsilon: self.config.privacy.as_ref().map(|p| {
                let q = self.config.train.fraction;
                epsilon(q, f64::from(p.noise_multiplier), self.rounds_done, p.delta).0
            }),
            bn_spread: None,
            bytes_sent: self.traffic.sent,
            bytes_received: self.traffic.received,
        })
    }
}

/// The mean of several evaluations' clinical metrics, value by value (`None` where any is).
fn mean_clinical(each: &[ClinicalMetrics]) -> ClinicalMetrics {
    let mean = |values: Vec<Option<f64>>| -> Option<f64> {
        let n = values.len() as f64;
        values
            .into_iter()
            .sum::<Option<f64>>()
            .filter(|_| n > 0.0)
            .map(|s| s / n)
    };
    let per_class = |get: fn(&ClinicalMetrics) -> &Vec<Option<f64>>| -> Vec<Option<f64>> {
        let classes = each.first().map_or(0, |m| get(m).len());
        (0..classes)
            .map(|c| mean(each.iter().map(|m| get(m)[c]).collect()))
            .collect()
    };
    ClinicalMetrics {
        auc: mean(each.iter().map(|m| m.auc).collect()),
        balanced_accuracy: mean(each.iter().map(|m| m.balanced_accuracy).collect()),
        sensitivity: per_class(|m| &m.sensitivity),
        specificity: per_class(|m| &m.specificity),
    }
}
