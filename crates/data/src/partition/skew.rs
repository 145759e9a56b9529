//! The label-skew partitioners: the study's K-class shards, McMahan et al.'s shards, and the
//! per-class Dirichlet split. See the parent module for what each promises.

use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, Open01};

use super::{DIRICHLET_ATTEMPTS, PartitionError, Scheme, equal_sizes, indices_by_class};

/// `0..n` sorted by label, ties in index order.
fn sorted_by_label(labels: &[u16]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_by_key(|&i| labels[i]);
    order
}

/// `classes:K`: sort by label, cut every class into pure shards (`K * clients` in all, shared
/// out over the classes in proportion to their sizes), give each client K shards of K
/// different classes.
///
/// The shards are cut per class rather than as `K * clients` equal runs of the label-sorted
/// data: with unequal classes (MNIST has 5421 to 6742 per class) equal runs straddle class
/// boundaries, and on MNIST `classes:1` would then hand one client 5246 fours plus 754 threes
/// (EMD 1.60 instead of about 1.8) and `classes:2` clients up to four labels. Shards are shared
/// out by the D'Hondt rule (the next shard goes to the class with the largest
/// `size / (shards + 1)`, ties to the smaller label), which keeps shard sizes as even as pure
/// shards allow (2710..3371 for MNIST `classes:2`), with no class getting more shards than
/// there are clients. Inside a class, shard sizes differ by at most one.
///
/// The assignment visits clients in random order. A client must take every class that has as
/// many shards left as there are clients left (else some later client would get two shards of
/// it); it fills its other slots with classes drawn at random, weighted by their shards left
/// (which is drawing a random remaining shard among the classes it does not hold yet). With
/// every client needing K shards, "no class has more shards than clients" is exactly the
/// condition for such an assignment to exist (Gale-Ryser); the D'Hondt rule guarantees it and
/// the greedy keeps it true at every step, so the assignment never fails or retries.
pub(super) fn classes(
    labels: &[u16],
    num_classes: usize,
    clients: usize,
    k: usize,
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if k > num_classes {
        return Err(PartitionError::infeasible(
            scheme,
            format!(
                "K = {k} different classes per client, but the dataset has only {num_classes} classes"
            ),
        ));
    }
    let shard_count = k * clients;
    let by_class = indices_by_class(labels, num_classes);
    let present = by_class.iter().filter(|c| !c.is_empty()).count();
    if shard_count < present {
        return Err(PartitionError::infeasible(
            scheme,
            format!(
                "{k} x {clients} = {shard_count} shards, fewer than the {present} classes present, so whole classes would go unused; use more clients or a larger K (or shards:S:P, dirichlet:ALPHA)"
            ),
        ));
    }
    // A class can hold at most one shard per client and one shard per example.
    let cap: Vec<usize> = by_class.iter().map(|c| c.len().min(clients)).collect();
    let capacity: usize = cap.iter().sum();
    if capacity < shard_count {
        return Err(PartitionError::infeasible(
            scheme,
            format!(
                "{k} x {clients} = {shard_count} shards are needed, but with at most one shard of a class per client (and one example per shard) only {capacity} fit these class sizes {:?}",
                by_class.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        ));
    }
    let mut shards_per_class = vec![0usize; num_classes];
    for _ in 0..shard_count {
        let next = (0..num_classes)
            .filter(|&c| shards_per_class[c] < cap[c])
            .max_by(|&a, &b| {
                // Compare size_a / (s_a + 1) with size_b / (s_b + 1) exactly, in integers.
                let qa = by_class[a].len() as u128 * (shards_per_class[b] as u128 + 1);
                let qb = by_class[b].len() as u128 * (shards_per_class[a] as u128 + 1);
                qa.cmp(&qb).then(b.cmp(&a))
            })
            .expect("capacity checked above");
        shards_per_class[next] += 1;
    }
    let mut shards: Vec<&[usize]> = Vec::with_capacity(shard_count);
    let mut shards_of_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (c, pool) in by_class.iter().enumerate() {
        let mut start = 0;
        for size in equal_sizes(pool.len(), shards_per_class[c]) {
            shards_of_class[c].push(shards.len());
            shards.push(&pool[start..start + size]);
            start += size;
        }
    }
    for list in &mut shards_of_class {
        list.shuffle(rng);
    }
    let mut visit: Vec<usize> = (0..clients).collect();
    visit.shuffle(rng);
    let mut out = vec![Vec::new(); clients];
    for (step, &client) in visit.iter().enumerate() {
        let clients_left = clients - step;
        let mut chosen: Vec<usize> = (0..num_classes)
            .filter(|&c| shards_of_class[c].len() >= clients_left)
            .collect();
        while chosen.len() < k {
            let total: usize = (0..num_classes)
                .filter(|c| !chosen.contains(c))
                .map(|c| shards_of_class[c].len())
                .sum();
            if total == 0 {
                break;
            }
            let mut pick = rng.random_range(0..total);
            for c in (0..num_classes).filter(|c| !chosen.contains(c)) {
                let w = shards_of_class[c].len();
                if pick < w {
                    chosen.push(c);
                    break;
                }
                pick -= w;
            }
        }
        if chosen.len() != k {
            // Unreachable while the up-front check holds; an error beats a wrong partition.
            return Err(PartitionError::infeasible(
                scheme,
                format!("no set of {k} different classes was left for client {client}"),
            ));
        }
        for c in chosen {
            let s = shards_of_class[c]
                .pop()
                .expect("chosen classes have shards left");
            out[client].extend_from_slice(shards[s]);
        }
    }
    Ok(out)
}

/// `shards:S:P`: sort by label, cut into `n / S` shards of S consecutive examples, deal P
/// random shards to each client.
pub(super) fn shards(
    labels: &[u16],
    clients: usize,
    shard_size: usize,
    per_client: usize,
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let n = labels.len();
    let available = n / shard_size;
    let needed = clients.saturating_mul(per_client);
    if needed > available {
        return Err(PartitionError::infeasible(
            scheme,
            format!(
                "{clients} clients x {per_client} shards of {shard_size} need {} examples but there are only {n} ({available} whole shards)",
                needed.saturating_mul(shard_size)
            ),
        ));
    }
    let order = sorted_by_label(labels);
    let mut ids: Vec<usize> = (0..available).collect();
    ids.shuffle(rng);
    Ok(ids[..needed]
        .chunks(per_client)
        .map(|mine| {
            mine.iter()
                .flat_map(|&s| order[s * shard_size..(s + 1) * shard_size].iter().copied())
                .collect()
        })
        .collect())
}

/// One draw from a symmetric Dirichlet(alpha) over `k` components.
///
/// rand_distr's `Dirichlet` fixes the dimension at compile time, so the draw is made here from
/// Gamma variates. For alpha < 1 the Gamma(alpha) variates underflow to 0 in linear space (all
/// of them, for alpha around 0.01), so they are formed in log space with the boost
/// Gamma(alpha) = Gamma(alpha + 1) * U^(1/alpha) and normalised with log-sum-exp.
pub(super) fn dirichlet_draw(alpha: f64, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let logs: Vec<f64> = if alpha < 1.0 {
        let g = Gamma::new(alpha + 1.0, 1.0).expect("alpha validated at parse time");
        (0..k)
            .map(|_| {
                let u: f64 = Open01.sample(rng);
                g.sample(rng).ln() + u.ln() / alpha
            })
            .collect()
    } else {
        let g = Gamma::new(alpha, 1.0).expect("alpha validated at parse time");
        (0..k).map(|_| g.sample(rng).ln()).collect()
    };
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logs.iter().map(|l| (l - top).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Cut `n` items into `props.len()` consecutive runs proportional to `props` (cumulative
/// rounding, so the runs sum to exactly `n`).
fn split_counts(n: usize, props: &[f64]) -> Vec<usize> {
    let mut counts = Vec::with_capacity(props.len());
    let mut cum = 0.0;
    let mut prev = 0usize;
    for (j, p) in props.iter().enumerate() {
        cum += p;
        let end = if j + 1 == props.len() {
            n
        } else {
            ((cum * n as f64).round() as usize).clamp(prev, n)
        };
        counts.push(end - prev);
        prev = end;
    }
    counts
}

/// `dirichlet:ALPHA:MIN`: every class's examples dealt over clients by Dir(alpha) proportions;
/// the whole draw is redone until every client has `min_size` examples.
pub(super) fn dirichlet(
    labels: &[u16],
    num_classes: usize,
    clients: usize,
    alpha: f64,
    min_size: usize,
    scheme: &Scheme,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let n = labels.len();
    if clients.saturating_mul(min_size) > n {
        return Err(PartitionError::infeasible(
            scheme,
            format!(
                "{clients} clients x at least {min_size} examples each is more than the {n} examples"
            ),
        ));
    }
    let by_class = indices_by_class(labels, num_classes);
    let mut smallest = 0;
    for _ in 0..DIRICHLET_ATTEMPTS {
        let mut out = vec![Vec::new(); clients];
        for pool in &by_class {
            if pool.is_empty() {
                continue;
            }
            let mut pool = pool.clone();
            pool.shuffle(rng);
            let props = dirichlet_draw(alpha, clients, rng);
            let mut start = 0;
            for (j, c) in split_counts(pool.len(), &props).into_iter().enumerate() {
                out[j].extend_from_slice(&pool[start..start + c]);
                start += c;
            }
        }
        smallest = out.iter().map(Vec::len).min().unwrap_or(0);
        if smallest >= min_size {
            return Ok(out);
        }
    }
    Err(PartitionError::DirichletMinSize {
        scheme: scheme.to_string(),
        clients,
        min_size,
        attempts: DIRICHLET_ATTEMPTS,
        smallest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn tiny_alpha_draws_are_finite_and_peaked() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for alpha in [1e-6, 0.01, 0.1, 1.0, 100.0] {
            let p = dirichlet_draw(alpha, 10, &mut rng);
            assert!(
                p.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{alpha}: {p:?}"
            );
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let p = dirichlet_draw(0.001, 10, &mut rng);
        assert!(p.iter().copied().fold(0.0, f64::max) > 0.99, "{p:?}");
    }

    #[test]
    fn split_counts_sums_exactly() {
        assert_eq!(split_counts(10, &[0.25, 0.25, 0.5]), vec![3, 2, 5]);
        assert_eq!(split_counts(7, &[1.0, 0.0]), vec![7, 0]);
        assert_eq!(split_counts(5, &[0.0, 0.0, 1.0]), vec![0, 0, 5]);
    }
}
