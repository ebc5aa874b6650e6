// Layout changes, broadcasting and reductions over arbitrary shapes (rank <= 8).
//
// CPU twins (engine/src/ops/layout.rs, elementwise.rs):
//   strided_copy_T           permute / transpose (a permuted read), narrow (a window read),
//                            concat (each input written into a window of the output), their
//                            backwards, and sum_axis's backward (a read with stride 0): element i
//                            of the iteration shape is read at sum(coord_d * src_stride_d) and
//                            written at sum(coord_d * dst_stride_d)  bits (a copy)
//   broadcast_{add,sub,mul}_T  binary_forward_cpu with broadcasting: y[i] = a[a_off] op b[b_off]
//                            over y's shape, a stride 0 along a broadcast dimension  bits
//   reduce_to_T              sum_to_shape_cpu (the backward of a broadcast) and
//                            sum_axis_forward_cpu: y[j] = sum over the reduced coordinates, in
//                            row-major order, of x[kept_off(j) + reduced_off], accumulated in
//                            f32 by one thread per output  bits for sum_axis; ulp for
//                            sum_to_shape (the CPU sums a row first when the last axis is
//                            reduced)
//   sum_all_T                sum_cpu (f64) over all elements, divided by `divisor` in f64 and
//                            rounded to f32 (sum: 1, mean: n), one block  ulp (summation order)
//
// `meta` is a small u64 array in device memory, uploaded by the caller: for strided_copy
// [dims, src_strides, dst_strides], for broadcast [dims, a_strides, b_strides], for
// reduce_to [kept dims, kept strides in x, reduced dims, reduced strides in x]; strides in
// elements. Shapes are the host's, checked there; rank 0 is a single element.
//
// Launch: grid-stride over the outputs, `launch::elementwise(n)`; sum_all one block of 1024
// (`launch::single_block`).

#include "common.cuh"

using namespace rk;

namespace {

// Offset of flat index i of `dims` (row-major) under `strides`. 64-bit division is a called
// subroutine on the GPU; while the index and the dimension fit in 32 bits (nearly always) the
// coordinate comes from an inline 32-bit division instead.
__device__ __forceinline__ uint64_t offset(uint64_t i, uint32_t rank, const uint64_t* dims,
                                           const uint64_t* strides) {
    uint64_t off = 0;
    for (int d = (int)rank - 1; d >= 0; --d) {
        const uint64_t n = dims[d];
        uint64_t c;
        if (((i | n) >> 32) == 0) {
            const uint32_t i32 = (uint32_t)i, n32 = (uint32_t)n, q = i32 / n32;
            c = i32 - q * n32;
            i = q;
        } else {
            c = i % n;
            i /= n;
        }
        off += c * strides[d];
    }
    return off;
}

struct Add {
    __device__ __forceinline__ float operator()(float a, float b) const { return add_rn(a, b); }
};
struct Sub {
    __device__ __forceinline__ float operator()(float a, float b) const { return sub_rn(a, b); }
};
struct Mul {
    __device__ __forceinline__ float operator()(float a, float b) const { return mul_rn(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ void broadcast(const T* a, const T* b, T* y, uint64_t n,
                                          uint32_t rank, const uint64_t* meta) {
    const uint64_t *dims = meta, *sa = meta + rank, *sb = meta + 2 * rank;
    RK_GRID_STRIDE(i, n) {
        const float va = to_f32(a[offset(i, rank, dims, sa)]);
        const float vb = to_f32(b[offset(i, rank, dims, sb)]);
        y[i] = from_f32<T>(Op()(va, vb));
    }
}

}  // namespace

#define RK_LAYOUT_TYPED(T, S)                                                                  \
    extern "C" __global__ void strided_copy_##S(const T* x, T* y, uint64_t n, uint32_t rank,  \
                                                const uint64_t* meta) {                        \
        const uint64_t *dims = meta, *src = meta + rank, *dst = meta + 2 * rank;               \
        RK_GRID_STRIDE(i, n) y[offset(i, rank, dims, dst)] = x[offset(i, rank, dims, src)];    \
    }                                                                                          \
    extern "C" __global__ void broadcast_add_##S(const T* a, const T* b, T* y, uint64_t n,    \
                                                 uint32_t rank, const uint64_t* meta) {        \
        broadcast<T, Add>(a, b, y, n, rank, meta);                                             \
    }                                                                                          \
    extern "C" __global__ void broadcast_sub_##S(const T* a, const T* b, T* y, uint64_t n,    \
                                                 uint32_t rank, const uint64_t* meta) {        \
        broadcast<T, Sub>(a, b, y, n, rank, meta);                                             \
    }                                                                                          \
    extern "C" __global__ void broadcast_mul_##S(const T* a, const T* b, T* y, uint64_t n,    \
                                                 uint32_t rank, const uint64_t* meta) {        \
        broadcast<T, Mul>(a, b, y, n, rank, meta);                                             \
    }                                                                                          \
    /* n = outputs (the product of the kept dims), m = values summed per output */             \
    extern "C" __global__ void reduce_to_##S(const T* x, T* y, uint64_t n, uint64_t m,        \
                                             uint32_t rank, uint32_t rrank,                    \
                                             const uint64_t* meta) {                           \
        const uint64_t *kd = meta, *ks = meta + rank, *rd = meta + 2 * rank,                   \
                       *rs = meta + 2 * rank + rrank;                                          \
        RK_GRID_STRIDE(j, n) {                                                                 \
            const uint64_t base = offset(j, rank, kd, ks);                                     \
            float acc = 0.0f;                                                                  \
            for (uint64_t k = 0; k < m; ++k)                                                   \
                acc = add_rn(acc, to_f32(x[base + offset(k, rrank, rd, rs)]));                 \
            y[j] = from_f32<T>(acc);                                                           \
        }                                                                                      \
    }                                                                                          \
    /* out: one f32; one block */                                                              \
    extern "C" __global__ void sum_all_##S(const T* x, float* out, uint64_t n,                \
                                           uint64_t divisor) {                                 \
        __shared__ double scratch[32];                                                         \
        double acc = 0.0;                                                                      \
        for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) acc += (double)to_f32(x[i]);    \
        const double total = block_sum(acc, scratch);                                          \
        if (threadIdx.x == 0) out[0] = (float)(total / (double)divisor);                       \
    }

RK_LAYOUT_TYPED(float, f32)
RK_LAYOUT_TYPED(bf16, bf16)
