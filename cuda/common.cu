// Shared by every ferrox kernel source; the Rust runtime prepends it.
//
// NVRTC compiles with no include path, so nothing here comes from a CUDA
// header: the types and the half-precision conversions are spelled out with
// integer operations. The conversions reproduce the Rust `half` crate bit for
// bit (including NaN payloads), so a kernel and its CPU twin agree exactly.
// The runtime compiles with --fmad=false --ftz=false --prec-div=true
// --prec-sqrt=true: every float operation is the correctly rounded IEEE one.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// 16-byte unit for vector loads and stores.
struct alignas(16) v4u {
    u32 x, y, z, w;
};

// Distinct element types for the two 16-bit formats.
struct f16_t {
    u16 bits;
};
struct bf16_t {
    u16 bits;
};

// bfloat16 -> f32: the top half of an f32; a NaN is made quiet (half::bf16).
__device__ __forceinline__ float bf16_to_f32(u16 h) {
    u32 x = (u32)h;
    if ((x & 0x7fffu) > 0x7f80u) x |= 0x0040u;
    return __uint_as_float(x << 16);
}

// f32 -> bfloat16, round to nearest even; a NaN stays a NaN with the top of
// its payload and the quiet bit set (half::bf16::from_f32).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x0040u);
    // Adding 0x7fff plus the kept lsb rounds ties to even; a carry out of the
    // mantissa bumps the exponent, which is exactly right (up to infinity).
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// float16 -> f32, exact; a NaN is made quiet (half::f16).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x03ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man != 0u ? 0x00400000u | (man << 13) : 0u));
    if (exp == 0u) {
        // Zero or subnormal: man * 2^-24 is exact in f32 (and a normal number).
        return __uint_as_float(sign | __float_as_uint((float)man * 5.9604644775390625e-8f));
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// f32 -> float16, round to nearest even, with subnormals, overflow to
// infinity, and NaN kept a quiet NaN with the top of its payload (half::f16).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        u32 nan = ax > 0x7f800000u ? 0x0200u | ((ax >> 13) & 0x03ffu) : 0u;
        return (u16)(sign | 0x7c00u | nan);
    }
    if (ax >= 0x47800000u) return (u16)(sign | 0x7c00u);  // |f| >= 2^16
    if (ax < 0x38800000u) {                                // |f| < 2^-14: subnormal result
        if (ax < 0x33000000u) return (u16)sign;            // |f| <= 2^-25 rounds to zero
        u32 man = (ax & 0x007fffffu) | 0x00800000u;
        u32 shift = 126u - (ax >> 23);  // 14..24
        u32 h = man >> shift;
        u32 rest = man & ((1u << shift) - 1u);
        u32 half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (h & 1u))) h += 1u;
        return (u16)(sign | h);
    }
    // Normal result: rebias the exponent (127 -> 15) and round the 13 dropped
    // bits; a carry may reach the exponent and, from 65520 up, infinity.
    u32 h = (ax >> 13) - (112u << 10);
    u32 rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;
    return (u16)(sign | h);
}

// Element access in f32 for each storage type.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Elem<f16_t> {
    static __device__ __forceinline__ float load(f16_t v) { return f16_to_f32(v.bits); }
    static __device__ __forceinline__ f16_t store(float v) { return f16_t{f32_to_f16(v)}; }
};
template <>
struct Elem<bf16_t> {
    static __device__ __forceinline__ float load(bf16_t v) { return bf16_to_f32(v.bits); }
    static __device__ __forceinline__ bf16_t store(float v) { return bf16_t{f32_to_bf16(v)}; }
};

// Grid-stride loops: 64-bit indices, so any tensor size works with any grid.
__device__ __forceinline__ u64 global_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 global_stride() { return (u64)gridDim.x * blockDim.x; }

__device__ __forceinline__ bool aligned16(const void* p) { return ((u64)p & 15u) == 0u; }
