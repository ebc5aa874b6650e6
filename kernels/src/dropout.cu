// Inverted dropout with the engine's counter-based mask.
//
// CPU twin (engine/src/ops/dropout.rs): dropout_forward_cpu / dropout_backward_cpu. The rule,
// shared bit for bit: element i (its flat row-major index in the tensor, as u64) is kept iff
// rng::uniform_at(seed, i) >= p, and a kept value is multiplied by scale = 1.0f / (1.0f - p)
// (the host computes it in f32, `ops::dropout::keep_scale`); a dropped value becomes 0. The
// hash is rng.rs's SplitMix64 construction (common.cuh), so the GPU drops exactly the elements
// the CPU drops and, in f32, produces the same bits.
//
// The mask is never stored: backward is the same kernel applied to the output gradient with
// the same seed. `index_base` is the flat index of x[0] in the tensor the mask is defined over
// (0 unless a caller processes a tensor in pieces).
//
// Launch: `launch::elementwise(n)` (grid-stride).

#include "common.cuh"

using namespace rk;

namespace {

template <typename T>
__device__ __forceinline__ void dropout(const T* x, T* y, uint64_t n, float p, float scale,
                                        uint64_t seed, uint64_t index_base) {
    const uint64_t key = stream_key(seed);
    RK_GRID_STRIDE(i, n) {
        const bool kept = dropout_keep(key, index_base + i, p);
        y[i] = from_f32<T>(kept ? mul_rn(to_f32(x[i]), scale) : 0.0f);
    }
}

}  // namespace

extern "C" __global__ void dropout_f32(const float* x, float* y, uint64_t n, float p,
                                       float scale, uint64_t seed, uint64_t index_base) {
    dropout<float>(x, y, n, p, scale, seed, index_base);
}

extern "C" __global__ void dropout_bf16(const bf16* x, bf16* y, uint64_t n, float p,
                                        float scale, uint64_t seed, uint64_t index_base) {
    dropout<bf16>(x, y, n, p, scale, seed, index_base);
}
