//! Local training edge cases: a last mini-batch of one example under BatchNorm1d in train mode
//! (undefined batch variance; PyTorch raises) is dropped, and only then.

use fedra_data::Dataset;
use fedra_fl::{FitConfig, fit};
use fedra_nn::{BnPolicy, Model, ModelSpec, SgdConfig, Trainer};

/// Flatten -> Linear -> BatchNorm (1d) -> ReLU -> Linear, or the same without the BatchNorm.
fn mlp(batchnorm: bool) -> ModelSpec {
    let bn = if batchnorm {
        "[[layers]]\ntype = \"batchnorm\"\nname = \"bn1\"\n"
    } else {
        ""
    };
    let text = format!(
        "name = \"mlp-bn1d\"\ninput = [1, 4, 4]\nclasses = 3\n\
         [[layers]]\ntype = \"flatten\"\n\
         [[layers]]\ntype = \"linear\"\nname = \"fc1\"\nout_features = 8\n\
         {bn}\
         [[layers]]\ntype = \"relu\"\n\
         [[layers]]\ntype = \"linear\"\nname = \"fc2\"\nout_features = 3\n"
    );
    ModelSpec::from_toml_str(&text).unwrap()
}

fn data(n: usize) -> Dataset {
    Dataset {
        name: "synthetic".into(),
        shape: [1, 4, 4],
        features: (0..n * 16)
            .map(|i| ((i * 37 % 101) as f32) / 101.0)
            .collect(),
        labels: (0..n).map(|i| (i % 3) as u16).collect(),
        class_names: vec!["a".into(), "b".into(), "c".into()],
    }
}

fn fit_config(bn: BnPolicy, batch_size: usize) -> FitConfig {
    FitConfig {
        round: 0,
        run_seed: 1,
        local_epochs: 2,
        batch_size,
        sgd: SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        bn,
        prox_mu: None,
        control: None,
        frozen: Vec::new(),
        frozen_statistics: Vec::new(),
        flip_labels: false,
    }
}

fn train(spec: &ModelSpec, n: usize, config: &FitConfig) -> Result<fedra_fl::FitResult, String> {
    let data = data(n);
    let indices: Vec<usize> = (0..n).collect();
    let mut model = Model::new(spec, 5).unwrap();
    let mut trainer = Trainer::new(spec, config.batch_size.min(n)).unwrap();
    fit(0, &indices, &data, &mut model, config, &mut trainer).map_err(|e| e.to_string())
}

#[test]
fn a_last_batch_of_one_is_dropped_under_batchnorm1d_in_train_mode() {
    // 21 examples in batches of 10: 10, 10, 1.
    let spec = mlp(true);
    for bn in [BnPolicy::Train, BnPolicy::Local] {
        let r = train(&spec, 21, &fit_config(bn, 10)).unwrap_or_else(|e| panic!("{bn:?}: {e}"));
        assert_eq!(
            r.examples_seen,
            2 * 20,
            "{bn:?}: the single example is skipped"
        );
        assert_eq!(r.num_examples, 21, "{bn:?}: the client still holds 21");
        assert!(r.train_loss.is_finite() && r.train_loss > 0.0, "{bn:?}");
        assert!(r.params.iter().chain(&r.buffers).all(|v| v.is_finite()));
    }
    // Frozen statistics, or no BatchNorm at all: a batch of one is well-defined and trained.
    let r = train(&spec, 21, &fit_config(BnPolicy::Frozen, 10)).unwrap();
    assert_eq!(r.examples_seen, 2 * 21);
    let r = train(&mlp(false), 21, &fit_config(BnPolicy::Train, 10)).unwrap();
    assert_eq!(r.examples_seen, 2 * 21);
    // Batches that are all larger than one are untouched.
    let r = train(&spec, 22, &fit_config(BnPolicy::Train, 10)).unwrap();
    assert_eq!(r.examples_seen, 2 * 22);
}

#[test]
fn nothing_left_to_train_is_a_clear_error() {
    let spec = mlp(true);
    // One example, or batches of one: every batch would be dropped.
    for (n, batch) in [(1, 10), (5, 1)] {
        let e = train(&spec, n, &fit_config(BnPolicy::Train, batch)).unwrap_err();
        assert!(
            e.contains("client 0") && e.contains("BatchNorm") && e.contains("batch"),
            "{n} examples, batch {batch}: {e}"
        );
    }
}

/// A label-flipping attacker trains exactly as an honest client would on labels turned around
/// (class c as classes - 1 - c).
#[test]
fn a_label_flipper_trains_on_turned_around_labels() {
    let spec = mlp(false);
    let mut config = fit_config(BnPolicy::Train, 4);
    config.flip_labels = true;
    let flipped = train(&spec, 12, &config).unwrap();

    let mut turned = data(12);
    turned.labels.iter_mut().for_each(|y| *y = 2 - *y);
    let indices: Vec<usize> = (0..12).collect();
    let mut model = Model::new(&spec, 5).unwrap();
    let mut trainer = Trainer::new(&spec, 4).unwrap();
    let honest = fit(
        0,
        &indices,
        &turned,
        &mut model,
        &fit_config(BnPolicy::Train, 4),
        &mut trainer,
    )
    .unwrap();
    assert!(flipped.params == honest.params);
    let plain = train(&spec, 12, &fit_config(BnPolicy::Train, 4)).unwrap();
    assert!(plain.params != honest.params);
}
