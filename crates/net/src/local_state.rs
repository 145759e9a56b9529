//! FedBN's local layers on the client's own disk. With `model.bn = "local"` every normalisation
//! tensor (BatchNorm weights, biases and running statistics) belongs to its client: the client
//! trains from its own copy, keeps the trained copy in `STATE_DIR/ID/`, and uploads the values
//! the server sent in their place, so its own never leave the machine. The copy outlives the
//! process: a client restarted for the same experiment under the same index continues from it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use fedra_nn::{Model, ModelSpec, TensorKind};

use crate::error::{NetError, io};

/// The normalisation tensors a FedBN client keeps, and where.
#[derive(Debug)]
pub struct LocalLayers {
    dir: PathBuf,
    spec: ModelSpec,
    params: Vec<Range<usize>>,
    buffers: Vec<Range<usize>>,
    /// This client's trained values (params, buffers), once it has trained.
    values: Option<(Vec<f32>, Vec<f32>)>,
}

const WEIGHTS: &str = "local.safetensors";
const EXPERIMENT: &str = "experiment.toml";

impl LocalLayers {
    /// The local layers of client `index` in `experiment` (its TOML as the server sent it), kept
    /// in `dir`: read back when `dir` holds them for the same experiment and index, started
    /// afresh (and said so) when it holds another experiment's.
    pub fn open(
        dir: &Path,
        experiment: &str,
        index: usize,
        spec: &ModelSpec,
    ) -> Result<LocalLayers, NetError> {
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
            values: None,
        };
        let stamp = stamp(experiment, index);
        let kept = dir.join(EXPERIMENT);
        match std::fs::read_to_string(&kept) {
            Ok(text) if text == stamp => {
                let path = dir.join(WEIGHTS);
                let model = Model::load_safetensors(spec, &path)?;
                layers.values = Some((
                    gather(model.params(), &layers.params),
                    gather(model.buffers(), &layers.buffers),
                ));
                tracing::info!(dir = %dir.display(), "FedBN: continuing from this client's own normalisation layers");
            }
            Ok(_) => {
                tracing::warn!(dir = %dir.display(), "FedBN: the layers kept here belong to another experiment or client index; starting from the server's");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&kept)(e)),
        }
        Ok(layers)
    }

    /// Put this client's own normalisation values into a model the server sent (nothing to do
    /// before its first training).
    pub fn overlay(&self, params: &mut [f32], buffers: &mut [f32]) {
        if let Some((p, b)) = &self.values {
            scatter(p, &self.params, params);
            scatter(b, &self.buffers, buffers);
        }
    }

    /// Keep the normalisation values of a trained model (on disk first: written to temporary
    /// files, then renamed), and put `sent`'s values, the server's, in their place for the
    /// upload.
    pub fn keep(
        &mut self,
        params: &mut [f32],
        buffers: &mut [f32],
        sent: (&[f32], &[f32]),
        experiment: &str,
        index: usize,
    ) -> Result<(), NetError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let mut trained = Model::new(&self.spec, 0)?;
        trained.params_mut().copy_from_slice(params);
        trained.buffers_mut().copy_from_slice(buffers);
        let weights = self.dir.join(WEIGHTS);
        let tmp = self.dir.join("local.safetensors.tmp");
        trained.save_safetensors(&tmp)?;
        std::fs::rename(&tmp, &weights).map_err(io(&weights))?;
        let kept = self.dir.join(EXPERIMENT);
        let tmp = self.dir.join("experiment.toml.tmp");
        std::fs::write(&tmp, stamp(experiment, index)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &kept).map_err(io(&kept))?;
        self.values = Some((gather(params, &self.params), gather(buffers, &self.buffers)));
        let (sent_params, sent_buffers) = sent;
        scatter(&gather(sent_params, &self.params), &self.params, params);
        scatter(&gather(sent_buffers, &self.buffers), &self.buffers, buffers);
        Ok(())
    }
}

/// What `experiment.toml` holds: the client index, then the experiment.
fn stamp(experiment: &str, index: usize) -> String {
    format!("# fedra FedBN layers of client {index}\n{experiment}")
}

fn gather(values: &[f32], ranges: &[Range<usize>]) -> Vec<f32> {
    ranges
        .iter()
        .flat_map(|r| values[r.clone()].to_vec())
        .collect()
}

fn scatter(values: &[f32], ranges: &[Range<usize>], into: &mut [f32]) {
    let mut at = 0;
    for r in ranges {
        into[r.clone()].copy_from_slice(&values[at..at + r.len()]);
        at += r.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_layers_come_back_for_their_experiment_only_and_never_upload() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
        let server = Model::new(&spec, 1).unwrap();
        let mut trained = server.clone();
        trained.params_mut().iter_mut().for_each(|v| *v += 1.0);
        // Whole steps: `num_batches_tracked` is kept as an integer.
        trained.buffers_mut().iter_mut().for_each(|v| *v += 1.0);
        let mut layers = LocalLayers::open(dir.path(), "exp A", 2, &spec).unwrap();
        let (mut up_params, mut up_buffers) =
            (trained.params().to_vec(), trained.buffers().to_vec());
        layers
            .keep(
                &mut up_params,
                &mut up_buffers,
                (server.params(), server.buffers()),
                "exp A",
                2,
            )
            .unwrap();
        // The upload: trained shared weights, the server's normalisation values.
        for t in server.tensors() {
            let (up, srv, tr) = match t.kind {
                TensorKind::Param => (&up_params, server.params(), trained.params()),
                TensorKind::Buffer => (&up_buffers, server.buffers(), trained.buffers()),
            };
            let r = t.offset..t.offset + t.len;
            let expected = if t.norm {
                &srv[r.clone()]
            } else {
                &tr[r.clone()]
            };
            assert_eq!(&up[r], expected, "{}", t.name);
        }
        // Reopened for the same experiment and index: the trained normalisation values return.
        let again = LocalLayers::open(dir.path(), "exp A", 2, &spec).unwrap();
        let (mut p, mut b) = (server.params().to_vec(), server.buffers().to_vec());
        again.overlay(&mut p, &mut b);
        for t in server.tensors().iter().filter(|t| t.norm) {
            let r = t.offset..t.offset + t.len;
            let (got, want) = match t.kind {
                TensorKind::Param => (&p[r.clone()], &trained.params()[r]),
                TensorKind::Buffer => (&b[r.clone()], &trained.buffers()[r]),
            };
            assert_eq!(got, want, "{}", t.name);
        }
        // Another experiment, or another index: the server's values stay.
        for (exp, index) in [("exp B", 2), ("exp A", 3)] {
            let other = LocalLayers::open(dir.path(), exp, index, &spec).unwrap();
            let (mut p, mut b) = (server.params().to_vec(), server.buffers().to_vec());
            other.overlay(&mut p, &mut b);
            assert_eq!(
                (p.as_slice(), b.as_slice()),
                (server.params(), server.buffers())
            );
        }
    }
}
