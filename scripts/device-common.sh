#!/usr/bin/env bash
# What scripts/gpu-check.sh and scripts/gpu-bench.sh share (sourced, not run): building the
# carried folder here, and finding the CUDA libraries on the lent GPU machine.

# Here, on a machine without a GPU: `recycle` in release with `--features cuda` (nvcc
# required: the kernels must be in the binary), stripped, and the PyTorch peer
# (torch_kd_overhead.py) beside it, in .device/ (ignored by git). $1 names the script that
# will run there (for the closing hint).
device_prepare() {
    set -e
    local script="$1" root
    root="$(pwd)"
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
    device_data
    du -sh .device/*
    echo "ready: run \`bash scripts/$script run\` on the GPU machine with carry [\".device\"]"
}

# Here: the first 6,000 training and 2,000 test images of Fashion-MNIST (Debian's
# dataset-fashion-mnist) as IDX files of their own, 4 MB instead of 30, into .device/data/, so
# that `scripts/gpu-check.sh run` can train on the GPU machine (which has no such package).
device_data() {
    local src=/usr/share/datasets/fashion-mnist
    if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
        echo "warning: $src is missing (apt-get install dataset-fashion-mnist): the run will skip training" >&2
        return 0
    fi
    mkdir -p .device/data
    python3 - "$src" .device/data <<'PY'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
for split, keep in (("train", 6000), ("t10k", 2000)):
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):
        name = f"{split}-{kind}-ubyte.gz"
        with gzip.open(f"{src}/{name}", "rb") as f:
            data = f.read()
        magic, count = struct.unpack(">II", data[:8])
        item = (len(data) - header) // count
        out = data[:4] + struct.pack(">I", keep) + data[8:header] + data[header:header + keep * item]
        with gzip.open(f"{dst}/{name}", "wb", compresslevel=9) as f:
            f.write(out)
PY
}

# There, on the GPU machine: puts the folders of cuBLASLt, cuDNN, NCCL and the driver on
# LD_LIBRARY_PATH (the driver's libcuda.so.1 is on the system path; the libraries come as
# PyTorch's wheels, site-packages/nvidia/*/lib, or with a toolkit under /usr/local) and notes
# the result in $1 (the run's env.txt).
device_libs() {
    local env_file="$1" dirs
    dirs="$(find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev \
        \( -name 'libcublasLt.so*' -o -name 'libcublas.so*' -o -name 'libcudnn.so*' \
           -o -name 'libnccl.so*' -o -name 'libcuda.so.1' \) 2>/dev/null |
        xargs -r -n1 dirname | sort -u | paste -sd: -)"
    # cudarc (0.19) opens NCCL as `libnccl.so` (or `.so.1`, `.so.9` ... `.so.13`), never as
    # `libnccl.so.2`, the only name NCCL's wheels and libnccl2 install: without a link under
    # the plain name the all-reduce group reports NCCL missing although it is there.
    local nccl link_dir
    nccl="$(find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev -name 'libnccl.so.2' 2>/dev/null |
        head -n1)"
    if [ -n "$nccl" ] && ! find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev \
        -name 'libnccl.so' 2>/dev/null | grep -q .; then
        link_dir="${TMPDIR:-/tmp}/recycle-nccl"
        mkdir -p "$link_dir"
        ln -sf "$nccl" "$link_dir/libnccl.so"
        dirs="${link_dir}${dirs:+:$dirs}"
    fi
    export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$env_file"
}

# There: the PyTorch peer (.device/torch_kd_overhead.py) on cuda, once per argument string
# after the first two, each under the time limit $2 (seconds), with the JSON lines appended to
# $1/torch_peer.jsonl and errors to $1/torch_peer.err. The interpreter is PYTHON, else the GPU
# machine's PyTorch (NOTES.md: /opt/torch/.venv), else python3. Skipped, saying so, when prepare
# found no peer.
device_peer() {
    local out="$1" limit="$2" py="${PYTHON:-/opt/torch/.venv/bin/python}" args
    shift 2
    [ -x "$py" ] || py=python3
    if [ ! -f "$root/.device/torch_kd_overhead.py" ]; then
        echo "skipped: .device/torch_kd_overhead.py is missing" | tee "$out/torch_peer.err"
        return 0
    fi
    for args in "$@"; do
        echo "-- torch_kd_overhead.py $args --device cuda"
        # shellcheck disable=SC2086
        PYTHONUNBUFFERED=1 timeout "$limit" "$py" "$root/.device/torch_kd_overhead.py" $args \
            --device cuda 2>>"$out/torch_peer.err" | tee -a "$out/torch_peer.jsonl"
    done
}

# There: the carried binary, checked, and the machine described into $2/env.txt (made here).
# $1 names the calling script (for the hint). Prints the binary's path; exits 2 without it.
device_start() {
    local script="$1" out="$2" bin="$root/.device/recycle"
    mkdir -p "$out"
    if [ ! -x "$bin" ]; then
        echo "error: $bin is missing: run \`scripts/$script prepare\` first and carry .device" >&2
        exit 2
    fi
    {
        echo "== machine"
        date -u
        uname -a
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
        nvidia-smi 2>&1 | head -n 15
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt" >&2
    echo "$bin"
}
