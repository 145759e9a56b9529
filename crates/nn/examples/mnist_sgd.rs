//! Real-data check of the engine: trains `mnist-cnn` on full MNIST for one epoch with plain SGD
//! (B = 10, lr 0.01, seed 0, examples shuffled once with ChaCha8 seeded 0) and prints the test
//! accuracy. PyTorch on the same setting reaches 97.9%; the target here is >= 97.5%.
//!
//! Usage: `cargo run --release -p fedra-nn --example mnist_sgd -- [--data-dir DIR]`; without
//! `--data-dir` the MNIST files are read from `$FEDRA_TEST_DATA/mnist`.

use std::path::PathBuf;
use std::time::Instant;

use fedra_nn::{BnPolicy, Model, ModelSpec, SgdConfig, Trainer};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a value")?),
        None => PathBuf::from(std::env::var("FEDRA_TEST_DATA").map_err(
            |_| "set FEDRA_TEST_DATA (e.g. ../shared/datasets) or pass --data-dir <mnist dir>",
        )?)
        .join("mnist"),
    };
    let data = fedra_data::load_mnist(&dir)?;
    let (train, test) = (data.train, data.test);
    let row: usize = train.shape.iter().product();
    let spec = ModelSpec::by_name("mnist-cnn", train.shape, 10)?;
    let mut model = Model::new(&spec, 0)?;
    let batch = 10;
    let mut trainer = Trainer::new(&spec, batch)?;
    let sgd = SgdConfig {
        lr: 0.01,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let n = train.labels.len();
    println!(
        "mnist-cnn ({} parameters), {n} training / {} test examples, B={batch}, lr {}, seed 0",
        model.num_params(),
        test.labels.len(),
        sgd.lr
    );
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0));
    let mut x = vec![0f32; batch * row];
    let mut y = vec![0u16; batch];
    let start = Instant::now();
    let mut window = Instant::now();
    let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
    for (step, idx) in order.chunks(batch).enumerate() {
        let b = idx.len();
        for (k, &i) in idx.iter().enumerate() {
            x[k * row..(k + 1) * row].copy_from_slice(&train.features[i * row..(i + 1) * row]);
            y[k] = train.labels[i];
        }
        let stats = trainer.train_step(
            &mut model,
            &x[..b * row],
            &y[..b],
            &sgd,
            BnPolicy::Train,
            step as u64,
            None,
        )?;
        loss_sum += f64::from(stats.loss) * b as f64;
        correct += stats.correct;
        seen += b;
        if (step + 1) % 1000 == 0 {
            println!(
                "step {:5}: running train loss {:.4}, train accuracy {:.2}%, {:.0} samples/s",
                step + 1,
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / window.elapsed().as_secs_f64()
            );
            (loss_sum, correct, seen) = (0.0, 0, 0);
            window = Instant::now();
        }
    }
    let train_secs = start.elapsed().as_secs_f64();
    let eval = trainer.evaluate(&model, &test.features, &test.labels)?;
    println!(
        "one epoch in {train_secs:.1} s ({:.0} samples/s); test accuracy {:.2}% ({} / {}), test loss {:.4}",
        n as f64 / train_secs,
        100.0 * eval.accuracy(),
        eval.correct,
        eval.count,
        eval.mean_loss()
    );
    Ok(())
}
