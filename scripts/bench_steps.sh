#!/usr/bin/env bash
# Side-by-side step timings for docs/benchmarks-steps.md: `recycle bench` and the PyTorch peers
# in scripts/reference/ on the same machine, in alternation, several rounds (on a shared
# machine each round sees whatever load there is, and every program in a round sees the same).
# Prints one line per result, tagged with the round, the load and the software versions.
#
#   PYTHON=/path/to/python scripts/bench_steps.sh [rounds] > bench.log
#
# PYTHON is a Python with torch, torchvision and transformers (required). Builds
# `target/release/recycle` first when it is missing (RECYCLE_BIN overrides the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PEER=scripts/reference/torch_kd_overhead.py
BREAKDOWN=scripts/reference/torch_step_breakdown.py

if [ -z "${PYTHON:-}" ]; then
    echo "bench_steps.sh: set PYTHON to a Python with torch, torchvision and transformers," >&2
    echo "  e.g. PYTHON=\$HOME/venvs/torch/bin/python scripts/bench_steps.sh 3" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, torchvision, transformers' 2>/dev/null; then
    echo "bench_steps.sh: PYTHON=$PYTHON cannot import torch, torchvision and transformers:" >&2
    "$PYTHON" -c 'import torch, torchvision, transformers' >&2 || true
    echo "  install them there: $PYTHON -m pip install torch torchvision transformers" >&2
    exit 2
fi
BIN=${RECYCLE_BIN:-target/release/recycle}
if [ ! -x "$BIN" ]; then
    echo "# building $BIN" >&2
    cargo build --release --bin recycle >&2
fi
peer() { "$PYTHON" "$PEER" "$@"; }
breakdown() { "$PYTHON" "$BREAKDOWN" "$@"; }
load() { echo "# load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"; }

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"
echo "# $(rustc --version 2>/dev/null || echo 'rustc not found'); $("$PYTHON" -c 'import torch, torchvision, transformers as t; print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", t.__version__, "threads", torch.get_num_threads())')"

for r in $(seq 1 "$ROUNDS"); do
    echo "## round $r"
    load
    echo "# recycle resnet18-fmnist"
    "$BIN" bench --model resnet18-fmnist --batch 128 --iters 5 --warmup 1 --json
    load
    echo "# peer resnet18-fmnist, f32 teacher (KL and MSE)"
    peer --model resnet18-fmnist --device cpu --batch 128 --iters 5 --warmup 1
    echo "# peer resnet18-fmnist, bf16 teacher (as recycle's)"
    peer --model resnet18-fmnist --device cpu --batch 128 --bf16-teacher --iters 5 --warmup 1
    load
    echo "# recycle bert-tiny"
    "$BIN" bench --model bert-tiny --batch 32 --iters 10 --warmup 3 --json
    load
    echo "# peer bert-tiny, head at every position, KD at the masked ones"
    peer --model bert-tiny --device cpu --batch 32 --kd-positions masked --iters 5 --warmup 1
    echo "# peer bert-tiny, head and KD at the masked positions, bf16 teacher (recycle's work)"
    peer --model bert-tiny --device cpu --batch 32 --mlm-head masked --kd-positions masked \
        --bf16-teacher --iters 10 --warmup 3
    load
done

echo "## once"
echo "# peer bert-tiny KL at all positions"
peer --model bert-tiny --device cpu --batch 32 --loss kl --kd-positions all --iters 5 --warmup 1
echo "# PyTorch phases and masked-head BERT"
breakdown --model resnet18-fmnist --batch 128 --iters 5 --warmup 1
breakdown --model bert-tiny --batch 32 --iters 10 --warmup 3
echo "# recycle phases"
"$BIN" bench --model resnet18-fmnist --batch 128 --phases --iters 5 --warmup 1
"$BIN" bench --model bert-tiny --batch 32 --phases --iters 10 --warmup 3
echo "# recycle resnet18-fmnist-small (the demo's width; no peer)"
"$BIN" bench --model resnet18-fmnist-small --batch 128 --iters 10 --warmup 3 --json
load
echo "# one thread each: RAYON_NUM_THREADS=1 / OMP_NUM_THREADS=1"
RAYON_NUM_THREADS=1 "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
OMP_NUM_THREADS=1 peer --model resnet18-fmnist --device cpu --batch 128 --loss kl --iters 3 --warmup 1
RAYON_NUM_THREADS=1 "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,teacher-fwd --iters 5 --warmup 2 --json
OMP_NUM_THREADS=1 breakdown --model bert-tiny --batch 32 --iters 5 --warmup 2
load
echo "# A/B in one run: f32 teacher products, gemm crate, default malloc"
RECYCLE_BF16_PRODUCTS=0 "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
RECYCLE_GEMM=gemm-crate "$BIN" bench --model resnet18-fmnist --batch 128 --variants plain,kd-kl,teacher-fwd --iters 3 --warmup 1 --json
RECYCLE_BF16_PRODUCTS=0 "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
RECYCLE_GEMM=gemm-crate "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
RECYCLE_MALLOC=default "$BIN" bench --model bert-tiny --batch 32 --variants plain,kd-kl,kd-mse,teacher-fwd --iters 10 --warmup 3 --json
load
