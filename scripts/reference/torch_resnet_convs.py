#!/usr/bin/env python3
"""PyTorch twin of engine/examples/resnet_convs.rs: every distinct convolution of ResNet-18
with the small-input stem (1x28x28, full width) at one batch size, forward (no_grad) and
backward (input and weight gradients; none for the stem's input), medians, times the uses.

    python3 scripts/reference/torch_resnet_convs.py [batch] [reps]
"""
import sys
import time

import torch
import torch.nn.functional as F

LAYERS = [(1, 64, 3, 1, 28, 1), (64, 64, 3, 1, 28, 4), (64, 128, 3, 2, 28, 1),
          (64, 128, 1, 2, 28, 1), (128, 128, 3, 1, 14, 3), (128, 256, 3, 2, 14, 1),
          (128, 256, 1, 2, 14, 1), (256, 256, 3, 1, 7, 3), (256, 512, 3, 2, 7, 1),
          (256, 512, 1, 2, 7, 1), (512, 512, 3, 1, 4, 3)]


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| conv | uses | fwd ms | bwd ms |")
    print("|---|---:|---:|---:|")
    ft = bt = 0.0
    for i, (c, o, k, s, hw, uses) in enumerate(LAYERS):
        x = torch.randn(n, c, hw, hw, requires_grad=i > 0)
        w = torch.randn(o, c, k, k, requires_grad=True)
        with torch.no_grad():
            oh = F.conv2d(x, w, stride=s, padding=k // 2).shape[-1]
        dy = torch.randn(n, o, oh, oh)
        tf, tb = [], []
        for r in range(reps + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                F.conv2d(x, w, stride=s, padding=k // 2)
            t1 = time.perf_counter()
            y = F.conv2d(x, w, stride=s, padding=k // 2)
            t2 = time.perf_counter()
            y.backward(dy)
            t3 = time.perf_counter()
            x.grad = None
            w.grad = None
            if r > 0:
                tf.append((t1 - t0) * 1e3)
                tb.append((t3 - t2) * 1e3)
        f, b = sorted(tf)[len(tf) // 2], sorted(tb)[len(tb) // 2]
        print(f"| {c}->{o} {k}x{k} s{s} {hw}x{hw} | {uses} | {f:.1f} | {b:.1f} |")
        ft += f * uses
        bt += b * uses
    print(f"\nbatch {n}: all convolutions of one step: forward {ft:.0f} ms, backward {bt:.0f} ms")


if __name__ == "__main__":
    main()
