#!/usr/bin/env python3
"""PyTorch CPU reference timings for the shapes of engine/benches/{matmul,conv2d}.rs.

Runs on PyTorch's default CPU thread count (torch.get_num_threads(): every core), as the Rust
benches run on every rayon thread. Prints, per shape, the best and median time over the
repetitions and the GFLOP/s of the best, so it can be set beside criterion's numbers in
docs/benchmarks.md.

    python3 scripts/reference/torch_cpu_bench.py [--reps N]
"""

import argparse
import statistics
import time

import torch


def timeit(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def report(name, flops, best, median):
    print(
        f"{name:<44} best {best * 1e3:9.2f} ms  median {median * 1e3:9.2f} ms  "
        f"{flops / best / 1e9:7.1f} GFLOP/s"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    with torch.no_grad():
        for n in (512, 1024, 2048):
            a = torch.randn(n, n)
            b = torch.randn(n, n)
            out = torch.empty(n, n)
            reps = args.reps * (4 if n <= 1024 else 1)
            best, med = timeit(lambda: torch.mm(a, b, out=out), reps)
            report(f"matmul {n}x{n}x{n}", 2 * n**3, best, med)

    # conv2d: batch 128, 64 -> 64 channels, 3x3, stride 1, padding 1, 28x28.
    n, c, o, h, w, k = 128, 64, 64, 28, 28, 3
    x = torch.randn(n, c, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(c, o, k, stride=1, padding=1, bias=True)
    g = torch.randn(n, o, h, w)
    fwd_flops = 2 * n * o * c * k * k * h * w

    def fwd():
        with torch.no_grad():
            conv(x)

    def fwd_bwd():
        x.grad = None
        conv.zero_grad(set_to_none=True)
        y = conv(x)
        y.backward(g)

    best, med = timeit(fwd, args.reps)
    report("conv2d fwd 128x64x28x28 k3 s1 p1 -> 64", fwd_flops, best, med)
    best, med = timeit(fwd_bwd, args.reps)
    report("conv2d fwd+bwd 128x64x28x28 k3 s1 p1 -> 64", 3 * fwd_flops, best, med)


if __name__ == "__main__":
    main()
