//! Aggregation facts: FedAvg is an exact sample-weighted mean, averaging identical weights is the
//! identity bit for bit, bad updates are rejected by name, and FedBN's scope leaves every
//! normalisation tensor out.

use fedra_fl::strategy::{FedAvg, from_config};
use fedra_fl::{AggregationScope, FitResult, FlError, Strategy, sample_clients, weighted_mean};
use fedra_nn::{BnPolicy, Model, ModelSpec, TensorKind};

fn result(client: usize, n: usize, params: Vec<f32>, buffers: Vec<f32>) -> FitResult {
    FitResult {
        client,
        num_examples: n,
        params,
        buffers,
        train_loss: 0.0,
        examples_seen: n,
    }
}

/// Client training settings (only FedNova reads them).
fn train() -> fedra_fl::config::TrainConfig {
    toml::from_str("rounds = 1\nbatch_size = 10\nlr = 0.1").unwrap()
}

fn cnn_bn() -> Model {
    let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
    Model::new(&spec, 7).unwrap()
}

#[test]
fn weighted_mean_is_exact_on_hand_made_tensors() {
    let results = vec![
        result(0, 1, vec![1.0, 2.0, -4.0], vec![]),
        result(1, 3, vec![3.0, 4.0, 0.0], vec![]),
    ];
    let mut out = vec![9.0; 3];
    weighted_mean(
        &results,
        |r| &r.params,
        std::slice::from_ref(&(0..3)),
        &mut out,
    );
    assert_eq!(out, vec![2.5, 3.5, -1.0]);
    // Only the given ranges are touched.
    let mut out = vec![9.0; 3];
    weighted_mean(
        &results,
        |r| &r.params,
        std::slice::from_ref(&(1..2)),
        &mut out,
    );
    assert_eq!(out, vec![9.0, 3.5, 9.0]);
}

#[test]
fn fedavg_of_identical_weights_is_the_identity() {
    let mut global = cnn_bn();
    let before = global.clone();
    // Client sizes that do not divide evenly, so a naive float mean would drift.
    let results: Vec<FitResult> = [7usize, 1, 13, 600]
        .iter()
        .enumerate()
        .map(|(i, &n)| result(i, n, before.params().to_vec(), before.buffers().to_vec()))
        .collect();
    let scope = AggregationScope::everything(&global);
    FedAvg.aggregate(0, &mut global, &results, &scope).unwrap();
    assert!(global.params() == before.params(), "parameters changed");
    assert!(global.buffers() == before.buffers(), "buffers changed");
}

#[test]
fn fedavg_weights_clients_by_sample_count() {
    let mut global = cnn_bn();
    let len = global.params().len();
    let blen = global.buffers().len();
    let results = vec![
        result(0, 100, vec![1.0; len], vec![2.0; blen]),
        result(1, 300, vec![5.0; len], vec![6.0; blen]),
    ];
    let scope = AggregationScope::new(&global, BnPolicy::Train, true);
    FedAvg.aggregate(3, &mut global, &results, &scope).unwrap();
    assert!(global.params().iter().all(|&w| w == 4.0));
    assert!(global.buffers().iter().all(|&w| w == 5.0));
}

#[test]
fn nan_update_is_rejected_naming_client_and_tensor() {
    let mut global = cnn_bn();
    let mut params = global.params().to_vec();
    let fc1 = global
        .tensors()
        .iter()
        .find(|t| t.name == "fc1.weight")
        .unwrap()
        .clone();
    params[fc1.offset + 5] = f32::NAN;
    let results = vec![
        result(0, 10, global.params().to_vec(), global.buffers().to_vec()),
        result(4, 10, params, global.buffers().to_vec()),
    ];
    let scope = AggregationScope::everything(&global);
    let before = global.params().to_vec();
    let err = FedAvg
        .aggregate(2, &mut global, &results, &scope)
        .unwrap_err();
    assert!(matches!(
        err,
        FlError::NonFiniteUpdate {
            client: 4,
            round: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("fc1.weight"), "{err}");
    assert!(
        global.params() == before.as_slice(),
        "a rejected round must not change the model"
    );
}

#[test]
fn wrong_length_update_is_rejected() {
    let mut global = cnn_bn();
    let results = vec![result(1, 10, vec![0.0; 3], global.buffers().to_vec())];
    let scope = AggregationScope::everything(&global);
    let err = FedAvg
        .aggregate(0, &mut global, &results, &scope)
        .unwrap_err();
    assert!(
        matches!(
            err,
            FlError::UpdateShape {
                client: 1,
                got: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn fedbn_scope_keeps_normalisation_local_and_train_scope_follows_average_buffers() {
    let model = cnn_bn();
    let covered = |ranges: &[std::ops::Range<usize>], offset: usize| {
        ranges.iter().any(|r| r.contains(&offset))
    };
    let local = AggregationScope::new(&model, BnPolicy::Local, true);
    let train = AggregationScope::new(&model, BnPolicy::Train, true);
    let train_no_buffers = AggregationScope::new(&model, BnPolicy::Train, false);
    let frozen = AggregationScope::new(&model, BnPolicy::Frozen, true);
    let mut saw_norm = false;
    for t in model.tensors() {
        match t.kind {
            TensorKind::Param => {
                assert_eq!(covered(&local.params, t.offset), !t.norm, "{}", t.name);
                assert!(covered(&train.params, t.offset), "{}", t.name);
                saw_norm |= t.norm;
            }
            TensorKind::Buffer => {
                assert!(!covered(&local.buffers, t.offset), "{}", t.name);
                assert!(covered(&train.buffers, t.offset), "{}", t.name);
                assert!(!covered(&train_no_buffers.buffers, t.offset), "{}", t.name);
                assert!(!covered(&frozen.buffers, t.offset), "{}", t.name);
            }
        }
    }
    assert!(saw_norm, "mnist-cnn-bn must have BatchNorm parameters");
}

#[test]
fn client_sampling_is_seeded_sorted_and_never_empty() {
    let a = sample_clients(3, 1000, 0.01, 42);
    assert_eq!(a.len(), 10);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(a, sample_clients(3, 1000, 0.01, 42));
    assert_ne!(a, sample_clients(4, 1000, 0.01, 42));
    assert_ne!(a, sample_clients(3, 1000, 0.01, 43));
    assert_eq!(sample_clients(0, 10, 0.001, 0).len(), 1);
    assert_eq!(sample_clients(0, 10, 1.0, 0), (0..10).collect::<Vec<_>>());
}

#[test]
fn fedavgm_with_zero_momentum_and_unit_lr_equals_fedavg() {
    let base = cnn_bn();
    let len = base.params().len();
    let results = vec![
        result(
            0,
            2,
            base.params().iter().map(|w| w + 0.5).collect(),
            base.buffers().to_vec(),
        ),
        result(
            1,
            2,
            base.params().iter().map(|w| w - 0.25).collect(),
            base.buffers().to_vec(),
        ),
    ];
    let scope = AggregationScope::new(&base, BnPolicy::Train, true);
    let mut avg = base.clone();
    FedAvg.aggregate(0, &mut avg, &results, &scope).unwrap();
    let config = fedra_fl::config::StrategyConfig {
        name: "fedavgm".into(),
        server_lr: Some(1.0),
        server_momentum: Some(0.0),
        ..Default::default()
    };
    let mut m = from_config(&config, &train(), 10).unwrap();
    let mut with_m = base.clone();
    m.aggregate(0, &mut with_m, &results, &scope).unwrap();
    let max_diff = (0..len)
        .map(|i| (avg.params()[i] - with_m.params()[i]).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-6, "max diff {max_diff}");
    // And its state round-trips for checkpoints.
    let state = m.state();
    assert_eq!(state[0].1.len(), len);
    let mut fresh = from_config(&config, &train(), 10).unwrap();
    fresh.restore(state.clone(), &scope).unwrap();
    assert_eq!(fresh.state(), state);
    // State sized for another model, or missing, is rejected by name, never reset to zeros.
    let mut short = state.clone();
    short[0].1.pop();
    let e = fresh.restore(short, &scope).unwrap_err().to_string();
    assert!(e.contains("`velocity`") && e.contains("fedavgm"), "{e}");
    let e = fresh.restore(Vec::new(), &scope).unwrap_err().to_string();
    assert!(e.contains("`velocity`") && e.contains("missing"), "{e}");
}

/// A model of six parameters (logreg on 2 inputs, 2 classes) with every weight zero.
fn tiny() -> Model {
    let spec = ModelSpec::by_name("logreg", [1, 1, 2], 2).unwrap();
    let mut m = Model::new(&spec, 1).unwrap();
    m.params_mut().fill(0.0);
    m
}

#[test]
fn adaptive_server_optimisers_follow_reddi_et_al_algorithm_2() {
    // Three rounds whose mean update is d = 0.5, 0.1, 0.01 in every coordinate (two clients at
    // w + d - 0.1 and w + d + 0.1). The paper's rules, in f64:
    //   m = b1 m + (1 - b1) d;  step = lr m / (sqrt(v) + tau), with
    //   Adam v = b2 v + (1 - b2) d^2;  Yogi v = v - (1 - b2) d^2 sign(v - d^2);  Adagrad v = v + d^2.
    // Round 3 is where Yogi and Adam part: v (0.0026) > d^2 (1e-4), so Yogi's v shrinks.
    let (lr, b1, b2, tau) = (0.1f64, 0.9f64, 0.99f64, 0.001f64);
    for name in ["fedadam", "fedyogi", "fedadagrad"] {
        let config = fedra_fl::config::StrategyConfig {
            name: name.into(),
            server_lr: Some(lr as f32),
            beta1: Some(b1 as f32),
            beta2: Some(b2 as f32),
            tau: Some(tau as f32),
            ..Default::default()
        };
        let mut strategy = from_config(&config, &train(), 10).unwrap();
        assert_eq!(strategy.name(), name);
        let mut global = tiny();
        let scope = AggregationScope::everything(&global);
        let (mut m, mut v, mut w) = (0f64, 0f64, 0f64);
        for (round, d) in [0.5f64, 0.1, 0.01].into_iter().enumerate() {
            let at = |shift: f64| vec![(w + d + shift) as f32; 6];
            let results = vec![
                result(0, 1, at(-0.1), vec![]),
                result(1, 1, at(0.1), vec![]),
            ];
            strategy
                .aggregate(round, &mut global, &results, &scope)
                .unwrap();
            m = b1 * m + (1.0 - b1) * d;
            let d2 = d * d;
            v = match name {
                "fedadam" => b2 * v + (1.0 - b2) * d2,
                "fedyogi" => v - (1.0 - b2) * d2 * (v - d2).signum(),
                _ => v + d2,
            };
            w += lr * m / (v.sqrt() + tau);
            for &got in global.params() {
                assert!(
                    (f64::from(got) - w).abs() <= 1e-5 * w.abs().max(1e-3),
                    "{name} round {round}: {got} vs {w}"
                );
            }
        }
    }
}

#[test]
fn median_and_trimmed_mean_by_hand_ignore_outliers_and_example_counts() {
    use fedra_fl::strategy::CoordinateWise;
    let median = CoordinateWise { trim: None };
    let trimmed = CoordinateWise { trim: Some(0.2) };
    assert_eq!(median.combine(&mut [1.0, 2.0, 3.0, 100.0, -50.0]), 2.0);
    assert_eq!(median.combine(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    // K = 5, trim 0.2: one value dropped at each end.
    assert_eq!(trimmed.combine(&mut [1.0, 2.0, 3.0, 4.0, 1000.0]), 3.0);
    assert_eq!(trimmed.combine(&mut [-1e9, 2.0, 3.0, 4.0, 1e9]), 3.0);
    // K = 4, trim 0.2: floor(0.8) = 0 dropped, the plain mean.
    assert_eq!(trimmed.combine(&mut [1.0, 2.0, 3.0, 10.0]), 4.0);
    // Trim never empties the set: K = 2 with trim 0.4 keeps both.
    let wide = CoordinateWise { trim: Some(0.4) };
    assert_eq!(wide.combine(&mut [1.0, 3.0]), 2.0);

    // Through `aggregate`: five clients, one sending huge values and claiming many examples.
    for (name, want) in [("median", 2.0f32), ("trimmed-mean", 2.0)] {
        let config = fedra_fl::config::StrategyConfig {
            name: name.into(),
            trim: (name == "trimmed-mean").then_some(0.2),
            ..Default::default()
        };
        let mut strategy = from_config(&config, &train(), 10).unwrap();
        let mut global = tiny();
        let scope = AggregationScope::everything(&global);
        let results: Vec<FitResult> = [1.0f32, 2.0, 3.0, 1e6, 1.5]
            .iter()
            .enumerate()
            .map(|(k, &x)| result(k, if k == 3 { 1_000_000 } else { 10 }, vec![x; 6], vec![]))
            .collect();
        strategy
            .aggregate(1, &mut global, &results, &scope)
            .unwrap();
        // median of {1, 1.5, 2, 3, 1e6} = 2; trimmed: mean of {1.5, 2, 3} = 2.1666..
        let want = if name == "median" { want } else { 6.5 / 3.0 };
        assert!(
            global.params().iter().all(|&p| (p - want).abs() < 1e-6),
            "{name}: {:?}",
            global.params()
        );
    }
}

/// fedra's RDP accountant gives Google's `dp_accounting` epsilons (and optimal orders) for the
/// Poisson-subsampled Gaussian mechanism: 128 settings of sampling rate, noise, rounds and
/// delta (`fixtures/rdp_accountant.json`, made by `fixtures/make_rdp_fixture.py`).
#[test]
fn the_accountant_agrees_with_dp_accounting() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/rdp_accountant.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 128);
    for c in cases {
        let (q, z) = (
            c["q"].as_f64().unwrap(),
            c["noise_multiplier"].as_f64().unwrap(),
        );
        let rounds = c["rounds"].as_u64().unwrap() as usize;
        let delta = c["delta"].as_f64().unwrap();
        let expected = c["epsilon"].as_f64().unwrap();
        let (eps, order) = fedra_fl::privacy::epsilon(q, z, rounds, delta);
        assert!(
            (eps - expected).abs() <= 1e-9 * expected.max(1.0),
            "{c}: fedra {eps}"
        );
        assert_eq!(u64::from(order), c["order"].as_u64().unwrap(), "{c}");
    }
}

/// DP-FedAvg's mean by hand: updates clipped to the norm, summed, divided by the expected
/// number of clients; the noise has standard deviation noise_multiplier x clip / expected.
#[test]
fn the_private_mean_clips_sums_and_adds_the_stated_noise() {
    use fedra_fl::privacy::{NoiseKey, PrivacyConfig, Randomness, private_mean};
    let nine = Randomness::Seeded(9);
    let spec = ModelSpec::by_name("logreg", [1, 28, 28], 10).unwrap();
    let global = Model::new(&spec, 1).unwrap();
    let g = global.params().to_vec();
    let n = g.len();
    // Client 0 moves the first two weights by (3, 4): norm 5, clipped to 1 -> (0.6, 0.8).
    // Client 1 moves them by (0.3, 0.4): norm 0.5, kept. Sum (0.9, 1.2); expected 2 clients.
    let mut a = g.clone();
    a[0] += 3.0;
    a[1] += 4.0;
    let mut b = g.clone();
    b[0] += 0.3;
    b[1] += 0.4;
    let results = vec![result(0, 50, a, vec![]), result(1, 7, b, vec![])];
    let scope = AggregationScope::everything(&global);
    let quiet = PrivacyConfig {
        clip: 1.0,
        noise_multiplier: 0.0,
        delta: 1e-5,
        noise: None,
    };
    let (mean, clipped) = private_mean(&global, &results, &scope, &quiet, 2.0, 0, &nine);
    assert_eq!(clipped, 1);
    assert!((mean.params[0] - (g[0] + 0.45)).abs() < 1e-6);
    assert!((mean.params[1] - (g[1] + 0.6)).abs() < 1e-6);
    assert!(mean.params[2..] == g[2..]);
    // With noise: over the 7,850 weights the noise's standard deviation is 2 x 1 / 2 = 1.
    let noisy = PrivacyConfig {
        noise_multiplier: 2.0,
        ..quiet
    };
    let (mean, _) = private_mean(&global, &results, &scope, &noisy, 2.0, 0, &nine);
    let secret = Randomness::Secret(NoiseKey::generate());
    let (keyed, _) = private_mean(&global, &results, &scope, &noisy, 2.0, 0, &secret);
    assert!(keyed.params != mean.params, "the key changed nothing");
    for (what, params) in [("seeded", &mean.params), ("secret", &keyed.params)] {
        let noise: Vec<f64> = (2..n)
            .map(|i| f64::from(params[i]) - f64::from(g[i]))
            .collect();
        let m = noise.iter().sum::<f64>() / noise.len() as f64;
        let sd = (noise.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / noise.len() as f64).sqrt();
        assert!(
            m.abs() < 0.05 && (sd - 1.0).abs() < 0.05,
            "{what}: mean {m}, sd {sd}"
        );
    }
    // Seeded by (run seed, round): the same round gives the same noise, another round not.
    let again = private_mean(&global, &results, &scope, &noisy, 2.0, 0, &nine).0;
    assert!(again.params == mean.params);
    assert!(
        private_mean(&global, &results, &scope, &noisy, 2.0, 1, &nine)
            .0
            .params
            != mean.params
    );
}

/// SCAFFOLD's control variates on hand-made numbers: one client of four takes K = 2 local steps
/// (10 examples, batch 5) at lr 0.1 from x to x - 0.5, so its control becomes
/// (x - y) / (K lr) = 2.5 and the server's (1/4) * 2.5 = 0.625; it then trains with c - c_i =
/// -1.875 added to its gradients, and a client never sampled with c = 0.625. The first
/// aggregate is FedAvg's mean, bit for bit.
#[test]
fn scaffold_controls_follow_the_paper_and_start_as_fedavg() {
    let train: fedra_fl::config::TrainConfig =
        toml::from_str("rounds = 2\nbatch_size = 5\nlr = 0.1").unwrap();
    let config: fedra_fl::config::StrategyConfig = toml::from_str("name = \"scaffold\"").unwrap();
    let mut strategy = from_config(&config, &train, 4).unwrap();
    assert!(
        strategy.control(1).is_none(),
        "every control starts at zero"
    );
    let global = cnn_bn();
    let scope = AggregationScope::new(&global, BnPolicy::Train, true);
    let y: Vec<f32> = global.params().iter().map(|w| w - 0.5).collect();
    let results = vec![result(1, 10, y, global.buffers().to_vec())];
    let mut scaffold = global.clone();
    strategy
        .aggregate(0, &mut scaffold, &results, &scope)
        .unwrap();
    let mut fedavg = global.clone();
    FedAvg.aggregate(0, &mut fedavg, &results, &scope).unwrap();
    assert_eq!(scaffold.params(), fedavg.params());
    let correction_of = |k: usize| match strategy.control(k) {
        Some(fedra_fl::Steering::Correction(c)) => c,
        other => panic!("client {k}: {other:?}"),
    };
    let (own, other) = (correction_of(1), correction_of(2));
    assert_eq!(own.len(), global.params().len());
    for (i, (&o, &n)) in own.iter().zip(other.iter()).enumerate() {
        // (x - y) / (K lr) in f64 from f32 weights: 2.5 to within the weights' rounding.
        assert!((n - 0.625).abs() < 1e-4, "c[{i}] = {n}");
        assert!((o + 1.875).abs() < 1e-4, "c - c_1 at {i} = {o}");
    }
    // Its state names the server's control and client 1's, and restores exactly.
    let state = strategy.state();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["scaffold.c", "scaffold.c.1"]);
    let mut fresh = from_config(&config, &train, 4).unwrap();
    fresh.restore(state, &scope).unwrap();
    assert_eq!(fresh.control(1), strategy.control(1));
    let mut bad = from_config(&config, &train, 4).unwrap();
    let err = bad
        .restore(vec![("scaffold.c".into(), vec![0.0; 3])], &scope)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 values"), "{err}");

    // The clients keeping their own controls (over a network): the server sends c and the round
    // of each client's last aggregated result, keeps no c_i, and a client's own step gives the
    // c_i the in-process server keeps, bit for bit.
    let mut remote = from_config(&config, &train, 4).unwrap();
    remote.keep_controls_on_clients(true).unwrap();
    let mut twin = global.clone();
    remote.aggregate(0, &mut twin, &results, &scope).unwrap();
    assert_eq!(twin.params(), scaffold.params());
    let c = match remote.control(1) {
        Some(fedra_fl::Steering::ServerControl { c, since }) => {
            assert_eq!(since, Some(0));
            c
        }
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        remote.control(2),
        Some(fedra_fl::Steering::ServerControl { since: None, .. })
    ));
    let state = remote.state();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["scaffold.c", "scaffold.aggregated_in.1"]);
    // Each kind of checkpoint continues only the way it was made, refused before any training.
    let mut in_process = from_config(&config, &train, 4).unwrap();
    in_process.restore(state.clone(), &scope).unwrap();
    let err = in_process
        .keep_controls_on_clients(false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fedra serve --resume"), "{err}");
    let mut over_network = from_config(&config, &train, 4).unwrap();
    over_network.restore(strategy.state(), &scope).unwrap();
    let err = over_network
        .keep_controls_on_clients(true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fedra run --resume"), "{err}");
    let mut fresh = from_config(&config, &train, 4).unwrap();
    fresh.keep_controls_on_clients(true).unwrap();
    fresh.restore(state, &scope).unwrap();
    assert_eq!(fresh.control(1), remote.control(1));
    let client = fedra_fl::strategy::Scaffold::new(&config, &train, 4);
    let mut c_1 = Vec::new();
    client
        .client_step(
            0,
            &vec![0.0; c.len()],
            global.params(),
            &results[0],
            &scope.params,
            &mut c_1,
        )
        .unwrap();
    let formed = fedra_fl::strategy::correction(&c, Some(&c_1));
    assert!(
        formed == *own,
        "the client's c - c_i differs from the server's"
    );
    let err = fresh
        .restore(
            vec![
                ("scaffold.c".into(), vec![0.0; global.params().len()]),
                ("scaffold.aggregated_in.1".into(), vec![0.5]),
            ],
            &scope,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a round number"), "{err}");
}
