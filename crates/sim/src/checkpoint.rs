//! Checkpoints: everything a run needs to continue bit-identically after a stop. Global (and SGD
//! twin) weights go to safetensors files, server-optimiser and FedBN client state to a third, the
//! round count, metrics so far and the time and examples of rounds not yet in a metrics row to
//! `state.json`. No generator state is saved because there is none: every random draw derives
//! from (seed, round, client).
//!
//! A checkpoint is written to `checkpoint.tmp/` and renamed into place, so a run killed while
//! writing leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use fedra_data::TrainTest;
use fedra_fl::federation::{Traffic, model_spec};
use fedra_fl::{ExperimentConfig, Federation, LocalState, RoundMetrics};
use fedra_nn::Model;

use crate::error::{SimError, io};

/// The JSON part of a checkpoint.
#[derive(Serialize, Deserialize)]
struct State {
    rounds_done: usize,
    seed: u64,
    rng: String,
    history: Vec<RoundMetrics>,
    /// Seconds and examples of rounds run since the last evaluated row (absent in checkpoints
    /// written before fedra saved them: then 0).
    #[serde(default)]
    pending_seconds: f64,
    #[serde(default)]
    pending_examples: usize,
    /// Bytes sent and received so far (absent in older checkpoints: then what the federation
    /// counts when it is built, the shared examples).
    #[serde(default)]
    traffic: Option<Traffic>,
}

/// Folder of the checkpoint inside a run folder.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Save the federation's state under `run_dir/checkpoint/`.
pub fn save(run_dir: &Path, fed: &Federation) -> Result<(), SimError> {
    let final_dir = checkpoint_dir(run_dir);
    let tmp = run_dir.join("checkpoint.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    fed.global
        .save_safetensors(&tmp.join("global.safetensors"))?;
    if let Some(twin) = &fed.twin {
        twin.save_safetensors(&tmp.join("twin.safetensors"))?;
    }
    let mut named: Vec<(String, Vec<u8>, usize)> = Vec::new();
    // Buffers again as raw f32: the model files store integer counters (`num_batches_tracked`)
    // as i64, and an averaged counter is fractional, so only this copy restores bit for bit.
    let buffers = fed.global.buffers();
    named.push(("global.buffers".into(), to_bytes(buffers), buffers.len()));
    if let Some(twin) = &fed.twin {
        let buffers = twin.buffers();
        named.push(("twin.buffers".into(), to_bytes(buffers), buffers.len()));
    }
    for (name, values) in fed.strategy.state() {
        named.push((format!("strategy.{name}"), to_bytes(&values), values.len()));
    }
    for (client, state) in &fed.local {
        named.push((
            format!("local.{client}.params"),
            to_bytes(&state.params),
            state.params.len(),
        ));
        named.push((
            format!("local.{client}.buffers"),
            to_bytes(&state.buffers),
            state.buffers.len(),
        ));
    }
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(name, bytes, len)| {
            let view = TensorView::new(Dtype::F32, vec![*len], bytes)
                .expect("a 1-D f32 view of exactly len values is always valid");
            (name.clone(), view)
        })
        .collect();
    let server_path = tmp.join("server.safetensors");
    let bytes = safetensors::serialize(views, None).map_err(|e| SimError::Checkpoint {
        path: server_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&server_path, bytes).map_err(io(&server_path))?;
    let state = State {
        rounds_done: fed.rounds_done,
        seed: fed.config.run.seed,
        rng: "none: every draw derives from (seed, round, client)".into(),
        history: fed.history.clone(),
        pending_seconds: fed.pending_seconds,
        pending_examples: fed.pending_examples,
        traffic: Some(fed.traffic),
    };
    let state_path = tmp.join("state.json");
    let json = serde_json::to_string_pretty(&state).expect("checkpoint state serialises");
    std::fs::write(&state_path, json).map_err(io(&state_path))?;
    let old = run_dir.join("checkpoint.old");
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

fn bad(path: &Path, message: String) -> SimError {
    SimError::Checkpoint {
        path: path.to_path_buf(),
        message,
    }
}

/// `state.json` of the checkpoint in `dir`, checked against the run's seed.
fn read_state(dir: &Path, seed: u64) -> Result<State, SimError> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: State = serde_json::from_str(&text).map_err(|e| bad(&state_path, e.to_string()))?;
    if state.seed != seed {
        return Err(bad(
            &state_path,
            format!(
                "was written with seed {}, the configuration says {}",
                state.seed, seed
            ),
        ));
    }
    Ok(state)
}

/// Build the federation of `config` from the checkpoint in `run_dir`. The global model comes from
/// the checkpoint, so `model.init` is not read (it may be gone) and the data-sharing warm-up does
/// not run again.
pub fn load(
    run_dir: &Path,
    config: ExperimentConfig,
    data: &TrainTest,
    threads: usize,
) -> Result<Federation, SimError> {
    let dir = checkpoint_dir(run_dir);
    let state = read_state(&dir, config.run.seed)?;
    let spec = model_spec(&config, &data.train)?;
    let global = Model::load_safetensors(&spec, &dir.join("global.safetensors"))?;
    let mut fed = Federation::with_global(config, data, threads, global)?;
    restore_rest(&dir, &mut fed, state)?;
    Ok(fed)
}

/// Load a checkpoint into a federation of the same configuration, replacing its global model.
pub fn restore(run_dir: &Path, fed: &mut Federation) -> Result<(), SimError> {
    let dir = checkpoint_dir(run_dir);
    let state = read_state(&dir, fed.config.run.seed)?;
    fed.global = Model::load_safetensors(&fed.spec, &dir.join("global.safetensors"))?;
    restore_rest(&dir, fed, state)
}

/// Everything of a checkpoint but `state.json`'s check and the global weights.
fn restore_rest(dir: &Path, fed: &mut Federation, state: State) -> Result<(), SimError> {
    if fed.twin.is_some() {
        fed.twin = Some(Model::load_safetensors(
            &fed.spec,
            &dir.join("twin.safetensors"),
        )?);
    }
    let server_path = dir.join("server.safetensors");
    let bytes = std::fs::read(&server_path).map_err(io(&server_path))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&server_path, e.to_string()))?;
    let mut strategy_state = Vec::new();
    let mut local: BTreeMap<usize, HashMap<String, Vec<f32>>> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(&server_path, format!("tensor {name} is not f32")));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if name == "global.buffers" || name == "twin.buffers" {
            let model = if name == "global.buffers" {
                Some(&mut fed.global)
            } else {
                fed.twin.as_mut()
            };
            let Some(model) = model else {
                return Err(bad(&server_path, format!("unexpected tensor {name}")));
            };
            if values.len() != model.buffers().len() {
                return Err(bad(
                    &server_path,
                    format!(
                        "{name} holds {} values, the model has {}",
                        values.len(),
                        model.buffers().len()
                    ),
                ));
            }
            model.buffers_mut().copy_from_slice(&values);
        } else if let Some(key) = name.strip_prefix("strategy.") {
            strategy_state.push((key.to_string(), values));
        } else if let Some(rest) = name.strip_prefix("local.") {
            let (client, part) = rest
                .split_once('.')
                .ok_or_else(|| bad(&server_path, format!("unexpected tensor {name}")))?;
            let client: usize = client
                .parse()
                .map_err(|_| bad(&server_path, format!("unexpected tensor {name}")))?;
            local
                .entry(client)
                .or_default()
                .insert(part.to_string(), values);
        } else {
            return Err(bad(&server_path, format!("unexpected tensor {name}")));
        }
    }
    strategy_state.sort_by(|a, b| a.0.cmp(&b.0));
    fed.restore_strategy(strategy_state)
        .map_err(|e| bad(&server_path, e.to_string()))?;
    fed.local.clear();
    for (client, mut parts) in local {
        let (Some(params), Some(buffers)) = (parts.remove("params"), parts.remove("buffers"))
        else {
            return Err(bad(
                &server_path,
                format!("client {client}: local state is incomplete"),
            ));
        };
        let expected = fed.local_lengths();
        if client >= fed.config.partition.clients || (params.len(), buffers.len()) != expected {
            return Err(bad(
                &server_path,
                format!(
                    "local state of client {client}: {} parameters and {} buffer values, \
                     expected {} and {} for one of {} clients",
                    params.len(),
                    buffers.len(),
                    expected.0,
                    expected.1,
                    fed.config.partition.clients
                ),
            ));
        }
        fed.local.insert(client, LocalState { params, buffers });
    }
    fed.history = state.history;
    fed.rounds_done = state.rounds_done;
    fed.pending_seconds = state.pending_seconds;
    fed.pending_examples = state.pending_examples;
    if let Some(traffic) = state.traffic {
        fed.traffic = traffic;
    }
    Ok(())
}
