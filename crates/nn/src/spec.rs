//! Model specifications as data: a [`ModelSpec`] is a list of layers ([`LayerSpec`]), where a
//! layer may also be a whole stage of residual blocks, plus the input shape, class count and
//! augmentation, readable and writable as TOML so users can define their own network without Rust.
//! This module also holds the built-in models; `crate::plan` compiles a spec into the graph the
//! engine runs.
//!
//! Built-in shapes (C,H,W per example):
//! - `mnist-cnn` [1,28,28] -> conv1 [32,28,28] -> pool [32,14,14] -> conv2 [64,14,14] -> pool
//!   [64,7,7] -> fc1 512 -> fc2 classes (1,663,370 parameters for 10 classes).
//! - `cifar-cnn` [3,32,32] rows, cropped to [3,24,24] -> conv1 [64,24,24] -> pool SAME [64,12,12]
//!   -> LRN -> conv2 [64,12,12] -> LRN -> pool SAME [64,6,6] -> fc1 384 -> fc2 192 -> fc3 classes.
//! - `kws-cnn` [1,49,10] -> conv1 10x4 VALID [28,40,7] -> conv2 10x4 stride (2,1) VALID [30,16,4]
//!   -> linear 16 (no activation) -> fc1 128 -> fc2 classes.
//! - `-bn` variants put BatchNorm (`bn1`, `bn2`) after each conv, before its ReLU; `-gn` variants
//!   put GroupNorm (`gn1`, `gn2`) there, with the largest group count <= 8 dividing the channels
//!   (8 for 32/64 channels, 7 for 28, 6 for 30).
//! - `resnet20`, `resnet32`, `resnet56`: He et al. 2016's CIFAR ResNets (6n+2 layers, n = 3, 5, 9):
//!   conv1 3x3 16 -> bn1 -> ReLU -> `layer1` (n blocks, 16 channels) -> `layer2` (32, stride 2)
//!   -> `layer3` (64, stride 2) -> global average pool -> `fc`; convolutions without bias,
//!   projection shortcuts (1x1 conv + BN, "option B") where the shape changes. resnet20 has
//!   272,474 parameters for 10 classes. `-gn` variants use GroupNorm (`gn1`, `gn2`, groups as above).
//! - `resnet18`: torchvision's layout and names (conv1 7x7/2 -> bn1 -> ReLU -> max-pool 3x3/2 pad 1
//!   -> `layer1`..`layer4` of 2 blocks, 64..512 channels -> global average pool -> `fc`), so a
//!   torchvision state dict saved as safetensors loads by name (11,689,512 parameters for 1000
//!   classes).

use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::plan::{Op, Plan};

/// How a convolution or pooling window is padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// No padding.
    #[default]
    Valid,
    /// TensorFlow 'SAME': output = ceil(input / stride); total padding split floor-half before.
    Same,
    /// Symmetric explicit padding [rows, cols], as PyTorch's `padding=`.
    Explicit([usize; 2]),
}

fn one_one() -> [usize; 2] {
    [1, 1]
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn lrn_radius() -> usize {
    4
}
fn lrn_bias() -> f32 {
    1.0
}
fn lrn_alpha() -> f32 {
    0.001 / 9.0
}
fn lrn_beta() -> f32 {
    0.75
}

/// One layer of a sequential model. Layers with parameters carry the module name used for their
/// tensors (`conv1` gives `conv1.weight`, `conv1.bias`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LayerSpec {
    Conv2d {
        name: String,
        out_channels: usize,
        kernel: [usize; 2],
        #[serde(default = "one_one")]
        stride: [usize; 2],
        #[serde(default)]
        padding: Padding,
        /// Whether the layer has a bias (`conv.bias`); ResNets' convolutions, followed by a
        /// normalisation, have none.
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        bias: bool,
    },
    MaxPool2d {
        kernel: [usize; 2],
        /// Defaults to the kernel size, as in PyTorch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<[usize; 2]>,
        #[serde(default)]
        padding: Padding,
    },
    /// TensorFlow local response normalisation across channels (alpha not divided by the window).
    Lrn {
        #[serde(default = "lrn_radius")]
        depth_radius: usize,
        #[serde(default = "lrn_bias")]
        bias: f32,
        #[serde(default = "lrn_alpha")]
        alpha: f32,
        #[serde(default = "lrn_beta")]
        beta: f32,
    },
    Relu,
    Flatten,
    Linear {
        name: String,
        out_features: usize,
    },
    Dropout {
        p: f32,
    },
    /// BatchNorm2d on [C,H,W] activations, BatchNorm1d after a Flatten/Linear.
    BatchNorm {
        name: String,
    },
    GroupNorm {
        name: String,
        groups: usize,
    },
    /// Mean over each channel's plane: [C,H,W] -> a vector of C values.
    GlobalAvgPool,
    /// A stage of ResNet basic blocks (He et al. 2016). Block `b` computes conv3x3 -> norm ->
    /// ReLU -> conv3x3 -> norm, adds its input (through a 1x1 conv + norm projection when the
    /// stride or channel count changes: "option B"), then ReLU. Only the first block strides.
    /// Tensors follow torchvision: `{name}.{b}.conv1.weight`, `{name}.{b}.bn1.running_mean`
    /// (`gn1` with GroupNorm), `{name}.0.downsample.0.weight` (the projection's conv) and
    /// `{name}.0.downsample.1.*` (its norm).
    Stage {
        name: String,
        blocks: usize,
        out_channels: usize,
        #[serde(default = "one")]
        stride: usize,
        #[serde(default)]
        norm: BlockNorm,
        /// GroupNorm's group count (default: the largest <= 8 dividing the channels).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        groups: Option<usize>,
    },
}

/// The normalisation inside a [`LayerSpec::Stage`]'s blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockNorm {
    #[default]
    Batch,
    Group,
}

/// Data augmentation applied by the trainer before the first layer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Random crop [H, W] in training, centre crop in evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<[usize; 2]>,
    /// Random horizontal flip (probability 1/2) in training.
    #[serde(default)]
    pub hflip: bool,
}

/// A sequential model described as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    /// C, H, W of a dataset row (before any crop).
    pub input: [usize; 3],
    pub classes: usize,
    #[serde(default)]
    pub augment: Augment,
    pub layers: Vec<LayerSpec>,
}

/// Names accepted by [`ModelSpec::by_name`].
pub const BUILTIN_MODELS: &[&str] = &[
    "mnist-cnn",
    "mnist-cnn-bn",
    "mnist-cnn-gn",
    "cifar-cnn",
    "cifar-cnn-bn",
    "cifar-cnn-gn",
    "kws-cnn",
    "kws-cnn-bn",
    "kws-cnn-gn",
    "mlp",
    "logreg",
    "resnet20",
    "resnet20-gn",
    "resnet32",
    "resnet32-gn",
    "resnet56",
    "resnet56-gn",
    "resnet18",
];

fn conv(name: &str, out: usize, k: [usize; 2], stride: [usize; 2], padding: Padding) -> LayerSpec {
    LayerSpec::Conv2d {
        name: name.into(),
        out_channels: out,
        kernel: k,
        stride,
        padding,
        bias: true,
    }
}
fn linear(name: &str, out: usize) -> LayerSpec {
    LayerSpec::Linear {
        name: name.into(),
        out_features: out,
    }
}

/// Largest group count <= 8 that divides `channels`.
pub(crate) fn gn_groups(channels: usize) -> usize {
    (1..=8.min(channels))
        .rev()
        .find(|g| channels.is_multiple_of(*g))
        .unwrap_or(1)
}

#[derive(Clone, Copy, PartialEq)]
enum Norm {
    None,
    Batch,
    Group,
}

/// Conv layer, then the variant's normalisation (index `i`), then ReLU.
fn conv_block(layers: &mut Vec<LayerSpec>, i: usize, conv_layer: LayerSpec, norm: Norm) {
    let channels = match &conv_layer {
        LayerSpec::Conv2d { out_channels, .. } => *out_channels,
        _ => 0,
    };
    layers.push(conv_layer);
    match norm {
        Norm::None => {}
        Norm::Batch => layers.push(LayerSpec::BatchNorm {
            name: format!("bn{i}"),
        }),
        Norm::Group => layers.push(LayerSpec::GroupNorm {
            name: format!("gn{i}"),
            groups: gn_groups(channels),
        }),
    }
    layers.push(LayerSpec::Relu);
}

impl ModelSpec {
    /// A built-in model (see [`BUILTIN_MODELS`]) for rows of shape `input` and `classes` classes.
    pub fn by_name(name: &str, input: [usize; 3], classes: usize) -> Result<ModelSpec, NnError> {
        let (base, norm) = if let Some(b) = name.strip_suffix("-bn") {
            (b, Norm::Batch)
        } else if let Some(b) = name.strip_suffix("-gn") {
            (b, Norm::Group)
        } else {
            (name, Norm::None)
        };
        let unknown = || NnError::UnknownModel {
            name: name.into(),
            known: BUILTIN_MODELS.join(", "),
        };
        let mut layers = Vec::new();
        let mut augment = Augment::default();
        let pool2 = LayerSpec::MaxPool2d {
            kernel: [2, 2],
            stride: None,
            padding: Padding::Valid,
        };
        let pool3 = LayerSpec::MaxPool2d {
            kernel: [3, 3],
            stride: Some([2, 2]),
            padding: Padding::Same,
        };
        let lrn = LayerSpec::Lrn {
            depth_radius: lrn_radius(),
            bias: lrn_bias(),
            alpha: lrn_alpha(),
            beta: lrn_beta(),
        };
        match base {
            "mnist-cnn" => {
                conv_block(
                    &mut layers,
                    1,
                    conv("conv1", 32, [5, 5], [1, 1], Padding::Same),
                    norm,
                );
                layers.push(pool2.clone());
                conv_block(
                    &mut layers,
                    2,
                    conv("conv2", 64, [5, 5], [1, 1], Padding::Same),
                    norm,
                );
                layers.push(pool2);
                layers.push(LayerSpec::Flatten);
                layers.extend([linear("fc1", 512), LayerSpec::Relu, linear("fc2", classes)]);
            }
            "cifar-cnn" => {
                augment = Augment {
                    crop: Some([24, 24]),
                    hflip: true,
                };
                conv_block(
                    &mut layers,
                    1,
                    conv("conv1", 64, [5, 5], [1, 1], Padding::Same),
                    norm,
                );
                layers.push(pool3.clone());
                layers.push(lrn.clone());
                conv_block(
                    &mut layers,
                    2,
                    conv("conv2", 64, [5, 5], [1, 1], Padding::Same),
                    norm,
                );
                layers.push(lrn);
                layers.push(pool3);
                layers.push(LayerSpec::Flatten);
                layers.extend([
                    linear("fc1", 384),
                    LayerSpec::Relu,
                    linear("fc2", 192),
                    LayerSpec::Relu,
                    linear("fc3", classes),
                ]);
            }
            "kws-cnn" => {
                conv_block(
                    &mut layers,
                    1,
                    conv("conv1", 28, [10, 4], [1, 1], Padding::Valid),
                    norm,
                );
                conv_block(
                    &mut layers,
                    2,
                    conv("conv2", 30, [10, 4], [2, 1], Padding::Valid),
                    norm,
                );
                layers.push(LayerSpec::Flatten);
                layers.extend([
                    linear("linear", 16),
                    linear("fc1", 128),
                    LayerSpec::Relu,
                    linear("fc2", classes),
                ]);
            }
            "mlp" if norm == Norm::None => {
                layers.push(LayerSpec::Flatten);
                layers.extend([
                    linear("fc1", 200),
                    LayerSpec::Relu,
                    linear("fc2", 200),
                    LayerSpec::Relu,
                    linear("fc3", classes),
                ]);
            }
            "logreg" if norm == Norm::None => {
                layers.push(LayerSpec::Flatten);
                layers.push(linear("fc", classes));
            }
            "resnet20" | "resnet32" | "resnet56" if norm != Norm::Batch => {
                let blocks = match base {
                    "resnet20" => 3,
                    "resnet32" => 5,
                    _ => 9,
                };
                augment.hflip = true;
                let group = norm == Norm::Group;
                layers.push(LayerSpec::Conv2d {
                    name: "conv1".into(),
                    out_channels: 16,
                    kernel: [3, 3],
                    stride: [1, 1],
                    padding: Padding::Explicit([1, 1]),
                    bias: false,
                });
                layers.push(if group {
                    LayerSpec::GroupNorm {
                        name: "gn1".into(),
                        groups: gn_groups(16),
                    }
                } else {
                    LayerSpec::BatchNorm { name: "bn1".into() }
                });
                layers.push(LayerSpec::Relu);
                for (i, (channels, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
                    layers.push(LayerSpec::Stage {
                        name: format!("layer{}", i + 1),
                        blocks,
                        out_channels: channels,
                        stride,
                        norm: if group {
                            BlockNorm::Group
                        } else {
                            BlockNorm::Batch
                        },
                        groups: None,
                    });
                }
                layers.push(LayerSpec::GlobalAvgPool);
                layers.push(linear("fc", classes));
            }
            "resnet18" if norm == Norm::None => {
                layers.push(LayerSpec::Conv2d {
                    name: "conv1".into(),
                    out_channels: 64,
                    kernel: [7, 7],
                    stride: [2, 2],
                    padding: Padding::Explicit([3, 3]),
                    bias: false,
                });
                layers.push(LayerSpec::BatchNorm { name: "bn1".into() });
                layers.push(LayerSpec::Relu);
                layers.push(LayerSpec::MaxPool2d {
                    kernel: [3, 3],
                    stride: Some([2, 2]),
                    padding: Padding::Explicit([1, 1]),
                });
                for (i, (channels, stride)) in [(64, 1), (128, 2), (256, 2), (512, 2)]
                    .into_iter()
                    .enumerate()
                {
                    layers.push(LayerSpec::Stage {
                        name: format!("layer{}", i + 1),
                        blocks: 2,
                        out_channels: channels,
                        stride,
                        norm: BlockNorm::Batch,
                        groups: None,
                    });
                }
                layers.push(LayerSpec::GlobalAvgPool);
                layers.push(linear("fc", classes));
            }
            _ => return Err(unknown()),
        }
        let spec = ModelSpec {
            name: name.into(),
            input,
            classes,
            augment,
            layers,
        };
        Plan::build(&spec)?;
        Ok(spec)
    }

    /// Parses and validates a user-defined model.
    pub fn from_toml_str(s: &str) -> Result<ModelSpec, NnError> {
        let spec: ModelSpec = toml::from_str(s).map_err(|e| NnError::Toml(e.to_string()))?;
        Plan::build(&spec)?;
        Ok(spec)
    }

    /// The spec as TOML (round-trips through [`ModelSpec::from_toml_str`]).
    pub fn to_toml_string(&self) -> String {
        // Serialising plain data with known field types cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise spec: {e}\n"))
    }

    pub fn num_params(&self) -> Result<usize, NnError> {
        Ok(Plan::build(self)?.num_params)
    }

    /// Training FLOPs per example: 2 x MACs of conv/linear forward, times 3 (forward, input
    /// gradient, weight gradient), the usual estimate; elementwise layers are not counted.
    pub fn flops_per_sample(&self) -> Result<f64, NnError> {
        let plan = Plan::build(self)?;
        let macs: f64 = plan
            .ops
            .iter()
            .map(|op| match *op {
                Op::Conv(ref c) => (c.cout * c.k() * c.hout * c.wout) as f64,
                Op::Linear(ref l) => (l.fin * l.fout) as f64,
                _ => 0.0,
            })
            .sum();
        Ok(6.0 * macs)
    }
}
