// cuemu: a CUDA emulator for tests. Included through alignflow_cuda.h when a .cu file is built with a
// host compiler and -DALIGNFLOW_CUEMU (plus torch's -D__CUDA_NO_*_CONVERSIONS__ defines).
//
// Model. Every CUDA thread of a block is a fiber with its own guard-paged stack; the fibers of one
// block run cooperatively on one OS thread, blocks are spread over a pool of OS threads. A fiber runs
// until it reaches a barrier (__syncthreads, __syncwarp, a shuffle, a vote) or exits; the scheduler
// then runs the next one (thread order, reversed, or shuffled: cuemu_configure). A warp collective
// completes when every lane its mask names has reached it; __syncthreads when every thread has.
//
// Reported as launch errors (the launch returns cudaErrorLaunchFailure, alignflow_cuemu_error() says
// why): __syncthreads reached from different source lines or after some threads exited; a warp
// collective whose mask names an exited lane, a lane the block does not have, or leaves out the
// caller; lanes of one collective that disagree on the op or mask; deadlock; a shared-memory race (two
// threads touch one element of an AF_SHARED/AF_DYNAMIC_SHARED array, one of them writing, with no
// barrier ordering them: __syncthreads, or a warp collective joining both lanes); a shared index out
// of bounds; an invalid launch configuration. A shuffle reading a lane outside the mask returns NaN
// (all bits set). Shared memory is all-bits-set (NaN) at each block start.
//
// Not emulated: tensor-core instructions (mma/wgmma), TMA, cp.async, inline PTX, clusters, grid-wide
// sync, spin-waits on other blocks (blocks never preempt each other), and races in global memory
// (AddressSanitizer catches out-of-bounds global accesses: build with -fsanitize=address).
#pragma once

#include <driver_types.h>  // cudaError_t, cudaStream_t (CUDA's own)

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#error "cuemu switches fiber stacks with x86-64 assembly; port switch_stack() for this architecture"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuemu {

// ------------------------------------------------------------------------------------------------
// Fiber context switch: callee-saved registers, MXCSR and the x87 control word on the old stack,
// then the stack pointer swap. 13x faster than glibc swapcontext (which also saves the signal mask
// with a system call): see csrc/README.md for the measurement.
// ------------------------------------------------------------------------------------------------

__attribute__((naked, noinline)) inline void switch_stack(void** /*save_sp*/, void* /*load_sp*/) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "subq $16, %rsp\n\tstmxcsr 8(%rsp)\n\tfnstcw (%rsp)\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "ldmxcsr 8(%rsp)\n\tfldcw (%rsp)\n\taddq $16, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}

// First entry of a fiber: switch_stack "returns" here with the argument in r12, the function in r13.
__attribute__((naked, noinline)) inline void fiber_trampoline() {
    asm volatile("movq %r12, %rdi\n\tcallq *%r13\n\tud2\n\t");
}

// ------------------------------------------------------------------------------------------------
// State
// ------------------------------------------------------------------------------------------------

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Done };
enum class WarpOp : uint8_t { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

inline const char* op_name(WarpOp op) {
    static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                  "__shfl_xor_sync", "__ballot_sync", "__any_sync", "__all_sync"};
    return names[static_cast<int>(op)];
}

struct Block;

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable byte (above the guard page)
    size_t stack_size = 0;
    void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping across switches
    Block* block = nullptr;
    uint3 thread_idx{};
    unsigned linear = 0, lane = 0, warp = 0;
    State state = State::Runnable;
    int sync_line = 0;  // line of the barrier it waits at, or passed last
    // warp collective
    WarpOp op = WarpOp::Sync;
    unsigned mask = 0;
    int arg = 0, width = 32;
    uint64_t value[2]{}, result[2]{};
    bool pred = false;
    uint32_t clock[32]{};  // vector clock over the lanes of its warp (shared-memory race check)
};

// Shared-memory shadow: who last wrote and read each element, in which barrier epoch.
struct Shadow {
    uint32_t generation;  // block generation; older entries count as empty
    int32_t w_tid, r_tid;
    uint32_t w_epoch, r_epoch, w_clock, r_clock;
    int32_t w_line, r_line;  // the barrier line each accessor passed last
};

struct SharedSlot {
    const void* tag;
    size_t offset, bytes;
};

struct FunctionRef {
    void* object;
    void (*call)(void*);
};

struct Block {
    const char* kernel = "";
    FunctionRef body{};
    dim3 grid_dim, block_dim;
    uint3 block_idx{};
    unsigned threads = 0;
    uint32_t epoch = 1, generation = 0;
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    void* sched_sp = nullptr;
    const void* sched_stack = nullptr;
    size_t sched_stack_size = 0;
    std::vector<unsigned char> arena;  // static shared arrays, then the dynamic shared memory
    std::vector<Shadow> shadow;        // one entry per arena byte (used at element starts)
    std::vector<SharedSlot> slots;
    size_t static_bytes = 0, dynamic_bytes = 0;
    std::string error;
    std::mt19937 rng;
};

inline thread_local Fiber* tls_fiber = nullptr;

struct Options {
    int order = 0;  // 0 thread order, 1 reversed, 2 shuffled at every scheduling round
    unsigned seed = 0;
    int threads = 0;  // OS threads running blocks (0: all cores)
};
inline Options options;
inline std::mutex launch_mutex;
inline std::string last_error;

constexpr size_t kArenaBytes = 228 * 1024;  // the largest shared memory per block (H100)
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr size_t kStackBytes = CUEMU_ASAN ? 512 * 1024 : 64 * 1024;

// ------------------------------------------------------------------------------------------------
// Fibers
// ------------------------------------------------------------------------------------------------

[[noreturn]] void leave_final(Fiber& f);

inline void enter(Block& b, Fiber& f) {
    tls_fiber = &f;
#if CUEMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
    switch_stack(&b.sched_sp, f.sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    switch_stack(&b.sched_sp, f.sp);
#endif
    tls_fiber = nullptr;
}

inline void leave(Fiber& f) {
    Block& b = *f.block;
#if CUEMU_ASAN
    __sanitizer_start_switch_fiber(&f.fake_stack, b.sched_stack, b.sched_stack_size);
    switch_stack(&f.sp, b.sched_sp);
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#else
    switch_stack(&f.sp, b.sched_sp);
#endif
}

[[noreturn]] inline void leave_final(Fiber& f) {
    Block& b = *f.block;
#if CUEMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, b.sched_stack, b.sched_stack_size);
#endif
    // The dead fiber's sp goes to its Fiber, not to a local: under detect_stack_use_after_return an
    // address-taken local lives in the fiber's fake stack, which the call above has just unmapped.
    switch_stack(&f.sp, b.sched_sp);
    __builtin_unreachable();
}

inline std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

inline std::string where(const Fiber& f) {
    const Block& b = *f.block;
    return format("%s: block (%u,%u,%u) thread (%u,%u,%u)", b.kernel, b.block_idx.x, b.block_idx.y,
                  b.block_idx.z, f.thread_idx.x, f.thread_idx.y, f.thread_idx.z);
}

// An error inside a fiber: record it and never resume this fiber (the block is abandoned).
[[noreturn]] inline void fail(Fiber& f, const std::string& message) {
    if (f.block->error.empty()) f.block->error = where(f) + ": " + message;
    f.state = State::Done;
    leave_final(f);
}

inline void check_exit(Fiber& f);

inline void fiber_main(Fiber* f) {
#if CUEMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &f->block->sched_stack, &f->block->sched_stack_size);
#endif
    f->block->body.call(f->block->body.object);
    f->state = State::Done;
    check_exit(*f);
    leave_final(*f);
}

inline void init_fiber(Fiber& f) {
    if (!f.stack) {
        size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "cuemu: cannot map a fiber stack\n");
            abort();
        }
        mprotect(p, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
        f.stack = static_cast<char*>(p) + page;
        f.stack_size = kStackBytes;
    }
#if CUEMU_ASAN
    // frames of the previous block's fibers never unwound: clear their redzones
    __asan_unpoison_memory_region(f.stack, f.stack_size);
#endif
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
    uint64_t* ret = reinterpret_cast<uint64_t*>(top - 24);  // rsp = top - 16 after `ret`
    ret[0] = reinterpret_cast<uint64_t>(&fiber_trampoline);
    uint64_t* regs = ret - 6;  // r15 r14 r13 r12 rbx rbp
    regs[0] = regs[1] = regs[4] = regs[5] = 0;
    regs[2] = reinterpret_cast<uint64_t>(&fiber_main);  // r13
    regs[3] = reinterpret_cast<uint64_t>(&f);           // r12
    uint32_t* control = reinterpret_cast<uint32_t*>(regs - 2);
    uint32_t mxcsr;
    uint16_t fcw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fcw));
    control[0] = fcw;
    control[2] = mxcsr;
    f.sp = regs - 2;
    f.state = State::Runnable;
    f.fake_stack = nullptr;
    f.sync_line = 0;
    std::fill(std::begin(f.clock), std::end(f.clock), 0u);
    f.clock[f.lane] = 1;
}

// ------------------------------------------------------------------------------------------------
// Barriers and warp collectives
// ------------------------------------------------------------------------------------------------

inline Fiber& self() {
    if (!tls_fiber) {
        fprintf(stderr, "cuemu: a device function was called outside a kernel launch\n");
        abort();
    }
    return *tls_fiber;
}

inline void syncthreads(int line) {
    Fiber& f = self();
    f.state = State::AtBarrier;
    f.sync_line = line;
    leave(f);
}

inline Fiber* lane_fiber(Block& b, unsigned warp, unsigned lane) {
    unsigned t = warp * 32 + lane;
    return t < b.threads ? &b.fibers[t] : nullptr;
}

inline void check_mask(Fiber& f, unsigned mask, WarpOp op, int line) {
    if (!(mask >> f.lane & 1u))
        fail(f, format("%s at line %d: mask 0x%08x leaves out the calling lane %u", op_name(op), line, mask,
                       f.lane));
    for (unsigned j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        Fiber* g = lane_fiber(*f.block, f.warp, j);
        if (!g)
            fail(f, format("%s at line %d: mask 0x%08x names lane %u, which this block of %u threads does "
                           "not have",
                           op_name(op), line, mask, j, f.block->threads));
        if (g->state == State::Done)
            fail(f, format("%s at line %d: mask 0x%08x names lane %u, which has exited", op_name(op), line,
                           mask, j));
    }
}

// The last lane to arrive computes every participant's result and releases them.
inline void resolve(Fiber& f) {
    Block& b = *f.block;
    unsigned mask = f.mask;
    Fiber* lanes[32] = {};
    for (unsigned j = 0; j < 32; ++j) {
        if (!(mask >> j & 1u)) continue;
        Fiber* g = lane_fiber(b, f.warp, j);
        if (g->state != State::AtWarp) return;  // not all there yet
        lanes[j] = g;
    }
    for (unsigned j = 0; j < 32; ++j) {
        Fiber* g = lanes[j];
        if (g && (g->mask != mask || g->op != f.op))
            fail(f, format("lane %u waits in %s (line %d) with mask 0x%08x while lane %u calls %s (line %d) "
                           "with mask 0x%08x",
                           g->lane, op_name(g->op), g->sync_line, g->mask, f.lane, op_name(f.op), f.sync_line,
                           mask));
    }
    unsigned ballot = 0;
    for (unsigned j = 0; j < 32; ++j)
        if (lanes[j] && lanes[j]->pred) ballot |= 1u << j;
    uint32_t joined[32] = {};
    for (unsigned j = 0; j < 32; ++j)
        if (lanes[j])
            for (unsigned k = 0; k < 32; ++k) joined[k] = std::max(joined[k], lanes[j]->clock[k]);
    for (unsigned j = 0; j < 32; ++j) {
        Fiber* g = lanes[j];
        if (!g) continue;
        switch (f.op) {
            case WarpOp::Sync: break;
            case WarpOp::Ballot: g->result[0] = ballot; break;
            case WarpOp::Any: g->result[0] = ballot != 0; break;
            case WarpOp::All: g->result[0] = ballot == mask; break;
            default: {
                int w = g->width, base = static_cast<int>(j) / w * w, src = static_cast<int>(j);
                if (f.op == WarpOp::ShflIdx) src = base + ((g->arg % w) + w) % w;
                if (f.op == WarpOp::ShflUp) src = static_cast<int>(j) - g->arg < base ? j : j - g->arg;
                if (f.op == WarpOp::ShflDown) src = static_cast<int>(j) + g->arg >= base + w ? j : j + g->arg;
                if (f.op == WarpOp::ShflXor) src = (static_cast<int>(j) ^ g->arg) >= base + w ? j : j ^ g->arg;
                if (src >= 0 && src < 32 && lanes[src]) {
                    g->result[0] = lanes[src]->value[0];
                    g->result[1] = lanes[src]->value[1];
                } else {
                    g->result[0] = g->result[1] = ~uint64_t(0);  // a lane outside the mask: NaN
                }
            }
        }
        std::copy(std::begin(joined), std::end(joined), std::begin(g->clock));
        g->clock[j] += 1;
        g->state = State::Runnable;
    }
}

inline void warp_collective(Fiber& f, WarpOp op, int line, unsigned mask) {
    check_mask(f, mask, op, line);
    f.op = op;
    f.mask = mask;
    f.sync_line = line;
    f.state = State::AtWarp;
    resolve(f);
    if (f.state == State::AtWarp) leave(f);
}

// A thread that exits while lanes of its warp wait for it in a collective naming it: an error.
inline void check_exit(Fiber& f) {
    Block& b = *f.block;
    for (unsigned j = 0; j < 32; ++j) {
        Fiber* g = lane_fiber(b, f.warp, j);
        if (g && g->state == State::AtWarp && (g->mask >> f.lane & 1u) && b.error.empty())
            b.error = where(*g) + format(": %s at line %d: mask 0x%08x names lane %u, which has exited",
                                         op_name(g->op), g->sync_line, g->mask, f.lane);
    }
}

inline void syncwarp(int line, unsigned mask = 0xffffffffu) {
    warp_collective(self(), WarpOp::Sync, line, mask);
}

template <class T>
inline T shuffle(WarpOp op, int line, unsigned mask, T var, int arg, int width = 32) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 16 bytes");
    Fiber& f = self();
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail(f, format("%s at line %d: width %d is not a power of two in [1, 32]", op_name(op), line, width));
    f.value[0] = f.value[1] = 0;
    std::memcpy(f.value, &var, sizeof(T));
    f.arg = arg;
    f.width = width;
    warp_collective(f, op, line, mask);
    T out;
    std::memcpy(&out, f.result, sizeof(T));
    return out;
}

inline unsigned vote(WarpOp op, int line, unsigned mask, int pred) {
    Fiber& f = self();
    f.pred = pred != 0;
    warp_collective(f, op, line, mask);
    return static_cast<unsigned>(f.result[0]);
}

inline unsigned activemask() {
    Fiber& f = self();
    unsigned mask = 0;
    for (unsigned j = 0; j < 32; ++j) {
        Fiber* g = lane_fiber(*f.block, f.warp, j);
        if (g && g->state != State::Done) mask |= 1u << j;
    }
    return mask;
}

// ------------------------------------------------------------------------------------------------
// Shared memory: arrays that check every element access for races and bounds
// ------------------------------------------------------------------------------------------------

inline bool ordered(const Fiber& f, int32_t tid, uint32_t epoch, uint32_t clock) {
    if (tid < 0 || static_cast<unsigned>(tid) == f.linear || epoch != f.block->epoch) return true;
    return static_cast<unsigned>(tid) / 32 == f.warp && clock <= f.clock[tid % 32];
}

[[noreturn]] inline void race(Fiber& f, const char* name, size_t i, const char* mine, int32_t tid,
                              const char* theirs, int line) {
    fail(f, format("shared-memory race on %s[%zu]: this thread %s it, thread %d %s it, with no barrier between "
                   "(since its last barrier or warp collective, at line %d; 0: the block start)",
                   name, i, mine, tid, theirs, line));
}

template <class T>
struct SharedArray {
    T* data;
    size_t size;
    size_t offset;  // in the block's arena, for the shadow
    const char* name;

    Shadow& shadow(size_t i) const {
        Block& b = *tls_fiber->block;
        Shadow& s = b.shadow[offset + i * sizeof(T)];
        if (s.generation != b.generation) s = Shadow{b.generation, -1, -1, 0, 0, 0, 0, 0, 0};
        return s;
    }
    void check(size_t i) const {
        if (i >= size) fail(self(), format("shared index %zu out of bounds of %s[%zu]", i, name, size));
    }
    T read(size_t i) const {
        Fiber& f = self();
        check(i);
        Shadow& s = shadow(i);
        if (!ordered(f, s.w_tid, s.w_epoch, s.w_clock)) race(f, name, i, "reads", s.w_tid, "wrote", s.w_line);
        s.r_tid = static_cast<int32_t>(f.linear);
        s.r_epoch = f.block->epoch;
        s.r_clock = f.clock[f.lane];
        s.r_line = f.sync_line;
        return data[i];
    }
    void write(size_t i, const T& v) const {
        Fiber& f = self();
        check(i);
        Shadow& s = shadow(i);
        if (!ordered(f, s.w_tid, s.w_epoch, s.w_clock)) race(f, name, i, "writes", s.w_tid, "wrote", s.w_line);
        if (!ordered(f, s.r_tid, s.r_epoch, s.r_clock)) race(f, name, i, "writes", s.r_tid, "read", s.r_line);
        s.w_tid = static_cast<int32_t>(f.linear);
        s.w_epoch = f.block->epoch;
        s.w_clock = f.clock[f.lane];
        s.w_line = f.sync_line;
        s.r_tid = -1;
        data[i] = v;
    }

    struct Ref {
        const SharedArray* array;
        size_t i;
        operator T() const { return array->read(i); }
        Ref& operator=(const T& v) { array->write(i, v); return *this; }
        Ref& operator=(const Ref& r) { array->write(i, T(r)); return *this; }
        Ref& operator+=(const T& v) { array->write(i, array->read(i) + v); return *this; }
        Ref& operator-=(const T& v) { array->write(i, array->read(i) - v); return *this; }
        Ref& operator*=(const T& v) { array->write(i, array->read(i) * v); return *this; }
        T* operator&() const { array->check(i); return array->data + i; }  // unchecked from here on
    };
    Ref operator[](size_t i) const { return Ref{this, i}; }
};

inline size_t arena_alloc(Fiber& f, const void* tag, size_t bytes) {
    Block& b = *f.block;
    for (const SharedSlot& s : b.slots)
        if (s.tag == tag) return s.offset;
    size_t offset = (b.static_bytes + 15) & ~size_t(15);
    if (offset + bytes > kDefaultSharedLimit)
        fail(f, format("static shared memory of %zu bytes exceeds %zu", offset + bytes, kDefaultSharedLimit));
    b.slots.push_back({tag, offset, bytes});
    std::memset(b.arena.data() + offset, 0xff, bytes);  // NaN in every float and bf16 element
    b.static_bytes = offset + bytes;
    return offset;
}

template <class T>
inline SharedArray<T> shared_array(const void* tag, size_t n, const char* name) {
    Fiber& f = self();
    size_t offset = arena_alloc(f, tag, n * sizeof(T));
    return SharedArray<T>{reinterpret_cast<T*>(f.block->arena.data() + offset), n, offset, name};
}

template <class T>
inline SharedArray<T> dynamic_shared(const char* name) {
    Block& b = *self().block;
    // the dynamic part lives at the arena's end, after the largest static allowance
    return SharedArray<T>{reinterpret_cast<T*>(b.arena.data() + kDefaultSharedLimit), b.dynamic_bytes / sizeof(T),
                          kDefaultSharedLimit, name};
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------

// The fibers of the block's threads (the pool holds 1024, reused from launch to launch).
struct Live {
    Fiber *first, *last;
    Fiber* begin() const { return first; }
    Fiber* end() const { return last; }
};
inline Live live(Block& b) { return Live{b.fibers.data(), b.fibers.data() + b.threads}; }

inline void run_block(Block& b) {
    b.error.clear();
    b.epoch = 1;
    b.generation += 1;
    b.slots.clear();
    b.static_bytes = 0;
    std::memset(b.arena.data() + kDefaultSharedLimit, 0xff, b.dynamic_bytes);  // NaN, as static arrays
    for (unsigned t = 0; t < b.threads; ++t) {
        Fiber& f = b.fibers[t];
        f.block = &b;
        f.linear = t;
        f.lane = t % 32;
        f.warp = t / 32;
        f.thread_idx = uint3{t % b.block_dim.x, t / b.block_dim.x % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y)};
        init_fiber(f);
    }
    b.order.resize(b.threads);
    for (unsigned t = 0; t < b.threads; ++t) b.order[t] = options.order == 1 ? b.threads - 1 - t : t;
    while (b.error.empty()) {
        if (options.order == 2) std::shuffle(b.order.begin(), b.order.end(), b.rng);
        bool ran = false;
        for (unsigned t : b.order) {
            Fiber& f = b.fibers[t];
            if (f.state != State::Runnable) continue;
            enter(b, f);
            ran = true;
            if (!b.error.empty()) return;
        }
        if (ran) continue;
        unsigned done = 0, barrier = 0;
        for (const Fiber& f : live(b)) {
            done += f.state == State::Done;
            barrier += f.state == State::AtBarrier;
        }
        if (done == b.threads) return;
        const Fiber* first = nullptr;
        for (const Fiber& f : live(b))
            if (f.state == State::AtBarrier) {
                if (!first) first = &f;
                else if (f.sync_line != first->sync_line) {
                    b.error = where(f) + format(": __syncthreads at line %d while thread %u waits at the "
                                                "__syncthreads at line %d",
                                                f.sync_line, first->linear, first->sync_line);
                    return;
                }
            }
        if (barrier + done == b.threads && done > 0) {
            b.error = where(*first) + format(": __syncthreads at line %d reached by %u threads while %u have "
                                             "exited", first->sync_line, barrier, done);
            return;
        }
        if (barrier == b.threads) {
            b.epoch += 1;
            for (Fiber& f : live(b)) f.state = State::Runnable;
            continue;
        }
        std::string waits;  // deadlock: nobody can run
        for (const Fiber& f : live(b))
            if (f.state == State::AtWarp && waits.size() < 400)
                waits += format(" thread %u in %s (line %d, mask 0x%08x);", f.linear, op_name(f.op), f.sync_line,
                                f.mask);
            else if (f.state == State::AtBarrier && waits.size() < 400)
                waits += format(" thread %u at __syncthreads (line %d);", f.linear, f.sync_line);
        b.error = format("%s: block (%u,%u,%u): deadlock:", b.kernel, b.block_idx.x, b.block_idx.y, b.block_idx.z) +
                  waits;
        return;
    }
}

struct Worker {
    Block block;
};
inline std::vector<std::unique_ptr<Worker>> workers;

inline cudaError_t fail_launch(cudaError_t code, const std::string& message) {
    last_error = message;
    return code;
}

inline cudaError_t run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, FunctionRef body) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    last_error.clear();
    uint64_t threads = uint64_t(block.x) * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
        return fail_launch(cudaErrorInvalidConfiguration,
                           format("%s: invalid configuration: grid (%u,%u,%u), block (%u,%u,%u)", kernel, grid.x,
                                  grid.y, grid.z, block.x, block.y, block.z));
    if (smem > kArenaBytes - kDefaultSharedLimit)
        return fail_launch(cudaErrorInvalidValue, format("%s: %zu bytes of dynamic shared memory", kernel, smem));
    uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    unsigned cores = options.threads > 0 ? unsigned(options.threads) : std::max(1u, std::thread::hardware_concurrency());
    unsigned n = unsigned(std::min<uint64_t>(cores, blocks));
    while (workers.size() < n) {
        workers.push_back(std::make_unique<Worker>());
        Block& b = workers.back()->block;
        b.arena.resize(kArenaBytes);
        b.shadow.resize(kArenaBytes);
        b.fibers.resize(1024);
    }
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    auto work = [&](unsigned w) {
        Block& b = workers[w]->block;
        b.kernel = kernel;
        b.body = body;
        b.grid_dim = grid;
        b.block_dim = block;
        b.threads = unsigned(threads);
        b.dynamic_bytes = smem;
        for (uint64_t i; !failed.load() && (i = next.fetch_add(1)) < blocks;) {
            b.block_idx = uint3{unsigned(i % grid.x), unsigned(i / grid.x % grid.y), unsigned(i / (uint64_t(grid.x) * grid.y))};
            b.rng.seed(options.seed ^ unsigned(i * 2654435761u));
            run_block(b);
            if (!b.error.empty()) {
                std::lock_guard<std::mutex> l(error_mutex);
                if (!failed.exchange(true)) last_error = b.error;
            }
        }
    };
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < n; ++w) pool.emplace_back(work, w);
    work(0);
    for (std::thread& t : pool) t.join();
    return failed ? cudaErrorLaunchFailure : cudaSuccess;
}

template <class... P, class... A>
inline cudaError_t launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                          A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
    struct Call {
        void (*kernel)(P...);
        std::tuple<std::decay_t<P>...>* params;
        static void run(void* self) {
            Call* c = static_cast<Call*>(self);
            std::apply(c->kernel, *c->params);
        }
    } call{kernel, &params};
    return run_grid(name, grid, block, smem, FunctionRef{&call, &Call::run});
}

inline const Block& block() { return *self().block; }

}  // namespace cuemu

// ------------------------------------------------------------------------------------------------
// The CUDA surface
// ------------------------------------------------------------------------------------------------

#define threadIdx (::cuemu::self().thread_idx)
#define blockIdx (::cuemu::block().block_idx)
#define blockDim (::cuemu::block().block_dim)
#define gridDim (::cuemu::block().grid_dim)
constexpr int warpSize = 32;

#define __syncthreads() ::cuemu::syncthreads(__LINE__)
#define __syncwarp(...) ::cuemu::syncwarp(__LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cuemu::shuffle(::cuemu::WarpOp::ShflIdx, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuemu::shuffle(::cuemu::WarpOp::ShflUp, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuemu::shuffle(::cuemu::WarpOp::ShflDown, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuemu::shuffle(::cuemu::WarpOp::ShflXor, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::cuemu::vote(::cuemu::WarpOp::Ballot, __LINE__, (mask), (pred))
#define __any_sync(mask, pred) static_cast<int>(::cuemu::vote(::cuemu::WarpOp::Any, __LINE__, (mask), (pred)))
#define __all_sync(mask, pred) static_cast<int>(::cuemu::vote(::cuemu::WarpOp::All, __LINE__, (mask), (pred)))
#define __activemask() ::cuemu::activemask()

#define AF_SHARED(T, name, n) \
    static const char name##_tag_ = 0; \
    const ::cuemu::SharedArray<T> name = ::cuemu::shared_array<T>(&name##_tag_, (n), #name)
#define AF_DYNAMIC_SHARED(T, name) const ::cuemu::SharedArray<T> name = ::cuemu::dynamic_shared<T>(#name)
#define AF_LAUNCH(kernel, grid, block, smem, stream, ...) \
    ::cuemu::launch(#kernel, (kernel), (grid), (block), (smem), (stream), __VA_ARGS__)

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T> inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.0f), 1.0f); }
// sin(pi x), cos(pi x): in double, rounded once (the device's are within about 1 ulp)
inline void sincospif(float x, float* s, float* c) {
    const double a = 3.141592653589793 * double(x);
    *s = float(std::sin(a));
    *c = float(std::cos(a));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }

// Atomics: blocks of one launch run on several OS threads, so global memory needs real atomics.
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T> inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> inline T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
    return expected;
}
template <class T> inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> r(*p);
    T old = r.load();
    while (old < v && !r.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> r(*p);
    T old = r.load();
    while (v < old && !r.compare_exchange_weak(old, v)) {}
    return old;
}

// The emulator's controls, exported from every emulated shared object.
extern "C" __attribute__((visibility("default"), weak)) const char* alignflow_cuemu_error() {
    return cuemu::last_error.c_str();
}
extern "C" __attribute__((visibility("default"), weak)) void alignflow_cuemu_configure(int order, unsigned seed,
                                                                                      int threads) {
    cuemu::options = cuemu::Options{order, seed, threads};
}
