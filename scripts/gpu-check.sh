#!/usr/bin/env bash
# The device check of the CUDA backend, in two steps (see ../shared/device/NOTES.md):
#
#   scripts/gpu-check.sh prepare   here, on a machine without a GPU: builds `recycle` in release
#                                  with `--features cuda` (nvcc required: the kernels must be in
#                                  the binary), strips it, and copies it with the PyTorch peer
#                                  (torch_kd_overhead.py) and 8,000 Fashion-MNIST images into
#                                  .device/ (ignored by .gitignore); scripts/device-common.sh.
#   scripts/gpu-check.sh run       on the lent GPU machine, with .device carried: finds the CUDA
#                                  libraries, sets LD_LIBRARY_PATH, runs `recycle gpu-check`
#                                  (every CUDA op against its CPU twin; training steps of a
#                                  small ResNet and of BERT-tiny against the CPU's, in f32 and
#                                  bf16; a distillation step with the teacher on the teacher
#                                  stream; host copies; NCCL; then the step throughput of
#                                  ResNet-50 and BERT-base), then trains from recipes on the GPU
#                                  (a teacher, a bf16 student distilled from it, the teacher's
#                                  recipe on the CPU, `recycle report`), then the PyTorch peer
#                                  (a plain and a distillation step of the throughput rows'
#                                  models, on the same card), and writes everything under $OUT.
#
# The device tool's call: command `bash scripts/gpu-check.sh run`, carry [".device"], and a
# timeout that leaves room for one rerun. Limits: gpu-check 420 s, training 90 + 90 + 120 s,
# the peer 2 x 150 s; none of it has been timed on a GPU, and the typical run should be far
# shorter. GPU_CHECK_ARGS adds flags (e.g. `--no-throughput` on a small GPU,
# `--timed-steps 5`).
# Exit status: that of `recycle gpu-check` (non-zero when any check fails), else 3 when a
# training run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
mode="${1:-}"
# shellcheck source=scripts/device-common.sh
. "$root/scripts/device-common.sh"

prepare() {
    device_prepare gpu-check.sh
}

# A small ResNet trained on the GPU from recipes (6,000 Fashion-MNIST images carried in
# .device/data), then a bf16 student distilled from it with the teacher on the teacher stream,
# then the same teacher recipe on the CPU for comparison, and `recycle report` over the runs:
# the trainer's own GPU path (device, uploads, evaluation, checkpoints) end to end. Each run
# under a time limit; the status is non-zero when one fails.
train_on_gpu() {
    local bin="$1" out="$2" data="$root/.device/data" runs="$2/runs" status=0
    if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
        echo "skipped: $data is missing (prepare found no Fashion-MNIST)"
        return 0
    fi
    mkdir -p "$runs"
    recipe() { # name, device, activations, extra TOML
        cat <<TOML
name = "$1"
out_dir = "$runs"
device = "$2"
activations = "$3"
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
epochs = 3.0
evals = 6
[optimizer]
kind = "sgdw"
lr = 0.2
warmup = 0.1
$4
TOML
    }
    recipe teacher-gpu cuda:0 f32 "" >"$runs/teacher-gpu.toml"
    recipe student-gpu cuda:0 bf16 "[distill]
teachers = [\"$runs/teacher-gpu\"]
temperature = 1.0
weight = 1.0" >"$runs/student-gpu.toml"
    recipe teacher-cpu cpu f32 "" >"$runs/teacher-cpu.toml"
    local name limit t0 one
    for spec in "teacher-gpu 90" "student-gpu 90" "teacher-cpu 120"; do
        read -r name limit <<<"$spec"
        t0=$(date +%s)
        timeout "$limit" "$bin" train "$runs/$name.toml"
        one=$?
        echo "$name: exit status $one after $(($(date +%s) - t0)) s (limit $limit s)"
        [ "$one" -ne 0 ] && status=$one
    done
    # The plots need a font (Debian: fonts-dejavu-core), which the GPU machine may lack: the
    # table is what matters here, so a failed report does not fail the check.
    "$bin" report "$runs" --out "$out/report" || echo "recycle report failed (see above; a missing font only loses the plots)"
    return "$status"
}

run() {
    local out="${OUT:-$root/gpu-check-out}" bin
    bin="$(device_start gpu-check.sh "$out")" || exit 2

    echo "== CUDA libraries"
    device_libs "$out/env.txt"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1' | tee -a "$out/env.txt" || true

    echo "== recycle gpu-check"
    local t0 rc
    t0=$(date +%s)
    # The table is written to gpu-check.txt before the throughput steps start, so a timeout
    # there keeps it.
    # shellcheck disable=SC2086
    timeout 420 "$bin" gpu-check --device cuda:0 --out "$out/gpu-check.txt" ${GPU_CHECK_ARGS:-} \
        2>&1 | tee "$out/gpu-check.log"
    rc=${PIPESTATUS[0]}
    echo "gpu-check exit status $rc after $(($(date +%s) - t0)) s" | tee -a "$out/gpu-check.log"

    echo "== training on cuda:0 (the trainer's GPU path: a teacher, then a bf16 student distilled from it)"
    train_on_gpu "$bin" "$out" | tee "$out/train.log"
    [ "${PIPESTATUS[0]}" -ne 0 ] && [ "$rc" -eq 0 ] && rc=3

    echo "== PyTorch peer (plain step vs distillation step, same card)"
    # The same two steps as the throughput rows: ResNet-50 (256 images, 224x224) and BERT-base
    # (128 x 128 tokens), bf16 autocast; the peer prints its plain step beside its
    # distillation step.
    device_peer "$out" 150 "--model resnet50 --batch 256 --bf16 --iters 10 --warmup 3" \
        "--model bert-base --batch 128 --seq 128 --bf16 --kd-positions masked --iters 10 --warmup 3"
    exit "$rc"
}

case "$mode" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: scripts/gpu-check.sh prepare|run" >&2
    exit 2
    ;;
esac
