//! Partitioners: how a training set is split over federated clients, which *is* the experiment
//! of the reference study. A [`Partition`] is one list of example indices per client (no copies
//! of the data), produced from the labels alone by [`partition`], seeded and deterministic: the
//! same labels, scheme and seed give the same lists, bit for bit.
//!
//! The schemes ([`Scheme`], parsed from strings such as `classes:2`):
//! - `iid`: shuffle, deal equal parts; the first `n % clients` clients get one example more.
//! - `classes:K` (the study's K-class non-IID): sort by label, cut the data into `K * clients`
//!   shards that each hold one class only (shared out over the classes in proportion to their
//!   sizes; with balanced classes all shards are equal), and give every client K shards of K
//!   *different* classes at random. Every client holds exactly K classes; every example is used
//!   exactly once. (Equal shards of the sorted data would straddle class boundaries when classes
//!   differ in size, as MNIST's do; see `skew::classes` for why and how.)
//! - `shards:S:P` (McMahan et al.): sort by label, cut into `n / S` shards of S consecutive
//!   examples, give each client P shards at random (classes may repeat). Examples in shards no
//!   client drew are unused.
//! - `dirichlet:ALPHA[:MIN]`: for every class, proportions over clients ~ Dir(ALPHA); the class's
//!   examples are dealt by those proportions. The whole draw is repeated until every client has
//!   at least MIN examples (default 10), at most [`DIRICHLET_ATTEMPTS`] times, then a clear error.
//!   Every example is used exactly once.
//! - `lognormal:SIGMA` / `powerlaw:A`: client sizes drawn from the distribution, scaled so they
//!   sum to n (every client at least one example), labels IID inside. Every example used once.
//! - `emd:TARGET[:M]`: the study's EMD sweep (see [`emd`] for the construction): one class
//!   distribution P with the requested EMD, client j gets P cyclically shifted by j classes, M
//!   examples each (default: the largest M no class is overdrawn for). Examples used at most once.
//! - `matrix:FILE`: explicit client x class counts from a CSV or JSON file, drawn at random
//!   without replacement.
//!
//! Every client of every partition holds at least one example; the indices inside a client are
//! sorted ascending (a partition is a set; training shuffles on its own).

mod emd;
mod scheme;
mod skew;

use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Pareto};

pub use scheme::{DEFAULT_DIRICHLET_MIN_SIZE, QuantityDist, Scheme};

/// How many complete Dirichlet draws `dirichlet:ALPHA:MIN` tries before it gives up.
pub const DIRICHLET_ATTEMPTS: usize = 1000;

/// One list of example indices (into the partitioned label slice) per client.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partition {
    /// The scheme string that made it (as [`Scheme`]'s `Display` prints it).
    pub scheme: String,
    /// The seed that made it.
    pub seed: u64,
    /// Number of classes of the labels it was made from.
    pub num_classes: usize,
    /// `clients[j]`: the indices of client j's examples, sorted ascending.
    pub clients: Vec<Vec<usize>>,
}

impl Partition {
    /// Number of examples over all clients (counting an index as often as it occurs).
    pub fn total_len(&self) -> usize {
        self.clients.iter().map(Vec::len).sum()
    }
}

/// Why a partition cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// The scheme string does not parse.
    #[error("bad partition scheme {scheme:?}: {reason}")]
    BadScheme { scheme: String, reason: String },
    /// Zero clients were asked for.
    #[error("the number of clients must be at least 1, got 0")]
    NoClients,
    /// More clients than examples: some client would be empty.
    #[error(
        "{clients} clients but only {examples} examples: every client needs at least one example"
    )]
    TooManyClients { clients: usize, examples: usize },
    /// Zero classes were given.
    #[error("the number of classes must be at least 1, got 0")]
    NoClasses,
    /// A label is not below the number of classes.
    #[error("example {index} has label {label} but there are only {num_classes} classes")]
    LabelOutOfRange {
        index: usize,
        label: u16,
        num_classes: usize,
    },
    /// The scheme cannot be satisfied by these labels and this number of clients.
    #[error("partition scheme {scheme:?} is infeasible: {reason}")]
    Infeasible { scheme: String, reason: String },
    /// `dirichlet:ALPHA:MIN` found no draw where every client gets MIN examples.
    #[error(
        "partition scheme {scheme:?}: no Dirichlet draw in {attempts} attempts gave every one of the {clients} clients at least {min_size} examples (smallest client in the last draw: {smallest}); lower MIN, raise ALPHA or use fewer clients"
    )]
    DirichletMinSize {
        scheme: String,
        clients: usize,
        min_size: usize,
        attempts: usize,
        smallest: usize,
    },
    /// A `matrix:` file cannot be read.
    #[error("{path}: cannot read the partition matrix: {source}")]
    MatrixFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `matrix:` file is not a matrix of counts.
    #[error("{path}: {reason}")]
    MatrixParse { path: PathBuf, reason: String },
}

impl PartitionError {
    fn infeasible(scheme: &Scheme, reason: impl Into<String>) -> Self {
        PartitionError::Infeasible {
            scheme: scheme.to_string(),
            reason: reason.into(),
        }
    }
}

/// Split the examples with labels `labels` (each `< num_classes`) over `clients` clients.
///
/// Deterministic: the same arguments give the same partition. Errors (never panics) on zero
/// clients or classes, more clients than examples, labels out of range, and schemes the labels
/// cannot satisfy.
pub fn partition(
    labels: &[u16],
    num_classes: usize,
    clients: usize,
    scheme: &Scheme,
    seed: u64,
) -> Result<Partition, PartitionError> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if num_classes == 0 {
        return Err(PartitionError::NoClasses);
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= num_classes)
    {
        return Err(PartitionError::LabelOutOfRange {
            index,
            label,
            num_classes,
        });
    }
    if clients > labels.len() {
        return Err(PartitionError::TooManyClients {
            clients,
            examples: labels.len(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lists = match scheme {
        Scheme::Iid => {
            let sizes = equal_sizes(labels.len(), clients);
            deal_shuffled(labels.len(), &sizes, &mut rng)
        }
        Scheme::Classes { k } => skew::classes(labels, num_classes, clients, *k, scheme, &mut rng)?,
        Scheme::Shards {
            shard_size,
            per_client,
        } => skew::shards(labels, clients, *shard_size, *per_client, scheme, &mut rng)?,
        Scheme::Dirichlet { alpha, min_size } => skew::dirichlet(
            labels,
            num_classes,
            clients,
            *alpha,
            *min_size,
            scheme,
            &mut rng,
        )?,
        Scheme::Quantity { dist } => {
            let weights = quantity_weights(*dist, clients, &mut rng);
            let sizes = sizes_from_weights(&weights, labels.len());
            deal_shuffled(labels.len(), &sizes, &mut rng)
        }
        Scheme::Emd { target, per_client } => emd::target_emd(
            labels,
            num_classes,
            clients,
            *target,
            *per_client,
            scheme,
            &mut rng,
        )?,
        Scheme::Matrix { counts } => {
            if counts.len() != clients {
                return Err(PartitionError::infeasible(
                    scheme,
                    format!(
                        "the matrix has {} rows but {clients} clients were asked for",
                        counts.len()
                    ),
                ));
            }
            if let Some(row) = counts.iter().find(|r| r.len() != num_classes) {
                return Err(PartitionError::infeasible(
                    scheme,
                    format!(
                        "the matrix has {} columns but the dataset has {num_classes} classes",
                        row.len()
                    ),
                ));
            }
            draw_counts(labels, num_classes, counts, scheme, &mut rng)?
        }
    };
    for list in &mut lists {
        list.sort_unstable();
    }
    if let Some(j) = lists.iter().position(Vec::is_empty) {
        // Each scheme guarantees non-empty clients; this catches a broken guarantee loudly.
        return Err(PartitionError::infeasible(
            scheme,
            format!("client {j} would get no example"),
        ));
    }
    Ok(Partition {
        scheme: scheme.to_string(),
        seed,
        num_classes,
        clients: lists,
    })
}

/// `clients` sizes summing to `n`, differing by at most one, larger ones first.
fn equal_sizes(n: usize, clients: usize) -> Vec<usize> {
    (0..clients)
        .map(|j| n / clients + usize::from(j < n % clients))
        .collect()
}

/// Shuffle `0..n` and cut it into consecutive runs of `sizes` (which sum to `n`).
fn deal_shuffled(n: usize, sizes: &[usize], rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &s in sizes {
        out.push(order[start..start + s].to_vec());
        start += s;
    }
    out
}

fn quantity_weights(dist: QuantityDist, clients: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    match dist {
        QuantityDist::LogNormal { sigma } => {
            // Parsing keeps sigma finite and >= 0, which LogNormal accepts.
            let d = LogNormal::new(0.0, sigma).expect("sigma validated at parse time");
            (0..clients).map(|_| d.sample(rng)).collect()
        }
        QuantityDist::PowerLaw { a } => {
            let d = Pareto::new(1.0, a).expect("shape validated at parse time");
            (0..clients).map(|_| d.sample(rng)).collect()
        }
    }
}

/// Integer sizes summing to `n`, each at least 1, otherwise proportional to `weights`
/// (largest-remainder rounding; ties go to the lower client id). Needs `n >= weights.len()`.
fn sizes_from_weights(weights: &[f64], n: usize) -> Vec<usize> {
    let k = weights.len();
    let spare = n - k;
    let total: f64 = weights.iter().sum();
    // Non-finite totals (an overflowing draw) fall back to equal shares rather than NaN sizes.
    let shares: Vec<f64> = if total.is_finite() && total > 0.0 {
        weights.iter().map(|w| w / total * spare as f64).collect()
    } else {
        vec![spare as f64 / k as f64; k]
    };
    let mut sizes: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    // Rounding in the shares can make the floors overshoot by a unit; take it from the largest.
    while sizes.iter().sum::<usize>() > spare {
        let j = (0..k)
            .max_by_key(|&j| (sizes[j], std::cmp::Reverse(j)))
            .unwrap_or(0);
        sizes[j] -= 1;
    }
    let mut left = spare - sizes.iter().sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..k).collect();
    by_remainder.sort_by(|&a, &b| {
        let ra = shares[a] - shares[a].floor();
        let rb = shares[b] - shares[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &j in by_remainder.iter().cycle() {
        if left == 0 {
            break;
        }
        sizes[j] += 1;
        left -= 1;
    }
    sizes.iter().map(|s| s + 1).collect()
}

/// The indices of each class, in index order.
fn indices_by_class(labels: &[u16], num_classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    by_class
}

/// Give client j `counts[j][c]` examples of class c, drawn at random without replacement.
fn draw_counts(
    labels: &[u16],
    num_classes: usize,
    counts: &[Vec<usize>],
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut by_class = indices_by_class(labels, num_classes);
    for (c, pool) in by_class.iter().enumerate() {
        // Saturating: counts from a `matrix:` scheme are the user's, and may be absurd.
        let asked = counts
            .iter()
            .fold(0usize, |sum, row| sum.saturating_add(row[c]));
        if asked > pool.len() {
            return Err(PartitionError::infeasible(
                scheme,
                format!(
                    "the clients ask for {asked} examples of class {c} but only {} exist",
                    pool.len()
                ),
            ));
        }
    }
    let mut out = vec![Vec::new(); counts.len()];
    for (c, pool) in by_class.iter_mut().enumerate() {
        pool.shuffle(rng);
        let mut start = 0;
        for (j, row) in counts.iter().enumerate() {
            out[j].extend_from_slice(&pool[start..start + row[c]]);
            start += row[c];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_weights_sum_to_n_and_keep_everyone() {
        let sizes = sizes_from_weights(&[1e9, 1.0, 1.0], 10);
        assert_eq!(sizes.iter().sum::<usize>(), 10);
        assert!(sizes.iter().all(|&s| s >= 1));
        assert_eq!(sizes[0], 8);
        assert_eq!(sizes_from_weights(&[1.0, 1.0, 1.0], 10), vec![4, 3, 3]);
        assert_eq!(sizes_from_weights(&[f64::INFINITY, 1.0], 4), vec![2, 2]);
    }

    #[test]
    fn equal_sizes_give_the_remainder_to_the_first_clients() {
        assert_eq!(equal_sizes(10, 3), vec![4, 3, 3]);
        assert_eq!(equal_sizes(9, 3), vec![3, 3, 3]);
    }
}
