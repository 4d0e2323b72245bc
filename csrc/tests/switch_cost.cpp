// Cost of one fiber switch: cuemu's switch_stack against glibc swapcontext (which also saves and
// restores the signal mask with a system call). Build and run by hand:
//   g++ -O2 -std=c++20 -DALIGNFLOW_CUEMU -I csrc -I /usr/local/cuda/include csrc/tests/switch_cost.cpp -o /tmp/switch_cost && /tmp/switch_cost
#include "common/alignflow_cuda.h"

#include <ucontext.h>

#include <chrono>

static void* main_sp;
static void* fiber_sp;
static constexpr long kRounds = 2000000;

static void fiber_body(void*) {
    for (;;) cuemu::switch_stack(&fiber_sp, main_sp);
}

static ucontext_t main_ctx, fiber_ctx;
static void uc_body() {
    for (;;) swapcontext(&fiber_ctx, &main_ctx);
}

int main() {
    static char stack_a[1 << 16] __attribute__((aligned(16))), stack_b[1 << 16] __attribute__((aligned(16)));
    // a fresh cuemu-style stack: trampoline frame with r12 = argument, r13 = function
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_a + sizeof stack_a) & ~uintptr_t(15);
    uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);
    ret[0] = reinterpret_cast<uint64_t>(&cuemu::fiber_trampoline);
    uint64_t* regs = ret - 6;
    regs[0] = regs[1] = regs[4] = regs[5] = 0;
    regs[2] = reinterpret_cast<uint64_t>(&fiber_body);
    regs[3] = 0;
    uint32_t* control = reinterpret_cast<uint32_t*>(regs - 2);
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fcw));
    control[0] = fcw;
    control[2] = mxcsr;
    fiber_sp = regs - 2;
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < kRounds; ++i) cuemu::switch_stack(&main_sp, fiber_sp);
    auto t1 = std::chrono::steady_clock::now();
    getcontext(&fiber_ctx);
    fiber_ctx.uc_stack.ss_sp = stack_b;
    fiber_ctx.uc_stack.ss_size = sizeof stack_b;
    fiber_ctx.uc_link = nullptr;
    makecontext(&fiber_ctx, uc_body, 0);
    auto t2 = std::chrono::steady_clock::now();
    for (long i = 0; i < kRounds; ++i) swapcontext(&main_ctx, &fiber_ctx);
    auto t3 = std::chrono::steady_clock::now();
    double a = std::chrono::duration<double, std::nano>(t1 - t0).count() / (2.0 * kRounds);
    double b = std::chrono::duration<double, std::nano>(t3 - t2).count() / (2.0 * kRounds);
    printf("switch_stack %.1f ns, swapcontext %.1f ns per switch (%.1fx)\n", a, b, b / a);
}
