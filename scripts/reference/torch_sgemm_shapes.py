#!/usr/bin/env python3
"""PyTorch twin of engine/examples/sgemm_shapes.rs: `torch.mm` at the products of the two
full-width CPU steps (ResNet-18's im2col products, BERT-base's linear layers), best-of-reps
GFLOP/s per thread count, then the Rust example at the same thread count right after, side by
side with the ratio Recycle / PyTorch (GFLOP/s; below 1: Recycle slower).

    cargo build --release -p recycle-engine --example sgemm_shapes
    python3 scripts/reference/torch_sgemm_shapes.py --recycle target/release/examples/sgemm_shapes \\
        [--reps 10] [--threads 1,2] [--cpu-time]

With `--cpu-time` both programs time a product by their process's CPU time over the thread
count (steadier than the clock on a loaded machine).

The shapes come from the binary (`--list`), so the two programs time the same products.
"""
import argparse
import json
import subprocess
import time

import torch


def shapes(binary):
    out = subprocess.run([binary, "--list"], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


CLOCK = time.perf_counter


def torch_gflops(s, reps, threads):
    m, n, k = s["m"], s["n"], s["k"]
    a = torch.randn(k, m).t() if s["trans_a"] else torch.randn(m, k)
    b = torch.randn(n, k).t() if s["trans_b"] else torch.randn(k, n)
    c = torch.empty(m, n)
    flops = 2.0 * m * n * k
    inner = max(1, min(500, int(5e9 * threads / flops)))
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        spent = CLOCK() - t0
        if CLOCK is time.process_time:
            spent /= threads
        best = min(best, spent / inner)
    return flops / best / 1e9


def recycle_gflops(binary, reps, threads, cpu_time):
    args = [binary, str(reps), "--threads", str(threads), "--json"]
    out = subprocess.run(args + (["--cpu-time"] if cpu_time else []),
                         check=True, capture_output=True, text=True).stdout
    return {r["label"]: r["gflops"] for r in map(json.loads, out.splitlines())
            if r.get("threads") == threads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recycle", required=True, help="the built sgemm_shapes example")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time over the threads (both programs)")
    a = ap.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    todo = shapes(a.recycle)
    clock = "CPU time" if a.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, best of {a.reps}, {clock}, GFLOP/s")
    for t in [int(v) for v in a.threads.split(",")]:
        torch.set_num_threads(t)
        ours = {s["label"]: torch_gflops(s, a.reps, t) for s in todo}
        theirs = recycle_gflops(a.recycle, a.reps, t, a.cpu_time)
        print(f"\n{t} thread(s)")
        print("| product | m n k | op(A) op(B) | Recycle | torch.mm | Recycle / torch |")
        print("|---|---|---|---:|---:|---:|")
        for s in todo:
            pt, rc = ours[s["label"]], theirs[s["label"]]
            ops = ("T" if s["trans_a"] else "N") + ("T" if s["trans_b"] else "N")
            print(f"| {s['label']} | {s['m']} {s['n']} {s['k']} | {ops} | {rc:.0f} | {pt:.0f} "
                  f"| **{rc / pt:.2f}** |")


if __name__ == "__main__":
    main()
