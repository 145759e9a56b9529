//! Partitioners and label statistics on the real MNIST and CIFAR-10 training labels (read from
//! `$FEDRA_TEST_DATA`), plus the error cases of scheme strings and arguments.

use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use fedra_data::partition::{Partition, PartitionError, QuantityDist, Scheme, partition};
use fedra_data::stats::{class_counts, distribution, emd, partition_stats};

fn data_root() -> PathBuf {
    let dir = std::env::var_os("FEDRA_TEST_DATA").expect(
        "FEDRA_TEST_DATA is not set: point it at the shared datasets folder (e.g. FEDRA_TEST_DATA=../shared/datasets from the repo root)",
    );
    let dir = PathBuf::from(dir);
    // Relative paths are relative to the workspace root (cargo runs tests in the crate folder).
    if dir.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(dir)
    } else {
        dir
    }
}

fn gunzip(path: PathBuf) -> Vec<u8> {
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

/// The 60,000 MNIST training labels, read straight from the IDX file.
fn mnist() -> &'static [u16] {
    static LABELS: OnceLock<Vec<u16>> = OnceLock::new();
    LABELS.get_or_init(|| {
        let bytes = gunzip(data_root().join("mnist/train-labels-idx1-ubyte.gz"));
        assert_eq!(&bytes[..4], &[0, 0, 8, 1], "IDX label magic");
        let n = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 8 + n);
        bytes[8..].iter().map(|&b| b as u16).collect()
    })
}

/// The 50,000 CIFAR-10 training labels, read straight from the five binary batches.
fn cifar() -> &'static [u16] {
    static LABELS: OnceLock<Vec<u16>> = OnceLock::new();
    LABELS.get_or_init(|| {
        let mut labels = Vec::new();
        for b in 1..=5 {
            let bytes =
                gunzip(data_root().join(format!("cifar-10-batches-bin/data_batch_{b}.bin.gz")));
            assert_eq!(bytes.len() % 3073, 0);
            labels.extend(bytes.chunks(3073).map(|r| r[0] as u16));
        }
        labels
    })
}

fn scheme(s: &str) -> Scheme {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn split(labels: &[u16], clients: usize, s: &str, seed: u64) -> Partition {
    partition(labels, 10, clients, &scheme(s), seed).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// How often each example occurs over all clients.
fn multiplicity(p: &Partition, n: usize) -> Vec<usize> {
    let mut seen = vec![0usize; n];
    for c in &p.clients {
        for &i in c {
            seen[i] += 1;
        }
    }
    seen
}

fn assert_exactly_once(p: &Partition, n: usize) {
    let m = multiplicity(p, n);
    assert!(
        m.iter().all(|&x| x == 1),
        "{}: some example is missing or repeated",
        p.scheme
    );
}

fn assert_at_most_once(p: &Partition, n: usize) {
    let m = multiplicity(p, n);
    assert!(
        m.iter().all(|&x| x <= 1),
        "{}: some example is repeated",
        p.scheme
    );
}

fn labels_held(labels: &[u16], indices: &[usize]) -> usize {
    class_counts(labels, indices, 10)
        .iter()
        .filter(|&&c| c > 0)
        .count()
}

#[test]
fn mnist_and_cifar_labels_are_the_documented_ones() {
    let m = mnist();
    assert_eq!(
        class_counts(m, &(0..m.len()).collect::<Vec<_>>(), 10),
        vec![5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    let c = cifar();
    assert_eq!(
        class_counts(c, &(0..c.len()).collect::<Vec<_>>(), 10),
        vec![5000; 10]
    );
}

#[test]
fn iid_uses_every_example_once_and_is_near_the_population() {
    for (labels, name) in [(mnist(), "mnist"), (cifar(), "cifar")] {
        for clients in [10, 7, 100] {
            let p = split(labels, clients, "iid", 3);
            assert_exactly_once(&p, labels.len());
            let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
            let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "{name} {clients}: sizes {sizes:?}");
            // The remainder goes to the first clients.
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
            let s = partition_stats(labels, &p);
            let bound = if clients == 100 { 0.15 } else { 0.05 };
            assert!(
                s.mean_emd < bound,
                "{name} {clients}: iid mean EMD {}",
                s.mean_emd
            );
        }
    }
}

#[test]
fn classes_1_gives_one_class_per_client() {
    // CIFAR-10 is balanced: every shard is one whole class, every client EMD is exactly 1.8.
    let c = cifar();
    let p = split(c, 10, "classes:1", 0);
    assert_exactly_once(&p, c.len());
    let s = partition_stats(c, &p);
    for client in &s.clients {
        assert_eq!(client.class_counts.iter().filter(|&&x| x > 0).count(), 1);
        assert!(
            (client.emd - 1.8).abs() < 1e-9,
            "client {}: {}",
            client.id,
            client.emd
        );
    }
    // MNIST's classes are unequal (5421..6742): each client holds one whole class c, so its EMD
    // against MNIST's distribution is 2 (1 - p_c), from 1.7753 (class 1) to 1.8193 (class 5),
    // and the size-weighted mean is 2 (1 - sum_c p_c^2) = 1.799424.
    let m = mnist();
    let p = split(m, 10, "classes:1", 0);
    assert_exactly_once(&p, m.len());
    let s = partition_stats(m, &p);
    let mut held: Vec<usize> = Vec::new();
    for c in &s.clients {
        let classes: Vec<usize> = (0..10).filter(|&k| c.class_counts[k] > 0).collect();
        assert_eq!(classes.len(), 1, "client {}: {:?}", c.id, c.class_counts);
        let share = c.size as f64 / m.len() as f64;
        assert!((c.emd - 2.0 * (1.0 - share)).abs() < 1e-12);
        assert!(
            c.emd > 1.7752 && c.emd < 1.8194,
            "client {}: EMD {}",
            c.id,
            c.emd
        );
        held.push(classes[0]);
    }
    held.sort();
    assert_eq!(held, (0..10).collect::<Vec<_>>());
    assert!((s.mean_emd - 1.799424).abs() < 1e-6, "mean {}", s.mean_emd);
    assert!(
        (s.min_emd - 1.77527).abs() < 1e-5 && (s.max_emd - 1.81930).abs() < 1e-5,
        "{} {}",
        s.min_emd,
        s.max_emd
    );
}

#[test]
fn classes_2_gives_two_different_classes_per_client() {
    let c = cifar();
    for seed in 0..5 {
        let p = split(c, 10, "classes:2", seed);
        assert_exactly_once(&p, c.len());
        let s = partition_stats(c, &p);
        for client in &s.clients {
            let held: Vec<usize> = client
                .class_counts
                .iter()
                .copied()
                .filter(|&x| x > 0)
                .collect();
            assert_eq!(held, vec![2500, 2500], "seed {seed} client {}", client.id);
            assert!((client.emd - 1.6).abs() < 1e-9);
        }
    }
    // MNIST: every class is cut into two pure shards, so every client holds exactly two labels.
    let m = mnist();
    for seed in 0..5 {
        let p = split(m, 10, "classes:2", seed);
        assert_exactly_once(&p, m.len());
        for (j, idx) in p.clients.iter().enumerate() {
            assert_eq!(labels_held(m, idx), 2, "seed {seed} client {j}");
            assert!(
                (5421..=6742).contains(&idx.len()),
                "seed {seed} client {j}: {}",
                idx.len()
            );
        }
        let s = partition_stats(m, &p);
        // Half of class a plus half of class b: 1.6 for equal classes, 1.55..1.65 for MNIST's.
        assert!(
            s.clients.iter().all(|c| (c.emd - 1.6).abs() < 0.05),
            "seed {seed}: {:?}",
            s.clients
        );
        assert!(
            (s.mean_emd - 1.6).abs() < 0.02,
            "seed {seed}: mean {}",
            s.mean_emd
        );
    }
    // classes:K for other K and client counts.
    for (k, clients) in [(3, 10), (2, 7), (5, 20), (10, 10)] {
        let p = split(c, clients, &format!("classes:{k}"), 1);
        assert_exactly_once(&p, c.len());
        for idx in &p.clients {
            assert_eq!(labels_held(c, idx), k, "classes:{k} x {clients}");
        }
    }
}

#[test]
fn shards_follow_mcmahan() {
    let m = mnist();
    let p = split(m, 100, "shards:300:2", 0);
    assert_exactly_once(&p, m.len());
    assert!(p.clients.iter().all(|c| c.len() == 600));
    // Sorted by label, 300-example shards: a client holds at most 4 labels, most hold 1 or 2.
    let held: Vec<usize> = p.clients.iter().map(|c| labels_held(m, c)).collect();
    assert!(held.iter().all(|&h| (1..=4).contains(&h)), "{held:?}");
    assert!(held.iter().filter(|&&h| h <= 2).count() >= 80, "{held:?}");
    let p = split(m, 50, "shards:300:2", 0);
    assert_at_most_once(&p, m.len());
    assert_eq!(p.total_len(), 30_000);
    let err = partition(m, 10, 101, &scheme("shards:300:2"), 0).unwrap_err();
    assert!(
        err.to_string().contains("shards:300:2") && err.to_string().contains("60000"),
        "{err}"
    );
}

#[test]
fn dirichlet_small_alpha_is_skewed_and_feasible() {
    for (labels, name) in [(mnist(), "mnist"), (cifar(), "cifar")] {
        for s in ["dirichlet:0.1", "dirichlet:0.5:100", "dirichlet:100"] {
            let p = split(labels, 10, s, 4);
            assert_exactly_once(&p, labels.len());
            let min = match scheme(s) {
                Scheme::Dirichlet { min_size, .. } => min_size,
                _ => unreachable!(),
            };
            assert!(p.clients.iter().all(|c| c.len() >= min), "{name} {s}");
            let st = partition_stats(labels, &p);
            if s == "dirichlet:0.1" {
                assert!(st.mean_emd > 1.0, "{name} {s}: mean EMD {}", st.mean_emd);
            }
            if s == "dirichlet:100" {
                assert!(st.mean_emd < 0.1, "{name} {s}: mean EMD {}", st.mean_emd);
            }
        }
    }
    // 100 clients and alpha 0.05 still find a draw with 5 examples each.
    let m = mnist();
    let p = split(m, 100, "dirichlet:0.05:5", 0);
    assert_exactly_once(&p, m.len());
}

#[test]
fn dirichlet_infeasible_minimum_fails_clearly_and_does_not_hang() {
    let m = mnist();
    // Possible on paper (10 x 5000 <= 60000) but no alpha = 0.01 draw ever gets there.
    let err = partition(m, 10, 10, &scheme("dirichlet:0.01:5000"), 0).unwrap_err();
    assert!(
        matches!(err, PartitionError::DirichletMinSize { attempts: 1000, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("dirichlet:0.01:5000") && msg.contains("5000"),
        "{msg}"
    );
    // Impossible up front: 100 x 1000 > 60000.
    let err = partition(m, 10, 100, &scheme("dirichlet:1:1000"), 0).unwrap_err();
    assert!(matches!(err, PartitionError::Infeasible { .. }), "{err}");
    assert!(err.to_string().contains("60000"), "{err}");
}

#[test]
fn quantity_skew_keeps_labels_iid_and_sizes_skewed() {
    let m = mnist();
    for s in ["lognormal:1.5", "powerlaw:1.2"] {
        let p = split(m, 20, s, 2);
        assert_exactly_once(&p, m.len());
        let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
        let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
        assert!(hi > 3 * lo, "{s}: sizes not skewed: {sizes:?}");
        let st = partition_stats(m, &p);
        // Large clients are IID samples; the weighted mean EMD stays small.
        assert!(st.mean_emd < 0.1, "{s}: mean EMD {}", st.mean_emd);
    }
    let p = split(m, 10, "lognormal:0", 0);
    assert!(p.clients.iter().all(|c| c.len() == 6000));
}

#[test]
fn emd_targets_are_hit_within_0_01() {
    let targets = [0.0, 0.36, 0.72, 1.08, 1.44, 1.62, 1.764, 1.8];
    for (labels, name) in [(cifar(), "cifar"), (mnist(), "mnist")] {
        for (t, &target) in targets.iter().enumerate() {
            for seed in [0, 1] {
                let s = format!("emd:{target}");
                let p = split(labels, 10, &s, seed);
                assert_at_most_once(&p, labels.len());
                let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
                assert!(
                    sizes.iter().all(|&x| x == sizes[0]),
                    "{name} {s}: {sizes:?}"
                );
                // Default M: the largest that overdraws no class. On balanced CIFAR the ten
                // shifts of P add up to one per class, so M is 5000 up to rounding; on MNIST it
                // lies between the smallest class (one-hot clients) and 6000 (target 0: all data).
                let (lo, hi) = if name == "cifar" {
                    (4990, 5000)
                } else {
                    (5410, 6000)
                };
                assert!((lo..=hi).contains(&sizes[0]), "{name} {s}: M {}", sizes[0]);
                let st = partition_stats(labels, &p);
                assert!(
                    (st.mean_emd - target).abs() < 0.01,
                    "{name} {s} seed {seed}: achieved {} (case {t})",
                    st.mean_emd
                );
                if name == "cifar" {
                    // Balanced classes: every client is a shifted copy of P, same EMD.
                    for c in &st.clients {
                        assert!(
                            (c.emd - target).abs() < 0.01,
                            "{s} client {}: {}",
                            c.id,
                            c.emd
                        );
                    }
                    // Client j's class distribution is client 0's shifted by j.
                    let d0 = distribution(&st.clients[0].class_counts);
                    let d3 = distribution(&st.clients[3].class_counts);
                    let back: Vec<f64> = (0..10).map(|i| d3[(i + 3) % 10]).collect();
                    assert!(emd(&d0, &back) < 0.01, "{s}: not a shift");
                }
            }
        }
    }
    // An explicit M is honoured, and asking too much is an error naming the class.
    let c = cifar();
    let p = split(c, 10, "emd:1.08:1000", 0);
    assert!(p.clients.iter().all(|x| x.len() == 1000));
    let err = partition(c, 10, 10, &scheme("emd:1.8:5001"), 0).unwrap_err();
    assert!(
        err.to_string().contains("5001") && err.to_string().contains("5000 exist"),
        "{err}"
    );
    // An absurd M is refused before any count is multiplied by it.
    let err = partition(c, 10, 2, &scheme("emd:1.0:10000000000000000000"), 0).unwrap_err();
    assert!(err.to_string().contains("more than the"), "{err}");
    // Other seeds give other P for the same target.
    let a = partition_stats(c, &split(c, 10, "emd:1.08", 0));
    let b = partition_stats(c, &split(c, 10, "emd:1.08", 1));
    assert_ne!(a.clients[0].class_counts, b.clients[0].class_counts);
}

#[test]
fn same_seed_same_partition_other_seed_other_partition() {
    let m = mnist();
    for s in [
        "iid",
        "classes:1",
        "classes:2",
        "shards:300:2",
        "dirichlet:0.3",
        "lognormal:1",
        "powerlaw:2",
        "emd:0.72",
        "matrix:[[100,0,0,0,0,0,0,0,0,0],[0,100,0,0,0,0,0,0,0,5]]",
    ] {
        let clients = match scheme(s) {
            Scheme::Shards { .. } => 100,
            Scheme::Matrix { ref counts } => counts.len(),
            _ => 10,
        };
        let a = split(m, clients, s, 11);
        let b = split(m, clients, s, 11);
        let c = split(m, clients, s, 12);
        assert_eq!(a, b, "{s}: same seed gave another partition");
        assert_ne!(
            a.clients, c.clients,
            "{s}: another seed gave the same partition"
        );
        assert_eq!(a.scheme, s);
        assert_eq!(a.seed, 11);
        for list in &a.clients {
            assert!(
                list.windows(2).all(|w| w[0] < w[1]),
                "{s}: indices not sorted/unique"
            );
        }
    }
}

#[test]
fn matrix_from_csv_json_and_inline() {
    let m = mnist();
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("m.csv");
    std::fs::write(
        &csv,
        "# client x class\n10,0,0,0,0,0,0,0,0,5\n\n0,0,0,0,0,0,0,0,7,0\n",
    )
    .unwrap();
    let json = dir.path().join("m.json");
    std::fs::write(&json, "[[10,0,0,0,0,0,0,0,0,5],[0,0,0,0,0,0,0,0,7,0]]").unwrap();
    for s in [
        format!("matrix:{}", csv.display()),
        format!("matrix:{}", json.display()),
    ] {
        let sc = scheme(&s);
        let p = partition(m, 10, 2, &sc, 0).unwrap();
        assert_at_most_once(&p, m.len());
        assert_eq!(
            class_counts(m, &p.clients[0], 10),
            vec![10, 0, 0, 0, 0, 0, 0, 0, 0, 5]
        );
        assert_eq!(
            class_counts(m, &p.clients[1], 10),
            vec![0, 0, 0, 0, 0, 0, 0, 0, 7, 0]
        );
        // The scheme prints back as inline JSON, which parses to the same scheme.
        assert_eq!(
            p.scheme,
            "matrix:[[10,0,0,0,0,0,0,0,0,5],[0,0,0,0,0,0,0,0,7,0]]"
        );
        assert_eq!(scheme(&p.scheme), sc);
    }
    // Asking for more than exist.
    let err = partition(m, 10, 1, &scheme("matrix:[[0,0,0,0,0,6000,0,0,0,0]]"), 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("6000 examples of class 5 but only 5421 exist"),
        "{err}"
    );
    // Counts whose sum overflows: still the same clear error.
    let err = partition(
        m,
        10,
        2,
        &scheme("matrix:[[18446744073709551615,0,0,0,0,0,0,0,0,0],[1,0,0,0,0,0,0,0,0,0]]"),
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("of class 0 but only"), "{err}");
    // Wrong shape for the call.
    let err = partition(m, 10, 3, &scheme(&format!("matrix:{}", csv.display())), 0).unwrap_err();
    assert!(err.to_string().contains("2 rows but 3 clients"), "{err}");
    let err = partition(m, 10, 1, &scheme("matrix:[[1,2]]"), 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("2 columns but the dataset has 10 classes"),
        "{err}"
    );
    // Bad files name the file and the place.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "1,2,3\n4,x,6\n").unwrap();
    let err = format!("matrix:{}", bad.display())
        .parse::<Scheme>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.csv") && err.contains("line 2, column 2") && err.contains("\"x\""),
        "{err}"
    );
    let ragged = dir.path().join("ragged.csv");
    std::fs::write(&ragged, "1,2,3\n4,5\n").unwrap();
    let err = format!("matrix:{}", ragged.display())
        .parse::<Scheme>()
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 2 has 2 counts but row 1 has 3"), "{err}");
    let err = "matrix:/no/such/file.csv"
        .parse::<Scheme>()
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/file.csv"), "{err}");
    let err = "matrix:[[1,2],[0,0]]"
        .parse::<Scheme>()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 2 (client 1) asks for no examples"),
        "{err}"
    );
}

#[test]
fn scheme_strings_round_trip() {
    for s in [
        "iid",
        "classes:2",
        "shards:300:2",
        "dirichlet:0.1",
        "dirichlet:0.5:20",
        "lognormal:1.5",
        "powerlaw:2",
        "emd:1.764",
        "emd:0.36:500",
        "matrix:[[1,2],[3,4]]",
    ] {
        let parsed = scheme(s);
        assert_eq!(parsed.to_string(), s);
        assert_eq!(scheme(&parsed.to_string()), parsed);
    }
    assert_eq!(
        scheme("dirichlet:0.3"),
        Scheme::Dirichlet {
            alpha: 0.3,
            min_size: 10
        }
    );
    assert_eq!(scheme("dirichlet:0.3:10").to_string(), "dirichlet:0.3");
    assert_eq!(
        scheme("powerlaw:1.5"),
        Scheme::Quantity {
            dist: QuantityDist::PowerLaw { a: 1.5 }
        }
    );
}

#[test]
fn bad_scheme_strings_are_rejected_naming_the_value() {
    for (s, needle) in [
        ("", "empty scheme"),
        ("random", "unknown scheme \"random\""),
        ("iid:3", "no arguments"),
        ("classes", "classes:K"),
        ("classes:0", "at least 1, got 0"),
        ("classes:two", "got \"two\""),
        ("classes:-1", "got \"-1\""),
        ("shards:300", "shards:SIZE:PER_CLIENT"),
        (
            "shards:0:2",
            "SIZE (examples per shard) must be at least 1, got 0",
        ),
        ("dirichlet:0", "ALPHA must be in [1e-6, 1e6], got 0"),
        ("dirichlet:-1", "got -1"),
        ("dirichlet:nan", "ALPHA must be finite, got \"nan\""),
        ("dirichlet:inf", "must be finite"),
        (
            "dirichlet:0.5:0",
            "MIN (minimum client size) must be at least 1, got 0",
        ),
        (
            "dirichlet:0.5:1:2",
            "dirichlet:ALPHA or dirichlet:ALPHA:MIN",
        ),
        ("lognormal:-0.5", "got -0.5"),
        ("powerlaw:0", "at least 0.01, got 0"),
        ("emd:2.5", "TARGET must be in [0, 2), got 2.5"),
        ("emd:-0.1", "got -0.1"),
        (
            "emd:1:0",
            "M (examples per client) must be at least 1, got 0",
        ),
        ("matrix:", "matrix:FILE.csv"),
        ("matrix:[[1,2],[3]]", "row 2 has 1 counts but row 1 has 2"),
        ("matrix:[[1,-2]]", "inline matrix is not a JSON array"),
    ] {
        let err = s.parse::<Scheme>().unwrap_err();
        assert!(
            matches!(err, PartitionError::BadScheme { .. }),
            "{s}: {err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{s:?}")),
            "{s}: message does not quote the scheme: {msg}"
        );
        assert!(msg.contains(needle), "{s}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn bad_arguments_are_rejected_naming_the_value() {
    let labels = [0u16, 1, 2, 1, 0];
    let err = partition(&labels, 3, 0, &Scheme::Iid, 0).unwrap_err();
    assert!(matches!(err, PartitionError::NoClients));
    assert!(err.to_string().contains("got 0"), "{err}");
    let err = partition(&labels, 3, 6, &Scheme::Iid, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "6 clients but only 5 examples: every client needs at least one example"
    );
    let err = partition(&labels, 2, 2, &Scheme::Iid, 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "example 2 has label 2 but there are only 2 classes"
    );
    let err = partition(&labels, 0, 2, &Scheme::Iid, 0).unwrap_err();
    assert!(matches!(err, PartitionError::NoClasses));
    let err = partition(&labels, 3, 2, &Scheme::Classes { k: 4 }, 0).unwrap_err();
    assert!(
        err.to_string().contains("K = 4") && err.to_string().contains("only 3 classes"),
        "{err}"
    );
    let err = partition(&labels, 3, 2, &Scheme::Classes { k: 3 }, 0).unwrap_err();
    assert!(
        err.to_string().contains("3 x 2 = 6 shards are needed")
            && err.to_string().contains("only 5 fit"),
        "{err}"
    );
    // 9 zeros and one 1 over 5 clients x 2 shards: at most 5 + 1 shards of distinct classes.
    let skewed = [0u16, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let err = partition(&skewed, 2, 5, &Scheme::Classes { k: 2 }, 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("only 6 fit these class sizes [9, 1]"),
        "{err}"
    );
    // Fewer shards than classes would leave whole classes out.
    let err = partition(&labels, 3, 2, &Scheme::Classes { k: 1 }, 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("2 shards, fewer than the 3 classes"),
        "{err}"
    );
    // An EMD target above what the labels allow.
    let err = partition(&skewed, 2, 2, &scheme("emd:1.9"), 0).unwrap_err();
    assert!(
        err.to_string().contains("emd:1.9") && err.to_string().contains("largest mean EMD"),
        "{err}"
    );
}
