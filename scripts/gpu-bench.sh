#!/usr/bin/env bash
# The distillation-overhead benchmark on an NVIDIA GPU, beside the PyTorch peer on the same
# card (docs/benchmarks.md, "GPU"): `recycle bench --device cuda:0` for resnet50-imagenet
# (batch 256, bf16) and bert-base (batch 128 x 128, bf16), one model per call so that a slow
# or failing one keeps the other's table, then scripts/reference/torch_kd_overhead.py with
# bf16 on the same shapes (BERT with its MLM head at the masked positions, Recycle's work, and
# at every position, Hugging Face's default).
#
#   PYTHON=/path/to/python scripts/gpu-bench.sh [out-dir]     (default out-dir: gpu-bench-out)
#
# Writes out-dir/env.txt (machine, driver, versions), bench.md (everything printed),
# bench.jsonl (recycle's JSON lines) and torch_peer.jsonl (the peer's).
#
# Environment:
#   PYTHON          a Python with a CUDA build of torch, torchvision and transformers (required;
#                   SKIP_PEER=1 runs recycle alone).
#   RECYCLE_BIN     a `recycle` built with `--features cuda`; without it the script builds
#                   target/release/recycle that way (a Rust toolchain and nvcc needed).
#   CUDA_LIB_DIRS   colon-separated folders holding libcublasLt and libcudnn, when they are not
#                   on the loader's path already; the `nvidia/*/lib` folders of PYTHON's
#                   site-packages (PyTorch's CUDA wheels) are added as well.
#   BENCH_ITERS (5), BENCH_WARMUP (2), BENCH_VARIANTS (all), PEER_ITERS (10): rounds.
# Time limits: recycle 180 s + 120 s, the peer 3 x 100 s.
# Exit status: non-zero when a `recycle bench` run or a peer run failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-bench-out}"

die() {
    echo "gpu-bench.sh: $*" >&2
    exit 2
}

if [ "${SKIP_PEER:-0}" != 1 ]; then
    [ -n "${PYTHON:-}" ] ||
        die "set PYTHON to a Python with a CUDA build of torch (or SKIP_PEER=1 to run recycle alone)"
    "$PYTHON" -c 'import torch, torchvision, transformers' ||
        die "PYTHON=$PYTHON cannot import torch, torchvision and transformers"
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "PYTHON=$PYTHON has torch without a usable GPU (torch.cuda.is_available() is false)"
fi
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"

bin="${RECYCLE_BIN:-}"
if [ -z "$bin" ]; then
    echo "== building recycle (release, --features cuda; nvcc required)"
    RECYCLE_REQUIRE_NVCC=1 cargo build --release --features cuda --bin recycle ||
        die "the build failed: install nvcc (docs/kernels.md) or set RECYCLE_BIN"
    bin="${CARGO_TARGET_DIR:-target}/release/recycle"
fi
[ -x "$bin" ] || die "RECYCLE_BIN=$bin is not an executable"

# The CUDA libraries: CUDA_LIB_DIRS, then those of PyTorch's wheels.
lib_dirs="${CUDA_LIB_DIRS:-}"
if [ -n "${PYTHON:-}" ]; then
    wheel_dirs="$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os, site
dirs = []
for base in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)"
    lib_dirs="${lib_dirs:+$lib_dirs:}$wheel_dirs"
fi
[ -n "$lib_dirs" ] && export LD_LIBRARY_PATH="${lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

mkdir -p "$out"
: >"$out/bench.md"
: >"$out/torch_peer.jsonl"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    "$bin" --version
    [ -n "${PYTHON:-}" ] && "$PYTHON" -c 'import torch, torchvision, transformers as t; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version(), "torchvision", torchvision.__version__, "transformers", t.__version__)'
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

iters="${BENCH_ITERS:-5}"
warmup="${BENCH_WARMUP:-2}"
rc=0
variants=()
[ -n "${BENCH_VARIANTS:-}" ] && variants=(--variants "$BENCH_VARIANTS")
for spec in "resnet50-imagenet 180" "bert-base 120"; do
    read -r model limit <<<"$spec"
    echo "== recycle bench --device cuda:0 --model $model (limit ${limit} s)" | tee -a "$out/bench.md"
    t0=$(date +%s)
    timeout "$limit" "$bin" bench --device cuda:0 --model "$model" --iters "$iters" \
        --warmup "$warmup" --json "${variants[@]}" 2>&1 | tee -a "$out/bench.md"
    status=${PIPESTATUS[0]}
    echo "recycle bench $model: exit status $status after $(($(date +%s) - t0)) s" |
        tee -a "$out/bench.md"
    [ "$status" -ne 0 ] && rc=$status
done
grep '^{' "$out/bench.md" >"$out/bench.jsonl" || true

if [ "${SKIP_PEER:-0}" != 1 ]; then
    peer_rounds="--iters ${PEER_ITERS:-10} --warmup 3"
    for args in \
        "--model resnet50 --batch 256 --bf16" \
        "--model bert-base --batch 128 --seq 128 --bf16 --mlm-head masked --kd-positions masked" \
        "--model bert-base --batch 128 --seq 128 --bf16 --mlm-head all --kd-positions all"; do
        echo "== torch_kd_overhead.py $args --device cuda $peer_rounds" | tee -a "$out/bench.md"
        # shellcheck disable=SC2086
        timeout 100 "$PYTHON" scripts/reference/torch_kd_overhead.py $args --device cuda \
            $peer_rounds | tee -a "$out/torch_peer.jsonl"
        status=${PIPESTATUS[0]}
        echo "peer: exit status $status" | tee -a "$out/bench.md"
        [ "$status" -ne 0 ] && rc=$status
    done
fi
exit "$rc"
