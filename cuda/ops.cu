// Fused elementwise ops (see rust/core/src/ops.rs for the CPU twin).

#define FERROX_AXPBY(NAME, T, LOAD, STORE)                                                   \
    extern "C" __global__ void NAME(T* out, float a, const T* x, float b, const T* y, u64 n) { \
        for (u64 i = global_index(); i < n; i += global_stride()) {                           \
            float ax = a * LOAD(x[i]);                                                         \
            float by = b * LOAD(y[i]);                                                         \
            out[i] = STORE(ax + by);                                                           \
        }                                                                                      \
    }

#define FERROX_ID(v) (v)
FERROX_AXPBY(axpby_f32, float, FERROX_ID, FERROX_ID)
FERROX_AXPBY(axpby_f16, u16, f16_to_f32, f32_to_f16)
FERROX_AXPBY(axpby_bf16, u16, bf16_to_f32, f32_to_bf16)
