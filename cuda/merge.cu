// Merging one tensor on the GPU: the kernels behind ferrox_core::merge::cuda.
// Each is the twin of a CPU step in rust/core/src/merge (the same delta
// rounding, abs keys, tie rule, Philox draws and summation order), so the
// merged tensor is bitwise the CPU's. Compiled after philox.cu (philox_block,
// u32_to_uniform).
//
// The whole merge of one tensor is queued on one stream with no host round
// trip: the radix-select cuts are chosen on the device (merge_select_cuts
// reads the histograms and writes a CutState that the next kernels read),
// rescale factors too (merge_scales_*), and errors (NaN/Inf) are recorded in
// device counters that the write kernel checks, so the host reads back once,
// at the end. Flat kernels are grid-stride loops; the tile and row kernels
// give each block a tile of MERGE_TILE elements or a whole row, staged in
// shared memory, and order ties with a block-wide scan. Block sizes are any
// power of two from 1 to MERGE_MAX_THREADS (the host chooses).

#define MERGE_TILE 4096ull  // elements one block stages in shared memory (masks, tie counts)
#define MERGE_UNIT 65536ull // rescale sum unit (merge::UNIT)
#define MERGE_LANES 8ull    // partial sums per unit or row (block::l1_sums)
#define MERGE_MAX_MODELS 64u
#define MERGE_MAX_THREADS 256u
#define MERGE_NONE 0xffffffffffffffffull  // "no index" in the error counters

// Abs keys of a value already rounded to T (Float::key_of_f32), and the key
// of infinity: a larger key is a NaN.
template <typename T>
struct Key;
template <>
struct Key<float> {
    static __device__ __forceinline__ u32 of(float d) { return __float_as_uint(d) & 0x7fffffffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7f800000u; }
    static __device__ __forceinline__ u32 bits() { return 31u; }
};
template <>
struct Key<f16_t> {
    static __device__ __forceinline__ u32 of(float d) { return (u32)f32_to_f16(d) & 0x7fffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7c00u; }
    static __device__ __forceinline__ u32 bits() { return 15u; }
};
template <>
struct Key<bf16_t> {
    static __device__ __forceinline__ u32 of(float d) { return (__float_as_uint(d) >> 16) & 0x7fffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7f80u; }
    static __device__ __forceinline__ u32 bits() { return 15u; }
};

// tau = x - base rounded to T (mergekit subtracts in the input dtype), in f32.
template <typename T>
__device__ __forceinline__ float rounded_delta(T x, T b) {
    return Elem<T>::load(Elem<T>::store(Elem<T>::load(x) - Elem<T>::load(b)));
}

template <typename T>
__device__ __forceinline__ u32 delta_key(const T* x, const T* base, u64 i) {
    return Key<T>::of(rounded_delta(x[i], base[i]));
}

__device__ __forceinline__ bool finite(float v) { return (__float_as_uint(v) & 0x7fffffffu) < 0x7f800000u; }

// first[0] = min(first[0], index of the first NaN/Inf in x).
template <typename T>
__device__ __forceinline__ void first_nonfinite_body(const T* x, u64 n, unsigned long long* first) {
    for (u64 i = global_index(); i < n; i += global_stride())
        if (!finite(Elem<T>::load(x[i]))) atomicMin(first, (unsigned long long)i);
}

// ------------------------------------------------ whole-tensor selection

// One model's rank cut (select::Cut) as the device works it out: the top
// `rank` keys are every key above `key` plus the first `ties` keys equal to
// it in index order; `equal` keys equal it in all. 31-bit (f32) keys take two
// passes: the first finds the high half `hbin` with `above` keys in higher
// bins (`coarse` = 1), the second the low half. `partial`: some but not all
// ties are taken, so each tie's ordinal matters.
struct CutState {
    u64 rank, key, ties, equal, hbin, above, coarse, partial;
};

// Radix histogram of the delta keys. Pass 0: counts of (key >> shift) &
// 0x7fff (shift 16 for 31-bit keys, else 0) into hist[0 .. 32768]; a NaN
// delta records its index in first_nan. Pass 1 (31-bit keys): for each cut j
// with a coarse bin, counts of key & 0xffff among keys whose high half is
// that bin, into hist[j * 65536 ..].
template <typename T>
__device__ __forceinline__ void hist_body(const T* base, const T* x, u64 n, u32 pass, const CutState* st,
                                          unsigned long long* hist, unsigned long long* first_nan) {
    u32 shift = Key<T>::bits() == 31u ? 16u : 0u;
    bool c0 = pass == 1u && st[0].coarse, c1 = pass == 1u && st[1].coarse;
    u32 h0 = (u32)st[0].hbin, h1 = (u32)st[1].hbin;
    if (pass == 1u && !c0 && !c1) return;
    for (u64 i = global_index(); i < n; i += global_stride()) {
        u32 k = delta_key(x, base, i);
        if (k > Key<T>::inf()) {
            if (pass == 0u) atomicMin(first_nan, (unsigned long long)i);
        } else if (pass == 0u) {
            atomicAdd(&hist[(k >> shift) & 0x7fffu], 1ull);
        } else {
            if (c0 && (k >> 16) == h0) atomicAdd(&hist[k & 0xffffu], 1ull);
            if (c1 && (k >> 16) == h1) atomicAdd(&hist[65536u + (k & 0xffffu)], 1ull);
        }
    }
}

// select's `descend` over hist[0 .. bins) by the whole block: the highest bin
// at which the count from the top reaches r (1 <= r), and the keys in higher
// bins. *found = 0 when the bins hold fewer than r keys (NaN deltas were left
// out; the merge fails on them anyway). Called by every thread of the block.
__device__ __forceinline__ void block_descend(const unsigned long long* hist, u64 bins, u64 r, u64* bin, u64* above,
                                              u64* found) {
    __shared__ u64 chunk[MERGE_MAX_THREADS];
    __shared__ u64 over[MERGE_MAX_THREADS];
    __shared__ u64 result[3];
    u64 nt = blockDim.x, t = threadIdx.x, per = (bins + nt - 1) / nt;
    u64 lo = t * per < bins ? t * per : bins, hi = lo + per < bins ? lo + per : bins;
    u64 s = 0;
    for (u64 b = lo; b < hi; ++b) s += hist[b];
    chunk[t] = s;
    if (t == 0) result[0] = result[1] = result[2] = 0;
    __syncthreads();
    if (t == 0) {  // keys in the chunks above each chunk
        u64 acc = 0;
        for (u64 c = nt; c-- > 0;) {
            over[c] = acc;
            acc += chunk[c];
        }
    }
    __syncthreads();
    if (over[t] < r && r <= over[t] + chunk[t]) {  // exactly one chunk holds the crossing
        u64 a = over[t];
        for (u64 b = hi; b-- > lo;) {
            if (a + hist[b] >= r) {
                result[0] = b;
                result[1] = a;
                result[2] = 1;
                break;
            }
            a += hist[b];
        }
    }
    __syncthreads();
    *bin = result[0];
    *above = result[1];
    *found = result[2];
    __syncthreads();
}

// The cuts [lo_rank, hi_rank] (st[0], st[1]) from the histograms (one block;
// select::CutHistograms::cuts). Stage 0 reads the first pass, stage 1 (31-bit
// keys) the second.
extern "C" __global__ void merge_select_cuts(const unsigned long long* hist, u32 stage, u32 key_bits, u64 lo_rank,
                                             u64 hi_rank, CutState* st) {
    for (u32 j = 0; j < 2; ++j) {
        CutState c = st[j];
        u64 bin = 0, above = 0, found = 0;
        if (stage == 0u) {
            c.rank = j == 0 ? lo_rank : hi_rank;
            c.key = 0xffffffffull;  // select::Cut::EMPTY
            c.ties = c.equal = c.hbin = c.above = c.coarse = 0;
            if (c.rank > 0) {
                block_descend(hist, 32768, c.rank, &bin, &above, &found);
                if (found && key_bits <= 15u) {
                    c.key = bin;
                    c.ties = c.rank - above;
                    c.equal = hist[bin];
                } else if (found) {
                    c.coarse = 1;
                    c.hbin = bin;
                    c.above = above;
                }
            }
        } else if (c.coarse) {
            const unsigned long long* low = hist + 65536ull * j;
            block_descend(low, 65536, c.rank - c.above, &bin, &above, &found);
            if (found) {
                c.key = (c.hbin << 16) | bin;
                c.ties = c.rank - c.above - above;
                c.equal = low[bin];
            }
        }
        c.partial = c.ties > 0 && c.ties < c.equal;
        __syncthreads();
        if (threadIdx.x == 0) st[j] = c;
        __syncthreads();
    }
}

// counts[j * tiles + t] = how many delta keys of tile t equal cut j's key,
// for the partial cuts (nothing to do when neither is).
template <typename T>
__device__ __forceinline__ void tile_ties_body(const T* base, const T* x, u64 n, const CutState* st, u32* counts) {
    bool p0 = st[0].partial, p1 = st[1].partial;
    if (!p0 && !p1) return;
    u32 k0 = (u32)st[0].key, k1 = (u32)st[1].key;
    u64 tiles = (n + MERGE_TILE - 1) / MERGE_TILE;
    __shared__ u32 total[2];
    for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        if (threadIdx.x == 0) total[0] = total[1] = 0;
        __syncthreads();
        u64 start = tile * MERGE_TILE, end = start + MERGE_TILE < n ? start + MERGE_TILE : n;
        u32 c0 = 0, c1 = 0;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            u32 k = delta_key(x, base, i);
            c0 += k == k0;
            c1 += k == k1;
        }
        if (c0) atomicAdd(&total[0], c0);
        if (c1) atomicAdd(&total[1], c1);
        __syncthreads();
        if (threadIdx.x == 0) {
            counts[tile] = total[0];
            counts[tiles + tile] = total[1];
        }
        __syncthreads();
    }
}

// starts[j * tiles + t] = ties of cut j before tile t (an exclusive prefix sum
// of the tile counts, one block), for the partial cuts.
extern "C" __global__ void merge_tile_scan(const u32* counts, u64 tiles, const CutState* st, u64* starts) {
    __shared__ u64 sums[MERGE_MAX_THREADS];
    u64 nt = blockDim.x, t = threadIdx.x, per = (tiles + nt - 1) / nt;
    u64 lo = t * per < tiles ? t * per : tiles, hi = lo + per < tiles ? lo + per : tiles;
    for (u32 j = 0; j < 2; ++j) {
        if (!st[j].partial) continue;  // the same for every thread
        const u32* c = counts + j * tiles;
        u64 s = 0;
        for (u64 i = lo; i < hi; ++i) s += c[i];
        sums[t] = s;
        __syncthreads();
        if (t == 0) {
            u64 acc = 0;
            for (u64 q = 0; q < nt; ++q) {
                u64 v = sums[q];
                sums[q] = acc;
                acc += v;
            }
        }
        __syncthreads();
        u64 acc = sums[t];
        for (u64 i = lo; i < hi; ++i) {
            starts[j * tiles + i] = acc;
            acc += c[i];
        }
        __syncthreads();
    }
}

// One rank cut as the mask walks it: keys above `key` are in, and the first
// `ties` keys equal to it in index order (`*seen` counts the ties met so far).
struct CutArgs {
    u32 key;
    u64 ties;
};

__device__ __forceinline__ bool take(const CutArgs& c, u32 k, u64* seen) {
    bool tie = k == c.key;
    bool in = k > c.key || (tie && *seen < c.ties);
    *seen += tie;
    return in;
}

// Ties of cuts (lo, hi) before this thread's run within a staged tile, from a
// block-wide exclusive scan of the per-thread counts; `lo_base`/`hi_base` are
// the ties before the tile. Runs are contiguous: thread t owns elements
// [t * per, (t + 1) * per) of the tile. Also returns the tile's totals.
__device__ __forceinline__ void block_tie_ordinals(const u32* keys, u64 len, u64 per, CutArgs lo, CutArgs hi,
                                                   bool count_lo, bool count_hi, u64* seen_lo, u64* seen_hi,
                                                   u64* total_lo, u64* total_hi) {
    __shared__ u64 pre[2][MERGE_MAX_THREADS + 1];
    u64 t = threadIdx.x, nt = blockDim.x;
    u64 a = t * per < len ? t * per : len, e = a + per < len ? a + per : len;
    u64 c0 = 0, c1 = 0;
    if (count_lo || count_hi) {
        for (u64 q = a; q < e; ++q) {
            c0 += keys[q] == lo.key;
            c1 += keys[q] == hi.key;
        }
    }
    pre[0][t] = c0;
    pre[1][t] = c1;
    __syncthreads();
    if (t == 0) {
        for (u32 j = 0; j < 2; ++j) {
            u64 acc = 0;
            for (u64 q = 0; q < nt; ++q) {
                u64 v = pre[j][q];
                pre[j][q] = acc;
                acc += v;
            }
            pre[j][nt] = acc;
        }
    }
    __syncthreads();
    *seen_lo += pre[0][t];
    *seen_hi += pre[1][t];
    *total_lo = pre[0][nt];
    *total_hi = pre[1][nt];
    __syncthreads();
}

// keep[i] for one model's rank band: in the top-hi set and not in the top-lo
// set. Each block stages a tile of keys in shared memory (coalesced loads),
// each thread walks a contiguous run of it in index order with the tie
// ordinals of its run start, and the tile's mask is stored coalesced.
template <typename T>
__device__ __forceinline__ void mask_body(const T* base, const T* x, u64 n, const CutState* st, const u64* starts,
                                          unsigned char* keep) {
    __shared__ u32 keys[MERGE_TILE];
    __shared__ unsigned char kept[MERGE_TILE];
    CutArgs lo = {(u32)st[0].key, st[0].ties}, hi = {(u32)st[1].key, st[1].ties};
    bool p0 = st[0].partial, p1 = st[1].partial;
    u64 tiles = (n + MERGE_TILE - 1) / MERGE_TILE, nt = blockDim.x, t = threadIdx.x, per = MERGE_TILE / nt;
    for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        u64 start = tile * MERGE_TILE, len = n - start < MERGE_TILE ? n - start : MERGE_TILE;
        for (u64 q = t; q < len; q += nt) keys[q] = delta_key(x, base, start + q);
        __syncthreads();
        // Ordinals matter only for a partial cut; otherwise any count works.
        u64 seen_lo = p0 ? starts[tile] : 0, seen_hi = p1 ? starts[tiles + tile] : 0, tl, th;
        block_tie_ordinals(keys, len, per, lo, hi, p0, p1, &seen_lo, &seen_hi, &tl, &th);
        u64 a = t * per < len ? t * per : len, e = a + per < len ? a + per : len;
        for (u64 q = a; q < e; ++q) {
            bool in_hi = take(hi, keys[q], &seen_hi);
            bool in_lo = take(lo, keys[q], &seen_lo);
            kept[q] = (unsigned char)(in_hi && !in_lo);
        }
        __syncthreads();
        for (u64 q = t; q < len; q += nt) keep[start + q] = kept[q];
        __syncthreads();
    }
}

// keep[i] for DARE: uniform < threshold, from Philox block i / 4 of
// (seed, stream); the same for every granularity and dtype.
extern "C" __global__ void merge_dare_mask(u64 n, float threshold, u64 seed, u64 stream, unsigned char* keep) {
    u64 blocks = (n + 3) / 4;
    for (u64 b = global_index(); b < blocks; b += global_stride()) {
        u32 r[4];
        philox_block(seed, stream, b, r);
        for (u64 q = 0; q < 4 && 4 * b + q < n; ++q) keep[4 * b + q] = (unsigned char)(u32_to_uniform(r[q]) < threshold);
    }
}

// ------------------------------------------------------ rescale sums

// Sums of |tau| and |kept tau| per (unit, lane): lane l of unit u adds the
// elements u*UNIT + l, + l + LANES, ... in order, in f64 (block::l1_sums).
// keep == null keeps everything. The order is the CPU's, so each lane is a
// serial chain: the parallelism is units * LANES threads.
template <typename T>
__device__ __forceinline__ void l1_body(const T* base, const T* x, u64 n, const unsigned char* keep, double* sums) {
    u64 units = (n + MERGE_UNIT - 1) / MERGE_UNIT;
    for (u64 t = global_index(); t < units * MERGE_LANES; t += global_stride()) {
        u64 u = t / MERGE_LANES, lane = t % MERGE_LANES;
        u64 end = (u + 1) * MERGE_UNIT < n ? (u + 1) * MERGE_UNIT : n;
        double all = 0.0, kept = 0.0;
        for (u64 i = u * MERGE_UNIT + lane; i < end; i += MERGE_LANES) {
            double a = (double)__uint_as_float(__float_as_uint(rounded_delta(x[i], base[i])) & 0x7fffffffu);
            all += a;
            kept += (keep == 0 || keep[i]) ? a : 0.0;
        }
        sums[2 * t] = all;
        sums[2 * t + 1] = kept;
    }
}

// Per row: lane l of row r adds the row's elements l, l + LANES, ... (one
// thread per (row, lane)); merge_scales_rows adds the lanes in order.
template <typename T>
__device__ __forceinline__ void row_l1_body(const T* base, const T* x, u64 rows, u64 len, const unsigned char* keep,
                                            double* sums) {
    for (u64 t = global_index(); t < rows * MERGE_LANES; t += global_stride()) {
        u64 r = t / MERGE_LANES, lane = t % MERGE_LANES;
        double all = 0.0, kept = 0.0;
        for (u64 j = lane; j < len; j += MERGE_LANES) {
            u64 i = r * len + j;
            double a = (double)__uint_as_float(__float_as_uint(rounded_delta(x[i], base[i])) & 0x7fffffffu);
            all += a;
            kept += (keep == 0 || keep[i]) ? a : 0.0;
        }
        sums[2 * t] = all;
        sums[2 * t + 1] = kept;
    }
}

// mergekit's rescale factor Σ|τ| / Σ|kept τ|, 1 when either is tiny
// (merge::rescale_factor).
__device__ __forceinline__ float rescale_factor(double all, double kept) {
    return (all < 1e-7 || kept < 1e-7) ? 1.0f : (float)(all / kept);
}

// *scale = weight * rescale factor of the whole tensor (one block): the lanes
// of each unit added in order, then the units in index order.
extern "C" __global__ void merge_scales_tensor(double* sums, u64 units, float weight, float* scale) {
    for (u64 u = threadIdx.x; u < units; u += blockDim.x) {
        double a = 0.0, k = 0.0;
        for (u64 l = 0; l < MERGE_LANES; ++l) {
            a += sums[2 * (u * MERGE_LANES + l)];
            k += sums[2 * (u * MERGE_LANES + l) + 1];
        }
        sums[2 * u * MERGE_LANES] = a;
        sums[2 * u * MERGE_LANES + 1] = k;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double a = 0.0, k = 0.0;
        for (u64 u = 0; u < units; ++u) {
            a += sums[2 * u * MERGE_LANES];
            k += sums[2 * u * MERGE_LANES + 1];
        }
        *scale = weight * rescale_factor(a, k);
    }
}

// scales[r] = weight * rescale factor of row r (lanes added in order).
extern "C" __global__ void merge_scales_rows(const double* sums, u64 rows, float weight, float* scales) {
    for (u64 r = global_index(); r < rows; r += global_stride()) {
        double a = 0.0, k = 0.0;
        for (u64 l = 0; l < MERGE_LANES; ++l) {
            a += sums[2 * (r * MERGE_LANES + l)];
            k += sums[2 * (r * MERGE_LANES + l) + 1];
        }
        scales[r] = weight * rescale_factor(a, k);
    }
}

// ------------------------------------------------------ per-row selection

// One model's rank-band mask per row (granularity: row), one block per row:
// the r-th largest key of the row for r = lo and hi by radix select over
// 8-bit digits (select::row_cut; each pass counts, in a shared histogram, the
// digits of the keys that share the prefix found so far), then the mask with
// ties taken in index order from the row start. Rows of up to MERGE_TILE
// keys stay in shared memory between the passes. A NaN delta records its
// flat index in first_nan and leaves the row unmasked.
template <typename T>
__device__ __forceinline__ void row_select_body(const T* base, const T* x, u64 rows, u64 len, u64 lo_rank,
                                                u64 hi_rank, unsigned char* keep, unsigned long long* first_nan) {
    __shared__ u32 keys[MERGE_TILE];
    __shared__ unsigned char kept[MERGE_TILE];
    __shared__ u32 hist[2][256];
    __shared__ u32 prefix[2], known[2];
    __shared__ u64 remaining[2];
    __shared__ u32 bad;
    u64 nt = blockDim.x, t = threadIdx.x, per = MERGE_TILE / nt;
    bool cached = len <= MERGE_TILE;
    int top_shift = Key<T>::bits() == 31u ? 24 : 8;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* rb = base + row * len;
        const T* rx = x + row * len;
        if (t == 0) {
            bad = 0;
            prefix[0] = prefix[1] = known[0] = known[1] = 0;
            remaining[0] = lo_rank;
            remaining[1] = hi_rank;
        }
        __syncthreads();
        for (int shift = top_shift; shift >= 0; shift -= 8) {
            for (u64 q = t; q < 512; q += nt) hist[q / 256][q % 256] = 0;
            __syncthreads();
            bool first = shift == top_shift;
            for (u64 i = t; i < len; i += nt) {
                u32 k = (cached && !first) ? keys[i] : delta_key(rx, rb, i);
                if (first) {
                    if (cached) keys[i] = k;
                    if (k > Key<T>::inf()) {
                        atomicMin(first_nan, (unsigned long long)(row * len + i));
                        bad = 1;
                        continue;
                    }
                }
                for (u32 j = 0; j < 2; ++j)
                    if (remaining[j] > 0 && (k & known[j]) == prefix[j]) atomicAdd(&hist[j][(k >> shift) & 0xffu], 1u);
            }
            __syncthreads();
            if (bad) break;  // every thread sees the same flag here
            for (u64 j = t; j < 2; j += nt) {
                if (remaining[j] == 0) continue;
                // The counts of matching keys add up to >= remaining.
                u64 r = remaining[j];
                u32 d = 255;
                while (d > 0 && hist[j][d] < r) {
                    r -= hist[j][d];
                    --d;
                }
                prefix[j] |= d << shift;
                known[j] |= 0xffu << shift;
                remaining[j] = r;
            }
            __syncthreads();
        }
        if (bad) {
            __syncthreads();
            continue;
        }
        CutArgs lo = {lo_rank > 0 ? prefix[0] : 0xffffffffu, lo_rank > 0 ? remaining[0] : 0};
        CutArgs hi = {hi_rank > 0 ? prefix[1] : 0xffffffffu, hi_rank > 0 ? remaining[1] : 0};
        u64 seen_lo = 0, seen_hi = 0;  // ties before the current tile
        for (u64 ts = 0; ts < len; ts += MERGE_TILE) {
            u64 tl = len - ts < MERGE_TILE ? len - ts : MERGE_TILE;
            if (!cached)
                for (u64 q = t; q < tl; q += nt) keys[q] = delta_key(rx, rb, ts + q);
            __syncthreads();
            u64 s_lo = seen_lo, s_hi = seen_hi, tot_lo, tot_hi;
            block_tie_ordinals(keys, tl, per, lo, hi, true, true, &s_lo, &s_hi, &tot_lo, &tot_hi);
            u64 a = t * per < tl ? t * per : tl, e = a + per < tl ? a + per : tl;
            for (u64 q = a; q < e; ++q) {
                bool in_hi = take(hi, keys[q], &s_hi);
                bool in_lo = take(lo, keys[q], &s_lo);
                kept[q] = (unsigned char)(in_hi && !in_lo);
            }
            __syncthreads();
            for (u64 q = t; q < tl; q += nt) keep[row * len + ts + q] = kept[q];
            seen_lo += tot_lo;
            seen_hi += tot_hi;
            __syncthreads();
        }
    }
}

// ------------------------------------------------------------ the write

// What the fused write needs per model, passed by value (cuLaunchKernel
// copies it): input addresses, keep masks (0 keeps everything), weights,
// and which models take their scale from `scales` (bit m of `scaled`; the
// others use their weight). Mirrored by merge::cuda::WriteArgs.
struct WriteArgs {
    u64 models[MERGE_MAX_MODELS];
    u64 keeps[MERGE_MAX_MODELS];
    float weights[MERGE_MAX_MODELS];
    u64 scaled;
    u32 nm, consensus, normalize;
    float lambda, plain_divisor;
};

// The fused write (block::write_span): weighted masked deltas, optional TIES
// sign election, normalisation, lambda, one rounding. Model m's scale for
// element i is scales[m * (n / scale_span) + i / scale_span] (one per tensor
// or per row). Writes nothing when an error counter (errors[0 .. n_errors))
// recorded a NaN/Inf, so a failed merge leaves `out` as it was. changed[0]
// counts outputs that differ from `reference`.
template <typename T>
__device__ __forceinline__ void write_body(T* out, const T* base, const T* reference, u64 n, const float* scales,
                                           u64 scale_span, const WriteArgs& a, const unsigned long long* errors,
                                           u32 n_errors, unsigned long long* changed) {
    for (u32 e = 0; e < n_errors; ++e)
        if (errors[e] != MERGE_NONE) return;  // the same for every thread
    __shared__ unsigned long long block_changed;
    if (threadIdx.x == 0) block_changed = 0;
    __syncthreads();
    unsigned long long differ = 0;
    u64 spans = n / scale_span;
    for (u64 i = global_index(); i < n; i += global_stride()) {
        u64 span = i / scale_span;
        T bt = base[i];
        float b = Elem<T>::load(bt);
        float v[MERGE_MAX_MODELS];
        float total = 0.0f;
        for (u32 m = 0; m < a.nm; ++m) {
            const T* x = (const T*)a.models[m];
            const unsigned char* keep = (const unsigned char*)a.keeps[m];
            float scale = (a.scaled >> m) & 1ull ? scales[m * spans + span] : a.weights[m];
            float d = rounded_delta(x[i], bt);
            v[m] = (keep == 0 || keep[i]) ? scale * d : 0.0f;
            total += v[m];
        }
        float mixed = total, divisor = a.plain_divisor;
        if (a.consensus) {
            bool positive = total >= 0.0f;
            mixed = 0.0f;
            divisor = 0.0f;
            for (u32 m = 0; m < a.nm; ++m) {
                bool agree = positive ? v[m] > 0.0f : v[m] < 0.0f;
                mixed += agree ? v[m] : 0.0f;
                divisor += agree ? a.weights[m] : 0.0f;
            }
            if (divisor == 0.0f) divisor = 1.0f;
        }
        if (a.normalize) mixed /= divisor;
        T o = Elem<T>::store(b + mixed * a.lambda);
        out[i] = o;
        differ += Elem<T>::load(o) != Elem<T>::load(reference[i]);
    }
    if (differ) atomicAdd(&block_changed, differ);
    __syncthreads();
    if (threadIdx.x == 0 && block_changed) atomicAdd(changed, block_changed);
}

#define MERGE_KERNELS(SUFFIX, T)                                                                                     \
    extern "C" __global__ void merge_first_nonfinite_##SUFFIX(const T* x, u64 n, unsigned long long* first) {      \
        first_nonfinite_body(x, n, first);                                                                           \
    }                                                                                                                \
    extern "C" __global__ void merge_hist_##SUFFIX(const T* base, const T* x, u64 n, u32 pass, const CutState* st, \
                                                   unsigned long long* hist, unsigned long long* first_nan) {      \
        hist_body(base, x, n, pass, st, hist, first_nan);                                                            \
    }                                                                                                                \
    extern "C" __global__ void merge_tile_ties_##SUFFIX(const T* base, const T* x, u64 n, const CutState* st,      \
                                                        u32* counts) {                                             \
        tile_ties_body(base, x, n, st, counts);                                                                      \
    }                                                                                                                \
    extern "C" __global__ void merge_mask_##SUFFIX(const T* base, const T* x, u64 n, const CutState* st,           \
                                                   const u64* starts, unsigned char* keep) {                       \
        mask_body(base, x, n, st, starts, keep);                                                                     \
    }                                                                                                                \
    extern "C" __global__ void merge_l1_##SUFFIX(const T* base, const T* x, u64 n, const unsigned char* keep,      \
                                                 double* sums) {                                                   \
        l1_body(base, x, n, keep, sums);                                                                             \
    }                                                                                                                \
    extern "C" __global__ void merge_row_select_##SUFFIX(const T* base, const T* x, u64 rows, u64 len, u64 lo,     \
                                                         u64 hi, unsigned char* keep,                              \
                                                         unsigned long long* first_nan) {                          \
        row_select_body(base, x, rows, len, lo, hi, keep, first_nan);                                                \
    }                                                                                                                \
    extern "C" __global__ void merge_row_l1_##SUFFIX(const T* base, const T* x, u64 rows, u64 len,                 \
                                                     const unsigned char* keep, double* sums) {                    \
        row_l1_body(base, x, rows, len, keep, sums);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void merge_write_##SUFFIX(T* out, const T* base, const T* reference, u64 n,              \
                                                    const float* scales, u64 scale_span, WriteArgs a,              \
                                                    const unsigned long long* errors, u32 n_errors,                \
                                                    unsigned long long* changed) {                                 \
        write_body(out, base, reference, n, scales, scale_span, a, errors, n_errors, changed);                       \
    }

MERGE_KERNELS(f32, float)
MERGE_KERNELS(f16, f16_t)
MERGE_KERNELS(bf16, bf16_t)
