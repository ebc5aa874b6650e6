#!/usr/bin/env python3
"""PyTorch twin of engine/examples/resnet_convs.rs: every distinct convolution of ResNet-18
with the small-input stem (1x28x28) at one batch size and width multiplier, timed pass by pass
as a training step runs them: forward, input gradient (dx; none for the stem) and weight
gradient (dw), each through `aten.convolution_backward` with only its output asked for.
Medians over `--reps` rounds, milliseconds.

    python3 scripts/reference/torch_resnet_convs.py [--batch 128] [--reps 20] [--width 0.125] \\
        [--threads 1,2] [--cpu-time] [--recycle target/release/examples/resnet_convs]

With `--recycle BINARY` it runs that build of the Rust example for each shape's thread count
right after its own rounds (RAYON_NUM_THREADS set to the same count) and prints both side by
side with Recycle / PyTorch time ratios (above 1: Recycle slower) and the step totals
(each convolution times its uses).
"""
import argparse
import json
import os
import subprocess
import time

import torch

LAYERS = [(1, 64, 3, 1, 28, 1), (64, 64, 3, 1, 28, 4), (64, 128, 3, 2, 28, 1),
          (64, 128, 1, 2, 28, 1), (128, 128, 3, 1, 14, 3), (128, 256, 3, 2, 14, 1),
          (128, 256, 1, 2, 14, 1), (256, 256, 3, 1, 7, 3), (256, 512, 3, 2, 7, 1),
          (256, 512, 1, 2, 7, 1), (512, 512, 3, 1, 4, 3)]
PASSES = ["fwd", "dx", "dw"]


def scaled(c, width):
    """A channel count at the width multiplier, rounded as Recycle's ResNet rounds it."""
    return 1 if c == 1 else max(1, int(c * width + 0.5))


CLOCK = time.perf_counter


def median_ms(reps, f):
    f()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        f()
        ts.append((CLOCK() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def torch_rows(batch, reps, width):
    rows = []
    for i, (c, o, k, s, hw, uses) in enumerate(LAYERS):
        c, o = scaled(c, width), scaled(o, width)
        x = torch.randn(batch, c, hw, hw)
        w = torch.randn(o, c, k, k)
        pad = k // 2
        with torch.no_grad():
            y = torch.nn.functional.conv2d(x, w, stride=s, padding=pad)
        dy = torch.randn_like(y)

        def fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(x, w, stride=s, padding=pad)

        def bwd(mask):
            return lambda: torch.ops.aten.convolution_backward(
                dy, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)

        row = {"conv": f"{c}->{o} {k}x{k} s{s} {hw}x{hw}", "uses": uses,
               "fwd_ms": median_ms(reps, fwd),
               "dx_ms": median_ms(reps, bwd([True, False, False])) if i > 0 else 0.0,
               "dw_ms": median_ms(reps, bwd([False, True, False]))}
        rows.append(row)
    return rows


def recycle_rows(binary, batch, reps, width, threads, cpu_time):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    args = [binary, str(batch), str(reps), str(width), "--json"] + (["--cpu-time"] if cpu_time else [])
    out = subprocess.run(args, env=env,
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--threads", default=str(torch.get_num_threads()))
    ap.add_argument("--recycle", help="the built resnet_convs example to run beside PyTorch")
    ap.add_argument("--baseline", help="another build of the example to compare --recycle with")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the process's CPU time, not the clock (both programs)")
    a = ap.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    clock = "CPU time" if a.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, batch {a.batch}, width {a.width}, {clock}, "
          f"medians of {a.reps}")
    for t in [int(v) for v in a.threads.split(",")]:
        torch.set_num_threads(t)
        ours = torch_rows(a.batch, a.reps, a.width)
        theirs = recycle_rows(a.recycle, a.batch, a.reps, a.width, t, a.cpu_time) if a.recycle else None
        print(f"\n{t} thread(s)")
        if theirs is None:
            print("| conv | uses | fwd ms | dx ms | dw ms |")
            print("|---|---:|---:|---:|---:|")
            for r in ours:
                print(f"| {r['conv']} | {r['uses']} | "
                      + " | ".join(f"{r[p + '_ms']:.2f}" for p in PASSES) + " |")
            continue
        print("| conv | uses | " + " | ".join(f"{p} ms Recycle / PyTorch / ratio" for p in PASSES)
              + " |")
        print("|---|---:|---:|---:|---:|")
        tot = {p: [0.0, 0.0] for p in PASSES}
        for r, q in zip(ours, theirs):
            if r["conv"] != q["conv"]:
                raise SystemExit(f"shape mismatch: PyTorch {r['conv']}, Recycle {q['conv']}")
            cells = []
            for p in PASSES:
                pt, rc = r[p + "_ms"], q[p + "_ms"]
                tot[p][0] += rc * r["uses"]
                tot[p][1] += pt * r["uses"]
                cells.append(f"{rc:.2f} / {pt:.2f} / **{rc / pt:.2f}**" if pt > 0 else "—")
            print(f"| {r['conv']} | {r['uses']} | " + " | ".join(cells) + " |")
        cells = [f"{rc:.1f} / {pt:.1f} / **{rc / pt:.2f}**" for rc, pt in tot.values()]
        print("| all convolutions of a step (× uses) | | " + " | ".join(cells) + " |")
        rc_all, pt_all = sum(v[0] for v in tot.values()), sum(v[1] for v in tot.values())
        print(f"\nstep total: Recycle {rc_all:.1f} ms, PyTorch {pt_all:.1f} ms, "
              f"ratio {rc_all / pt_all:.2f}")
        if a.baseline:
            base = recycle_rows(a.baseline, a.batch, a.reps, a.width, t, a.cpu_time)
            print_against_baseline(theirs, base)


def print_against_baseline(rows, base):
    """Recycle against the baseline build, per shape and pass (below 1: Recycle faster)."""
    print("\n| conv | uses | " + " | ".join(f"{p} ms Recycle / baseline / ratio" for p in PASSES)
          + " |")
    print("|---|---:|---:|---:|---:|")
    tot = {p: [0.0, 0.0] for p in PASSES}
    for q, b in zip(rows, base):
        if q["conv"] != b["conv"]:
            raise SystemExit(f"shape mismatch: Recycle {q['conv']}, baseline {b['conv']}")
        cells = []
        for p in PASSES:
            rc, bc = q[p + "_ms"], b[p + "_ms"]
            tot[p][0] += rc * q["uses"]
            tot[p][1] += bc * q["uses"]
            cells.append(f"{rc:.2f} / {bc:.2f} / **{rc / bc:.2f}**" if bc > 0 else "—")
        print(f"| {q['conv']} | {q['uses']} | " + " | ".join(cells) + " |")
    cells = [f"{rc:.1f} / {bc:.1f} / **{rc / bc:.2f}**" for rc, bc in tot.values()]
    print("| all convolutions of a step (× uses) | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
