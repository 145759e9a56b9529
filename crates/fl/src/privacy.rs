//! Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning Differentially
//! Private Recurrent Language Models"), and the accountant that says what it guarantees.
//!
//! Each round samples every client independently with probability q = `train.fraction`
//! (Poisson sampling, the sampling the accountant assumes); each sampled client's update (its
//! weights minus the global ones, over the aggregated parameters) is clipped to L2 norm `clip`;
//! the server adds Gaussian noise of standard deviation `noise_multiplier x clip` to the sum of
//! the clipped updates and divides by the expected number of clients qK (the fixed-denominator
//! estimator: one client changes the result by at most clip / qK). Clients count equally. The
//! noised mean update is then what the strategy's server step (FedAvg, FedAvgM, FedAdam...)
//! applies: post-processing keeps the guarantee. It protects every client's whole contribution
//! (client-level, add/remove adjacency), not single examples. What it protects is the model;
//! the metrics a simulation records beside it (training loss, examples per round) are not
//! noised.
//!
//! Where the randomness (who is sampled, the noise) comes from is `privacy.noise`. `"seeded"`
//! (what `fedra run` uses unless told otherwise) derives it from the run seed, so that a run
//! repeats bit for bit: DP for measuring what it costs, no protection from anyone who knows the
//! seed. `"secret"` (what `fedra serve` uses unless told otherwise: its clients receive the
//! experiment, seed included) keys a ChaCha20 stream per round with 32 bytes from the operating
//! system that stay in the run folder only while the run lasts ([`NoiseKey`]). Either way the
//! sample is drawn over every client of the partition, not over those connected, so a client
//! that is away when sampled counts as a dropout and no other client's chance of being sampled
//! rises above q: the accountant's assumption holds over a network too.
//!
//! The accountant is Rényi DP (Mironov 2017) of the Poisson-subsampled Gaussian mechanism,
//! computed exactly at integer orders (Mironov, Talwar and Zhang 2019, Section 3.3), composed
//! over the rounds, and turned into (epsilon, delta) with Proposition 12 of Canonne, Kamath and
//! Steinke 2020, minimised over the orders 2..=256. `fixtures/rdp_accountant.json` holds the
//! values of Google's `dp_accounting` for 128 settings, and a test holds fedra to them.

use rand::{Rng, RngCore, SeedableRng, TryRngCore};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use fedra_nn::Model;

use crate::client::{CENTRAL_ID, FitResult};
use crate::seed::{Purpose, derive};
use crate::strategy::AggregationScope;

/// The `[privacy]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Every client's update is clipped to this L2 norm (the sensitivity of the sum).
    pub clip: f32,
    /// The noise added to the sum has standard deviation `noise_multiplier x clip`.
    pub noise_multiplier: f32,
    /// The delta of the (epsilon, delta) reported.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Where the sampling and the noise come from; unset, the front end decides (`fedra run`:
    /// seeded, `fedra serve`: secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<NoiseSource>,
}

/// The `privacy.noise` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSource {
    /// From the run seed: runs repeat bit for bit; whoever knows the seed can remove the noise.
    Seeded,
    /// From a key drawn from the operating system when the run starts.
    Secret,
}

/// The secret of a `noise = "secret"` run: 32 bytes from the operating system.
#[derive(Clone, PartialEq, Eq)]
pub struct NoiseKey(pub [u8; 32]);

impl NoiseKey {
    /// A fresh key from the operating system's generator.
    pub fn generate() -> NoiseKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .expect("the operating system's random generator failed");
        NoiseKey(key)
    }

    /// The key as 64 lowercase hex digits (how a run folder keeps it).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A key from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<NoiseKey> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(NoiseKey(key))
    }
}

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never into a log.
        f.write_str("NoiseKey(..)")
    }
}

/// The randomness of a private run's rounds.
#[derive(Clone, Debug)]
pub enum Randomness {
    /// Derived from the run seed.
    Seeded(u64),
    /// Keyed by a secret.
    Secret(NoiseKey),
}

impl Randomness {
    /// The generator for `purpose` (sampling or noise) in `round`. Seeded: ChaCha8 from the
    /// derived seed (what runs have always drawn); secret: ChaCha20 under the key, on a stream
    /// of its own per (purpose, round).
    fn rng(&self, purpose: Purpose, round: usize, seeded_parts: &[u64]) -> Box<dyn RngCore> {
        match self {
            Randomness::Seeded(run_seed) => Box::new(ChaCha8Rng::seed_from_u64(derive(
                *run_seed,
                purpose,
                seeded_parts,
            ))),
            Randomness::Secret(key) => {
                let mut rng = ChaCha20Rng::from_seed(key.0);
                rng.set_stream(((purpose as u64) << 56) ^ round as u64);
                Box::new(rng)
            }
        }
    }
}

fn default_delta() -> f64 {
    1e-5
}

/// The strategies whose aggregate is the mean update (the ones DP-FedAvg's noised mean can
/// stand in for).
pub const PRIVATE_STRATEGIES: &[&str] = &[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
];

impl PrivacyConfig {
    /// The key and reason of the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err((
                "privacy.clip",
                format!("must be a finite number > 0, got {}", self.clip),
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err((
                "privacy.noise_multiplier",
                format!(
                    "must be a finite number > 0 (without noise there is no privacy; \
                     strategy.clip_update_norm clips alone), got {}",
                    self.noise_multiplier
                ),
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err((
                "privacy.delta",
                format!("must be in (0, 1), got {}", self.delta),
            ));
        }
        Ok(())
    }
}

/// The clients of `round` under Poisson sampling: each of `clients` independently with
/// probability `q`, drawn from `randomness`; possibly none.
pub fn poisson_sample(round: usize, clients: usize, q: f64, randomness: &Randomness) -> Vec<usize> {
    let mut rng = randomness.rng(Purpose::Sampling, round, &[round as u64, u64::MAX]);
    (0..clients).filter(|_| rng.random::<f64>() < q).collect()
}

/// The orders at which the accountant evaluates Rényi DP.
pub const ORDERS: std::ops::RangeInclusive<u32> = 2..=256;

/// log(exp(a) + exp(b)), exact when either is -inf.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// Rényi DP at integer `order` of one round of the Gaussian mechanism with noise multiplier
/// `z`, each client sampled with probability `q`: log(A) / (order - 1) with
/// A = sum_k C(order, k) (1 - q)^(order - k) q^k exp((k^2 - k) / (2 z^2)).
pub fn rdp_sampled_gaussian(q: f64, z: f64, order: u32) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if z == 0.0 {
        return f64::INFINITY;
    }
    let a = f64::from(order);
    if q == 1.0 {
        return a / (2.0 * z * z);
    }
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let mut log_comb = 0f64;
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=order {
        if k > 0 {
            // C(order, k) = C(order, k - 1) (order - k + 1) / k.
            log_comb += f64::from(order - k + 1).ln() - f64::from(k).ln();
        }
        let k = f64::from(k);
        let term = log_comb + k * log_q + (a - k) * log_1mq + (k * k - k) / (2.0 * z * z);
        log_a = log_add(log_a, term);
    }
    log_a / (a - 1.0)
}

/// (epsilon, the order that gives it) after `rounds` rounds, for `delta`.
pub fn epsilon(q: f64, z: f64, rounds: usize, delta: f64) -> (f64, u32) {
    let mut best = (f64::INFINITY, *ORDERS.start());
    for order in ORDERS {
        let a = f64::from(order);
        let r = rounds as f64 * rdp_sampled_gaussian(q, z, order);
        let eps = if r.is_nan() {
            f64::INFINITY
        } else if r < 0.0 {
            0.0
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            // The divergence is so small that delta alone covers it.
            0.0
        } else {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        };
        if eps < best.0 {
            best = (eps, order);
        }
    }
    (best.0.max(0.0), best.1)
}

/// DP-FedAvg's noised mean update as a result whose weights are the global ones plus it (over
/// the scope's parameters; buffers as the global model has them): clip each result's update to
/// `config.clip`, add noise of standard deviation `noise_multiplier x clip` to the sum (drawn
/// from `randomness` for `round`), divide by `expected` = qK. Returns it and how many updates
/// were clipped.
pub fn private_mean(
    global: &Model,
    results: &[FitResult],
    scope: &AggregationScope,
    config: &PrivacyConfig,
    expected: f64,
    round: usize,
    randomness: &Randomness,
) -> (FitResult, usize) {
    let g = global.params();
    let indices: Vec<usize> = scope.params.iter().flat_map(|r| r.clone()).collect();
    let mut sum = vec![0f64; indices.len()];
    let clip = f64::from(config.clip);
    let mut clipped = 0;
    for r in results {
        let norm = indices
            .iter()
            .map(|&i| (f64::from(r.params[i]) - f64::from(g[i])).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > clip {
            clipped += 1;
            clip / norm
        } else {
            1.0
        };
        for (s, &i) in sum.iter_mut().zip(&indices) {
            *s += (f64::from(r.params[i]) - f64::from(g[i])) * scale;
        }
    }
    let mut rng = randomness.rng(Purpose::Privacy, round, &[round as u64]);
    let noise = Normal::new(0.0, f64::from(config.noise_multiplier) * clip)
        .expect("validated: finite and >= 0");
    let mut params = g.to_vec();
    for (s, &i) in sum.iter().zip(&indices) {
        params[i] = (f64::from(g[i]) + (s + noise.sample(&mut *rng)) / expected) as f32;
    }
    let result = FitResult {
        // Not a client: the round's private mean, which the server step applies.
        client: CENTRAL_ID,
        num_examples: 1,
        params,
        buffers: global.buffers().to_vec(),
        train_loss: 0.0,
        examples_seen: 0,
    };
    (result, clipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdp_of_the_plain_and_the_subsampled_gaussian_by_hand() {
        // q = 1: the Gaussian mechanism, order / (2 z^2).
        assert_eq!(rdp_sampled_gaussian(1.0, 2.0, 8), 1.0);
        // Order 2: A = (1 - q)^2 + 2 q (1 - q) + q^2 e^(1 / z^2) = 1 + q^2 (e^(1 / z^2) - 1).
        let (q, z) = (0.1f64, 1.0f64);
        let by_hand = (1.0 + q * q * (1f64.exp() - 1.0)).ln();
        assert!((rdp_sampled_gaussian(q, z, 2) - by_hand).abs() < 1e-15);
        assert_eq!(rdp_sampled_gaussian(0.0, 1.0, 5), 0.0);
        assert_eq!(rdp_sampled_gaussian(0.5, 0.0, 5), f64::INFINITY);
        assert_eq!(epsilon(0.5, 0.0, 3, 1e-5).0, f64::INFINITY);
        assert_eq!(epsilon(0.5, 1.0, 0, 1e-5).0, 0.0);
    }

    #[test]
    fn poisson_sampling_is_seeded_and_near_its_rate() {
        let seven = Randomness::Seeded(7);
        let a = poisson_sample(3, 1000, 0.1, &seven);
        assert_eq!(a, poisson_sample(3, 1000, 0.1, &seven));
        assert_ne!(a, poisson_sample(4, 1000, 0.1, &seven));
        assert!((70..130).contains(&a.len()), "{}", a.len());
        assert_eq!(
            poisson_sample(0, 10, 1.0, &Randomness::Seeded(1)),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_secret_key_samples_at_the_same_rate_but_not_as_the_seed_does() {
        let key = NoiseKey::generate();
        assert_ne!(key, NoiseKey::generate(), "two keys from the OS were equal");
        assert_eq!(
            NoiseKey::from_hex(&format!(" {}\n", key.to_hex())),
            Some(key.clone())
        );
        assert_eq!(NoiseKey::from_hex("00"), None);
        assert_eq!(NoiseKey::from_hex(&"g".repeat(64)), None);
        assert_eq!(format!("{key:?}"), "NoiseKey(..)");
        let secret = Randomness::Secret(key);
        let a = poisson_sample(3, 1000, 0.1, &secret);
        assert_eq!(a, poisson_sample(3, 1000, 0.1, &secret));
        assert_ne!(a, poisson_sample(4, 1000, 0.1, &secret));
        assert!((70..130).contains(&a.len()), "{}", a.len());
        for seed in 0..4 {
            assert_ne!(a, poisson_sample(3, 1000, 0.1, &Randomness::Seeded(seed)));
        }
        // Sampling and noise draw from different streams of one round.
        let mut s = secret.rng(Purpose::Sampling, 3, &[]);
        let mut n = secret.rng(Purpose::Privacy, 3, &[]);
        assert_ne!(s.next_u64(), n.next_u64());
    }
}
