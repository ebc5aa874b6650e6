#!/usr/bin/env python3
"""Distillation from a teacher cache against online distillation, at equal samples and in time.

Takes a student's recipe (the demo writes one per student, e.g. `runs/demo-long/kd-kl-.../
recipe.toml`) and its baseline's recipe, and for every seed trains, one after the other so that
the machine's load falls on all of them alike:

  - the baseline (no teacher);
  - the student distilled online (a teacher forward every step);
  - for every k: `recycle cache-teacher` builds the teacher's cache of the student's batches
    (top-k logits and the rest's log-sum-exp per row), then the student trains reading it
    (`cache_mode = "read"`: no teacher forward).

It prints the final accuracies (test and validation), the samples and CPU seconds at which each run
first reached each baseline's final test accuracy, each run's train and CPU seconds, and the
arithmetic of a sweep: N students from one cache (its build paid once) against N online
students. A cache is keyed by the seed (a seed draws its own batches), so each seed has its own.

  python3 scripts/experiments/cache_vs_online.py --out runs/cache-image \\
      --student runs/demo-long/kd-kl-t1-w1-lrx0.5-e8/recipe.toml \\
      --baseline runs/demo-long/baseline-e8/recipe.toml --k 1,5,10 --seeds 1,2

Finished runs are kept and reused (a run directory holding summary.json is not trained again,
a built cache is not rebuilt); their times are read back from `times.json`. The trainer binary
is target/release/recycle unless RECYCLE_BIN says otherwise.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

from samples_to_target import first_reaching, load

BIN = os.environ.get("RECYCLE_BIN", "target/release/recycle")


def variant(text, name, seed, out_dir, cache=None):
    """The recipe `text` with another name, seed and out_dir, and a [distill] cache if given."""
    for key, value in (("name", f'"{name}"'), ("seed", str(seed)), ("out_dir", f'"{out_dir}"')):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        if n != 1:
            sys.exit(f"recipe has no top-level `{key} = ...` line: give a recipe the trainer wrote")
    if cache is not None:
        if "[distill]" not in text:
            sys.exit("--student recipe has no [distill] section")
        text = re.sub(r"(?m)^(cache|cache_k|cache_values|cache_mode) = .*\n", "", text)
        text = text.replace(
            "[distill]\n",
            f'[distill]\ncache = "{cache["dir"]}"\ncache_k = {cache["k"]}\n'
            f'cache_mode = "{cache["mode"]}"\n',
            1,
        )
    return text


class Timer:
    """Wall and CPU seconds of the child processes run inside it, kept in times.json."""

    def __init__(self, out):
        self.path = os.path.join(out, "times.json")
        self.times = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.times = json.load(f)

    def run(self, label, argv):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.times[label] = {"wall": time.monotonic() - start, "cpu": cpu}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.times, f, indent=1)
        os.replace(tmp, self.path)


def train(timer, out, name, text, launcher=()):
    """Trains `text` as run `name` under `out` unless it has finished; `launcher` goes before
    the trainer's command line (e.g. `mpirun -np 2`)."""
    run_dir = os.path.join(out, name)
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        os.makedirs(os.path.join(out, "recipes"), exist_ok=True)
        path = os.path.join(out, "recipes", name + ".toml")
        with open(path, "w") as f:
            f.write(text)
        print(f"# training {name}", file=sys.stderr, flush=True)
        timer.run(name, [*launcher, BIN, "train", path, "--overwrite"])
    return run_dir


def build_cache(timer, out, name, text, epochs):
    label = "build-" + name
    if label not in timer.times:
        os.makedirs(os.path.join(out, "recipes"), exist_ok=True)
        path = os.path.join(out, "recipes", label + ".toml")
        with open(path, "w") as f:
            f.write(text)
        print(f"# building the cache of {name}", file=sys.stderr, flush=True)
        timer.run(label, [BIN, "cache-teacher", path, "--epochs", f"{epochs:g}"])
    return timer.times[label]


def epochs_of(text):
    m = re.search(r"(?m)^epochs = ([0-9.eE+-]+)$", text)
    if not m:
        sys.exit("recipe has no `epochs = ...` line in [train]")
    return float(m.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--student", required=True, help="a distilled student's recipe.toml")
    p.add_argument("--baseline", required=True, help="its baseline's recipe.toml")
    p.add_argument("--k", default="1,5,10", help="logits kept per cached row")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--sweep", type=int, default=4, help="students distilled from one cache")
    a = p.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    with open(a.student) as f:
        student = f.read()
    with open(a.baseline) as f:
        baseline = f.read()
    epochs = epochs_of(student)
    ks = [int(k) for k in a.k.split(",")]
    timer = Timer(out)

    runs = []  # (kind, k, seed, run_dir)
    builds = {}  # (k, seed) -> {"wall", "cpu"}
    for seed in [int(s) for s in a.seeds.split(",")]:
        name = f"baseline-s{seed}"
        runs.append(("baseline", None, seed, train(timer, out, name, variant(baseline, name, seed, out))))
        name = f"online-s{seed}"
        runs.append(("online", None, seed, train(timer, out, name, variant(student, name, seed, out))))
        for k in ks:
            cache = {"dir": os.path.join(out, f"cache-k{k}-s{seed}"), "k": k, "mode": "record"}
            name = f"cached-k{k}-s{seed}"
            builds[(k, seed)] = build_cache(timer, out, name,
                                            variant(student, name, seed, out, cache), epochs)
            cache["mode"] = "read"
            runs.append(("cached", k, seed,
                         train(timer, out, name, variant(student, name, seed, out, cache))))

    loaded = [(kind, k, seed, os.path.basename(d), *load(d)) for kind, k, seed, d in runs]
    n = a.sweep

    def cpu_to(name, summary, samples, k, seed):
        """CPU seconds of a run up to `samples`, pro rata of its whole run's CPU seconds (the
        clock of a shared machine moves with its load; CPU time far less), plus 1/N of its
        cache's build for a cached run: the build is paid once for a sweep of N students."""
        cpu = timer.times[name]["cpu"] * samples / summary["duration_samples"]
        if k is not None:
            cpu += builds[(k, seed)]["cpu"] / n
        return cpu

    targets = []
    for kind, k, seed, name, s, c in loaded:
        if kind == "baseline":
            smp, _ = first_reaching(c, s["final_eval"])
            targets.append((name, s["final_eval"], smp, cpu_to(name, s, smp, None, seed)))
    print("| run | final (test) | validation | teacher forwards | train s | CPU s | "
          + " | ".join(f"to {t}'s {v:.4f} ({smp} samples, {cpu:.0f} CPU s)"
                       for t, v, smp, cpu in targets) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(targets))
    for kind, k, seed, name, s, c in loaded:
        cells = []
        for _, v, bs, bcpu in targets:
            smp, _ = first_reaching(c, v)
            if smp is None:
                cells.append("—")
                continue
            cpu = cpu_to(name, s, smp, k, seed)
            cells.append(f"{smp} ({bs / smp:.2f}×), {cpu:.0f} s ({bcpu / cpu:.2f}×)")
        val = s.get("final_validation")
        val = "—" if val is None else f"{val:.4f}"
        print(f"| {name} | {s['final_eval']:.4f} | {val} | {s.get('teacher_forwards', 0)} | "
              f"{s['train_seconds']:.0f} | {timer.times[name]['cpu']:.0f} | "
              + " | ".join(cells) + " |")

    def mean_of(kind, k, clock):
        return statistics.mean(timer.times[name][clock] for kk, kv, _, name, _, _ in loaded
                               if kk == kind and kv == k)

    for clock, what in (("cpu", "CPU seconds"), ("wall", "wall seconds")):
        on = mean_of("online", None, clock)
        base = mean_of("baseline", None, clock)
        print(f"\n{what}, means over seeds: a baseline run {base:.1f}, an online student "
              f"{on:.1f} ({on / base:.2f}× the baseline)")
        print(f"\n| a sweep of {n} students ({what}) | cache build | students | total "
              f"| vs {n} online students |")
        print("|---|---:|---:|---:|---:|")
        print(f"| online | — | {n * on:.0f} | {n * on:.0f} | 1.00× |")
        for k in ks:
            build = statistics.mean(b[clock] for (kk, _), b in builds.items() if kk == k)
            cached = mean_of("cached", k, clock)
            total = build + n * cached
            print(f"| cached, k = {k} | {build:.0f} | {n * cached:.0f} | {total:.0f} | "
                  f"{n * on / total:.2f}× faster |")


if __name__ == "__main__":
    main()
