//! Compiling a [`ModelSpec`] into the graph the engine runs: a list of ops in execution order,
//! each reading one earlier activation (and a residual join a second one), with resolved shapes,
//! paddings, and the offsets of every named tensor in the parameter and buffer vectors.
//!
//! Activations are numbered: act 0 is the network input (after any crop), act i+1 the output of op
//! i. A sequential model reads act i in op i; a residual block's first conv and its projection read
//! the block's input, and its `Add` reads the main branch's output and the shortcut's. ReLUs that
//! directly follow a conv, linear layer, normalisation or join (and are the only reader of its
//! output) are fused into it.

use std::collections::BTreeSet;

use crate::error::{NnError, spec_err};
use crate::spec::{BlockNorm, LayerSpec, ModelSpec, Padding, gn_groups};

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
    /// Offset of the bias; meaningless when `bias` is false.
    pub b: usize,
    pub bias: bool,
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
    /// A following ReLU fused into this layer (applied after the affine map).
    pub relu: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct GnOp {
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
    pub w: usize,
    pub b: usize,
    /// A following ReLU fused into this layer (applied after the affine map).
    pub relu: bool,
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
    /// Per-channel mean of [c, hw] planes: output [c].
    GlobalAvgPool {
        c: usize,
        hw: usize,
    },
    /// Elementwise sum of this op's input and the activation `skip` (an earlier act index), then
    /// the fused ReLU if `relu`: the join of a residual block.
    Add {
        len: usize,
        skip: usize,
        relu: bool,
    },
}

impl Op {
    /// (offset, length) of this op's weight and bias in the parameter vector; (0, 0) twice for
    /// ops without parameters.
    pub fn param_ranges(&self) -> [(usize, usize); 2] {
        match self {
            Op::Conv(c) => [
                (c.w, c.cout * c.k()),
                (c.b, if c.bias { c.cout } else { 0 }),
            ],
            Op::Linear(l) => [(l.w, l.fout * l.fin), (l.b, l.fout)],
            Op::BatchNorm(b) => [(b.w, b.c), (b.b, b.c)],
            Op::GroupNorm(g) => [(g.w, g.c), (g.b, g.c)],
            Op::Pool(_)
            | Op::Lrn { .. }
            | Op::Relu { .. }
            | Op::Dropout { .. }
            | Op::GlobalAvgPool { .. }
            | Op::Add { .. } => [(0, 0); 2],
        }
    }

    /// Values per example of this op's output.
    pub fn out_len(&self) -> usize {
        match self {
            Op::Conv(c) => c.cout * c.hout * c.wout,
            Op::Pool(p) => p.c * p.hout * p.wout,
            Op::Lrn { c, hw, .. } => c * hw,
            Op::Relu { len } | Op::Dropout { len, .. } | Op::Add { len, .. } => *len,
            Op::GlobalAvgPool { c, .. } => *c,
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
    /// The act index each op reads (`inputs[i] <= i`).
    pub inputs: Vec<usize>,
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

/// Plan under construction: ops, the act each reads, and the shape of every act.
struct Builder {
    ops: Vec<Op>,
    inputs: Vec<usize>,
    /// [C, H, W] of each act, and whether it is a vector (after Flatten, Linear or pooling).
    shapes: Vec<([usize; 3], bool)>,
    tensors: Vec<PlannedTensor>,
    num_params: usize,
    num_buffers: usize,
    names: BTreeSet<String>,
}

impl Builder {
    /// The newest act.
    fn last(&self) -> usize {
        self.shapes.len() - 1
    }

    fn push(&mut self, op: Op, input: usize, shape: [usize; 3], flat: bool) -> usize {
        self.ops.push(op);
        self.inputs.push(input);
        self.shapes.push((shape, flat));
        self.last()
    }

    /// Registers `{layer}.{name}`; returns its offset in the parameter or buffer vector.
    fn tensor(
        &mut self,
        layer: &str,
        name: &str,
        shape: Vec<usize>,
        buffer: bool,
        norm: bool,
        fan_in: usize,
    ) -> usize {
        // Saturating: a spec's typo (`out_features = 10000000000000`) must reach the size check
        // after its layer, not overflow here.
        let len = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
            .max(1);
        let next = if buffer {
            &mut self.num_buffers
        } else {
            &mut self.num_params
        };
        let offset = *next;
        *next = next.saturating_add(len);
        self.tensors.push(PlannedTensor {
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
    }

    /// A user-given module name: [A-Za-z0-9_]+, unique.
    fn name(&mut self, field: &str, name: &str) -> Result<(), NnError> {
        let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(spec_err(field, format!("{name:?}: use [A-Za-z0-9_]+")));
        }
        if !self.names.insert(name.to_string()) {
            return Err(spec_err(field, format!("duplicate layer name {name:?}")));
        }
        Ok(())
    }

    /// The spatial shape of act `at`, or an error naming `field` when it is a vector.
    fn spatial(&self, field: &str, at: usize) -> Result<[usize; 3], NnError> {
        let (shape, flat) = self.shapes[at];
        if flat {
            return Err(spec_err(
                field,
                "spatial layer after Flatten/Linear/GlobalAvgPool: the input is a vector",
            ));
        }
        Ok(shape)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        field: &str,
        name: &str,
        input: usize,
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
        bias: bool,
    ) -> Result<usize, NnError> {
        let [c, h, w] = self.spatial(&format!("{field}.type"), input)?;
        if out_channels == 0 {
            return Err(spec_err(format!("{field}.out_channels"), "must be >= 1"));
        }
        let kf = format!("{field}.kernel");
        let (hout, pt) = window(&kf, h, kernel[0], stride[0], padding, 0)?;
        let (wout, pl) = window(&kf, w, kernel[1], stride[1], padding, 1)?;
        let fan_in = c * kernel[0] * kernel[1];
        let wo = self.tensor(
            name,
            "weight",
            vec![out_channels, c, kernel[0], kernel[1]],
            false,
            false,
            fan_in,
        );
        let bo = if bias {
            self.tensor(name, "bias", vec![out_channels], false, false, fan_in)
        } else {
            0
        };
        let op = Op::Conv(ConvOp {
            cin: c,
            hin: h,
            win: w,
            cout: out_channels,
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
            bias,
            relu: false,
        });
        Ok(self.push(op, input, [out_channels, hout, wout], false))
    }

    fn batch_norm(&mut self, name: &str, input: usize) -> usize {
        let ([c, h, w], flat) = self.shapes[input];
        let wo = self.tensor(name, "weight", vec![c], false, true, 0);
        let bo = self.tensor(name, "bias", vec![c], false, true, 0);
        let rm = self.tensor(name, "running_mean", vec![c], true, true, 0);
        let rv = self.tensor(name, "running_var", vec![c], true, true, 0);
        let nbt = self.tensor(name, "num_batches_tracked", vec![], true, true, 0);
        let op = Op::BatchNorm(BnOp {
            c,
            hw: h * w,
            w: wo,
            b: bo,
            rm,
            rv,
            nbt,
            relu: false,
        });
        self.push(op, input, [c, h, w], flat)
    }

    fn group_norm(
        &mut self,
        field: &str,
        name: &str,
        input: usize,
        groups: usize,
    ) -> Result<usize, NnError> {
        let [c, h, w] = self.spatial(&format!("{field}.type"), input)?;
        if groups == 0 || !c.is_multiple_of(groups) {
            return Err(spec_err(
                format!("{field}.groups"),
                format!("{groups} must be >= 1 and divide the {c} channels"),
            ));
        }
        let wo = self.tensor(name, "weight", vec![c], false, true, 0);
        let bo = self.tensor(name, "bias", vec![c], false, true, 0);
        let op = Op::GroupNorm(GnOp {
            c,
            hw: h * w,
            groups,
            w: wo,
            b: bo,
            relu: false,
        });
        Ok(self.push(op, input, [c, h, w], false))
    }

    fn relu(&mut self, input: usize) -> usize {
        let (shape, flat) = self.shapes[input];
        let len = shape.iter().product();
        self.push(Op::Relu { len }, input, shape, flat)
    }

    /// One ResNet basic block reading act `input`; returns its output act.
    #[allow(clippy::too_many_arguments)]
    fn basic_block(
        &mut self,
        field: &str,
        prefix: &str,
        input: usize,
        out_channels: usize,
        stride: usize,
        norm: BlockNorm,
        groups: usize,
    ) -> Result<usize, NnError> {
        let [cin, _, _] = self.spatial(&format!("{field}.type"), input)?;
        let norm_layer = |b: &mut Builder, name: &str, at: usize| match norm {
            BlockNorm::Batch => Ok(b.batch_norm(name, at)),
            BlockNorm::Group => b.group_norm(field, name, at, groups),
        };
        let (n1, n2) = match norm {
            BlockNorm::Batch => ("bn1", "bn2"),
            BlockNorm::Group => ("gn1", "gn2"),
        };
        let pad = Padding::Explicit([1, 1]);
        let s = [stride, stride];
        let at = self.conv(
            field,
            &format!("{prefix}.conv1"),
            input,
            out_channels,
            [3, 3],
            s,
            pad,
            false,
        )?;
        let at = norm_layer(self, &format!("{prefix}.{n1}"), at)?;
        let at = self.relu(at);
        let at = self.conv(
            field,
            &format!("{prefix}.conv2"),
            at,
            out_channels,
            [3, 3],
            [1, 1],
            pad,
            false,
        )?;
        let main = norm_layer(self, &format!("{prefix}.{n2}"), at)?;
        let skip = if stride != 1 || cin != out_channels {
            let at = self.conv(
                field,
                &format!("{prefix}.downsample.0"),
                input,
                out_channels,
                [1, 1],
                s,
                Padding::Valid,
                false,
            )?;
            norm_layer(self, &format!("{prefix}.downsample.1"), at)?
        } else {
            input
        };
        let (shape, _) = self.shapes[main];
        if self.shapes[skip].0 != shape {
            // Only reachable through odd strides/sizes: the projection and the main branch round
            // differently (e.g. a 1x1 map with stride 2 and padding).
            return Err(spec_err(
                format!("{field}.stride"),
                format!(
                    "block {prefix}: shortcut shape {:?} differs from the branch's {shape:?}",
                    self.shapes[skip].0
                ),
            ));
        }
        let len = shape.iter().product();
        let add = self.push(
            Op::Add {
                len,
                skip,
                relu: false,
            },
            main,
            shape,
            false,
        );
        Ok(self.relu(add))
    }
}

/// The most values one tensor, or one example's output of one layer, may hold (1 GiB of f32):
/// beyond the largest layers of real networks, far below what overflows a size computation.
const MAX_VALUES: usize = 1 << 28;

/// The most parameters (and, separately, buffers) a model may have: 4 GiB of f32.
const MAX_PARAMS: usize = 1 << 30;

/// Fails naming `field` when the layer just planned (whose tensors are `b.tensors[first..]`)
/// outputs or holds more than the limits allow.
fn check_sizes(b: &Builder, field: &str, first: usize) -> Result<(), NnError> {
    if let Some(t) = b.tensors[first..].iter().find(|t| t.len > MAX_VALUES) {
        return Err(spec_err(
            field,
            format!(
                "tensor {} of shape {:?} would hold more than {MAX_VALUES} values",
                t.name, t.shape
            ),
        ));
    }
    let (shape, _) = b.shapes[b.last()];
    if shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .is_none_or(|v| v > MAX_VALUES)
    {
        return Err(spec_err(
            field,
            format!("outputs {shape:?} per example, more than {MAX_VALUES} values"),
        ));
    }
    if b.num_params > MAX_PARAMS || b.num_buffers > MAX_PARAMS {
        return Err(spec_err(
            field,
            format!("the model would have more than {MAX_PARAMS} parameters or buffers"),
        ));
    }
    Ok(())
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
        if net_input
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_none_or(|v| v > MAX_VALUES)
        {
            return Err(spec_err(
                "input",
                format!("{net_input:?} is more than {MAX_VALUES} values an example"),
            ));
        }
        let mut b = Builder {
            ops: Vec::new(),
            inputs: Vec::new(),
            shapes: vec![(net_input, false)],
            tensors: Vec::new(),
            num_params: 0,
            num_buffers: 0,
            names: BTreeSet::new(),
        };
        for (i, layer) in spec.layers.iter().enumerate() {
            let field = format!("layers[{i}]");
            let f = |s: &str| format!("{field}.{s}");
            let first_tensor = b.tensors.len();
            let at = b.last();
            let (shape, flat) = b.shapes[at];
            let [c, hh, ww] = shape;
            let len = c * hh * ww;
            match layer {
                LayerSpec::Conv2d {
                    name,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    bias,
                } => {
                    b.spatial(&f("type"), at)?;
                    b.name(&f("name"), name)?;
                    b.conv(
                        &field,
                        name,
                        at,
                        *out_channels,
                        *kernel,
                        *stride,
                        *padding,
                        *bias,
                    )?;
                }
                LayerSpec::MaxPool2d {
                    kernel,
                    stride,
                    padding,
                } => {
                    b.spatial(&f("type"), at)?;
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
                    let op = Op::Pool(PoolOp {
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
                    });
                    b.push(op, at, [c, hout, wout], false);
                }
                LayerSpec::Lrn {
                    depth_radius,
                    bias,
                    alpha,
                    beta,
                } => {
                    b.spatial(&f("type"), at)?;
                    if !(bias.is_finite() && *bias > 0.0) {
                        return Err(spec_err(f("bias"), "must be finite and > 0"));
                    }
                    if !(alpha.is_finite() && *alpha >= 0.0) {
                        return Err(spec_err(f("alpha"), "must be finite and >= 0"));
                    }
                    if !beta.is_finite() {
                        return Err(spec_err(f("beta"), "must be finite"));
                    }
                    let op = Op::Lrn {
                        c,
                        hw: hh * ww,
                        radius: *depth_radius,
                        bias: *bias,
                        alpha: *alpha,
                        beta: *beta,
                    };
                    b.push(op, at, shape, false);
                }
                LayerSpec::Relu => {
                    b.relu(at);
                }
                LayerSpec::Flatten => {
                    // No op: NCHW data is already flat in C,H,W order.
                    b.shapes[at] = ([len, 1, 1], true);
                }
                LayerSpec::Linear { name, out_features } => {
                    if !flat {
                        return Err(spec_err(
                            f("type"),
                            "Linear needs a Flatten or GlobalAvgPool before it (input is [C,H,W])",
                        ));
                    }
                    b.name(&f("name"), name)?;
                    if *out_features == 0 {
                        return Err(spec_err(f("out_features"), "must be >= 1"));
                    }
                    let wo = b.tensor(name, "weight", vec![*out_features, len], false, false, len);
                    let bo = b.tensor(name, "bias", vec![*out_features], false, false, len);
                    let op = Op::Linear(LinearOp {
                        fin: len,
                        fout: *out_features,
                        w: wo,
                        b: bo,
                        relu: false,
                    });
                    b.push(op, at, [*out_features, 1, 1], true);
                }
                LayerSpec::Dropout { p } => {
                    if !(0.0..1.0).contains(p) {
                        return Err(spec_err(f("p"), format!("{p} not in [0, 1)")));
                    }
                    b.push(Op::Dropout { p: *p, len }, at, shape, flat);
                }
                LayerSpec::BatchNorm { name } => {
                    b.name(&f("name"), name)?;
                    b.batch_norm(name, at);
                }
                LayerSpec::GroupNorm { name, groups } => {
                    b.name(&f("name"), name)?;
                    b.group_norm(&field, name, at, *groups)?;
                }
                LayerSpec::GlobalAvgPool => {
                    b.spatial(&f("type"), at)?;
                    b.push(Op::GlobalAvgPool { c, hw: hh * ww }, at, [c, 1, 1], true);
                }
                LayerSpec::Stage {
                    name,
                    blocks,
                    out_channels,
                    stride,
                    norm,
                    groups,
                } => {
                    b.spatial(&f("type"), at)?;
                    b.name(&f("name"), name)?;
                    if *blocks == 0 {
                        return Err(spec_err(f("blocks"), "must be >= 1"));
                    }
                    if *out_channels == 0 {
                        return Err(spec_err(f("out_channels"), "must be >= 1"));
                    }
                    if *stride == 0 {
                        return Err(spec_err(f("stride"), "must be >= 1"));
                    }
                    if groups.is_some() && *norm != BlockNorm::Group {
                        return Err(spec_err(f("groups"), "only with norm = \"group\""));
                    }
                    let groups = groups.unwrap_or_else(|| gn_groups(*out_channels));
                    let mut at = at;
                    for k in 0..*blocks {
                        let s = if k == 0 { *stride } else { 1 };
                        at = b.basic_block(
                            &field,
                            &format!("{name}.{k}"),
                            at,
                            *out_channels,
                            s,
                            *norm,
                            groups,
                        )?;
                    }
                }
            }
            check_sizes(&b, &field, first_tensor)?;
        }
        let (shape, flat) = b.shapes[b.last()];
        if !flat || shape.iter().product::<usize>() != spec.classes {
            return Err(spec_err(
                "layers",
                format!(
                    "the last layer must output a vector of {} class logits; it outputs {:?}",
                    spec.classes, shape
                ),
            ));
        }
        let (ops, inputs) = fuse_relus(b.ops, b.inputs);
        Ok(Plan {
            net_input,
            ops,
            inputs,
            tensors: b.tensors,
            num_params: b.num_params,
            num_buffers: b.num_buffers,
        })
    }
}

/// How many ops read each act (`ops.len() + 1` counts; a join reads two acts).
pub(crate) fn readers(ops: &[Op], inputs: &[usize]) -> Vec<usize> {
    let mut readers = vec![0usize; ops.len() + 1];
    for (op, &input) in ops.iter().zip(inputs) {
        readers[input] += 1;
        if let Op::Add { skip, .. } = op {
            readers[*skip] += 1;
        }
    }
    readers
}

/// Fuses each ReLU into the conv, linear layer, normalisation or join right before it when it is
/// that op's only reader (one pass less each way); renumbers the acts.
fn fuse_relus(ops: Vec<Op>, inputs: Vec<usize>) -> (Vec<Op>, Vec<usize>) {
    let readers = readers(&ops, &inputs);
    // new_act[a]: the act of the fused plan holding old act a.
    let mut new_act = vec![0usize; ops.len() + 1];
    let mut fused: Vec<Op> = Vec::with_capacity(ops.len());
    let mut fused_inputs: Vec<usize> = Vec::with_capacity(ops.len());
    for (i, (mut op, input)) in ops.into_iter().zip(inputs).enumerate() {
        let follows = input == i && i > 0 && readers[i] == 1;
        if let (true, Op::Relu { .. }, Some(prev)) = (follows, &op, fused.last_mut()) {
            let flag = match prev {
                Op::Conv(c) => Some(&mut c.relu),
                Op::Linear(l) => Some(&mut l.relu),
                Op::Add { relu, .. } => Some(relu),
                Op::BatchNorm(b) => Some(&mut b.relu),
                Op::GroupNorm(g) => Some(&mut g.relu),
                _ => None,
            };
            if let Some(flag) = flag.filter(|f| !**f) {
                *flag = true;
                new_act[i + 1] = new_act[i];
                continue;
            }
        }
        if let Op::Add { skip, .. } = &mut op {
            *skip = new_act[*skip];
        }
        fused.push(op);
        fused_inputs.push(new_act[input]);
        new_act[i + 1] = fused.len();
    }
    (fused, fused_inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    /// In a ResNet every ReLU follows a normalisation (conv -> BN -> ReLU) or a join (BN -> add
    /// -> ReLU), and each is fused into it: no ReLU op is left, and an `Add` still reads the
    /// pre-activation output of its branch's last BatchNorm.
    #[test]
    fn resnet_relus_fuse_into_normalisations_and_joins() {
        let spec = ModelSpec::by_name("resnet20", [3, 32, 32], 10).unwrap();
        let plan = Plan::build(&spec).unwrap();
        let ops = &plan.ops;
        assert!(!ops.iter().any(|o| matches!(o, Op::Relu { .. })));
        let bn_relu = |o: &Op| matches!(o, Op::BatchNorm(b) if b.relu);
        // The stem's BatchNorm and the first of each of the 9 blocks.
        assert_eq!(ops.iter().filter(|o| bn_relu(o)).count(), 1 + 9);
        let joins: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i], Op::Add { relu: true, .. }))
            .collect();
        assert_eq!(joins.len(), 9);
        for i in joins {
            let main = plan.inputs[i];
            assert!(
                matches!(&ops[main - 1], Op::BatchNorm(b) if !b.relu),
                "join {i} reads op {}: {:?}",
                main - 1,
                ops[main - 1]
            );
        }
        // The same with GroupNorm.
        let spec = ModelSpec::by_name("resnet20-gn", [3, 32, 32], 10).unwrap();
        let ops = Plan::build(&spec).unwrap().ops;
        assert!(!ops.iter().any(|o| matches!(o, Op::Relu { .. })));
        let gn_relu = ops
            .iter()
            .filter(|o| matches!(o, Op::GroupNorm(g) if g.relu))
            .count();
        assert_eq!(gn_relu, 1 + 9);
    }
}
