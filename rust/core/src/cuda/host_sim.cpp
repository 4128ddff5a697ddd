// Host simulation of the ferrox kernels, for tests on machines without a GPU.
//
// The test (host_sim.rs) pastes cuda/common.cu and the kernel sources where
// the KERNELS marker is and compiles the result with the host C++ compiler
// (-ffp-contract=off, so like NVRTC with --fmad=false no FMA is formed). The
// kernels then run unchanged. A launch runs the blocks one after another;
// each block's threads are cooperative fibers (ucontext) run in thread order,
// and __syncthreads() switches to the next thread, so every thread of the
// block reaches a barrier before any passes it. That is a valid CUDA
// schedule, deterministic, and it makes block-wide code (shared-memory
// histograms, scans) run as written; __shared__ variables are statics, one
// copy for the block that runs. A block whose threads do not all reach the
// same barriers (undefined behaviour on a GPU) makes the launch fail. This
// checks the kernels' arithmetic, conversions, indexing and barriers against
// the Rust CPU code; only NVRTC's code generation is left to the GPU tests.
//
// Usage: sim CMD ARGS... ; binary inputs on stdin, binary outputs on stdout.
//   philox_uniform|philox_normal SEED STREAM OFFSET N MISALIGN GRID   -> N f32
//   axpby_f32|axpby_f16|axpby_bf16 ABITS BBITS N ALIAS MISALIGN GRID  (stdin: x, y) -> N elements
//       ALIAS: 0 separate output, 1 output is x, 2 output is y
//   to_f16|to_bf16 COUNT (stdin: COUNT f32) -> COUNT u16
//   from_f16|from_bf16 -> 65536 f32, for every 16-bit pattern

#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct SimDim {
    unsigned x, y, z;
};
static SimDim blockIdx, threadIdx, blockDim, gridDim;

static inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
// Fibers switch only at barriers, so an atomic is a plain update.
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned old = *p;
    *p = old + v;
    return old;
}
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}

// ------------------------------------------------------------ fibers

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done;
};
static std::vector<Fiber> fibers;
static ucontext_t scheduler;
static unsigned current;
static const std::function<void()>* body;
static bool in_fiber = false;

static void fiber_main() {
    (*body)();
    fibers[current].done = true;  // returning resumes the scheduler (uc_link)
}

static void __syncthreads() {
    if (in_fiber) swapcontext(&fibers[current].ctx, &scheduler);
}

// Runs kernel() for every (block, thread) of a grid of `grid` blocks of
// `block` threads. False if a block's threads diverged at a barrier.
template <typename F>
static bool launch(unsigned grid, unsigned block, F kernel) {
    std::function<void()> k = kernel;
    body = &k;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    if (fibers.size() < block) fibers.resize(block);
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            Fiber& f = fibers[t];
            f.stack.resize(1 << 16);
            f.done = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = &scheduler;
            makecontext(&f.ctx, fiber_main, 0);
        }
        for (;;) {
            unsigned finished = 0;
            for (unsigned t = 0; t < block; ++t) {
                if (fibers[t].done) {
                    ++finished;
                    continue;
                }
                current = t;
                threadIdx = {t, 0, 0};
                in_fiber = true;
                swapcontext(&scheduler, &fibers[t].ctx);
                in_fiber = false;
                finished += fibers[t].done;
            }
            if (finished == block) break;
            if (finished > 0) {
                // Some threads left while others wait at a barrier; the
                // waiting ones are abandoned (their stacks are reset next time).
                return false;
            }
        }
    }
    return true;
}

// @@KERNELS@@

// A 16-byte aligned buffer of n elements, optionally starting one element in.
template <typename T>
struct Buf {
    std::vector<unsigned char> raw;
    T* p;
    Buf(size_t n, bool misalign) : raw((n + 1) * sizeof(T) + 32) {
        size_t a = ((size_t)raw.data() + 15) & ~(size_t)15;
        p = reinterpret_cast<T*>(a) + (misalign ? 1 : 0);
    }
};

[[maybe_unused]] static void read_all(void* dst, size_t bytes) {
    if (bytes && std::fread(dst, 1, bytes, stdin) != bytes) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
}
[[maybe_unused]] static void write_all(const void* src, size_t bytes) {
    if (bytes && std::fwrite(src, 1, bytes, stdout) != bytes) std::exit(3);
}

static unsigned long long arg(char** argv, int i) { return std::strtoull(argv[i], nullptr, 0); }

template <typename T, typename K>
static int run_axpby(char** argv, K kernel) {
    float a = __uint_as_float((unsigned)arg(argv, 2)), b = __uint_as_float((unsigned)arg(argv, 3));
    u64 n = arg(argv, 4);
    int alias = (int)arg(argv, 5);
    bool mis = arg(argv, 6) != 0;
    unsigned grid = (unsigned)arg(argv, 7);
    Buf<T> x(n, mis), y(n, mis), o(n, mis);
    read_all(x.p, n * sizeof(T));
    read_all(y.p, n * sizeof(T));
    T* out = alias == 1 ? x.p : alias == 2 ? y.p : o.p;
    if (!launch(grid, 256, [&] { kernel(out, a, x.p, b, y.p, n); })) return 4;
    write_all(out, n * sizeof(T));
    return 0;
}

#ifdef FERROX_SIM_LIB
// The library build: kernels launched by name with cuLaunchKernel's
// convention (params[i] points at argument i), so the Rust merge driver runs
// unchanged against the simulation. Returns 0, 1 for an unknown kernel, 2 for
// a block that diverged at a barrier.
#define P(i, T) (*(T*)params[i])
typedef unsigned long long ull;
typedef unsigned char uchar;
#define SIM_KERNEL(NAME, CALL)                                        \
    if (!std::strcmp(name, NAME)) return launch(grid, block, [&] { CALL; }) ? 0 : 2;
#define SIM_MERGE(SUFFIX, T)                                                                                      \
    SIM_KERNEL("merge_first_nonfinite_" #SUFFIX, merge_first_nonfinite_##SUFFIX(P(0, const T*), P(1, u64), P(2, ull*))) \
    SIM_KERNEL("merge_hist_" #SUFFIX, merge_hist_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u32),       \
                                                          P(4, const CutState*), P(5, ull*), P(6, ull*)))             \
    SIM_KERNEL("merge_tile_ties_" #SUFFIX, merge_tile_ties_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64),        \
                                                                    P(3, const CutState*), P(4, u32*)))               \
    SIM_KERNEL("merge_mask_" #SUFFIX, merge_mask_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64),                  \
                                                          P(3, const CutState*), P(4, const u64*), P(5, uchar*)))     \
    SIM_KERNEL("merge_l1_" #SUFFIX, merge_l1_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, const uchar*),  \
                                                      P(4, double*)))                                                 \
    SIM_KERNEL("merge_row_select_" #SUFFIX, merge_row_select_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64),      \
                                                                      P(3, u64), P(4, u64), P(5, u64), P(6, uchar*),  \
                                                                      P(7, ull*)))                                    \
    SIM_KERNEL("merge_row_l1_" #SUFFIX, merge_row_l1_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u64),   \
                                                              P(4, const uchar*), P(5, double*)))                     \
    SIM_KERNEL("merge_write_" #SUFFIX, merge_write_##SUFFIX(P(0, T*), P(1, const T*), P(2, const T*), P(3, u64),      \
                                                            P(4, const float*), P(5, u64), P(6, WriteArgs),           \
                                                            P(7, const ull*), P(8, u32), P(9, ull*)))

extern "C" int sim_launch(const char* name, unsigned grid, unsigned block, void** params) {
    SIM_MERGE(f32, float)
    SIM_MERGE(f16, f16_t)
    SIM_MERGE(bf16, bf16_t)
    SIM_KERNEL("merge_select_cuts", merge_select_cuts(P(0, const ull*), P(1, u32), P(2, u32), P(3, u64), P(4, u64),
                                                      P(5, CutState*)))
    SIM_KERNEL("merge_tile_scan", merge_tile_scan(P(0, const u32*), P(1, u64), P(2, const CutState*), P(3, u64*)))
    SIM_KERNEL("merge_dare_mask", merge_dare_mask(P(0, u64), P(1, float), P(2, u64), P(3, u64), P(4, uchar*)))
    SIM_KERNEL("merge_scales_tensor", merge_scales_tensor(P(0, double*), P(1, u64), P(2, float), P(3, float*)))
    SIM_KERNEL("merge_scales_rows", merge_scales_rows(P(0, const double*), P(1, u64), P(2, float), P(3, float*)))
    return 1;
}
#else
int main(int argc, char** argv) {
    if (argc < 2) return 1;
    const char* cmd = argv[1];
    if (!std::strcmp(cmd, "philox_uniform") || !std::strcmp(cmd, "philox_normal")) {
        if (argc != 8) return 1;
        u64 seed = arg(argv, 2), stream = arg(argv, 3), offset = arg(argv, 4), n = arg(argv, 5);
        bool mis = arg(argv, 6) != 0;
        unsigned grid = (unsigned)arg(argv, 7);
        Buf<float> o(n, mis);
        bool normal = cmd[7] == 'n';
        bool ok = launch(grid, 256, [&] {
            if (normal)
                philox_normal(o.p, seed, stream, offset, n);
            else
                philox_uniform(o.p, seed, stream, offset, n);
        });
        if (!ok) return 4;
        write_all(o.p, n * 4);
        return 0;
    }
    if (!std::strcmp(cmd, "axpby_f32") && argc == 8) return run_axpby<float>(argv, axpby_f32);
    if (!std::strcmp(cmd, "axpby_f16") && argc == 8) return run_axpby<f16_t>(argv, axpby_f16);
    if (!std::strcmp(cmd, "axpby_bf16") && argc == 8) return run_axpby<bf16_t>(argv, axpby_bf16);
    if ((!std::strcmp(cmd, "to_f16") || !std::strcmp(cmd, "to_bf16")) && argc == 3) {
        u64 n = arg(argv, 2);
        std::vector<float> in(n);
        std::vector<u16> out(n);
        read_all(in.data(), n * 4);
        bool bf = cmd[3] == 'b';
        for (u64 i = 0; i < n; ++i) out[i] = bf ? f32_to_bf16(in[i]) : f32_to_f16(in[i]);
        write_all(out.data(), n * 2);
        return 0;
    }
    if (!std::strcmp(cmd, "from_f16") || !std::strcmp(cmd, "from_bf16")) {
        bool bf = cmd[5] == 'b';
        std::vector<float> out(65536);
        for (unsigned h = 0; h < 65536; ++h) out[h] = bf ? bf16_to_f32((u16)h) : f16_to_f32((u16)h);
        write_all(out.data(), out.size() * 4);
        return 0;
    }
    std::fprintf(stderr, "bad command\n");
    return 1;
}
#endif
