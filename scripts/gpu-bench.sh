#!/usr/bin/env bash
# The distillation-overhead benchmark on a lent GPU, beside the PyTorch peer on the same card
# (see ../shared/device/NOTES.md and docs/benchmarks.md, "GPU: to be measured"), in two steps:
#
#   scripts/gpu-bench.sh prepare   here, on a machine without a GPU: builds `recycle` in release
#                                  with `--features cuda` (nvcc required: the kernels must be in
#                                  the binary), strips it, and copies it with the PyTorch peer
#                                  (torch_kd_overhead.py) into .device/ (ignored by git).
#   scripts/gpu-bench.sh run       on the GPU machine, with .device carried: finds the CUDA
#                                  libraries, sets LD_LIBRARY_PATH, runs
#                                  `recycle bench --device cuda:0` for resnet50-imagenet (batch
#                                  256, bf16) and bert-base (batch 128 x 128, bf16), one model
#                                  per call so that a slow or failing one keeps the other's
#                                  table, then the peer with --bf16 on the same shapes (BERT with
#                                  --kd-positions masked and all), and writes everything to $OUT.
#
# The device tool's call: command `bash scripts/gpu-bench.sh run`, carry [".device"],
# timeout_s 540. The timeouts below add up to 7.5 minutes (recycle: 180 s + 120 s; the peer:
# 3 x 50 s), so the script ends inside an 8-minute call even when every step runs to its limit.
# None of it has been timed on a GPU yet: the first run tells how many rounds fit.
#
# Knobs (environment): BENCH_ITERS (timed rounds, default 5), BENCH_WARMUP (default 2),
# BENCH_VARIANTS (comma-separated, default all), PEER_ITERS (default 10), PYTHON.
# Exit status: non-zero when a `recycle bench` run failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
mode="${1:-}"
# shellcheck source=scripts/device-common.sh
. "$root/scripts/device-common.sh"

prepare() {
    device_prepare gpu-bench.sh
}

run() {
    local out="${OUT:-$root/gpu-bench-out}" bin
    bin="$(device_start gpu-bench.sh "$out")" || exit 2

    device_libs "$out/env.txt"

    local iters="${BENCH_ITERS:-5}" warmup="${BENCH_WARMUP:-2}" rc=0
    local variants=()
    [ -n "${BENCH_VARIANTS:-}" ] && variants=(--variants "$BENCH_VARIANTS")
    for spec in "resnet50-imagenet 180" "bert-base 120"; do
        set -- $spec
        local model="$1" limit="$2" t0 status
        echo "== recycle bench --device cuda:0 --model $model (limit ${limit} s)"
        t0=$(date +%s)
        timeout "$limit" "$bin" bench --device cuda:0 --model "$model" --iters "$iters" \
            --warmup "$warmup" --json "${variants[@]}" 2>&1 | tee -a "$out/bench.md"
        status=${PIPESTATUS[0]}
        echo "recycle bench $model: exit status $status after $(($(date +%s) - t0)) s" |
            tee -a "$out/bench.md"
        [ "$status" -ne 0 ] && rc=$status
    done
    # The JSON lines alone, for scripts.
    grep '^{' "$out/bench.md" >"$out/bench.jsonl" || true

    echo "== PyTorch peer (same card, bf16 autocast)"
    local peer="--bf16 --iters ${PEER_ITERS:-10} --warmup 3"
    device_peer "$out" 50 "--model resnet50 --batch 256 $peer" \
        "--model bert-base --batch 128 --seq 128 --kd-positions masked $peer" \
        "--model bert-base --batch 128 --seq 128 --kd-positions all $peer"
    exit "$rc"
}

case "$mode" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: scripts/gpu-bench.sh prepare|run" >&2
    exit 2
    ;;
esac
