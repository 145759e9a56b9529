//! fedra's neural-network layer: model specifications, one local-training step, evaluation, and
//! parameters as named tensors with safetensors I/O.
//!
//! Training runs on fedra's own CPU engine for sequential CNNs; matrix products go to the `gemm`
//! crate. The engine stays behind this module's interface so that another backend can be added
//! without touching the federated layer.

mod bench;
mod error;
mod kernels;
mod layers;
pub mod metrics;
mod model;
mod plan;
mod spec;
mod train;
mod winograd;

pub use bench::{BenchEffort, BenchRow, bench_train, gemm_gflops};
pub use error::NnError;
pub use metrics::{ClinicalMetrics, EvalCounts, clinical_metrics, roc_auc};
pub use model::{Model, TensorInfo, TensorKind, WeightInit};
pub use spec::{Augment, BUILTIN_MODELS, BlockNorm, LayerSpec, ModelSpec, Padding};
pub use train::{
    BnPolicy, ConvAlgorithm, EvalStats, GradCorrection, SgdConfig, StepStats, Trainer,
};
