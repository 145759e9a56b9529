//! A client's own side of an experiment: its data (loaded once per process), the examples it
//! trains on, the model layout and the state it keeps on its disk (FedBN layers, SCAFFOLD
//! controls), and the training and evaluation it runs on them.

use std::sync::Arc;

use fedra_data::TrainTest;
use fedra_fl::federation::{aggregated_params, model_spec};
use fedra_fl::strategy::{Scaffold, clip_update, correction};
use fedra_fl::{ExperimentConfig, Federation, FitConfig, FitJob, Steering, run_job};
use fedra_nn::{Model, ModelSpec, SgdConfig};

use super::DataLoader;
use crate::controls::{self, ClientControls};
use crate::error::NetError;
use crate::local_state::{LocalLayers, stamp};
use crate::proto::FitTask;
use crate::server::bn_from_name;
use crate::wire::Layout;

/// The data of one experiment (cut as it says), loaded once for all the clients of a process.
#[derive(Default)]
pub(super) struct DataCache {
    loaded: std::sync::Mutex<Option<(String, Arc<TrainTest>)>>,
}

impl DataCache {
    pub(super) fn get(
        &self,
        toml: &str,
        config: &ExperimentConfig,
        load: &DataLoader,
    ) -> Result<Arc<TrainTest>, NetError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, data)) = loaded.as_ref()
            && t == toml
        {
            return Ok(data.clone());
        }
        let data = load(config).map_err(NetError::Other)?;
        let data = Arc::new(config.data.select(data)?);
        *loaded = Some((toml.to_string(), data.clone()));
        Ok(data)
    }
}

/// Everything a client prepares once per experiment.
pub(super) struct Prepared {
    pub(super) toml: String,
    /// The server's name for the run.
    pub(super) run_id: String,
    pub(super) index: usize,
    pub(super) config: ExperimentConfig,
    pub(super) data: Arc<TrainTest>,
    pub(super) indices: Vec<usize>,
    pub(super) spec: ModelSpec,
    pub(super) layout: Layout,
    /// Parameters `model.freeze` keeps fixed.
    pub(super) frozen: Vec<std::ops::Range<usize>>,
    /// BatchNorm layers whose statistics `model.freeze_statistics` keeps fixed.
    pub(super) frozen_statistics: Vec<String>,
    /// With `model.bn = "local"`: this client's own normalisation layers, on its disk.
    pub(super) local: Option<std::sync::Mutex<LocalLayers>>,
    /// With `strategy.name = "scaffold"`: this client's control variates, on its disk.
    pub(super) scaffold: Option<ScaffoldClient>,
}

/// A SCAFFOLD client's side: the strategy's control arithmetic, the parameters it covers and
/// the client's own controls.
pub(super) struct ScaffoldClient {
    pub(super) strategy: Scaffold,
    pub(super) params: Vec<std::ops::Range<usize>>,
    pub(super) controls: std::sync::Mutex<ClientControls>,
}

/// Load the data and work out which examples this client trains on.
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
    toml: String,
    run_id: String,
    index: usize,
    shard: Option<usize>,
    threads: usize,
    cache: &DataCache,
    load: &DataLoader,
    state: &std::path::Path,
) -> Result<Prepared, NetError> {
    let config = ExperimentConfig::from_toml_str(&toml, "the server's experiment")?;
    config.validate("the server's experiment")?;
    let data = cache.get(&toml, &config, load)?;
    let spec = model_spec(&config, &data.train)?;
    let indices = match shard {
        Some(k) => {
            // The simulation's partition (and data sharing) of this copy of the dataset.
            let start = Model::new(&spec, config.run.seed)?;
            let fed = Federation::with_global(config.clone(), &data, threads, start)?;
            fed.partition.clients.get(k).cloned().ok_or_else(|| {
                NetError::Other(format!(
                    "shard {k} does not exist: the partition has {} clients",
                    fed.partition.clients.len()
                ))
            })?
        }
        None => (0..data.train.len()).collect(),
    };
    if indices.is_empty() {
        return Err(NetError::Other(format!(
            "client {index} has no training examples"
        )));
    }
    let shape = Model::new(&spec, 0)?;
    let layout = Layout::of(&shape);
    let frozen = fedra_fl::federation::frozen_ranges(&shape, &config.model.freeze)?;
    let frozen_statistics =
        fedra_fl::federation::frozen_statistics(&shape, &config.model.freeze_statistics)?;
    let local = if config.model.bn == fedra_nn::BnPolicy::Local {
        let layers = LocalLayers::open(state, &stamp(&toml, &run_id, index), &spec)?;
        Some(std::sync::Mutex::new(layers))
    } else {
        None
    };
    let scaffold = if config.strategy.name == "scaffold" {
        let dir = state.join("scaffold");
        let controls = ClientControls::open(&dir, &controls::stamp(&toml, &run_id, index), &spec)?;
        Some(ScaffoldClient {
            strategy: Scaffold::new(&config.strategy, &config.train, config.partition.clients),
            params: aggregated_params(&shape, &config, &frozen),
            controls: std::sync::Mutex::new(controls),
        })
    } else {
        None
    };
    Ok(Prepared {
        toml,
        run_id,
        index,
        config,
        data,
        indices,
        spec,
        layout,
        frozen,
        frozen_statistics,
        local,
        scaffold,
    })
}

impl ScaffoldClient {
    pub(super) fn controls_lock(&self) -> std::sync::MutexGuard<'_, ClientControls> {
        self.controls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Prepared {
    pub(super) fn local_layers(&self) -> Option<std::sync::MutexGuard<'_, LocalLayers>> {
        self.local
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Evaluate the server's weights on this client's own test data.
pub(super) fn evaluate_locally(
    p: &Prepared,
    round: usize,
    mut params: Vec<f32>,
    mut buffers: Vec<f32>,
    threads: usize,
) -> Result<fedra_nn::EvalCounts, NetError> {
    if let Some(local) = p.local_layers() {
        // After r rounds: the layers of this client's last training before round r.
        local.overlay(&mut params, &mut buffers, round);
    }
    let mut model = Model::new(&p.spec, 0)?;
    model.params_mut().copy_from_slice(&params);
    model.buffers_mut().copy_from_slice(&buffers);
    Ok(fedra_fl::federation::evaluate_counts(
        &model,
        &p.data.test,
        threads,
    )?)
}

/// One task's local training, with the simulation's client code.
pub(super) fn train(
    p: &Prepared,
    fit: &FitTask,
    params: Vec<f32>,
    buffers: Vec<f32>,
    control: Option<(Vec<f32>, Option<usize>)>,
    threads: usize,
) -> Result<fedra_fl::FitResult, NetError> {
    let bn = bn_from_name(&fit.bn)
        .ok_or_else(|| NetError::Protocol(format!("unknown BatchNorm policy {:?}", fit.bn)))?;
    // With FedBN, this client's own normalisation layers in place of the server's.
    let (mut own_params, mut own_buffers) = (params.clone(), buffers.clone());
    let round = usize::try_from(fit.round).unwrap_or(usize::MAX);
    if let Some(local) = p.local_layers() {
        local.overlay(&mut own_params, &mut own_buffers, round);
    }
    // SCAFFOLD: the server's control c, and this client's own c_i of the round the server names.
    // A SCAFFOLD task without a control comes before the server's first aggregate: c = 0 and no
    // c_i yet, so no correction, but the step still makes this client's first c_i.
    let steered = control.is_some();
    let scaffold = match (control, p.scaffold.as_ref()) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(NetError::Protocol(
                "a SCAFFOLD control for a run that is not SCAFFOLD".into(),
            ));
        }
        (None, Some(s)) => Some((s, vec![0.0; params.len()], None, Vec::new())),
        (Some((c, since)), Some(s)) => {
            let own = s.controls_lock().since(since);
            Some((s, c, since, own))
        }
    };
    let mut start = Model::new(&p.spec, 0)?;
    start.params_mut().copy_from_slice(&own_params);
    start.buffers_mut().copy_from_slice(&own_buffers);
    let config = FitConfig {
        round,
        run_seed: fit.run_seed,
        local_epochs: fit.local_epochs as usize,
        batch_size: usize::try_from(fit.batch_size).unwrap_or(usize::MAX),
        sgd: SgdConfig {
            lr: fit.lr,
            momentum: fit.momentum,
            weight_decay: fit.weight_decay,
        },
        bn,
        prox_mu: fit.prox_mu,
        control: scaffold.as_ref().filter(|_| steered).map(|(_, c, _, own)| {
            let own = (!own.is_empty()).then_some(own.as_slice());
            Steering::Correction(Arc::new(correction(c, own)))
        }),
        frozen: p.frozen.clone(),
        frozen_statistics: p.frozen_statistics.clone(),
        flip_labels: false,
    };
    let job = FitJob {
        client: p.index,
        indices: &p.indices,
        start,
        config,
    };
    let mut result = run_job(job, &p.data.train, threads)?;
    if let Some((s, c, since, mut own)) = scaffold {
        // The server's control step sees the update after `strategy.clip_update_norm`.
        let mut seen = result.clone();
        if let Some(max_norm) = p.config.strategy.clip_update_norm {
            clip_update(&params, &mut seen.params, &s.params, max_norm);
        }
        s.strategy
            .client_step(round, &c, &params, &seen, &s.params, &mut own)?;
        s.controls_lock().keep(round, since, own)?;
    }
    if let Some(mut local) = p.local_layers() {
        local.keep(
            round,
            &mut result.params,
            &mut result.buffers,
            (&params, &buffers),
            &stamp(&p.toml, &p.run_id, p.index),
        )?;
    }
    Ok(result)
}
