// Pooling over NCHW images: max pooling (ResNet's stem) and global average pooling (its head).
//
// CPU twins (engine/src/ops/pool.rs):
//   max_pool2d_fwd_T         max_pool2d_forward_cpu: per output, the maximum of its window
//                            (padding never selected; the first maximum in row-major window
//                            order on ties; a NaN wins) and its index in the H*W plane  bits
//   max_pool2d_bwd_T         max_pool2d_backward_cpu: dx[p] = sum of g[o] over the outputs o
//                            whose arg-max is p. A gather, not a scatter: one thread per input
//                            element visits the outputs whose windows cover it in increasing
//                            output order, the order the CPU adds them in, so f32 gives the
//                            CPU's bits and no atomics are needed
//   global_avg_pool_fwd_T    global_avg_pool2d_forward_cpu: per plane, the sum in element order
//                            (one thread per plane, f32, as the CPU) divided by H*W  bits
//   global_avg_pool_bwd_T    global_avg_pool2d_backward_cpu: g[plane] * scale, scale = 1/(H*W)
//                            computed in f32 on the host  bits
//
// Launch: every kernel is grid-stride over its outputs, `launch::elementwise(n)`.

#include "common.cuh"

using namespace rk;

namespace {

struct Pool {
    uint32_t h, w, oh, ow, kernel, stride, padding;
};

// First input row (or column) of output o's window, clipped to [0, len).
__device__ __forceinline__ void window(uint32_t o, uint32_t len, const Pool& g, uint32_t* lo,
                                       uint32_t* hi) {
    const int64_t start = (int64_t)o * g.stride - g.padding;
    *lo = (uint32_t)(start < 0 ? 0 : start);
    const int64_t end = start + g.kernel;
    *hi = (uint32_t)(end < (int64_t)len ? end : len);
}

template <typename T>
__device__ __forceinline__ void max_fwd(const T* x, T* y, uint32_t* argmax, uint64_t n,
                                        Pool g) {
    const uint64_t oplane = (uint64_t)g.oh * g.ow, plane = (uint64_t)g.h * g.w;
    RK_GRID_STRIDE(i, n) {
        const uint64_t pi = i / oplane;
        const uint32_t r = (uint32_t)(i - pi * oplane), oh = r / g.ow, ow = r - oh * g.ow;
        uint32_t h0, h1, w0, w1;
        window(oh, g.h, g, &h0, &h1);
        window(ow, g.w, g, &w0, &w1);
        const T* xp = x + pi * plane;
        uint32_t best = h0 * g.w + w0;
        float mx = to_f32(xp[best]);
        for (uint32_t ih = h0; ih < h1; ++ih)
            for (uint32_t iw = w0; iw < w1; ++iw) {
                const float v = to_f32(xp[ih * g.w + iw]);
                if (v > mx || (isnan(v) && !isnan(mx))) {
                    mx = v;
                    best = ih * g.w + iw;
                }
            }
        y[i] = from_f32<T>(mx);
        argmax[i] = best;
    }
}

// Outputs along one axis whose windows cover input position p: [first, last] (empty when
// first > last).
__device__ __forceinline__ void covering(uint32_t p, uint32_t outs, const Pool& g,
                                         int64_t* first, int64_t* last) {
    const int64_t q = (int64_t)p + g.padding;  // position in the padded input
    const int64_t lo = q - (int64_t)g.kernel + 1;
    *first = lo <= 0 ? 0 : (lo + g.stride - 1) / g.stride;
    int64_t hi = q / g.stride;
    if (hi > (int64_t)outs - 1) hi = (int64_t)outs - 1;
    *last = hi;
}

template <typename T>
__device__ __forceinline__ void max_bwd(const T* g, const uint32_t* argmax, T* dx, uint64_t n,
                                        Pool geo) {
    const uint64_t oplane = (uint64_t)geo.oh * geo.ow, plane = (uint64_t)geo.h * geo.w;
    RK_GRID_STRIDE(i, n) {
        const uint64_t pi = i / plane;
        const uint32_t p = (uint32_t)(i - pi * plane), ih = p / geo.w, iw = p - ih * geo.w;
        int64_t oh0, oh1, ow0, ow1;
        covering(ih, geo.oh, geo, &oh0, &oh1);
        covering(iw, geo.ow, geo, &ow0, &ow1);
        float acc = 0.0f;
        for (int64_t oh = oh0; oh <= oh1; ++oh)
            for (int64_t ow = ow0; ow <= ow1; ++ow) {
                const uint64_t o = pi * oplane + (uint64_t)oh * geo.ow + (uint64_t)ow;
                if (argmax[o] == p) acc = add_rn(acc, to_f32(g[o]));
            }
        dx[i] = from_f32<T>(acc);
    }
}

}  // namespace

#define RK_POOL_TYPED(T, S)                                                                    \
    /* n = N * C * OH * OW outputs; argmax is u32 [n] (index in the H*W plane) */              \
    extern "C" __global__ void max_pool2d_fwd_##S(                                             \
        const T* x, T* y, uint32_t* argmax, uint64_t n, uint32_t h, uint32_t w, uint32_t oh,  \
        uint32_t ow, uint32_t kernel, uint32_t stride, uint32_t padding) {                     \
        max_fwd<T>(x, y, argmax, n, Pool{h, w, oh, ow, kernel, stride, padding});              \
    }                                                                                          \
    /* n = N * C * H * W inputs */                                                             \
    extern "C" __global__ void max_pool2d_bwd_##S(                                             \
        const T* g, const uint32_t* argmax, T* dx, uint64_t n, uint32_t h, uint32_t w,         \
        uint32_t oh, uint32_t ow, uint32_t kernel, uint32_t stride, uint32_t padding) {        \
        max_bwd<T>(g, argmax, dx, n, Pool{h, w, oh, ow, kernel, stride, padding});             \
    }                                                                                          \
    /* planes = N * C; plane = H * W */                                                        \
    extern "C" __global__ void global_avg_pool_fwd_##S(const T* x, T* y, uint64_t planes,     \
                                                       uint32_t plane) {                       \
        RK_GRID_STRIDE(i, planes) {                                                            \
            const T* p = x + i * plane;                                                        \
            float s = 0.0f;                                                                    \
            for (uint32_t j = 0; j < plane; ++j) s = add_rn(s, to_f32(p[j]));                  \
            y[i] = from_f32<T>(div_rn(s, (float)plane));                                       \
        }                                                                                      \
    }                                                                                          \
    /* n = N * C * H * W */                                                                    \
    extern "C" __global__ void global_avg_pool_bwd_##S(const T* g, T* dx, uint64_t n,         \
                                                       uint32_t plane, float scale) {          \
        RK_GRID_STRIDE(i, n) dx[i] = from_f32<T>(mul_rn(to_f32(g[i / plane]), scale));         \
    }

RK_POOL_TYPED(float, f32)
RK_POOL_TYPED(bf16, bf16)
