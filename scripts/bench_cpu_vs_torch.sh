#!/usr/bin/env bash
# The four CPU training steps against PyTorch's, side by side in one run: ResNet-18 on 28x28
# images (full width and the demo's width 1/8, batch 128), ResNet-50 at 224x224 (batch 16),
# BERT-tiny (batch 32) and BERT-base (batch 4), sequence 128. Each round runs `recycle bench`
# (plain step) and its PyTorch peer (scripts/reference/torch_kd_overhead.py --loss none;
# torch_step_breakdown.py for the width-1/8 ResNet) for every model back to back, so both programs of a row see the same load; the table gives each
# model's median step over the rounds and the ratio Recycle / PyTorch (below 1: Recycle faster).
#
#   PYTHON=/path/to/python scripts/bench_cpu_vs_torch.sh [rounds] > steps.log
#
# RECYCLE_BIN names the binary (default target/release/recycle). BASELINE_BIN, if set, names a
# second build (an earlier commit) that runs in the same rounds, right after the first, so a
# before/after pair sees the same load as the peer; the table then gets its columns too.
#
# Equal work: the BERT peers apply the MLM head at the masked positions only, as Recycle does
# (`--mlm-head masked`). ResNet-50 and BERT-base run with `--activations f32`: `recycle bench`
# keeps their activations in bf16 by default (the GPU sizes), which the CPU widens to f32 for
# every op, and the peer runs them in f32; f32 against f32 is the equal work. The `-bf16` rows
# run them with bf16 products (`--activations bf16`; where the CPU has AVX512_BF16) against the
# peer under bf16 autocast (`--autocast bf16`). Threads: both
# programs use every core unless RAYON_NUM_THREADS / OMP_NUM_THREADS say otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PEER="scripts/reference/torch_kd_overhead.py --device cpu --loss none"
SMALL_PEER="scripts/reference/torch_step_breakdown.py --width 0.125"

if [ -z "${PYTHON:-}" ] || ! "$PYTHON" -c 'import torch, torchvision, transformers' 2>/dev/null; then
    echo "bench_cpu_vs_torch.sh: set PYTHON to a Python with torch, torchvision and transformers" >&2
    echo "  (PYTHON=${PYTHON:-unset}; install them with: \$PYTHON -m pip install torch torchvision transformers)" >&2
    exit 2
fi
BIN=${RECYCLE_BIN:-target/release/recycle}
BASE=${BASELINE_BIN:-}
if [ -n "$BASE" ] && [ ! -x "$BASE" ]; then
    echo "bench_cpu_vs_torch.sh: BASELINE_BIN=$BASE is not an executable" >&2
    exit 2
fi
if [ ! -x "$BIN" ]; then
    echo "# building $BIN" >&2
    cargo build --release --bin recycle >&2
fi

# name | recycle bench arguments | peer script and arguments
MODELS=(
    "resnet18-fmnist|--model resnet18-fmnist --batch 128 --iters 5 --warmup 1|$PEER --model resnet18-fmnist --batch 128 --iters 5 --warmup 1"
    "resnet18-fmnist-small|--model resnet18-fmnist-small --batch 128 --iters 10 --warmup 2|$SMALL_PEER --model resnet18-fmnist --batch 128 --iters 10 --warmup 2"
    "resnet50-224|--model resnet50-imagenet --batch 16 --activations f32 --iters 3 --warmup 1|$PEER --model resnet50 --batch 16 --iters 3 --warmup 1"
    "bert-tiny|--model bert-tiny --batch 32 --iters 10 --warmup 3|$PEER --model bert-tiny --batch 32 --mlm-head masked --iters 10 --warmup 3"
    "bert-base|--model bert-base --batch 4 --activations f32 --iters 3 --warmup 1|$PEER --model bert-base --batch 4 --mlm-head masked --iters 3 --warmup 1"
    "resnet18-fmnist-bf16|--model resnet18-fmnist --batch 128 --activations bf16 --iters 5 --warmup 1|$PEER --model resnet18-fmnist --batch 128 --autocast bf16 --iters 5 --warmup 1"
    "resnet50-224-bf16|--model resnet50-imagenet --batch 16 --activations bf16 --iters 3 --warmup 1|$PEER --model resnet50 --batch 16 --autocast bf16 --iters 3 --warmup 1"
    "bert-base-bf16|--model bert-base --batch 4 --activations bf16 --iters 3 --warmup 1|$PEER --model bert-base --batch 4 --mlm-head masked --autocast bf16 --iters 3 --warmup 1"
)

echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs; $("$BIN" --version); torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
[ -z "$BASE" ] || echo "# baseline: $("$BASE" --version) ($BASE)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for spec in "${MODELS[@]}"; do
        IFS='|' read -r name ours theirs <<<"$spec"
        echo "# round $round $name, load $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%S)"
        # shellcheck disable=SC2086
        r=$("$BIN" bench $ours --variants plain --json | grep '^{' | tail -1)
        # shellcheck disable=SC2086
        p=$("$PYTHON" $theirs | grep '^{' | tail -1)
        b=null
        if [ -n "$BASE" ]; then
            # shellcheck disable=SC2086
            b=$("$BASE" bench $ours --variants plain --json | grep '^{' | tail -1)
        fi
        echo "{\"round\": $round, \"name\": \"$name\", \"recycle\": $r, \"torch\": $p, \"baseline\": $b}" | tee -a "$log"
    done
done
"$PYTHON" - "$log" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    base = r["baseline"]["plain_ms"] if r.get("baseline") else None
    rows.setdefault(r["name"], []).append((r["recycle"]["plain_ms"], r["torch"]["plain_ms"], base))
with_base = all(b is not None for pairs in rows.values() for _, _, b in pairs)
head = "| plain step | Recycle ms (median) | PyTorch ms (median) | Recycle / PyTorch | per round |"
rule = "|---|---:|---:|---:|---|"
if with_base:
    head += " baseline ms (median) | baseline / PyTorch | Recycle / baseline |"
    rule += "---:|---:|---:|"
print(head)
print(rule)
for name, rounds in rows.items():
    ours = statistics.median(a for a, _, _ in rounds)
    theirs = statistics.median(t for _, t, _ in rounds)
    each = ", ".join(f"{a / t:.2f}" for a, t, _ in rounds)
    line = f"| {name} | {ours:,.1f} | {theirs:,.1f} | **{ours / theirs:.2f}** | {each} |"
    if with_base:
        base = statistics.median(b for _, _, b in rounds)
        # Ratios per round, then their median: each round's three programs saw the same load.
        vs_peer = statistics.median(b / t for _, t, b in rounds)
        vs_base = statistics.median(a / b for a, _, b in rounds)
        line += f" {base:,.1f} | {vs_peer:.2f} | {vs_base:.2f} |"
    print(line)
PY
