// Fibers for the host simulator: user-level coroutines, each on its own stack, switched by
// hand. A fiber stands for one CUDA thread; the launcher (sim/launch.cpp) resumes the fibers
// of a block in turn on one OS thread, and a fiber hands control back at a barrier, a warp
// shuffle or its return.
//
// On x86-64 the switch is a few instructions (the callee-saved registers and the stack
// pointer); the floating-point control words are the OS thread's, shared by its fibers (no
// kernel changes rounding modes), and no signal mask is saved, so no system call happens per
// switch. Elsewhere <ucontext.h> does
// the same work (slower: swapcontext saves the signal mask with a system call).

#pragma once

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>

// RK_SIM_UCONTEXT selects <ucontext.h> on x86-64 too (to test that path).
#if !defined(__x86_64__) || defined(RK_SIM_UCONTEXT)
#define RK_SIM_FIBER_UCONTEXT 1
#include <ucontext.h>
#endif

namespace rk_sim {

typedef void (*FiberEntry)(void* arg);

#if !defined(RK_SIM_FIBER_UCONTEXT)

extern "C" void rk_sim_fiber_switch(void** save_sp, void* load_sp);
extern "C" void rk_sim_fiber_start(void);

// rk_sim_fiber_switch pushes rbp, rbx and r12-r15, stores the stack pointer
// in *save_sp, loads load_sp and pops the same from there. A new fiber's stack holds such a
// frame whose return address is rk_sim_fiber_start, which calls entry(arg) (r13, r12) with
// the stack aligned to 16 bytes as the ABI requires at a call.
asm(R"(
    .text
    .p2align 4
    .globl rk_sim_fiber_switch
    .hidden rk_sim_fiber_switch
    .type rk_sim_fiber_switch, @function
rk_sim_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rk_sim_fiber_switch, .-rk_sim_fiber_switch

    .p2align 4
    .globl rk_sim_fiber_start
    .hidden rk_sim_fiber_start
    .type rk_sim_fiber_start, @function
rk_sim_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size rk_sim_fiber_start, .-rk_sim_fiber_start
)");

struct Context {
    void* sp = nullptr;

    // A fresh context that calls entry(arg) on the stack [base, base + size) when first resumed.
    // entry must never return (it switches away for the last time instead).
    void init(char* base, size_t size, FiberEntry entry, void* arg) {
        // After the six pops and the return, the stack pointer is `top`, 16-byte aligned.
        const uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
        uint64_t* frame = (uint64_t*)(top - 56);
        frame[0] = 0;                                         // r15
        frame[1] = 0;                                         // r14
        frame[2] = (uint64_t)(uintptr_t)entry;                // r13
        frame[3] = (uint64_t)(uintptr_t)arg;                  // r12
        frame[4] = 0;                                         // rbx
        frame[5] = 0;                                         // rbp
        frame[6] = (uint64_t)(uintptr_t)&rk_sim_fiber_start;  // return address
        sp = frame;
    }
};

// Saves the running context in `from` and resumes `to` (another context: `to` is read before
// `from` is written).
inline void switch_to(Context& from, Context& to) { rk_sim_fiber_switch(&from.sp, to.sp); }

#else

struct Context {
    ucontext_t uc;

    void init(char* base, size_t size, FiberEntry entry, void* arg) {
        if (getcontext(&uc) != 0) abort();
        uc.uc_stack.ss_sp = base;
        uc.uc_stack.ss_size = size;
        uc.uc_link = nullptr;
        // makecontext passes int arguments: each pointer travels as two halves.
        const uint64_t e = (uint64_t)(uintptr_t)entry, a = (uint64_t)(uintptr_t)arg;
        makecontext(&uc, (void (*)())trampoline, 4, (int)(uint32_t)e, (int)(uint32_t)(e >> 32),
                    (int)(uint32_t)a, (int)(uint32_t)(a >> 32));
    }

  private:
    static void trampoline(int e_lo, int e_hi, int a_lo, int a_hi) {
        auto join = [](int lo, int hi) {
            return (uintptr_t)(((uint64_t)(uint32_t)hi << 32) | (uint32_t)lo);
        };
        ((FiberEntry)join(e_lo, e_hi))((void*)join(a_lo, a_hi));
        abort();
    }
};

inline void switch_to(Context& from, Context& to) {
    if (swapcontext(&from.uc, &to.uc) != 0) abort();
}

#endif

// Stacks for up to `count` fibers, each `size` bytes above a guard page that faults on
// overflow, mapped once and reused for every block and launch of the OS thread that owns them.
class Stacks {
  public:
    static constexpr size_t SIZE = 128 * 1024;

    ~Stacks() {
        if (base_ != nullptr) munmap(base_, count_ * stride());
    }

    // Room for n fibers; false when the memory cannot be mapped.
    bool reserve(size_t n) {
        if (n <= count_) return true;
        if (base_ != nullptr) munmap(base_, count_ * stride());
        base_ = nullptr;
        count_ = 0;
        void* p = mmap(nullptr, n * stride(), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (p == MAP_FAILED) return false;
        base_ = (char*)p;
        count_ = n;
        for (size_t i = 0; i < n; ++i) mprotect(base_ + i * stride(), page(), PROT_NONE);
        return true;
    }

    char* stack(size_t i) const { return base_ + i * stride() + page(); }

  private:
    static size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }
    static size_t stride() { return SIZE + page(); }

    char* base_ = nullptr;
    size_t count_ = 0;
};

}  // namespace rk_sim
