// The launcher of the host simulator: runs one kernel launch on the CPU (see simt.hpp for what
// that models).
//
// A block runs on one OS thread: its CUDA threads are fibers (sim/fiber.hpp) that a small
// scheduler resumes in turn; a fiber runs until it reaches a barrier or a shuffle, or returns.
// A barrier releases its waiters when every thread of the block that has not returned has
// arrived (a thread that has returned no longer takes part, as on the device); a shuffle
// exchanges the values of the warp when every lane of it that has not returned has arrived.
// When no fiber can run and some have not returned, the block is stuck, and the launch fails
// with the kernel, the block, a waiting thread and its barrier named.
//
// The blocks of a launch are spread over a pool of OS threads that lives as long as the
// process (the launching thread takes part), each with its fiber stacks mapped once. Launches
// from several host threads run one at a time (one launch mutex); each may use the whole pool.
//
// The library is built and loaded by `recycle_kernels::sim` (src/sim.rs), which calls
// rk_sim_launch with the arguments of cuLaunchKernel.

#include "simt.hpp"
#include "fiber.hpp"

#include <atomic>
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

using rk_sim::Context;

std::vector<RkSimKernel>& registry() {
    static std::vector<RkSimKernel> kernels;
    return kernels;
}

// One launch, shared by the OS threads that run its blocks.
struct Launch {
    const char* kernel;
    RkSimInvoke invoke;
    void** params;
    RkSimDim3 grid, block;
    uint64_t blocks;
    int threads;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;

    // Keeps the first error; the others stop taking blocks.
    void fail(const std::string& msg) {
        std::lock_guard<std::mutex> g(error_mutex);
        if (error.empty()) error = msg;
        failed = true;
    }
};

enum class Wait { None, Sync, Shuffle, Returned };

struct Fiber {
    Context ctx;
    RkSimDim3 idx;
    Wait wait = Wait::None;
    int src_lane = 0;
    uint64_t shuffled = 0;
};

struct Warp {
    int lanes = 0;     // lanes in this warp
    int live = 0;      // lanes that have not returned
    int arrived = 0;   // lanes waiting at the shuffle
    uint64_t slots[32];
    bool returned[32];
};

// The blocks' runner of one OS thread: fiber stacks, the scheduler's context and the state of
// the block it runs.
struct Runner {
    rk_sim::Stacks stacks;
    std::vector<Fiber> fibers;
    std::vector<int> ready;  // fibers to resume, in order
    size_t ready_head = 0;
    Context scheduler;
    Launch* launch = nullptr;
    int current = 0;
    int live = 0;          // threads of the block that have not returned
    int sync_arrived = 0;  // threads waiting at __syncthreads
    Warp warps[32];
    std::string error;     // the first rule of the model broken in this block

    void note(const std::string& msg) {
        if (error.empty()) error = msg;
    }

    static void fiber_main(void* self);
    bool run_block(uint64_t linear);
    void release_sync();
    void release_warp(int w);
    int next_ready();
    void pass(Context& from);
    void yield();
};

thread_local Runner* running = nullptr;

Runner& runner() {
    thread_local std::unique_ptr<Runner> mine;
    if (!mine) mine.reset(new Runner());
    return *mine;
}

// The next fiber to resume, or -1.
int Runner::next_ready() {
    if (ready_head == ready.size()) return -1;
    const int next = ready[ready_head++];
    if (ready_head == ready.size()) {
        ready.clear();
        ready_head = 0;
    }
    return next;
}

// Leaves the running fiber (its context saved in `from`) for the next ready one, straight
// from fiber to fiber, or for the scheduler when none is ready (the block is over or stuck).
void Runner::pass(Context& from) {
    const int next = next_ready();
    if (next < 0) {
        rk_sim::switch_to(from, scheduler);
        return;
    }
    if (&fibers[next].ctx == &from) return;  // released itself, and first in line
    current = next;
    threadIdx = fibers[next].idx;
    rk_sim::switch_to(from, fibers[next].ctx);
}

// The running fiber waits (at a barrier or a shuffle; it is in `ready` once released).
void Runner::yield() { pass(fibers[current].ctx); }

void Runner::release_sync() {
    sync_arrived = 0;
    for (int i = 0; i < launch->threads; ++i)
        if (fibers[i].wait == Wait::Sync) {
            fibers[i].wait = Wait::None;
            ready.push_back((int)i);
        }
}

void Runner::release_warp(int w) {
    Warp& wp = warps[w];
    wp.arrived = 0;
    for (int lane = 0; lane < wp.lanes; ++lane) {
        Fiber& f = fibers[32 * w + lane];
        if (f.wait != Wait::Shuffle) continue;
        const int src = f.src_lane;
        uint64_t out = wp.slots[lane];
        if (src >= 0 && src < wp.lanes) {
            out = wp.slots[src];
            if (wp.returned[src])
                note("a shuffle read lane " + std::to_string(src) +
                     ", which had returned from the kernel (undefined on the device)");
        }
        f.shuffled = out;
        f.wait = Wait::None;
        ready.push_back(32 * w + lane);
    }
}

void Runner::fiber_main(void* self) {
    Runner& r = *(Runner*)self;
    r.launch->invoke(r.launch->params);
    // Returned: no longer part of the block's barriers nor of its warp's shuffles.
    const int t = r.current;
    Warp& w = r.warps[t / 32];
    r.fibers[t].wait = Wait::Returned;
    w.returned[t % 32] = true;
    --w.live;
    --r.live;
    if (r.sync_arrived > 0 && r.sync_arrived >= r.live) r.release_sync();
    if (w.arrived > 0 && w.arrived >= w.live) r.release_warp(t / 32);
    r.pass(r.fibers[t].ctx);
    abort();  // never resumed
}

const char* wait_name(Wait w) {
    return w == Wait::Sync ? "__syncthreads" : "a warp shuffle";
}

// Runs block number `linear` (x fastest) to its end; false when it broke a rule or got stuck.
bool Runner::run_block(uint64_t linear) {
    const Launch& l = *launch;
    blockIdx = RkSimDim3{(unsigned)(linear % l.grid.x), (unsigned)(linear / l.grid.x % l.grid.y),
                         (unsigned)(linear / ((uint64_t)l.grid.x * l.grid.y))};
    const int n = l.threads;
    live = n;
    sync_arrived = 0;
    for (int w = 0; w * 32 < n; ++w) {
        Warp& wp = warps[w];
        wp.lanes = n - 32 * w < 32 ? n - 32 * w : 32;
        wp.live = wp.lanes;
        wp.arrived = 0;
        for (bool& r : wp.returned) r = false;
    }
    ready.clear();
    ready_head = 0;
    for (int t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        f.wait = Wait::None;
        f.ctx.init(stacks.stack(t), rk_sim::Stacks::SIZE, &Runner::fiber_main, this);
        ready.push_back(t);
    }
    // The fibers pass control among themselves; it comes back when none is ready.
    current = next_ready();
    threadIdx = fibers[current].idx;
    rk_sim::switch_to(scheduler, fibers[current].ctx);
    if (live > 0) {
        for (int t = 0; t < n; ++t) {
            const Fiber& f = fibers[t];
            if (f.wait == Wait::Returned) continue;
            char msg[512];
            const bool sync = f.wait == Wait::Sync;
            const Warp& wp = warps[t / 32];
            snprintf(msg, sizeof msg,
                     "block (%u, %u, %u), thread (%u, %u, %u) waits at %s that %d %s never "
                     "reach (a __syncthreads or full-mask shuffle under a condition that "
                     "differs between threads)",
                     blockIdx.x, blockIdx.y, blockIdx.z, f.idx.x, f.idx.y, f.idx.z,
                     wait_name(f.wait), sync ? live - sync_arrived : wp.live - wp.arrived,
                     sync ? "running threads of the block" : "running lanes of its warp");
            note(msg);
            break;
        }
    }
    return error.empty();
}

// Takes blocks of `l` until none is left or one fails. The stacks are this thread's own.
void run_blocks(Launch& l) {
    Runner& r = runner();
    if (!r.stacks.reserve((size_t)l.threads)) {
        l.fail("cannot map stacks for " + std::to_string(l.threads) + " threads");
        return;
    }
    if (r.fibers.size() < (size_t)l.threads) r.fibers.resize(l.threads);
    r.launch = &l;
    r.error.clear();
    running = &r;
    blockDim = l.block;
    gridDim = l.grid;
    for (int t = 0; t < l.threads; ++t)
        r.fibers[t].idx = RkSimDim3{t % l.block.x, (t / l.block.x) % l.block.y,
                                    t / (l.block.x * l.block.y)};
    while (!l.failed) {
        const uint64_t b = l.next.fetch_add(1);
        if (b >= l.blocks) break;
        if (!r.run_block(b)) {
            l.fail(r.error);
            break;
        }
    }
    running = nullptr;
    r.launch = nullptr;
}

// OS threads that run blocks next to the launching thread, started on the first launch with
// more than one block.
class Pool {
  public:
    static Pool& get() {
        // Leaked on purpose: workers may still be parked when the process exits.
        static Pool* pool = new Pool();
        return *pool;
    }

    int workers() const { return (int)threads_.size(); }

    // Runs `l` on the calling thread and up to `want` workers; returns when all are done.
    void run(Launch& l, int want) {
        {
            std::lock_guard<std::mutex> g(m_);
            job_ = &l;
            wanted_ = want;
            busy_ = 0;
            ++generation_;
        }
        cv_.notify_all();
        run_blocks(l);
        // Every block is taken (or the launch failed): workers not yet awake stay parked.
        std::unique_lock<std::mutex> g(m_);
        wanted_ = 0;
        done_.wait(g, [&] { return busy_ == 0; });
        job_ = nullptr;
    }

  private:
    Pool() {
        int n = (int)std::thread::hardware_concurrency();
        if (const char* env = getenv("RECYCLE_SIM_THREADS")) n = atoi(env);
        if (n < 1) n = 1;
        if (n > 16) n = 16;
        for (int i = 0; i + 1 < n; ++i) threads_.emplace_back([this] { work(); });
        for (std::thread& t : threads_) t.detach();
    }

    void work() {
        uint64_t seen = 0;
        for (;;) {
            Launch* l;
            {
                std::unique_lock<std::mutex> g(m_);
                cv_.wait(g, [&] { return generation_ != seen && wanted_ > 0; });
                seen = generation_;
                --wanted_;
                ++busy_;
                l = job_;
            }
            run_blocks(*l);
            {
                std::lock_guard<std::mutex> g(m_);
                --busy_;
            }
            done_.notify_all();
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable cv_, done_;
    Launch* job_ = nullptr;
    int wanted_ = 0, busy_ = 0;
    uint64_t generation_ = 0;
};

std::mutex launch_mutex;

}  // namespace

extern "C" void rk_sim_register(const RkSimKernel* kernels, size_t n) {
    for (size_t i = 0; i < n; ++i) registry().push_back(kernels[i]);
}

extern "C" void rk_sim_syncthreads(void) {
    Runner& r = *running;
    r.fibers[r.current].wait = Wait::Sync;
    if (++r.sync_arrived >= r.live) r.release_sync();
    r.yield();
}

extern "C" int rk_sim_lane(void) { return running->current % 32; }

extern "C" uint64_t rk_sim_warp_exchange(uint64_t value, int src_lane, unsigned mask) {
    Runner& r = *running;
    if (mask != 0xffffffffu)
        r.note("a shuffle with a partial mask (the simulator models full-mask shuffles)");
    const int t = r.current, w = t / 32;
    Warp& wp = r.warps[w];
    Fiber& f = r.fibers[t];
    wp.slots[t % 32] = value;
    f.src_lane = src_lane;
    f.wait = Wait::Shuffle;
    if (++wp.arrived >= wp.live) r.release_warp(w);
    r.yield();
    return r.fibers[t].shuffled;
}

// Runs one launch. `params` is cuLaunchKernel's parameter array. Returns 0, or 1 with a
// message in `err` (unknown kernel, a rule of the model broken, a block stuck at a barrier).
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
    // The shape was checked by the caller (`LaunchConfig::check`): 1 to 1024 threads, a
    // grid, no dynamic shared memory.
    (void)shared_mem_bytes;
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    const uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    if (running != nullptr) return fail("a launch from inside a kernel");

    Launch l;
    l.kernel = kernel;
    l.invoke = invoke;
    l.params = params;
    l.grid = RkSimDim3{grid[0], grid[1], grid[2]};
    l.block = RkSimDim3{block[0], block[1], block[2]};
    l.blocks = blocks;
    l.threads = (int)threads;

    std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
    if (blocks == 1) {
        run_blocks(l);
    } else {
        Pool& pool = Pool::get();
        const uint64_t extra = blocks - 1;
        const int want = extra < (uint64_t)pool.workers() ? (int)extra : pool.workers();
        pool.run(l, want);
    }
    if (l.failed) return fail(l.error);
    return 0;
}
