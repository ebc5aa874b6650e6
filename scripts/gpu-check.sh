#!/usr/bin/env bash
# The device check of the CUDA backend, in two steps (see ../shared/device/NOTES.md):
#
#   scripts/gpu-check.sh prepare   here, on a machine without a GPU: builds `recycle` in release
#                                  with `--features cuda` (nvcc required: the kernels must be in
#                                  the binary), strips it, and copies it with the PyTorch peer
#                                  (torch_kd_overhead.py) into .device/ (ignored by .gitignore).
#   scripts/gpu-check.sh run       on the lent GPU machine, with .device carried: finds the CUDA
#                                  libraries, sets LD_LIBRARY_PATH, runs `recycle gpu-check`
#                                  (every CUDA op against its CPU twin, one training step of a
#                                  small ResNet and of BERT-tiny against the CPU's, then the
#                                  step throughput of ResNet-50 and BERT-base), then the PyTorch peer
#                                  (a plain and a distillation step, on the same card), and
#                                  writes everything under $OUT.
#
# The device tool's call: command `bash scripts/gpu-check.sh run`, carry [".device"], and a
# timeout that leaves room for one rerun (the op checks should take well under a minute, the
# throughput steps a few minutes, the peer a few more; none of it has been timed on a GPU).
# GPU_CHECK_ARGS adds flags (e.g. `--no-throughput` on a small GPU, `--timed-steps 5`).
# Exit status: that of `recycle gpu-check` (non-zero when any check fails).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
mode="${1:-}"

prepare() {
    set -e
    export RECYCLE_REQUIRE_NVCC=1
    echo "== building recycle (release, --features cuda)"
    cargo build --release --features cuda --bin recycle
    mkdir -p .device
    cp "${CARGO_TARGET_DIR:-target}/release/recycle" .device/recycle
    strip .device/recycle
    # The shared folder sits beside the checkout (../shared), or two levels up for a worktree.
    local peer=""
    for d in "${RECYCLE_SHARED:-}" "$root/../shared" "$root/../../shared" "$root/shared"; do
        if [ -n "$d" ] && [ -f "$d/reference/torch_kd_overhead.py" ]; then
            peer="$d/reference/torch_kd_overhead.py"
            break
        fi
    done
    if [ -n "$peer" ]; then
        cp "$peer" .device/
    else
        echo "warning: shared/reference/torch_kd_overhead.py not found (set RECYCLE_SHARED): the run will skip the PyTorch peer" >&2
    fi
    cp scripts/gpu-check.sh .device/
    du -sh .device/*
    echo "ready: run \`bash scripts/gpu-check.sh run\` on the GPU machine with carry [\".device\"]"
}

run() {
    local out="${OUT:-$root/gpu-check-out}"
    mkdir -p "$out"
    local bin="$root/.device/recycle"
    if [ ! -x "$bin" ]; then
        echo "error: $bin is missing: run \`scripts/gpu-check.sh prepare\` first and carry .device" >&2
        exit 2
    fi
    {
        echo "== machine"
        uname -a
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
        nvidia-smi 2>&1 | head -n 15
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"

    echo "== CUDA libraries"
    # The driver's libcuda.so.1 is on the system path; cuBLAS, cuDNN and NCCL come as PyTorch's
    # wheels (site-packages/nvidia/*/lib) or with a toolkit under /usr/local.
    local dirs
    dirs="$(find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev \
        \( -name 'libcublasLt.so*' -o -name 'libcublas.so*' -o -name 'libcudnn.so*' \
           -o -name 'libnccl.so*' -o -name 'libcuda.so.1' \) 2>/dev/null |
        xargs -r -n1 dirname | sort -u | paste -sd: -)"
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$out/env.txt"
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

    echo "== PyTorch peer (plain step vs distillation step, same card)"
    local py="${PYTHON:-/opt/torch/.venv/bin/python}"
    [ -x "$py" ] || py=python3
    if [ -f "$root/.device/torch_kd_overhead.py" ]; then
        for args in "--model resnet18-fmnist" "--model resnet50 --batch 64 --bf16" \
                    "--model bert-tiny --bf16"; do
            echo "-- torch_kd_overhead.py $args --device cuda"
            # shellcheck disable=SC2086
            PYTHONUNBUFFERED=1 timeout 150 "$py" "$root/.device/torch_kd_overhead.py" $args \
                --device cuda --iters 10 --warmup 3 2>>"$out/torch_peer.err" |
                tee -a "$out/torch_peer.jsonl"
        done
    else
        echo "skipped: .device/torch_kd_overhead.py is missing" | tee "$out/torch_peer.err"
    fi
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
