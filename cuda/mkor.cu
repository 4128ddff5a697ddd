// MKOR's fused inverse-factor update: for every factor of every layer, the
// stabiliser blend, the symmetric rank-1 Sherman-Morrison step, the max|W|
// check and the rounding to the storage type, in one grouped launch.
// The algebra and the float order are those of rust/core/src/optim/mkor.rs
// (the host simulation checks the two agree bit for bit):
//   W~ = flagged ? (1-zeta) W + zeta I : W;  M = a W~ + b I;  w = s v
//   u = M w (each u_i a sequential sum over j);  d = 1 + w.u (sequential)
//   W'_ij = M_ij - (u_i u_j) / d, or M_ij where d is not a positive number.
// A stored factor is exactly symmetric (every update keeps it so), so u_i is
// read down column i: at each j the threads of a block read one row, which
// coalesces, and the sum has the CPU's order.
//
// One block per factor (a grid-stride loop over factors). The factor table
// holds, per factor, three u64: the inverse's device pointer, n, and the
// offset of its vector in `vecs` (its u goes to the same offset of
// `scratch`). flags[f] in: 1 if the previous update flagged the factor; out:
// 1 if max|W'| > threshold. maxabs[f] out: max|W'|, or -1 when W' was not
// finite and the factor was reset to I.

#define MKOR_THREADS 256

__device__ __forceinline__ bool mkor_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ float mkor_abs(float x) { return __uint_as_float(__float_as_uint(x) & 0x7fffffffu); }

__device__ __forceinline__ float mkor_m(float w, bool diag, bool flagged, float a, float b, float omz, float zeta) {
    float wt = flagged ? (diag ? omz * w + zeta : omz * w) : w;
    return diag ? a * wt + b : a * wt;
}

template <typename T>
__device__ void mkor_rank1(const u64* table, u64 n_factors, const float* vecs, float* scratch, float* flags, float* maxabs,
                           float a, float b, float s, float zeta, float threshold) {
    __shared__ float red_max[MKOR_THREADS];
    __shared__ u32 red_bad[MKOR_THREADS];
    __shared__ float sh_d;
    __shared__ u32 sh_bad;
    const float omz = 1.0f - zeta;
    const unsigned t = threadIdx.x;
    for (u64 f = blockIdx.x; f < n_factors; f += gridDim.x) {
        T* inv = (T*)table[3 * f];
        const u64 n = table[3 * f + 1];
        const float* v = vecs + table[3 * f + 2];
        float* u = scratch + table[3 * f + 2];
        const bool flagged = flags[f] != 0.0f;
        for (u64 i = t; i < n; i += blockDim.x) {
            float acc = 0.0f;
            for (u64 j = 0; j < n; ++j) acc += mkor_m(Elem<T>::load(inv[j * n + i]), i == j, flagged, a, b, omz, zeta) * (s * v[j]);
            u[i] = acc;
        }
        __syncthreads();
        if (t == 0) {
            float acc = 0.0f;
            for (u64 i = 0; i < n; ++i) acc += (s * v[i]) * u[i];
            sh_d = 1.0f + acc;
        }
        __syncthreads();
        const float d = sh_d;
        const bool rank1 = mkor_finite(d) && d > 0.0f;
        float mx = 0.0f;
        u32 bad = 0u;
        for (u64 k = t; k < n * n; k += blockDim.x) {
            const u64 i = k / n, j = k % n;
            const float m = mkor_m(Elem<T>::load(inv[k]), i == j, flagged, a, b, omz, zeta);
            const float nw = rank1 ? m - (u[i] * u[j]) / d : m;
            const T stored = Elem<T>::store(nw);
            inv[k] = stored;
            const float kept = Elem<T>::load(stored);
            if (!mkor_finite(kept)) bad = 1u;
            const float ak = mkor_abs(kept);
            mx = ak > mx ? ak : mx;
        }
        red_max[t] = mx;
        red_bad[t] = bad;
        __syncthreads();
        if (t == 0) {
            float m = 0.0f;
            u32 any = 0u;
            for (unsigned k = 0; k < blockDim.x; ++k) {
                m = red_max[k] > m ? red_max[k] : m;
                any |= red_bad[k];
            }
            sh_bad = any;
            flags[f] = (!any && m > threshold) ? 1.0f : 0.0f;
            maxabs[f] = any ? -1.0f : m;
        }
        __syncthreads();
        if (sh_bad) {
            for (u64 k = t; k < n * n; k += blockDim.x) inv[k] = Elem<T>::store(k / n == k % n ? 1.0f : 0.0f);
        }
        // The shared slots are reused by the next factor.
        __syncthreads();
    }
}

#define MKOR_KERNEL(SUFFIX, T)                                                                                     \
    extern "C" __global__ void mkor_rank1_##SUFFIX(const u64* table, u64 n_factors, const float* vecs, float* scratch, \
                                                   float* flags, float* maxabs, float a, float b, float s, float zeta,  \
                                                   float threshold) {                                              \
        mkor_rank1<T>(table, n_factors, vecs, scratch, flags, maxabs, a, b, s, zeta, threshold);                    \
    }
MKOR_KERNEL(f32, float)
MKOR_KERNEL(f16, f16_t)
MKOR_KERNEL(bf16, bf16_t)
