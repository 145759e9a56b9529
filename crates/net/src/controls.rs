//! SCAFFOLD's client control variate c_i on the client's own disk. Over a network the server
//! keeps only its own control c (one model-sized vector, not one per client) and, per client, the
//! last round whose aggregate took that client's result. A task carries c and that round; the
//! client trains with the correction c - c_i of its c_i as of that round, then keeps its new c_i
//! under the task's round.
//!
//! Kept by round so that whatever the server does not aggregate changes nothing: a result lost
//! on the way, a round run again after a drop, or rounds a resumed server runs again from its
//! checkpoint all leave the client starting from the c_i of its last aggregated result, as the
//! simulation does. When a new control is kept, every copy but it and the one it started from is
//! removed (older ones, and those of rounds the server moved past without aggregating them); a
//! folder stamped for another run is emptied when opened.
//!
//! Keeping c_i on the client saves the server one model-sized vector per client; it is not a
//! secret from the server, which could recompute it from the updates it receives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedra_nn::{Model, ModelSpec};

use crate::error::NetError;
use crate::local_state::{kept_rounds, stamp_folder, stamped, write_synced};

/// What identifies the run a client's controls belong to: its index, the server's run id and the
/// experiment.
pub fn stamp(experiment: &str, run_id: &str, index: usize) -> String {
    format!("# fedra SCAFFOLD controls of client {index} in run {run_id}\n{experiment}")
}

fn round_file(dir: &Path, round: usize) -> PathBuf {
    dir.join(format!("control-{round}.safetensors"))
}

/// One client's control variates by the round that made them, in `dir`.
#[derive(Debug)]
pub struct ClientControls {
    dir: PathBuf,
    spec: ModelSpec,
    stamp: String,
    rounds: BTreeMap<usize, Vec<f32>>,
}

impl ClientControls {
    /// The controls kept in `dir` for the run `stamp` names: read back when `dir` holds them for
    /// the same run, none (said so) when it holds another run's.
    pub fn open(dir: &Path, stamp: &str, spec: &ModelSpec) -> Result<ClientControls, NetError> {
        let mut controls = ClientControls {
            dir: dir.to_path_buf(),
            spec: spec.clone(),
            stamp: stamp.to_string(),
            rounds: BTreeMap::new(),
        };
        match stamped(dir, stamp)? {
            Some(true) => controls.read_rounds(),
            Some(false) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "SCAFFOLD: the controls kept here belong to another run or client index; \
                     removing them and starting from zero"
                );
                for (_, path) in kept_rounds(dir, "control-") {
                    std::fs::remove_file(&path).map_err(crate::error::io(&path))?;
                }
            }
            None => {}
        }
        Ok(controls)
    }

    fn read_rounds(&mut self) {
        for (round, path) in kept_rounds(&self.dir, "control-") {
            match Model::load_safetensors(&self.spec, &path) {
                Ok(model) => {
                    self.rounds.insert(round, model.params().to_vec());
                }
                Err(e) => {
                    tracing::warn!("SCAFFOLD: cannot read a kept control, leaving it out: {e}")
                }
            }
        }
    }

    /// The control to train with when the server's last aggregate of this client's results was
    /// in round `since` (none: zero, as an empty vector). A control the server counts on but this
    /// client no longer has (its folder was lost) is zero too, with a warning: the run goes on,
    /// no longer the simulation's bit for bit.
    pub fn since(&self, since: Option<usize>) -> Vec<f32> {
        let Some(round) = since else {
            return Vec::new();
        };
        match self.rounds.get(&round) {
            Some(c) => c.clone(),
            None => {
                tracing::warn!(
                    round,
                    dir = %self.dir.display(),
                    "SCAFFOLD: the server expects this client's control of round {round}, which \
                     is not here; training with zero"
                );
                Vec::new()
            }
        }
    }

    /// Keep `control`, made in `round` from the control of round `since`: on disk first (a
    /// synced temporary file renamed), then drop every copy but `since`'s and this one.
    pub fn keep(
        &mut self,
        round: usize,
        since: Option<usize>,
        control: Vec<f32>,
    ) -> Result<(), NetError> {
        stamp_folder(&self.dir, &self.stamp)?;
        let mut model = Model::new(&self.spec, 0)?;
        if control.len() != model.params().len() {
            return Err(NetError::Other(format!(
                "a SCAFFOLD control of {} values for a model of {} parameters",
                control.len(),
                model.params().len()
            )));
        }
        model.params_mut().copy_from_slice(&control);
        write_synced(
            &round_file(&self.dir, round),
            &model.to_safetensors_bytes()?,
        )?;
        self.rounds.insert(round, control);
        let stale: Vec<usize> = self
            .rounds
            .keys()
            .copied()
            .filter(|&r| r != round && Some(r) != since)
            .collect();
        for r in stale {
            self.rounds.remove(&r);
            let _ = std::fs::remove_file(round_file(&self.dir, r));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_comes_back_by_the_round_the_server_names_for_its_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::by_name("logreg", [1, 28, 28], 10).unwrap();
        let n = Model::new(&spec, 0).unwrap().params().len();
        let made_in = |round: usize| vec![round as f32 * 0.5; n];
        let run = stamp("exp A", "run-1", 2);
        let mut controls = ClientControls::open(dir.path(), &run, &spec).unwrap();
        assert!(controls.since(None).is_empty());
        // Round 1 from zero (aggregated), round 3 from round 1's (lost on the way), round 4
        // from round 1's again (aggregated).
        controls.keep(1, None, made_in(1)).unwrap();
        controls.keep(3, Some(1), made_in(3)).unwrap();
        assert_eq!(controls.since(Some(1)), made_in(1));
        assert_eq!(controls.since(Some(3)), made_in(3));
        controls.keep(4, Some(1), made_in(4)).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("control-"))
            .collect();
        files.sort();
        assert_eq!(files, ["control-1.safetensors", "control-4.safetensors"]);
        // A restarted client of the same run: round 4's when the server aggregated it, round
        // 1's when a resumed server never did, zero for a round it never kept.
        let again = ClientControls::open(dir.path(), &run, &spec).unwrap();
        assert_eq!(again.since(Some(4)), made_in(4));
        assert_eq!(again.since(Some(1)), made_in(1));
        assert!(again.since(Some(3)).is_empty());
        // Another run, or another index: nothing, and the other run's copies are removed.
        for other in [stamp("exp A", "run-2", 2), stamp("exp A", "run-1", 3)] {
            let controls = ClientControls::open(dir.path(), &other, &spec).unwrap();
            assert!(controls.since(Some(4)).is_empty());
        }
        assert!(kept_rounds(dir.path(), "control-").is_empty());
        // A control of the wrong size is refused, naming what it is.
        let err = controls
            .keep(5, Some(4), vec![0.0; 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SCAFFOLD control of 3 values"), "{err}");
    }
}
