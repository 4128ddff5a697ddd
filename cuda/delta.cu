// BitDelta's 1-bit matmul: y[b, o] = alpha * sum_j x[b, j] * s[o, j] with
// s = +-1 read from packed sign bits (ferrox.pack's layout: rows of
// row_bytes = ceil(in / 8) bytes, bit j % 8 of byte j / 8, 1 = negative),
// never materialised; f32 accumulation. rust/core/src/delta/matmul.rs is the
// CPU twin and sums in exactly this order, so the two agree bit for bit:
// - a packed row is read as little-endian u32 words (bytes past the row
//   read as 0), word w holding inputs 32w .. 32w + 31;
// - lane l of a warp adds +-x[b, j] for j = l, l + 32, ... in order (x past
//   `in` is 0: adding +-0 to a sum that started at +0 changes nothing, so
//   padding bits are harmless);
// - the 32 lane sums are combined by the tree a[i] += a[i + off] for
//   off = 16, 8, 4, 2, 1 (one thread, through shared memory);
// - y = alpha * sum (+ the old y when accumulating), rounded once to T.
//
// Decode-style blocking: a block of 256 threads is 8 warps, warp w handling
// output row 8 * r + w for a tile of DELTA_TB batch rows; the sign word is
// one broadcast load shared by the tile, x loads are coalesced (32
// consecutive inputs per warp). Larger batches are more tiles. Multi-tenant:
// with `ids` (int64 [batch]) batch row b reads the signs and alpha of
// fine-tune ids[b] (signs stacked [tenants, out, row_bytes]); a row's
// arithmetic is the single-tenant one. Blocks are a grid-stride loop over
// (row group, batch tile), the row group varying fastest.
//
// alpha_mode: 0 = the scalar `alpha0` for every row; 1 = alpha[tenant];
// 2 = alpha[tenant * out + o]. An adapter id outside [0, tenants) reads
// nothing and gives NaN rows (the host checks ids; this only keeps a bad id
// from reading out of bounds).

#define DELTA_WARPS 8
#define DELTA_TB 8

typedef unsigned char u8;
typedef long long i64;

__device__ __forceinline__ u32 delta_word(const u8* row, u64 row_bytes, u64 w) {
    u64 s = w * 4;
    if (s + 4 <= row_bytes && (((u64)(row + s)) & 3u) == 0u) return *reinterpret_cast<const u32*>(row + s);
    u32 v = 0;
    for (u32 k = 0; k < 4; ++k)
        if (s + k < row_bytes) v |= (u32)row[s + k] << (8 * k);
    return v;
}

template <typename T>
__device__ __forceinline__ void delta_matmul_body(const T* x, u64 batch, u64 in, const u8* signs, u64 row_bytes, u64 out,
                                                  u64 tenants, const float* alpha, float alpha0, u32 alpha_mode,
                                                  const i64* ids, T* y, u32 accumulate) {
    __shared__ float part[DELTA_WARPS][DELTA_TB][32];
    const u64 row_groups = (out + DELTA_WARPS - 1) / DELTA_WARPS;
    const u64 tiles = (batch + DELTA_TB - 1) / DELTA_TB;
    const u64 words = (in + 31) / 32;
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (u64 blk = blockIdx.x; blk < row_groups * tiles; blk += gridDim.x) {
        const u64 group = blk % row_groups, b0 = (blk / row_groups) * DELTA_TB;
        const u64 nb = batch - b0 < DELTA_TB ? batch - b0 : DELTA_TB;
        const u64 o = group * DELTA_WARPS + warp;
        float acc[DELTA_TB];
#pragma unroll
        for (int b = 0; b < DELTA_TB; ++b) acc[b] = 0.0f;
        if (o < out) {
            for (u64 w = 0; w < words; ++w) {
                const u64 j = w * 32 + lane;
                if (ids == nullptr) {
                    const u32 neg = delta_word(signs + o * row_bytes, row_bytes, w) >> lane & 1u;
#pragma unroll
                    for (int b = 0; b < DELTA_TB; ++b) {
                        if ((u64)b < nb) {
                            const float v = j < in ? Elem<T>::load(x[(b0 + b) * in + j]) : 0.0f;
                            acc[b] += neg ? -v : v;
                        }
                    }
                } else {
#pragma unroll
                    for (int b = 0; b < DELTA_TB; ++b) {
                        if ((u64)b < nb) {
                            const u64 t = (u64)ids[b0 + b];
                            if (t >= tenants) continue;
                            const u32 neg = delta_word(signs + (t * out + o) * row_bytes, row_bytes, w) >> lane & 1u;
                            const float v = j < in ? Elem<T>::load(x[(b0 + b) * in + j]) : 0.0f;
                            acc[b] += neg ? -v : v;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int b = 0; b < DELTA_TB; ++b) part[warp][b][lane] = acc[b];
        __syncthreads();
        if (threadIdx.x < DELTA_WARPS * DELTA_TB) {
            const u32 ww = threadIdx.x / DELTA_TB, b = threadIdx.x % DELTA_TB;
            const u64 oo = group * DELTA_WARPS + ww;
            if (oo < out && b < nb) {
                float a[32];
                for (int i = 0; i < 32; ++i) a[i] = part[ww][b][i];
                for (int off = 16; off > 0; off /= 2)
                    for (int i = 0; i < off; ++i) a[i] = a[i] + a[i + off];
                const u64 t = ids == nullptr ? 0 : (u64)ids[b0 + b];
                const float s = t >= tenants       ? __uint_as_float(0x7fc00000u)
                                : alpha_mode == 0 ? alpha0
                                : alpha_mode == 1 ? alpha[t]
                                                  : alpha[t * out + oo];
                const float d = s * a[0];
                T* dst = y + (b0 + b) * out + oo;
                *dst = Elem<T>::store(accumulate ? Elem<T>::load(*dst) + d : d);
            }
        }
        __syncthreads();
    }
}

#define DELTA_KERNEL(SUFFIX, T)                                                                                       \
    extern "C" __global__ void delta_matmul_##SUFFIX(const T* x, u64 batch, u64 in, const u8* signs, u64 row_bytes, \
                                                     u64 out, u64 tenants, const float* alpha, float alpha0,         \
                                                     u32 alpha_mode, const i64* ids, T* y, u32 accumulate) {         \
        delta_matmul_body<T>(x, batch, in, signs, row_bytes, out, tenants, alpha, alpha0, alpha_mode, ids, y,        \
                             accumulate);                                                                            \
    }

DELTA_KERNEL(f32, float)
DELTA_KERNEL(f16, f16_t)
DELTA_KERNEL(bf16, bf16_t)
