// Kernels that test the simulator itself (kernels/tests/host_sim.rs): each breaks or leans on
// one rule of the execution model. Built into the simulator's library only, never for a GPU.

#include <stdint.h>

// Each block writes its index to shared memory and reads it back after barriers: a block that
// saw another block's shared memory would write a wrong value.
extern "C" __global__ void rk_sim_selftest_shared_per_block(uint32_t* out) {
    __shared__ uint32_t value;
    if (threadIdx.x == 0) value = blockIdx.x;
    __syncthreads();
    uint32_t seen = value;
    for (int i = 0; i < 4; ++i) {
        __syncthreads();
        if (value != seen) seen = 0xffffffffu;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = seen;
}

// Threads leave after a number of barriers that differs between them (t % 4): the barriers
// that follow count only the threads still running. Then an exchange within each warp.
extern "C" __global__ void rk_sim_selftest_divergent_exit(uint32_t* out) {
    const uint32_t t = threadIdx.x;
    out[t] = 0;
    for (uint32_t i = 0; i < t % 4; ++i) {
        __syncthreads();
        out[t] += 1;
    }
}

// out[t] = the value of lane t - 3 (lanes below 3 keep their own), then of lane t ^ 5.
extern "C" __global__ void rk_sim_selftest_shuffles(uint32_t* out) {
    const uint32_t t = threadIdx.x;
    const uint32_t up = __shfl_up_sync(0xffffffffu, 100 * t, 3);
    const uint32_t x = __shfl_xor_sync(0xffffffffu, up, 5);
    out[t] = x;
}

// Lanes 0-15 of warp 0 shuffle while every other thread waits at __syncthreads: stuck.
extern "C" __global__ void rk_sim_selftest_stuck(uint32_t* out) {
    if (threadIdx.x < 16)
        out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, threadIdx.x, 1);
    else
        __syncthreads();
}

// Lane 30 reads lane 31, which has returned.
extern "C" __global__ void rk_sim_selftest_returned_lane(uint32_t* out) {
    if (threadIdx.x == 31) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, threadIdx.x, 1);
}
