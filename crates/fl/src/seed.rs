//! Seed derivation. Every random choice in a run (client sampling, shuffling, augmentation,
//! dropout) draws from a seed derived from the run seed and *where* the draw happens (purpose,
//! round, client), never from a shared generator. That is what makes a run bit-identical whatever
//! the number of threads, and what lets a resumed run continue exactly where it stopped: there is
//! no generator state to save.

/// One step of SplitMix64: a bijective 64-bit mixer with good avalanche.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a derived seed is for; distinct purposes give independent streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Which clients take part in a round.
    Sampling = 1,
    /// Order of a client's examples in one local epoch.
    Shuffle = 2,
    /// Augmentation and dropout of one training step.
    Step = 3,
    /// Initial weights of the model.
    Init = 4,
    /// The partition of the training set.
    Partition = 5,
    /// Draws of the data-sharing strategy.
    Share = 6,
    /// Noise of a `random` attacker's update.
    Attack = 7,
    /// DP-FedAvg's noise on the sum of the clipped updates.
    Privacy = 8,
}

/// A seed for `purpose` at the coordinates `parts` (round, client, epoch, step...).
pub fn derive(run_seed: u64, purpose: Purpose, parts: &[u64]) -> u64 {
    let mut h = splitmix64(run_seed ^ splitmix64(purpose as u64));
    for &p in parts {
        h = splitmix64(h ^ splitmix64(p.wrapping_add(0x51_7CC1_B727_220A)));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_and_purposes_give_distinct_seeds() {
        let a = derive(0, Purpose::Shuffle, &[1, 2]);
        assert_eq!(a, derive(0, Purpose::Shuffle, &[1, 2]));
        assert_ne!(a, derive(0, Purpose::Shuffle, &[2, 1]));
        assert_ne!(a, derive(0, Purpose::Step, &[1, 2]));
        assert_ne!(a, derive(1, Purpose::Shuffle, &[1, 2]));
        assert_ne!(
            derive(0, Purpose::Shuffle, &[0]),
            derive(0, Purpose::Shuffle, &[0, 0])
        );
    }
}
