"""The per-step cost of the Python binding against the Rust Trainer fed the same batches:
BERT-tiny (masked language modelling) on a small and a large token batch.

Two trainers of the same recipe take turns in blocks of ten steps: one through
``recycle.Trainer.step_mlm`` on NumPy arrays (timed around the Python call), the other the
Rust ``Trainer`` itself through ``recycle._native.replay_steps`` (timed inside Rust around each
step, so the batch's construction counts against the binding only). The Rust side is a fresh
trainer each block, whose first four steps are left out, so that both sides are timed on a
trainer already under way. Prints the medians and their ratio; on a busy machine only the
ratio means anything.

Usage: python bindings/python/bench/step_overhead.py [STEPS]
"""
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import recycle
from recycle import _native


def fortunes(d):
    rng = np.random.default_rng(1)
    words = [f"w{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    entries = [" ".join(rng.choice(words, size=rng.integers(8, 30))) for _ in range(2400)]
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "generated"), "w") as f:
        f.write("".join(e + "\n%\n" for e in entries))


def main(steps=20, block=10, warm=4):
    out = tempfile.mkdtemp(prefix="recycle-py-overhead-")
    fortunes(os.path.join(out, "fortunes"))
    print("| batch | Rust Trainer (ms) | Python binding (ms) | Python / Rust |")
    print("|---|---|---|---|")
    for b, s in ((4, 32), (32, 128)):
        def recipe(name, n_steps):
            return {
                "name": name, "out_dir": out,
                "model": {"kind": "bert", "size": "tiny"},
                "data": {"dataset": "fortunes", "dir": os.path.join(out, "fortunes"),
                         "seq_len": s, "vocab_size": 1000, "eval_limit": 8},
                "train": {"batch_size": b, "samples": n_steps * b, "evals": 1},
                "optimizer": {"kind": "adamw", "lr": 1e-4},
            }
        n = b * s
        # Token ids below 305: the model's vocabulary is that of the tokenizer trained on the
        # generated text (512 words, so more than 305 tokens), which vocab_size only caps.
        ids = (5 + (np.arange(n) * 37) % 300).astype(np.int32).reshape(b, s)
        mask = np.ones((b, s), np.int32)
        labels = np.where(np.arange(n).reshape(b, s) % 7 == 3, ids, -100).astype(np.int32)
        trainer = recycle.Trainer(recipe(f"python-{b}x{s}", 2 * (steps + block)), overwrite=True)
        raw = [ids.tobytes(), mask.tobytes(), labels.tobytes()]
        rust_recipe = json.dumps(recipe(f"rust-{b}x{s}", 2 * (warm + block)))
        t_py, t_rust = [], []
        for i in range(0, steps + block, block):
            for _ in range(block):
                t0 = time.perf_counter()
                trainer.step_mlm(ids, mask, labels)
                t_py.append((time.perf_counter() - t0) * 1e3)
            replayed = _native.replay_steps(
                rust_recipe, True, "tokens", [raw] * (warm + block), [b, s],
                os.path.join(out, "r.st"),
            )
            t_rust += [r[4] * 1e3 for r in replayed[warm:]]
        py, rust = np.median(t_py[block:]), np.median(t_rust[block:])
        print(f"| {b} x {s} | {rust:.2f} | {py:.2f} | {py / rust:.3f} |")
        del trainer  # its run directory's lock goes with it
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
