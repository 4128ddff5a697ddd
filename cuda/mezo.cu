// MeZO's fused in-place pass (rust/core/src/optim/mezo.rs is the CPU twin):
// for element k of an f32 parameter tensor, with z = lane k % 4 of the
// Box-Muller normals of philox_block(seed, stream, k / 4) (philox.cu),
//   if restore != 0: t = t + restore * z
//   if decay   != 1: t = t * decay
//   if coef    != 0: t = t + coef * z
// in this order, each operation correctly rounded (--fmad=false), so the
// bits are the CPU's. z is regenerated, never stored. One thread per Philox
// block of 4 elements, grid-stride.

extern "C" __global__ void mezo_pass_f32(float* p, u64 n, u64 seed, u64 stream, float restore, float decay, float coef) {
    const u64 blocks = (n + 3) / 4;
    for (u64 b = global_index(); b < blocks; b += global_stride()) {
        u32 r[4];
        philox_block(seed, stream, b, r);
        float z[4];
        box_muller(r[0], r[1], &z[0], &z[1]);
        box_muller(r[2], r[3], &z[2], &z[3]);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const u64 k = 4 * b + (u64)l;
            if (k >= n) break;
            float t = p[k];
            if (restore != 0.0f) t = t + restore * z[l];
            if (decay != 1.0f) t = t * decay;
            if (coef != 0.0f) t = t + coef * z[l];
            p[k] = t;
        }
    }
}
