//! A run folder: what `fedra run` writes and `fedra run --resume` reads back.
//!
//! `config.toml` (the resolved configuration), `partition.json` (as `fedra partition` writes it),
//! `metrics.csv` (one row per evaluated round), `summary.json`, `final.safetensors`, and
//! `checkpoint/` while the run is in progress. Files are replaced atomically (written beside,
//! then renamed), so a run killed at any moment never leaves a half-written file.
//!
//! Before running an experiment in a folder, a front end asks [`Run::inspect`] what the folder
//! holds: nothing yet, a finished run, an interrupted one to resume, or one that stopped before
//! its first checkpoint. A folder holding a run of another experiment is an error, so a run is
//! never skipped or resumed under settings it was not made with.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use fedra_data::TrainTest;
use fedra_data::stats::partition_stats;
use fedra_fl::federation::Traffic;
use fedra_fl::privacy::{NoiseKey, NoiseSource};
use fedra_fl::{Executor, ExperimentConfig, Federation, RoundMetrics};

use crate::checkpoint;
use crate::error::{SimError, io};
use crate::executor::ParallelExecutor;

/// What a finished run reports in `summary.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub rounds: usize,
    pub final_accuracy: f64,
    pub best_accuracy: f64,
    pub best_round: usize,
    pub final_sgd_accuracy: Option<f64>,
    /// ROC AUC of the final model (binary: of class 1; else macro one-vs-rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_auc: Option<f64>,
    /// Highest AUC over the evaluated rounds, and its round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_auc: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_auc_round: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_balanced_accuracy: Option<f64>,
    /// The final model's sensitivity and specificity per class, by class name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_per_class: Vec<ClassSummary>,
    /// Absent when the run had no training set of its own (a server whose clients hold the
    /// data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_emd: Option<f64>,
    /// With data sharing: the clients' mean EMD before their share of G was mixed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_emd_before_share: Option<f64>,
    /// With `[privacy]`: the epsilon spent over the whole run, at `privacy_delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_epsilon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_delta: Option<f64>,
    /// Mean bytes the server sent to / received from each client of the partition over the
    /// run ([`fedra_fl::federation::Traffic`]); absent for the centralised baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_client: Option<Traffic>,
    /// With `eval.stop_when_converged`: the round at which the criterion was met and the run
    /// stopped (absent when it ran all `train.rounds` without meeting it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_round: Option<usize>,
    pub total_seconds: f64,
    pub samples_per_s: f64,
    pub threads: usize,
    /// Peak resident memory of the process so far, in MiB (Linux `VmHWM`; absent elsewhere).
    /// With several runs in one process it is the peak over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
}

/// One class's sensitivity and specificity (absent when undefined on the test set).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassSummary {
    pub class: String,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
}

/// The process's peak resident set size in MiB, from `/proc/self/status` (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A run in progress, bound to its folder.
pub struct Run {
    pub federation: Federation,
    pub data: TrainTest,
    pub dir: PathBuf,
    executor: Box<dyn Executor>,
    threads: usize,
    checkpoint_every: usize,
    mean_emd: Option<f64>,
    started: Instant,
}

/// The files a run writes into its folder (besides `checkpoint/`).
pub const RUN_FILES: &[&str] = &[
    "config.toml",
    "metrics.csv",
    "partition.json",
    "partition_before_share.json",
    "summary.json",
    "final.safetensors",
    NOISE_KEY_FILE,
];

/// Where a `privacy.noise = "secret"` run keeps its key while it lasts (owner-only; removed when
/// the run finishes, after which nobody can recompute the noise). Not in the checkpoint, which
/// may be copied or committed.
pub const NOISE_KEY_FILE: &str = "privacy-noise.key";

/// Whether `config` draws its privacy randomness from a secret key.
fn secret_noise(config: &ExperimentConfig) -> bool {
    config.privacy.as_ref().and_then(|p| p.noise) == Some(NoiseSource::Secret)
}

/// Make a fresh noise key and keep it in `dir`, readable by its owner only.
fn write_noise_key(dir: &Path) -> Result<NoiseKey, SimError> {
    let key = NoiseKey::generate();
    let path = dir.join(NOISE_KEY_FILE);
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    std::io::Write::write_all(&mut file, format!("{}\n", key.to_hex()).as_bytes())
        .map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(key)
}

/// The noise key a resumed secret run left in `dir`.
fn read_noise_key(dir: &Path) -> Result<NoiseKey, SimError> {
    let path = dir.join(NOISE_KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| SimError::Checkpoint {
        path: path.clone(),
        message: format!(
            "privacy.noise = \"secret\": cannot read the run's noise key ({e}); without it the \
             run cannot continue with the same randomness"
        ),
    })?;
    NoiseKey::from_hex(&text).ok_or_else(|| SimError::Checkpoint {
        path,
        message: "not a noise key (64 hex digits)".into(),
    })
}

/// What a run folder holds, for a front end deciding what to do with an experiment there.
#[derive(Clone, Debug)]
pub enum RunFolder {
    /// No run (a missing folder, or one holding only other files): start one.
    Empty,
    /// A finished run of this experiment, with its summary: nothing left to do.
    Finished(Box<Summary>),
    /// An interrupted run of this experiment with a checkpoint: [`Run::resume`] it.
    Checkpointed,
    /// A run of this experiment that stopped before its first checkpoint: nothing can be
    /// resumed; [`clear_run_files`], then [`Run::start`] it again.
    Unfinished,
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A run folder that already holds a run must hold this very experiment: skipping or resuming a
/// run made with other settings (another profile, seed, round count, an edited file) would
/// silently report the wrong thing. The data folder may differ (data can move).
pub fn check_same_experiment(dir: &Path, config: &ExperimentConfig) -> Result<(), SimError> {
    let path = dir.join("config.toml");
    if !path.exists() {
        return Ok(());
    }
    let mut recorded = ExperimentConfig::from_file(&path)?;
    recorded.data.data_dir = config.data.data_dir.clone();
    if &recorded != config {
        let (ours, theirs) = (config.to_toml_string(), recorded.to_toml_string());
        let differences: Vec<String> = ours
            .lines()
            .zip(theirs.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("  now: {a}\n  was: {b}"))
            .take(5)
            .collect();
        return Err(SimError::DifferentExperiment {
            dir: dir.to_path_buf(),
            differences: differences.join("\n"),
        });
    }
    Ok(())
}

/// The summary of a run folder whose run has finished, if it has.
pub fn finished_summary(dir: &Path) -> Result<Option<Summary>, SimError> {
    let path = dir.join("summary.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let summary = serde_json::from_str(&text).map_err(|e| SimError::NotASummary {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some(summary))
}

/// Remove the files a run writes ([`RUN_FILES`]) from `dir`, and only those: the folder may hold
/// other things.
pub fn clear_run_files(dir: &Path) -> Result<(), SimError> {
    for file in RUN_FILES {
        let path = dir.join(file);
        if path.exists() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

impl Run {
    /// What `dir` holds with respect to running `config` there; a run of another experiment
    /// is an error ([`check_same_experiment`]).
    pub fn inspect(dir: &Path, config: &ExperimentConfig) -> Result<RunFolder, SimError> {
        check_same_experiment(dir, config)?;
        if let Some(summary) = finished_summary(dir)? {
            return Ok(RunFolder::Finished(Box::new(summary)));
        }
        if checkpoint::checkpoint_dir(dir).exists() {
            return Ok(RunFolder::Checkpointed);
        }
        if dir.join("metrics.csv").exists() {
            return Ok(RunFolder::Unfinished);
        }
        Ok(RunFolder::Empty)
    }

    /// Start a new run in `dir` (created if missing; an existing checkpoint there is an error,
    /// so a finished or running experiment is never overwritten by accident). `data` is the
    /// whole dataset; the run keeps what `data.train_examples` / `data.test_examples` select.
    pub fn start(
        config: ExperimentConfig,
        data: TrainTest,
        dir: &Path,
        threads: usize,
    ) -> Result<Run, SimError> {
        let executor = Box::new(ParallelExecutor::new(threads)?);
        Run::start_with(config, data, dir, threads, executor)
    }

    /// [`Run::start`] with clients trained by `executor` (remote clients, say) instead of
    /// in-process threads; `threads` is what the server's own work (evaluation, the SGD twin)
    /// may use.
    pub fn start_with(
        config: ExperimentConfig,
        data: TrainTest,
        dir: &Path,
        threads: usize,
        executor: Box<dyn Executor>,
    ) -> Result<Run, SimError> {
        if checkpoint::checkpoint_dir(dir).exists() || dir.join("metrics.csv").exists() {
            return Err(SimError::Checkpoint {
                path: dir.to_path_buf(),
                message: "already holds a run; use --resume to continue it or choose another --out"
                    .into(),
            });
        }
        let data = config.data.select(data)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut federation = Federation::new(config, &data, threads)?;
        if secret_noise(&federation.config) {
            federation.set_noise_key(write_noise_key(dir)?);
        }
        let run = Run::assemble(federation, data, dir, threads, executor)?;
        write_atomic(
            &dir.join("config.toml"),
            run.federation.config.to_toml_string().as_bytes(),
        )?;
        if !run.data.train.is_empty() {
            let stats = partition_stats(&run.data.train.labels, &run.federation.partition);
            let json = serde_json::to_string_pretty(&stats).expect("partition stats serialise");
            write_atomic(&dir.join("partition.json"), json.as_bytes())?;
        }
        if let Some(before) = &run.federation.before_share {
            let stats = partition_stats(&run.data.train.labels, before);
            let json = serde_json::to_string_pretty(&stats).expect("partition stats serialise");
            write_atomic(&dir.join("partition_before_share.json"), json.as_bytes())?;
        }
        Ok(run)
    }

    /// Continue the run in `dir` from its last checkpoint, with the configuration it recorded.
    /// The global model comes from the checkpoint: `model.init` is not read and the
    /// data-sharing warm-up does not run again.
    pub fn resume(dir: &Path, data: TrainTest, threads: usize) -> Result<Run, SimError> {
        let executor = Box::new(ParallelExecutor::new(threads)?);
        Run::resume_with(dir, data, threads, executor)
    }

    /// [`Run::resume`] with clients trained by `executor`.
    pub fn resume_with(
        dir: &Path,
        data: TrainTest,
        threads: usize,
        executor: Box<dyn Executor>,
    ) -> Result<Run, SimError> {
        let config = ExperimentConfig::from_file(&dir.join("config.toml"))?;
        let data = config.data.select(data)?;
        let mut federation = checkpoint::load(dir, config, &data, threads)?;
        if secret_noise(&federation.config) {
            federation.set_noise_key(read_noise_key(dir)?);
        }
        let run = Run::assemble(federation, data, dir, threads, executor)?;
        run.write_metrics()?;
        Ok(run)
    }

    fn assemble(
        federation: Federation,
        data: TrainTest,
        dir: &Path,
        threads: usize,
        executor: Box<dyn Executor>,
    ) -> Result<Run, SimError> {
        let mean_emd = (!data.train.is_empty())
            .then(|| partition_stats(&data.train.labels, &federation.partition).mean_emd);
        Ok(Run {
            checkpoint_every: federation.config.run.checkpoint_every,
            federation,
            data,
            dir: dir.to_path_buf(),
            executor,
            threads: threads.max(1),
            mean_emd,
            started: Instant::now(),
        })
    }

    /// Evaluate the initial model (if not yet) and run one round, checkpointing when due.
    pub fn step(&mut self) -> Result<Option<RoundMetrics>, SimError> {
        let fresh = self.federation.history.is_empty();
        self.federation
            .evaluate_initial(&self.data, self.executor.as_ref())?;
        if fresh {
            self.write_metrics()?;
        }
        let row = self
            .federation
            .run_round(&self.data, self.executor.as_ref())?;
        if row.is_some() {
            self.write_metrics()?;
        }
        let every = self.checkpoint_every;
        if every > 0
            && self.federation.rounds_done.is_multiple_of(every)
            && !self.federation.finished()
        {
            checkpoint::save(&self.dir, &self.federation)?;
        }
        Ok(row)
    }

    /// Write the final weights and `summary.json`; remove the checkpoint.
    pub fn finish(self) -> Result<Summary, SimError> {
        let fed = &self.federation;
        fed.global
            .save_safetensors(&self.dir.join("final.safetensors"))?;
        let last = fed.history.last();
        let best = fed
            .history
            .iter()
            .max_by(|a, b| a.test_accuracy.total_cmp(&b.test_accuracy));
        let best_auc = fed
            .history
            .iter()
            .filter_map(|r| r.clinical.auc.map(|auc| (auc, r.round)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let final_per_class = last.map_or_else(Vec::new, |r| {
            self.data
                .test
                .class_names
                .iter()
                .enumerate()
                .map(|(c, class)| ClassSummary {
                    class: class.clone(),
                    sensitivity: r.clinical.sensitivity.get(c).copied().flatten(),
                    specificity: r.clinical.specificity.get(c).copied().flatten(),
                })
                .collect()
        });
        let seconds: f64 = fed.history.iter().map(|r| r.seconds).sum();
        let examples: usize = fed.history.iter().map(|r| r.examples).sum();
        let summary = Summary {
            rounds: fed.rounds_done,
            final_accuracy: last.map_or(f64::NAN, |r| r.test_accuracy),
            best_accuracy: best.map_or(f64::NAN, |r| r.test_accuracy),
            best_round: best.map_or(0, |r| r.round),
            final_sgd_accuracy: last.and_then(|r| r.sgd_test_accuracy),
            final_auc: last.and_then(|r| r.clinical.auc),
            best_auc: best_auc.map(|b| b.0),
            best_auc_round: best_auc.map(|b| b.1),
            final_balanced_accuracy: last.and_then(|r| r.clinical.balanced_accuracy),
            final_per_class,
            mean_emd: self.mean_emd,
            mean_emd_before_share: fed
                .before_share
                .as_ref()
                .map(|p| partition_stats(&self.data.train.labels, p).mean_emd),
            final_epsilon: last.and_then(|r| r.epsilon),
            privacy_delta: fed.config.privacy.as_ref().map(|p| p.delta),
            bytes_per_client: (!fed.is_central()).then(|| {
                let clients = fed.partition.clients.len().max(1) as u64;
                Traffic {
                    sent: fed.traffic.sent / clients,
                    received: fed.traffic.received / clients,
                }
            }),
            converged_round: fed.converged_round(),
            total_seconds: seconds,
            samples_per_s: if seconds > 0.0 {
                examples as f64 / seconds
            } else {
                0.0
            },
            threads: self.threads,
            peak_rss_mib: peak_rss_mib(),
        };
        let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
        write_atomic(&self.dir.join("summary.json"), json.as_bytes())?;
        let ckpt = checkpoint::checkpoint_dir(&self.dir);
        if ckpt.exists() {
            std::fs::remove_dir_all(&ckpt).map_err(io(&ckpt))?;
        }
        let key = self.dir.join(NOISE_KEY_FILE);
        if key.exists() {
            std::fs::remove_file(&key).map_err(io(&key))?;
        }
        Ok(summary)
    }

    /// Checkpoint every `rounds` rounds instead of `run.checkpoint_every` (a server checkpoints
    /// every round: its clients' work is the expensive part to lose). The configuration, and so
    /// the run folder's identity, is unchanged.
    pub fn set_checkpoint_every(&mut self, rounds: usize) {
        self.checkpoint_every = rounds;
    }

    /// Seconds since this process started or resumed the run.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn write_metrics(&self) -> Result<(), SimError> {
        write_atomic(
            &self.dir.join("metrics.csv"),
            metrics_csv(&self.federation.history).as_bytes(),
        )
    }
}

/// The metrics table as CSV: `round,lr,test_accuracy,test_loss,train_loss,seconds`, then
/// `sgd_test_accuracy` and one `wd_<tensor or layer>` column per divergence figure when the SGD
/// twin runs, then the clinical metrics: `test_auc,test_balanced_accuracy`, and
/// `sensitivity_<c>` and `specificity_<c>` for each class index c, then `epsilon` with
/// `[privacy]`. Empty cells where a value does not exist (train loss of round 0, sensitivity of
/// a class absent from the test set), and `bn_spread` (the spread of the clients' BatchNorm
/// running means, [`fedra_fl::statistics_spread`]) for models with running statistics, and last
/// `bytes_sent,bytes_received`: what the aggregated rounds moved between server and clients since
/// the run began ([`fedra_fl::federation::Traffic`]).
pub fn metrics_csv(history: &[RoundMetrics]) -> String {
    let mut out = String::from("round,lr,test_accuracy,test_loss,train_loss,seconds");
    let twin = history.iter().any(|r| r.sgd_test_accuracy.is_some());
    let wd_names: Vec<String> = history
        .first()
        .map(|r| r.divergence.iter().map(|d| d.name.clone()).collect())
        .unwrap_or_default();
    if twin {
        out.push_str(",sgd_test_accuracy");
        for name in &wd_names {
            out.push_str(&format!(",wd_{name}"));
        }
    }
    let classes = history
        .iter()
        .map(|r| r.clinical.sensitivity.len())
        .max()
        .unwrap_or(0);
    out.push_str(",test_auc,test_balanced_accuracy");
    for kind in ["sensitivity", "specificity"] {
        for c in 0..classes {
            out.push_str(&format!(",{kind}_{c}"));
        }
    }
    let private = history.iter().any(|r| r.epsilon.is_some());
    if private {
        out.push_str(",epsilon");
    }
    let batchnorm = history.iter().any(|r| r.bn_spread.is_some());
    if batchnorm {
        out.push_str(",bn_spread");
    }
    out.push_str(",bytes_sent,bytes_received");
    out.push('\n');
    for r in history {
        let train_loss = r.train_loss.map(|v| format!("{v:.6}")).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{:.6},{:.6},{},{:.3}",
            r.round, r.lr, r.test_accuracy, r.test_loss, train_loss, r.seconds
        ));
        if twin {
            let sgd = r
                .sgd_test_accuracy
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default();
            out.push_str(&format!(",{sgd}"));
            for name in &wd_names {
                let value = r
                    .divergence
                    .iter()
                    .find(|d| &d.name == name)
                    .map(|d| format!("{:.8}", d.value))
                    .unwrap_or_default();
                out.push_str(&format!(",{value}"));
            }
        }
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        let m = &r.clinical;
        out.push_str(&format!(",{},{}", cell(m.auc), cell(m.balanced_accuracy)));
        for values in [&m.sensitivity, &m.specificity] {
            for c in 0..classes {
                out.push_str(&format!(",{}", cell(values.get(c).copied().flatten())));
            }
        }
        if private {
            out.push_str(&format!(",{}", cell(r.epsilon)));
        }
        if batchnorm {
            out.push_str(&format!(",{}", cell(r.bn_spread)));
        }
        out.push_str(&format!(",{},{}", r.bytes_sent, r.bytes_received));
        out.push('\n');
    }
    out
}
