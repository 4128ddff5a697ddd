//! The 1-bit matmul: y[b, o] = α_o · Σ_j x[b, j]·s[o, j] with s = ±1 read
//! from packed sign bits (bit 1 → −1), never materialised, f32 accumulation.
//!
//! The order of the sum is fixed and is the CUDA kernel's (`cuda/delta.cu`),
//! so the two agree bit for bit: the packed row is read as little-endian u32
//! words (bytes past the row read as 0); input j goes to lane j % 32, and
//! lane l adds ±x[b, j] for j = l, l + 32, ... in order (x past `in` is 0,
//! and adding ±0 to a sum that started at +0 changes nothing, so padding
//! bits do not matter); the 32 lanes are combined by the tree
//! l += l + off for off = 16, 8, 4, 2, 1. Then y = α·sum in f32 (plus the
//! old y, when accumulating) and one rounding to the output dtype. Flipping
//! a float's sign bit is exact, so ±x costs an XOR: per 32 inputs the sign
//! word gives 32 lane masks once, shared by every batch row.
//!
//! Multi-tenant: T fine-tunes' signs stacked [T, out, row_bytes]; batch row
//! b uses tenant ids[b]. Each (b, o) is computed exactly as the
//! single-tenant kernel computes it, so rows match it bitwise.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::pack::packed_row_bytes;
use crate::simd::multiversion;
use crate::Float;

/// Inputs per sign word (and lanes of the sum).
pub const WORD: usize = 32;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// The scales: one per tenant (`per_row` false: values.len() == tenants) or
/// one per (tenant, output row) (`per_row` true: tenants × out).
#[derive(Clone, Copy, Debug)]
pub struct Alphas<'a> {
    pub values: &'a [f32],
    pub per_row: bool,
}

impl Alphas<'_> {
    #[inline(always)]
    pub(crate) fn get(&self, tenant: usize, o: usize, out: usize) -> f32 {
        if self.per_row {
            self.values[tenant * out + o]
        } else {
            self.values[tenant]
        }
    }
}

/// The shapes of one call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub tenants: usize,
}

impl Dims {
    pub fn row_bytes(&self) -> usize {
        packed_row_bytes(self.in_features, 1)
    }
    pub fn words(&self) -> usize {
        self.in_features.div_ceil(WORD)
    }
}

/// Checks lengths and tenant ids; the message names the argument.
pub fn check(d: &Dims, x: usize, signs: usize, alphas: &Alphas<'_>, ids: Option<&[i64]>, y: usize) -> Result<()> {
    let want = |what: &str, expected: usize, got: usize, shape: String| {
        if expected == got {
            Ok(())
        } else {
            Err(Error::Shape(format!("{what}: expected {shape} = {expected} elements, got {got}")))
        }
    };
    if d.in_features == 0 {
        return Err(Error::Shape("x: in_features must be positive".into()));
    }
    if d.tenants == 0 {
        return Err(Error::Shape("signs: expected at least one fine-tune".into()));
    }
    want("x", d.batch * d.in_features, x, format!("[{}, {}]", d.batch, d.in_features))?;
    want("signs (bytes)", d.tenants * d.out_features * d.row_bytes(), signs, format!("[{}, {}, {}]", d.tenants, d.out_features, d.row_bytes()))?;
    want("out", d.batch * d.out_features, y, format!("[{}, {}]", d.batch, d.out_features))?;
    if alphas.per_row {
        want("alpha", d.tenants * d.out_features, alphas.values.len(), format!("[{}, {}]", d.tenants, d.out_features))?;
    } else {
        want("alpha", d.tenants, alphas.values.len(), format!("[{}]", d.tenants))?;
    }
    if let Some(ids) = ids {
        want("adapter_ids", d.batch, ids.len(), format!("[{}]", d.batch))?;
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t < 0 || t as u64 >= d.tenants as u64) {
            return Err(Error::Value(format!("adapter_ids[{i}]: expected a fine-tune index in [0, {}), got {t}", d.tenants)));
        }
    }
    Ok(())
}

/// Sign masks of the 8 lanes of a byte: bit l set → 0x8000_0000 in lane l.
static BYTE_MASKS: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut l = 0;
        while l < 8 {
            t[b][l] = ((b as u32) >> l & 1) << 31;
            l += 1;
        }
        b += 1;
    }
    t
};

/// The word `w` of a packed row (bytes past the row read as zero).
#[inline(always)]
pub(crate) fn word_at(row: &[u8], w: usize) -> u32 {
    let s = w * 4;
    if s + 4 <= row.len() {
        u32::from_le_bytes([row[s], row[s + 1], row[s + 2], row[s + 3]])
    } else {
        row[s..].iter().enumerate().fold(0u32, |v, (k, &b)| v | (b as u32) << (8 * k))
    }
}

/// The fixed combination of the 32 lanes.
#[inline(always)]
pub(crate) fn reduce32(mut a: [f32; WORD]) -> f32 {
    let mut off = WORD / 2;
    while off > 0 {
        for i in 0..off {
            a[i] += a[i + off];
        }
        off /= 2;
    }
    a[0]
}

/// Adds ±x of word `w` (32 inputs) to the lanes of NB batch rows. A plain
/// inline function, not a closure: closures are not inlined into the AVX2
/// build, and a baseline-x86 call per word would cost more than the work.
#[inline(always)]
fn step<const NB: usize>(xp: &[f32], stride: usize, w: usize, word: u32, acc: &mut [[f32; WORD]; NB]) {
    // The 32 lane masks: one table row (8 lanes) per byte of the word.
    let mask = [
        &BYTE_MASKS[(word & 0xff) as usize],
        &BYTE_MASKS[(word >> 8 & 0xff) as usize],
        &BYTE_MASKS[(word >> 16 & 0xff) as usize],
        &BYTE_MASKS[(word >> 24) as usize],
    ];
    for (b, a) in acc.iter_mut().enumerate() {
        let xs: &[f32; WORD] = xp[b * stride + w * WORD..b * stride + (w + 1) * WORD].try_into().expect("a whole word of x");
        for k in 0..4 {
            for l in 0..8 {
                a[8 * k + l] += f32::from_bits(xs[8 * k + l].to_bits() ^ mask[k][l]);
            }
        }
    }
}

/// Σ_j ±x[b, j] for NB padded batch rows (stride `stride` f32) against one
/// packed row.
#[inline(always)]
fn dot_tile<const NB: usize>(xp: &[f32], stride: usize, row: &[u8], words: usize, sums: &mut [f32]) {
    let mut acc = [[0f32; WORD]; NB];
    let full = (row.len() / 4).min(words);
    for (w, q) in row[..full * 4].chunks_exact(4).enumerate() {
        step::<NB>(xp, stride, w, u32::from_le_bytes([q[0], q[1], q[2], q[3]]), &mut acc);
    }
    for w in full..words {
        step::<NB>(xp, stride, w, word_at(row, w), &mut acc);
    }
    for (s, a) in sums.iter_mut().zip(acc) {
        *s = reduce32(a);
    }
}

multiversion! {
    /// Sums of `nb` padded batch rows against one packed row, in tiles.
    fn dot_rows<T: Float>(_t: std::marker::PhantomData<T>, xp: &[f32], stride: usize, nb: usize, row: &[u8], words: usize, sums: &mut [f32]) -> () {
        let mut b = 0;
        while b + 4 <= nb {
            dot_tile::<4>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 4]);
            b += 4;
        }
        while b + 2 <= nb {
            dot_tile::<2>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 2]);
            b += 2;
        }
        if b < nb {
            dot_tile::<1>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 1]);
        }
    }
}

/// Σ_j ±x[b, j]·s[o, j] for one (b, o), the reference order, one row at a
/// time (tests and the CUDA comparison).
pub fn dot_one(x: &[f32], row: &[u8]) -> f32 {
    let words = x.len().div_ceil(WORD);
    let mut xp = vec![0f32; words * WORD];
    xp[..x.len()].copy_from_slice(x);
    let mut s = [0f32];
    dot_tile::<1>(&xp, xp.len(), row, words, &mut s);
    s[0]
}

/// y = α ⊙ (x·Sᵀ) (or y += it with `accumulate`) for x [batch, in], signs
/// [out, ceil(in/8)], y [batch, out].
pub fn matmul<T: Float>(x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, y: &mut [T], accumulate: bool) -> Result<()> {
    if d.tenants != 1 {
        return Err(Error::Shape(format!("signs: the single-tenant matmul takes one fine-tune, got {}", d.tenants)));
    }
    check(&d, x.len(), signs.len(), &alphas, None, y.len())?;
    run(Kernel::best(), x, d, signs, alphas, None, y, accumulate);
    Ok(())
}

/// The multi-tenant matmul: signs [tenants, out, ceil(in/8)], alphas per
/// tenant or per (tenant, row); batch row b uses tenant `ids[b]`.
pub fn matmul_multi<T: Float>(x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, ids: &[i64], y: &mut [T], accumulate: bool) -> Result<()> {
    matmul_multi_with(Kernel::best(), x, d, signs, alphas, ids, y, accumulate)
}

/// `matmul_multi` on a chosen kernel (tests compare them bit for bit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_multi_with<T: Float>(kernel: Kernel, x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, ids: &[i64], y: &mut [T], accumulate: bool) -> Result<()> {
    check(&d, x.len(), signs.len(), &alphas, Some(ids), y.len())?;
    run(kernel, x, d, signs, alphas, Some(ids), y, accumulate);
    Ok(())
}

/// The inner kernels; all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Baseline x86-64 / AVX2 (`multiversion!`) or any other target.
    Portable,
    /// AVX-512F: sign bits as k-masks, register tiles of rows × batch rows.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// Every kernel this CPU runs, the fastest last.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            v.push(Kernel::Avx512);
        }
        v
    }

    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        Kernel::Portable
    }
}

/// A batch prepared for the kernels: rows grouped by tenant (stable), so
/// one tenant's rows share the mask expansion, and x widened to f32,
/// zero-padded to whole words, in group order. Shared with the fused linear.
pub(crate) struct Prepared {
    /// order[p]: the batch row at position p.
    pub order: Vec<usize>,
    /// pos[b]: the position of batch row b.
    pub pos: Vec<usize>,
    /// (tenant, positions) per group.
    pub groups: Vec<(usize, std::ops::Range<usize>)>,
    /// x rows in group order, `stride` f32 apart.
    pub xp: Vec<f32>,
    pub stride: usize,
}

pub(crate) fn prepare<T: Float>(x: &[T], d: &Dims, ids: Option<&[i64]>) -> Prepared {
    let (batch, inf) = (d.batch, d.in_features);
    let stride = d.words() * WORD;
    let mut order: Vec<usize> = (0..batch).collect();
    if let Some(ids) = ids {
        order.sort_by_key(|&b| ids[b]);
    }
    let tenant_of = |b: usize| ids.map_or(0, |ids| ids[b] as usize);
    let mut groups: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for (p, &b) in order.iter().enumerate() {
        match groups.last_mut() {
            Some((t, r)) if *t == tenant_of(b) => r.end = p + 1,
            _ => groups.push((tenant_of(b), p..p + 1)),
        }
    }
    let mut xp = vec![0f32; batch * stride];
    xp.par_chunks_mut(stride.max(1)).zip(&order).for_each(|(dst, &b)| {
        for (v, s) in dst.iter_mut().zip(&x[b * inf..(b + 1) * inf]) {
            *v = s.to_f32();
        }
    });
    let mut pos = vec![0usize; batch];
    for (p, &b) in order.iter().enumerate() {
        pos[b] = p;
    }
    Prepared { order, pos, groups, xp, stride }
}

/// Sign sums of output rows o0..o0 + block.len() / batch for every batch
/// position: block[k * batch + p] = Σ_j ±x[order[p], j]·s[o0 + k, j].
pub(crate) fn sign_block(kernel: Kernel, p: &Prepared, d: &Dims, signs: &[u8], o0: usize, block: &mut [f32]) {
    let (batch, out) = (d.batch, d.out_features);
    let (words, rb, stride) = (d.words(), d.row_bytes(), p.stride);
    let rows = block.len() / batch;
    for (t, r) in &p.groups {
        let tsigns = &signs[(t * out + o0) * rb..(t * out + o0 + rows) * rb];
        let xg = &p.xp[r.start * stride..r.end * stride];
        match kernel {
            Kernel::Portable => {
                for (k, row_sums) in block.chunks_mut(batch).enumerate() {
                    let row = &tsigns[k * rb..(k + 1) * rb];
                    dot_rows::<f32>(std::marker::PhantomData, xg, stride, r.len(), row, words, &mut row_sums[r.clone()]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => {
                // SAFETY: this kernel is only chosen where the CPU has AVX-512F.
                unsafe { x86::block(xg, stride, r.len(), tsigns, rb, words, &mut block[r.start..], batch) }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: Float>(kernel: Kernel, x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, ids: Option<&[i64]>, y: &mut [T], accumulate: bool) {
    let (batch, out) = (d.batch, d.out_features);
    if batch == 0 || out == 0 {
        return;
    }
    let p = prepare(x, &d, ids);
    let tenant_of = |b: usize| ids.map_or(0, |ids| ids[b] as usize);
    // sums[o * batch + p]: output row o of the batch row at position p. A
    // task takes ROWS_PER_TASK output rows of every tenant, so each thread
    // streams its slice of every tenant's signs once.
    let mut sums = vec![0f32; out * batch];
    sums.par_chunks_mut(ROWS_PER_TASK * batch)
        .enumerate()
        .for_each(|(task, block)| sign_block(kernel, &p, &d, signs, task * ROWS_PER_TASK, block));
    y.par_chunks_mut(out).enumerate().for_each(|(b, yrow)| {
        let (q, t) = (p.pos[b], tenant_of(b));
        for (o, v) in yrow.iter_mut().enumerate() {
            let delta = alphas.get(t, o, out) * sums[o * batch + q];
            *v = T::from_f32(if accumulate { v.to_f32() + delta } else { delta });
        }
    });
}

/// The AVX-512 kernel. The 32 bits of word w are the k-masks of its two
/// 16-lane halves; a blend turns each into ±1.0, and lane sums grow by
/// fma(x, ±1, acc): x·±1 is exact, so the fma rounds acc ± x once, exactly
/// as the add of ±x does, and the ±1 vector of a sign row is shared by the
/// NB batch rows of a tile (measured on Zen 4: faster than XOR + add, which
/// spends two vector ops per 16 lanes and batch row). The lane sums of a
/// tile (NO sign rows × NB batch rows × 32 lanes) live in registers over a
/// chunk of words and in a small state array between chunks (a plain store
/// and load: the order of the sum is untouched), so the chunk of x stays in
/// L1 while every row tile of the task reuses it.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{word_at, WORD};

    /// Bytes of x per chunk (NB batch rows × the chunk's words × 128 B).
    const CHUNK_BYTES: usize = 16 << 10;

    /// The fixed tree over 32 lanes, a[i] += a[i + off] for off = 16..1.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn reduce(a: &[f32; WORD]) -> f32 {
        // SAFETY: `a` holds 32 f32, the two loads read 16 each.
        let (lo, hi) = unsafe { (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(a.as_ptr().add(16))) };
        let v = _mm512_add_ps(lo, hi);
        let v8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
        let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
        _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps::<1>(v2, v2)))
    }

    /// Adds words w0..w1 of NO packed rows (`rows`, `rb` bytes apart) times
    /// NB batch rows (`xp`, `stride` f32 apart) to the lane sums
    /// `state[o * NB + b]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn tile<const NO: usize, const NB: usize>(xp: &[f32], stride: usize, rows: &[u8], rb: usize, words: usize, w0: usize, w1: usize, state: &mut [[f32; WORD]]) {
        assert!(w0 <= w1 && w1 <= words && NB >= 1 && xp.len() >= (NB - 1) * stride + words * WORD);
        assert!(rows.len() >= NO * rb && state.len() >= NO * NB);
        let full = (rb / 4).min(words);
        let (xptr, rptr) = (xp.as_ptr(), rows.as_ptr());
        let (one, minus) = (_mm512_set1_ps(1.0), _mm512_set1_ps(-1.0));
        let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; NO];
        for o in 0..NO {
            for b in 0..NB {
                let s = state[o * NB + b].as_ptr();
                // SAFETY: a state entry holds 32 f32.
                acc[o][b] = unsafe { [_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16))] };
            }
        }
        for w in w0..w1 {
            if w % 16 == 0 {
                // The next row tile's line at this offset: a tile's rows are
                // short streams that the hardware prefetcher misses.
                for o in 0..NO {
                    // A prefetch never faults; wrapping_add keeps the address arithmetic defined.
                    _mm_prefetch::<_MM_HINT_T0>(rptr.wrapping_add((NO + o) * rb + 4 * w).cast());
                }
            }
            for o in 0..NO {
                let m = if w < full {
                    // SAFETY: w < rb / 4, so bytes 4w..4w+4 lie in row o (rows.len() >= NO * rb).
                    u32::from_le(unsafe { rptr.add(o * rb + 4 * w).cast::<u32>().read_unaligned() })
                } else {
                    word_at(&rows[o * rb..(o + 1) * rb], w)
                };
                let s0 = _mm512_mask_blend_ps(m as __mmask16, one, minus);
                let s1 = _mm512_mask_blend_ps((m >> 16) as __mmask16, one, minus);
                for (b, a) in acc[o].iter_mut().enumerate() {
                    // SAFETY: b < NB and w < words, inside xp (asserted above).
                    let (x0, x1) = unsafe {
                        let p = xptr.add(b * stride + w * WORD);
                        (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                    };
                    a[0] = _mm512_fmadd_ps(x0, s0, a[0]);
                    a[1] = _mm512_fmadd_ps(x1, s1, a[1]);
                }
            }
        }
        for o in 0..NO {
            for b in 0..NB {
                let s = state[o * NB + b].as_mut_ptr();
                // SAFETY: a state entry holds 32 f32.
                unsafe {
                    _mm512_storeu_ps(s, acc[o][b][0]);
                    _mm512_storeu_ps(s.add(16), acc[o][b][1]);
                }
            }
        }
    }

    /// NB batch rows against all `rows.len() / rb` packed rows into
    /// sums[o * sstride + b]: word chunks outside, row tiles of NO inside
    /// (the rows past the last whole tile one by one).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn batch_tile<const NO: usize, const NB: usize>(xp: &[f32], stride: usize, rows: &[u8], rb: usize, words: usize, sums: &mut [f32], sstride: usize) {
        let n = rows.len() / rb;
        let mut state = vec![[0f32; WORD]; n * NB];
        let chunk = (CHUNK_BYTES / (NB * WORD * 4)).max(8);
        let mut w0 = 0;
        while w0 < words {
            let w1 = (w0 + chunk).min(words);
            let mut o = 0;
            while o + NO <= n {
                tile::<NO, NB>(xp, stride, &rows[o * rb..], rb, words, w0, w1, &mut state[o * NB..]);
                o += NO;
            }
            while o < n {
                tile::<1, NB>(xp, stride, &rows[o * rb..], rb, words, w0, w1, &mut state[o * NB..]);
                o += 1;
            }
            w0 = w1;
        }
        for o in 0..n {
            for b in 0..NB {
                sums[o * sstride + b] = reduce(&state[o * NB + b]);
            }
        }
    }

    /// Sums of `nb` batch rows of `xp` (`stride` f32 apart) against the
    /// packed rows `rows` into sums[o * sstride + b]. Tiles: 4 batch rows ×
    /// 2 sign rows, 2 × 4 or 1 × 8 (16 accumulator registers of 32).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block(xp: &[f32], stride: usize, nb: usize, rows: &[u8], rb: usize, words: usize, sums: &mut [f32], sstride: usize) {
        let mut b = 0;
        while b < nb {
            let (x, s) = (&xp[b * stride..], &mut sums[b..]);
            b += match nb - b {
                4.. => {
                    batch_tile::<2, 4>(x, stride, rows, rb, words, s, sstride);
                    4
                }
                2 | 3 => {
                    batch_tile::<4, 2>(x, stride, rows, rb, words, s, sstride);
                    2
                }
                _ => {
                    batch_tile::<8, 1>(x, stride, rows, rb, words, s, sstride);
                    1
                }
            };
        }
    }
}
