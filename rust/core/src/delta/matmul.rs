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
    fn get(&self, tenant: usize, o: usize, out: usize) -> f32 {
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
fn word_at(row: &[u8], w: usize) -> u32 {
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
    run(x, d, signs, alphas, None, y, accumulate);
    Ok(())
}

/// The multi-tenant matmul: signs [tenants, out, ceil(in/8)], alphas per
/// tenant or per (tenant, row); batch row b uses tenant `ids[b]`.
pub fn matmul_multi<T: Float>(x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, ids: &[i64], y: &mut [T], accumulate: bool) -> Result<()> {
    check(&d, x.len(), signs.len(), &alphas, Some(ids), y.len())?;
    run(x, d, signs, alphas, Some(ids), y, accumulate);
    Ok(())
}

fn run<T: Float>(x: &[T], d: Dims, signs: &[u8], alphas: Alphas<'_>, ids: Option<&[i64]>, y: &mut [T], accumulate: bool) {
    let (batch, inf, out) = (d.batch, d.in_features, d.out_features);
    if batch == 0 || out == 0 {
        return;
    }
    let (words, rb) = (d.words(), d.row_bytes());
    let stride = words * WORD;
    // Batch rows grouped by tenant (stable), so one tenant's rows share the
    // mask expansion; `order[p]` is the batch row at position p.
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
    // x in f32, zero-padded to whole words, in group order.
    let mut xp = vec![0f32; batch * stride];
    xp.par_chunks_mut(stride).zip(&order).for_each(|(dst, &b)| {
        for (v, s) in dst.iter_mut().zip(&x[b * inf..(b + 1) * inf]) {
            *v = s.to_f32();
        }
    });
    // sums[o * batch + p]: output row o of the batch row at position p.
    let mut sums = vec![0f32; out * batch];
    sums.par_chunks_mut(ROWS_PER_TASK * batch).enumerate().for_each(|(task, block)| {
        let o0 = task * ROWS_PER_TASK;
        for (t, r) in &groups {
            let tenant_signs = &signs[t * out * rb..(t + 1) * out * rb];
            for (k, row_sums) in block.chunks_mut(batch).enumerate() {
                let o = o0 + k;
                let row = &tenant_signs[o * rb..(o + 1) * rb];
                dot_rows::<f32>(std::marker::PhantomData, &xp[r.start * stride..r.end * stride], stride, r.len(), row, words, &mut row_sums[r.clone()]);
            }
        }
    });
    let mut pos = vec![0usize; batch];
    for (p, &b) in order.iter().enumerate() {
        pos[b] = p;
    }
    y.par_chunks_mut(out).enumerate().for_each(|(b, yrow)| {
        let (p, t) = (pos[b], tenant_of(b));
        for (o, v) in yrow.iter_mut().enumerate() {
            let delta = alphas.get(t, o, out) * sums[o * batch + p];
            *v = T::from_f32(if accumulate { v.to_f32() + delta } else { delta });
        }
    });
}
