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
(stride 1) both land in the convolution buckets, not apart. Last, the step's samples per
thread and the serial share: the calling thread's samples outside rayon (the workers wait
meanwhile) against the mean worker's.
"""
import collections
import subprocess
import sys

SETUP = ("setup: model and teacher construction (not the step)",
         ["serial_bf16", "gemm_bf16", "__cos", "__ieee754_log", "randn", "KdBench::new"])
BUCKETS = [
    ("conv: sgemm kernel", ["avx512::kernel", "avx512::serial::{{closure}}", "gemm_f32::"]),
    ("conv: sgemm packing", ["pack_b", "pack_a", "transpose16"]),
    ("conv: im2col", ["im2col", "same_row", "tall_images", "inside_masks", "gather_strided"]),
    ("conv: col2im", ["col2im"]),
    ("conv: direct kernels (conv_direct.rs)", ["backend::conv::direct::"]),
    ("conv: Winograd", ["winograd"]),
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
     ["memset", "alloc", "free", "malloc", "page_fault", "clear_page", "scratch::zeroed"]),
    ("memcpy", ["memmove", "memcpy"]),
    ("threads waiting (yield, futex, spin)",
     ["sched_yield", "futex", "syscall", "finish_task_switch", "wait_until", "_raw_spin",
      "crossbeam", "latch", "Sleep"]),
    ("inlined into rayon", ["rayon"]),
]
# Buckets that name the op further out that owns the sample.
ATTRIBUTED = ("allocation", "inlined")
OPS = BUCKETS[:14]


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
    # Per thread id: the step's samples, and those outside any rayon frame (serial code).
    per_thread = collections.defaultdict(lambda: [0, 0])
    for block in script.split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) < 2:
            continue
        # Innermost frame first; each line is "address symbol".
        frames = [" ".join(line.split()[1:]) for line in lines[1:]]
        name = bucket(frames)
        counts[name] += 1
        if name != SETUP[0]:
            head = lines[0].split()
            tid = int(head[1]) if len(head) > 1 and head[1].isdigit() else -1
            per_thread[tid][0] += 1
            per_thread[tid][1] += not any("rayon" in f for f in frames)
    total = sum(counts.values())
    if total == 0:
        sys.exit(f"{sys.argv[1]}: no samples with call chains (record with --call-graph dwarf)")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")
    print(f"{total} samples")
    # The calling thread (the lowest id, the process's own) runs the step's serial code while
    # the rayon workers wait; its samples outside rayon frames, against the workers' samples
    # spread over the workers, estimate the serial share of the step's clock time.
    if len(per_thread) > 1:
        main_tid = min(per_thread)
        serial = per_thread[main_tid][1]
        workers = [n for t, (n, _) in per_thread.items() if t != main_tid]
        parallel = sum(workers) / len(workers)
        for tid, (n, outside) in sorted(per_thread.items()):
            print(f"thread {tid}: {n} step samples, {outside} outside rayon")
        print(f"serial share of the step: {100 * serial / (serial + parallel):.1f}% "
              f"({serial} samples of the calling thread outside rayon, "
              f"{parallel:.0f} per worker)")


if __name__ == "__main__":
    main()
