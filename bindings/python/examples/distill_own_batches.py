"""Train a teacher, then distil a student from it, on batches this script makes itself.

The recipes choose the models, optimizer, schedule and distillation; the batches (28x28
images and labels) come from `batch` below, not from a data set. Usage:
    python distill_own_batches.py OUT_DIR [FASHION_MNIST_DIR]
"""
import sys

import numpy as np

import recycle


def recipe(name, out_dir, data_dir=None, teacher=None):
    r = {
        "name": name, "out_dir": out_dir, "seed": 3,
        "model": {"kind": "resnet", "width": 0.0625},
        "data": {"dataset": "fashion-mnist", "train_limit": 192, "eval_limit": 64},
        "train": {"batch_size": 16, "samples": 96, "evals": 1},
        "optimizer": {"kind": "sgdw", "lr": 0.1, "warmup": 0.2},
    }
    if data_dir:
        r["data"]["dir"] = data_dir
    if teacher:
        r["distill"] = {"teachers": [teacher], "temperature": 2.0, "weight": 0.7}
    return r


def batch(step, n=16):
    """Batch `step`: labels (3 step + i) mod 10, pixels from a fixed integer pattern."""
    y = (3 * step + np.arange(n)) % 10
    j, i = np.arange(784)[None, :], np.arange(n)[:, None]
    v = (j * 31 + i * 13 + step * 7 + y[:, None] * 97) % 251
    return (v.astype(np.float32) / np.float32(250)).reshape(n, 1, 28, 28), y.astype(np.int32)


def train(r, first_batch=0):
    t = recycle.Trainer(r, overwrite=True)
    steps = [t.step(*batch(first_batch + s)) for s in range(t.metrics["total_steps"])]
    return t, steps


def main(out_dir, data_dir=None):
    teacher, _ = train(recipe("teacher", out_dir, data_dir), first_batch=100)
    teacher.finish()
    student, steps = train(recipe("student", out_dir, data_dir, teacher=f"{out_dir}/teacher"))
    student.save(f"{out_dir}/python.safetensors")
    print("held-out batch:", student.evaluate(*batch(1000, 64)))
    return steps, student.finish()


if __name__ == "__main__":
    steps, summary = main(*sys.argv[1:3])
    for s in steps:
        print(f"step {s['step']}: loss {s['loss']:.4f} (ce {s['ce']:.4f}, kd {s['kd']:.4f})")
    print("final accuracy", summary["final_eval"])
