//! Every experiment file in `experiments/` runs: each grid cell of its `short` profile (or of the
//! file itself when it has none) trains one round on a slice of the real dataset and is evaluated.
//! The slice keeps the test to minutes; the configuration is the file's in every other respect
//! (model, partition scheme, strategy, batch size, sharing, SGD twin), so a file that would fail
//! hours into a study run fails here instead.
//!
//! What is scaled down, and why:
//! - `train.rounds` = 1, `eval.every` = 1;
//! - `data.train_examples` / `data.test_examples`: 300 (1,000 with sharing, 3 per client with
//!   1,000 clients) / 100 examples, the test ones taking the classes in turn (a class-ordered
//!   test file would otherwise give one class): enough for every partition scheme and sharing
//!   setting of the files to be feasible, few enough that the 211 cells take ~4 minutes, not 8;
//! - `share.holdout` (and so |G|) in proportion, `share.warmup_epochs` at most 1;
//! - `model.init` (the pre-trained runs read the SGD run's final weights) points at a freshly
//!   initialised model saved in a temporary folder; a model file (`models/*.toml`) is read from
//!   the repo root, as `fedra run` started there reads it;
//! - Speech Commands: the shared subset is the official *test* archive, whose clips all fall in
//!   the testing split; the loader splits it by speaker, and the test interleaves train's
//!   classes so that a prefix of it holds every keyword.
//!
//! Needs `FEDRA_TEST_DATA` (the shared datasets folder); it only reads it.

use std::path::{Path, PathBuf};

use fedra_data::speech::FeatureCache;
use fedra_data::{Dataset, DatasetName, LoadOptions, SpeechOptions, TrainTest, load};
use fedra_fl::federation::model_spec;
use fedra_fl::sweep::expand;
use fedra_nn::Model;
use fedra_sim::Run;

fn test_data() -> PathBuf {
    let raw = std::env::var_os("FEDRA_TEST_DATA").expect(
        "FEDRA_TEST_DATA is not set: point it at the shared datasets folder, e.g. FEDRA_TEST_DATA=../shared/datasets (relative to the repo root)",
    );
    let p = PathBuf::from(raw);
    let p = if p.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    } else {
        p
    };
    assert!(
        p.is_dir(),
        "FEDRA_TEST_DATA={} is not a folder",
        p.display()
    );
    p
}

fn experiment_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            experiment_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

/// Training / test examples the runs use at most.
const MAX_TRAIN: usize = 3000;
const MAX_TEST: usize = 100;

/// The first `MAX_TRAIN` / `MAX_TEST` examples of a dataset, or for Speech Commands the loader's
/// speaker split of the shared subset with train interleaved by class.
fn load_dataset(name: DatasetName) -> TrainTest {
    let opts = LoadOptions {
        speech: SpeechOptions {
            cache: FeatureCache::Disabled,
            ..SpeechOptions::default()
        },
        ..LoadOptions::default()
    };
    let root = test_data();
    let dir = match name {
        DatasetName::Mnist => root.join("mnist"),
        DatasetName::Cifar10 => root.join("cifar-10-batches-bin"),
        DatasetName::SpeechCommands => root.join("speech_commands_subset"),
        DatasetName::MedMnist(_) => root.join("medmnist"),
        DatasetName::ImageFolder => panic!("experiments/ must not depend on a user's image folder"),
    };
    let data = load(name, Some(&dir), &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    if name != DatasetName::SpeechCommands {
        // Cut here, once: each run clones what it is given. The test files can be in class order
        // (the shared CIFAR-10 test file is), so the test cut takes the classes in turn and every
        // run is evaluated on every class.
        let test = interleave_classes(&data.test);
        let test = test.subset(&(0..MAX_TEST.min(test.len())).collect::<Vec<_>>());
        assert!(
            test.class_counts().iter().all(|&n| n > 0),
            "{name:?}: the test cut misses a class: {:?}",
            test.class_counts()
        );
        return TrainTest {
            train: data
                .train
                .subset(&(0..MAX_TRAIN.min(data.train.len())).collect::<Vec<_>>()),
            test,
        };
    }
    // Every clip of the shared subset is in the official testing split, so the loader splits it
    // by speaker (20% of clips to test).
    assert!(
        !data.train.is_empty() && data.test.len() * 5 >= data.train.len() + data.test.len(),
        "the loader's speaker split changed: {} train / {} test clips",
        data.train.len(),
        data.test.len()
    );
    // The clips come in class order and the runs keep only a file-order prefix of train, so
    // interleave the classes to keep every class in it.
    TrainTest {
        train: interleave_classes(&data.train),
        test: data.test,
    }
}

/// The dataset reordered so the classes take turns: the first example of each class, then the
/// second, ...; any prefix of it holds every class it can.
fn interleave_classes(data: &Dataset) -> Dataset {
    let mut seen = vec![0usize; data.class_names.len()];
    let mut rank = Vec::with_capacity(data.len());
    for &label in &data.labels {
        rank.push(seen[label as usize]);
        seen[label as usize] += 1;
    }
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| (rank[i], data.labels[i]));
    data.subset(&order)
}

#[test]
fn every_experiment_runs_one_round_of_its_short_profile_on_real_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments");
    let mut files = Vec::new();
    experiment_files(&root, &mut files);
    files.sort();
    assert!(
        files.len() >= 20,
        "found only {} experiment files",
        files.len()
    );
    let mut loaded: Vec<(DatasetName, TrainTest)> = Vec::new();
    let scratch = tempfile::tempdir().unwrap();
    let mut runs = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let origin = path.display().to_string();
        let has_short = text.contains("[profile.short]");
        let cells =
            expand(&text, &origin, has_short.then_some("short")).unwrap_or_else(|e| panic!("{e}"));
        for (k, cell) in cells.into_iter().enumerate() {
            let mut config = cell.config;
            let name = config.data.dataset;
            if !loaded.iter().any(|(n, _)| *n == name) {
                loaded.push((name, load_dataset(name)));
            }
            let data = &loaded.iter().find(|(n, _)| *n == name).unwrap().1;
            let what = format!("{origin} [{}]", cell.name);

            config.train.rounds = 1;
            config.eval.every = 1;
            // Enough examples that 1,000 clients (the memory benchmark) each hold a few.
            let clients = config.partition.clients;
            // Sharing needs more: G at beta 2.5% must still hold examples of every class.
            let least = if config.share.is_some() { 1000 } else { 300 };
            let train_n = (3 * clients).max(least).min(data.train.len());
            assert!(3 * clients <= MAX_TRAIN, "{what}: raise MAX_TRAIN");
            let train_n = config
                .data
                .train_examples
                .map_or(train_n, |n| n.min(train_n));
            config.data.train_examples = Some(train_n);
            config.data.test_examples = Some(data.test.len());
            if let Some(share) = &mut config.share {
                // Large enough for a class-balanced G of beta 25% of the clients' data.
                share.holdout = train_n / 2;
                share.warmup_epochs = share.warmup_epochs.min(1);
            }
            // Model files are named relative to the repo root, where `fedra run` is started.
            if config.model.name.ends_with(".toml") && Path::new(&config.model.name).is_relative() {
                config.model.name = root
                    .join("..")
                    .join(&config.model.name)
                    .display()
                    .to_string();
            }
            if config.model.init.is_some() {
                let selected = config.data.select(data.clone()).unwrap();
                let spec = model_spec(&config, &selected.train).unwrap();
                let init = scratch.path().join(format!("init-{runs}.safetensors"));
                Model::new(&spec, 7)
                    .unwrap()
                    .save_safetensors(&init)
                    .unwrap();
                config.model.init = Some(init);
            }
            config
                .validate(&what)
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            let dir = scratch.path().join(format!("run-{runs}-{k}"));
            let mut run =
                Run::start(config, data.clone(), &dir, 2).unwrap_or_else(|e| panic!("{what}: {e}"));
            while !run.federation.finished() {
                run.step().unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            let history = run.federation.history.clone();
            let twin = run.federation.config.eval.sgd_twin;
            let summary = run.finish().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(summary.rounds, 1, "{what}");
            assert_eq!(
                history.iter().map(|r| r.round).collect::<Vec<_>>(),
                vec![0, 1],
                "{what}"
            );
            let last = history.last().unwrap();
            assert!(
                (0.0..=1.0).contains(&last.test_accuracy) && last.test_loss.is_finite(),
                "{what}: accuracy {} loss {}",
                last.test_accuracy,
                last.test_loss
            );
            assert!(
                last.train_loss.is_some_and(f64::is_finite),
                "{what}: train loss {:?}",
                last.train_loss
            );
            if twin {
                assert!(last.sgd_test_accuracy.is_some(), "{what}: no SGD twin");
                assert!(!last.divergence.is_empty(), "{what}: no divergence");
            }
            for file in [
                "config.toml",
                "metrics.csv",
                "partition.json",
                "final.safetensors",
            ] {
                assert!(dir.join(file).is_file(), "{what}: no {file}");
            }
            runs += 1;
        }
    }
    assert!(runs >= 60, "only {runs} runs");
}

/// A federated run on PneumoniaMNIST records the clinical metrics every round, consistently:
/// balanced accuracy is the mean sensitivity, accuracy is the count-weighted sensitivity, the
/// summary's AUC is the last row's and equals the AUC of the saved final model recomputed here,
/// and three IID rounds learn (AUC > 0.85; MedMNIST's ResNet-18 reaches 0.944).
#[test]
fn a_pneumoniamnist_run_records_consistent_clinical_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/medical");
    let text = std::fs::read_to_string(root.join("pneumonia.toml")).unwrap();
    let mut config = expand(&text, "pneumonia.toml", None).unwrap()[0]
        .config
        .clone();
    assert_eq!(config.partition.scheme, "iid");
    config.train.rounds = 3;
    let data = load(
        config.data.dataset,
        Some(&test_data()),
        &LoadOptions::default(),
    )
    .unwrap();
    let test = data.test.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config, data, dir.path(), 2).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let history = run.federation.history.clone();
    let spec = run.federation.spec.clone();
    let summary = run.finish().unwrap();

    let counts = test.class_counts();
    for row in &history {
        let m = &row.clinical;
        let sens: Vec<f64> = m.sensitivity.iter().map(|s| s.unwrap()).collect();
        let mean = sens.iter().sum::<f64>() / 2.0;
        assert!((m.balanced_accuracy.unwrap() - mean).abs() < 1e-12, "{m:?}");
        let correct: f64 = sens.iter().zip(&counts).map(|(s, &n)| s * n as f64).sum();
        assert!(
            (correct / test.len() as f64 - row.test_accuracy).abs() < 1e-9,
            "round {}: {m:?} vs accuracy {}",
            row.round,
            row.test_accuracy
        );
    }
    let last = history.last().unwrap();
    assert_eq!(summary.final_auc, last.clinical.auc);
    assert!(summary.final_auc.unwrap() > 0.85, "{summary:?}");
    assert_eq!(
        summary
            .final_per_class
            .iter()
            .map(|c| c.class.as_str())
            .collect::<Vec<_>>(),
        ["normal", "pneumonia"]
    );

    // The saved model, evaluated here, gives the recorded AUC.
    let model = Model::load_safetensors(&spec, &dir.path().join("final.safetensors")).unwrap();
    let mut trainer = fedra_nn::Trainer::new(&spec, 256).unwrap();
    let (_, probs) = trainer
        .evaluate_with_probs(&model, &test.features, &test.labels)
        .unwrap();
    let scores: Vec<f64> = probs.chunks_exact(2).map(|p| p[1]).collect();
    let positive: Vec<bool> = test.labels.iter().map(|&l| l == 1).collect();
    assert_eq!(fedra_nn::roc_auc(&scores, &positive), summary.final_auc);

    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header.ends_with(
            ",test_auc,test_balanced_accuracy,sensitivity_0,sensitivity_1,specificity_0,specificity_1,\
             bytes_sent,bytes_received"
        ),
        "{header}"
    );
    let last_line: Vec<&str> = csv.lines().last().unwrap().split(',').collect();
    let auc_cell: f64 = last_line[last_line.len() - 8].parse().unwrap();
    assert!((auc_cell - summary.final_auc.unwrap()).abs() < 1e-6);
    // Bytes are cumulative over the run and equal both ways for FedAvg.
    let sent: u64 = last_line[last_line.len() - 2].parse().unwrap();
    let received: u64 = last_line[last_line.len() - 1].parse().unwrap();
    assert!(sent > 0 && sent == received, "{sent} {received}");
}
