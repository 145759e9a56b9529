//! FedBN's local layers on the client's own disk. With `model.bn = "local"` every normalisation
//! tensor (BatchNorm weights, biases and running statistics) belongs to its client: the client
//! trains from its own copy, keeps the trained copy in `STATE_DIR/ID/`, and uploads the values
//! the server sent in their place, so its own never leave the machine. The copy outlives the
//! process: a client restarted for the same run (experiment, run id, index) continues from it.
//!
//! Copies are kept by round, the last two: a task of round r starts from the copy of the latest
//! round before r, so a round the server runs again (after a drop, or after resuming from its
//! checkpoint) starts from the same layers as the first time.
//!
//! The folder helpers here (a run stamp, files by round, synced writes) serve SCAFFOLD's client
//! controls too (`crate::controls`).

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use fedra_fl::federation::{gather, scatter};
use fedra_nn::{Model, ModelSpec, TensorKind};

use crate::error::{NetError, io};

/// The normalisation tensors a FedBN client keeps, and where.
#[derive(Debug)]
pub struct LocalLayers {
    dir: PathBuf,
    spec: ModelSpec,
    params: Vec<Range<usize>>,
    buffers: Vec<Range<usize>>,
    /// This client's trained values (params, buffers) after each kept round.
    rounds: BTreeMap<usize, (Vec<f32>, Vec<f32>)>,
}

const STAMP: &str = "run.toml";

/// What identifies the run a client's layers belong to: its index, the server's run id and the
/// experiment.
pub fn stamp(experiment: &str, run_id: &str, index: usize) -> String {
    format!("# fedra FedBN layers of client {index} in run {run_id}\n{experiment}")
}

fn round_file(dir: &Path, round: usize) -> PathBuf {
    dir.join(format!("round-{round}.safetensors"))
}

impl LocalLayers {
    /// The local layers kept in `dir` for the run `stamp` names: read back when `dir` holds
    /// them for the same run, started afresh (and said so) when it holds another run's or a
    /// copy that cannot be read.
    pub fn open(dir: &Path, stamp: &str, spec: &ModelSpec) -> Result<LocalLayers, NetError> {
        let shape = Model::new(spec, 0)?;
        let (mut params, mut buffers) = (Vec::new(), Vec::new());
        for t in shape.tensors().iter().filter(|t| t.norm) {
            let range = t.offset..t.offset + t.len;
            match t.kind {
                TensorKind::Param => params.push(range),
                TensorKind::Buffer => buffers.push(range),
            }
        }
        let mut layers = LocalLayers {
            dir: dir.to_path_buf(),
            spec: spec.clone(),
            params,
            buffers,
            rounds: BTreeMap::new(),
        };
        match stamped(dir, stamp)? {
            Some(true) => layers.read_rounds(),
            Some(false) => {
                tracing::warn!(dir = %dir.display(), "FedBN: the layers kept here belong to another run or client index; removing them and starting from the server's");
                for (_, path) in kept_rounds(dir, "round-") {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
            }
            None => {}
        }
        Ok(layers)
    }

    fn read_rounds(&mut self) {
        for (round, path) in kept_rounds(&self.dir, "round-") {
            match Model::load_safetensors(&self.spec, &path) {
                Ok(model) => {
                    let values = (
                        gather(model.params(), &self.params),
                        gather(model.buffers(), &self.buffers),
                    );
                    self.rounds.insert(round, values);
                }
                Err(e) => {
                    tracing::warn!(
                        "FedBN: cannot read this client's layers, leaving them out: {e}"
                    );
                }
            }
        }
        if let Some(last) = self.rounds.keys().next_back() {
            tracing::info!(dir = %self.dir.display(), round = last, "FedBN: continuing from this client's own normalisation layers");
        }
    }

    /// Put this client's own normalisation values, those of its latest training before
    /// `round`, into a model the server sent (nothing to do before its first training).
    pub fn overlay(&self, params: &mut [f32], buffers: &mut [f32], round: usize) {
        if let Some((_, (p, b))) = self.rounds.range(..round).next_back() {
            scatter(p, &self.params, params);
            scatter(b, &self.buffers, buffers);
        }
    }

    /// Keep the normalisation values of the model trained in `round` (on disk first: a
    /// temporary file, synced, then renamed; with the run's stamp), drop copies older than the
    /// one this training started from, and put `sent`'s values, the server's, in their place
    /// for the upload.
    pub fn keep(
        &mut self,
        round: usize,
        params: &mut [f32],
        buffers: &mut [f32],
        sent: (&[f32], &[f32]),
        stamp: &str,
    ) -> Result<(), NetError> {
        stamp_folder(&self.dir, stamp)?;
        let mut trained = Model::new(&self.spec, 0)?;
        trained.params_mut().copy_from_slice(params);
        trained.buffers_mut().copy_from_slice(buffers);
        write_synced(
            &round_file(&self.dir, round),
            &trained.to_safetensors_bytes()?,
        )?;
        self.rounds.insert(
            round,
            (gather(params, &self.params), gather(buffers, &self.buffers)),
        );
        let base = self.rounds.range(..round).next_back().map(|(&r, _)| r);
        let stale: Vec<usize> = self
            .rounds
            .keys()
            .copied()
            .filter(|&r| r != round && Some(r) != base)
            .collect();
        for r in stale {
            self.rounds.remove(&r);
            let _ = std::fs::remove_file(round_file(&self.dir, r));
        }
        let (sent_params, sent_buffers) = sent;
        scatter(&gather(sent_params, &self.params), &self.params, params);
        scatter(&gather(sent_buffers, &self.buffers), &self.buffers, buffers);
        Ok(())
    }
}

/// Whether `dir` holds what a client kept for the run `stamp` names: `Some(true)` yes,
/// `Some(false)` another run's (or another client index's), `None` nothing.
pub(crate) fn stamped(dir: &Path, stamp: &str) -> Result<Option<bool>, NetError> {
    let kept = dir.join(STAMP);
    match std::fs::read_to_string(&kept) {
        Ok(text) => Ok(Some(text == stamp)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&kept)(e)),
    }
}

/// Make `dir` (if missing) and mark it as holding the run `stamp` names.
pub(crate) fn stamp_folder(dir: &Path, stamp: &str) -> Result<(), NetError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let kept = dir.join(STAMP);
    if std::fs::read_to_string(&kept).ok().as_deref() != Some(stamp) {
        write_synced(&kept, stamp.as_bytes())?;
    }
    Ok(())
}

/// The files `<prefix><round>.safetensors` in `dir`, with their rounds (none if `dir` cannot be
/// read).
pub(crate) fn kept_rounds(dir: &Path, prefix: &str) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let round = name
                .strip_prefix(prefix)?
                .strip_suffix(".safetensors")?
                .parse::<usize>()
                .ok()?;
            Some((round, entry.path()))
        })
        .collect()
}

/// Write `bytes` to `path` through a synced temporary file renamed over it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm_values(model_params: &[f32], model_buffers: &[f32], model: &Model) -> Vec<f32> {
        let mut out = Vec::new();
        for t in model.tensors().iter().filter(|t| t.norm) {
            let r = t.offset..t.offset + t.len;
            out.extend_from_slice(match t.kind {
                TensorKind::Param => &model_params[r],
                TensorKind::Buffer => &model_buffers[r],
            });
        }
        out
    }

    #[test]
    fn kept_layers_come_back_by_round_for_their_run_only_and_never_upload() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
        let server = Model::new(&spec, 1).unwrap();
        let run = stamp("exp A", "run-1", 2);
        // Trained in rounds 0, 1 and 2 (whole steps: `num_batches_tracked` is an integer).
        let trained = |round: usize| {
            let mut m = server.clone();
            let step = (round + 1) as f32;
            m.params_mut().iter_mut().for_each(|v| *v += step);
            m.buffers_mut().iter_mut().for_each(|v| *v += step);
            m
        };
        let mut layers = LocalLayers::open(dir.path(), &run, &spec).unwrap();
        for round in 0..3 {
            let t = trained(round);
            let (mut up_p, mut up_b) = (t.params().to_vec(), t.buffers().to_vec());
            layers
                .keep(
                    round,
                    &mut up_p,
                    &mut up_b,
                    (server.params(), server.buffers()),
                    &run,
                )
                .unwrap();
            // The upload: trained shared weights, the server's normalisation values.
            for info in server.tensors() {
                let (up, srv, tr) = match info.kind {
                    TensorKind::Param => (&up_p, server.params(), t.params()),
                    TensorKind::Buffer => (&up_b, server.buffers(), t.buffers()),
                };
                let r = info.offset..info.offset + info.len;
                let expected = if info.norm {
                    &srv[r.clone()]
                } else {
                    &tr[r.clone()]
                };
                assert_eq!(&up[r], expected, "{}", info.name);
            }
        }
        // Two copies stay: round 2 and the round 1 it started from.
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("round-"))
            .collect();
        files.sort();
        assert_eq!(files, ["round-1.safetensors", "round-2.safetensors"]);
        // Reopened for the same run: round 3 (or an evaluation after 3 rounds) starts from
        // round 2's layers, a round 2 run again from round 1's.
        let again = LocalLayers::open(dir.path(), &run, &spec).unwrap();
        for (round, from) in [(3, 2), (2, 1)] {
            let (mut p, mut b) = (server.params().to_vec(), server.buffers().to_vec());
            again.overlay(&mut p, &mut b, round);
            let want = trained(from);
            assert_eq!(
                norm_values(&p, &b, &server),
                norm_values(want.params(), want.buffers(), &server),
                "round {round}"
            );
        }
        // An unreadable copy is left out with a warning, not a client that cannot start.
        std::fs::write(dir.path().join("round-2.safetensors"), b"not safetensors").unwrap();
        let damaged = LocalLayers::open(dir.path(), &run, &spec).unwrap();
        let (mut p, mut b) = (server.params().to_vec(), server.buffers().to_vec());
        damaged.overlay(&mut p, &mut b, 3);
        let want = trained(1);
        assert_eq!(
            norm_values(&p, &b, &server),
            norm_values(want.params(), want.buffers(), &server)
        );
        // Another run of the same experiment, or another index: the server's values stay, and
        // the other run's copies are removed.
        for other in [stamp("exp A", "run-2", 2), stamp("exp A", "run-1", 3)] {
            let layers = LocalLayers::open(dir.path(), &other, &spec).unwrap();
            let (mut p, mut b) = (server.params().to_vec(), server.buffers().to_vec());
            layers.overlay(&mut p, &mut b, 5);
            assert_eq!(
                (p.as_slice(), b.as_slice()),
                (server.params(), server.buffers())
            );
        }
        assert!(kept_rounds(dir.path(), "round-").is_empty());
    }
}
