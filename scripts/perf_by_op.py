#!/usr/bin/env python3
"""Where a CPU training step's time goes, by op: reads a `perf record --call-graph dwarf`
profile of `recycle bench` and puts each sample in one bucket (convolution products, their
packing, im2col, col2im; BatchNorm forward and backward; ReLU; add; pool; loss; optimizer;
allocation; threads waiting), printing each bucket's share of the samples.

    perf record --call-graph dwarf,16384 -F 499 -o step.data \\
        target/release/recycle bench --model resnet18-fmnist-small --variants plain --iters 12
    python3 scripts/perf_by_op.py step.data

A sample goes to the first bucket that its innermost frame matches, walking outwards; samples
with a frame of model construction (random initialisation, the bf16 teachers' products) are
counted apart as setup. Allocation and work that the compiler inlined into rayon's iterators
name the op further out that owns them (`<- op`). Samples of the rayon workers carry no frame
of the op that queued them, so a convolution's forward and its input gradient run as a forward
(stride 1) both land in the convolution buckets, not apart.
"""
import collections
import subprocess
import sys

SETUP = ("setup: model and teacher construction (not the step)",
         ["serial_bf16", "gemm_bf16", "__cos", "__ieee754_log", "randn"])
BUCKETS = [
    ("conv: sgemm kernel", ["avx512::kernel", "avx512::serial::{{closure}}", "gemm_f32::"]),
    ("conv: sgemm packing", ["pack_b", "pack_a", "transpose16"]),
    ("conv: im2col", ["im2col", "same_row", "tall_images", "inside_masks", "gather_strided"]),
    ("conv: col2im", ["col2im"]),
    ("conv: other (output gather, bias, transposes)", ["backend::conv::"]),
    ("BatchNorm forward (statistics, normalise)",
     ["batch_norm2d_stats_cpu", "batch_norm2d_forward_cpu", "batch_norm2d_fwd",
      "norm_lanes::stats", "norm_lanes::forward", "norm_lanes::pick::moments",
      "norm_lanes::pick::normalise", "norm_lanes::moments", "norm_lanes::normalise"]),
    ("BatchNorm backward",
     ["batch_norm2d_backward_cpu", "batch_norm2d_bwd", "norm_lanes::backward",
      "norm_lanes::pick::grad_", "norm_lanes::grad_"]),
    ("ReLU", ["backend::activation::"]),
    ("add, gradient accumulation", ["backend::elementwise::", "add_assign"]),
    ("pool", ["backend::pool::"]),
    ("loss", ["backend::loss::"]),
    ("optimizer", ["optim::"]),
    ("allocation, zeroing, freeing",
     ["memset", "alloc", "free", "malloc", "page_fault", "clear_page"]),
    ("memcpy", ["memmove", "memcpy"]),
    ("threads waiting (yield, futex, spin)",
     ["sched_yield", "futex", "syscall", "finish_task_switch", "wait_until", "_raw_spin",
      "crossbeam", "latch", "Sleep"]),
    ("inlined into rayon", ["rayon"]),
]
# Buckets that name the op further out that owns the sample.
ATTRIBUTED = ("allocation", "inlined")
OPS = BUCKETS[:12]


def bucket(frames):
    if any(k in f for f in frames for k in SETUP[1]):
        return SETUP[0]
    for f in frames:
        for name, keys in BUCKETS:
            if any(k in f for k in keys):
                if name.startswith(ATTRIBUTED):
                    owner = next((n for g in frames for n, ks in OPS
                                  if any(k in g for k in ks)), "unattributed")
                    return f"{name} <- {owner}"
                return name
    return "other"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: perf_by_op.py PERF_DATA")
    script = subprocess.run(["perf", "script", "-i", sys.argv[1], "-F", "comm,tid,ip,sym"],
                            capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for block in script.split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) < 2:
            continue
        # Innermost frame first; each line is "address symbol".
        counts[bucket([" ".join(line.split()[1:]) for line in lines[1:]])] += 1
    total = sum(counts.values())
    if total == 0:
        sys.exit(f"{sys.argv[1]}: no samples with call chains (record with --call-graph dwarf)")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")
    print(f"{total} samples")


if __name__ == "__main__":
    main()
