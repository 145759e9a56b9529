#!/usr/bin/env python3
"""An independent PyTorch check of where keyword spotting tops out on the 1,600-clip subset.

fedra's KWS runs on `../shared/datasets/speech_commands_subset` stop near 55% test accuracy where
the study (full dataset) reaches 86%. This script trains the same Hello-Edge CNN with PyTorch on
features and splits computed here, without fedra, so that a fedra bug would show as a difference:

- MFCC with librosa + scipy, the definition of crates/data/src/mfcc.rs (as in
  crates/data/fixtures/make_mfcc_fixture.py, which checks fedra against librosa);
- the split: `speakers` is fedra's speaker split (speakers ordered by SHA-256 of
  `fedra-speaker-split/<speaker>`, taken into test until it holds at least 20% of the clips);
  `clips` puts every fifth clip of each keyword (after a seeded shuffle) in test, so speakers
  appear on both sides;
- `--train-fraction F` keeps only the first training speakers (same order) holding F of the
  training clips: accuracy rising with F means the data, not the training, sets the ceiling;
- standardised per coefficient with the training clips' mean and standard deviation;
- centralised SGD like fedra's `table1-kws-sgd` B = 10 row: batch 100, one epoch per round,
  lr 0.05 x 0.992^round, plain SGD, PyTorch's default initialisation.

    python3 results/table1-kws/torch_check.py ../shared/datasets/speech_commands_subset \
        [--split speakers|clips] [--train-fraction 1.0] [--rounds 500] [--seed 0]
"""

import argparse
import hashlib
import math
import os
import sys

import librosa
import numpy as np
import scipy.fft
import scipy.io.wavfile
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(HERE, "..", "..", "crates", "nn", "fixtures"))
import torch_models  # noqa: E402

KEYWORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def mfcc(x):
    x = np.concatenate([np.zeros(16), x])
    mel = librosa.feature.melspectrogram(
        y=x, sr=16000, n_fft=512, hop_length=320, win_length=480, window="hann",
        center=False, power=2.0, n_mels=40, fmin=20.0, fmax=4000.0, htk=True, norm=None,
        dtype=np.float64,
    )
    cep = scipy.fft.dct(np.log(mel + 1e-6), type=2, norm="ortho", axis=0)[:10]
    return cep.T  # (49 frames, 10 coefficients)


def speaker(name):
    return name.split("_nohash_")[0]


def speakers_in_order(names):
    counts = {}
    for n in names:
        counts[speaker(n)] = counts.get(speaker(n), 0) + 1
    order = sorted(counts, key=lambda s: (hashlib.sha256(f"fedra-speaker-split/{s}".encode()).digest(), s))
    return order, counts


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--split", choices=["speakers", "clips"], default="speakers")
    p.add_argument("--train-fraction", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    names, labels, feats = [], [], []
    for label, word in enumerate(KEYWORDS):
        for f in sorted(os.listdir(os.path.join(args.folder, word))):
            if not f.endswith(".wav"):
                continue
            rate, data = scipy.io.wavfile.read(os.path.join(args.folder, word, f))
            assert rate == 16000 and data.dtype == np.int16, f
            x = data.astype(np.float64) / 32768.0
            x = np.pad(x[:16000], (0, max(0, 16000 - len(x))))
            names.append(f)
            labels.append(label)
            feats.append(mfcc(x).astype(np.float32))
    n = len(names)
    labels = np.array(labels)
    feats = np.stack(feats)

    if args.split == "speakers":
        order, counts = speakers_in_order(names)
        want = math.ceil(n * 20 / 100)
        test_speakers, held = set(), 0
        for s in order:
            if held >= want:
                break
            test_speakers.add(s)
            held += counts[s]
        is_test = np.array([speaker(f) in test_speakers for f in names])
        train_order = [s for s in order if s not in test_speakers]
    else:
        rng = np.random.default_rng(args.seed)
        is_test = np.zeros(n, dtype=bool)
        for c in range(len(KEYWORDS)):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            is_test[idx[::5]] = True
        train_order = None
    train_idx = np.flatnonzero(~is_test)
    if args.train_fraction < 1.0:
        if train_order is None:
            sys.exit("--train-fraction needs --split speakers")
        _, counts = speakers_in_order([names[i] for i in train_idx])
        keep, held = set(), 0
        for s in train_order:
            if held >= args.train_fraction * len(train_idx):
                break
            keep.add(s)
            held += counts[s]
        train_idx = np.array([i for i in train_idx if speaker(names[i]) in keep])
    test_idx = np.flatnonzero(is_test)
    print(f"{args.split} split: {len(train_idx)} train / {len(test_idx)} test clips; test per keyword "
          f"{np.bincount(labels[test_idx], minlength=10).tolist()}")

    frames = feats[train_idx].reshape(-1, 10).astype(np.float64)
    mean, std = frames.mean(0), frames.std(0)
    norm = ((feats - mean) / std).astype(np.float32)
    x_train = torch.from_numpy(norm[train_idx]).unsqueeze(1)
    y_train = torch.from_numpy(labels[train_idx])
    x_test = torch.from_numpy(norm[test_idx]).unsqueeze(1)
    y_test = torch.from_numpy(labels[test_idx])

    torch.manual_seed(args.seed)
    model = torch_models.KwsCnn()
    gen = torch.Generator().manual_seed(args.seed)
    best = (0.0, 0)
    for rnd in range(1, args.rounds + 1):
        lr = 0.05 * 0.992 ** (rnd - 1)
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for start in range(0, len(perm), 100):
            b = perm[start:start + 100]
            loss = F.cross_entropy(model(x_train[b]), y_train[b])
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for prm in model.parameters():
                    prm -= lr * prm.grad
            total += loss.item() * len(b)
        if rnd % 50 == 0 or rnd == args.rounds:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
                train_acc = (model(x_train).argmax(1) == y_train).float().mean().item() * 100
            best = max(best, (acc, rnd))
            print(f"round {rnd:4d}  lr {lr:.5f}  train loss {total / len(y_train):.4f}  "
                  f"train acc {train_acc:6.2f}%  test acc {acc:6.2f}%", flush=True)
    print(f"final test accuracy {acc:.2f}% (best {best[0]:.2f}% at round {best[1]})")


if __name__ == "__main__":
    main()
