//! The reference study's numbers (Zhao et al. 2018, as summarised in `shared/docs/PAPER.md`), so
//! a report can print each measured figure beside the one it reproduces.

/// The study's set-up per dataset (PAPER.md, "Federated setup" and "Models"): fedra's name for
/// its model, the initial learning rate and its decay per round. Clients and the SGD baseline
/// train with plain SGD: no momentum, no weight decay.
pub const SETUP: &[(&str, &str, f32, f32)] = &[
    ("mnist", "mnist-cnn", 0.01, 0.995),
    ("cifar10", "cifar-cnn", 0.1, 0.992),
    ("speech-commands", "kws-cnn", 0.05, 0.992),
];

/// The study's (model, lr, lr decay) for a dataset.
pub fn setup(dataset: &str) -> Option<(&'static str, f32, f32)> {
    SETUP
        .iter()
        .find(|row| row.0 == dataset)
        .map(|row| (row.1, row.2, row.3))
}

/// Test accuracy (%) of Table 1/3, by dataset, training kind, batch ("small"/"large") and E.
/// Kinds: `sgd`, `iid`, `classes:2`, `classes:1`, `pretrained` (pre-trained, then 1-class).
pub const TABLE1: &[(&str, &str, &str, usize, f64)] = &[
    ("mnist", "sgd", "large", 1, 98.69),
    ("mnist", "iid", "large", 1, 98.69),
    ("mnist", "classes:2", "large", 1, 96.29),
    ("mnist", "classes:1", "large", 1, 92.17),
    ("mnist", "classes:1", "large", 5, 91.92),
    ("mnist", "pretrained", "large", 1, 96.19),
    ("mnist", "sgd", "small", 1, 99.01),
    ("mnist", "iid", "small", 1, 99.12),
    ("mnist", "classes:2", "small", 1, 97.24),
    ("mnist", "classes:1", "small", 1, 87.70),
    ("cifar10", "sgd", "large", 1, 81.51),
    ("cifar10", "iid", "large", 1, 80.83),
    ("cifar10", "classes:2", "large", 1, 67.00),
    ("cifar10", "classes:1", "large", 1, 43.85),
    ("cifar10", "classes:1", "large", 5, 44.40),
    ("cifar10", "pretrained", "large", 1, 61.72),
    ("cifar10", "sgd", "small", 1, 84.14),
    ("cifar10", "iid", "small", 1, 82.62),
    ("cifar10", "classes:2", "small", 1, 68.53),
    ("cifar10", "classes:1", "small", 1, 32.83),
    ("speech-commands", "sgd", "large", 1, 84.46),
    ("speech-commands", "iid", "large", 1, 84.82),
    ("speech-commands", "classes:2", "large", 1, 72.30),
    ("speech-commands", "classes:1", "large", 1, 40.82),
    ("speech-commands", "classes:1", "large", 5, 40.84),
    ("speech-commands", "pretrained", "large", 1, 63.58),
    ("speech-commands", "sgd", "small", 1, 86.28),
    ("speech-commands", "iid", "small", 1, 86.64),
    ("speech-commands", "classes:2", "small", 1, 71.21),
    ("speech-commands", "classes:1", "small", 1, 31.78),
];

/// The "large" batch of each dataset (the "small" one is 10 everywhere).
pub fn large_batch(dataset: &str) -> usize {
    if dataset == "speech-commands" {
        50
    } else {
        100
    }
}

/// Table 1 accuracy (%) for a run, if the study has one.
pub fn table1(dataset: &str, kind: &str, batch: usize, epochs: usize) -> Option<f64> {
    let size = if batch == 10 {
        "small"
    } else if batch == large_batch(dataset) {
        "large"
    } else {
        return None;
    };
    TABLE1
        .iter()
        .find(|(d, k, b, e, _)| *d == dataset && *k == kind && *b == size && *e == epochs)
        .map(|row| row.4)
}

/// Table 2, the EMD sweep: target EMD and mean test accuracy (fraction) per dataset.
pub const EMD_TARGETS: [f64; 8] = [0.0, 0.36, 0.72, 1.08, 1.44, 1.62, 1.764, 1.8];
pub const EMD_ACCURACY: &[(&str, [f64; 8])] = &[
    (
        "mnist",
        [0.9857, 0.9860, 0.9852, 0.9835, 0.9799, 0.9756, 0.962, 0.922],
    ),
    (
        "cifar10",
        [
            0.8099, 0.8090, 0.8017, 0.7817, 0.7379, 0.6905, 0.5438, 0.4396,
        ],
    ),
    (
        "speech-commands",
        [
            0.8496, 0.8461, 0.8413, 0.8331, 0.7979, 0.7565, 0.5827, 0.4475,
        ],
    ),
];

/// Table 2 accuracy (fraction) for an EMD target, if the study has one.
pub fn emd_sweep(dataset: &str, target: f64) -> Option<f64> {
    let row = EMD_ACCURACY.iter().find(|(d, _)| *d == dataset)?;
    EMD_TARGETS
        .iter()
        .position(|t| (t - target).abs() < 1e-9)
        .map(|i| row.1[i])
}

/// Figure 7 (CIFAR-10, 1-class non-IID, B = 100, E = 1, 300 rounds): accuracy (%) for the
/// points the study states in its text.
pub const SHARING: &[(&str, f64, f64, f64)] = &[
    // (what, beta, alpha, accuracy %)
    ("no sharing", 0.0, 0.0, 44.0),
    ("beta sweep", 0.10, 1.0, 74.12),
    ("beta sweep", 0.25, 1.0, 78.72),
    ("alpha sweep, warm-up, best", 0.20, f64::NAN, 77.08),
    ("alpha sweep, warm-up, best", 0.10, f64::NAN, 73.12),
];
