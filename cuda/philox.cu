// Philox4x32-10 and Box-Muller normals: the same expression sequence as
// rust/core/src/philox.rs, so CPU and GPU produce identical bits.

__device__ __forceinline__ void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

__device__ __forceinline__ void philox_block(u64 seed, u64 stream, u64 b, u32 out[4]) {
    out[0] = (u32)b; out[1] = (u32)(b >> 32); out[2] = (u32)stream; out[3] = (u32)(stream >> 32);
    philox4x32_10(out, (u32)seed, (u32)(seed >> 32));
}

__device__ __forceinline__ float u32_to_uniform(u32 x) { return ((float)(x >> 8) + 0.5f) * (1.0f / 16777216.0f); }

__device__ __forceinline__ float det_ln(float u) {
    u32 bits = __float_as_uint(u);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > 1.41421356237309504880f) {
        m *= 0.5f;
        e += 1;
    }
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    float ln_m = 2.0f * s * p;
    float ef = (float)e;
    return ef * 0.693145751953125f + (ln_m + ef * 1.428606765330187e-6f);
}

__device__ __forceinline__ void det_sincos_2pi(float u, float* sin_out, float* cos_out) {
    float q = floorf(u * 4.0f + 0.5f);
    float r = u - q * 0.25f;
    float x = r * 6.2831855f;
    float x2 = x * x;
    float s = 1.0f / 362880.0f;
    s = s * x2 - 1.0f / 5040.0f;
    s = s * x2 + 1.0f / 120.0f;
    s = s * x2 - 1.0f / 6.0f;
    s = s * x2 + 1.0f;
    s = s * x;
    float c = -1.0f / 3628800.0f;
    c = c * x2 + 1.0f / 40320.0f;
    c = c * x2 - 1.0f / 720.0f;
    c = c * x2 + 1.0f / 24.0f;
    c = c * x2 - 0.5f;
    c = c * x2 + 1.0f;
    switch (((int)q) & 3) {
        case 0: *sin_out = s; *cos_out = c; break;
        case 1: *sin_out = c; *cos_out = -s; break;
        case 2: *sin_out = -s; *cos_out = -c; break;
        default: *sin_out = -c; *cos_out = s; break;
    }
}

extern "C" __global__ void philox_uniform(float* out, u64 seed, u64 stream, u64 offset, u64 n) {
    for (u64 i = global_index(); i < n; i += global_stride()) {
        u64 e = offset + i;
        u32 r[4];
        philox_block(seed, stream, e / 4, r);
        out[i] = u32_to_uniform(r[e % 4]);
    }
}

extern "C" __global__ void philox_normal(float* out, u64 seed, u64 stream, u64 offset, u64 n) {
    for (u64 i = global_index(); i < n; i += global_stride()) {
        u64 e = offset + i;
        u32 r[4];
        philox_block(seed, stream, e / 4, r);
        u32 lane = (u32)(e % 4);
        u32 pair = lane & ~1u;
        float radius = sqrtf(-2.0f * det_ln(u32_to_uniform(r[pair])));
        float s, c;
        det_sincos_2pi(u32_to_uniform(r[pair + 1]), &s, &c);
        out[i] = (lane & 1u) ? radius * s : radius * c;
    }
}
