#!/usr/bin/env bash
# Side-by-side step timings for docs/benchmarks-steps.md: `recycle bench` and the PyTorch peer
# (../shared/reference/torch_kd_overhead.py) on the same machine, in alternation, several
# rounds (the machine is shared: each round sees whatever load there is, and every program in
# a round sees the same). Prints one line per result, tagged with the round, and the load.
#
#   scripts/bench_steps.sh [rounds] > bench.log
#
# Needs `cargo build --release --bin recycle` first, and PyTorch, torchvision, transformers.
set -euo pipefail
ROUNDS=${1:-3}
PEER=${PEER:-../shared/reference/torch_kd_overhead.py}
[ -f "$PEER" ] || PEER=/work/shared/reference/torch_kd_overhead.py
BIN=target/release/recycle
BREAKDOWN=scripts/reference/torch_step_breakdown.py

load() { echo "# load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"; }

for r in $(seq 1 "$ROUNDS"); do
  echo "## round $r"
  load
  echo "# recycle resnet18-fmnist"
  "$BIN" bench --model resnet18-fmnist --batch 128 --iters 5 --warmup 1 --json
  load
  for loss in kl mse; do
    echo "# peer resnet18-fmnist $loss"
    python3 "$PEER" --model resnet18-fmnist --device cpu --batch 128 --loss "$loss" --iters 5 --warmup 1
  done
  load
  echo "# recycle bert-tiny"
  "$BIN" bench --model bert-tiny --batch 32 --iters 10 --warmup 3 --json
  load
  for loss in kl mse; do
    echo "# peer bert-tiny $loss masked"
    python3 "$PEER" --model bert-tiny --device cpu --batch 32 --loss "$loss" --kd-positions masked --iters 5 --warmup 1
  done
  load
done

echo "## once"
echo "# peer bert-tiny kl all positions"
python3 "$PEER" --model bert-tiny --device cpu --batch 32 --loss kl --kd-positions all --iters 5 --warmup 1
echo "# PyTorch phases and masked-head BERT"
python3 "$BREAKDOWN" --model resnet18-fmnist --batch 128 --iters 5 --warmup 1
python3 "$BREAKDOWN" --model bert-tiny --batch 32 --iters 10 --warmup 3
echo "# recycle phases"
"$BIN" bench --model resnet18-fmnist --batch 128 --phases --iters 5 --warmup 1
"$BIN" bench --model bert-tiny --batch 32 --phases --iters 10 --warmup 3
echo "# recycle resnet18-fmnist-small (the demo's width; no peer)"
"$BIN" bench --model resnet18-fmnist-small --batch 128 --iters 10 --warmup 3 --json
load
echo "# one thread each: RAYON_NUM_THREADS=1 / OMP_NUM_THREADS=1"
RAYON_NUM_THREADS=1 "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
OMP_NUM_THREADS=1 python3 "$PEER" --model resnet18-fmnist --device cpu --batch 128 --loss kl --iters 3 --warmup 1
RAYON_NUM_THREADS=1 "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,teacher-fwd --iters 5 --warmup 2 --json
OMP_NUM_THREADS=1 python3 "$BREAKDOWN" --model bert-tiny --batch 32 --iters 5 --warmup 2
load
echo "# A/B in one session: f32 teacher products, gemm crate, default malloc"
RECYCLE_BF16_PRODUCTS=0 "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
RECYCLE_GEMM=gemm-crate "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
RECYCLE_BF16_PRODUCTS=0 "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
RECYCLE_GEMM=gemm-crate "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
RECYCLE_MALLOC=default "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
load
