#!/usr/bin/env bash
# What scripts/gpu-check.sh and scripts/gpu-bench.sh share (sourced, not run): building the
# .device/ folder on a machine without a GPU, and, on the GPU machine, finding the CUDA
# libraries, probing the driver, timing the stages and running the PyTorch peer. Every path is
# inside the repository ($root, set by the caller) or a system library folder.

# Here, on a machine without a GPU: `recycle` in release with `--features cuda` (nvcc
# required: the kernels must be in the binary), stripped, into .device/ (ignored by git),
# with 8,000 Fashion-MNIST images. $1 names the script that will run there (for the hint).
device_prepare() {
    set -e
    local script="$1"
    export RECYCLE_REQUIRE_NVCC=1
    echo "== building recycle (release, --features cuda)"
    cargo build --release --features cuda --bin recycle
    mkdir -p .device
    cp "${CARGO_TARGET_DIR:-target}/release/recycle" .device/recycle
    strip .device/recycle
    if [ ! -f "$root/scripts/reference/torch_kd_overhead.py" ]; then
        echo "warning: scripts/reference/torch_kd_overhead.py is missing: the run will skip the PyTorch peer" >&2
    fi
    device_data
    du -sh .device/*
    echo "ready: copy the repository with .device/ to the GPU machine and run \`bash scripts/$script run\` there"
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

# True for a folder that must never be on the library path: a CUDA toolkit's compat/ (a
# forward-compatibility libcuda that fails against an older kernel driver) or stubs/ (a
# libcuda that links but whose every call fails).
device_lib_forbidden() {
    case "$1/" in
    */compat/* | */stubs/*) return 0 ;;
    *) return 1 ;;
    esac
}

# There, on the GPU machine: puts the folders of cuBLASLt, cuDNN, NCCL and the driver on
# LD_LIBRARY_PATH (the driver's libcuda.so.1 is on the system path; the libraries come as
# PyTorch's wheels, site-packages/nvidia/*/lib, or with a toolkit under /usr/local), never a
# toolkit's compat/ or stubs/ folder (also dropped from an inherited LD_LIBRARY_PATH), and
# notes the result in $1 (the run's env.txt).
device_libs() {
    local env_file="$1" dir dirs="" kept=""
    while IFS= read -r dir; do
        [ -z "$dir" ] && continue
        if device_lib_forbidden "$dir"; then
            echo "library path: skipping $dir (a toolkit's compat/ or stubs/)" | tee -a "$env_file"
            continue
        fi
        dirs="${dirs:+$dirs:}$dir"
    done < <(find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev \
        \( -name 'libcublasLt.so*' -o -name 'libcublas.so*' -o -name 'libcudnn.so*' \
        -o -name 'libnccl.so*' -o -name 'libcuda.so.1' \) 2>/dev/null | xargs -r -n1 dirname | sort -u)
    # cudarc (0.19) opens NCCL as `libnccl.so` (or `.so.1`, `.so.9` ... `.so.13`), never as
    # `libnccl.so.2`, the only name NCCL's wheels and libnccl2 install: without a link under
    # the plain name the all-reduce group reports NCCL missing although it is there.
    local nccl link_dir="$root/.device/lib"
    nccl="$(find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev -name 'libnccl.so.2' 2>/dev/null |
        while IFS= read -r f; do device_lib_forbidden "$(dirname "$f")" || echo "$f"; done | head -n1)"
    if [ -n "$nccl" ] && ! find /opt /usr/local /usr/lib /usr/lib64 /lib -xdev \
        -name 'libnccl.so' 2>/dev/null | grep -q .; then
        mkdir -p "$link_dir"
        ln -sf "$nccl" "$link_dir/libnccl.so"
        dirs="${link_dir}${dirs:+:$dirs}"
    fi
    local inherited
    IFS=: read -r -a inherited <<<"${LD_LIBRARY_PATH:-}"
    for dir in "${inherited[@]}"; do
        [ -z "$dir" ] && continue
        if device_lib_forbidden "$dir"; then
            echo "library path: dropping inherited $dir (a toolkit's compat/ or stubs/)" | tee -a "$env_file"
        else
            kept="${kept:+$kept:}$dir"
        fi
    done
    if [ -n "$dirs$kept" ]; then
        export LD_LIBRARY_PATH="${dirs}${kept:+${dirs:+:}$kept}"
    else
        # An empty entry would mean the working folder.
        unset LD_LIBRARY_PATH
    fi
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-(unset)}" | tee -a "$env_file"
}

# There: loads libcuda.so.1 as the binary will (same LD_LIBRARY_PATH), logs the file that
# was loaded, what cuInit(0) returned, the driver's CUDA version and the device count, into
# $1 (appended) and stdout. Status: 0 when cuInit succeeded with a device; 4 when there is no
# driver (libcuda.so.1 not found); 5 when cuInit failed or found no device; 6 when the probe
# itself could not run (no python3) or hung (20 s).
device_probe() {
    local log="$1" rc
    if ! command -v python3 >/dev/null; then
        {
            echo "driver probe: python3 is missing, so cuInit was not called; libcuda.so.1 by ldconfig:"
            ldconfig -p 2>/dev/null | grep -E 'libcuda\.so\.1' || echo "  (none)"
        } | tee -a "$log"
        return 6
    fi
    timeout 20 python3 - <<'PY' 2>&1 | tee -a "$log"
import ctypes, os, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"driver probe: libcuda.so.1 cannot be loaded ({e}): no NVIDIA driver on this machine")
    sys.exit(4)
with open("/proc/self/maps") as maps:
    paths = sorted({line.split()[-1] for line in maps if "libcuda.so" in line})
for p in paths:
    print(f"driver probe: libcuda loaded from {p} (real file {os.path.realpath(p)})")
rc = cuda.cuInit(0)
name = ctypes.c_char_p()
cuda.cuGetErrorName(rc, ctypes.byref(name))
print(f"driver probe: cuInit(0) returned {rc} ({name.value.decode() if name.value else 'unknown code'})")
if rc != 0:
    sys.exit(5)
version, count = ctypes.c_int(), ctypes.c_int()
cuda.cuDriverGetVersion(ctypes.byref(version))
cuda.cuDeviceGetCount(ctypes.byref(count))
v = version.value
print(f"driver probe: driver CUDA {v // 1000}.{(v % 1000) // 10}, {count.value} device(s)")
sys.exit(0 if count.value > 0 else 5)
PY
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then
        echo "driver probe: no answer within 20 s (a hung driver)" | tee -a "$log"
        rc=6
    fi
    return "$rc"
}

# There: seconds left before the run's budget ends ($device_deadline, epoch seconds, set by
# device_budget), less $1 seconds kept for what must follow; never below 0.
device_left() {
    local left=$((device_deadline - $(date +%s) - ${1:-0}))
    [ "$left" -lt 0 ] && left=0
    echo "$left"
}

# There: starts the run's clock: $1 seconds in all.
device_budget() {
    device_deadline=$(($(date +%s) + $1))
}

# There: the smaller of $1 and what device_left $2 allows.
device_limit() {
    local want="$1" left
    left="$(device_left "${2:-0}")"
    [ "$left" -lt "$want" ] && want="$left"
    echo "$want"
}

# There: the PyTorch peer (scripts/reference/torch_kd_overhead.py) on cuda, once per argument
# string after the first two, each under the time limit $2 (seconds), with the JSON lines
# appended to $1/torch_peer.jsonl and errors to $1/torch_peer.err. The interpreter is $PYTHON
# (one with PyTorch and CUDA); without it the peer is skipped, saying so. Status: non-zero
# when the peer could not run.
device_peer() {
    local out="$1" limit="$2" peer="$root/scripts/reference/torch_kd_overhead.py" args
    shift 2
    if [ -z "${PYTHON:-}" ]; then
        echo "peer skipped: set PYTHON to an interpreter with PyTorch (e.g. PYTHON=/path/to/venv/bin/python)" |
            tee -a "$out/torch_peer.err"
        return 1
    fi
    if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
        echo "peer skipped: PYTHON=$PYTHON is not an executable" | tee -a "$out/torch_peer.err"
        return 1
    fi
    if [ ! -f "$peer" ]; then
        echo "peer skipped: scripts/reference/torch_kd_overhead.py is missing" | tee -a "$out/torch_peer.err"
        return 1
    fi
    for args in "$@"; do
        echo "-- torch_kd_overhead.py $args --device cuda (limit $limit s)"
        # shellcheck disable=SC2086
        PYTHONUNBUFFERED=1 timeout "$limit" "$PYTHON" "$peer" $args \
            --device cuda 2>>"$out/torch_peer.err" | tee -a "$out/torch_peer.jsonl"
    done
}

# The newest glibc symbol version the binary $1 needs (`objdump -T`, else the version strings
# in the file) against the host's glibc (`ldd --version`): a host older than the binary's need
# cannot start it ("version `GLIBC_2.xx' not found"), so this is said before anything runs.
device_glibc() {
    local bin="$1" need host
    if command -v objdump >/dev/null; then
        need="$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
    else
        need="$(grep -ao 'GLIBC_2\.[0-9.]*[0-9]' "$bin" | sort -uV | tail -n1)"
    fi
    host="$(ldd --version 2>&1 | head -n1)"
    echo "glibc: the binary needs ${need:-(unknown)}; the host: ${host:-(ldd missing)}"
    local have="${host##* }"
    if [ -n "$need" ] && [ -n "$have" ] && [ "${have#*.}" != "$have" ]; then
        if [ "$(printf '%s\n%s\n' "${need#GLIBC_}" "$have" | sort -V | head -n1)" = "$have" ] &&
            [ "${need#GLIBC_}" != "$have" ]; then
            echo "glibc: the host's $have is older than the binary's ${need#GLIBC_}: it will not start; build it (scripts/$2 prepare) on a machine with glibc $have or older"
        else
            echo "glibc: $have >= ${need#GLIBC_}: the binary can start"
        fi
    fi
}

# There: the binary ($RECYCLE_BIN, else .device/recycle), checked, and the machine described
# into $2/env.txt (made here). $1 names the calling script (for the hint). Prints the binary's
# path; exits 2 without it.
device_start() {
    local script="$1" out="$2" bin="${RECYCLE_BIN:-$root/.device/recycle}"
    mkdir -p "$out"
    case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
    if [ ! -x "$bin" ]; then
        echo "error: $bin is missing: run \`scripts/$script prepare\` first (or set RECYCLE_BIN)" >&2
        exit 2
    fi
    {
        echo "== machine"
        date -u
        uname -a
        echo "binary: $bin"
        device_glibc "$bin" "$script"
        if command -v nvidia-smi >/dev/null; then
            timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
            timeout 15 nvidia-smi 2>&1 | head -n 15
        else
            echo "nvidia-smi: not installed"
        fi
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt" >&2
    echo "$bin"
}
