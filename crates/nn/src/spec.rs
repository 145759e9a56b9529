//! Model specifications as data: a [`ModelSpec`] is a list of sequential layers ([`LayerSpec`])
//! plus the input shape, class count and augmentation, readable and writable as TOML so users can
//! define their own CNN without Rust. This module also holds the built-in models of the study and
//! compiles a spec into a [`Plan`]: resolved shapes, paddings and the offsets of every named tensor.
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

use serde::{Deserialize, Serialize};

use crate::error::{NnError, spec_err};

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
];

fn conv(name: &str, out: usize, k: [usize; 2], stride: [usize; 2], padding: Padding) -> LayerSpec {
    LayerSpec::Conv2d {
        name: name.into(),
        out_channels: out,
        kernel: k,
        stride,
        padding,
    }
}
fn linear(name: &str, out: usize) -> LayerSpec {
    LayerSpec::Linear {
        name: name.into(),
        out_features: out,
    }
}

/// Largest group count <= 8 that divides `channels`.
fn gn_groups(channels: usize) -> usize {
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

/// A convolution with resolved geometry; `w`, `b` are offsets into the parameter vector.
#[derive(Clone, Debug)]
pub(crate) struct ConvOp {
    pub cin: usize,
    pub hin: usize,
    pub win: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub hout: usize,
    pub wout: usize,
    pub w: usize,
    pub b: usize,
    /// A following ReLU fused into this layer (applied after the bias).
    pub relu: bool,
}
impl ConvOp {
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
}

#[derive(Clone, Debug)]
pub(crate) struct PoolOp {
    pub c: usize,
    pub hin: usize,
    pub win: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub hout: usize,
    pub wout: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct LinearOp {
    pub fin: usize,
    pub fout: usize,
    pub w: usize,
    pub b: usize,
    /// A following ReLU fused into this layer (applied after the bias).
    pub relu: bool,
}

/// BatchNorm: param offsets `w`, `b`; buffer offsets `rm`, `rv`, `nbt`.
#[derive(Clone, Debug)]
pub(crate) struct BnOp {
    pub c: usize,
    pub hw: usize,
    pub w: usize,
    pub b: usize,
    pub rm: usize,
    pub rv: usize,
    pub nbt: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct GnOp {
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
    pub w: usize,
    pub b: usize,
}

/// One compiled layer (Flatten compiles to nothing: NCHW data is already flat in C,H,W order).
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Conv(ConvOp),
    Pool(PoolOp),
    Lrn {
        c: usize,
        hw: usize,
        radius: usize,
        bias: f32,
        alpha: f32,
        beta: f32,
    },
    Relu {
        len: usize,
    },
    Linear(LinearOp),
    Dropout {
        p: f32,
        len: usize,
    },
    BatchNorm(BnOp),
    GroupNorm(GnOp),
}

impl Op {
    /// (offset, length) of this op's weight and bias in the parameter vector; (0, 0) twice for
    /// ops without parameters.
    pub fn param_ranges(&self) -> [(usize, usize); 2] {
        match self {
            Op::Conv(c) => [(c.w, c.cout * c.k()), (c.b, c.cout)],
            Op::Linear(l) => [(l.w, l.fout * l.fin), (l.b, l.fout)],
            Op::BatchNorm(b) => [(b.w, b.c), (b.b, b.c)],
            Op::GroupNorm(g) => [(g.w, g.c), (g.b, g.c)],
            Op::Pool(_) | Op::Lrn { .. } | Op::Relu { .. } | Op::Dropout { .. } => [(0, 0); 2],
        }
    }

    /// Values per example of this op's output.
    pub fn out_len(&self) -> usize {
        match self {
            Op::Conv(c) => c.cout * c.hout * c.wout,
            Op::Pool(p) => p.c * p.hout * p.wout,
            Op::Lrn { c, hw, .. } => c * hw,
            Op::Relu { len } | Op::Dropout { len, .. } => *len,
            Op::Linear(l) => l.fout,
            Op::BatchNorm(b) => b.c * b.hw,
            Op::GroupNorm(g) => g.c * g.hw,
        }
    }
}

/// Where a named tensor lives (see [`crate::TensorInfo`]).
#[derive(Clone, Debug)]
pub(crate) struct PlannedTensor {
    pub name: String,
    pub layer: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub buffer: bool,
    pub norm: bool,
    /// fan_in for PyTorch's default uniform init; 0 for norm tensors.
    pub fan_in: usize,
}

/// A validated, compiled spec.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub net_input: [usize; 3],
    pub ops: Vec<Op>,
    pub tensors: Vec<PlannedTensor>,
    pub num_params: usize,
    pub num_buffers: usize,
}

/// Output size and leading padding of one window dimension.
fn window(
    field: &str,
    size: usize,
    k: usize,
    s: usize,
    pad: Padding,
    axis: usize,
) -> Result<(usize, usize), NnError> {
    if k == 0 || s == 0 {
        return Err(spec_err(field, "kernel and stride must be >= 1"));
    }
    match pad {
        Padding::Valid => {
            if k > size {
                return Err(spec_err(
                    field,
                    format!("kernel {k} larger than input {size} (VALID padding)"),
                ));
            }
            Ok(((size - k) / s + 1, 0))
        }
        Padding::Same => {
            let out = size.div_ceil(s);
            let total = ((out - 1) * s + k).saturating_sub(size);
            Ok((out, total / 2))
        }
        Padding::Explicit(p) => {
            let p = p[axis];
            if size + 2 * p < k {
                return Err(spec_err(
                    field,
                    format!("kernel {k} larger than padded input {}", size + 2 * p),
                ));
            }
            Ok(((size + 2 * p - k) / s + 1, p))
        }
    }
}

impl Plan {
    pub fn build(spec: &ModelSpec) -> Result<Plan, NnError> {
        if spec.classes < 2 {
            return Err(spec_err("classes", "need at least 2 classes"));
        }
        if spec.classes > usize::from(u16::MAX) {
            return Err(spec_err("classes", "labels are u16: at most 65535 classes"));
        }
        let [c0, h0, w0] = spec.input;
        if c0 == 0 || h0 == 0 || w0 == 0 {
            return Err(spec_err("input", "every dimension must be >= 1"));
        }
        let (mut h, mut w) = (h0, w0);
        if let Some([ch, cw]) = spec.augment.crop {
            if ch == 0 || cw == 0 || ch > h0 || cw > w0 {
                return Err(spec_err(
                    "augment.crop",
                    format!("crop {ch}x{cw} must be non-empty and fit the input {h0}x{w0}"),
                ));
            }
            (h, w) = (ch, cw);
        }
        let net_input = [c0, h, w];
        let mut shape = net_input;
        let mut flat = false;
        let mut ops = Vec::new();
        let mut tensors: Vec<PlannedTensor> = Vec::new();
        let mut np = 0usize;
        let mut nb = 0usize;
        let mut names = std::collections::BTreeSet::new();
        let mut add = |tensors: &mut Vec<PlannedTensor>,
                       name: &str,
                       layer: &str,
                       shape: Vec<usize>,
                       buffer: bool,
                       norm: bool,
                       fan_in: usize|
         -> usize {
            let len = shape.iter().product::<usize>().max(1);
            let off = if buffer { &mut nb } else { &mut np };
            let offset = *off;
            *off += len;
            tensors.push(PlannedTensor {
                name: format!("{layer}.{name}"),
                layer: layer.into(),
                shape,
                offset,
                len,
                buffer,
                norm,
                fan_in,
            });
            offset
        };
        for (i, layer) in spec.layers.iter().enumerate() {
            let f = |s: &str| format!("layers[{i}].{s}");
            let mut check_name = |name: &str| -> Result<(), NnError> {
                let ok =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(spec_err(f("name"), format!("{name:?}: use [A-Za-z0-9_]+")));
                }
                if !names.insert(name.to_string()) {
                    return Err(spec_err(
                        f("name"),
                        format!("duplicate layer name {name:?}"),
                    ));
                }
                Ok(())
            };
            let [c, hh, ww] = shape;
            let len = c * hh * ww;
            let spatial = |flat: bool| -> Result<(), NnError> {
                if flat {
                    Err(spec_err(
                        f("type"),
                        "spatial layer after Flatten/Linear: the input is a vector",
                    ))
                } else {
                    Ok(())
                }
            };
            match layer {
                LayerSpec::Conv2d {
                    name,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                } => {
                    spatial(flat)?;
                    check_name(name)?;
                    if *out_channels == 0 {
                        return Err(spec_err(f("out_channels"), "must be >= 1"));
                    }
                    let (hout, pt) = window(&f("kernel"), hh, kernel[0], stride[0], *padding, 0)?;
                    let (wout, pl) = window(&f("kernel"), ww, kernel[1], stride[1], *padding, 1)?;
                    let fan_in = c * kernel[0] * kernel[1];
                    let wo = add(
                        &mut tensors,
                        "weight",
                        name,
                        vec![*out_channels, c, kernel[0], kernel[1]],
                        false,
                        false,
                        fan_in,
                    );
                    let bo = add(
                        &mut tensors,
                        "bias",
                        name,
                        vec![*out_channels],
                        false,
                        false,
                        fan_in,
                    );
                    ops.push(Op::Conv(ConvOp {
                        cin: c,
                        hin: hh,
                        win: ww,
                        cout: *out_channels,
                        kh: kernel[0],
                        kw: kernel[1],
                        sh: stride[0],
                        sw: stride[1],
                        pt,
                        pl,
                        hout,
                        wout,
                        w: wo,
                        b: bo,
                        relu: false,
                    }));
                    shape = [*out_channels, hout, wout];
                }
                LayerSpec::MaxPool2d {
                    kernel,
                    stride,
                    padding,
                } => {
                    spatial(flat)?;
                    let stride = stride.unwrap_or(*kernel);
                    let (hout, pt) = window(&f("kernel"), hh, kernel[0], stride[0], *padding, 0)?;
                    let (wout, pl) = window(&f("kernel"), ww, kernel[1], stride[1], *padding, 1)?;
                    if let Padding::Explicit(p) = padding
                        && (2 * p[0] > kernel[0] || 2 * p[1] > kernel[1])
                    {
                        return Err(spec_err(
                            f("padding"),
                            "pad should be at most half the kernel",
                        ));
                    }
                    ops.push(Op::Pool(PoolOp {
                        c,
                        hin: hh,
                        win: ww,
                        kh: kernel[0],
                        kw: kernel[1],
                        sh: stride[0],
                        sw: stride[1],
                        pt,
                        pl,
                        hout,
                        wout,
                    }));
                    shape = [c, hout, wout];
                }
                LayerSpec::Lrn {
                    depth_radius,
                    bias,
                    alpha,
                    beta,
                } => {
                    spatial(flat)?;
                    if !(bias.is_finite() && *bias > 0.0) {
                        return Err(spec_err(f("bias"), "must be finite and > 0"));
                    }
                    if !(alpha.is_finite() && *alpha >= 0.0) {
                        return Err(spec_err(f("alpha"), "must be finite and >= 0"));
                    }
                    if !beta.is_finite() {
                        return Err(spec_err(f("beta"), "must be finite"));
                    }
                    ops.push(Op::Lrn {
                        c,
                        hw: hh * ww,
                        radius: *depth_radius,
                        bias: *bias,
                        alpha: *alpha,
                        beta: *beta,
                    });
                }
                LayerSpec::Relu => ops.push(Op::Relu { len }),
                LayerSpec::Flatten => {
                    shape = [len, 1, 1];
                    flat = true;
                }
                LayerSpec::Linear { name, out_features } => {
                    if !flat {
                        return Err(spec_err(
                            f("type"),
                            "Linear needs a Flatten before it (input is [C,H,W])",
                        ));
                    }
                    check_name(name)?;
                    if *out_features == 0 {
                        return Err(spec_err(f("out_features"), "must be >= 1"));
                    }
                    let wo = add(
                        &mut tensors,
                        "weight",
                        name,
                        vec![*out_features, len],
                        false,
                        false,
                        len,
                    );
                    let bo = add(
                        &mut tensors,
                        "bias",
                        name,
                        vec![*out_features],
                        false,
                        false,
                        len,
                    );
                    ops.push(Op::Linear(LinearOp {
                        fin: len,
                        fout: *out_features,
                        w: wo,
                        b: bo,
                        relu: false,
                    }));
                    shape = [*out_features, 1, 1];
                }
                LayerSpec::Dropout { p } => {
                    if !(0.0..1.0).contains(p) {
                        return Err(spec_err(f("p"), format!("{p} not in [0, 1)")));
                    }
                    ops.push(Op::Dropout { p: *p, len });
                }
                LayerSpec::BatchNorm { name } => {
                    check_name(name)?;
                    let w = add(&mut tensors, "weight", name, vec![c], false, true, 0);
                    let b = add(&mut tensors, "bias", name, vec![c], false, true, 0);
                    let rm = add(&mut tensors, "running_mean", name, vec![c], true, true, 0);
                    let rv = add(&mut tensors, "running_var", name, vec![c], true, true, 0);
                    let nbt = add(
                        &mut tensors,
                        "num_batches_tracked",
                        name,
                        vec![],
                        true,
                        true,
                        0,
                    );
                    ops.push(Op::BatchNorm(BnOp {
                        c,
                        hw: hh * ww,
                        w,
                        b,
                        rm,
                        rv,
                        nbt,
                    }));
                }
                LayerSpec::GroupNorm { name, groups } => {
                    spatial(flat)?;
                    check_name(name)?;
                    if *groups == 0 || !c.is_multiple_of(*groups) {
                        return Err(spec_err(
                            f("groups"),
                            format!("{groups} must be >= 1 and divide the {c} channels"),
                        ));
                    }
                    let w = add(&mut tensors, "weight", name, vec![c], false, true, 0);
                    let b = add(&mut tensors, "bias", name, vec![c], false, true, 0);
                    ops.push(Op::GroupNorm(GnOp {
                        c,
                        hw: hh * ww,
                        groups: *groups,
                        w,
                        b,
                    }));
                }
            }
        }
        let out = shape.iter().product::<usize>();
        if !flat || out != spec.classes {
            return Err(spec_err(
                "layers",
                format!(
                    "the last layer must output a vector of {} class logits; it outputs {:?}",
                    spec.classes, shape
                ),
            ));
        }
        // Fuse each ReLU into the conv/linear layer before it: one pass less each way.
        let mut fused: Vec<Op> = Vec::with_capacity(ops.len());
        for op in ops {
            match (fused.last_mut(), &op) {
                (Some(Op::Conv(c)), Op::Relu { .. }) if !c.relu => c.relu = true,
                (Some(Op::Linear(l)), Op::Relu { .. }) if !l.relu => l.relu = true,
                _ => fused.push(op),
            }
        }
        let ops = fused;
        Ok(Plan {
            net_input,
            ops,
            tensors,
            num_params: np,
            num_buffers: nb,
        })
    }
}
