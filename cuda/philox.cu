// Philox4x32-10 and Box-Muller normals. Every function mirrors the one of the
// same name in rust/core/src/philox.rs operation for operation, so with FMA
// contraction off (--fmad=false) CPU and GPU produce identical bits.

__device__ __forceinline__ void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
        u32 hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

// Block b of stream (seed, stream): counter (b, stream), key seed.
__device__ __forceinline__ void philox_block(u64 seed, u64 stream, u64 b, u32 r[4]) {
    r[0] = (u32)b;
    r[1] = (u32)(b >> 32);
    r[2] = (u32)stream;
    r[3] = (u32)(stream >> 32);
    philox4x32_10(r, (u32)seed, (u32)(seed >> 32));
}

// (k + 0.5) * 2^-23 for the top 23 bits k: exact, strictly inside (0, 1).
__device__ __forceinline__ float u32_to_uniform(u32 x) { return ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f); }

__device__ __forceinline__ float det_ln(float u) {
    u32 bits = __float_as_uint(u);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > __uint_as_float(0x3fb504f3u)) {  // sqrt(2) rounded to f32
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
    // ln 2 = LN2_HI + LN2_LO, e * LN2_HI exact.
    return ef * __uint_as_float(0x3f317200u) + (ln_m + ef * __uint_as_float(0x35bfbe8eu));
}

// philox.rs det_exp / det_pow: the same f32 operations in the same order.
__device__ __forceinline__ float det_exp(float x) {
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) return __uint_as_float(0x7f800000u);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = (x - n * __uint_as_float(0x3f317200u)) - n * __uint_as_float(0x35bfbe8eu);
    float p = 1.0f / 40320.0f;
    p = p * r + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int ni = (int)n;
    int n1 = ni / 2, n2 = ni - ni / 2;
    return p * __uint_as_float((u32)(n1 + 127) << 23) * __uint_as_float((u32)(n2 + 127) << 23);
}

__device__ __forceinline__ float det_pow(float q, float e) {
    if (q < 1.17549435e-38f) return 0.0f;
    return det_exp(e * det_ln(q));
}

__device__ __forceinline__ void det_sincos_2pi(float u, float* sin_out, float* cos_out) {
    float q = floorf(u * 4.0f + 0.5f);
    float r = u - q * 0.25f;
    float x = r * __uint_as_float(0x40c90fdbu);  // 2*pi rounded to f32
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

__device__ __forceinline__ void box_muller(u32 a, u32 b, float* n_cos, float* n_sin) {
    float r = sqrtf(-2.0f * det_ln(u32_to_uniform(a)));
    float s, c;
    det_sincos_2pi(u32_to_uniform(b), &s, &c);
    *n_cos = r * c;
    *n_sin = r * s;
}

// Output i holds element offset + i (mod 2^64). With phase = offset % 4,
// thread item j is the block starting at element offset - phase + 4j and
// writes its lanes l to i = 4j + l - phase when 0 <= i < n (the unsigned
// wrap of a negative i makes it fail the i < n test).
__device__ __forceinline__ void store_block(float* out, u64 j, u64 phase, u64 n, const float v[4]) {
    u64 i0 = 4u * j - phase;
    if (phase == 0u && i0 + 3u < n && aligned16(out)) {
        v4u w;
        w.x = __float_as_uint(v[0]);
        w.y = __float_as_uint(v[1]);
        w.z = __float_as_uint(v[2]);
        w.w = __float_as_uint(v[3]);
        reinterpret_cast<v4u*>(out)[j] = w;
        return;
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) {
        u64 i = i0 + (u64)l;
        if (i < n) out[i] = v[l];
    }
}

// One Philox block of 4 outputs per iteration; `offset` may start mid-block.
template <bool NORMAL>
__device__ __forceinline__ void philox_fill(float* out, u64 seed, u64 stream, u64 offset, u64 n) {
    u64 phase = offset & 3u;
    u64 base = offset - phase;
    u64 blocks = (n + phase + 3u) >> 2;
    for (u64 j = global_index(); j < blocks; j += global_stride()) {
        u32 r[4];
        philox_block(seed, stream, (base + 4u * j) >> 2, r);
        float v[4];
        if (NORMAL) {
            box_muller(r[0], r[1], &v[0], &v[1]);
            box_muller(r[2], r[3], &v[2], &v[3]);
        } else {
            for (int l = 0; l < 4; ++l) v[l] = u32_to_uniform(r[l]);
        }
        store_block(out, j, phase, n, v);
    }
}

extern "C" __global__ void philox_uniform(float* out, u64 seed, u64 stream, u64 offset, u64 n) {
    philox_fill<false>(out, seed, stream, offset, n);
}

extern "C" __global__ void philox_normal(float* out, u64 seed, u64 stream, u64 offset, u64 n) {
    philox_fill<true>(out, seed, stream, offset, n);
}
