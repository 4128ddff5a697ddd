//! The per-element work of a merge, done a block at a time so that every
//! inner loop is a straight, vectorisable loop over a few hundred elements:
//! convert the base, round each model's delta, decide its mask, weight it,
//! combine, round the output. The sparsifier is matched once per block, not
//! per element.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::philox;
use crate::select::{self, Rule};
use crate::simd::multiversion;
use crate::Float;

use super::Params;

/// Elements per block: small enough that a block of every model's weighted
/// deltas stays in L1.
pub(super) const BLOCK: usize = 256;

/// Which elements of one delta survive over one span (a unit of the tensor,
/// or a row), positioned at the span's first element.
#[derive(Clone, Copy)]
pub(super) enum Mask<'a> {
    All,
    Band { lo: Rule, hi: Rule },
    Random { threshold: f32, seed: u64, stream: u64 },
    /// Decided beforehand (DELLA's MagPrune): bit `i` of `words` keeps
    /// element `first + i`.
    Bits { words: &'a [u64], first: usize },
}

impl Mask<'_> {
    fn needs_keys(&self) -> bool {
        matches!(self, Mask::Band { .. })
    }

    /// keep[j] for elements `start + j` (indices within the tensor) whose
    /// delta keys are `keys` (read only by rank-based masks).
    #[inline(always)]
    fn fill(&mut self, start: usize, keys: &[u32], keep: &mut [u8]) {
        match self {
            Mask::All => keep.fill(1),
            Mask::Band { lo, hi } => select::band_keys(keys, keep, lo, hi),
            Mask::Random { threshold, seed, stream } => {
                // Philox block i / 4 gives element i its draw: masks depend on
                // the element index alone, not on chunking or threads.
                const GROUP: usize = 16;
                let first = start / 4;
                let last = (start + keep.len()).div_ceil(4);
                let mut draws = [0u32; (BLOCK / 4 + 2).next_multiple_of(GROUP) * 4];
                for g in (first..last).step_by(GROUP) {
                    let at = (g - first) * 4;
                    philox::philox_blocks::<GROUP>(*seed, *stream, g as u64, &mut draws[at..at + GROUP * 4]);
                }
                let draws = &draws[start - first * 4..];
                for (k, &d) in keep.iter_mut().zip(draws) {
                    *k = (philox::u32_to_uniform(d) < *threshold) as u8;
                }
            }
            Mask::Bits { words, first } => {
                let at = start - *first;
                for (j, k) in keep.iter_mut().enumerate() {
                    let i = at + j;
                    *k = ((words[i >> 6] >> (i & 63)) & 1) as u8;
                }
            }
        }
    }
}

/// Per-block scratch of one worker.
struct Block {
    base: [f32; BLOCK],
    delta: [f32; BLOCK],
    keys: [u32; BLOCK],
    keep: [u8; BLOCK],
}

impl Block {
    fn new() -> Self {
        Block { base: [0.0; BLOCK], delta: [0.0; BLOCK], keys: [0; BLOCK], keep: [0; BLOCK] }
    }

    /// Converts the base block; true if it holds NaN/Inf.
    #[inline(always)]
    fn load_base<T: Float>(&mut self, base: &[T]) -> bool {
        let mut bad = false;
        for (b, v) in self.base.iter_mut().zip(base) {
            *b = v.to_f32();
            bad |= !b.is_finite();
        }
        bad
    }

    /// delta = x − base rounded to T (mergekit subtracts in the input
    /// dtype), plus its keys and mask. Returns whether x holds NaN/Inf (the
    /// check rides along the conversion instead of costing its own pass).
    #[inline(always)]
    fn delta_and_mask<T: Float>(&mut self, x: &[T], start: usize, mask: &mut Mask<'_>) -> bool {
        let n = x.len();
        let mut bad = false;
        for ((d, v), b) in self.delta.iter_mut().zip(x).zip(&self.base) {
            let v = v.to_f32();
            bad |= !v.is_finite();
            *d = T::round_f32(v - b);
        }
        if mask.needs_keys() {
            self.keys.iter_mut().zip(&self.delta[..n]).for_each(|(k, &d)| *k = T::key_of_f32(d));
        }
        if !matches!(mask, Mask::All) {
            mask.fill(start, &self.keys[..n], &mut self.keep[..n]);
        }
        bad
    }
}

multiversion! {
/// Σ|τ| and Σ|kept τ| of one model over a span (mergekit's L1 rescale), in
/// f64 with `LANES` partial sums (element j goes to lane j % LANES, lanes
/// added in order at the end), so the bits do not depend on threads or
/// chunking and the loop vectorises.
pub(super) fn l1_sums<T: Float>(base: &[T], x: &[T], start: usize, mask: Mask<'_>) -> (f64, f64) {
    let mut mask = mask;
    const LANES: usize = 8;
    let mut blk = Block::new();
    let (mut all, mut kept) = ([0.0f64; LANES], [0.0f64; LANES]);
    for (s, (b, x)) in base.chunks(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
        let n = b.len();
        blk.load_base(b);
        blk.delta_and_mask(x, start + s * BLOCK, &mut mask);
        if matches!(mask, Mask::All) {
            blk.keep[..n].fill(1);
        }
        // BLOCK is a multiple of LANES, so lane = element index % LANES.
        for (d, k) in blk.delta[..n].chunks(LANES).zip(blk.keep[..n].chunks(LANES)) {
            for l in 0..d.len() {
                let a = d[l].abs() as f64;
                all[l] += a;
                kept[l] += f64::from_bits(a.to_bits() & 0u64.wrapping_sub(k[l] as u64));
            }
        }
    }
    let total = |xs: [f64; LANES]| xs.iter().fold(0.0f64, |acc, &v| acc + v);
    (total(all), total(kept))
}
}

multiversion! {
    /// Writes the merged values of one span and returns how many differ from
    /// `reference`. `scales[m]` is model m's weight times its rescale factor.
    pub(super) fn write_span<T: Float>(
        base: &[T],
        models: &[&[T]],
        reference: &[T],
        start: usize,
        masks: &mut [Mask<'_>],
        scales: &[f32],
        weights: &[f32],
        p: &Params,
        out: &mut [T],
    ) -> Result<u64> {
    let nm = models.len();
    let mut blk = Block::new();
    // Weighted, masked deltas of every model for the current block.
    let mut v = vec![0.0f32; nm * BLOCK];
    let mut mixed = [0.0f32; BLOCK];
    let mut divisor = [0.0f32; BLOCK];
    let plain_divisor = {
        let d = weights.iter().fold(0.0f32, |a, &b| a + b);
        if d.abs() < 1e-8 {
            1.0
        } else {
            d
        }
    };
    let mut changed = 0u64;
    for s in (0..out.len()).step_by(BLOCK) {
        let e = (s + BLOCK).min(out.len());
        let n = e - s;
        let mut bad = blk.load_base(&base[s..e]);
        for (m, x) in models.iter().enumerate() {
            bad |= blk.delta_and_mask(&x[s..e], start + s, &mut masks[m]);
            let vm = &mut v[m * BLOCK..m * BLOCK + n];
            let scale = scales[m];
            if matches!(masks[m], Mask::All) {
                vm.iter_mut().zip(&blk.delta).for_each(|(v, &d)| *v = scale * d);
            } else {
                // Dropped entries become +0.0 through a bit mask (branch-free).
                for ((v, &d), &k) in vm.iter_mut().zip(&blk.delta).zip(&blk.keep) {
                    *v = f32::from_bits((scale * d).to_bits() & lanes(k != 0));
                }
            }
        }
        if bad && p.check_finite {
            return Err(first_nonfinite(&base[s..e], models, s..e, start + s));
        }
        // Sums start at +0.0 (not Sum's -0.0) so zero signs match the reference.
        let mixed = &mut mixed[..n];
        mixed.fill(0.0);
        for m in 0..nm {
            mixed.iter_mut().zip(&v[m * BLOCK..]).for_each(|(a, &b)| *a += b);
        }
        let divisor = &mut divisor[..n];
        if p.consensus {
            elect_signs(&v, weights, mixed, divisor);
        } else {
            divisor.fill(plain_divisor);
        }
        if p.normalize {
            mixed.iter_mut().zip(divisor.iter()).for_each(|(m, &d)| *m /= d);
        }
        let merged = &mut out[s..e];
        for ((o, &b), &delta) in merged.iter_mut().zip(&blk.base).zip(mixed.iter()) {
            *o = T::from_f32(b + delta * p.lambda);
        }
        let differ = merged.iter().zip(&reference[s..e]).map(|(o, r)| (o.to_f32() != r.to_f32()) as u32).sum::<u32>();
        changed += differ as u64;
    }
    Ok(changed)
}
}

/// The error for NaN/Inf found in a block: the lowest index holding one, and
/// the first input (base, then models in order) holding it there.
fn first_nonfinite<T: Float>(base: &[T], models: &[&[T]], block: Range<usize>, at: usize) -> Error {
    for j in 0..base.len() {
        let inputs = std::iter::once(("base".to_string(), base[j]))
            .chain(models.iter().enumerate().map(|(m, x)| (format!("models[{m}]"), x[block.start + j])));
        for (name, v) in inputs {
            if !v.to_f32().is_finite() {
                return super::nonfinite_error(&name, v.to_f32(), at + j);
            }
        }
    }
    Error::Value(format!("non-finite value near flat index {at}"))
}

/// All ones when `b`, else zero: a lane mask for branch-free selects.
#[inline(always)]
fn lanes(b: bool) -> u32 {
    0u32.wrapping_sub(b as u32)
}

/// TIES "sum" consensus over one block: on entry `mixed` holds Σ v; on exit
/// it holds the sum of the entries whose sign matches Σ v's (ties go to +)
/// and `divisor` the sum of their weights (1 where none join). The others
/// add +0.0, which is exact: the sums never hold −0.0.
#[inline(always)]
fn elect_signs(v: &[f32], weights: &[f32], mixed: &mut [f32], divisor: &mut [f32]) {
    let n = mixed.len();
    let mut positive = [0u32; BLOCK];
    positive[..n].iter_mut().zip(mixed.iter()).for_each(|(p, &s)| *p = lanes(s >= 0.0));
    mixed.fill(0.0);
    divisor.fill(0.0);
    for (m, &w) in weights.iter().enumerate() {
        let vm = &v[m * BLOCK..m * BLOCK + n];
        for j in 0..n {
            let vi = vm[j];
            let agree = (positive[j] & lanes(vi > 0.0)) | (!positive[j] & lanes(vi < 0.0));
            mixed[j] += f32::from_bits(vi.to_bits() & agree);
            divisor[j] += f32::from_bits(w.to_bits() & agree);
        }
    }
    let one = 1.0f32.to_bits();
    divisor.iter_mut().for_each(|d| {
        let zero = lanes(*d == 0.0);
        *d = f32::from_bits((d.to_bits() & !zero) | (one & zero));
    });
}
