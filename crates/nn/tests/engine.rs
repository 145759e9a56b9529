//! Behaviour of the engine beyond gradients: parameter counts, TOML round trips, determinism
//! (same seed, any thread count), the BatchNorm-policy trap, SGD semantics and the correction
//! hook, safetensors round trip and its errors, and bad input reported as `NnError`.

use fedra_nn::{
    BUILTIN_MODELS, BnPolicy, GradCorrection, Model, ModelSpec, NnError, SgdConfig, TensorKind,
    Trainer, WeightInit,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn input_of(name: &str) -> [usize; 3] {
    if name.starts_with("cifar") {
        [3, 32, 32]
    } else if name.starts_with("kws") {
        [1, 49, 10]
    } else {
        [1, 28, 28]
    }
}

fn batch(spec: &ModelSpec, n: usize, seed: u64) -> (Vec<f32>, Vec<u16>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len: usize = spec.input.iter().product();
    let x = (0..n * len).map(|_| rng.random::<f32>()).collect();
    let y = (0..n)
        .map(|_| rng.random_range(0..spec.classes) as u16)
        .collect();
    (x, y)
}

const SGD: SgdConfig = SgdConfig {
    lr: 0.05,
    momentum: 0.9,
    weight_decay: 1e-3,
};

#[test]
fn mnist_cnn_has_1_663_370_parameters() {
    let spec = ModelSpec::by_name("mnist-cnn", [1, 28, 28], 10).unwrap();
    assert_eq!(spec.num_params().unwrap(), 1_663_370);
    assert_eq!(Model::new(&spec, 0).unwrap().num_params(), 1_663_370);
    // 2 * (conv1 25*32*784 + conv2 800*64*196 + fc1 3136*512 + fc2 5120) MACs, times 3.
    let macs = 25 * 32 * 784 + 800 * 64 * 196 + 3136 * 512 + 512 * 10;
    assert_eq!(spec.flops_per_sample().unwrap(), 6.0 * macs as f64);
}

#[test]
fn resnets_have_the_papers_sizes_and_torchvision_names() {
    for (name, params) in [
        ("resnet20", 272_474),
        ("resnet32", 466_906),
        ("resnet56", 855_770),
    ] {
        let spec = ModelSpec::by_name(name, [3, 32, 32], 10).unwrap();
        assert_eq!(spec.num_params().unwrap(), params, "{name}");
        // GroupNorm has BatchNorm's affine parameters and no buffers.
        let gn = ModelSpec::by_name(&format!("{name}-gn"), [3, 32, 32], 10).unwrap();
        assert_eq!(gn.num_params().unwrap(), params, "{name}-gn");
        assert!(Model::new(&gn, 0).unwrap().buffers().is_empty());
    }
    // torchvision's resnet18 for ImageNet: 11,689,512 parameters, 1.814 G multiply-adds (conv1
    // 118.0 M at 112x112, the stages at 56, 28, 14, 7, fc 0.5 M).
    let spec = ModelSpec::by_name("resnet18", [3, 224, 224], 1000).unwrap();
    assert_eq!(spec.num_params().unwrap(), 11_689_512);
    assert_eq!(spec.flops_per_sample().unwrap(), 6.0 * 1_814_073_344.0);
    let model = Model::new(&spec, 0).unwrap();
    let names: Vec<(&str, &[usize])> = model
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    // The first keys of torchvision's `resnet18().state_dict()`, in its order.
    let head: [(&str, &[usize]); 14] = [
        ("conv1.weight", &[64, 3, 7, 7]),
        ("bn1.weight", &[64]),
        ("bn1.bias", &[64]),
        ("bn1.running_mean", &[64]),
        ("bn1.running_var", &[64]),
        ("bn1.num_batches_tracked", &[]),
        ("layer1.0.conv1.weight", &[64, 64, 3, 3]),
        ("layer1.0.bn1.weight", &[64]),
        ("layer1.0.bn1.bias", &[64]),
        ("layer1.0.bn1.running_mean", &[64]),
        ("layer1.0.bn1.running_var", &[64]),
        ("layer1.0.bn1.num_batches_tracked", &[]),
        ("layer1.0.conv2.weight", &[64, 64, 3, 3]),
        ("layer1.0.bn2.weight", &[64]),
    ];
    assert_eq!(&names[..14], &head[..]);
    for (name, shape) in [
        ("layer2.0.downsample.0.weight", &[128, 64, 1, 1][..]),
        ("layer2.0.downsample.1.running_var", &[128]),
        ("layer4.1.bn2.bias", &[512]),
        ("fc.weight", &[1000, 512]),
        ("fc.bias", &[1000]),
    ] {
        assert!(names.contains(&(name, shape)), "{name} {shape:?}");
    }
    assert_eq!(
        names.len(),
        122,
        "torchvision's resnet18 has 122 state-dict entries"
    );
    assert!(
        !names
            .iter()
            .any(|(n, _)| n.starts_with("layer1.0.downsample"))
    );
}

#[test]
fn pytorch_names_and_shapes() {
    let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
    let model = Model::new(&spec, 0).unwrap();
    let table: Vec<(String, Vec<usize>, TensorKind)> = model
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.kind))
        .collect();
    let want = [
        ("conv1.weight", vec![32, 1, 5, 5], TensorKind::Param),
        ("conv1.bias", vec![32], TensorKind::Param),
        ("bn1.weight", vec![32], TensorKind::Param),
        ("bn1.bias", vec![32], TensorKind::Param),
        ("bn1.running_mean", vec![32], TensorKind::Buffer),
        ("bn1.running_var", vec![32], TensorKind::Buffer),
        ("bn1.num_batches_tracked", vec![], TensorKind::Buffer),
        ("conv2.weight", vec![64, 32, 5, 5], TensorKind::Param),
        ("conv2.bias", vec![64], TensorKind::Param),
    ];
    for (i, (n, s, k)) in want.iter().enumerate() {
        assert_eq!(table[i], (n.to_string(), s.clone(), *k));
    }
    assert_eq!(model.tensor("fc1.weight").unwrap().len(), 512 * 3136);
    assert_eq!(model.tensor("bn1.running_var").unwrap(), &[1.0; 32][..]);
    // PyTorch default init bound 1/sqrt(fan_in) for weights and biases.
    let bound = 1.0 / (25f32).sqrt();
    let w = model.tensor("conv1.weight").unwrap();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > 0.9 * bound));
}

#[test]
fn glorot_init_draws_keras_bounds_and_zero_biases() {
    let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
    let glorot = Model::initialised(&spec, 0, WeightInit::Glorot).unwrap();
    // sqrt(6 / (fan_in + fan_out)), fans counted as Keras and xavier_uniform_ count them.
    for (name, fan_in, fan_out) in [
        ("conv1.weight", 25, 32 * 25),
        ("conv2.weight", 32 * 25, 64 * 25),
        ("fc1.weight", 3136, 512),
        ("fc2.weight", 512, 10),
    ] {
        let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
        let w = glorot.tensor(name).unwrap();
        let max = w.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        assert!(
            max <= bound && max > 0.9 * bound,
            "{name}: max {max}, bound {bound}"
        );
        // A uniform draw in ±bound has standard deviation bound/sqrt(3).
        let var = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        let want = bound / 3f64.sqrt();
        assert!(
            (var.sqrt() / want - 1.0).abs() < 0.1,
            "{name}: std {}",
            var.sqrt()
        );
    }
    for name in [
        "conv1.bias",
        "conv2.bias",
        "fc1.bias",
        "fc2.bias",
        "bn1.bias",
    ] {
        assert!(
            glorot.tensor(name).unwrap().iter().all(|v| *v == 0.0),
            "{name}"
        );
    }
    assert_eq!(glorot.tensor("bn1.weight").unwrap(), &[1.0; 32][..]);
    assert_eq!(glorot.tensor("bn1.running_var").unwrap(), &[1.0; 32][..]);
    // Seeded like PyTorch's scheme: same seed, same bits; another seed or scheme, other weights.
    let again = Model::initialised(&spec, 0, WeightInit::Glorot).unwrap();
    assert_eq!(bits(glorot.params()), bits(again.params()));
    let seed1 = Model::initialised(&spec, 1, WeightInit::Glorot).unwrap();
    assert_ne!(bits(glorot.params()), bits(seed1.params()));
    let pytorch = Model::initialised(&spec, 0, WeightInit::Pytorch).unwrap();
    assert_eq!(
        bits(pytorch.params()),
        bits(Model::new(&spec, 0).unwrap().params())
    );
    assert_ne!(bits(glorot.params()), bits(pytorch.params()));
}

#[test]
fn every_builtin_round_trips_through_toml() {
    for name in BUILTIN_MODELS {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let text = spec.to_toml_string();
        let back =
            ModelSpec::from_toml_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        assert_eq!(back, spec, "{name}");
        assert!(spec.num_params().unwrap() > 0);
    }
}

#[test]
fn bad_specs_name_the_field() {
    let err = |s: &str| ModelSpec::from_toml_str(s).unwrap_err().to_string();
    let head = "name = \"x\"\ninput = [1, 8, 8]\nclasses = 3\n";
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"conv2d\"\nname = \"c\"\nout_channels = 6\nkernel = [3, 3]\n[[layers]]\ntype = \"groupnorm\"\nname = \"g\"\ngroups = 4\n[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nname = \"f\"\nout_features = 3\n"
    ));
    assert!(e.contains("layers[1].groups"), "{e}");
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nname = \"f\"\nout_features = 4\n"
    ));
    assert!(e.contains("3 class logits"), "{e}");
    let e = err(&format!("{head}[[layers]]\ntype = \"conv3d\"\n"));
    assert!(e.contains("conv3d"), "{e}");
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"linear\"\nname = \"f\"\nout_features = 3\n"
    ));
    assert!(e.contains("layers[0].type") && e.contains("Flatten"), "{e}");
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"conv2d\"\nname = \"c\"\nout_channels = 1\nkernel = [9, 3]\n"
    ));
    assert!(e.contains("layers[0].kernel"), "{e}");
    assert!(matches!(
        ModelSpec::by_name("resnet", [1, 28, 28], 10),
        Err(NnError::UnknownModel { .. })
    ));
    let stage = |body: &str| {
        err(&format!(
            "{head}[[layers]]\ntype = \"stage\"\nname = \"layer1\"\n{body}\n[[layers]]\ntype = \"globalavgpool\"\n[[layers]]\ntype = \"linear\"\nname = \"fc\"\nout_features = 3\n"
        ))
    };
    let e = stage("blocks = 0\nout_channels = 4");
    assert!(e.contains("layers[0].blocks"), "{e}");
    let e = stage("blocks = 1\nout_channels = 6\nnorm = \"group\"\ngroups = 4");
    assert!(e.contains("layers[0].groups"), "{e}");
    let e = stage("blocks = 1\nout_channels = 4\ngroups = 2");
    assert!(e.contains("layers[0].groups") && e.contains("group"), "{e}");
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"globalavgpool\"\n"
    ));
    assert!(e.contains("layers[1].type") && e.contains("vector"), "{e}");
    // Sizes from a typo: an error naming the layer, not an overflow or an allocation abort.
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nname = \"f\"\nout_features = 10000000000000\n"
    ));
    assert!(e.contains("layers[1]") && e.contains("f.weight"), "{e}");
    let e = err(&format!(
        "{head}[[layers]]\ntype = \"conv2d\"\nname = \"c\"\nout_channels = 4611686018427387904\nkernel = [3, 3]\n"
    ));
    assert!(e.contains("layers[0]") && e.contains("values"), "{e}");
    let e = err(
        "name = \"x\"\ninput = [65536, 65536, 65536]\nclasses = 3\n[[layers]]\ntype = \"flatten\"\n",
    );
    assert!(e.contains("input") && e.contains("values"), "{e}");
    assert!(matches!(
        ModelSpec::by_name("resnet20-bn", [3, 32, 32], 10),
        Err(NnError::UnknownModel { .. })
    ));
}

fn train(spec: &ModelSpec, threads: usize, steps: u64) -> Model {
    let mut model = Model::new(spec, 42).unwrap();
    let mut trainer = Trainer::new(spec, 8).unwrap();
    trainer.set_threads(threads);
    for step in 0..steps {
        let (x, y) = batch(spec, 8, step);
        trainer
            .train_step(&mut model, &x, &y, &SGD, BnPolicy::Train, 1000 + step, None)
            .unwrap();
    }
    model
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn same_seed_bit_identical_whatever_the_threads() {
    // cifar-cnn-bn exercises augmentation (crop + flip), LRN and BatchNorm buffers.
    // resnet20 exercises residual joins (an input with two readers) and projections.
    for name in ["cifar-cnn-bn", "mnist-cnn", "resnet20"] {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let a = train(&spec, 1, 3);
        let b = train(&spec, 1, 3);
        let c = train(&spec, 2, 3);
        assert_eq!(bits(a.params()), bits(b.params()), "{name}: same seed");
        assert_eq!(
            bits(a.buffers()),
            bits(b.buffers()),
            "{name}: same seed buffers"
        );
        assert_eq!(bits(a.params()), bits(c.params()), "{name}: 1 vs 2 threads");
        assert_eq!(
            bits(a.buffers()),
            bits(c.buffers()),
            "{name}: 1 vs 2 threads buffers"
        );
        let fresh = Model::new(&spec, 42).unwrap();
        assert_ne!(
            bits(a.params()),
            bits(fresh.params()),
            "{name}: training moved the weights"
        );
    }
}

#[test]
fn batchnorm_trap_train_vs_frozen() {
    let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
    let frozen_sgd = SgdConfig {
        lr: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let (x, y) = batch(&spec, 8, 1);
    let mut trainer = Trainer::new(&spec, 8).unwrap();

    // The trap: no parameter moves (lr 0), yet train-mode BN rewrites the running statistics.
    let mut model = Model::new(&spec, 0).unwrap();
    let before = model.clone();
    trainer
        .train_step(&mut model, &x, &y, &frozen_sgd, BnPolicy::Train, 0, None)
        .unwrap();
    assert_eq!(bits(model.params()), bits(before.params()));
    assert_ne!(bits(model.buffers()), bits(before.buffers()));
    assert_eq!(model.tensor("bn1.num_batches_tracked").unwrap(), &[1.0]);
    let eval_before = trainer.evaluate(&before, &x, &y).unwrap();
    let eval_after = trainer.evaluate(&model, &x, &y).unwrap();
    assert_ne!(eval_before.loss_sum, eval_after.loss_sum);

    // Frozen: buffers bit-identical after several steps, even while the weights learn...
    let mut model = Model::new(&spec, 0).unwrap();
    for step in 0..3 {
        trainer
            .train_step(&mut model, &x, &y, &SGD, BnPolicy::Frozen, step, None)
            .unwrap();
    }
    assert_eq!(bits(model.buffers()), bits(before.buffers()));
    assert_ne!(bits(model.params()), bits(before.params()));
    // ...and with lr 0 the eval outputs before and after match exactly.
    let mut model = Model::new(&spec, 0).unwrap();
    for step in 0..3 {
        trainer
            .train_step(
                &mut model,
                &x,
                &y,
                &frozen_sgd,
                BnPolicy::Frozen,
                step,
                None,
            )
            .unwrap();
    }
    let eval_frozen = trainer.evaluate(&model, &x, &y).unwrap();
    assert_eq!(eval_frozen, eval_before);

    // Local trains like Train inside the engine.
    let mut a = Model::new(&spec, 0).unwrap();
    let mut b = Model::new(&spec, 0).unwrap();
    trainer.reset_optimizer();
    trainer
        .train_step(&mut a, &x, &y, &SGD, BnPolicy::Train, 5, None)
        .unwrap();
    trainer.reset_optimizer();
    trainer
        .train_step(&mut b, &x, &y, &SGD, BnPolicy::Local, 5, None)
        .unwrap();
    assert_eq!(bits(a.params()), bits(b.params()));
    assert_eq!(bits(a.buffers()), bits(b.buffers()));
}

/// Per-layer frozen statistics: the named BatchNorm layers keep their running statistics bit for bit
/// and normalise with them, the others keep training theirs; an unknown name is an error.
#[test]
fn batchnorm_statistics_frozen_per_layer() {
    let spec = ModelSpec::by_name("resnet20", [3, 8, 8], 10).unwrap();
    let (x, y) = batch(&spec, 6, 3);
    let frozen = ["bn1", "layer1.0.bn2", "layer2.0.downsample.1"].map(String::from);
    let run = |frozen: &[String]| {
        let mut model = Model::new(&spec, 5).unwrap();
        let mut trainer = Trainer::new(&spec, 6).unwrap();
        trainer.set_frozen_statistics(frozen).unwrap();
        let loss = trainer
            .loss_and_grad(&mut model, &x, &y, BnPolicy::Train, 1)
            .unwrap()
            .loss;
        for step in 0..2 {
            trainer
                .train_step(&mut model, &x, &y, &SGD, BnPolicy::Train, step, None)
                .unwrap();
        }
        (model, loss)
    };
    let fresh = Model::new(&spec, 5).unwrap();
    let (model, loss_frozen) = run(&frozen);
    let (_, loss_all) = run(&[]);
    for t in model
        .tensors()
        .iter()
        .filter(|t| t.kind == TensorKind::Buffer)
    {
        let layer = t.name.rsplit_once('.').unwrap().0;
        let same = model.tensor(&t.name).unwrap() == fresh.tensor(&t.name).unwrap();
        assert_eq!(same, frozen.iter().any(|f| f == layer), "{}", t.name);
    }
    // Stored statistics (mean 0, variance 1) normalise differently from the batch's.
    assert_ne!(loss_frozen, loss_all);
    let mut trainer = Trainer::new(&spec, 6).unwrap();
    for bad in ["conv1", "layer1.0.bn3"] {
        let e = trainer
            .set_frozen_statistics(&[bad.to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(bad) && e.contains("BatchNorm"), "{e}");
    }
}

#[test]
fn sgd_matches_pytorch_semantics_and_hook_applies() {
    let spec = ModelSpec::by_name("logreg", [1, 28, 28], 10).unwrap();
    let (x, y) = batch(&spec, 6, 3);
    let mut model = Model::new(&spec, 1).unwrap();
    let w0 = model.params().to_vec();
    let mut trainer = Trainer::new(&spec, 6).unwrap();
    let mut probe = model.clone();
    trainer
        .loss_and_grad(&mut probe, &x, &y, BnPolicy::Train, 0)
        .unwrap();
    let g0 = trainer.grads().to_vec();
    trainer
        .train_step(&mut model, &x, &y, &SGD, BnPolicy::Train, 0, None)
        .unwrap();
    // Step 1: buf = g + wd*w; w -= lr*buf.
    let buf1: Vec<f32> = g0
        .iter()
        .zip(&w0)
        .map(|(g, w)| g + SGD.weight_decay * w)
        .collect();
    for i in 0..w0.len() {
        assert_eq!(model.params()[i], w0[i] - SGD.lr * buf1[i]);
    }
    let w1 = model.params().to_vec();
    let mut probe = model.clone();
    trainer
        .loss_and_grad(&mut probe, &x, &y, BnPolicy::Train, 0)
        .unwrap();
    let g1 = trainer.grads().to_vec();
    trainer
        .train_step(&mut model, &x, &y, &SGD, BnPolicy::Train, 0, None)
        .unwrap();
    for i in 0..w0.len() {
        let b = SGD.momentum * buf1[i] + (g1[i] + SGD.weight_decay * w1[i]);
        assert_eq!(model.params()[i], w1[i] - SGD.lr * b);
    }

    // The correction hook sees the parameters and changes the gradient before the update.
    struct Prox {
        anchor: Vec<f32>,
        mu: f32,
    }
    impl GradCorrection for Prox {
        fn correct(&self, params: &[f32], grads: &mut [f32]) {
            for ((g, w), a) in grads.iter_mut().zip(params).zip(&self.anchor) {
                *g += self.mu * (w - a);
            }
        }
    }
    let plain = SgdConfig {
        lr: 0.1,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let anchor = vec![0.5; w0.len()];
    let prox = Prox {
        anchor: anchor.clone(),
        mu: 0.3,
    };
    let mut m = Model::new(&spec, 1).unwrap();
    trainer
        .train_step(&mut m, &x, &y, &plain, BnPolicy::Train, 0, Some(&prox))
        .unwrap();
    for i in 0..w0.len() {
        let g = g0[i] + 0.3 * (w0[i] - anchor[i]);
        assert_eq!(m.params()[i], w0[i] - 0.1 * g);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let spec = ModelSpec::by_name("mlp", [1, 28, 28], 10).unwrap();
    let mut model = Model::new(&spec, 0).unwrap();
    let mut trainer = Trainer::new(&spec, 4).unwrap();
    let (x, y) = batch(&spec, 4, 0);
    let step = |t: &mut Trainer, m: &mut Model, x: &[f32], y: &[u16]| {
        t.train_step(m, x, y, &SGD, BnPolicy::Train, 0, None)
    };
    assert!(matches!(
        step(&mut trainer, &mut model, &x[1..], &y),
        Err(NnError::Shape { .. })
    ));
    let mut bad_y = y.clone();
    bad_y[2] = 10;
    assert!(matches!(
        step(&mut trainer, &mut model, &x, &bad_y),
        Err(NnError::Label {
            index: 2,
            label: 10,
            ..
        })
    ));
    let (x8, y8) = batch(&spec, 8, 0);
    assert!(matches!(
        step(&mut trainer, &mut model, &x8, &y8),
        Err(NnError::BatchTooLarge { .. })
    ));
    // Evaluation batches internally: any count is fine.
    assert_eq!(trainer.evaluate(&model, &x8, &y8).unwrap().count, 8);
    let mut nan_x = x.clone();
    nan_x[5] = f32::NAN;
    let before = model.params().to_vec();
    assert!(matches!(
        step(&mut trainer, &mut model, &nan_x, &y),
        Err(NnError::NonFinite { .. })
    ));
    assert_eq!(
        bits(model.params()),
        bits(&before),
        "a failed step leaves the model untouched"
    );
    model.params_mut()[0] = f32::INFINITY;
    assert!(matches!(
        step(&mut trainer, &mut model, &x, &y),
        Err(NnError::NonFinite { .. })
    ));
    let bad_lr = SgdConfig {
        lr: f32::NAN,
        ..SGD
    };
    let mut ok = Model::new(&spec, 0).unwrap();
    let e = trainer
        .train_step(&mut ok, &x, &y, &bad_lr, BnPolicy::Train, 0, None)
        .unwrap_err();
    assert!(e.to_string().contains("lr"), "{e}");
    let other = Model::new(&ModelSpec::by_name("logreg", [1, 28, 28], 10).unwrap(), 0).unwrap();
    assert!(matches!(
        trainer.evaluate(&other, &x, &y),
        Err(NnError::SpecMismatch { .. })
    ));
}

/// A batch whose buffers cannot be had is an error naming the batch, where `vec!` aborted the
/// process ("memory allocation of N bytes failed"). 2^36 examples of mnist-cnn ask for petabytes,
/// beyond any x86-64 address space whatever the overcommit policy, so the allocation fails on
/// every machine; 2^62 overflows the size computation itself.
#[test]
fn a_batch_too_big_for_memory_is_an_error_not_an_abort() {
    for (name, input) in [("mnist-cnn", [1, 28, 28]), ("resnet20-gn", [3, 32, 32])] {
        let spec = ModelSpec::by_name(name, input, 10).unwrap();
        for batch in [1usize << 36, 1 << 62] {
            let Err(e) = Trainer::new(&spec, batch) else {
                panic!("a trainer for {batch} examples");
            };
            assert!(
                matches!(e, NnError::OutOfMemory { batch: b, .. } if b == batch),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("batches of {batch} examples")),
                "{msg}"
            );
            assert!(msg.contains("smaller batches"), "{msg}");
        }
    }
}

/// The same model gives the same file bytes however often it is saved: the header's metadata
/// comes from a `HashMap`, whose order differs between instances and processes, so fedra sorts
/// it (weights equal in two runs then mean files equal, and a checksum can say so).
#[test]
fn safetensors_bytes_are_deterministic_with_sorted_metadata() {
    let spec = ModelSpec::by_name("mnist-cnn-bn", [1, 28, 28], 10).unwrap();
    let model = Model::new(&spec, 3).unwrap();
    let first = model.to_safetensors_bytes().unwrap();
    for _ in 0..12 {
        assert!(model.to_safetensors_bytes().unwrap() == first);
    }
    let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
    assert!(
        header.starts_with(r#"{"__metadata__":{"fedra.buffers":"#),
        "{}",
        &header[..80]
    );
    let (fmt, model_key) = (
        header.find(r#""format":"pt""#).unwrap(),
        header.find(r#""fedra.model":"mnist-cnn-bn""#).unwrap(),
    );
    assert!(model_key < fmt, "{}", &header[..200]);
}

#[test]
fn safetensors_round_trip_and_errors() {
    let spec = ModelSpec::by_name("kws-cnn-bn", [1, 49, 10], 12).unwrap();
    let mut model = train(&spec, 1, 2);
    model.buffers_mut()[0] += 0.25;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    model.save_safetensors(&path).unwrap();
    let back = Model::load_safetensors(&spec, &path).unwrap();
    assert_eq!(bits(back.params()), bits(model.params()));
    assert_eq!(bits(back.buffers()), bits(model.buffers()));
    assert_eq!(back.tensor("bn1.num_batches_tracked").unwrap(), &[2.0]);

    // Rewrite the file with one tensor changed and check the error names file and tensor.
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |drop: &str, replace: Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>| {
        let mut owned = Vec::new();
        for (name, view) in file.tensors() {
            if name == drop {
                if let Some((d, s, b)) = &replace {
                    owned.push((name.clone(), *d, s.clone(), b.clone()));
                }
                continue;
            }
            owned.push((
                name.clone(),
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
        let views: Vec<_> = owned
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let p = dir
            .path()
            .join(format!("bad-{}.safetensors", drop.replace('.', "_")));
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        p
    };
    let check = |p: &std::path::Path, tensor: &str, what: &str| {
        let e = Model::load_safetensors(&spec, p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains(tensor) && e.contains(what),
            "{e}"
        );
    };
    check(&rewrite("conv2.bias", None), "conv2.bias", "missing");
    check(
        &rewrite(
            "fc1.bias",
            Some((safetensors::Dtype::F32, vec![127], vec![0; 127 * 4])),
        ),
        "fc1.bias",
        "shape",
    );
    check(
        &rewrite(
            "fc2.weight",
            Some((
                safetensors::Dtype::F64,
                vec![12, 128],
                vec![0; 12 * 128 * 8],
            )),
        ),
        "fc2.weight",
        "dtype",
    );
    let mut nan = vec![0u8; 127 * 4];
    nan[5 * 4..6 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
    check(
        &rewrite(
            "fc1.bias",
            Some((
                safetensors::Dtype::F32,
                vec![128],
                [nan, vec![0; 4]].concat(),
            )),
        ),
        "fc1.bias",
        "value 5 is NaN",
    );
    let truncated = dir.path().join("trunc.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load_safetensors(&spec, &truncated)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trunc.safetensors"), "{e}");
    let missing = Model::load_safetensors(&spec, &dir.path().join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, NnError::Io { .. }));
}

/// A correction hook that changes nothing: it only makes `train_step` take the unfused path.
struct Noop;
impl GradCorrection for Noop {
    fn correct(&self, _params: &[f32], _grads: &mut [f32]) {}
}

#[test]
fn layerwise_sgd_equals_update_after_backward() {
    // Without a hook, train_step updates each layer inside backward; with one (here a no-op) it
    // updates after the whole backward. Both must give the same bits, gradients included.
    for name in ["mnist-cnn-bn", "cifar-cnn-gn", "kws-cnn"] {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let mut a = Model::new(&spec, 7).unwrap();
        let mut b = a.clone();
        let mut ta = Trainer::new(&spec, 4).unwrap();
        let mut tb = Trainer::new(&spec, 4).unwrap();
        for step in 0..3 {
            let (x, y) = batch(&spec, 4, step);
            let sa = ta
                .train_step(&mut a, &x, &y, &SGD, BnPolicy::Train, step, None)
                .unwrap();
            let sb = tb
                .train_step(&mut b, &x, &y, &SGD, BnPolicy::Train, step, Some(&Noop))
                .unwrap();
            assert_eq!(sa, sb, "{name} step {step}: stats");
            assert_eq!(bits(ta.grads()), bits(tb.grads()), "{name} step {step}");
            assert_eq!(bits(a.params()), bits(b.params()), "{name} step {step}");
        }
    }
}

#[test]
fn plain_sgd_fuses_the_linear_update_into_its_gemm() {
    // With plain SGD and no hook, linear weights are updated inside the weight-gradient GEMM
    // (one fused multiply-add per weight); with a hook, the gradient is formed first and then
    // subtracted. Every other tensor goes through the same code, so after one step it is
    // bit-identical; linear weights differ by at most the rounding of one product.
    let plain = SgdConfig {
        lr: 0.05,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    for name in ["mnist-cnn", "cifar-cnn", "mlp"] {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let mut a = Model::new(&spec, 3).unwrap();
        let mut b = a.clone();
        let mut ta = Trainer::new(&spec, 8).unwrap();
        let mut tb = Trainer::new(&spec, 8).unwrap();
        let linear_weights = a
            .tensors()
            .iter()
            .filter(|t| t.shape.len() == 2 && t.name.ends_with(".weight"))
            .count();
        assert!(linear_weights > 0, "{name}");
        let before = a.clone();
        for step in 0..4 {
            let (x, y) = batch(&spec, 8, step);
            let sa = ta
                .train_step(&mut a, &x, &y, &plain, BnPolicy::Train, step, None)
                .unwrap();
            let sb = tb
                .train_step(&mut b, &x, &y, &plain, BnPolicy::Train, step, Some(&Noop))
                .unwrap();
            if step == 0 {
                assert_eq!(sa, sb, "{name}: first step's stats");
            }
            for t in a.tensors() {
                let (va, vb) = (a.tensor(&t.name).unwrap(), b.tensor(&t.name).unwrap());
                let is_linear_weight = t.shape.len() == 2 && t.name.ends_with(".weight");
                if step == 0 && !is_linear_weight {
                    assert_eq!(bits(va), bits(vb), "{name} {}", t.name);
                    continue;
                }
                let moved = before.tensor(&t.name).unwrap();
                let tol = if step == 0 { 1e-7 } else { 1e-5 };
                for ((x, y), w0) in va.iter().zip(vb).zip(moved) {
                    assert!(
                        (x - y).abs() <= tol * (1.0 + w0.abs()),
                        "{name} step {step} {}: {x} vs {y}",
                        t.name
                    );
                }
                if is_linear_weight {
                    assert_ne!(bits(va), bits(moved), "{name} {} did not train", t.name);
                }
            }
        }
    }
}

#[test]
fn evaluation_is_the_same_whatever_the_threads() {
    // Evaluation on two GEMM threads gives the same bits as on one, and equals the sum of its
    // batches taken in order (11 examples in batches of 4: a short last batch), so splitting
    // evaluation differently later can be checked against this.
    for name in ["cifar-cnn-bn", "mnist-cnn"] {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let model = train(&spec, 1, 2);
        let (x, y) = batch(&spec, 11, 99);
        let mut one = Trainer::new(&spec, 4).unwrap();
        let mut two = Trainer::new(&spec, 4).unwrap();
        two.set_threads(2);
        let a = one.evaluate(&model, &x, &y).unwrap();
        let b = two.evaluate(&model, &x, &y).unwrap();
        assert_eq!(a.count, 11, "{name}");
        assert_eq!(a, b, "{name}: 1 vs 2 threads");
        assert_eq!(a.loss_sum.to_bits(), b.loss_sum.to_bits(), "{name}");
        // The same again (the workspace is reused) and batch by batch.
        assert_eq!(two.evaluate(&model, &x, &y).unwrap(), a, "{name}: repeat");
        let mut sum = 0f64;
        for k in 0..3 {
            let (lo, hi) = (k * 4, ((k + 1) * 4).min(11));
            let row = x.len() / 11;
            sum += one
                .evaluate(&model, &x[lo * row..hi * row], &y[lo..hi])
                .unwrap()
                .loss_sum;
        }
        assert_eq!(sum.to_bits(), a.loss_sum.to_bits(), "{name}: per batch");
    }
}

#[test]
fn frozen_parameters_take_no_step_and_the_others_the_usual_one() {
    // One step with conv1 frozen: conv1 keeps its bits (no update, momentum or weight decay)
    // and every other parameter equals the unfrozen step's (a first step's gradients of later
    // layers do not depend on whether conv1 moves). Further steps keep conv1 fixed.
    for name in ["mnist-cnn-bn", "cifar-cnn"] {
        let spec = ModelSpec::by_name(name, input_of(name), 10).unwrap();
        let start = Model::new(&spec, 3).unwrap();
        let conv1: Vec<std::ops::Range<usize>> = start
            .tensors()
            .iter()
            .filter(|t| t.name.starts_with("conv1."))
            .map(|t| t.offset..t.offset + t.len)
            .collect();
        let (x, y) = batch(&spec, 4, 1);
        let mut free = start.clone();
        Trainer::new(&spec, 4)
            .unwrap()
            .train_step(&mut free, &x, &y, &SGD, BnPolicy::Train, 1, None)
            .unwrap();
        let mut part = start.clone();
        let mut trainer = Trainer::new(&spec, 4).unwrap();
        trainer.set_frozen(conv1.clone());
        trainer
            .train_step(&mut part, &x, &y, &SGD, BnPolicy::Train, 1, None)
            .unwrap();
        let end = conv1.iter().map(|r| r.end).max().unwrap();
        assert_eq!(conv1.iter().map(|r| r.start).min(), Some(0), "{name}");
        assert_eq!(
            bits(&part.params()[..end]),
            bits(&start.params()[..end]),
            "{name}"
        );
        assert_eq!(
            bits(&part.params()[end..]),
            bits(&free.params()[end..]),
            "{name}"
        );
        assert_ne!(
            bits(&free.params()[..end]),
            bits(&start.params()[..end]),
            "{name}"
        );
        for step in 2..4 {
            let (x, y) = batch(&spec, 4, step);
            trainer
                .train_step(&mut part, &x, &y, &SGD, BnPolicy::Train, step, None)
                .unwrap();
        }
        assert_eq!(
            bits(&part.params()[..end]),
            bits(&start.params()[..end]),
            "{name}"
        );
    }
}

#[test]
fn strict_load_lists_every_problem_and_keeping_loads_a_new_head() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::by_name("mlp", [1, 28, 28], 10).unwrap();
    let other = ModelSpec::by_name("mnist-cnn", [1, 28, 28], 12).unwrap();
    let path = dir.path().join("other.safetensors");
    Model::new(&other, 1)
        .unwrap()
        .save_safetensors(&path)
        .unwrap();
    let e = Model::load_safetensors(&spec, &path)
        .unwrap_err()
        .to_string();
    // mlp has fc1..fc3; the file has conv1, conv2, fc1 (of another shape) and fc2.
    for part in [
        "missing: fc3.weight, fc3.bias",
        "unexpected",
        "conv1.weight",
        "conv2.bias",
        "wrong shape: fc1.weight is [512, 3136] in the file, [200, 784] in the model",
        "fc2.weight is [12, 512] in the file, [200, 200] in the model",
    ] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }

    // A head of another size: everything but fc2 from the file, fc2 as `base` had it.
    let spec10 = ModelSpec::by_name("mnist-cnn", [1, 28, 28], 10).unwrap();
    let pretrained = Model::new(&other, 1).unwrap();
    let base = Model::new(&spec10, 2).unwrap();
    let loaded =
        Model::load_safetensors_keeping(&path, base.clone(), &|n| n.starts_with("fc2.")).unwrap();
    assert_eq!(
        bits(loaded.tensor("conv2.weight").unwrap()),
        bits(pretrained.tensor("conv2.weight").unwrap())
    );
    assert_eq!(
        bits(loaded.tensor("fc2.weight").unwrap()),
        bits(base.tensor("fc2.weight").unwrap())
    );
}
