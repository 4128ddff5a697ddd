// TRAK's implicit projection out = G·Rᵀ/√p (G [n, d] row-major, out [n, p]
// f32), with the Rademacher R of rust/core/src/importance/project.rs:
// R[i, j] = -1 iff bit j % 32 of word (j / 32) % 4 of
// philox_block(seed, i, j / 128) is set (philox.cu, the same Philox as the
// CPU), so the signs are the CPU's bit for bit. The sums follow the CPU's
// documented order exactly, so the outputs are its bits too:
// - columns in groups of 4, zero-padded past d; group q of output (r, i) is
//   t_q = (((0 ± G[r,4q]) ± G[r,4q+1]) ± G[r,4q+2]) ± G[r,4q+3] (a − x for
//   a −1 entry, as the CPU's table does);
// - s = ((0 + t_0) + t_1) + ... in ascending q, one sequential f32 sum per
//   output (never split over threads: that would change the order);
// - out = s * scale with scale = fl32(1/√p) from the host.
//
// Blocking: a block of PROJ_OUTS threads, thread t computing output i0 + t
// for PROJ_ROWS rows of G held in registers. Per tile of PROJ_COLS columns
// the block stages those rows of G in shared memory (coalesced loads, read
// back as broadcasts) and each thread draws its one Philox block of 128 signs.
// Blocks are a grid-stride loop over (output block, row block), the output
// block varying fastest. Parallelism is n/PROJ_ROWS × p threads: the order
// above leaves no split of the d axis.

#define PROJ_OUTS 256
#define PROJ_ROWS 4
#define PROJ_COLS 128

template <typename T>
__device__ __forceinline__ void importance_project_body(const T* g, u64 n, u64 d, u64 p, u64 seed, float scale, float* out) {
    __shared__ float tile[PROJ_ROWS][PROJ_COLS];
    const u64 out_blocks = (p + PROJ_OUTS - 1) / PROJ_OUTS;
    const u64 row_blocks = (n + PROJ_ROWS - 1) / PROJ_ROWS;
    const u64 groups = (d + 3) / 4;
    for (u64 blk = blockIdx.x; blk < out_blocks * row_blocks; blk += gridDim.x) {
        const u64 i = (blk % out_blocks) * PROJ_OUTS + threadIdx.x;
        const u64 r0 = (blk / out_blocks) * PROJ_ROWS;
        float acc[PROJ_ROWS];
#pragma unroll
        for (int rr = 0; rr < PROJ_ROWS; ++rr) acc[rr] = 0.0f;
        for (u64 j0 = 0; j0 < d; j0 += PROJ_COLS) {
            for (u32 e = threadIdx.x; e < PROJ_ROWS * PROJ_COLS; e += blockDim.x) {
                const u64 r = r0 + e / PROJ_COLS, j = j0 + e % PROJ_COLS;
                tile[e / PROJ_COLS][e % PROJ_COLS] = (r < n && j < d) ? Elem<T>::load(g[r * d + j]) : 0.0f;
            }
            __syncthreads();
            u32 w[4];
            philox_block(seed, i, j0 / PROJ_COLS, w);
            const u64 left = groups - j0 / 4;
            const u32 tile_groups = left < PROJ_COLS / 4 ? (u32)left : PROJ_COLS / 4;
            for (u32 q = 0; q < tile_groups; ++q) {
                const u32 bits = w[q / 8] >> ((q % 8) * 4);
#pragma unroll
                for (int rr = 0; rr < PROJ_ROWS; ++rr) {
                    float t = 0.0f;
#pragma unroll
                    for (u32 k = 0; k < 4; ++k) {
                        const float x = tile[rr][4 * q + k];
                        t = (bits >> k) & 1u ? t - x : t + x;
                    }
                    acc[rr] += t;
                }
            }
            __syncthreads();
        }
        if (i < p) {
#pragma unroll
            for (int rr = 0; rr < PROJ_ROWS; ++rr)
                if (r0 + rr < n) out[(r0 + rr) * p + i] = acc[rr] * scale;
        }
    }
}

#define IMPORTANCE_PROJECT(SUFFIX, T)                                                                       \
    extern "C" __global__ void importance_project_##SUFFIX(const T* g, u64 n, u64 d, u64 p, u64 seed, float scale, \
                                                           float* out) {                                    \
        importance_project_body<T>(g, n, d, p, seed, scale, out);                                          \
    }

IMPORTANCE_PROJECT(f32, float)
IMPORTANCE_PROJECT(f16, f16_t)
IMPORTANCE_PROJECT(bf16, bf16_t)
