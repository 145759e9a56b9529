//! Experiment configuration: the TOML file a user writes, parsed strictly. Unknown keys are
//! errors (a typo must not silently fall back to a default), and every value is checked with an
//! error naming its key, e.g. `train.lr`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use fedra_data::{Dataset, TrainTest};
use fedra_nn::{BnPolicy, WeightInit};

/// A whole experiment: what data, how it is split, which model, how it trains and is evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub data: DataConfig,
    pub partition: PartitionConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub strategy: StrategyConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub run: RunConfig,
    /// The study's data-sharing strategy; absent means no sharing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<crate::share::ShareConfig>,
    /// How `fedra serve` runs the experiment over a network; a simulation ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeployConfig>,
    /// Clients that misbehave on purpose (simulation only), to measure what an aggregator
    /// survives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackConfig>,
    /// Client-level differential privacy (DP-FedAvg); absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacyConfig>,
}

/// The `[attack]` table: which clients attack, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackConfig {
    /// Client ids (0-based) that attack whenever they are sampled.
    pub clients: Vec<usize>,
    pub kind: AttackKind,
    /// `sign-flip`: the update sent is -factor x the honest one; `scale`: factor x; `random`:
    /// Gaussian noise of standard deviation `factor` in place of the update. Not for
    /// `label-flip`. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f32>,
}

/// How an attacking client corrupts its contribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackKind {
    /// Send the honest update reversed (and scaled by `factor`).
    SignFlip,
    /// Send the honest update scaled by `factor`.
    Scale,
    /// Send Gaussian noise instead of an update.
    Random,
    /// Train honestly on labels turned around (class c becomes classes - 1 - c).
    LabelFlip,
}

/// The `[deploy]` table: when a networked federation starts, how long a round may take and who
/// may take part. Every field has a default, so an empty table is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Wait until this many clients have joined before the first round (default: all
    /// `partition.clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_clients: Option<usize>,
    /// Give up waiting for `min_clients` after this many seconds.
    #[serde(default = "default_join_timeout")]
    pub join_timeout_s: f64,
    /// A round needs at least this many results; with fewer it is run again with a new sample.
    #[serde(default = "one")]
    pub min_fit_clients: usize,
    /// A client that has not answered this many seconds after its task was sent is dropped from
    /// the round. The only deadline on a client's training: slow devices are never cut sooner.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_s: f64,
    /// Client ids (from their certificates) allowed to join; absent: any client holding a
    /// certificate from the federation's CA. A client without `--shard` takes the index of its
    /// id in this list; without the list, indices go in order of joining and a restarted server
    /// hands them out afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_clients: Option<Vec<String>>,
    /// Where the global model is evaluated: `"server"` (on the test set the server was given)
    /// or `"clients"` (every ready client on its own test data; the server adds up their counts
    /// and never needs data of its own). A simulation evaluates on its test set either way.
    #[serde(default, skip_serializing_if = "Evaluation::is_server")]
    pub evaluate: Evaluation,
}

/// Where a networked federation evaluates the global model (`deploy.evaluate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Evaluation {
    /// On the server's own test set.
    #[default]
    Server,
    /// On each client's own test data (federated evaluation).
    Clients,
}

impl Evaluation {
    fn is_server(&self) -> bool {
        *self == Evaluation::Server
    }
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            min_clients: None,
            join_timeout_s: default_join_timeout(),
            min_fit_clients: 1,
            round_timeout_s: default_round_timeout(),
            allowed_clients: None,
            evaluate: Evaluation::Server,
        }
    }
}

fn default_join_timeout() -> f64 {
    600.0
}
fn default_round_timeout() -> f64 {
    3600.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist`, `cifar10`, `speech-commands`, a MedMNIST name (`pneumoniamnist`, ...) or
    /// `imagefolder`.
    pub dataset: fedra_data::DatasetName,
    /// Folder holding the dataset; `--data-dir` and `FEDRA_DATA` override it. Without any,
    /// MNIST uses the subset embedded in fedra.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Use only the first N training examples (file order), for quick runs at reduced size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_examples: Option<usize>,
    /// Use only the first N test examples (file order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_examples: Option<usize>,
    /// `imagefolder`: height and width every image is resized to (without it, all images must
    /// share one size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[usize; 2]>,
    /// `imagefolder`: 1 (gray) or 3 (RGB); without it, 1 when every image is gray.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// `imagefolder`: skip (and count) images that cannot be decoded instead of failing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_unreadable: bool,
    /// `imagefolder`: the class names in label order (default: the folder's sorted class
    /// folders). A federation needs it: sites lacking a class would otherwise number the others
    /// differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

impl DataConfig {
    /// How [`fedra_data::load`] reads this dataset.
    pub fn load_options(&self) -> fedra_data::LoadOptions {
        fedra_data::LoadOptions {
            image: fedra_data::ImageFolderOptions {
                size: self.image_size,
                channels: self.channels,
                skip_unreadable: self.skip_unreadable,
                classes: self.classes.clone(),
            },
            ..fedra_data::LoadOptions::default()
        }
    }

    /// The loaded data cut to `train_examples` / `test_examples`; asking for more examples than
    /// the dataset has is an error naming the key, never a silent truncation. So is a cut that
    /// loses classes: some files are ordered by class (this CIFAR-10 test batch is 1,000
    /// airplanes first), and a test set of one class scores a skewed run as 0% or 100%.
    pub fn select(&self, data: TrainTest) -> Result<TrainTest, ConfigError> {
        fn cut(
            set: Dataset,
            limit: Option<usize>,
            key: &'static str,
        ) -> Result<Dataset, ConfigError> {
            match limit {
                // A set of no examples carries only a shape (a server without data).
                None => Ok(set),
                Some(_) if set.is_empty() => Ok(set),
                Some(n) if n > set.len() => Err(ConfigError::Invalid {
                    origin: "experiment".into(),
                    key,
                    message: format!("is {n} but {} has only {} examples", set.name, set.len()),
                }),
                Some(n) if n == set.len() => Ok(set),
                Some(n) => {
                    let cut = set.subset(&(0..n).collect::<Vec<_>>());
                    let missing = missing_classes(&set, &cut);
                    if missing.is_empty() {
                        return Ok(cut);
                    }
                    let classes = {
                        let mut held: Vec<u16> = cut.labels.clone();
                        held.sort_unstable();
                        held.dedup();
                        held.len()
                    };
                    Err(ConfigError::Invalid {
                        origin: "experiment".into(),
                        key,
                        message: format!(
                            "is {n}, and the first {n} examples of {} (file order) hold only \
                             {classes} of its {} classes (none of: {}), as when a file is ordered \
                             by class; use all {} examples or more of them",
                            set.name,
                            set.class_names.len(),
                            missing.join(", "),
                            set.len()
                        ),
                    })
                }
            }
        }
        /// The class names `full` holds examples of and `cut` does not.
        fn missing_classes(full: &Dataset, cut: &Dataset) -> Vec<String> {
            let count = |d: &Dataset| {
                let mut seen = vec![false; d.class_names.len()];
                for &l in &d.labels {
                    if let Some(s) = seen.get_mut(usize::from(l)) {
                        *s = true;
                    }
                }
                seen
            };
            let (in_full, in_cut) = (count(full), count(cut));
            full.class_names
                .iter()
                .zip(in_full.iter().zip(&in_cut))
                .filter(|&(_, (&f, &c))| f && !c)
                .map(|(name, _)| name.clone())
                .collect()
        }
        Ok(TrainTest {
            train: cut(data.train, self.train_examples, "data.train_examples")?,
            test: cut(data.test, self.test_examples, "data.test_examples")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// A partition scheme string as `fedra partition --scheme` takes it (`iid`, `classes:2`, ...).
    pub scheme: String,
    pub clients: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A built-in model name (`mnist-cnn`, `cifar-cnn`, `kws-cnn`, `mlp`, `logreg`, `-bn`/`-gn`
    /// variants) or a path to a TOML model spec ending in `.toml`.
    pub name: String,
    /// What BatchNorm running statistics do: `train`, `frozen` or `local` (FedBN).
    #[serde(default = "default_bn")]
    pub bn: BnPolicy,
    /// Whether the server averages buffers (running statistics) like parameters. Ignored for
    /// `bn = "local"` (they never leave the client) and `bn = "frozen"` (they never change).
    #[serde(default = "yes")]
    pub average_buffers: bool,
    /// Start from these weights (a safetensors file, e.g. a saved SGD model) instead of a fresh
    /// seeded initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// How a fresh model's weights are drawn from `run.seed`: `pytorch` (the default: weights
    /// and biases uniform in ±1/sqrt(fan_in)) or `glorot` (TensorFlow's and Keras's default:
    /// Glorot-uniform weights, zero biases). Also draws the tensors `reset` names.
    #[serde(default, skip_serializing_if = "is_pytorch_init")]
    pub weight_init: WeightInit,
    /// Glob patterns over parameter names (`conv1.*`, `fc1.weight`, `*`): matching parameters
    /// never change in training (no update, momentum or weight decay) and the server leaves
    /// them out of aggregation. Running statistics follow `bn`, not this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
    /// Glob patterns over BatchNorm layer names (`bn1`, `layer1.*`, `*`): matching layers
    /// normalise with their stored running statistics in training too and never update them
    /// (eval-mode BatchNorm inside a training model, as for a frozen pre-trained backbone), the
    /// other layers follow `bn`. The server leaves their statistics out of aggregation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze_statistics: Vec<String>,
    /// Glob patterns over tensor names re-initialised (seeded) instead of read from `init`: a
    /// new head, possibly of another shape. Needs `init`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset: Vec<String>,
}

fn is_pytorch_init(init: &WeightInit) -> bool {
    *init == WeightInit::Pytorch
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub rounds: usize,
    #[serde(default = "one")]
    pub local_epochs: usize,
    /// Mini-batch size B. With BatchNorm after a Linear layer in train mode (`bn` = `train` or
    /// `local`) a client's last batch of exactly one example is skipped: its batch variance is
    /// undefined.
    pub batch_size: usize,
    pub lr: f32,
    /// The learning rate of round r (0-based) is `lr * lr_decay^r`.
    #[serde(default = "one_f32")]
    pub lr_decay: f32,
    #[serde(default)]
    pub momentum: f32,
    #[serde(default)]
    pub weight_decay: f32,
    /// Fraction C of clients sampled each round: round(C x K) of the K clients, at least one
    /// (Flower takes floor(C x K)).
    #[serde(default = "one_f64")]
    pub fraction: f64,
}

/// Which strategy aggregates, and its hyper-parameters (each only valid for the strategies that
/// use it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategyConfig {
    /// `fedavg`, `fedprox`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, `fednova`, `scaffold`, `median`,
    /// `trimmed-mean`, `krum`, or `sgd` (the centralised baseline: pooled data, batch 10 x B,
    /// one epoch per round).
    #[serde(default = "default_strategy")]
    pub name: String,
    /// FedProx proximal weight mu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mu: Option<f32>,
    /// Server learning rate (FedAvgM, FedAdam).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_lr: Option<f32>,
    /// Server momentum (FedAvgM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_momentum: Option<f32>,
    /// FedAdam's, FedYogi's and FedAdagrad's beta1, beta2 and tau (adaptivity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f32>,
    /// Trimmed mean: the fraction of clients' values dropped at each end, per coordinate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim: Option<f32>,
    /// Krum: how many of a round's results may be Byzantine (f; a round needs at least
    /// 2f + 3 results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<usize>,
    /// Krum: average the `keep` results of best score (multi-Krum); 1 (Krum) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    /// Any strategy: scale each client's update (its weights minus the global ones) down to
    /// this L2 norm before aggregating, when it is longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_update_norm: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate the global model on the test set every N rounds (and after the last).
    #[serde(default = "one")]
    pub every: usize,
    /// Run a centralised SGD twin from the same initial weights and record per-layer weight
    /// divergence ||w_FedAvg - w_SGD|| / ||w_SGD|| after each evaluated round.
    #[serde(default)]
    pub sgd_twin: bool,
    /// Stop before `train.rounds` once converged (see [`Convergence`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_when_converged: Option<Convergence>,
}

/// When a run counts as converged: at an evaluated round r > `window`, the test accuracies of
/// every evaluation from round r - `window` to r (both evaluated) are less than `within`
/// percentage points apart (max - min). The initial model (round 0) is never in the window: a
/// model that has not moved, or an empty test set, does not count as converged. A run that never
/// meets it stops at `train.rounds`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Convergence {
    /// Rounds looked back; a multiple of `eval.every`, so that round r - window is evaluated.
    pub window: usize,
    /// The spread of test accuracy over the window must be less than this, in percentage
    /// points (0.2 = 0.2%).
    pub within: f64,
}

impl Convergence {
    /// The first evaluated round at which `history` (rounds and test accuracies as fractions,
    /// in round order) meets the criterion.
    pub fn first_met(&self, history: &[(usize, f64)]) -> Option<usize> {
        (0..history.len()).find_map(|end| self.met_at(&history[..=end]))
    }

    /// The last round of `history` if the criterion holds there.
    pub fn met_at(&self, history: &[(usize, f64)]) -> Option<usize> {
        let &(round, _) = history.last()?;
        if round <= self.window {
            return None;
        }
        ((self.spread_at(history)? * 100.0) < self.within).then_some(round)
    }

    /// The spread (max - min, as a fraction) of the accuracies over the window ending at the
    /// last round of `history`; none when the history does not reach `window` rounds back.
    /// Without an evaluation exactly `window` rounds back, the window starts at the first one
    /// after it.
    pub fn spread_at(&self, history: &[(usize, f64)]) -> Option<f64> {
        let &(round, _) = history.last()?;
        let start = round.checked_sub(self.window)?;
        if history.first()?.0 > start {
            return None;
        }
        let window = history.iter().filter(|&&(r, _)| r >= start);
        let (min, max) = window.fold((f64::MAX, f64::MIN), |(lo, hi), &(_, a)| {
            (lo.min(a), hi.max(a))
        });
        Some(max - min)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub seed: u64,
    /// Save a checkpoint every N rounds (0: never).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
}

fn default_bn() -> BnPolicy {
    BnPolicy::Train
}
fn default_strategy() -> String {
    "fedavg".to_string()
}
fn default_checkpoint_every() -> usize {
    10
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_f32() -> f32 {
    1.0
}
fn one_f64() -> f64 {
    1.0
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            name: default_strategy(),
            mu: None,
            server_lr: None,
            server_momentum: None,
            beta1: None,
            beta2: None,
            tau: None,
            trim: None,
            byzantine: None,
            keep: None,
            clip_update_norm: None,
        }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 1,
            sgd_twin: false,
            stop_when_converged: None,
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 0,
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

/// What is wrong with a configuration.
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin}: `{key}` {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
}

/// The longest `deploy.join_timeout_s` and `deploy.round_timeout_s`: a year, in seconds.
pub const MAX_TIMEOUT_S: f64 = 31_536_000.0;

/// The strategy names fedra knows.
pub const STRATEGIES: &[&str] = &[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed-mean",
    "krum",
    "fednova",
    "scaffold",
    "sgd",
];

impl ExperimentConfig {
    /// Parse and validate a TOML text; `origin` (usually the file name) prefixes every error.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<ExperimentConfig, ConfigError> {
        let config: ExperimentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Read, parse and validate a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<ExperimentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The resolved configuration as TOML (what a run writes to `config.toml`).
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("an ExperimentConfig always serialises to TOML")
    }

    /// Check every value; the error names the offending key.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        let t = &self.train;
        if self.partition.clients == 0 {
            return Err(bad("partition.clients", "must be at least 1".into()));
        }
        if let Err(e) = self
            .partition
            .scheme
            .parse::<fedra_data::partition::Scheme>()
        {
            return Err(bad("partition.scheme", e.to_string()));
        }
        for (key, limit) in [
            ("data.train_examples", self.data.train_examples),
            ("data.test_examples", self.data.test_examples),
        ] {
            if limit == Some(0) {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        for (key, patterns) in [
            ("model.freeze", &self.model.freeze),
            ("model.freeze_statistics", &self.model.freeze_statistics),
            ("model.reset", &self.model.reset),
        ] {
            if let Err((pattern, e)) = crate::federation::compile_patterns(patterns) {
                return Err(bad(key, format!("{pattern:?} is not a glob pattern: {e}")));
            }
        }
        if !self.model.reset.is_empty() && self.model.init.is_none() {
            return Err(bad(
                "model.reset",
                "re-initialises tensors of model.init, which is not set".into(),
            ));
        }
        if self.model.weight_init != WeightInit::Pytorch
            && self.model.init.is_some()
            && self.model.reset.is_empty()
        {
            return Err(bad(
                "model.weight_init",
                format!(
                    "{:?} draws fresh weights, but model.init loads every tensor (name the ones to \
                     draw afresh in model.reset)",
                    self.model.weight_init.name()
                ),
            ));
        }
        let image_folder = self.data.dataset == fedra_data::DatasetName::ImageFolder;
        for (key, set) in [
            ("data.image_size", self.data.image_size.is_some()),
            ("data.channels", self.data.channels.is_some()),
            ("data.skip_unreadable", self.data.skip_unreadable),
            ("data.classes", self.data.classes.is_some()),
        ] {
            if set && !image_folder {
                return Err(bad(
                    key,
                    format!(
                        "applies to dataset = \"imagefolder\" only, not {}",
                        self.data.dataset
                    ),
                ));
            }
        }
        if let Some(list) = &self.data.classes {
            let mut sorted = list.clone();
            sorted.sort();
            sorted.dedup();
            if list.len() < 2 || sorted.len() != list.len() {
                return Err(bad(
                    "data.classes",
                    "must list at least two distinct class names".into(),
                ));
            }
        }
        if let Some(c) = self.data.channels
            && c != 1
            && c != 3
        {
            return Err(bad("data.channels", format!("must be 1 or 3, got {c}")));
        }
        if let Some([h, w]) = self.data.image_size
            && (!(1..=4096).contains(&h) || !(1..=4096).contains(&w))
        {
            return Err(bad(
                "data.image_size",
                format!("must be [H, W] between 1 and 4096, got [{h}, {w}]"),
            ));
        }
        if t.rounds == 0 {
            return Err(bad("train.rounds", "must be at least 1".into()));
        }
        if t.local_epochs == 0 {
            return Err(bad("train.local_epochs", "must be at least 1".into()));
        }
        if t.batch_size == 0 {
            return Err(bad("train.batch_size", "must be at least 1".into()));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(bad(
                "train.lr",
                format!("must be a positive number, got {}", t.lr),
            ));
        }
        if !(t.lr_decay.is_finite() && t.lr_decay > 0.0 && t.lr_decay <= 1.0) {
            return Err(bad(
                "train.lr_decay",
                format!("must be in (0, 1], got {}", t.lr_decay),
            ));
        }
        if !(t.momentum.is_finite() && (0.0..1.0).contains(&t.momentum)) {
            return Err(bad(
                "train.momentum",
                format!("must be in [0, 1), got {}", t.momentum),
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(bad(
                "train.weight_decay",
                format!("must be >= 0, got {}", t.weight_decay),
            ));
        }
        if !(t.fraction.is_finite() && t.fraction > 0.0 && t.fraction <= 1.0) {
            return Err(bad(
                "train.fraction",
                format!("must be in (0, 1], got {}", t.fraction),
            ));
        }
        if self.eval.every == 0 {
            return Err(bad("eval.every", "must be at least 1".into()));
        }
        if let Some(c) = &self.eval.stop_when_converged {
            if c.window == 0 || !c.window.is_multiple_of(self.eval.every) {
                return Err(bad(
                    "eval.stop_when_converged.window",
                    format!(
                        "is {} but must be a positive multiple of eval.every ({}), so that the \
                         round it looks back to is evaluated",
                        c.window, self.eval.every
                    ),
                ));
            }
            if !(c.within.is_finite() && c.within > 0.0) {
                return Err(bad(
                    "eval.stop_when_converged.within",
                    format!("is {} but must be a positive number of points", c.within),
                ));
            }
        }
        let s = &self.strategy;
        if !STRATEGIES.contains(&s.name.as_str()) {
            return Err(bad(
                "strategy.name",
                format!(
                    "unknown strategy {:?}; known: {}",
                    s.name,
                    STRATEGIES.join(", ")
                ),
            ));
        }
        let mut allowed: Vec<&str> = match s.name.as_str() {
            "fedprox" => vec!["mu"],
            "fedavgm" => vec!["server_lr", "server_momentum"],
            "scaffold" => vec!["server_lr"],
            "fedadam" | "fedyogi" | "fedadagrad" => vec!["server_lr", "beta1", "beta2", "tau"],
            "trimmed-mean" => vec!["trim"],
            "krum" => vec!["byzantine", "keep"],
            _ => Vec::new(),
        };
        if s.name != "sgd" {
            allowed.push("clip_update_norm");
        }
        for (name, value) in [("byzantine", s.byzantine), ("keep", s.keep)] {
            if value.is_some() && !allowed.contains(&name) {
                return Err(bad(
                    "strategy",
                    format!("key `{name}` does not apply to strategy {:?}", s.name),
                ));
            }
        }
        if s.name == "krum" {
            let Some(f) = s.byzantine else {
                return Err(bad(
                    "strategy.byzantine",
                    "is required by krum (how many results may be Byzantine)".into(),
                ));
            };
            let clients = self.partition.clients;
            // The results of a round: the clients sampled (train.fraction) at most.
            let sampled =
                ((self.train.fraction * clients as f64).round() as usize).clamp(1, clients);
            let needed = f.checked_mul(2).and_then(|n| n.checked_add(3));
            if needed.is_none_or(|n| n > sampled) {
                return Err(bad(
                    "strategy.byzantine",
                    format!(
                        "is {f}: krum needs at least 2 x byzantine + 3 results a round, and a \
                         round samples {sampled} of the {clients} clients (train.fraction)"
                    ),
                ));
            }
            if let Some(m) = s.keep
                && !(1..=sampled - f).contains(&m)
            {
                return Err(bad(
                    "strategy.keep",
                    format!(
                        "must be in 1..={} (clients sampled a round - byzantine), got {m}",
                        sampled - f
                    ),
                ));
            }
        }
        if let Some(p) = &self.privacy {
            if let Err((key, message)) = p.validate() {
                return Err(bad(key, message));
            }
            if !crate::privacy::PRIVATE_STRATEGIES.contains(&s.name.as_str()) {
                return Err(bad(
                    "privacy",
                    format!(
                        "needs a strategy that aggregates the mean update ({}), not {:?}",
                        crate::privacy::PRIVATE_STRATEGIES.join(", "),
                        s.name
                    ),
                ));
            }
            if s.clip_update_norm.is_some() {
                return Err(bad(
                    "strategy.clip_update_norm",
                    "with [privacy], privacy.clip is the clipping norm".into(),
                ));
            }
        }
        if s.clip_update_norm == Some(0.0) {
            return Err(bad(
                "strategy.clip_update_norm",
                "must be > 0 (0 would erase every update)".into(),
            ));
        }
        if let Some(a) = &self.attack {
            let clients = self.partition.clients;
            if a.clients.is_empty() {
                return Err(bad("attack.clients", "lists no client".into()));
            }
            let mut sorted = a.clients.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(bad("attack.clients", format!("lists {} twice", w[0])));
            }
            if let Some(&k) = sorted.last()
                && k >= clients
            {
                return Err(bad(
                    "attack.clients",
                    format!("client {k} does not exist (partition.clients = {clients})"),
                ));
            }
            match (a.kind, a.factor) {
                (AttackKind::LabelFlip, Some(_)) => {
                    return Err(bad("attack.factor", "does not apply to label-flip".into()));
                }
                (_, Some(f)) if !f.is_finite() => {
                    return Err(bad("attack.factor", format!("must be finite, got {f}")));
                }
                _ => {}
            }
        }
        let given = [
            ("mu", s.mu),
            ("server_lr", s.server_lr),
            ("server_momentum", s.server_momentum),
            ("beta1", s.beta1),
            ("beta2", s.beta2),
            ("tau", s.tau),
            ("trim", s.trim),
            ("clip_update_norm", s.clip_update_norm),
        ];
        for (name, value) in given {
            if let Some(v) = value {
                if !allowed.contains(&name) {
                    return Err(bad(
                        "strategy",
                        format!("key `{name}` does not apply to strategy {:?}", s.name),
                    ));
                }
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(
                        "strategy",
                        format!("`{name}` must be a finite number >= 0, got {v}"),
                    ));
                }
            }
        }
        if s.name == "fedprox" && s.mu.is_none() {
            return Err(bad("strategy.mu", "is required by fedprox".into()));
        }
        for (name, value) in [
            ("beta1", s.beta1),
            ("beta2", s.beta2),
            ("server_momentum", s.server_momentum),
        ] {
            if let Some(v) = value
                && v >= 1.0
            {
                return Err(bad("strategy", format!("`{name}` must be < 1, got {v}")));
            }
        }
        if let Some(share) = &self.share
            && let Err((key, message)) = share.validate()
        {
            return Err(bad(key, message));
        }
        if let Some(t) = s.trim
            && t >= 0.5
        {
            return Err(bad(
                "strategy.trim",
                format!("must be < 0.5 (the fraction dropped at each end), got {t}"),
            ));
        }
        if s.tau == Some(0.0) {
            return Err(bad(
                "strategy.tau",
                "must be > 0 (FedAdam divides by sqrt(v) + tau)".into(),
            ));
        }
        if s.name == "sgd" && self.train.local_epochs != 1 {
            return Err(bad(
                "train.local_epochs",
                "must be 1 with strategy \"sgd\": the baseline trains one epoch of the pooled \
                 data per round"
                    .into(),
            ));
        }
        if self.model.bn == BnPolicy::Train && !self.model.average_buffers {
            return Err(bad(
                "model.average_buffers",
                "= false with bn = \"train\" would leave the global running statistics at their \
                 initial values (mean 0, variance 1) for evaluation and every round; use \
                 bn = \"local\" (FedBN) to keep statistics on the clients"
                    .into(),
            ));
        }
        if let Some(d) = &self.deploy {
            let clients = self.partition.clients;
            if let Some(n) = d.min_clients
                && !(1..=clients).contains(&n)
            {
                return Err(bad(
                    "deploy.min_clients",
                    format!("must be in 1..={clients} (partition.clients), got {n}"),
                ));
            }
            if !(1..=clients).contains(&d.min_fit_clients) {
                return Err(bad(
                    "deploy.min_fit_clients",
                    format!(
                        "must be in 1..={clients} (partition.clients), got {}",
                        d.min_fit_clients
                    ),
                ));
            }
            for (key, v) in [
                ("deploy.join_timeout_s", d.join_timeout_s),
                ("deploy.round_timeout_s", d.round_timeout_s),
            ] {
                // Bounded so that a deadline `now + timeout` is representable (1e20 s, meaning
                // "never", would overflow it).
                if !(v.is_finite() && v > 0.0 && v <= MAX_TIMEOUT_S) {
                    return Err(bad(
                        key,
                        format!(
                            "must be a positive number of seconds up to {MAX_TIMEOUT_S} (a year), \
                             got {v}"
                        ),
                    ));
                }
            }
            if let Some(ids) = &d.allowed_clients {
                let mut sorted = ids.clone();
                sorted.sort();
                if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(bad(
                        "deploy.allowed_clients",
                        format!("lists {:?} twice", w[0]),
                    ));
                }
                if ids.len() > clients {
                    return Err(bad(
                        "deploy.allowed_clients",
                        format!(
                            "lists {} clients but the partition has {clients} (partition.clients)",
                            ids.len()
                        ),
                    ));
                }
                if ids.iter().any(|id| id.is_empty()) {
                    return Err(bad("deploy.allowed_clients", "holds an empty id".into()));
                }
            }
        }
        if s.name == "sgd" && self.eval.sgd_twin {
            return Err(bad(
                "eval.sgd_twin",
                "makes no sense with strategy \"sgd\" (the run is the SGD baseline)".into(),
            ));
        }
        Ok(())
    }

    /// Learning rate of round `round` (0-based).
    pub fn lr_at(&self, round: usize) -> f32 {
        self.train.lr_at(round)
    }
}

impl TrainConfig {
    /// Learning rate of round `round` (0-based): `lr * lr_decay^round`.
    pub fn lr_at(&self, round: usize) -> f32 {
        (self.lr as f64 * (self.lr_decay as f64).powi(round as i32)) as f32
    }
}
