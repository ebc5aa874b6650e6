#!/usr/bin/env python3
"""RandomOne on several ranks: one teacher drawn per step for the whole global batch (the
default, `random-one`) against one drawn per rank for its shard (`random-one-per-rank`: an
ensemble across the global batch at the cost of one teacher forward per rank).

Takes a RandomOne student's recipe (the demo writes one, e.g. `runs/demo-q-img/
kd-random-one-.../recipe.toml`) and its baseline's, and for every seed trains on `--ranks`
processes under mpirun, one run after the other so that the machine's load falls on all of
them alike: the baseline, the shared draw and the per-rank draw. A teacher cache in the recipe
is dropped (a cache holds whole batches, not a rank's shard). Prints each run's final test and
validation accuracy, train seconds and teacher forwards, and the mean over the seeds.

  python3 scripts/experiments/per_rank_teachers.py --out runs/per-rank \\
      --student runs/demo-q-img/kd-random-one-t1-w1-lrx0.5-e1/recipe.toml \\
      --baseline runs/demo-q-img/baseline-e1/recipe.toml --seeds 1,2,3 --epochs 2

Needs a recycle built with `--features mpi` (RECYCLE_BIN, default target/release/recycle) and
mpirun. Finished runs (a run directory holding summary.json) are kept and reused; their times
are in `times.json`. Each rank uses RAYON_NUM_THREADS threads (default 1).
"""
import argparse
import os
import re
import statistics
import sys

from cache_vs_online import Timer, train, variant
from samples_to_target import load


def set_strategy(text, strategy):
    """The recipe with its [distill] strategy replaced and its cache lines dropped."""
    text = re.sub(r"(?m)^(cache|cache_k|cache_values|cache_mode) = .*\n", "", text)
    text, n = re.subn(r'(?m)^strategy = ".*"$', f'strategy = "{strategy}"', text, count=1)
    if n != 1:
        sys.exit("--student recipe has no `strategy = ...` line: give a distilled student's recipe")
    return text


def set_epochs(text, epochs):
    text, n = re.subn(r"(?m)^epochs = .*$", f"epochs = {epochs}", text, count=1)
    if n != 1:
        sys.exit("recipe has no `epochs = ...` line in [train]")
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--student", required=True, help="a RandomOne student's recipe.toml")
    p.add_argument("--baseline", required=True, help="its baseline's recipe.toml")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=float, help="override the recipes' epochs")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    with open(a.student) as f:
        student = f.read()
    with open(a.baseline) as f:
        baseline = f.read()
    if a.epochs is not None:
        student, baseline = set_epochs(student, a.epochs), set_epochs(baseline, a.epochs)
    kinds = [
        ("baseline", baseline),
        ("shared draw", set_strategy(student, "random-one")),
        ("per-rank draw", set_strategy(student, "random-one-per-rank")),
    ]
    results = {kind: [] for kind, _ in kinds}
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    launcher = ["mpirun", "--oversubscribe", "-np", str(a.ranks), "-x", "RAYON_NUM_THREADS"]
    if os.geteuid() == 0:
        launcher.append("--allow-run-as-root")
    timer = Timer(out)
    for seed in [int(s) for s in a.seeds.split(",")]:
        for kind, text in kinds:
            name = f"{kind.split()[0]}-s{seed}"
            run = train(timer, out, name, variant(text, name, seed, out), launcher)
            summary, _ = load(run)
            results[kind].append((seed, summary))

    print(f"| {a.ranks} ranks | seed | test acc. | validation acc. | train s | teacher forwards |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, rows in results.items():
        for seed, s in rows:
            print(f"| {kind} | {seed} | {100 * s['final_eval']:.2f}% | "
                  f"{100 * s['final_validation']:.2f}% | {s['train_seconds']:.1f} | "
                  f"{s['teacher_forwards']} |")
    print()
    for kind, rows in results.items():
        test = [100 * s["final_eval"] for _, s in rows]
        val = [100 * s["final_validation"] for _, s in rows]
        print(f"{kind}: test {statistics.mean(test):.2f}% (min {min(test):.2f}, max {max(test):.2f}), "
              f"validation {statistics.mean(val):.2f}%")


if __name__ == "__main__":
    main()
