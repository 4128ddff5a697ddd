// Shared by every ferrox kernel source (prepended by the Rust runtime).
// No CUDA headers: NVRTC compiles this with no include path, so the types
// and conversions are spelled out here. Compiled with --fmad=false so the
// f32 expression order matches the Rust CPU code bit for bit.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even; NaN stays NaN (quiet bit set), as half::bf16::from_f32.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x0040u);
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// IEEE conversions in hardware (exact widening; round-to-nearest-even narrowing).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u64 global_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 global_stride() { return (u64)gridDim.x * blockDim.x; }
