// Shared device code of every kernel family: element types, arithmetic that must round like the
// CPU twins, the counter-based random numbers of engine/src/rng.rs, and block reductions.
//
// Conventions of every family:
// - Kernels are `extern "C"` (unmangled names; build.rs reads their signatures into the
//   typed launchers of `recycle_kernels::launchers`).
// - A suffix names the storage type of the activation tensors a kernel reads and writes:
//   `_f32` (float) or `_bf16` (__nv_bfloat16). Arithmetic is always fp32 (wider where a CPU
//   twin accumulates in f64); parameters, statistics and parameter gradients are fp32.
// - Sizes are unsigned 32-bit (rows, columns, channels) or 64-bit (element counts).
// - Pointers that may alias (in-place use) are not marked __restrict__.
// - Block-reduction kernels need blockDim.x to be a multiple of 32 and at most 1024; the launch
//   helpers of the Rust crate (`launch.rs`) choose it from the shape alone, never from the
//   device, so a reduction adds in the same order on every GPU.
//
// Everything marked RK_HD also compiles for the host: tests/host/parity.cu runs it on the CPU
// and compares it with the engine's CPU twins.

#pragma once

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#define RK_HD __host__ __device__ __forceinline__

namespace rk {

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

RK_HD float to_f32(float x) { return x; }
RK_HD float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> RK_HD T from_f32(float x);
template <> RK_HD float from_f32<float>(float x) { return x; }
// Round to nearest even, as half::bf16::from_f32 (the engine's `cast`).
template <> RK_HD bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// Arithmetic that rounds after every operation
// ---------------------------------------------------------------------------------------------
//
// nvcc contracts `a * b + c` into one fused multiply-add, which rounds once; Rust never does.
// Where a kernel promises the CPU twin's exact bits (optimizers, dropout, casts, normalisation
// affine maps), it spells each operation with these.

RK_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
RK_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
RK_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
RK_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
RK_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(a);
#else
    return sqrtf(a);
#endif
}

// ---------------------------------------------------------------------------------------------
// Counter-based random numbers (engine/src/rng.rs, bit for bit)
// ---------------------------------------------------------------------------------------------

#define RK_GOLDEN 0x9e3779b97f4a7c15ULL

// SplitMix64's finaliser (rng::mix64).
RK_HD uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The per-stream key: the inner mix of rng::bits_at, hoisted out of element loops.
RK_HD uint64_t stream_key(uint64_t seed) { return mix64(seed ^ RK_GOLDEN); }

// rng::bits_at(seed, index) == bits_at_key(stream_key(seed), index).
RK_HD uint64_t bits_at_key(uint64_t key, uint64_t index) {
    return mix64(key + index * RK_GOLDEN);
}

// rng::uniform_at: the top 24 bits scaled by 2^-24, exact in f32.
RK_HD float uniform_at_key(uint64_t key, uint64_t index) {
    return (float)(uint32_t)(bits_at_key(key, index) >> 40) * (1.0f / 16777216.0f);
}

// ops::dropout::keep: element `index` survives iff uniform_at(seed, index) >= p.
RK_HD bool dropout_keep(uint64_t key, uint64_t index, float p) {
    return uniform_at_key(key, index) >= p;
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp
// ---------------------------------------------------------------------------------------------
//
// A running (max, sum of exp(x - max)) pair: one pass over a row gives its log-normaliser, and
// two pairs merge, so threads, then warps, then the block combine partial rows. A row of -inf
// gives m = -inf, s = 0 and lse = -inf; a NaN lands in s (NaN - m) and propagates.

struct Lse {
    float m;
    float s;
};

RK_HD Lse lse_empty() { return Lse{-INFINITY, 0.0f}; }

RK_HD Lse lse_push(Lse a, float x) {
    // One exponential either way (a branch on each side would evaluate both under
    // predication): exp(old max - x) rescales the sum when x is the new max, exp(x - max)
    // is x's term otherwise. exp(-inf) is 0, so the first finite value starts the sum at 1;
    // -inf adds nothing; NaN makes e, hence s, NaN.
    const bool grow = x > a.m;
    const float e = expf(grow ? a.m - x : x - a.m);
    if (grow) {
        a.s = a.s * e + 1.0f;
        a.m = x;
    } else if (x != -INFINITY) {
        a.s += e;
    }
    return a;
}

RK_HD Lse lse_merge(Lse a, Lse b) {
    if (a.m == -INFINITY) return Lse{b.m, a.s + b.s};
    if (b.m == -INFINITY) return Lse{a.m, a.s + b.s};
    float m = fmaxf(a.m, b.m);
    return Lse{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

RK_HD float lse_value(Lse a) { return a.m == -INFINITY ? -INFINITY : a.m + logf(a.s); }

#if defined(__CUDACC__) || defined(RK_HOST_SIM)

// ---------------------------------------------------------------------------------------------
// Reductions (device code; the host simulator, sim/simt.hpp, runs them on CPU threads)
// ---------------------------------------------------------------------------------------------

#define RK_FULL_MASK 0xffffffffu

// Grid-stride loop over [0, n) with a 64-bit index.
#define RK_GRID_STRIDE(i, n)                                                       \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);    \
         i += (uint64_t)blockDim.x * gridDim.x)

struct SumOp {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(RK_FULL_MASK, v, o));
    return v;
}

// Reduces one value per thread over the block; every thread gets the result. `scratch` is
// shared memory of 32 elements. The butterfly and the warp order are fixed, so for a given
// blockDim the result is the same on every run. The leading barrier lets a kernel call this
// repeatedly with the same scratch.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op, T identity) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : identity;
    return warp_reduce(v, op);
}

template <typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
    return block_reduce(v, scratch, SumOp(), T(0));
}

__device__ __forceinline__ Lse warp_lse(Lse a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Lse b{__shfl_xor_sync(RK_FULL_MASK, a.m, o), __shfl_xor_sync(RK_FULL_MASK, a.s, o)};
        a = lse_merge(a, b);
    }
    return a;
}

// Block-wide merge of online log-sum-exp pairs; every thread gets the row's pair. `scratch` is
// shared memory of 32 pairs.
__device__ __forceinline__ Lse block_lse(Lse a, Lse* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    a = warp_lse(a);
    __syncthreads();
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    a = lane < warps ? scratch[lane] : lse_empty();
    return warp_lse(a);
}

#endif  // __CUDACC__ || RK_HOST_SIM

}  // namespace rk
