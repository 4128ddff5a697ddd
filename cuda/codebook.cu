// The codebook linear: y[b, r] = T(s[r] * sum_j x[b, j] * W[r, j] + bias[r]),
// W[r, j] = C[g(r), code[r, j / d], j % d] decoded from the packed codes
// (ferrox.pack's layout: code c of a row at bits [c*bits, (c+1)*bits) of a
// little-endian bit stream) and never materialised. Rows are the permuted
// rows; g(r) is the group whose [group_offsets[g], group_offsets[g+1])
// holds r. rust/core/src/codebook/linear.rs is the CPU twin and sums in
// exactly this order, so the two agree bit for bit:
// - lane l of a warp adds x[b, j] * W[r, j] (rounded product, rounded sum:
//   --fmad=false) for j = l, l + 32, ... < in, in order;
// - the 32 lane sums are combined by the tree a[i] += a[i + off] for
//   off = 16, 8, 4, 2, 1 (one thread, through shared memory);
// - then times s[r] (row_scale, if any), plus bias[r] (if any), each an f32
//   rounding, then one rounding to T.
//
// Decode-style blocking as in delta.cu: a block of 256 threads is 8 warps,
// warp w handling row 8 * k + w for a tile of CB_TB batch rows, so a lane
// decodes a code once for the whole tile; x loads are coalesced (32
// consecutive inputs per warp); the codebook (2^bits * d floats per group)
// is read through the cache. Blocks are a grid-stride loop over (row group,
// batch tile), the row group varying fastest. The host checks every shape;
// group_offsets must be non-decreasing from 0 to out (CodebookLinear checks
// them once when it is built).

#define CB_WARPS 8
#define CB_TB 8

typedef unsigned char u8;

// Code c of a packed row of row_bytes bytes (a code spans at most 2 bytes).
__device__ __forceinline__ u32 cb_code(const u8* row, u64 row_bytes, u64 c, u32 bits) {
    const u64 o = c * bits, at = o / 8;
    u32 v = (u32)row[at];
    if (at + 1 < row_bytes) v |= (u32)row[at + 1] << 8;
    return (v >> (o % 8)) & ((1u << bits) - 1u);
}

// The group of row r: the last g < groups with group_offsets[g] <= r.
__device__ __forceinline__ u64 cb_group(const int* offsets, u64 groups, u64 r) {
    u64 lo = 0, hi = groups;  // offsets[lo] <= r < offsets[hi] (hi = groups: past the end)
    while (hi - lo > 1) {
        const u64 mid = (lo + hi) / 2;
        if ((u64)offsets[mid] <= r) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename T>
__device__ __forceinline__ void codebook_linear_body(const T* x, u64 batch, u64 in, const u8* codes, u64 row_bytes,
                                                     u64 out, const float* codebooks, u64 table_len, u32 bits, u32 d,
                                                     const int* offsets, u64 groups, const float* row_scale,
                                                     const float* bias, T* y) {
    __shared__ float part[CB_WARPS][CB_TB][32];
    const u64 row_groups = (out + CB_WARPS - 1) / CB_WARPS;
    const u64 tiles = (batch + CB_TB - 1) / CB_TB;
    const u64 words = (in + 31) / 32;
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (u64 blk = blockIdx.x; blk < row_groups * tiles; blk += gridDim.x) {
        const u64 group = blk % row_groups, b0 = (blk / row_groups) * CB_TB;
        const u64 nb = batch - b0 < CB_TB ? batch - b0 : CB_TB;
        const u64 r = group * CB_WARPS + warp;
        float acc[CB_TB];
#pragma unroll
        for (int b = 0; b < CB_TB; ++b) acc[b] = 0.0f;
        if (r < out) {
            const u8* row = codes + r * row_bytes;
            const float* table = codebooks + cb_group(offsets, groups, r) * table_len;
            for (u64 w = 0; w < words; ++w) {
                const u64 j = w * 32 + lane;
                if (j >= in) continue;
                const float wv = table[(u64)cb_code(row, row_bytes, j / d, bits) * d + j % d];
#pragma unroll
                for (int b = 0; b < CB_TB; ++b) {
                    if ((u64)b < nb) {
                        const float p = Elem<T>::load(x[(b0 + b) * in + j]) * wv;
                        acc[b] = acc[b] + p;
                    }
                }
            }
        }
#pragma unroll
        for (int b = 0; b < CB_TB; ++b) part[warp][b][lane] = acc[b];
        __syncthreads();
        if (threadIdx.x < CB_WARPS * CB_TB) {
            const u32 ww = threadIdx.x / CB_TB, b = threadIdx.x % CB_TB;
            const u64 rr = group * CB_WARPS + ww;
            if (rr < out && b < nb) {
                float a[32];
                for (int i = 0; i < 32; ++i) a[i] = part[ww][b][i];
                for (int off = 16; off > 0; off /= 2)
                    for (int i = 0; i < off; ++i) a[i] = a[i] + a[i + off];
                float v = a[0];
                if (row_scale != nullptr) v = v * row_scale[rr];
                if (bias != nullptr) v = v + bias[rr];
                y[(b0 + b) * out + rr] = Elem<T>::store(v);
            }
        }
        __syncthreads();
    }
}

#define CODEBOOK_KERNEL(SUFFIX, T)                                                                                 \
    extern "C" __global__ void codebook_linear_##SUFFIX(                                                           \
        const T* x, u64 batch, u64 in, const u8* codes, u64 row_bytes, u64 out, const float* codebooks,            \
        u64 table_len, u32 bits, u32 d, const int* offsets, u64 groups, const float* row_scale, const float* bias, \
        T* y) {                                                                                                    \
        codebook_linear_body<T>(x, batch, in, codes, row_bytes, out, codebooks, table_len, bits, d, offsets,       \
                                groups, row_scale, bias, y);                                                       \
    }

CODEBOOK_KERNEL(f32, float)
CODEBOOK_KERNEL(f16, f16_t)
CODEBOOK_KERNEL(bf16, bf16_t)
