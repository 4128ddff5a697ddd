// Fused state updates of SophiaG/H and AdaHessian, one launch per tensor of
// a parameter group. rust/core/src/optim/hessian.rs (sophia1, adahessian1)
// is the CPU twin: the same f32 operations in the same order, so the bits
// agree (compiled with --fmad=false and IEEE division and square root).
// Counts (clipped ratios, positive Hessian entries) are integers added into
// counts[0..2] with atomics, so their totals do not depend on the schedule.

template <typename T>
__device__ __forceinline__ void sophia_body(T* p, const T* g, float* m, float* h, const T* x, const T* y, int refresh,
                                            float lr, float beta1, float omb1, float rho, float eps, float decay,
                                            float beta2, float omb2, float scale, u64 n, u64* counts) {
    u64 clipped = 0, positive = 0;
    for (u64 i = global_index(); i < n; i += global_stride()) {
        float hh = h[i];
        if (refresh) {
            float est = scale * Elem<T>::load(x[i]) * Elem<T>::load(y[i]);
            hh = beta2 * hh + omb2 * est;
            positive += hh > 0.0f ? 1u : 0u;
            h[i] = hh;
        }
        float pp = Elem<T>::load(p[i]) * decay;
        float mm = beta1 * m[i] + omb1 * Elem<T>::load(g[i]);
        float scaled = rho * hh;
        float den = scaled > eps ? scaled : eps;
        float r = mm / den;
        if (r >= 1.0f) {
            r = 1.0f;
            clipped += 1u;
        } else if (r <= -1.0f) {
            r = -1.0f;
            clipped += 1u;
        }
        m[i] = mm;
        p[i] = Elem<T>::store(pp - lr * r);
    }
    if (clipped) atomicAdd(&counts[0], clipped);
    if (positive) atomicAdd(&counts[1], positive);
}

template <typename T>
__device__ __forceinline__ void adahessian_body(T* p, const T* g, float* m, float* v, const T* d, const T* z, int refresh,
                                                float step_size, float beta1, float beta2, float omb1, float omb2,
                                                float bias_correction2, float eps, float power, float decay, u64 n, u64* counts) {
    u64 positive = 0;
    for (u64 i = global_index(); i < n; i += global_stride()) {
        float mm = beta1 * m[i] + omb1 * Elem<T>::load(g[i]);
        float vv = v[i];
        if (refresh) {
            float dd = Elem<T>::load(d[i]);
            if (z) dd = dd * Elem<T>::load(z[i]);  // D = Hz ⊙ z fused (exact for z = ±1)
            vv = beta2 * vv + omb2 * (dd * dd);
            positive += dd > 0.0f ? 1u : 0u;
            v[i] = vv;
        }
        float q = vv / bias_correction2;
        // det_pow (philox.cu): libdevice's powf is not reproducible on the CPU.
        float den = (power == 1.0f ? sqrtf(q) : det_pow(q, 0.5f * power)) + eps;
        float pp = Elem<T>::load(p[i]) * decay;
        m[i] = mm;
        p[i] = Elem<T>::store(pp - step_size * (mm / den));
    }
    if (positive) atomicAdd(&counts[1], positive);
}

#define OPTIM_HESSIAN_KERNELS(SUFFIX, T)                                                                              \
    extern "C" __global__ void sophia_update_##SUFFIX(T* p, const T* g, float* m, float* h, const T* x, const T* y,   \
                                                      int refresh, float lr, float beta1, float omb1, float rho,      \
                                                      float eps, float decay, float beta2, float omb2, float scale,   \
                                                      u64 n, u64* counts) {                                           \
        sophia_body(p, g, m, h, x, y, refresh, lr, beta1, omb1, rho, eps, decay, beta2, omb2, scale, n, counts);     \
    }                                                                                                                 \
    extern "C" __global__ void adahessian_update_##SUFFIX(T* p, const T* g, float* m, float* v, const T* d,           \
                                                          const T* z, int refresh, float step_size, float beta1, float beta2,     \
                                                          float omb1, float omb2, float bias_correction2, float eps,   \
                                                          float power, float decay, u64 n, u64* counts) {             \
        adahessian_body(p, g, m, v, d, z, refresh, step_size, beta1, beta2, omb1, omb2, bias_correction2, eps, power,    \
                        decay, n, counts);                                                                            \
    }

OPTIM_HESSIAN_KERNELS(f32, float)
OPTIM_HESSIAN_KERNELS(f16, f16_t)
OPTIM_HESSIAN_KERNELS(bf16, bf16_t)
