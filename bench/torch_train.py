#!/usr/bin/env python3
"""PyTorch side of fedra's training benchmark: trains the same models as `fedra bench train` with
plain SGD on synthetic data and prints samples/s and GFLOP/s per model and batch size.

    python3 bench/torch_train.py [--models mnist-cnn,cifar-cnn,kws-cnn] [--batches 10,100]
                                 [--threads 1] [--repeats 3] [--json]

The models come from crates/nn/fixtures/torch_models.py, the same definitions the PyTorch fixtures
of fedra-nn's tests are generated with. FLOPs per sample = 3 x forward MACs x 2 (backward costs
about twice the forward; one MAC = 2 FLOPs), counted over conv and linear layers only; pooling,
normalisation and activations are not counted. The cifar-cnn model gets 24x24 inputs (the crop is
augmentation). With --repeats N each configuration is timed N times and the best run is reported,
because the machine may be shared.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.join(HERE, "..", "crates", "nn", "fixtures"))
import torch_models  # noqa: E402


def positive_ints(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def time_training(model_name, batch, samples, warmup_steps, seed):
    """Best-effort steady-state throughput of SGD steps (forward, backward, update) in samples/s."""
    torch.manual_seed(seed)
    model = torch_models.build(model_name)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    shape = torch_models.INPUTS[model_name]
    # A small pool of distinct synthetic batches, cycled, so no step sees cached inputs only.
    pool = [(torch.randn(batch, *shape), torch.randint(0, 10, (batch,))) for _ in range(4)]

    def step(i):
        x, y = pool[i % len(pool)]
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(warmup_steps):
        step(i)
    steps = max(1, -(-samples // batch))
    start = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{model_name} batch {batch}: loss became non-finite")
    return steps * batch / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist-cnn,cifar-cnn,kws-cnn",
                        help="comma-separated model names (%(default)s)")
    parser.add_argument("--batches", type=positive_ints, default=[10, 100],
                        help="comma-separated batch sizes (10,100)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (%(default)s)")
    parser.add_argument("--samples", type=int, default=3000,
                        help="examples per timed run, rounded up to whole batches (%(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (%(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the best is kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args()
    if args.threads <= 0 or args.samples <= 0 or args.repeats <= 0 or args.warmup < 0:
        parser.error("--threads, --samples and --repeats must be positive, --warmup non-negative")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in torch_models.INPUTS:
            parser.error(f"unknown model {m!r}; known: {', '.join(torch_models.INPUTS)}")

    torch.set_num_threads(args.threads)
    if not args.json:
        print(f"PyTorch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}; "
              "FLOPs/sample = 3 x forward MACs x 2")
        print(f"{'model':<14} {'batch':>5} {'threads':>7} {'clients':>7} {'samples/s':>10} {'GFLOP/s':>8}")
    for model_name in models:
        flops = 6 * torch_models.forward_macs(torch_models.build(model_name), torch_models.INPUTS[model_name])
        for batch in args.batches:
            best = max(time_training(model_name, batch, args.samples, args.warmup, seed=r)
                       for r in range(args.repeats))
            gflops = best * flops / 1e9
            if args.json:
                print(json.dumps({"model": model_name, "batch": batch, "threads": args.threads, "clients": 1,
                                  "samples_per_s": round(best, 1), "gflops": round(gflops, 2),
                                  "engine": "pytorch"}), flush=True)
            else:
                print(f"{model_name:<14} {batch:>5} {args.threads:>7} {1:>7} {best:>10.1f} {gflops:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
