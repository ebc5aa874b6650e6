// The CUDA execution model for the host compiler: what a kernel family needs to compile as
// ordinary C++ and run on CPU threads (the host simulator, `recycle_kernels::sim`).
//
// Every CUDA thread of a block is a fiber (a user-level coroutine with its own stack), and the
// fibers of a block take turns on one OS thread, switching only where a GPU thread would wait
// for others: at a barrier (__syncthreads) and at a warp shuffle (a real exchange between the
// 32 lanes of a warp, synchronised like `__shfl_*_sync` with a full mask). So the kernels' own
// code runs unchanged: the barriers, the shuffles, shared memory, and every index computation
// of the parallel skeletons. The blocks of a launch run in parallel on a pool of OS threads
// (see sim/launch.cpp); `__shared__` variables are thread-local statics, so each block running
// on its OS thread has its own shared memory.
//
// What this is not: the device's own math (expf, logf, normcdff come from the host's libm,
// so results agree with a GPU to a few ulp, not bit for bit where those are involved), its
// memory model (the threads of a block interleave only at barriers and shuffles, and blocks
// see each other's writes as the host's memory model allows), or its speed.
//
// Included before the family's source by the generated translation unit of each family (see
// sim/launch.cpp for the launcher and src/sim.rs for how the library is built).

#pragma once

// Defined before the CUDA headers so that their host_defines.h keeps these definitions.
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define RK_HOST_SIM 1

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <type_traits>
#include <utility>

struct RkSimDim3 {
    unsigned x, y, z;
};

// The indices of the running CUDA thread (set by the launcher before it resumes a fiber).
extern thread_local RkSimDim3 threadIdx;
extern thread_local RkSimDim3 blockIdx;
extern thread_local RkSimDim3 blockDim;
extern thread_local RkSimDim3 gridDim;

extern "C" {
// sim/launch.cpp: the block barrier and the warp exchange of the running CUDA thread.
void rk_sim_syncthreads(void);
// Publishes `value` for the calling lane, waits for the warp, and returns the value published
// by `src_lane` (or `value` itself when that lane is outside the warp).
uint64_t rk_sim_warp_exchange(uint64_t value, int src_lane, unsigned mask);
int rk_sim_lane(void);
}

inline void __syncthreads() { rk_sim_syncthreads(); }

template <typename T> inline T rk_sim_shuffle(T v, int src_lane, unsigned mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = rk_sim_warp_exchange(bits, src_lane, mask);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return rk_sim_shuffle(v, rk_sim_lane() ^ lane_mask, mask);
}

// Lanes below `delta` keep their own value, as on the device.
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    const int lane = rk_sim_lane();
    return rk_sim_shuffle(v, lane >= (int)delta ? lane - (int)delta : lane, mask);
}

template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    return rk_sim_shuffle(v, rk_sim_lane() + (int)delta, mask);
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// CUDA math functions the host's libm lacks: integer min/max overloads and normcdff.
#define RK_SIM_MIN_MAX(T)                            \
    inline T min(T a, T b) { return a < b ? a : b; } \
    inline T max(T a, T b) { return a < b ? b : a; }
RK_SIM_MIN_MAX(int)
RK_SIM_MIN_MAX(unsigned)
RK_SIM_MIN_MAX(long)
RK_SIM_MIN_MAX(unsigned long)
RK_SIM_MIN_MAX(long long)
RK_SIM_MIN_MAX(unsigned long long)
#undef RK_SIM_MIN_MAX
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

// ---------------------------------------------------------------------------------------------
// The kernel table of a family: name -> a function that unpacks cuLaunchKernel's parameter
// array (one pointer per parameter, to its value) and calls the kernel.
// ---------------------------------------------------------------------------------------------

typedef void (*RkSimInvoke)(void** params);

struct RkSimKernel {
    const char* name;
    RkSimInvoke invoke;
};

template <typename F> struct RkSimInvoker;

template <typename... A> struct RkSimInvoker<void (*)(A...)> {
    template <void (*K)(A...), size_t... I>
    static void call_with(void** params, std::index_sequence<I...>) {
        K(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
    }
    template <void (*K)(A...)> static void call(void** params) {
        call_with<K>(params, std::index_sequence_for<A...>{});
    }
};

#define RK_SIM_KERNEL(name) \
    RkSimKernel { #name, &RkSimInvoker<decltype(&name)>::template call<&name> }

extern "C" void rk_sim_register(const RkSimKernel* kernels, size_t n);
