#!/usr/bin/env bash
# Resource report of the CUDA kernels, as quoted in docs/kernels.md: for one architecture, the
# `ptxas -v` figures of every kernel (registers, spills, stack, shared memory) from the reports
# kernels/build.rs keeps next to the fatbins, and, when cuobjdump is installed
# (`pip install nvidia-cuda-cuobjdump`), a count of selected SASS instructions per kernel.
#
# Usage: scripts/kernels-report.sh [sm_90] [kernel-name-regex]
# after `cargo build -p recycle-kernels` with nvcc available.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-sm_90}"
filter="${2:-.}"

# The newest build-script output directory that holds compiled kernels.
out=""
for d in $(ls -td target/*/build/recycle-kernels-*/out 2>/dev/null); do
    if grep -q 'AVAILABLE: bool = true' "$d/kernels.rs" 2>/dev/null; then
        out="$d"
        break
    fi
done
if [ -z "$out" ]; then
    echo "no compiled kernels under target/: run 'RECYCLE_REQUIRE_NVCC=1 cargo build -p recycle-kernels' first" >&2
    exit 1
fi
echo "reports: $out ($(grep -o 'NVCC_VERSION: &str = "[^"]*"' "$out/kernels.rs" | cut -d'"' -f2))"
echo
echo "| kernel | registers | spill stores / loads (bytes) | stack (bytes) | static shared memory (bytes) |"
echo "|---|---:|---:|---:|---:|"
for report in "$out"/*.ptxas.txt; do
    awk -v arch="'$arch'" -v filter="$filter" '
        /Compiling entry function/ { name = $7; gsub(/\047/, "", name); on = ($9 == arch) && (name ~ filter); next }
        on && /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
        on && /Used [0-9]+ registers/ {
            regs = $5; smem = 0
            if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ .*/, "", smem) }
            printf "| `%s` | %s | %s / %s | %s | %s |\n", name, regs, st, ld, stack, smem
            on = 0
        }' "$report"
done

objdump="$(dirname "$(grep -o 'NVCC_PATH: &str = "[^"]*"' "$out/kernels.rs" | cut -d'"' -f2)")/cuobjdump"
if [ ! -x "$objdump" ]; then
    objdump="$(command -v cuobjdump || true)"
fi
if [ -z "$objdump" ]; then
    echo
    echo "(cuobjdump not found: no SASS summary)"
    exit 0
fi
echo
echo "SASS instruction counts ($arch): MUFU (special-function unit: exp2, rcp, rsqrt, lg2),"
echo "FFMA, loads by width, local-memory traffic (LDL/STL: none means no spills), calls."
echo
echo "| kernel | instructions | MUFU | FFMA | FMUL + FADD | LDG (widths) | LDL + STL | CALL |"
echo "|---|---:|---:|---:|---:|---|---:|---:|"
for fatbin in "$out"/*.fatbin; do
    for name in $("$objdump" -sass -arch "$arch" "$fatbin" | awk '/Function :/ {print $3}' | grep -E "$filter" || true); do
        "$objdump" -sass -arch "$arch" -fun "$name" "$fatbin" |
            grep -E '^\s+/\*[0-9a-f]{4}\*/' | sed 's/;.*//; s/^\s*\/\*[0-9a-f]*\*\/\s*//; s/^@!\?U\?P[0-9T]* *//' |
            awk -v name="$name" '
                { n++; op = $1 }
                op ~ /^MUFU/ { mufu++ }
                op ~ /^FFMA/ { ffma++ }
                op ~ /^(FMUL|FADD)/ { fmad++ }
                op ~ /^LDG/ { w = op; sub(/^LDG\.E\.?/, "", w); if (w == "") w = "32"; ldg[w]++ }
                op ~ /^(LDL|STL)/ { local++ }
                op ~ /^CALL/ { call++ }
                END {
                    widths = ""
                    for (w in ldg) widths = widths (widths == "" ? "" : ", ") w " x" ldg[w]
                    printf "| `%s` | %d | %d | %d | %d | %s | %d | %d |\n", name, n, mufu, ffma, fmad, widths, local, call
                }'
    done
done
