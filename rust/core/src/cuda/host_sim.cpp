// Host simulation of the ferrox kernels, for tests on machines without a GPU.
//
// The test (host_sim.rs) pastes cuda/common.cu, ops.cu and philox.cu where
// the KERNELS marker is and compiles the result with the host C++ compiler
// (-ffp-contract=off, so like NVRTC with --fmad=false no FMA is formed). The
// kernels then run unchanged: a launch is every (block, thread) of the grid
// in turn, which is a valid schedule because the kernels' threads never
// communicate. This checks the kernels' own arithmetic, conversions and
// indexing against the Rust CPU code; only NVRTC's code generation is left
// to the GPU tests.
//
// Usage: sim CMD ARGS... ; binary inputs on stdin, binary outputs on stdout.
//   philox_uniform|philox_normal SEED STREAM OFFSET N MISALIGN GRID   -> N f32
//   axpby_f32|axpby_f16|axpby_bf16 ABITS BBITS N ALIAS MISALIGN GRID  (stdin: x, y) -> N elements
//       ALIAS: 0 separate output, 1 output is x, 2 output is y
//   to_f16|to_bf16 COUNT (stdin: COUNT f32) -> COUNT u16
//   from_f16|from_bf16 -> 65536 f32, for every 16-bit pattern

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

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
// Threads run one after another here, so atomics are plain updates.
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}

// @@KERNELS@@

template <typename F>
static void launch(unsigned grid, F kernel) {
    gridDim = {grid, 1, 1};
    blockDim = {256, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < 256; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel();
        }
    }
}

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
    launch(grid, [&] { kernel(out, a, x.p, b, y.p, n); });
    write_all(out, n * sizeof(T));
    return 0;
}

#ifdef FERROX_SIM_LIB
// The library build: kernels launched by name with cuLaunchKernel's
// convention (params[i] points at argument i), so the Rust merge driver runs
// unchanged against the simulation.
#define P(i, T) (*(T*)params[i])
#define SIM_MERGE(SUFFIX, T)                                                                                       \
    if (!std::strcmp(name, "merge_first_nonfinite_" #SUFFIX)) {                                                    \
        launch(grid, [&] { merge_first_nonfinite_##SUFFIX(P(0, const T*), P(1, u64), P(2, unsigned long long*)); }); \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_hist_" #SUFFIX)) {                                                               \
        launch(grid, [&] {                                                                                         \
            merge_hist_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u32), P(4, u32),                   \
                                P(5, unsigned long long*), P(6, unsigned long long*));                             \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_seg_ties_" #SUFFIX)) {                                                           \
        launch(grid, [&] { merge_seg_ties_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u32), P(4, u32*)); }); \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_mask_" #SUFFIX)) {                                                               \
        launch(grid, [&] {                                                                                         \
            merge_mask_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u32), P(4, u32), P(5, u64),        \
                                P(6, const u64*), P(7, u32), P(8, u64), P(9, const u64*), P(10, float), P(11, u64), \
                                P(12, u64), P(13, unsigned char*));                                                \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_l1_" #SUFFIX)) {                                                                 \
        launch(grid, [&] {                                                                                         \
            merge_l1_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, const unsigned char*), P(4, double*)); \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_row_cuts_" #SUFFIX)) {                                                           \
        launch(grid, [&] {                                                                                         \
            merge_row_cuts_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u64), P(4, int), P(5, u64),    \
                                    P(6, u64), P(7, u64*), P(8, unsigned long long*));                             \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_row_mask_" #SUFFIX)) {                                                           \
        launch(grid, [&] {                                                                                         \
            merge_row_mask_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u64), P(4, const u64*),        \
                                    P(5, unsigned char*));                                                         \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_row_l1_" #SUFFIX)) {                                                             \
        launch(grid, [&] {                                                                                         \
            merge_row_l1_##SUFFIX(P(0, const T*), P(1, const T*), P(2, u64), P(3, u64),                            \
                                  P(4, const unsigned char*), P(5, double*));                                      \
        });                                                                                                        \
        return 0;                                                                                                  \
    }                                                                                                              \
    if (!std::strcmp(name, "merge_write_" #SUFFIX)) {                                                              \
        launch(grid, [&] {                                                                                         \
            merge_write_##SUFFIX(P(0, T*), P(1, const T*), P(2, const T*), P(3, const u64*), P(4, const u64*),     \
                                 P(5, const float*), P(6, u64), P(7, const float*), P(8, u32), P(9, u64),          \
                                 P(10, u32), P(11, u32), P(12, float), P(13, float), P(14, unsigned long long*));  \
        });                                                                                                        \
        return 0;                                                                                                  \
    }

extern "C" int sim_launch(const char* name, unsigned grid, void** params) {
    SIM_MERGE(f32, float)
    SIM_MERGE(f16, f16_t)
    SIM_MERGE(bf16, bf16_t)
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
        launch(grid, [&] {
            if (normal)
                philox_normal(o.p, seed, stream, offset, n);
            else
                philox_uniform(o.p, seed, stream, offset, n);
        });
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
