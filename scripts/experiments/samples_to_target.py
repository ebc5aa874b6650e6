#!/usr/bin/env python3
"""Reads the runs under a directory (log.jsonl + summary.json, as the trainer writes them) and
prints, for every run and every baseline, the first training *samples* and *seconds* at which
the run's evaluation reached the baseline's final value.

Samples-to-target is what distillation changes statistically and does not depend on how busy
the machine was; seconds-to-target (the paper's figure of merit, what `recycle report`
prints) adds the per-step cost of the teachers and the machine's noise.

  python3 scripts/experiments/samples_to_target.py runs/demo
"""
import json
import os
import sys


def load(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    curve = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("eval") is not None:
                curve.append((r["samples"], r["train_seconds"], r["eval"]))
    return summary, curve


def first_reaching(curve, target):
    for samples, seconds, value in curve:
        if value >= target:
            return samples, seconds
    return None, None


def main():
    root = sys.argv[1]
    runs = {}
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.exists(os.path.join(d, "summary.json")):
            runs[name] = load(d)
    baselines = {n: r for n, r in runs.items() if r[0]["method"] == "baseline"}
    for b, (bs, bcurve) in sorted(baselines.items(), key=lambda kv: kv[1][0]["duration_samples"]):
        target = bs["final_eval"]
        b_samples, b_seconds = first_reaching(bcurve, target)
        print(f"\n### {b}: final {target:.4f}, reached at {b_samples} samples / {b_seconds:.1f} s")
        print("| run | method | final | samples to target | sample ratio | seconds to target |")
        print("|---|---|---:|---:|---:|---:|")
        for n, (s, curve) in sorted(runs.items()):
            samples, seconds = first_reaching(curve, target)
            ratio = f"{b_samples / samples:.2f}x" if samples else "not reached"
            secs = f"{seconds:.1f}" if seconds is not None else "not reached"
            print(f"| {n} | {s['method']} | {s['final_eval']:.4f} | {samples or 'not reached'} | {ratio} | {secs} |")


if __name__ == "__main__":
    main()
