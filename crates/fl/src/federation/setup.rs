//! Setting a run up: the partition (with data sharing, the clients' share of the global set),
//! the initial model (built, or read from `model.init`), the frozen tensors, the strategy and,
//! with data sharing, the warm-up on the global set.

use std::collections::BTreeMap;
use std::ops::Range;

use fedra_data::TrainTest;
use fedra_data::partition::{Partition, Scheme, partition};
use fedra_nn::{BnPolicy, Model, SgdConfig, TensorKind};

use super::select::match_patterns_somewhere;
use super::{
    Federation, FitJob, Traffic, WARMUP_ROUND, aggregated_params, compile_patterns, frozen_ranges,
    frozen_statistics, model_spec, run_job,
};
use crate::client::{CENTRAL_ID, FitConfig};
use crate::config::ExperimentConfig;
use crate::error::FlError;
use crate::strategy::{AggregationScope, from_config};

impl Federation {
    /// Set up a run: partition the training set, build (or load, from `model.init`) the initial
    /// model and, with data sharing, warm it up on the global set.
    pub fn new(
        config: ExperimentConfig,
        data: &TrainTest,
        threads: usize,
    ) -> Result<Self, FlError> {
        Self::build(config, data, threads, None)
    }

    /// Set up a run whose global model is already known, as when resuming from a checkpoint:
    /// the partition is built as [`Federation::new`] builds it, but `model.init` is not read and
    /// the data-sharing warm-up does not run. The SGD twin, if any, starts as a copy of `global`
    /// (a checkpoint then restores its own).
    pub fn with_global(
        config: ExperimentConfig,
        data: &TrainTest,
        threads: usize,
        global: Model,
    ) -> Result<Self, FlError> {
        Self::build(config, data, threads, Some(global))
    }

    fn build(
        config: ExperimentConfig,
        data: &TrainTest,
        threads: usize,
        given: Option<Model>,
    ) -> Result<Self, FlError> {
        let spec = model_spec(&config, &data.train)?;
        if let Some(model) = &given
            && model.spec() != &spec
        {
            return Err(FlError::State(format!(
                "the given global model is a {}, the configuration's model is {}",
                model.spec().name,
                spec.name
            )));
        }
        let warm_up = given.is_none();
        let scheme: Scheme = config.partition.scheme.parse()?;
        let labels = &data.train.labels;
        let classes = data.train.num_classes();
        let seed = config.run.seed;
        let mut global = match (given, &config.model.init) {
            (Some(model), _) => model,
            (None, Some(path)) if !config.model.reset.is_empty() => {
                let reset = compile_patterns(&config.model.reset)
                    .map_err(|(p, e)| FlError::State(format!("model.reset {p:?}: {e}")))?;
                let fresh = Model::initialised(&spec, seed, config.model.weight_init)?;
                match_patterns_somewhere(&reset, &fresh, "model.reset", false)?;
                Model::load_safetensors_keeping(path, fresh, &|name| {
                    reset.iter().any(|p| p.matches(name))
                })?
            }
            (None, Some(path)) => Model::load_safetensors(&spec, path)?,
            (None, None) => Model::initialised(&spec, seed, config.model.weight_init)?,
        };
        let frozen = frozen_ranges(&global, &config.model.freeze)?;
        let frozen_statistics = frozen_statistics(&global, &config.model.freeze_statistics)?;
        let dataless = data.train.is_empty();
        if dataless {
            // A server whose clients hold all the data (`deploy.evaluate = "clients"`): it
            // aggregates and never trains, so it needs the dataset's shape but no examples.
            let needs = if config.share.is_some() {
                Some("data sharing ([share]) mixes a global set into the clients' data")
            } else if config.eval.sgd_twin {
                Some("eval.sgd_twin trains a centralised twin on the pooled data")
            } else if config.strategy.name == "sgd" {
                Some("strategy \"sgd\" trains centrally on the pooled data")
            } else {
                None
            };
            if let Some(why) = needs {
                return Err(FlError::State(format!(
                    "{why}: it needs the training set, and this run has none"
                )));
            }
        }
        let (partition, before_share) = match &config.share {
            None if dataless => (
                Partition {
                    scheme: scheme.to_string(),
                    seed,
                    num_classes: classes,
                    clients: vec![Vec::new(); config.partition.clients],
                },
                None,
            ),
            None => (
                partition(labels, classes, config.partition.clients, &scheme, seed)?,
                None,
            ),
            Some(share) => {
                let split = share.split(labels, classes, seed)?;
                let pool_labels: Vec<u16> = split.client_pool.iter().map(|&i| labels[i]).collect();
                let mut own = partition(
                    &pool_labels,
                    classes,
                    config.partition.clients,
                    &scheme,
                    seed,
                )?;
                for client in &mut own.clients {
                    for i in client.iter_mut() {
                        *i = split.client_pool[*i];
                    }
                }
                let mut mixed = own.clone();
                for (k, client) in mixed.clients.iter_mut().enumerate() {
                    client.extend(share.client_share(&split.global, k, seed));
                }
                if warm_up && share.warmup_epochs > 0 {
                    let t = &config.train;
                    let job = FitJob {
                        client: CENTRAL_ID,
                        indices: &split.global,
                        start: global,
                        config: FitConfig {
                            round: WARMUP_ROUND,
                            run_seed: seed,
                            local_epochs: share.warmup_epochs,
                            batch_size: t.batch_size,
                            sgd: SgdConfig {
                                lr: t.lr,
                                momentum: t.momentum,
                                weight_decay: t.weight_decay,
                            },
                            bn: config.model.bn,
                            prox_mu: None,
                            control: None,
                            frozen: frozen.clone(),
                            frozen_statistics: frozen_statistics.clone(),
                            flip_labels: false,
                        },
                    };
                    let warmed = run_job(job, &data.train, threads.max(1))?;
                    global = Model::new(&spec, seed)?;
                    global.params_mut().copy_from_slice(&warmed.params);
                    global.buffers_mut().copy_from_slice(&warmed.buffers);
                }
                (mixed, Some(own))
            }
        };
        let twin = config.eval.sgd_twin.then(|| global.clone());
        let strategy = from_config(&config.strategy, &config.train, config.partition.clients)?;
        let mut scope =
            AggregationScope::new(&global, config.model.bn, config.model.average_buffers);
        if config.privacy.is_some() && !scope.buffers.is_empty() {
            return Err(FlError::State(
                "[privacy] protects the clients' weight updates, but this run also averages \
                 their BatchNorm running statistics, which it does not protect: use \
                 model.bn = \"frozen\" or \"local\", or a model without BatchNorm"
                    .into(),
            ));
        }
        scope.params = aggregated_params(&global, &config, &frozen);
        let fixed_buffers: Vec<Range<usize>> = global
            .tensors()
            .iter()
            .filter(|t| t.kind == TensorKind::Buffer && frozen_statistics.contains(&t.layer))
            .map(|t| t.offset..t.offset + t.len)
            .collect();
        scope.buffers.retain(|r| !fixed_buffers.contains(r));
        let (mut local_params, mut local_buffers) = (Vec::new(), Vec::new());
        if config.model.bn == BnPolicy::Local {
            for t in global.tensors().iter().filter(|t| t.norm) {
                let range = t.offset..t.offset + t.len;
                match t.kind {
                    TensorKind::Param => local_params.push(range),
                    TensorKind::Buffer => local_buffers.push(range),
                }
            }
        }
        // The pooled data of the baseline and the twin: exactly what the clients hold together
        // (with sharing, D and G but not the rest of the holdout; with a partition that leaves
        // examples out, not those).
        let mut all_indices: Vec<usize> = partition.clients.iter().flatten().copied().collect();
        all_indices.sort_unstable();
        all_indices.dedup();
        let shared_examples: usize = match &before_share {
            Some(before) => partition
                .clients
                .iter()
                .zip(&before.clients)
                .map(|(after, before)| after.len().saturating_sub(before.len()))
                .sum(),
            None => 0,
        };
        let example_bytes = 4 * (data.train.example_len() as u64 + 1);
        Ok(Federation {
            before_share,
            all_indices,
            config,
            spec,
            partition,
            global,
            twin,
            strategy,
            local: BTreeMap::new(),
            history: Vec::new(),
            rounds_done: 0,
            scope,
            local_params,
            local_buffers,
            frozen,
            frozen_statistics,
            threads: threads.max(1),
            pending_seconds: 0.0,
            pending_examples: 0,
            traffic: Traffic {
                sent: shared_examples as u64 * example_bytes,
                received: 0,
            },
            noise_key: None,
        })
    }
}
