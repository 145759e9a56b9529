//! Configuration parsing: the documented example parses, unknown keys and bad values are errors
//! that name the key.

use fedra_fl::ExperimentConfig;

const EXAMPLE: &str = r#"
[data]
dataset = "mnist"
[partition]
scheme = "classes:2"
clients = 10
[model]
name = "mnist-cnn"
bn = "train"
[train]
rounds = 500
local_epochs = 1
batch_size = 10
lr = 0.01
lr_decay = 0.995
fraction = 1.0
[strategy]
name = "fedavg"
[eval]
every = 1
sgd_twin = false
[run]
seed = 0
checkpoint_every = 10
"#;

fn error_of(text: &str) -> String {
    ExperimentConfig::from_toml_str(text, "test.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn documented_example_parses_and_round_trips() {
    let config = ExperimentConfig::from_toml_str(EXAMPLE, "example").unwrap();
    assert_eq!(config.train.rounds, 500);
    assert_eq!(config.partition.scheme, "classes:2");
    let again = ExperimentConfig::from_toml_str(&config.to_toml_string(), "again").unwrap();
    assert_eq!(config, again);
    assert!((config.lr_at(2) - 0.01 * 0.995f32 * 0.995).abs() < 1e-9);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let text = EXAMPLE.replace("lr_decay = 0.995", "lr_decay = 0.995\nlearning_rate = 0.1");
    let e = error_of(&text);
    assert!(e.contains("learning_rate"), "{e}");
    let text = EXAMPLE.replace("[run]", "[runn]");
    assert!(error_of(&text).contains("runn"));
}

#[test]
fn bad_values_are_rejected_naming_the_key() {
    for (from, to, key) in [
        ("lr = 0.01", "lr = -1.0", "train.lr"),
        ("lr = 0.01", "lr = nan", "train.lr"),
        ("rounds = 500", "rounds = 0", "train.rounds"),
        ("batch_size = 10", "batch_size = 0", "train.batch_size"),
        ("fraction = 1.0", "fraction = 1.5", "train.fraction"),
        ("lr_decay = 0.995", "lr_decay = 1.5", "train.lr_decay"),
        ("clients = 10", "clients = 0", "partition.clients"),
        (
            "scheme = \"classes:2\"",
            "scheme = \"klasses:2\"",
            "partition.scheme",
        ),
        (
            "name = \"fedavg\"",
            "name = \"fedsomething\"",
            "strategy.name",
        ),
        ("\nevery = 1", "\nevery = 0", "eval.every"),
        (
            "\nevery = 1",
            "\nevery = 5\nstop_when_converged = { window = 12, within = 0.2 }",
            "eval.stop_when_converged.window",
        ),
        (
            "\nevery = 1",
            "\nevery = 5\nstop_when_converged = { window = 20, within = -0.2 }",
            "eval.stop_when_converged.within",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"mnist\"\ntrain_examples = 0",
            "data.train_examples",
        ),
        (
            "bn = \"train\"",
            "bn = \"train\"\nfreeze = [\"conv[1\"]",
            "model.freeze",
        ),
        (
            "name = \"fedavg\"",
            "name = \"trimmed-mean\"\ntrim = 0.5",
            "strategy.trim",
        ),
        (
            "name = \"fedavg\"",
            "name = \"median\"\ntrim = 0.1",
            "`trim` does not apply",
        ),
        (
            "bn = \"train\"",
            "bn = \"train\"\nreset = [\"fc2.*\"]",
            "model.reset",
        ),
        (
            "bn = \"train\"",
            "bn = \"train\"\nweight_init = \"glorot\"\ninit = \"sgd.safetensors\"",
            "model.weight_init",
        ),
        (
            "bn = \"train\"",
            "bn = \"train\"\nweight_init = \"he\"",
            "weight_init",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"mnist\"\nimage_size = [28, 28]",
            "data.image_size",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"imagefolder\"\nchannels = 2",
            "data.channels",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"imagefolder\"\nclasses = [\"a\", \"a\"]",
            "data.classes",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"mnist\"\nclasses = [\"a\", \"b\"]",
            "data.classes",
        ),
        (
            "dataset = \"mnist\"",
            "dataset = \"imagefolder\"\nimage_size = [0, 28]",
            "data.image_size",
        ),
        ("name = \"fedavg\"", "name = \"krum\"", "strategy.byzantine"),
        (
            "name = \"fedavg\"",
            "name = \"krum\"\nbyzantine = 4",
            "a round samples 10 of the 10 clients",
        ),
        (
            "name = \"fedavg\"",
            "name = \"krum\"\nbyzantine = 9223372036854775807",
            "strategy.byzantine",
        ),
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[privacy]\nclip = 1.0\nnoise_multiplier = 0.0",
            "privacy.noise_multiplier",
        ),
        (
            "name = \"fedavg\"",
            "name = \"median\"\n[privacy]\nclip = 1.0\nnoise_multiplier = 1.0",
            "needs a strategy that aggregates the mean update",
        ),
        (
            "name = \"fedavg\"",
            "name = \"krum\"\nbyzantine = 2\nkeep = 9",
            "strategy.keep",
        ),
        (
            "name = \"fedavg\"",
            "name = \"median\"\nkeep = 2",
            "`keep` does not apply",
        ),
        (
            "name = \"fedavg\"",
            "name = \"fedadam\"\nclip_update_norm = 0.0",
            "strategy.clip_update_norm",
        ),
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[attack]\nclients = [3, 10]\nkind = \"scale\"",
            "client 10 does not exist",
        ),
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[attack]\nclients = [1]\nkind = \"label-flip\"\nfactor = 2",
            "attack.factor",
        ),
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[attack]\nclients = []\nkind = \"scale\"",
            "attack.clients",
        ),
        // "Never time out" as a huge number: refused, not a panic when the deadline is computed.
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[deploy]\nround_timeout_s = 1e20",
            "deploy.round_timeout_s",
        ),
        (
            "checkpoint_every = 10",
            "checkpoint_every = 10\n[deploy]\njoin_timeout_s = 4e7",
            "deploy.join_timeout_s",
        ),
    ] {
        let e = error_of(&EXAMPLE.replace(from, to));
        assert!(e.contains(key), "{to}: {e}");
        assert!(e.contains("test.toml"), "{e}");
    }
    // Krum counts the clients a round samples, not all of them.
    let e = error_of(
        &EXAMPLE
            .replace("fraction = 1.0", "fraction = 0.4")
            .replace("name = \"fedavg\"", "name = \"krum\"\nbyzantine = 1"),
    );
    assert!(e.contains("a round samples 4 of the 10 clients"), "{e}");
    // Wrong type: toml/serde names the field.
    let e = error_of(&EXAMPLE.replace("rounds = 500", "rounds = \"many\""));
    assert!(e.contains("rounds"), "{e}");
    // A strategy key that does not apply.
    let e = error_of(&EXAMPLE.replace("name = \"fedavg\"", "name = \"fedavg\"\nmu = 0.1"));
    assert!(e.contains("mu"), "{e}");
    // A bad BN policy.
    let e = error_of(&EXAMPLE.replace("bn = \"train\"", "bn = \"sometimes\""));
    assert!(e.contains("sometimes") || e.contains("bn"), "{e}");
}

#[test]
fn data_limits_cut_in_file_order_and_never_truncate_silently() {
    let text = EXAMPLE.replace(
        "dataset = \"mnist\"",
        "dataset = \"mnist\"\ntrain_examples = 500\ntest_examples = 200",
    );
    let config = ExperimentConfig::from_toml_str(&text, "test.toml").unwrap();
    let full = fedra_data::embedded_mnist().unwrap();
    let cut = config.data.select(full.clone()).unwrap();
    assert_eq!((cut.train.len(), cut.test.len()), (500, 200));
    assert_eq!(cut.train.labels[..], full.train.labels[..500]);
    assert_eq!(cut.test.example(199), full.test.example(199));

    let text = EXAMPLE.replace(
        "dataset = \"mnist\"",
        "dataset = \"mnist\"\ntrain_examples = 10001",
    );
    let config = ExperimentConfig::from_toml_str(&text, "test.toml").unwrap();
    let e = config.data.select(full.clone()).unwrap_err().to_string();
    assert!(
        e.contains("data.train_examples") && e.contains("10000"),
        "{e}"
    );

    // A file ordered by class (as the CIFAR-10 test batch is): the first 200 examples are the
    // zeros and ones, so the cut is refused, naming the key and the classes it would lose.
    let mut by_class: Vec<usize> = (0..full.test.len()).collect();
    by_class.sort_by_key(|&i| full.test.labels[i]);
    let ordered = fedra_data::TrainTest {
        train: full.train.clone(),
        test: full.test.subset(&by_class),
    };
    let text = EXAMPLE.replace(
        "dataset = \"mnist\"",
        "dataset = \"mnist\"\ntest_examples = 200",
    );
    let config = ExperimentConfig::from_toml_str(&text, "test.toml").unwrap();
    assert_eq!(config.data.select(full).unwrap().test.len(), 200);
    let e = config.data.select(ordered).unwrap_err().to_string();
    assert!(
        e.contains("data.test_examples")
            && e.contains("only 2 of its 10 classes")
            && e.contains("none of: 2, 3, 4, 5, 6, 7, 8, 9"),
        "{e}"
    );
}

#[test]
fn convergence_needs_the_whole_window_within_the_spread() {
    use fedra_fl::config::Convergence;
    let c = Convergence {
        window: 4,
        within: 0.5,
    };
    // Accuracies as fractions: 0.5 points is 0.005.
    let h = [
        (0, 0.10),
        (2, 0.90),
        (4, 0.903),
        (6, 0.906),
        (8, 0.907),
        (10, 0.908),
    ];
    // Round 4 looks back to round 0 (0.10): no. Round 6: 0.900..0.906 spans 0.6 points: no.
    // Round 8: 0.903..0.907, 0.4 points: yes.
    assert_eq!(c.met_at(&h[..3]), None);
    assert_eq!(c.met_at(&h[..4]), None);
    assert_eq!(c.met_at(&h[..5]), Some(8));
    assert_eq!(c.first_met(&h), Some(8));
    // A history shorter than the window: not converged, however flat.
    assert_eq!(c.met_at(&h[..1]), None);
    assert_eq!(c.met_at(&[(2, 0.5), (4, 0.5), (5, 0.5)]), None);
    // Evaluations that skip round r - window: the window starts at the first one after it.
    assert_eq!(c.met_at(&[(0, 0.1), (3, 0.5), (5, 0.5)]), Some(5));
    // The initial model is never in the window: a model that does not move converges one
    // evaluation later than round `window`.
    let flat = [(0, 0.1), (2, 0.1), (4, 0.1), (6, 0.1)];
    assert_eq!(c.met_at(&flat[..3]), None);
    assert_eq!(c.first_met(&flat), Some(6));
    // Less than `within` points apart, not equal.
    assert_eq!(c.met_at(&[(2, 0.900), (4, 0.904), (6, 0.903)]), Some(6));
    assert_eq!(c.met_at(&[(2, 0.900), (4, 0.905), (6, 0.904)]), None);
    let spread = c.spread_at(&[(0, 0.1), (3, 0.5), (5, 0.52)]).unwrap();
    assert!((spread - 0.02).abs() < 1e-12, "{spread}");
    // It parses from an experiment file and round-trips.
    let text = EXAMPLE.replace(
        "\nevery = 1",
        "\nevery = 2\nstop_when_converged = { window = 4, within = 0.5 }",
    );
    let config = ExperimentConfig::from_toml_str(&text, "test").unwrap();
    assert_eq!(config.eval.stop_when_converged, Some(c));
    let again = ExperimentConfig::from_toml_str(&config.to_toml_string(), "again").unwrap();
    assert_eq!(config, again);
}
