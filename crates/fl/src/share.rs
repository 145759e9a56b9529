//! The study's data-sharing strategy (Zhao et al. 2018, section 4): hold part of the training set
//! out, draw a small class-balanced global set G from it (beta = |G| / |D|, D the data the clients
//! keep), optionally warm the initial model up on G, and give every client its own random alpha
//! share of G mixed into its local data.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::FlError;
use crate::seed::{Purpose, derive};

/// `[share]` in an experiment file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// Examples held out of the training set; G is drawn from them and D is the rest (the study:
    /// 10,000 of CIFAR-10's 50,000).
    pub holdout: usize,
    /// |G| / |D|.
    pub beta: f64,
    /// Fraction of G each client receives (its own random draw).
    pub alpha: f64,
    /// Epochs of centralised training on G before round 0 (0: no warm-up).
    #[serde(default)]
    pub warmup_epochs: usize,
}

/// The result of the split: what is partitioned over clients, and the global set.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedSplit {
    /// Indices (into the training set) the clients' own data is drawn from.
    pub client_pool: Vec<usize>,
    /// The class-balanced global set G.
    pub global: Vec<usize>,
}

impl ShareConfig {
    /// Check values; errors name the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(("share.beta", format!("must be > 0, got {}", self.beta)));
        }
        if !(self.alpha.is_finite() && (0.0..=1.0).contains(&self.alpha)) {
            return Err((
                "share.alpha",
                format!("must be in [0, 1], got {}", self.alpha),
            ));
        }
        if self.holdout == 0 {
            return Err(("share.holdout", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Split the training set (given by its labels) into the client pool D and a class-balanced
    /// global set G drawn from the holdout.
    pub fn split(&self, labels: &[u16], classes: usize, seed: u64) -> Result<SharedSplit, FlError> {
        let n = labels.len();
        if self.holdout >= n {
            return Err(FlError::State(format!(
                "share.holdout = {} leaves no client data (the training set has {n} examples)",
                self.holdout
            )));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(derive(
            seed,
            Purpose::Share,
            &[0],
        )));
        let (holdout, pool) = order.split_at(self.holdout);
        let mut client_pool = pool.to_vec();
        client_pool.sort_unstable();
        let size = (self.beta * client_pool.len() as f64).round() as usize;
        let per_class = size / classes.max(1);
        if per_class * classes != size {
            // Class balance wins over the exact size: say so rather than drop examples silently.
            tracing::info!(
                requested = size,
                used = per_class * classes,
                "share: |G| rounded down to a multiple of the {classes} classes"
            );
        }
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for &i in holdout {
            by_class[labels[i] as usize].push(i);
        }
        // G never outgrows the holdout (the check below fails first), whatever beta asks.
        let mut global = Vec::with_capacity(self.holdout.min(per_class.saturating_mul(classes)));
        for (class, members) in by_class.iter().enumerate() {
            if members.len() < per_class {
                return Err(FlError::State(format!(
                    "share: beta = {} asks for {per_class} examples of class {class} in G, but the \
                     holdout of {} has only {}; raise share.holdout or lower share.beta",
                    self.beta,
                    self.holdout,
                    members.len()
                )));
            }
            global.extend_from_slice(&members[..per_class]);
        }
        if global.is_empty() {
            return Err(FlError::State(format!(
                "share: beta = {} gives an empty global set",
                self.beta
            )));
        }
        global.sort_unstable();
        Ok(SharedSplit {
            client_pool,
            global,
        })
    }

    /// Client `client`'s random alpha share of G.
    pub fn client_share(&self, global: &[usize], client: usize, seed: u64) -> Vec<usize> {
        let take = (self.alpha * global.len() as f64).round() as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(derive(seed, Purpose::Share, &[1, client as u64]));
        let mut share: Vec<usize> = sample(&mut rng, global.len(), take)
            .into_iter()
            .map(|j| global[j])
            .collect();
        share.sort_unstable();
        share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u16> {
        (0..5000).map(|i| (i * 7 % 10) as u16).collect()
    }

    #[test]
    fn global_set_is_balanced_disjoint_from_client_data_and_sized_by_beta() {
        let share = ShareConfig {
            holdout: 1000,
            beta: 0.1,
            alpha: 0.5,
            warmup_epochs: 0,
        };
        let labels = labels();
        let split = share.split(&labels, 10, 3).unwrap();
        assert_eq!(split.client_pool.len(), 4000);
        assert_eq!(split.global.len(), 400);
        let mut counts = [0usize; 10];
        for &i in &split.global {
            counts[labels[i] as usize] += 1;
            assert!(split.client_pool.binary_search(&i).is_err(), "G overlaps D");
        }
        assert!(counts.iter().all(|&c| c == 40), "{counts:?}");
        let a = share.client_share(&split.global, 0, 3);
        let b = share.client_share(&split.global, 1, 3);
        assert_eq!(a.len(), 200);
        assert_ne!(a, b, "each client draws its own share");
        assert_eq!(a, share.client_share(&split.global, 0, 3));
    }

    #[test]
    fn infeasible_beta_is_a_clear_error() {
        let share = ShareConfig {
            holdout: 100,
            beta: 0.5,
            alpha: 0.5,
            warmup_epochs: 0,
        };
        let e = share.split(&labels(), 10, 0).unwrap_err().to_string();
        assert!(e.contains("share.holdout"), "{e}");
        // A beta far beyond any holdout (G's buffer was once sized by beta, and 1e15 overflowed
        // its capacity).
        for beta in [1e9, 1e15, 1e300] {
            let e = ShareConfig {
                beta,
                ..share.clone()
            }
            .split(&labels(), 10, 0)
            .unwrap_err()
            .to_string();
            assert!(e.contains("share.holdout"), "beta {beta}: {e}");
        }
    }
}
