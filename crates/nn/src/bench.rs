//! Training-throughput benchmark behind `fedra bench train`: samples/s and GFLOP/s of
//! `Trainer::train_step` on synthetic inputs, one client on one thread or several clients in
//! parallel (one thread and one `Trainer` each, as the simulator runs them), plus the machine's
//! single-thread sgemm peak measured with the same GEMM crate. Timings are wall-clock and noisy on
//! a shared machine, so every figure is the best of several repeats.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::NnError;
use crate::kernels::matmul;
use crate::{BnPolicy, Model, ModelSpec, SgdConfig, Trainer};

/// One measured configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchRow {
    pub model: String,
    pub batch: usize,
    /// Total threads used (one per client).
    pub threads: usize,
    pub clients: usize,
    /// Training examples per second over all clients.
    pub samples_per_s: f64,
    /// Useful GFLOP/s by `ModelSpec::flops_per_sample`.
    pub gflops: f64,
    /// Bytes of one client's `Trainer` buffers.
    pub workspace_bytes: usize,
}

/// Measurement effort: warm-up steps, timed steps per repeat, repeats (best kept).
#[derive(Clone, Copy, Debug)]
pub struct BenchEffort {
    pub warmup_steps: usize,
    pub min_samples: usize,
    pub repeats: usize,
}

impl Default for BenchEffort {
    fn default() -> Self {
        BenchEffort {
            warmup_steps: 3,
            min_samples: 2000,
            repeats: 3,
        }
    }
}

fn synthetic(spec: &ModelSpec, n: usize, seed: u64) -> (Vec<f32>, Vec<u16>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len: usize = spec.input.iter().product();
    let x = (0..n * len).map(|_| rng.random::<f32>()).collect();
    let y = (0..n)
        .map(|_| rng.random_range(0..spec.classes) as u16)
        .collect();
    (x, y)
}

/// Runs `steps` timed steps (after warm-up) for one client; returns elapsed seconds.
fn client_run(
    spec: &ModelSpec,
    batch: usize,
    steps: usize,
    effort: BenchEffort,
    seed: u64,
) -> Result<f64, NnError> {
    let mut model = Model::new(spec, seed)?;
    let mut trainer = Trainer::new(spec, batch)?;
    let (x, y) = synthetic(spec, batch, seed);
    // A small lr keeps the synthetic run finite for many steps.
    let sgd = SgdConfig {
        lr: 1e-3,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    for s in 0..effort.warmup_steps {
        trainer.train_step(&mut model, &x, &y, &sgd, BnPolicy::Train, s as u64, None)?;
    }
    let start = Instant::now();
    for s in 0..steps {
        trainer.train_step(&mut model, &x, &y, &sgd, BnPolicy::Train, s as u64, None)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Measures `clients` clients training in parallel, each on its own thread with its own trainer.
pub fn bench_train(
    spec: &ModelSpec,
    batch: usize,
    clients: usize,
    effort: BenchEffort,
) -> Result<BenchRow, NnError> {
    let clients = clients.max(1);
    let steps = effort.min_samples.div_ceil(batch).max(2);
    let mut best = 0f64;
    for _ in 0..effort.repeats.max(1) {
        let results: Vec<Result<f64, NnError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|c| scope.spawn(move || client_run(spec, batch, steps, effort, c as u64)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(NnError::NonFinite {
                            what: "benchmark thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        // Throughput of the parallel section: the slowest client bounds it.
        let mut slowest = 0f64;
        for r in results {
            slowest = slowest.max(r?);
        }
        best = best.max((clients * steps * batch) as f64 / slowest);
    }
    let flops = spec.flops_per_sample()?;
    Ok(BenchRow {
        model: spec.name.clone(),
        batch,
        threads: clients,
        clients,
        samples_per_s: best,
        gflops: best * flops / 1e9,
        workspace_bytes: Trainer::new(spec, batch)?.workspace_bytes(),
    })
}

/// Single-thread sgemm GFLOP/s for an m x k by k x n product (best of `repeats`).
pub fn gemm_gflops(m: usize, n: usize, k: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; m * n];
    let flop = 2.0 * (m * n * k) as f64;
    let reps = ((2e9 / flop) as usize).clamp(1, 10_000);
    let mut best = 0f64;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        for _ in 0..reps {
            matmul(
                gemm::Parallelism::None,
                m,
                n,
                k,
                &mut c,
                false,
                &a,
                k,
                1,
                &b,
                n,
                1,
            );
        }
        best = best.max(flop * reps as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&c);
    best
}
