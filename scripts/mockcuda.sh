#!/usr/bin/env bash
# The mock CUDA (mockcuda/, docs/mockcuda.md): builds the mock's shared library and the real
# `recycle` binary with `--features cuda`, makes target/mockcuda/ — one symlink per library
# name cudarc and the engine open, all to the one libmockcuda.so — and prints the
# LD_LIBRARY_PATH that makes the unchanged binary run its GPU path on the CPU.
#
#   scripts/mockcuda.sh            build and make the folder (debug profile)
#   PROFILE=release scripts/mockcuda.sh
#   scripts/mockcuda.sh run ARGS   the same, then `recycle ARGS` under the mock
#
# nvcc is required (RECYCLE_REQUIRE_NVCC=1): the binary must embed the kernels, and the mock
# runs them on the kernel simulator, which compiles their CUDA source with the host compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-debug}"
flag=""
[ "$profile" = release ] && flag="--release"
target="${CARGO_TARGET_DIR:-target}"
export RECYCLE_REQUIRE_NVCC=1

echo "== building the mock (libmockcuda.so) and recycle --features cuda ($profile)" >&2
cargo build $flag -p recycle-mockcuda --lib >&2
cargo build $flag -p recycle --features cuda --bin recycle >&2

lib="$(cd "$target/$profile" && pwd)/libmockcuda.so"
[ -f "$lib" ] || { echo "error: $lib was not built" >&2; exit 1; }
dir="$target/mockcuda"
mkdir -p "$dir"
# The sonames cudarc tries first, and the unversioned names (cudarc opens libnccl.so).
for name in libcuda.so libcuda.so.1 libcublasLt.so libcublasLt.so.13 libcublas.so \
    libcublas.so.13 libcudnn.so libcudnn.so.9 libnccl.so libnccl.so.2; do
    ln -sfn "$lib" "$dir/$name.tmp" && mv -Tf "$dir/$name.tmp" "$dir/$name"
done
dir="$(cd "$dir" && pwd)"
echo "LD_LIBRARY_PATH=$dir"

if [ "${1:-}" = run ]; then
    shift
    LD_LIBRARY_PATH="$dir" exec "$target/$profile/recycle" "$@"
fi
