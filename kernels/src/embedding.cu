// Embedding lookup (and every other row gather) with a deterministic backward.
//
// CPU twins (engine/src/ops/embedding.rs, gather.rs):
//   embedding_fwd_T          gather_rows_forward_cpu / embedding_forward_cpu: out[p] = w[ids[p]]
//   embedding_bwd_*          scatter_add_rows_cpu / embedding_backward_cpu:
//                            dW[v] = sum of g[p] over positions p with ids[p] == v, added in
//                            increasing p. The GPU follows the CPU's algorithm, a stable
//                            counting sort of positions by id, so each row adds the same values
//                            in the same order: bit-identical to the CPU, and no atomics on
//                            floating-point values (run-to-run identical).
//
// Forward: one block per position, `launch::embedding_forward(n_ids, dim)`.
// The backward, in five launches (`launch::embedding_backward(n_ids, vocab, dim)` sizes every
// scratch buffer and grid; `counts` must be zeroed before the first):
//   1. embedding_bwd_count    segments of SEGMENT positions: counts[v * segments + s] = how many
//                             positions of segment s hold id v (integer atomics: the counts do
//                             not depend on their order)
//   2. embedding_bwd_offsets  per id: counts[v][*] becomes its exclusive prefix over segments,
//                             and totals[v] the id's number of positions
//   3. embedding_bwd_scan     one block: starts[v] = exclusive prefix of totals over ids,
//                             starts[vocab] = n_ids
//   4. embedding_bwd_place    one block per segment: position p goes to
//                             order[starts[id] + counts[id][segment] + (earlier positions of the
//                             segment with the same id)], the stable place of the CPU's sort
//   5. embedding_bwd_accumulate_T  one block per vocabulary row: sums g[order[k]] for its k in
//                             order, then writes dW[v]
// Ids outside [0, vocab) are the caller's to reject (the CPU op checks them); the kernels skip
// them rather than write out of bounds, and the forward writes NaN for them.

#include "common.cuh"

using namespace rk;

// Positions per segment of the backward's counting sort; the block size of
// embedding_bwd_count and embedding_bwd_place. The generated
// `launchers::EMBEDDING_SEGMENT` (what `launch::embedding_backward` sizes with).
#define RK_EMBEDDING_SEGMENT 1024

namespace {

template <typename T>
__device__ __forceinline__ void gather(const T* weight, const int32_t* ids, T* out, uint32_t dim,
                                       uint32_t vocab) {
    const uint64_t p = blockIdx.x;
    const int32_t id = ids[p];
    const bool valid = id >= 0 && (uint32_t)id < vocab;
    const T* src = weight + (uint64_t)(valid ? id : 0) * dim;
    for (uint32_t j = threadIdx.x; j < dim; j += blockDim.x)
        out[p * dim + j] = valid ? src[j] : from_f32<T>(NAN);
}

template <typename T>
__device__ __forceinline__ void accumulate(const T* g, const uint32_t* order,
                                           const uint32_t* starts, float* dweight,
                                           uint32_t dim) {
    const uint32_t v = blockIdx.x;
    const uint32_t lo = starts[v], hi = starts[v + 1];
    float* dst = dweight + (uint64_t)v * dim;
    for (uint32_t j = threadIdx.x; j < dim; j += blockDim.x) {
        // The CPU sums into a zeroed row, then the tape adds that row to the gradient.
        float acc = 0.0f;
        for (uint32_t k = lo; k < hi; ++k) acc = add_rn(acc, to_f32(g[(uint64_t)order[k] * dim + j]));
        dst[j] = acc;
    }
}

}  // namespace

#define RK_EMBEDDING_TYPED(T, S)                                                              \
    /* one block per position: out[p, :] = weight[ids[p], :] */                               \
    extern "C" __global__ void embedding_fwd_##S(const T* weight, const int32_t* ids, T* out,\
                                                 uint32_t dim, uint32_t vocab) {              \
        gather<T>(weight, ids, out, dim, vocab);                                              \
    }                                                                                         \
    /* one block per vocabulary row; dweight is f32 [vocab, dim] */                           \
    extern "C" __global__ void embedding_bwd_accumulate_##S(                                  \
        const T* g, const uint32_t* order, const uint32_t* starts, float* dweight,            \
        uint32_t dim) {                                                                       \
        accumulate<T>(g, order, starts, dweight, dim);                                        \
    }

RK_EMBEDDING_TYPED(float, f32)
RK_EMBEDDING_TYPED(bf16, bf16)

// Step 1: grid = segments, block = RK_EMBEDDING_SEGMENT.
extern "C" __global__ void embedding_bwd_count(const int32_t* ids, uint32_t n_ids,
                                               uint32_t vocab, uint32_t segments,
                                               uint32_t* counts) {
    const uint64_t p = (uint64_t)blockIdx.x * RK_EMBEDDING_SEGMENT + threadIdx.x;
    if (p >= n_ids) return;
    const int32_t id = ids[p];
    if (id < 0 || (uint32_t)id >= vocab) return;
    atomicAdd(&counts[(uint64_t)id * segments + blockIdx.x], 1u);
}

// Step 2: one thread per id (`launch::columns(vocab)`).
extern "C" __global__ void embedding_bwd_offsets(uint32_t* counts, uint32_t* totals,
                                                 uint32_t vocab, uint32_t segments) {
    RK_GRID_STRIDE(v, vocab) {
        uint32_t* c = counts + v * segments;
        uint32_t run = 0;
        for (uint32_t s = 0; s < segments; ++s) {
            const uint32_t k = c[s];
            c[s] = run;
            run += k;
        }
        totals[v] = run;
    }
}

// Step 3: one block of 1024 threads. Thread t owns a contiguous chunk of ids; the chunk sums
// are scanned across the block, then each thread writes its chunk's starts.
extern "C" __global__ void embedding_bwd_scan(const uint32_t* totals, uint32_t* starts,
                                              uint32_t vocab) {
    __shared__ uint32_t warp_sums[32];
    const uint32_t t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const uint32_t per = (vocab + blockDim.x - 1) / blockDim.x;
    const uint32_t lo = min(vocab, t * per), hi = min(vocab, lo + per);
    uint32_t sum = 0;
    for (uint32_t v = lo; v < hi; ++v) sum += totals[v];
    // Inclusive scan of the thread sums within the warp, then across warps.
    uint32_t incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t y = __shfl_up_sync(RK_FULL_MASK, incl, o);
        if (lane >= (uint32_t)o) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const uint32_t warps = blockDim.x >> 5;
        uint32_t w = lane < warps ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(RK_FULL_MASK, w, o);
            if (lane >= (uint32_t)o) w += y;
        }
        if (lane < warps) warp_sums[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    uint32_t run = incl - sum + (warp > 0 ? warp_sums[warp - 1] : 0);
    for (uint32_t v = lo; v < hi; ++v) {
        starts[v] = run;
        run += totals[v];
    }
    if (t == blockDim.x - 1) starts[vocab] = run;
}

// Step 4: grid = segments, block = RK_EMBEDDING_SEGMENT.
extern "C" __global__ void embedding_bwd_place(const int32_t* ids, const uint32_t* counts,
                                               const uint32_t* starts, uint32_t* order,
                                               uint32_t n_ids, uint32_t vocab,
                                               uint32_t segments) {
    __shared__ int32_t seg_ids[RK_EMBEDDING_SEGMENT];
    const uint32_t t = threadIdx.x;
    const uint64_t p = (uint64_t)blockIdx.x * RK_EMBEDDING_SEGMENT + t;
    const int32_t id = p < n_ids ? ids[p] : -1;
    seg_ids[t] = id;
    __syncthreads();
    if (p >= n_ids || id < 0 || (uint32_t)id >= vocab) return;
    uint32_t rank = 0;
    for (uint32_t u = 0; u < t; ++u) rank += seg_ids[u] == id;
    order[starts[id] + counts[(uint64_t)id * segments + blockIdx.x] + rank] = (uint32_t)p;
}
