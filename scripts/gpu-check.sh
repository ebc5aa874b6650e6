#!/usr/bin/env bash
# The device check of the CUDA backend, in two steps:
#
#   scripts/gpu-check.sh prepare   on a machine without a GPU: builds `recycle` in release with
#                                  `--features cuda` (nvcc required: the kernels must be in the
#                                  binary), strips it into .device/ (ignored by git) with 8,000
#                                  Fashion-MNIST images (scripts/device-common.sh).
#   scripts/gpu-check.sh run       on the GPU machine, in a copy of the repository with .device/:
#                                  sets the library path (never a toolkit's compat/ or stubs/),
#                                  logs which libcuda.so.1 was loaded and what cuInit returned,
#                                  then, each stage under its own time limit so that the whole
#                                  run ends within 9 minutes (RUN_BUDGET_S, default 530 s):
#                                    1. `recycle gpu-check` (every CUDA op against its CPU twin,
#                                       the model steps, the teacher stream, NCCL, then the
#                                       throughput of ResNet-50 and BERT-base), with a deadline
#                                       so that it stops cleanly before its limit;
#                                    2. `recycle bench --device cuda:0` (ResNet-50 and BERT-base);
#                                    3. the PyTorch peer (scripts/reference/torch_kd_overhead.py,
#                                       run by $PYTHON) on the same shapes;
#                                    4. with the time left, training from recipes on cuda:0.
#                                  Everything goes into one archive,
#                                  $RESULTS_DIR/gpu-check-<UTC time>.tar.gz (RESULTS_DIR
#                                  defaults to gpu-check-out/), and the summary is printed.
#   scripts/gpu-check.sh dry-run   `run` on a machine without a GPU (CI): it must report that
#                                  there is no driver or GPU, write the archive and exit 0,
#                                  within 2 minutes.
#
# Environment: RECYCLE_BIN (the binary, default .device/recycle), PYTHON (the peer's PyTorch
# interpreter), GPU_CHECK_ARGS (more flags for gpu-check, e.g. `--no-throughput`),
# BENCH_ITERS (default 3), RESULTS_DIR, RUN_BUDGET_S.
# Exit status of `run`: that of `recycle gpu-check` (non-zero when a check failed or did not
# run), else 3 when the benchmark or training failed; 4 without a driver, 5 when cuInit failed
# or found no GPU, 6 when the driver could not be probed.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
mode="${1:-}"
# shellcheck source=scripts/device-common.sh
. "$root/scripts/device-common.sh"

prepare() {
    device_prepare gpu-check.sh
}

# A small ResNet trained on cuda:0 from recipes (6,000 Fashion-MNIST images in .device/data):
# a teacher, then a bf16 student distilled from it with the teacher on the teacher stream.
# $3: seconds for both. Status non-zero when one fails.
train_on_gpu() {
    local bin="$1" out="$2" budget="$3" data="$root/.device/data" runs="$2/runs" status=0
    if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
        echo "skipped: $data is missing (prepare found no Fashion-MNIST)"
        return 0
    fi
    mkdir -p "$runs"
    recipe() { # name, activations, extra TOML
        cat <<TOML
name = "$1"
out_dir = "$runs"
device = "cuda:0"
activations = "$2"
[model]
kind = "resnet"
depth = 18
width = 0.25
small_stem = true
[data]
dataset = "fashion-mnist"
dir = "$data"
train_limit = 6000
eval_limit = 2000
[train]
batch_size = 128
epochs = 2.0
evals = 4
[optimizer]
kind = "sgdw"
lr = 0.2
warmup = 0.1
$3
TOML
    }
    recipe teacher-gpu f32 "" >"$runs/teacher-gpu.toml"
    recipe student-gpu bf16 "[distill]
teachers = [\"$runs/teacher-gpu\"]
temperature = 1.0
weight = 1.0" >"$runs/student-gpu.toml"
    local name limit t0 one half=$((budget / 2))
    for name in teacher-gpu student-gpu; do
        limit="$half"
        t0=$(date +%s)
        timeout "$limit" "$bin" train "$runs/$name.toml"
        one=$?
        echo "$name: exit status $one after $(($(date +%s) - t0)) s (limit $limit s)"
        [ "$one" -ne 0 ] && status=$one
    done
    return "$status"
}

# One stage: its name, then the command; logs the exit status and seconds to summary.txt.
stage_done() {
    local name="$1" status="$2" t0="$3" limit="$4"
    echo "$name: exit status $status after $(($(date +%s) - t0)) s (limit $limit s)" |
        tee -a "$work/summary.txt"
}

run() {
    local results="${RESULTS_DIR:-$root/gpu-check-out}" stamp bin rc=0
    device_budget "${RUN_BUDGET_S:-530}"
    stamp="$(date -u +%Y%m%dT%H%M%SZ)"
    # The results are gathered in .device/ and leave as one archive.
    work="$root/.device/gpu-check-$stamp"
    mkdir -p "$work" "$results"
    bin="$(device_start gpu-check.sh "$work")" || exit 2

    echo "== CUDA libraries and driver"
    device_libs "$work/env.txt"
    device_probe "$work/env.txt"
    local probe=$?
    echo "driver probe: status $probe" >>"$work/summary.txt"
    if [ "$probe" -ne 0 ]; then
        echo "no usable GPU (driver probe status $probe, see above): gpu-check, the benchmark and the peer were not run" |
            tee -a "$work/summary.txt"
        rc=$probe
    else
        gpu_stages "$bin"
        rc=$?
    fi
    local archive="$results/gpu-check-$stamp.tar.gz"
    tar -czf "$archive.partial" -C "$root/.device" "gpu-check-$stamp" &&
        mv "$archive.partial" "$archive" && rm -rf "$work"
    echo "== summary"
    tar -xzOf "$archive" "gpu-check-$stamp/summary.txt" 2>/dev/null
    echo "results: $archive ($(du -h "$archive" | cut -f1))"
    return "$rc"
}

# The stages on a machine whose driver answered: gpu-check, the benchmark, the peer, then
# training with the time left. Status as `run`'s.
gpu_stages() {
    local bin="$1" rc=0 t0 limit status

    echo "== recycle gpu-check"
    # 120 s are kept for the benchmark and the peer; the deadline leaves the throughput
    # measurement 90 s of the stage's limit.
    limit="$(device_limit 300 150)"
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout "$limit" "$bin" gpu-check --device cuda:0 --out "$work/gpu-check.txt" \
        --deadline-s $((limit > 120 ? limit - 90 : limit / 2)) ${GPU_CHECK_ARGS:-} \
        2>&1 | tee "$work/gpu-check.log"
    rc=${PIPESTATUS[0]}
    stage_done "gpu-check" "$rc" "$t0" "$limit"

    echo "== recycle bench --device cuda:0"
    local model
    for model in resnet50-imagenet bert-base; do
        limit="$(device_limit 60 70)"
        t0=$(date +%s)
        timeout "$limit" "$bin" bench --device cuda:0 --model "$model" \
            --iters "${BENCH_ITERS:-3}" --warmup 1 --json 2>&1 | tee -a "$work/bench.md"
        status=${PIPESTATUS[0]}
        stage_done "bench $model" "$status" "$t0" "$limit"
        [ "$status" -ne 0 ] && [ "$rc" -eq 0 ] && rc=3
    done
    grep '^{' "$work/bench.md" >"$work/bench.jsonl" || true

    echo "== PyTorch peer (plain step vs distillation step, same card, bf16 autocast)"
    limit="$(device_limit 35 0)"
    t0=$(date +%s)
    device_peer "$work" "$limit" "--model resnet50 --batch 256 --bf16 --iters 10 --warmup 3" \
        "--model bert-base --batch 128 --seq 128 --bf16 --kd-positions masked --iters 10 --warmup 3"
    stage_done "peer" "$?" "$t0" "$((2 * limit))"

    limit="$(device_left 10)"
    if [ "$limit" -ge 60 ]; then
        echo "== training on cuda:0 (a teacher, then a bf16 student distilled from it; $limit s)"
        t0=$(date +%s)
        train_on_gpu "$bin" "$work" "$limit" 2>&1 | tee "$work/train.log"
        status=${PIPESTATUS[0]}
        stage_done "training" "$status" "$t0" "$limit"
        [ "$status" -ne 0 ] && [ "$rc" -eq 0 ] && rc=3
    else
        echo "training: not run ($limit s left of the budget)" | tee -a "$work/summary.txt"
    fi
    return "$rc"
}

# `run` where there is no GPU: passes when it reports the missing driver or GPU (status 4, 5
# or 6) and leaves the archive, within its limit.
dry_run() {
    local out status
    out="$(RUN_BUDGET_S=100 timeout 120 bash "$root/scripts/gpu-check.sh" run 2>&1)"
    status=$?
    echo "$out"
    case "$status" in
    4 | 5 | 6) ;;
    *)
        echo "dry run: expected a report of no driver or GPU (status 4, 5 or 6), got status $status" >&2
        return 1
        ;;
    esac
    if ! grep -q "^driver probe: " <<<"$out"; then
        echo "dry run: the driver probe printed nothing" >&2
        return 1
    fi
    local archive
    archive="$(grep -o 'results: [^ ]*\.tar\.gz' <<<"$out" | cut -d' ' -f2)"
    if [ -z "$archive" ] || ! tar -tzf "$archive" | grep -q 'summary.txt$'; then
        echo "dry run: no archive with a summary (${archive:-none named})" >&2
        return 1
    fi
    echo "dry run: reported no usable GPU (status $status) and wrote $archive"
}

case "$mode" in
prepare) prepare ;;
run) run ;;
dry-run) dry_run ;;
*)
    echo "usage: scripts/gpu-check.sh prepare|run|dry-run" >&2
    exit 2
    ;;
esac
