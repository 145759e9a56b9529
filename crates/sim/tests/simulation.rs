//! The simulation's promises, on the MNIST subset embedded in fedra: bit-identical results for
//! any thread count, a resumed run equal to an uninterrupted one, and the SGD twin's divergence
//! columns present and zero at round 0.

use fedra_data::embedded_mnist;
use fedra_fl::{ExperimentConfig, RoundMetrics};
use fedra_sim::Run;

fn config(
    extra: &str,
    model: &str,
    scheme: &str,
    fraction: f64,
    rounds: usize,
) -> ExperimentConfig {
    let text = format!(
        r#"
[data]
dataset = "mnist"
[partition]
scheme = "{scheme}"
clients = 10
[model]
name = "{model}"
[train]
rounds = {rounds}
batch_size = 10
lr = 0.05
lr_decay = 0.99
fraction = {fraction}
[run]
seed = 11
checkpoint_every = 2
{extra}
"#
    );
    ExperimentConfig::from_toml_str(&text, "test").unwrap()
}

fn run_to_end(config: ExperimentConfig, threads: usize) -> (Vec<f32>, Vec<f32>, Vec<RoundMetrics>) {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), threads).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let out = (
        run.federation.global.params().to_vec(),
        run.federation.global.buffers().to_vec(),
        run.federation.history.clone(),
    );
    let summary = run.finish().unwrap();
    assert!(dir.path().join("final.safetensors").exists());
    assert!(dir.path().join("summary.json").exists());
    assert!(
        !dir.path().join("checkpoint").exists(),
        "checkpoint removed at the end"
    );
    assert_eq!(summary.rounds, out.2.last().unwrap().round);
    out
}

/// Run a resumed `run` to its end and check it equals the uninterrupted reference: parameters,
/// buffers (when given) and metrics without timings; `what` names the case in failures.
fn finish_like(
    mut run: Run,
    p_ref: &[f32],
    b_ref: Option<&[f32]>,
    h_ref: &[RoundMetrics],
    what: &str,
) {
    while !run.federation.finished() {
        run.step().unwrap();
    }
    assert!(
        run.federation.global.params() == p_ref,
        "{what}: parameters"
    );
    if let Some(b_ref) = b_ref {
        assert!(run.federation.global.buffers() == b_ref, "{what}: buffers");
    }
    assert_eq!(
        without_timings(&run.federation.history),
        without_timings(h_ref),
        "{what}"
    );
}

fn without_timings(history: &[RoundMetrics]) -> Vec<RoundMetrics> {
    history
        .iter()
        .cloned()
        .map(|mut r| {
            r.seconds = 0.0;
            r
        })
        .collect()
}

#[test]
fn results_are_bit_identical_for_one_and_two_threads() {
    // A CNN with BatchNorm (buffers averaged) on 3 of 10 non-IID clients per round, evaluated
    // on 500 of the embedded test images.
    let mut config = config("", "mnist-cnn-bn", "classes:2", 0.3, 2);
    config.data.test_examples = Some(500);
    let (p1, b1, h1) = run_to_end(config.clone(), 1);
    let (p2, b2, h2) = run_to_end(config, 2);
    assert!(p1 == p2, "parameters differ between 1 and 2 threads");
    assert!(b1 == b2, "buffers differ between 1 and 2 threads");
    assert_eq!(without_timings(&h1), without_timings(&h2));
    // It learned something: better than chance after two rounds.
    assert!(h1.last().unwrap().test_accuracy > 0.3, "{:?}", h1.last());
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let config = config("[eval]\nsgd_twin = true", "mlp", "dirichlet:0.5", 0.5, 5);
    let (p_ref, b_ref, h_ref) = run_to_end(config.clone(), 2);

    let dir = tempfile::tempdir().unwrap();
    {
        let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 2).unwrap();
        // Three rounds: a checkpoint after round 2, then one more round whose work is lost
        // when the process "dies" here.
        for _ in 0..3 {
            run.step().unwrap();
        }
        assert_eq!(run.federation.rounds_done, 3);
    }
    let run = Run::resume(dir.path(), embedded_mnist().unwrap(), 1).unwrap();
    assert_eq!(
        run.federation.rounds_done, 2,
        "resumes from the round-2 checkpoint"
    );
    finish_like(run, &p_ref, Some(&b_ref), &h_ref, "resumed");
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 6, "header + rounds 0..=5:\n{csv}");
}

#[test]
fn a_converged_run_stops_at_the_first_round_meeting_the_criterion() {
    let extra = "[eval]\nevery = 2\nstop_when_converged = { window = 4, within = 1.0 }";
    let config = config(extra, "mlp", "iid", 1.0, 40);
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config.clone(), embedded_mnist().unwrap(), dir.path(), 2).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let history: Vec<(usize, f64)> = run
        .federation
        .history
        .iter()
        .map(|r| (r.round, r.test_accuracy))
        .collect();
    let summary = run.finish().unwrap();
    let stopped = summary.converged_round.expect("converged within 40 rounds");
    assert!(stopped < 40, "{history:?}");
    assert_eq!(summary.rounds, stopped);
    assert_eq!(history.last().unwrap().0, stopped);
    // The first round where the three evaluations r-4, r-2, r lie within one point, and no
    // earlier one.
    let criterion = config.eval.stop_when_converged.unwrap();
    assert_eq!(criterion.first_met(&history), Some(stopped), "{history:?}");
    let window: Vec<f64> = history[history.len() - 3..].iter().map(|r| r.1).collect();
    let spread = window.iter().cloned().fold(f64::MIN, f64::max)
        - window.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread * 100.0 < 1.0, "{window:?}");
    eprintln!("stopped at round {stopped}: {history:?}");
}

#[test]
fn sgd_twin_divergence_is_reported_and_zero_at_round_zero() {
    let config = config("[eval]\nsgd_twin = true", "mlp", "classes:1", 1.0, 2);
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 2).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let history = run.federation.history.clone();
    run.finish().unwrap();
    let first = &history[0];
    assert_eq!(first.round, 0);
    assert!(!first.divergence.is_empty());
    assert!(
        first.divergence.iter().all(|d| d.value == 0.0),
        "{:?}",
        first.divergence
    );
    let last = history.last().unwrap();
    assert!(
        last.divergence.iter().all(|d| d.value > 0.0),
        "{:?}",
        last.divergence
    );
    assert!(last.sgd_test_accuracy.unwrap() > 0.5);
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header.starts_with(
            "round,lr,test_accuracy,test_loss,train_loss,seconds,sgd_test_accuracy,wd_"
        ),
        "{header}"
    );
    assert!(
        header.contains("wd_fc1.weight") && header.contains(",wd_fc1,"),
        "{header}"
    );
    let row0: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let wd_columns = header.split(',').filter(|c| c.starts_with("wd_")).count();
    assert!(
        row0[7..7 + wd_columns]
            .iter()
            .all(|v| v.parse::<f64>().unwrap() == 0.0),
        "{row0:?}"
    );
    // The clinical metrics follow the divergence columns.
    assert!(
        header.contains(",wd_fc3,test_auc,test_balanced_accuracy,sensitivity_0,"),
        "{header}"
    );
}

#[test]
fn an_existing_run_folder_is_not_overwritten() {
    let config = config("", "logreg", "iid", 1.0, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config.clone(), embedded_mnist().unwrap(), dir.path(), 1).unwrap();
    run.step().unwrap();
    run.finish().unwrap();
    let err = Run::start(config, embedded_mnist().unwrap(), dir.path(), 1)
        .err()
        .expect("second start must fail");
    assert!(err.to_string().contains("--resume"), "{err}");
}

/// SCAFFOLD on real data with one class per client: every control starts at zero, so its first
/// round is FedAvg's bit for bit; from the second round on the clients' corrections change the
/// weights. The accuracies are printed (see the note of issue #15 for a longer comparison).
#[test]
fn scaffold_starts_as_fedavg_and_then_steers_the_clients() {
    let text = |strategy: &str, rounds: usize| {
        format!(
            r#"
[data]
dataset = "mnist"
train_examples = 2000
test_examples = 500
[partition]
scheme = "classes:1"
clients = 10
[model]
name = "mlp"
[train]
rounds = {rounds}
batch_size = 20
lr = 0.05
[strategy]
name = "{strategy}"
[run]
seed = 2
"#
        )
    };
    let config = |strategy: &str, rounds: usize| {
        ExperimentConfig::from_toml_str(&text(strategy, rounds), strategy).unwrap()
    };
    let (p_avg, _, _) = run_to_end(config("fedavg", 1), 2);
    let (p_scaffold, _, _) = run_to_end(config("scaffold", 1), 2);
    assert_eq!(bits(&p_scaffold), bits(&p_avg), "round 1 must be FedAvg's");
    let (p_avg, _, h_avg) = run_to_end(config("fedavg", 4), 2);
    let (p_scaffold, _, h_scaffold) = run_to_end(config("scaffold", 4), 2);
    assert_ne!(bits(&p_scaffold), bits(&p_avg));
    let acc = |h: &[RoundMetrics]| h.iter().map(|r| r.test_accuracy).collect::<Vec<_>>();
    eprintln!("fedavg {:?}\nscaffold {:?}", acc(&h_avg), acc(&h_scaffold));
    assert!(h_scaffold.iter().all(|r| r.test_loss.is_finite()));

    // Bytes: the model both ways to each of the 10 clients every round; from round 2 on each
    // SCAFFOLD task also carries the client's correction c - c_i (model-sized) down; nothing
    // extra comes back (the server keeps the controls).
    let model = 4 * p_avg.len() as u64;
    for (avg, scaffold) in h_avg.iter().zip(&h_scaffold) {
        let expected = avg.round as u64 * 10 * model;
        assert_eq!((avg.bytes_sent, avg.bytes_received), (expected, expected));
        let corrections = (avg.round as u64).saturating_sub(1) * 10 * model;
        assert_eq!(
            (scaffold.bytes_sent, scaffold.bytes_received),
            (expected + corrections, expected)
        );
    }
}

/// Data sharing's examples count as bytes sent before round 1 (f32 features and a label), on
/// top of the model's traffic; the summary divides the run's bytes by the clients.
#[test]
fn traffic_counts_the_shared_examples_before_the_first_round() {
    let config = config(
        "[share]\nholdout = 400\nbeta = 0.02\nalpha = 0.5\nwarmup_epochs = 0",
        "logreg",
        "classes:1",
        0.5,
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 1).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let fed = &run.federation;
    let before = fed.before_share.as_ref().unwrap();
    let shared: usize = fed
        .partition
        .clients
        .iter()
        .zip(&before.clients)
        .map(|(after, before)| after.len() - before.len())
        .sum();
    assert!(shared > 0);
    let shared_bytes = shared as u64 * 4 * (28 * 28 + 1);
    let model = 4 * fed.global.params().len() as u64;
    let rows: Vec<(usize, u64, u64)> = fed
        .history
        .iter()
        .map(|r| (r.round, r.bytes_sent, r.bytes_received))
        .collect();
    // fraction 0.5 of 10 clients: 5 a round.
    assert_eq!(
        rows,
        [
            (0, shared_bytes, 0),
            (1, shared_bytes + 5 * model, 5 * model),
            (2, shared_bytes + 10 * model, 10 * model)
        ]
    );
    let summary = run.finish().unwrap();
    let each = summary.bytes_per_client.unwrap();
    assert_eq!(
        (each.sent, each.received),
        ((shared_bytes + 10 * model) / 10, model)
    );
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",bytes_sent,bytes_received")
    );
    assert!(
        csv.lines().nth(2).unwrap().ends_with(&format!(
            ",{},{}",
            shared_bytes + 5 * model,
            5 * model
        )),
        "{csv}"
    );
}

/// Resume must be exact for every kind of server and client state, not only FedAvg's: server
/// momentum (FedAvgM), adaptive moments (FedYogi), BatchNorm buffers averaged with fractional
/// counters, FedBN's per-client normalisation layers and SCAFFOLD's control variates, plus data
/// sharing with warm-up, DP-FedAvg's sampling and noise, and the SGD twin.
#[test]
fn resume_is_exact_for_stateful_strategies_batchnorm_sharing_and_privacy() {
    let cases = [
        (
            "fedavgm",
            "server_lr = 1.0\nserver_momentum = 0.9",
            "train",
            // The SGD twin's model and momentum are checkpointed too (strategy-independent, so
            // one case carries it: it costs two thirds of a case's time).
            "[eval]\nsgd_twin = true",
        ),
        (
            // The adaptive optimisers share their state code; FedYogi's sign rule is the one
            // most sensitive to a moment restored wrongly.
            "fedyogi",
            "server_lr = 0.01\nbeta1 = 0.9\nbeta2 = 0.99\ntau = 0.001",
            "local",
            // With DP-FedAvg too: Poisson sampling (q = 0.5) and noise are seeded by the round.
            "[share]\nholdout = 400\nbeta = 0.1\nalpha = 0.5\nwarmup_epochs = 1\n\
             [privacy]\nclip = 1.0\nnoise_multiplier = 0.001",
        ),
        // SCAFFOLD's server control and the controls of the clients sampled so far.
        ("scaffold", "server_lr = 1.0", "train", ""),
    ];
    for (strategy, keys, bn, extra) in cases {
        let text = format!(
            r#"
[data]
dataset = "mnist"
train_examples = 1000
test_examples = 200
[partition]
scheme = "dirichlet:0.5"
clients = 6
[model]
name = "mnist-cnn-bn"
bn = "{bn}"
[train]
rounds = 3
batch_size = 32
lr = 0.05
fraction = 0.5
[strategy]
name = "{strategy}"
{keys}
[run]
seed = 5
checkpoint_every = 1
{extra}
"#
        );
        let config = ExperimentConfig::from_toml_str(&text, strategy).unwrap();
        let (p_ref, b_ref, h_ref) = run_to_end(config.clone(), 2);
        if let Some(privacy) = &config.privacy {
            // The epsilon spent after r rounds, as the accountant gives it.
            for row in &h_ref {
                let z = f64::from(privacy.noise_multiplier);
                let eps = fedra_fl::privacy::epsilon(0.5, z, row.round, privacy.delta).0;
                assert_eq!(row.epsilon, Some(eps), "round {}", row.round);
            }
            assert!(h_ref.last().unwrap().epsilon.unwrap() > 0.0);
        }
        let dir = tempfile::tempdir().unwrap();
        {
            let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 2).unwrap();
            run.step().unwrap();
            run.step().unwrap();
        }
        let run = Run::resume(dir.path(), embedded_mnist().unwrap(), 1).unwrap();
        assert_eq!(run.federation.rounds_done, 2, "{strategy}");
        finish_like(run, &p_ref, Some(&b_ref), &h_ref, strategy);
    }
}

/// Rewrite the server-state file of the checkpoint in `dir`, letting `edit` change its tensors.
fn edit_server_state(dir: &std::path::Path, edit: impl FnOnce(&mut Vec<(String, Vec<f32>)>)) {
    use safetensors::tensor::{Dtype, TensorView};
    let path = dir.join("checkpoint").join("server.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut named: Vec<(String, Vec<f32>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    edit(&mut named);
    let raw: Vec<(String, Vec<u8>, usize)> = named
        .iter()
        .map(|(name, values)| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), bytes, values.len())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(name, bytes, len)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, vec![*len], bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Server-optimiser state that does not fit the model (a damaged or foreign checkpoint) is an
/// error naming the file and the state, never silently replaced by zeros.
#[test]
fn resume_rejects_server_optimiser_state_of_the_wrong_length() {
    type Edit = fn(&mut Vec<(String, Vec<f32>)>);
    let cases: [(&str, &str, &str, Edit); 3] = [
        (
            "fedavgm",
            "server_lr = 1.0\nserver_momentum = 0.9",
            "`velocity`",
            |named| {
                let t = named
                    .iter_mut()
                    .find(|(n, _)| n == "strategy.velocity")
                    .unwrap();
                t.1.truncate(t.1.len() - 1);
            },
        ),
        ("fedadam", "server_lr = 0.01", "`v`", |named| {
            let t = named.iter_mut().find(|(n, _)| n == "strategy.v").unwrap();
            t.1.push(0.5);
        }),
        ("fedadam", "server_lr = 0.01", "`m`", |named| {
            named.retain(|(n, _)| n != "strategy.m")
        }),
    ];
    for (strategy, keys, named_in_error, edit) in cases {
        let config = config(
            &format!("[strategy]\nname = \"{strategy}\"\n{keys}"),
            "logreg",
            "iid",
            1.0,
            3,
        );
        let dir = tempfile::tempdir().unwrap();
        {
            let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 1).unwrap();
            run.step().unwrap();
            run.step().unwrap();
        }
        edit_server_state(dir.path(), edit);
        let err = Run::resume(dir.path(), embedded_mnist().unwrap(), 1)
            .err()
            .unwrap_or_else(|| panic!("{strategy}: a damaged {named_in_error} must be rejected"))
            .to_string();
        assert!(
            err.contains("server.safetensors") && err.contains(named_in_error),
            "{strategy}: {err}"
        );
    }
}

/// Seconds and examples accumulate over rounds that are not evaluated; a checkpoint taken
/// between evaluations must carry them, so the next row after a resume counts the same.
#[test]
fn resume_between_evaluations_keeps_the_pending_accounting() {
    let config = config("[eval]\nevery = 2", "logreg", "dirichlet:0.5", 0.5, 4);
    let mut config = config;
    config.run.checkpoint_every = 1;
    let (p_ref, _, h_ref) = run_to_end(config.clone(), 1);
    let dir = tempfile::tempdir().unwrap();
    let pending = {
        let mut run = Run::start(config, embedded_mnist().unwrap(), dir.path(), 1).unwrap();
        for _ in 0..3 {
            run.step().unwrap();
        }
        (
            run.federation.pending_seconds,
            run.federation.pending_examples,
        )
    };
    assert!(pending.0 > 0.0 && pending.1 > 0, "{pending:?}");
    let state_path = dir.path().join("checkpoint").join("state.json");
    let state = std::fs::read_to_string(&state_path).unwrap();
    let run = Run::resume(dir.path(), embedded_mnist().unwrap(), 1).unwrap();
    assert_eq!(run.federation.rounds_done, 3);
    assert_eq!(
        (
            run.federation.pending_seconds,
            run.federation.pending_examples
        ),
        pending
    );
    finish_like(
        run,
        &p_ref,
        None,
        &h_ref,
        "examples of the row after the resume",
    );

    // A checkpoint written before these fields existed still loads, with nothing pending.
    let mut old: serde_json::Value = serde_json::from_str(&state).unwrap();
    let fields = old.as_object_mut().unwrap();
    assert!(fields.remove("pending_seconds").is_some());
    assert!(fields.remove("pending_examples").is_some());
    std::fs::write(&state_path, old.to_string()).unwrap();
    let run = Run::resume(dir.path(), embedded_mnist().unwrap(), 1).unwrap();
    assert_eq!(run.federation.rounds_done, 3);
    assert_eq!(run.federation.pending_examples, 0);
}

/// The checkpoint holds the global model: resuming must neither read `model.init` again (it
/// may be gone) nor repeat the data-sharing warm-up, and still end bit-identical.
#[test]
fn resume_needs_neither_the_init_file_nor_the_warmup() {
    let init_dir = tempfile::tempdir().unwrap();
    let init = init_dir.path().join("init.safetensors");
    let spec = fedra_nn::ModelSpec::by_name("mlp", [1, 28, 28], 10).unwrap();
    fedra_nn::Model::new(&spec, 99)
        .unwrap()
        .save_safetensors(&init)
        .unwrap();
    let text = format!(
        r#"
[data]
dataset = "mnist"
train_examples = 2000
test_examples = 500
[partition]
scheme = "classes:2"
clients = 5
[model]
name = "mlp"
init = "{}"
[train]
rounds = 3
batch_size = 32
lr = 0.05
[strategy]
name = "fedadam"
server_lr = 0.01
[eval]
sgd_twin = true
[run]
seed = 3
checkpoint_every = 1
[share]
holdout = 400
beta = 0.1
alpha = 0.5
warmup_epochs = 1
"#,
        init.display()
    );
    let config = ExperimentConfig::from_toml_str(&text, "init").unwrap();
    let (p_ref, b_ref, h_ref) = run_to_end(config.clone(), 2);
    let dir = tempfile::tempdir().unwrap();
    {
        let mut run = Run::start(config.clone(), embedded_mnist().unwrap(), dir.path(), 2).unwrap();
        run.step().unwrap();
        run.step().unwrap();
    }
    std::fs::remove_file(&init).unwrap();
    // What resume builds on: a federation given its global model keeps it as it is (no init
    // file read, no warm-up on G).
    let start = fedra_nn::Model::new(&spec, 7).unwrap();
    let data = config.data.select(embedded_mnist().unwrap()).unwrap();
    let fed = fedra_fl::Federation::with_global(config.clone(), &data, 1, start.clone()).unwrap();
    assert!(fed.global.params() == start.params());
    let run = Run::resume(dir.path(), embedded_mnist().unwrap(), 1).unwrap();
    assert_eq!(run.federation.rounds_done, 2);
    finish_like(run, &p_ref, Some(&b_ref), &h_ref, "resumed");
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn transfer_config(model: &str, bn: &str, freeze: &str, extra_model: &str) -> ExperimentConfig {
    let text = format!(
        r#"
[data]
dataset = "mnist"
train_examples = 2000
test_examples = 300
[partition]
scheme = "classes:1"
clients = 10
[model]
name = "{model}"
bn = "{bn}"
freeze = {freeze}
{extra_model}
[train]
rounds = 2
batch_size = 10
lr = 0.05
momentum = 0.9
weight_decay = 0.0005
[run]
seed = 5
"#
    );
    ExperimentConfig::from_toml_str(&text, "test").unwrap()
}

/// Class probabilities of the first 200 test images under `model`.
fn outputs(model: &fedra_nn::Model, data: &fedra_data::TrainTest) -> Vec<f64> {
    let n = 200;
    let mut trainer = fedra_nn::Trainer::new(model.spec(), 64).unwrap();
    let x = &data.test.features[..n * data.test.example_len()];
    trainer
        .evaluate_with_probs(model, x, &data.test.labels[..n])
        .unwrap()
        .1
}

/// The BatchNorm trap on real data: a model with every weight frozen still changes under
/// `bn = "train"` (clients' running statistics move towards their own classes and the server
/// averages them), while `bn = "frozen"`, or `bn = "train"` with every layer's statistics
/// frozen by `freeze_statistics`, leaves weights, statistics and outputs bit-identical.
#[test]
fn every_weight_frozen_still_moves_batchnorm_unless_bn_is_frozen() {
    let data = embedded_mnist().unwrap();
    for (bn, extra, moves) in [
        ("train", "", true),
        ("frozen", "", false),
        ("train", r#"freeze_statistics = ["bn*"]"#, false),
    ] {
        let config = transfer_config("mnist-cnn-bn", bn, r#"["*"]"#, extra);
        let dir = tempfile::tempdir().unwrap();
        let mut run = Run::start(config, data.clone(), dir.path(), 2).unwrap();
        assert_eq!(run.federation.trainable_params().0, 0);
        let before = run.federation.global.clone();
        while !run.federation.finished() {
            run.step().unwrap();
        }
        let after = run.federation.global.clone();
        assert_eq!(
            bits(after.params()),
            bits(before.params()),
            "bn = {bn} {extra}"
        );
        let (out_before, out_after) = (outputs(&before, &data), outputs(&after, &data));
        // The clients' statistics disagree after a round exactly when they move.
        let spreads: Vec<f64> = run.federation.history[1..]
            .iter()
            .map(|r| r.bn_spread.expect("a BatchNorm model reports bn_spread"))
            .collect();
        assert!(!spreads.is_empty());
        assert!(
            spreads.iter().all(|&s| (s > 0.0) == moves),
            "bn = {bn} {extra}: spreads {spreads:?}"
        );
        if moves {
            let mean = after.tensor("bn1.running_mean").unwrap();
            let moved = mean
                .iter()
                .zip(before.tensor("bn1.running_mean").unwrap())
                .filter(|(a, b)| a != b)
                .count();
            assert!(moved > 0, "running means did not move");
            let changed = out_before
                .iter()
                .zip(&out_after)
                .filter(|(a, b)| (*a - *b).abs() > 1e-3)
                .count();
            assert!(changed > 100, "outputs barely changed: {changed}");
        } else {
            assert_eq!(
                bits(after.buffers()),
                bits(before.buffers()),
                "{bn} {extra}"
            );
            assert_eq!(out_after, out_before, "{bn} {extra}");
        }
        run.finish().unwrap();
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with(",bn_spread,bytes_sent,bytes_received"),
            "{csv}"
        );
    }
    // A pattern that matches no BatchNorm layer names the pattern and the layers there are.
    let config = transfer_config(
        "mnist-cnn-bn",
        "train",
        "[]",
        r#"freeze_statistics = ["fc*"]"#,
    );
    let err = Run::start(config, data, tempfile::tempdir().unwrap().path(), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("freeze_statistics") && err.contains("\"fc*\"") && err.contains("bn1, bn2"),
        "{err}"
    );
}

/// Frozen layers stay bit-identical through two rounds (2,000 examples) of SGD with momentum and weight decay
/// and server aggregation; the others train, and the run counts what it trains.
#[test]
fn frozen_layers_never_change_and_the_rest_trains() {
    let data = embedded_mnist().unwrap();
    let config = transfer_config("mnist-cnn", "train", r#"["conv*"]"#, "");
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(config, data, dir.path(), 2).unwrap();
    let (trainable, all) = run.federation.trainable_params();
    // conv1 32x1x5x5 + 32, conv2 64x32x5x5 + 64.
    assert_eq!(all - trainable, 832 + 51_264);
    let before = run.federation.global.clone();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let after = &run.federation.global;
    for name in ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"] {
        assert_eq!(
            bits(after.tensor(name).unwrap()),
            bits(before.tensor(name).unwrap()),
            "{name}"
        );
    }
    for name in ["fc1.weight", "fc2.bias"] {
        assert_ne!(
            bits(after.tensor(name).unwrap()),
            bits(before.tensor(name).unwrap()),
            "{name}"
        );
    }
    run.finish().unwrap();

    // A pattern that matches nothing is an error naming it, not a silent no-op.
    let config = transfer_config("mnist-cnn", "train", r#"["conv3.*"]"#, "");
    let err = Run::start(
        config,
        embedded_mnist().unwrap(),
        tempfile::tempdir().unwrap().path(),
        1,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("model.freeze") && err.contains("conv3.*"),
        "{err}"
    );
}

/// `model.reset` re-initialises the head of a pre-trained model, even one of another shape,
/// and keeps every other tensor; without it the shape mismatch is an error listing the tensors.
#[test]
fn reset_gives_a_pretrained_model_a_new_head() {
    let data = embedded_mnist().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // "Pre-trained" on 12 classes: fc2 is [12, 512] in the file, [10, 512] in the model.
    let spec12 = fedra_nn::ModelSpec::by_name("mnist-cnn", [1, 28, 28], 12).unwrap();
    let pretrained = fedra_nn::Model::new(&spec12, 99).unwrap();
    let file = dir.path().join("pretrained.safetensors");
    pretrained.save_safetensors(&file).unwrap();
    let init = format!("init = {:?}", file.display().to_string());

    let strict = transfer_config("mnist-cnn", "train", "[]", &init);
    let err = Run::start(strict, data.clone(), &dir.path().join("a"), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("wrong shape") && err.contains("fc2.weight") && err.contains("fc2.bias"),
        "{err}"
    );

    let reset = transfer_config(
        "mnist-cnn",
        "train",
        r#"["conv*", "fc1.*"]"#,
        &format!("{init}\nreset = [\"fc2.*\"]"),
    );
    let run = Run::start(reset, data, &dir.path().join("b"), 1).unwrap();
    let global = &run.federation.global;
    assert_eq!(
        bits(global.tensor("conv2.weight").unwrap()),
        bits(pretrained.tensor("conv2.weight").unwrap())
    );
    let fresh = fedra_nn::Model::new(global.spec(), 5).unwrap();
    assert_eq!(
        bits(global.tensor("fc2.weight").unwrap()),
        bits(fresh.tensor("fc2.weight").unwrap())
    );
    // Only the new head trains.
    assert_eq!(run.federation.trainable_params().0, 10 * 512 + 10);
}

/// The robust rules (and update clipping) and FedNova train on real data and, like every
/// strategy, give the same bits on one thread and two.
#[test]
fn median_and_trimmed_mean_train_bit_identically_on_any_thread_count() {
    for strategy in [
        "name = \"median\"",
        "name = \"trimmed-mean\"\ntrim = 0.2",
        "name = \"krum\"\nbyzantine = 2\nkeep = 8\nclip_update_norm = 5.0",
        // Dirichlet sizes differ: FedNova's step counts differ too.
        "name = \"fednova\"",
    ] {
        let config = config(
            &format!("[strategy]\n{strategy}"),
            "mlp",
            "dirichlet:0.5",
            1.0,
            2,
        );
        let (p1, b1, h1) = run_to_end(config.clone(), 1);
        let (p2, b2, h2) = run_to_end(config, 2);
        assert!(p1 == p2 && b1 == b2, "{strategy}: weights differ");
        assert_eq!(without_timings(&h1), without_timings(&h2));
        assert!(
            h1.last().unwrap().test_accuracy > 0.5,
            "{strategy}: {:?}",
            h1.last()
        );
    }
}

/// An experiment on the embedded MNIST subset split IID over 10 clients, all sampled, with
/// `extra` tables appended.
fn byzantine_config(extra: &str) -> ExperimentConfig {
    let text = format!(
        r#"
[data]
dataset = "mnist"
train_examples = 5000
test_examples = 1000
[partition]
scheme = "iid"
clients = 10
[model]
name = "mlp"
[train]
rounds = 3
batch_size = 10
lr = 0.05
[run]
seed = 5
{extra}
"#
    );
    ExperimentConfig::from_toml_str(&text, "test").unwrap()
}

/// Two of ten clients send their honest update reversed and scaled by 10. FedAvg's mean is then
/// dragged backwards and the model is ruined; the coordinate-wise median and Krum (f = 2) keep
/// to the honest clients and end near the clean run.
#[test]
fn byzantine_clients_break_fedavg_but_not_median_or_krum() {
    let attack = "[attack]\nclients = [3, 7]\nkind = \"sign-flip\"\nfactor = 10";
    let accuracy = |extra: &str| {
        let history = run_to_end(byzantine_config(extra), 2).2;
        history.last().unwrap().test_accuracy
    };
    let clean = accuracy("");
    let fedavg = accuracy(attack);
    let median = accuracy(&format!("[strategy]\nname = \"median\"\n{attack}"));
    let krum = accuracy(&format!(
        "[strategy]\nname = \"krum\"\nbyzantine = 2\n{attack}"
    ));
    let multi_krum = accuracy(&format!(
        "[strategy]\nname = \"krum\"\nbyzantine = 2\nkeep = 8\n{attack}"
    ));
    // Seen: clean 72.9%, attacked FedAvg 7.0%, median 70.7%, Krum 68.1% (one client's model
    // a round), multi-Krum (keep 8) 72.5%.
    assert!(fedavg < 0.2, "FedAvg {fedavg}");
    for (name, accuracy) in [
        ("median", median),
        ("krum", krum),
        ("multi-krum", multi_krum),
    ] {
        assert!(accuracy > clean - 0.08, "{name} {accuracy}, clean {clean}");
    }
    // Noise in place of an update (standard deviation 3 per weight) costs FedAvg most of what
    // it learnt; Krum leaves the noisy results out, and clipping every update to norm 1 bounds
    // what they can do. Seen: FedAvg 32.1%, Krum 68.1%, FedAvg with clipping 66.6%.
    let random = "[attack]\nclients = [3, 7]\nkind = \"random\"\nfactor = 3";
    let fedavg = accuracy(random);
    let krum = accuracy(&format!(
        "[strategy]\nname = \"krum\"\nbyzantine = 2\n{random}"
    ));
    let clipped = accuracy(&format!(
        "[strategy]\nname = \"fedavg\"\nclip_update_norm = 1.0\n{random}"
    ));
    assert!(fedavg < clean - 0.25, "FedAvg {fedavg}, clean {clean}");
    assert!(clipped > fedavg + 0.2, "clipped {clipped}, FedAvg {fedavg}");
    assert!(krum > clean - 0.08, "krum {krum}, clean {clean}");
}

/// Every file of `from` (one level of folders deep) copied into `to`.
fn copy_run_folder(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_run_folder(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// `privacy.noise = "secret"`: the run folder keeps a fresh key from the operating system,
/// readable by its owner only, while the run lasts; a copy of the folder resumes to exactly the
/// original's end (the key is read back, not drawn again); without the key a resume is refused
/// naming the file; the key is removed when the run finishes; and the run is not the seeded one.
#[test]
fn a_secret_noise_run_resumes_exactly_and_forgets_its_key() {
    let private = |noise: &str| {
        config(
            &format!("[privacy]\nclip = 1.0\nnoise_multiplier = 0.5\nnoise = \"{noise}\""),
            "logreg",
            "classes:2",
            0.5,
            4,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let mut run = Run::start(private("secret"), embedded_mnist().unwrap(), &a, 1).unwrap();
    run.step().unwrap();
    run.step().unwrap();
    let key = a.join(fedra_sim::NOISE_KEY_FILE);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        fedra_fl::privacy::NoiseKey::from_hex(&text).is_some(),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    }
    copy_run_folder(&a, &b);
    copy_run_folder(&a, &c);
    std::fs::remove_file(c.join(fedra_sim::NOISE_KEY_FILE)).unwrap();
    while !run.federation.finished() {
        run.step().unwrap();
    }
    let p_ref = run.federation.global.params().to_vec();
    let h_ref = run.federation.history.clone();
    run.finish().unwrap();
    assert!(!key.exists(), "the key outlived the run");

    let resumed = Run::resume(&b, embedded_mnist().unwrap(), 2).unwrap();
    finish_like(resumed, &p_ref, None, &h_ref, "secret noise");

    let err = Run::resume(&c, embedded_mnist().unwrap(), 1)
        .err()
        .expect("resumed without the key")
        .to_string();
    assert!(err.contains(fedra_sim::NOISE_KEY_FILE), "{err}");

    let (p_seeded, _, h_seeded) = run_to_end(private("seeded"), 1);
    assert!(p_seeded != p_ref, "the secret run drew the seeded noise");
    let eps = |h: &[RoundMetrics]| h.iter().map(|r| r.epsilon).collect::<Vec<_>>();
    assert_eq!(
        eps(&h_seeded),
        eps(&h_ref),
        "the accountant depends on the key"
    );
}

/// DP-FedAvg samples over every client of the partition, not over those connected: with client
/// 3 away, every other client is sampled in exactly the rounds it is sampled when all are there
/// (a sample among the present would raise their chance above q and void the accountant).
#[test]
fn private_sampling_treats_an_absent_client_as_a_dropout() {
    use fedra_fl::federation::{Executor, FitJob, SequentialExecutor};
    use fedra_fl::{FitResult, FlError};
    use std::cell::RefCell;

    struct Recording {
        away: Option<usize>,
        picked: RefCell<Vec<(usize, usize)>>,
    }
    impl Executor for Recording {
        fn fit(
            &self,
            jobs: Vec<FitJob<'_>>,
            data: &fedra_data::Dataset,
        ) -> Vec<Result<FitResult, FlError>> {
            for job in &jobs {
                assert_ne!(Some(job.client), self.away, "an absent client got a task");
                self.picked
                    .borrow_mut()
                    .push((job.config.round, job.client));
            }
            SequentialExecutor { threads: 1 }.fit(jobs, data)
        }
        fn available(&self, clients: usize) -> Result<Vec<usize>, FlError> {
            Ok((0..clients).filter(|&k| Some(k) != self.away).collect())
        }
    }
    let config = config(
        "[privacy]\nclip = 1.0\nnoise_multiplier = 0.5",
        "logreg",
        "iid",
        0.4,
        6,
    );
    let data = config.data.select(embedded_mnist().unwrap()).unwrap();
    let picks = |away: Option<usize>| {
        let executor = Recording {
            away,
            picked: RefCell::new(Vec::new()),
        };
        let mut fed = fedra_fl::Federation::new(config.clone(), &data, 1).unwrap();
        while !fed.finished() {
            fed.run_round(&data, &executor).unwrap();
        }
        executor.picked.into_inner()
    };
    let all = picks(None);
    let without: Vec<(usize, usize)> = all.iter().copied().filter(|&(_, k)| k != 3).collect();
    assert!(
        without.len() < all.len(),
        "client 3 was never sampled: {all:?}"
    );
    assert_eq!(picks(Some(3)), without);

    // Nobody there at all: the run stops with an error that says so, rather than releasing a
    // round of noise alone.
    struct Nobody;
    impl Executor for Nobody {
        fn fit(
            &self,
            _: Vec<FitJob<'_>>,
            _: &fedra_data::Dataset,
        ) -> Vec<Result<FitResult, FlError>> {
            panic!("a task was given with no client connected")
        }
        fn available(&self, _: usize) -> Result<Vec<usize>, FlError> {
            Ok(Vec::new())
        }
    }
    let mut fed = fedra_fl::Federation::new(config.clone(), &data, 1).unwrap();
    let err = fed.run_round(&data, &Nobody).unwrap_err();
    assert!(
        matches!(err, FlError::NoClientsAvailable { round: 1 }),
        "{err}"
    );
    assert!(err.to_string().contains("no client is connected"), "{err}");
    assert_eq!(fed.rounds_done, 0);
}
