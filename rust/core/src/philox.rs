//! Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11).
//!
//! Addressing: element `e` of stream (`seed`, `stream`) is lane `e % 4` of
//! block `b = e / 4`, where a block is
//! `philox4x32_10([b_lo, b_hi, stream_lo, stream_hi], [seed_lo, seed_hi])`.
//! The fill functions write elements `offset, offset + 1, ...` (indices taken
//! modulo 2^64), so a value depends only on (seed, stream, element index):
//! never on threads, chunking or device. That is what makes DARE masks
//! reproducible and lets a tensor be filled in pieces.
//!
//! Uniforms: the top 24 bits of a lane, at the midpoint of their interval.
//! Normals: Box–Muller on the lane pairs (0, 1) and (2, 3) of a block, using
//! `det_ln` / `det_sincos_2pi`, which use only +, -, *, /, sqrt, floor and
//! bit operations in a fixed order. IEEE 754 rounds each of those exactly,
//! and `cuda/philox.cu` evaluates the same sequence with FMA contraction off,
//! so CPU and GPU give identical bits.

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

/// One Philox4x32 block with 10 rounds (Random123's `philox4x32_R(10, ...)`).
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            // The key schedule bumps the key before every round but the first.
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c0);
        let (hi1, lo1) = mulhilo(M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// Blocks `first .. first + L` of stream (`seed`, `stream`), computed side
/// by side (structure of arrays) so the rounds vectorise; `out[4l + j]` is
/// word j of block `first + l`, the same bits as `philox_block`.
#[inline(always)]
pub fn philox_blocks<const L: usize>(seed: u64, stream: u64, first: u64, out: &mut [u32]) {
    let mut c = [[0u32; L], [0u32; L], [stream as u32; L], [(stream >> 32) as u32; L]];
    for l in 0..L {
        let b = first.wrapping_add(l as u64);
        (c[0][l], c[1][l]) = (b as u32, (b >> 32) as u32);
    }
    philox_rounds(seed, &mut c);
    for (l, o) in out.chunks_exact_mut(4).take(L).enumerate() {
        o.copy_from_slice(&[c[0][l], c[1][l], c[2][l], c[3][l]]);
    }
}

/// The 10 rounds of Philox4x32 on L counters side by side (structure of
/// arrays, so the rounds vectorise): `c[k][l]` is word k of lane l, in and
/// out. Every lane uses the key `seed`; callers lay out the counters.
#[inline(always)]
pub(crate) fn philox_rounds<const L: usize>(seed: u64, c: &mut [[u32; L]; 4]) {
    let (mut k0, mut k1) = (seed as u32, (seed >> 32) as u32);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for l in 0..L {
            let p0 = M0 as u64 * c[0][l] as u64;
            let p1 = M1 as u64 * c[2][l] as u64;
            let (n0, n2) = ((p1 >> 32) as u32 ^ c[1][l] ^ k0, (p0 >> 32) as u32 ^ c[3][l] ^ k1);
            (c[0][l], c[1][l], c[2][l], c[3][l]) = (n0, p1 as u32, n2, p0 as u32);
        }
    }
}

/// Block `b` of stream (`seed`, `stream`): elements 4b .. 4b+3.
#[inline(always)]
pub fn philox_block(seed: u64, stream: u64, b: u64) -> [u32; 4] {
    philox4x32_10(
        [b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// (k + 0.5) * 2^-23 with k the top 23 bits of `x`: strictly inside (0, 1)
/// and exact (k + 0.5 needs 24 bits, all an f32 has; with 24-bit k the sum
/// would round and the top value would be 1.0).
#[inline(always)]
pub fn u32_to_uniform(x: u32) -> f32 {
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// ln 2 split so that `e * LN2_HI` is exact for |e| < 2^9 (LN2_HI has 15
/// significant bits), and LN2_LO carries the rest.
/// (Bit patterns, as in `cuda/philox.cu`, so both sides use the same values.)
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0.693145751953125
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 1.4286068e-6
const SQRT_2: f32 = f32::from_bits(0x3fb5_04f3);
const TWO_PI: f32 = f32::from_bits(0x40c9_0fdb);

/// ln(u) for positive, normal, finite `u`, reproducible bit for bit on the GPU.
/// Relative error below 2.1e-7 (about 3 ulp) on (0, 1).
#[inline]
pub fn det_ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    // Centre m on 1 (m in [sqrt(1/2), sqrt(2)]) so |s| below stays small.
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716; m - 1 is exact
    // (Sterbenz), so ln m keeps full relative accuracy near m = 1. The series
    // is cut after s^9: the first omitted term is below 3e-10 relative.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0f32 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    let ln_m = 2.0 * s * p;
    let ef = e as f32;
    ef * LN2_HI + (ln_m + ef * LN2_LO)
}

/// e^x in plain f32 adds and multiplies (no FMA, no libm), reproducible bit
/// for bit on the GPU (cuda/philox.cu). Relative error below 1e-6 for
/// x in [-87, 88]; 0 below, +inf above.
#[inline]
pub fn det_exp(x: f32) -> f32 {
    if x < -87.0 {
        return 0.0;
    }
    if x > 88.0 {
        return f32::INFINITY;
    }
    // x = n ln 2 + r, |r| <= ln2/2 (+ rounding); n * LN2_HI is exact for |n| < 2^8.
    let n = (x * core::f32::consts::LOG2_E + 0.5).floor();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor to r^8: the first omitted term is below 3e-10 relative.
    let mut p = 1.0f32 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n in two exact steps so subnormal results (n < -126) scale correctly.
    let n = n as i32;
    let (n1, n2) = (n / 2, n - n / 2);
    p * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23)
}

/// q^e for q >= 0 as det_exp(e · det_ln(q)), bit for bit the GPU's; q below
/// the smallest normal f32 counts as 0 (result 0 for e > 0).
#[inline]
pub fn det_pow(q: f32, e: f32) -> f32 {
    if q < f32::MIN_POSITIVE {
        return 0.0;
    }
    det_exp(e * det_ln(q))
}

/// (sin 2πu, cos 2πu) for `u` in [0, 1], reproducible bit for bit on the GPU.
/// Absolute error below 2e-7.
#[inline]
pub fn det_sincos_2pi(u: f32) -> (f32, f32) {
    // Reduce in turns, where it is exact: u = q/4 + r with r in [-1/8, 1/8]
    // (u - q/4 is exact: both are multiples of u's ulp and |r| < 1/4), so only
    // the final scaling by 2π rounds and |x| <= π/4 for the polynomials.
    let q = (u * 4.0 + 0.5).floor();
    let r = u - q * 0.25;
    let x = r * TWO_PI;
    let x2 = x * x;
    // Taylor polynomials to x^9 and x^10: truncation below 2e-9 on |x| <= π/4.
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
    // Rotate by q quarter turns.
    match (q as i32) & 3 {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// Box–Muller on one lane pair: (r cos θ, r sin θ), r = sqrt(-2 ln u_a), θ = 2π u_b.
#[inline(always)]
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let r = (-2.0 * det_ln(u32_to_uniform(a))).sqrt();
    let (s, c) = det_sincos_2pi(u32_to_uniform(b));
    (r * c, r * s)
}

/// The four normals of one block: lanes (0, 1) and (2, 3) are Box–Muller pairs.
#[inline]
pub fn normals_of(bits: [u32; 4]) -> [f32; 4] {
    let (n0, n1) = box_muller(bits[0], bits[1]);
    let (n2, n3) = box_muller(bits[2], bits[3]);
    [n0, n1, n2, n3]
}

/// Elements per parallel piece; a multiple of 4, so pieces after the first
/// start on a block boundary and no block is split between two pieces.
const CHUNK: usize = 1 << 16;

/// Writes `piece`, whose first element is lane `skip` of the block starting
/// at element `e0` (a multiple of 4, modulo 2^64).
#[inline]
fn fill_piece<V: Copy>(seed: u64, stream: u64, e0: u64, skip: usize, piece: &mut [V], lanes: &impl Fn([u32; 4]) -> [V; 4]) {
    let (mut e, mut lane, mut i) = (e0, skip, 0);
    while i < piece.len() {
        let v = lanes(philox_block(seed, stream, e >> 2));
        let take = (4 - lane).min(piece.len() - i);
        piece[i..i + take].copy_from_slice(&v[lane..lane + take]);
        i += take;
        lane = 0;
        e = e.wrapping_add(4);
    }
}

fn fill<V: Copy + Send>(seed: u64, stream: u64, offset: u64, out: &mut [V], lanes: impl Fn([u32; 4]) -> [V; 4] + Sync) {
    // Virtual position p = i + phase puts output i at element base + p, with
    // base a multiple of 4; piece k covers virtual [k*CHUNK, (k+1)*CHUNK).
    let phase = (offset & 3) as usize;
    let base = offset - phase as u64;
    let head = out.len().min(CHUNK - phase);
    let (first, rest) = out.split_at_mut(head);
    if rest.is_empty() {
        fill_piece(seed, stream, base, phase, first, &lanes);
        return;
    }
    rayon::iter::once(first)
        .chain(rest.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(k, piece)| {
            let e0 = base.wrapping_add((k * CHUNK) as u64);
            fill_piece(seed, stream, e0, if k == 0 { phase } else { 0 }, piece, &lanes);
        });
}

/// Raw 32-bit Philox outputs of elements `offset ..` of stream (seed, stream).
pub fn fill_u32(seed: u64, stream: u64, offset: u64, out: &mut [u32]) {
    fill(seed, stream, offset, out, |b| b);
}

/// Uniforms in (0, 1) (see `u32_to_uniform`) of elements `offset ..`.
pub fn fill_uniform(seed: u64, stream: u64, offset: u64, out: &mut [f32]) {
    fill(seed, stream, offset, out, |b| b.map(u32_to_uniform));
}

/// Standard normals (see `normals_of`) of elements `offset ..`.
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
    fn addressing_is_block_and_lane() {
        let (seed, stream) = (0x0123_4567_89ab_cdef_u64, 0xfedc_ba98_7654_3210_u64);
        let mut out = vec![0u32; 40];
        fill_u32(seed, stream, 3, &mut out);
        for (i, &v) in out.iter().enumerate() {
            let e = 3 + i as u64;
            let b = e / 4;
            let blk = philox4x32_10([b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32], [seed as u32, (seed >> 32) as u32]);
            assert_eq!(v, blk[(e % 4) as usize], "element {e}");
        }
        // Indices wrap modulo 2^64: the last element is followed by element 0.
        let mut wrap = [0u32; 6];
        fill_u32(seed, stream, u64::MAX - 2, &mut wrap);
        let mut first = [0u32; 3];
        fill_u32(seed, stream, 0, &mut first);
        assert_eq!(&wrap[3..], &first);
        assert_eq!(wrap[2], philox_block(seed, stream, u64::MAX >> 2)[3]);
    }

    fn pieces_equal_whole<V: Copy + Send + PartialEq + std::fmt::Debug + Default>(f: fn(u64, u64, u64, &mut [V])) {
        let n = 3 * CHUNK + 13;
        for offset in [0u64, 1, 2, 3, 4, 5, 1 << 40, (1 << 62) + 7] {
            let mut whole = vec![V::default(); n];
            f(7, 9, offset, &mut whole);
            // Cuts at every residue mod 4 and across chunk boundaries.
            for cuts in [vec![1, 2, 3, 4, 5], vec![CHUNK - 1, CHUNK + 2], vec![7, 2 * CHUNK + 1, 2 * CHUNK + 6]] {
                let mut parts = vec![V::default(); n];
                let mut start = 0;
                for end in cuts.into_iter().chain([n]) {
                    f(7, 9, offset + start as u64, &mut parts[start..end]);
                    start = end;
                }
                assert_eq!(whole, parts, "offset {offset}");
            }
            // One element at a time, at scattered places.
            for i in [0, 1, 2, 3, CHUNK - 1, CHUNK, n - 1] {
                let mut one = [V::default()];
                f(7, 9, offset + i as u64, &mut one);
                assert_eq!(one[0], whole[i], "offset {offset} element {i}");
            }
        }
    }

    #[test]
    fn independent_of_chunking_and_threads() {
        pieces_equal_whole::<u32>(fill_u32);
        pieces_equal_whole::<f32>(fill_uniform);
        pieces_equal_whole::<f32>(fill_normal);
        // The same in a one-thread pool (no parallel pieces at all).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut a = vec![0f32; 2 * CHUNK + 3];
        let mut b = a.clone();
        fill_normal(11, 2, 5, &mut a);
        pool.install(|| fill_normal(11, 2, 5, &mut b));
        assert_eq!(a, b);
    }

    #[test]
    fn constants_are_the_rounded_values() {
        assert_eq!(SQRT_2, std::f32::consts::SQRT_2);
        assert_eq!(TWO_PI, std::f32::consts::TAU);
        assert_eq!(LN2_HI.to_bits() & 0x1ff, 0, "e * LN2_HI must be exact");
        assert_eq!(LN2_LO, (std::f64::consts::LN_2 - LN2_HI as f64) as f32);
    }

    #[test]
    fn uniform_mapping_is_the_contract() {
        assert_eq!(u32_to_uniform(0), 0.5 / 8_388_608.0);
        assert_eq!(u32_to_uniform(0x1ff), 0.5 / 8_388_608.0, "low 9 bits ignored");
        for k in (0..(1u32 << 23)).step_by(4099).chain([(1 << 22) - 1, 1 << 22, (1 << 23) - 2, (1 << 23) - 1]) {
            let u = u32_to_uniform(k << 9);
            assert_eq!(u as f64, (k as f64 + 0.5) / 8_388_608.0, "exact");
            assert!(u > 0.0 && u < 1.0);
        }
        assert!(u32_to_uniform(u32::MAX) < 1.0);
        // The extreme draws still give finite normals.
        for bits in [[u32::MAX; 4], [0; 4]] {
            assert!(normals_of(bits).iter().all(|v| v.is_finite()));
        }
    }

    /// Every uniform the generator can produce (and other points of (0, 1)).
    fn ln_inputs() -> impl Iterator<Item = f32> {
        let uniforms = (0..(1u32 << 23)).map(|k| u32_to_uniform(k << 9));
        let spread = (1..2_000_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) % 0x3f80_0000)).filter(|v| v.is_normal());
        uniforms.chain(spread)
    }

    #[test]
    fn det_exp_and_det_pow_accuracy() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0f32 + 175.0 * (i as f32 / 200_000.0);
            let want = (x as f64).exp();
            let got = det_exp(x) as f64;
            // Below 2^-126 the result is subnormal: count absolute error in its ulps.
            let err = if want < f32::MIN_POSITIVE as f64 { (got - want).abs() / 1.4e-45 / 2.0f64.powi(23) } else { ((got - want) / want).abs() };
            worst = worst.max(err);
        }
        eprintln!("det_exp: worst relative error {worst:e}");
        assert!(worst < 1e-6, "det_exp worst relative error {worst:e}");
        assert_eq!(det_exp(0.0), 1.0);
        assert_eq!(det_exp(-100.0), 0.0);
        assert_eq!(det_exp(100.0), f32::INFINITY);
        // q^(k/2) for AdaHessian's Hessian power: relative error ~ |e ln q| · 2.1e-7.
        for &q in &[1e-30f32, 1e-8, 0.003, 0.5, 1.0, 7.0, 1e12] {
            for &e in &[0.25f32, 0.5, 0.75] {
                let want = (q as f64).powf(e as f64);
                let got = det_pow(q, e) as f64;
                let bound = 1e-6 + 3e-7 * (e as f64 * (q as f64).ln()).abs();
                assert!(((got - want) / want).abs() < bound, "det_pow({q}, {e}) = {got} vs {want}");
            }
        }
        assert_eq!(det_pow(0.0, 0.5), 0.0);
    }

    #[test]
    fn det_ln_accuracy() {
        let mut worst = 0f64;
        for u in ln_inputs() {
            let want = (u as f64).ln();
            let got = det_ln(u) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        eprintln!("det_ln: worst relative error {worst:e}");
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(det_ln(1.0), 0.0);
        assert_eq!(det_ln(0.5), -std::f32::consts::LN_2);
    }

    #[test]
    fn det_sincos_accuracy() {
        let mut worst = 0f64;
        let check = |u: f32, worst: &mut f64| {
            let (s, c) = det_sincos_2pi(u);
            let t = 2.0 * std::f64::consts::PI * u as f64;
            *worst = worst.max((s as f64 - t.sin()).abs()).max((c as f64 - t.cos()).abs());
        };
        for k in 0..(1u32 << 24) {
            check(u32_to_uniform(k << 8), &mut worst);
        }
        for i in 0..=1_000_000u32 {
            check(i as f32 / 1_000_000.0, &mut worst);
        }
        eprintln!("det_sincos_2pi: worst absolute error {worst:e}");
        assert!(worst < 1e-6, "worst absolute error {worst:e}");
        assert_eq!(det_sincos_2pi(0.0), (0.0, 1.0));
        assert_eq!(det_sincos_2pi(0.25), (1.0, 0.0));
    }

    #[test]
    fn uniform_moments() {
        let mut u = vec![0f32; 1 << 20];
        fill_uniform(1, 0, 0, &mut u);
        assert!(u.iter().all(|&v| v > 0.0 && v <= 1.0));
        let n = u.len() as f64;
        let mean = u.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = u.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // Sampling sd of the mean: sqrt(1/12/n); of the variance: sqrt(1/180/n).
        assert!((mean - 0.5).abs() < 5.0 * (1.0 / 12.0 / n).sqrt(), "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 5.0 * (1.0 / 180.0 / n).sqrt(), "var {var}");
    }

    #[test]
    fn normal_moments() {
        let mut z = vec![0f32; 1 << 20];
        fill_normal(1, 0, 0, &mut z);
        assert!(z.iter().all(|v| v.is_finite()));
        let n = z.len() as f64;
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let p = 0.682_689_492_137_085_9;
        let within = z.iter().filter(|v| v.abs() < 1.0).count() as f64 / n;
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "var {var}");
        assert!((within - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(), "within 1 sigma {within}");
    }

    #[test]
    fn side_by_side_blocks_equal_single_blocks() {
        let mut out = [0u32; 64];
        for (seed, stream, first) in [(0u64, 0u64, 0u64), (7, 1 << 40, (1 << 32) - 3), (u64::MAX, 12345, 99)] {
            philox_blocks::<16>(seed, stream, first, &mut out);
            for l in 0..16u64 {
                let b = philox_block(seed, stream, first.wrapping_add(l));
                assert_eq!(&out[4 * l as usize..4 * l as usize + 4], &b[..]);
            }
        }
    }
}
