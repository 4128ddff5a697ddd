// Fused elementwise ops; rust/core/src/ops.rs is the CPU twin and uses the
// same f32 expression (two products, one sum, one rounding to T).

template <typename T>
__device__ __forceinline__ T axpby1(float a, T x, float b, T y) {
    float ax = a * Elem<T>::load(x);
    float by = b * Elem<T>::load(y);
    return Elem<T>::store(ax + by);
}

// out = a*x + b*y over n elements. `out` may be `x` or `y` itself: every
// element is read before it is written, by the same thread, so no
// __restrict__ here. When all three pointers are 16-byte aligned the body
// moves 16 bytes per load/store; the tail (and any misaligned call) goes
// element by element. Both paths compute each element identically.
template <typename T>
__device__ __forceinline__ void axpby_body(T* out, float a, const T* x, float b, const T* y, u64 n) {
    constexpr int V = 16 / sizeof(T);
    union Pack {
        v4u v;
        T e[V];
    };
    u64 done = 0;
    if (aligned16(out) && aligned16(x) && aligned16(y)) {
        u64 nv = n / V;
        const v4u* xv = reinterpret_cast<const v4u*>(x);
        const v4u* yv = reinterpret_cast<const v4u*>(y);
        v4u* ov = reinterpret_cast<v4u*>(out);
        for (u64 k = global_index(); k < nv; k += global_stride()) {
            Pack px, py, po;
            px.v = xv[k];
            py.v = yv[k];
#pragma unroll
            for (int l = 0; l < V; ++l) po.e[l] = axpby1(a, px.e[l], b, py.e[l]);
            ov[k] = po.v;
        }
        done = nv * V;
    }
    for (u64 i = done + global_index(); i < n; i += global_stride()) out[i] = axpby1(a, x[i], b, y[i]);
}

extern "C" __global__ void axpby_f32(float* out, float a, const float* x, float b, const float* y, u64 n) {
    axpby_body(out, a, x, b, y, n);
}

extern "C" __global__ void axpby_f16(f16_t* out, float a, const f16_t* x, float b, const f16_t* y, u64 n) {
    axpby_body(out, a, x, b, y, n);
}

extern "C" __global__ void axpby_bf16(bf16_t* out, float a, const bf16_t* x, float b, const bf16_t* y, u64 n) {
    axpby_body(out, a, x, b, y, n);
}
