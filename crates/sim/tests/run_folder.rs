//! What a run folder holds, as `Run::inspect` tells a front end: nothing, a finished run, one to
//! resume, or one to start again; and a run of another experiment is refused, not skipped or
//! resumed.

use std::path::Path;

use fedra_data::embedded_mnist;
use fedra_fl::ExperimentConfig;
use fedra_sim::{RUN_FILES, Run, RunFolder, SimError, clear_run_files};

fn config(seed: u64, checkpoint_every: usize) -> ExperimentConfig {
    let text = format!(
        r#"
[data]
dataset = "mnist"
train_examples = 1000
test_examples = 200
[partition]
scheme = "iid"
clients = 4
[model]
name = "logreg"
[train]
rounds = 3
batch_size = 20
lr = 0.05
[run]
seed = {seed}
checkpoint_every = {checkpoint_every}
"#
    );
    ExperimentConfig::from_toml_str(&text, "test").unwrap()
}

fn steps(config: &ExperimentConfig, dir: &Path, n: usize) -> Run {
    let mut run = Run::start(config.clone(), embedded_mnist().unwrap(), dir, 1).unwrap();
    for _ in 0..n {
        run.step().unwrap();
    }
    run
}

#[test]
fn a_new_folder_is_empty_and_a_finished_run_is_reported_with_its_summary() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("run");
    let config = config(1, 1);
    assert!(matches!(
        Run::inspect(&dir, &config).unwrap(),
        RunFolder::Empty
    ));
    let summary = steps(&config, &dir, 3).finish().unwrap();
    match Run::inspect(&dir, &config).unwrap() {
        RunFolder::Finished(s) => {
            assert_eq!(s.rounds, 3);
            assert_eq!(s.final_accuracy, summary.final_accuracy);
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    // The data may move: another data folder is still the same experiment.
    let mut moved = config.clone();
    moved.data.data_dir = Some("/elsewhere".into());
    assert!(matches!(
        Run::inspect(&dir, &moved).unwrap(),
        RunFolder::Finished(_)
    ));
}

#[test]
fn a_run_of_another_experiment_is_refused_with_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    steps(&config(1, 1), dir.path(), 3).finish().unwrap();
    let err = Run::inspect(dir.path(), &config(2, 1)).unwrap_err();
    assert!(matches!(err, SimError::DifferentExperiment { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("holds a run of a different experiment")
            && message.contains("now: seed = 2")
            && message.contains("was: seed = 1")
            && message.contains("choose another --out"),
        "{message}"
    );
    // Also when the run is interrupted: it must not be resumed under other settings.
    let dir = tempfile::tempdir().unwrap();
    drop(steps(&config(1, 1), dir.path(), 1));
    assert!(Run::inspect(dir.path(), &config(2, 1)).is_err());
}

#[test]
fn an_interrupted_run_resumes_from_its_checkpoint_or_starts_again_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1, 1);
    drop(steps(&config, dir.path(), 2));
    assert!(matches!(
        Run::inspect(dir.path(), &config).unwrap(),
        RunFolder::Checkpointed
    ));

    // No checkpoint yet (checkpoint_every = 0): metrics exist but nothing can be resumed.
    let dir = tempfile::tempdir().unwrap();
    let config = self::config(1, 0);
    drop(steps(&config, dir.path(), 2));
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    assert!(matches!(
        Run::inspect(dir.path(), &config).unwrap(),
        RunFolder::Unfinished
    ));
    clear_run_files(dir.path()).unwrap();
    for file in RUN_FILES {
        assert!(!dir.path().join(file).exists(), "{file} cleared");
    }
    assert!(dir.path().join("notes.txt").exists(), "other files stay");
    assert!(matches!(
        Run::inspect(dir.path(), &config).unwrap(),
        RunFolder::Empty
    ));
    let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 1).unwrap();
    run.step().unwrap();
}

#[test]
fn a_damaged_summary_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1, 1);
    steps(&config, dir.path(), 3).finish().unwrap();
    std::fs::write(dir.path().join("summary.json"), "{").unwrap();
    let message = Run::inspect(dir.path(), &config).unwrap_err().to_string();
    assert!(
        message.contains("summary.json") && message.contains("not a fedra summary"),
        "{message}"
    );
}
