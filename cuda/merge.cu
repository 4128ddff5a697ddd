// Merging one tensor on the GPU: the kernels behind ferrox_core::merge::cuda.
// Each is the twin of a CPU step in rust/core/src/merge (the same delta
// rounding, abs keys, tie rule, Philox draws and summation order), so the
// merged tensor is bitwise the CPU's. Compiled after philox.cu (philox_block,
// u32_to_uniform). Every kernel is a grid-stride loop whose threads never
// communicate except through atomics on counters.

#define MERGE_SEG 256ull    // elements walked in order by one thread (masks, tie counts)
#define MERGE_UNIT 65536ull // rescale sum unit (merge::UNIT)
#define MERGE_LANES 8ull    // partial sums per unit (block::l1_sums)
#define MERGE_MAX_MODELS 64u

// Abs keys of a value already rounded to T (Float::key_of_f32), and the key
// of infinity: a larger key is a NaN.
template <typename T>
struct Key;
template <>
struct Key<float> {
    static __device__ __forceinline__ u32 of(float d) { return __float_as_uint(d) & 0x7fffffffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7f800000u; }
};
template <>
struct Key<f16_t> {
    static __device__ __forceinline__ u32 of(float d) { return (u32)f32_to_f16(d) & 0x7fffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7c00u; }
};
template <>
struct Key<bf16_t> {
    static __device__ __forceinline__ u32 of(float d) { return (__float_as_uint(d) >> 16) & 0x7fffu; }
    static __device__ __forceinline__ u32 inf() { return 0x7f80u; }
};

// tau = x - base rounded to T (mergekit subtracts in the input dtype), in f32.
template <typename T>
__device__ __forceinline__ float rounded_delta(T x, T b) {
    return Elem<T>::load(Elem<T>::store(Elem<T>::load(x) - Elem<T>::load(b)));
}

__device__ __forceinline__ bool finite(float v) { return (__float_as_uint(v) & 0x7fffffffu) < 0x7f800000u; }

// first[0] = min(first[0], index of the first NaN/Inf in x).
template <typename T>
__device__ __forceinline__ void first_nonfinite_body(const T* x, u64 n, unsigned long long* first) {
    for (u64 i = global_index(); i < n; i += global_stride())
        if (!finite(Elem<T>::load(x[i]))) atomicMin(first, (unsigned long long)i);
}

// Radix histogram of the delta keys: with high == 0xffffffff, counts of
// (key >> shift) & 0x7fff; otherwise counts of key & 0xffff among keys whose
// high half is `high` (f32's second pass). A NaN delta records its index.
template <typename T>
__device__ __forceinline__ void hist_body(const T* base, const T* x, u64 n, u32 shift, u32 high,
                                          unsigned long long* hist, unsigned long long* first_nan) {
    for (u64 i = global_index(); i < n; i += global_stride()) {
        u32 k = Key<T>::of(rounded_delta(x[i], base[i]));
        if (k > Key<T>::inf()) {
            atomicMin(first_nan, (unsigned long long)i);
        } else if (high == 0xffffffffu) {
            atomicAdd(&hist[(k >> shift) & 0x7fffu], 1ull);
        } else if ((k >> 16) == high) {
            atomicAdd(&hist[k & 0xffffu], 1ull);
        }
    }
}

// counts[s] = how many delta keys of segment s equal `key`.
template <typename T>
__device__ __forceinline__ void seg_ties_body(const T* base, const T* x, u64 n, u32 key, u32* counts) {
    u64 segs = (n + MERGE_SEG - 1) / MERGE_SEG;
    for (u64 s = global_index(); s < segs; s += global_stride()) {
        u64 end = (s + 1) * MERGE_SEG < n ? (s + 1) * MERGE_SEG : n;
        u32 c = 0;
        for (u64 i = s * MERGE_SEG; i < end; ++i) c += Key<T>::of(rounded_delta(x[i], base[i])) == key;
        counts[s] = c;
    }
}

// One rank cut (select::RankCut): keys above `key` are in, and the first
// `ties` keys equal to it in index order. `seen` holds the tie ordinal at each
// segment start, or is null when ordinals cannot matter (no tie or all taken).
struct CutArgs {
    u32 key;
    u64 ties;
    const u64* seen;
};

__device__ __forceinline__ bool take(const CutArgs& c, u32 k, u64* seen) {
    bool tie = k == c.key;
    bool in = k > c.key || (tie && *seen < c.ties);
    *seen += tie;
    return in;
}

// keep[i] for one model: kind 1 = rank band (in the top-hi set and not in
// the top-lo set), kind 2 = DARE (uniform < threshold, Philox block i / 4).
template <typename T>
__device__ __forceinline__ void mask_body(const T* base, const T* x, u64 n, u32 kind, CutArgs hi, CutArgs lo,
                                          float threshold, u64 seed, u64 stream, unsigned char* keep) {
    u64 segs = (n + MERGE_SEG - 1) / MERGE_SEG;
    for (u64 s = global_index(); s < segs; s += global_stride()) {
        u64 start = s * MERGE_SEG, end = start + MERGE_SEG < n ? start + MERGE_SEG : n;
        if (kind == 1u) {
            u64 seen_hi = hi.seen ? hi.seen[s] : 0ull, seen_lo = lo.seen ? lo.seen[s] : 0ull;
            for (u64 i = start; i < end; ++i) {
                u32 k = Key<T>::of(rounded_delta(x[i], base[i]));
                bool in_hi = take(hi, k, &seen_hi);
                bool in_lo = take(lo, k, &seen_lo);
                keep[i] = (unsigned char)(in_hi && !in_lo);
            }
        } else {
            u32 r[4];
            u64 block = ~0ull;
            for (u64 i = start; i < end; ++i) {
                if (i / 4 != block) {
                    block = i / 4;
                    philox_block(seed, stream, block, r);
                }
                keep[i] = (unsigned char)(u32_to_uniform(r[i % 4]) < threshold);
            }
        }
    }
}

// Sums of |tau| and |kept tau| per (unit, lane): lane l of unit u adds the
// elements u*UNIT + l, + l + LANES, ... in order, in f64 (block::l1_sums).
// keep == null keeps everything.
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

// Per-row selection (granularity: row), one thread per row, walking it in
// index order like the CPU's row path (merge::row_mask).

// The r-th largest delta key of one row (r >= 1) and how many keys equal to it
// the top r takes (select::row_cut), by radix select over 8-bit digits: each
// pass counts the digits of the keys that share the prefix found so far.
template <typename T>
__device__ __forceinline__ void row_rank_cut(const T* base, const T* x, u64 len, int top_shift, u64 r, u64* cut) {
    if (r == 0) {  // select::RankCut::empty
        cut[0] = 0xffffffffull;
        cut[1] = 0;
        return;
    }
    u32 prefix = 0, known = 0;
    for (int shift = top_shift; shift >= 0; shift -= 8) {
        u32 hist[256];
        for (int d = 0; d < 256; ++d) hist[d] = 0;
        for (u64 i = 0; i < len; ++i) {
            u32 k = Key<T>::of(rounded_delta(x[i], base[i]));
            if ((k & known) == prefix) hist[(k >> shift) & 0xffu]++;
        }
        u32 d = 255;
        while (hist[d] < r) {  // the counts of matching keys add up to >= r
            r -= hist[d];
            --d;
        }
        prefix |= d << shift;
        known |= 0xffu << shift;
    }
    cut[0] = prefix;
    cut[1] = r;
}

// cuts[4r..4r+4] = (hi key, hi ties, lo key, lo ties) of row r for the rank
// band [lo, hi); a NaN delta records its flat index in first_nan instead.
template <typename T>
__device__ __forceinline__ void row_cuts_body(const T* base, const T* x, u64 rows, u64 len, int top_shift, u64 lo,
                                              u64 hi, u64* cuts, unsigned long long* first_nan) {
    for (u64 r = global_index(); r < rows; r += global_stride()) {
        const T* b = base + r * len;
        const T* xr = x + r * len;
        bool nan = false;
        for (u64 i = 0; i < len && !nan; ++i) {
            if (Key<T>::of(rounded_delta(xr[i], b[i])) > Key<T>::inf()) {
                atomicMin(first_nan, (unsigned long long)(r * len + i));
                nan = true;
            }
        }
        if (nan) continue;
        row_rank_cut(b, xr, len, top_shift, hi, cuts + 4 * r);
        row_rank_cut(b, xr, len, top_shift, lo, cuts + 4 * r + 2);
    }
}

// keep[i] for one model and rank band per row: in row r's top-hi set and not
// in its top-lo set, ties taken in index order from the row start.
template <typename T>
__device__ __forceinline__ void row_mask_body(const T* base, const T* x, u64 rows, u64 len, const u64* cuts,
                                              unsigned char* keep) {
    for (u64 r = global_index(); r < rows; r += global_stride()) {
        const u64* c = cuts + 4 * r;
        CutArgs hi = {(u32)c[0], c[1], 0}, lo = {(u32)c[2], c[3], 0};
        u64 seen_hi = 0, seen_lo = 0;
        for (u64 i = r * len; i < (r + 1) * len; ++i) {
            u32 k = Key<T>::of(rounded_delta(x[i], base[i]));
            bool in_hi = take(hi, k, &seen_hi);
            bool in_lo = take(lo, k, &seen_lo);
            keep[i] = (unsigned char)(in_hi && !in_lo);
        }
    }
}

// Sums of |tau| and |kept tau| per row: lane l adds the row's elements l,
// l + LANES, ... in f64, then the lanes are added in order (block::l1_sums
// over one row). keep == null keeps everything.
template <typename T>
__device__ __forceinline__ void row_l1_body(const T* base, const T* x, u64 rows, u64 len, const unsigned char* keep,
                                            double* sums) {
    for (u64 r = global_index(); r < rows; r += global_stride()) {
        double all[MERGE_LANES], kept[MERGE_LANES];
        for (u64 l = 0; l < MERGE_LANES; ++l) all[l] = kept[l] = 0.0;
        for (u64 j = 0; j < len; ++j) {
            u64 i = r * len + j;
            double a = (double)__uint_as_float(__float_as_uint(rounded_delta(x[i], base[i])) & 0x7fffffffu);
            all[j % MERGE_LANES] += a;
            kept[j % MERGE_LANES] += (keep == 0 || keep[i]) ? a : 0.0;
        }
        double a = 0.0, k = 0.0;
        for (u64 l = 0; l < MERGE_LANES; ++l) {
            a += all[l];
            k += kept[l];
        }
        sums[2 * r] = a;
        sums[2 * r + 1] = k;
    }
}

// The fused write (block::write_span): weighted masked deltas, optional TIES
// sign election, normalisation, lambda, one rounding. `models` and `keeps`
// hold device addresses (a null keep keeps everything). Model m's scale for
// element i is scales[m * (n / scale_span) + i / scale_span]: one per tensor
// (scale_span = n) or one per row. changed[0] counts outputs that differ from
// `reference`.
template <typename T>
__device__ __forceinline__ void write_body(T* out, const T* base, const T* reference, const u64* models,
                                           const u64* keeps, const float* scales, u64 scale_span,
                                           const float* weights, u32 nm, u64 n, u32 consensus, u32 normalize,
                                           float lambda, float plain_divisor, unsigned long long* changed) {
    unsigned long long differ = 0;
    u64 spans = n / scale_span;
    for (u64 i = global_index(); i < n; i += global_stride()) {
        const float* scale = scales + i / scale_span;
        T bt = base[i];
        float b = Elem<T>::load(bt);
        float v[MERGE_MAX_MODELS];
        float total = 0.0f;
        for (u32 m = 0; m < nm; ++m) {
            const T* x = (const T*)models[m];
            const unsigned char* keep = (const unsigned char*)keeps[m];
            float d = rounded_delta(x[i], bt);
            v[m] = (keep == 0 || keep[i]) ? scale[m * spans] * d : 0.0f;
            total += v[m];
        }
        float mixed = total, divisor = plain_divisor;
        if (consensus) {
            bool positive = total >= 0.0f;
            mixed = 0.0f;
            divisor = 0.0f;
            for (u32 m = 0; m < nm; ++m) {
                bool agree = positive ? v[m] > 0.0f : v[m] < 0.0f;
                mixed += agree ? v[m] : 0.0f;
                divisor += agree ? weights[m] : 0.0f;
            }
            if (divisor == 0.0f) divisor = 1.0f;
        }
        if (normalize) mixed /= divisor;
        T o = Elem<T>::store(b + mixed * lambda);
        out[i] = o;
        differ += Elem<T>::load(o) != Elem<T>::load(reference[i]);
    }
    if (differ) atomicAdd(changed, differ);
}

#define MERGE_KERNELS(SUFFIX, T)                                                                                     \
    extern "C" __global__ void merge_first_nonfinite_##SUFFIX(const T* x, u64 n, unsigned long long* first) {      \
        first_nonfinite_body(x, n, first);                                                                           \
    }                                                                                                                \
    extern "C" __global__ void merge_hist_##SUFFIX(const T* base, const T* x, u64 n, u32 shift, u32 high,          \
                                                   unsigned long long* hist, unsigned long long* first_nan) {      \
        hist_body(base, x, n, shift, high, hist, first_nan);                                                         \
    }                                                                                                                \
    extern "C" __global__ void merge_seg_ties_##SUFFIX(const T* base, const T* x, u64 n, u32 key, u32* counts) {   \
        seg_ties_body(base, x, n, key, counts);                                                                      \
    }                                                                                                                \
    extern "C" __global__ void merge_mask_##SUFFIX(const T* base, const T* x, u64 n, u32 kind, u32 hi_key,         \
                                                   u64 hi_ties, const u64* hi_seen, u32 lo_key, u64 lo_ties,       \
                                                   const u64* lo_seen, float threshold, u64 seed, u64 stream,      \
                                                   unsigned char* keep) {                                          \
        CutArgs hi = {hi_key, hi_ties, hi_seen}, lo = {lo_key, lo_ties, lo_seen};                                    \
        mask_body(base, x, n, kind, hi, lo, threshold, seed, stream, keep);                                          \
    }                                                                                                                \
    extern "C" __global__ void merge_l1_##SUFFIX(const T* base, const T* x, u64 n, const unsigned char* keep,      \
                                                 double* sums) {                                                   \
        l1_body(base, x, n, keep, sums);                                                                             \
    }                                                                                                                \
    extern "C" __global__ void merge_row_cuts_##SUFFIX(const T* base, const T* x, u64 rows, u64 len, int top_shift, \
                                                       u64 lo, u64 hi, u64* cuts, unsigned long long* first_nan) { \
        row_cuts_body(base, x, rows, len, top_shift, lo, hi, cuts, first_nan);                                       \
    }                                                                                                                \
    extern "C" __global__ void merge_row_mask_##SUFFIX(const T* base, const T* x, u64 rows, u64 len,               \
                                                       const u64* cuts, unsigned char* keep) {                     \
        row_mask_body(base, x, rows, len, cuts, keep);                                                               \
    }                                                                                                                \
    extern "C" __global__ void merge_row_l1_##SUFFIX(const T* base, const T* x, u64 rows, u64 len,                 \
                                                     const unsigned char* keep, double* sums) {                    \
        row_l1_body(base, x, rows, len, keep, sums);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void merge_write_##SUFFIX(T* out, const T* base, const T* reference, const u64* models,  \
                                                    const u64* keeps, const float* scales, u64 scale_span,         \
                                                    const float* weights, u32 nm, u64 n, u32 consensus,            \
                                                    u32 normalize, float lambda, float plain_divisor,              \
                                                    unsigned long long* changed) {                                 \
        write_body(out, base, reference, models, keeps, scales, scale_span, weights, nm, n, consensus, normalize,    \
                   lambda, plain_divisor, changed);                                                                  \
    }

MERGE_KERNELS(f32, float)
MERGE_KERNELS(f16, f16_t)
MERGE_KERNELS(bf16, bf16_t)
