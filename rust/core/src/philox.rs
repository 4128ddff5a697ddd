//! Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
//!
//! Element e of stream (seed, stream) is lane e % 4 of the block
//! `philox4x32_10([b_lo, b_hi, stream_lo, stream_hi], [seed_lo, seed_hi])`,
//! b = e / 4. Outputs depend only on (seed, stream, e): never on threads,
//! chunking or device, which is what makes DARE masks reproducible.
//!
//! Normals use Box–Muller with `det_ln` / `det_sincos_2pi`, written with only
//! +, -, *, /, sqrt and bit operations in a fixed order; `cuda/philox.cu`
//! evaluates the same sequence with FMA contraction off, so CPU and GPU give
//! identical bits (IEEE requires these operations to be correctly rounded).

use rayon::prelude::*;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 block with 10 rounds.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

#[inline(always)]
fn block(seed: u64, stream: u64, b: u64) -> [u32; 4] {
    philox4x32_10(
        [b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// Top 24 bits to the midpoint of their interval: exact in f32, in (0, 1).
#[inline(always)]
pub fn u32_to_uniform(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// ln(u) for positive normal u, reproducible bit for bit on the GPU.
#[inline]
pub fn det_ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > std::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172: five odd terms
    // leave a truncation error below 1e-9.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0f32 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    let ln_m = 2.0 * s * p;
    // ln 2 split so that e * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_145_751_953_125;
    const LN2_LO: f32 = 1.428_606_765_330_187e-6;
    let ef = e as f32;
    ef * LN2_HI + (ln_m + ef * LN2_LO)
}

/// (sin 2πu, cos 2πu) for u in [0, 1], reproducible bit for bit on the GPU.
#[inline]
pub fn det_sincos_2pi(u: f32) -> (f32, f32) {
    // Quarter turns are exact in u, so reduce there: r in [-1/8, 1/8].
    let q = (u * 4.0 + 0.5).floor();
    let r = u - q * 0.25;
    let x = r * 6.283_185_5;
    let x2 = x * x;
    let mut s = 1.0f32 / 362_880.0;
    s = s * x2 - 1.0 / 5040.0;
    s = s * x2 + 1.0 / 120.0;
    s = s * x2 - 1.0 / 6.0;
    s = s * x2 + 1.0;
    let s = s * x;
    let mut c = -1.0f32 / 3_628_800.0;
    c = c * x2 + 1.0 / 40_320.0;
    c = c * x2 - 1.0 / 720.0;
    c = c * x2 + 1.0 / 24.0;
    c = c * x2 - 0.5;
    c = c * x2 + 1.0;
    match (q as i32) & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// The four normals of one block (Box–Muller on lanes (0,1) and (2,3)).
#[inline]
pub fn normals_of(bits: [u32; 4]) -> [f32; 4] {
    let pair = |a: u32, b: u32| {
        let r = (-2.0 * det_ln(u32_to_uniform(a))).sqrt();
        let (s, c) = det_sincos_2pi(u32_to_uniform(b));
        (r * c, r * s)
    };
    let (n0, n1) = pair(bits[0], bits[1]);
    let (n2, n3) = pair(bits[2], bits[3]);
    [n0, n1, n2, n3]
}

/// Elements per parallel piece: a multiple of 4 so pieces start on blocks.
const CHUNK: usize = 1 << 16;

fn fill<V: Copy + Send>(seed: u64, stream: u64, offset: u64, out: &mut [V], lanes: impl Fn([u32; 4]) -> [V; 4] + Sync) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, piece)| {
        let mut e = offset + (c * CHUNK) as u64;
        let mut cached = (u64::MAX, lanes([0; 4]));
        for v in piece.iter_mut() {
            let b = e / 4;
            if b != cached.0 {
                cached = (b, lanes(block(seed, stream, b)));
            }
            *v = cached.1[(e % 4) as usize];
            e += 1;
        }
    });
}

pub fn fill_u32(seed: u64, stream: u64, offset: u64, out: &mut [u32]) {
    fill(seed, stream, offset, out, |b| b);
}

pub fn fill_uniform(seed: u64, stream: u64, offset: u64, out: &mut [f32]) {
    fill(seed, stream, offset, out, |b| b.map(u32_to_uniform));
}

pub fn fill_normal(seed: u64, stream: u64, offset: u64, out: &mut [f32]) {
    fill(seed, stream, offset, out, normals_of);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn independent_of_chunking() {
        let mut whole = vec![0f32; 3 * CHUNK + 5];
        fill_normal(7, 9, 3, &mut whole);
        let mut parts = vec![0f32; whole.len()];
        let (a, b) = parts.split_at_mut(CHUNK + 1);
        fill_normal(7, 9, 3, a);
        fill_normal(7, 9, 3 + (CHUNK + 1) as u64, b);
        assert_eq!(whole, parts);
    }

    #[test]
    fn det_ln_accuracy() {
        let mut worst = 0f64;
        for i in 1..200_000u32 {
            let u = u32_to_uniform(i.wrapping_mul(2654435761));
            let got = det_ln(u) as f64;
            let want = (u as f64).ln();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn det_sincos_accuracy() {
        let mut worst = 0f64;
        for i in 0..=100_000u32 {
            let u = i as f32 / 100_000.0;
            let (s, c) = det_sincos_2pi(u);
            let t = 2.0 * std::f64::consts::PI * u as f64;
            worst = worst.max((s as f64 - t.sin()).abs()).max((c as f64 - t.cos()).abs());
        }
        assert!(worst < 1e-6, "worst absolute error {worst}");
    }

    #[test]
    fn moments() {
        let mut u = vec![0f32; 1 << 20];
        fill_uniform(1, 0, 0, &mut u);
        let n = u.len() as f64;
        let mean = u.iter().map(|&v| v as f64).sum::<f64>() / n;
        assert!((mean - 0.5).abs() < 5.0 * (1.0 / 12.0 / n).sqrt());
        let mut z = vec![0f32; 1 << 20];
        fill_normal(1, 0, 0, &mut z);
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 5.0 / n.sqrt() && (var - 1.0).abs() < 5.0 * (2.0 / n).sqrt());
    }
}
