//! A model's state: its spec, one contiguous `Vec<f32>` of parameters, one of buffers (BatchNorm
//! running statistics and batch counters) and the table of named tensors (PyTorch names and
//! layouts) that views them. Also seeded initialisation (PyTorch's defaults, or Glorot-uniform
//! as TensorFlow/Keras draw it) and safetensors I/O.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::plan::Plan;
use crate::spec::ModelSpec;

/// Whether a tensor is trained (parameter) or only tracked (buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorKind {
    Param,
    Buffer,
}

/// One named tensor of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// PyTorch name, e.g. `conv1.weight`, `bn1.running_mean`.
    pub name: String,
    /// Module name, e.g. `conv1`.
    pub layer: String,
    pub shape: Vec<usize>,
    /// Offset into `params()` or `buffers()` according to `kind`.
    pub offset: usize,
    pub len: usize,
    pub kind: TensorKind,
    /// Belongs to a BatchNorm/GroupNorm layer.
    pub norm: bool,
}

/// Metadata key listing the buffer tensors of a saved file (comma-separated).
const META_BUFFERS: &str = "fedra.buffers";
const META_MODEL: &str = "fedra.model";

/// A model: spec, parameters, buffers, tensor table.
#[derive(Clone, Debug)]
pub struct Model {
    spec: ModelSpec,
    params: Vec<f32>,
    buffers: Vec<f32>,
    tensors: Vec<TensorInfo>,
}

/// How a fresh model's weights are drawn. Norm layers start at weight 1, bias 0, running mean 0
/// and running variance 1 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightInit {
    /// PyTorch's defaults for `Conv2d` and `Linear`: weights and biases uniform in
    /// ±1/sqrt(fan_in) (Kaiming-uniform with a = sqrt(5) reduces to that bound).
    #[default]
    Pytorch,
    /// TensorFlow's and Keras's defaults (the framework of the studies fedra reproduces):
    /// weights Glorot-uniform in ±sqrt(6 / (fan_in + fan_out)), biases zero. For a weight of
    /// shape `[out, in, kh, kw]` fan_in is `in·kh·kw` and fan_out `out·kh·kw`, as Keras and
    /// `torch.nn.init.xavier_uniform_` count them.
    Glorot,
}

impl WeightInit {
    /// The name in experiment files: `pytorch` or `glorot`.
    pub fn name(self) -> &'static str {
        match self {
            WeightInit::Pytorch => "pytorch",
            WeightInit::Glorot => "glorot",
        }
    }
}

impl Model {
    /// A freshly initialised model with PyTorch's defaults ([`WeightInit::Pytorch`]).
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Model, NnError> {
        Model::initialised(spec, seed, WeightInit::Pytorch)
    }

    /// A freshly initialised model: weights (and, for PyTorch's scheme, biases) drawn by `init`
    /// from ChaCha8 seeded with `seed`, layer by layer, weight before bias; norm weight 1, bias 0,
    /// running mean 0, running var 1.
    pub fn initialised(spec: &ModelSpec, seed: u64, init: WeightInit) -> Result<Model, NnError> {
        let mut model = Model::zeroed(spec)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let fans: Vec<usize> = Plan::build(spec)?
            .tensors
            .iter()
            .map(|t| t.fan_in)
            .collect();
        for (i, t) in model.tensors.iter().enumerate() {
            let dst = match t.kind {
                TensorKind::Param => &mut model.params[t.offset..t.offset + t.len],
                TensorKind::Buffer => &mut model.buffers[t.offset..t.offset + t.len],
            };
            let leaf = t.name.rsplit('.').next().unwrap_or("");
            if t.norm {
                let v = if leaf == "weight" || leaf == "running_var" {
                    1.0
                } else {
                    0.0
                };
                dst.fill(v);
                continue;
            }
            let fan_in = fans[i].max(1);
            let bound = match init {
                WeightInit::Pytorch => 1.0 / (fan_in as f64).sqrt(),
                WeightInit::Glorot if leaf == "bias" => {
                    dst.fill(0.0);
                    continue;
                }
                WeightInit::Glorot => {
                    // out * receptive field; a 1-D weight has no output axis of its own.
                    let fan_out = match t.shape.as_slice() {
                        [out, _, rest @ ..] => out * rest.iter().product::<usize>(),
                        _ => fan_in,
                    };
                    (6.0 / (fan_in + fan_out) as f64).sqrt()
                }
            };
            for v in dst.iter_mut() {
                *v = (rng.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32;
            }
        }
        Ok(model)
    }

    fn zeroed(spec: &ModelSpec) -> Result<Model, NnError> {
        let plan = Plan::build(spec)?;
        let tensors = plan
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: t.name.clone(),
                layer: t.layer.clone(),
                shape: t.shape.clone(),
                offset: t.offset,
                len: t.len,
                kind: if t.buffer {
                    TensorKind::Buffer
                } else {
                    TensorKind::Param
                },
                norm: t.norm,
            })
            .collect();
        Ok(Model {
            spec: spec.clone(),
            params: vec![0.0; plan.num_params],
            buffers: vec![0.0; plan.num_buffers],
            tensors,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn params(&self) -> &[f32] {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }
    pub fn buffers(&self) -> &[f32] {
        &self.buffers
    }
    pub fn buffers_mut(&mut self) -> &mut [f32] {
        &mut self.buffers
    }
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// The values of one named tensor (parameter or buffer).
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        let t = self.tensors.iter().find(|t| t.name == name)?;
        Some(match t.kind {
            TensorKind::Param => &self.params[t.offset..t.offset + t.len],
            TensorKind::Buffer => &self.buffers[t.offset..t.offset + t.len],
        })
    }

    /// Parameters and buffers in safetensors format, PyTorch names and layouts;
    /// `num_batches_tracked` as an i64 scalar as PyTorch stores it; buffers listed in metadata.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>, NnError> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for t in &self.tensors {
            let values = match t.kind {
                TensorKind::Param => &self.params[t.offset..t.offset + t.len],
                TensorKind::Buffer => &self.buffers[t.offset..t.offset + t.len],
            };
            if is_counter(&t.name) {
                let bytes = (values[0] as i64).to_le_bytes().to_vec();
                owned.push((t.name.clone(), Dtype::I64, t.shape.clone(), bytes));
            } else {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                owned.push((t.name.clone(), Dtype::F32, t.shape.clone(), bytes));
            }
        }
        let views = owned
            .iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| NnError::Safetensors {
                        origin: "(in memory)".into(),
                        tensor: Some(n.clone()),
                        msg: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let buffers: Vec<&str> = self
            .tensors
            .iter()
            .filter(|t| t.kind == TensorKind::Buffer)
            .map(|t| t.name.as_str())
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (META_BUFFERS.to_string(), buffers.join(",")),
            (META_MODEL.to_string(), self.spec.name.clone()),
        ]);
        // The metadata as the crate writes it (in the map's iteration order, which differs from
        // one process to the next) and with its keys sorted.
        let json_err = |e: serde_json::Error| NnError::Safetensors {
            origin: "(in memory)".into(),
            tensor: None,
            msg: e.to_string(),
        };
        let emitted = serde_json::to_string(&meta).map_err(json_err)?;
        let sorted =
            serde_json::to_string(&meta.iter().collect::<BTreeMap<_, _>>()).map_err(json_err)?;
        let mut bytes =
            safetensors::serialize(views, Some(meta)).map_err(|e| NnError::Safetensors {
                origin: "(in memory)".into(),
                tensor: None,
                msg: e.to_string(),
            })?;
        sort_metadata(&mut bytes, &emitted, &sorted);
        Ok(bytes)
    }

    /// Reads a model of `spec` from safetensors bytes, strictly (as PyTorch's
    /// `load_state_dict(strict=True)`): every tensor of the spec must be present with its shape
    /// and dtype, and no other tensor may be; one error lists every missing, unexpected and
    /// mis-shaped tensor by name. `origin` names the source in errors.
    pub fn from_safetensors_bytes(
        spec: &ModelSpec,
        bytes: &[u8],
        origin: &str,
    ) -> Result<Model, NnError> {
        let mut model = Model::zeroed(spec)?;
        model.read_safetensors(bytes, origin, &|_| false)?;
        Ok(model)
    }

    /// Loads `path` into `base` strictly, except the tensors `keep` selects by name: those keep
    /// `base`'s values and may be missing from the file, of another shape there, or present
    /// under names the model lacks (a new classification head over pre-trained features).
    pub fn load_safetensors_keeping(
        path: &Path,
        mut base: Model,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Model, NnError> {
        let bytes = std::fs::read(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        base.read_safetensors(&bytes, &path.display().to_string(), keep)?;
        Ok(base)
    }

    fn read_safetensors(
        &mut self,
        bytes: &[u8],
        origin: &str,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<(), NnError> {
        let err = |tensor: Option<&str>, msg: String| NnError::Safetensors {
            origin: origin.into(),
            tensor: tensor.map(str::to_string),
            msg,
        };
        let file = SafeTensors::deserialize(bytes).map_err(|e| err(None, e.to_string()))?;
        let (mut missing, mut misshaped) = (Vec::new(), Vec::new());
        for t in &self.tensors.clone() {
            if keep(&t.name) {
                continue;
            }
            let Ok(view) = file.tensor(&t.name) else {
                missing.push(t.name.clone());
                continue;
            };
            if view.shape() != t.shape.as_slice() {
                misshaped.push(format!(
                    "{} is {:?} in the file, {:?} in the model",
                    t.name,
                    view.shape(),
                    t.shape
                ));
                continue;
            }
            let dst = match t.kind {
                TensorKind::Param => &mut self.params[t.offset..t.offset + t.len],
                TensorKind::Buffer => &mut self.buffers[t.offset..t.offset + t.len],
            };
            match (view.dtype(), is_counter(&t.name)) {
                (Dtype::F32, _) => {
                    for (d, b) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                    // A NaN weight would otherwise surface rounds later as a non-finite loss
                    // (or, served over the network, as every client refusing the weights)
                    // without naming the file.
                    if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
                        return Err(err(
                            Some(&t.name),
                            format!("value {i} is {}; weights must be finite", dst[i]),
                        ));
                    }
                }
                (Dtype::I64, true) => {
                    let b: [u8; 8] = view.data()[..8]
                        .try_into()
                        .map_err(|_| err(Some(&t.name), "truncated i64".into()))?;
                    dst[0] = i64::from_le_bytes(b) as f32;
                }
                (d, _) => {
                    return Err(err(
                        Some(&t.name),
                        format!(
                            "dtype {d:?}, expected F32{}",
                            if is_counter(&t.name) { " or I64" } else { "" }
                        ),
                    ));
                }
            }
        }
        let known: std::collections::HashSet<&str> =
            self.tensors.iter().map(|t| t.name.as_str()).collect();
        let mut unexpected: Vec<&str> = file
            .names()
            .into_iter()
            .filter(|n| !known.contains(*n) && !keep(n))
            .collect();
        unexpected.sort_unstable();
        if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
            return Ok(());
        }
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing: {}", missing.join(", ")));
        }
        if !unexpected.is_empty() {
            problems.push(format!(
                "unexpected (not tensors of model {:?}): {}",
                self.spec.name,
                unexpected.join(", ")
            ));
        }
        if !misshaped.is_empty() {
            problems.push(format!("wrong shape: {}", misshaped.join("; ")));
        }
        Err(err(None, problems.join("; ")))
    }

    pub fn save_safetensors(&self, path: &Path) -> Result<(), NnError> {
        let bytes = self.to_safetensors_bytes()?;
        std::fs::write(path, bytes).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn load_safetensors(spec: &ModelSpec, path: &Path) -> Result<Model, NnError> {
        let bytes = std::fs::read(path).map_err(|source| NnError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Model::from_safetensors_bytes(spec, &bytes, &path.display().to_string())
    }
}

/// Rewrites the `__metadata__` object at the start of a safetensors header from the order the
/// crate wrote it in (`emitted`: a `HashMap`'s, random per process) to `sorted`, the same entries
/// with sorted keys and so the same length: the same model then gives the same file bytes in
/// every run, as its weights are the same bits. Leaves `bytes` alone if the header does not start
/// as expected.
fn sort_metadata(bytes: &mut [u8], emitted: &str, sorted: &str) {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let start = 8 + PREFIX.len();
    let end = start + emitted.len();
    if emitted.len() == sorted.len()
        && bytes.get(8..start) == Some(PREFIX)
        && bytes.get(start..end) == Some(emitted.as_bytes())
    {
        bytes[start..end].copy_from_slice(sorted.as_bytes());
    }
}

fn is_counter(name: &str) -> bool {
    name.ends_with(".num_batches_tracked")
}
