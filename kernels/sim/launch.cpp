// The launcher of the host simulator: runs one kernel launch on CPU threads, one thread per
// CUDA thread of a block, the blocks one after another (see simt.hpp for what that models).
//
// The library is built and loaded by `recycle_kernels::sim` (src/sim.rs), which calls
// rk_sim_launch with the arguments of cuLaunchKernel.

#include "simt.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

thread_local RkSimDim3 threadIdx;
thread_local RkSimDim3 blockIdx;
thread_local RkSimDim3 blockDim;
thread_local RkSimDim3 gridDim;

namespace {

// A kernel that waits longer than this at a barrier is taken to be stuck: a __syncthreads or
// a shuffle that some threads of the block never reach. The process then aborts with the
// kernel, block and thread named (a stuck thread cannot be unwound).
constexpr auto STUCK_AFTER = std::chrono::seconds(60);

std::vector<RkSimKernel>& registry() {
    static std::vector<RkSimKernel> kernels;
    return kernels;
}

// The kernel being run (for messages) and one launch at a time: shared memory is static.
std::mutex launch_mutex;
const char* running_kernel = "";

[[noreturn]] void stuck(const char* what) {
    fprintf(stderr,
            "recycle kernel simulator: %s: kernel %s, block (%u, %u, %u), thread (%u, %u, %u) "
            "waited %lld s: some threads of the block never reach this barrier (a __syncthreads "
            "or full-mask shuffle under a condition that differs between threads)\n",
            what, running_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
            threadIdx.z, (long long)STUCK_AFTER.count());
    abort();
}

// A reusable barrier whose party shrinks when a thread returns from the kernel early (as a
// thread that has exited no longer takes part in __syncthreads on the device).
class Barrier {
  public:
    void reset(int parties) {
        std::lock_guard<std::mutex> g(m_);
        parties_ = parties;
        arrived_ = 0;
    }

    void wait(const char* what) {
        std::unique_lock<std::mutex> g(m_);
        const uint64_t gen = generation_;
        if (++arrived_ >= parties_) {
            release();
            return;
        }
        if (!cv_.wait_for(g, STUCK_AFTER, [&] { return generation_ != gen; })) stuck(what);
    }

    void leave() {
        std::lock_guard<std::mutex> g(m_);
        --parties_;
        if (arrived_ > 0 && arrived_ >= parties_) release();
    }

  private:
    void release() {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }

    std::mutex m_;
    std::condition_variable cv_;
    int parties_ = 0;
    int arrived_ = 0;
    uint64_t generation_ = 0;
};

struct Warp {
    Barrier barrier;
    uint64_t slots[32];
    std::atomic<bool> exited[32];
    int lanes;
};

struct Block {
    Barrier sync;  // __syncthreads
    Barrier end;   // every thread done with the block, before the next one starts
    std::vector<Warp> warps;
    int threads;

    Block(int n) : warps((n + 31) / 32), threads(n) {
        end.reset(n);
        arm();
    }

    // Every thread takes part again (before each block's first instruction).
    void arm() {
        sync.reset(threads);
        for (size_t i = 0; i < warps.size(); ++i) {
            Warp& w = warps[i];
            w.lanes = i + 1 < warps.size() ? 32 : threads - 32 * (int)i;
            w.barrier.reset(w.lanes);
            for (auto& e : w.exited) e = false;
        }
    }
};

thread_local Block* my_block = nullptr;
thread_local int my_lane = 0, my_warp = 0;
thread_local std::string* my_error = nullptr;

}  // namespace

extern "C" void rk_sim_register(const RkSimKernel* kernels, size_t n) {
    for (size_t i = 0; i < n; ++i) registry().push_back(kernels[i]);
}

extern "C" void rk_sim_syncthreads(void) { my_block->sync.wait("__syncthreads"); }

extern "C" int rk_sim_lane(void) { return my_lane; }

extern "C" uint64_t rk_sim_warp_exchange(uint64_t value, int src_lane, unsigned mask) {
    Warp& w = my_block->warps[my_warp];
    if (mask != 0xffffffffu && my_error->empty())
        *my_error = "a shuffle with a partial mask (the simulator models full-mask shuffles)";
    w.slots[my_lane] = value;
    w.barrier.wait("warp shuffle");
    uint64_t out = value;
    if (src_lane >= 0 && src_lane < w.lanes) {
        out = w.slots[src_lane];
        if (w.exited[src_lane] && my_error->empty())
            *my_error = "a shuffle read lane " + std::to_string(src_lane) +
                        ", which had returned from the kernel (undefined on the device)";
    }
    w.barrier.wait("warp shuffle");
    return out;
}

// Runs one launch. `params` is cuLaunchKernel's parameter array. Returns 0, or 1 with a
// message in `err` (unknown kernel, bad launch shape, a rule of the model broken).
extern "C" int rk_sim_launch(const char* kernel, const unsigned grid[3], const unsigned block[3],
                             unsigned shared_mem_bytes, void** params, char* err, size_t err_len) {
    auto fail = [&](const std::string& msg) {
        snprintf(err, err_len, "%s: %s", kernel, msg.c_str());
        return 1;
    };
    RkSimInvoke invoke = nullptr;
    for (const RkSimKernel& k : registry())
        if (strcmp(k.name, kernel) == 0) invoke = k.invoke;
    if (invoke == nullptr) return fail("not a kernel of the simulated families");
    if (shared_mem_bytes != 0)
        return fail("dynamic shared memory is not modelled (no kernel uses it)");
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    if (threads == 0 || threads > 1024) return fail("a block of " + std::to_string(threads) + " threads");
    if (blocks == 0) return fail("an empty grid");

    std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
    running_kernel = kernel;
    const int n = (int)threads;
    Block b(n);
    std::vector<std::string> errors(n);

    auto run_thread = [&](int t) {
        my_block = &b;
        my_lane = t % 32;
        my_warp = t / 32;
        my_error = &errors[t];
        blockDim = RkSimDim3{block[0], block[1], block[2]};
        gridDim = RkSimDim3{grid[0], grid[1], grid[2]};
        threadIdx = RkSimDim3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
        Warp& w = b.warps[my_warp];
        for (unsigned z = 0; z < grid[2]; ++z)
            for (unsigned y = 0; y < grid[1]; ++y)
                for (unsigned x = 0; x < grid[0]; ++x) {
                    blockIdx = RkSimDim3{x, y, z};
                    invoke(params);
                    // Returned: no longer part of this block's barriers.
                    w.exited[my_lane] = true;
                    w.barrier.leave();
                    b.sync.leave();
                    b.end.wait("end of block");
                    // Thread 0 re-arms the barriers while the others wait at the second end.
                    if (t == 0) b.arm();
                    b.end.wait("end of block");
                }
    };

    std::vector<std::thread> pool;
    pool.reserve(n);
    for (int t = 0; t < n; ++t) pool.emplace_back(run_thread, t);
    for (std::thread& th : pool) th.join();
    running_kernel = "";
    for (const std::string& e : errors)
        if (!e.empty()) return fail(e);
    return 0;
}
