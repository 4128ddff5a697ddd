//! The per-element work of a merge, done a block at a time so that every
//! inner loop is a straight, vectorisable loop over a few hundred elements:
//! convert the base, round each model's delta, decide its mask, weight it,
//! combine, round the output. The sparsifier is matched once per block, not
//! per element.

use crate::philox;
use crate::select::{self, Rule};
use crate::Float;

use super::Params;

/// Elements per block: small enough that a block of every model's weighted
/// deltas stays in L1.
pub(super) const BLOCK: usize = 256;

/// Which elements of one delta survive over one span (a unit of the tensor,
/// or a row), positioned at the span's first element.
#[derive(Clone, Copy)]
pub(super) enum Mask {
    All,
    Band { lo: Rule, hi: Rule },
    Random { threshold: f32, seed: u64, stream: u64 },
}

impl Mask {
    fn needs_keys(&self) -> bool {
        matches!(self, Mask::Band { .. })
    }

    /// keep[j] for elements `start + j` (indices within the tensor) whose
    /// delta keys are `keys` (read only by rank-based masks).
    fn fill(&mut self, start: usize, keys: &[u32], keep: &mut [u8]) {
        match self {
            Mask::All => keep.fill(1),
            Mask::Band { lo, hi } => select::band_keys(keys, keep, lo, hi),
            Mask::Random { threshold, seed, stream } => {
                // One Philox block per 4 consecutive elements: masks depend on
                // the element index alone, not on chunking or threads.
                let mut current = u64::MAX;
                let mut draws = [0u32; 4];
                for (j, k) in keep.iter_mut().enumerate() {
                    let i = (start + j) as u64;
                    if i / 4 != current {
                        current = i / 4;
                        draws = philox::philox4x32_10(
                            [current as u32, (current >> 32) as u32, *stream as u32, (*stream >> 32) as u32],
                            [*seed as u32, (*seed >> 32) as u32],
                        );
                    }
                    *k = (philox::u32_to_uniform(draws[(i % 4) as usize]) < *threshold) as u8;
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

    fn load_base<T: Float>(&mut self, base: &[T]) {
        self.base.iter_mut().zip(base).for_each(|(b, v)| *b = v.to_f32());
    }

    /// delta = x − base rounded to T (mergekit subtracts in the input
    /// dtype), plus its keys and mask. Returns the block length.
    fn delta_and_mask<T: Float>(&mut self, x: &[T], start: usize, mask: &mut Mask) -> usize {
        let n = x.len();
        for ((d, v), b) in self.delta.iter_mut().zip(x).zip(&self.base) {
            *d = T::round_f32(v.to_f32() - b);
        }
        if mask.needs_keys() {
            self.keys.iter_mut().zip(&self.delta[..n]).for_each(|(k, &d)| *k = T::key_of_f32(d));
        }
        if !matches!(mask, Mask::All) {
            mask.fill(start, &self.keys[..n], &mut self.keep[..n]);
        }
        n
    }
}

/// Σ|τ| and Σ|kept τ| of one model over a span (mergekit's L1 rescale),
/// summed in element order in f64 so the bits do not depend on threads.
pub(super) fn l1_sums<T: Float>(base: &[T], x: &[T], start: usize, mut mask: Mask) -> (f64, f64) {
    let mut blk = Block::new();
    let (mut all, mut kept) = (0.0f64, 0.0f64);
    for (s, (b, x)) in base.chunks(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
        blk.load_base(b);
        let n = blk.delta_and_mask(x, start + s * BLOCK, &mut mask);
        let all_kept = matches!(mask, Mask::All);
        for (d, &k) in blk.delta[..n].iter().zip(&blk.keep[..n]) {
            let a = d.abs() as f64;
            all += a;
            if all_kept || k != 0 {
                kept += a;
            }
        }
    }
    (all, kept)
}

/// Writes the merged values of one span and returns how many differ from
/// `reference`. `scales[m]` is model m's weight times its rescale factor.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_span<T: Float>(
    base: &[T],
    models: &[&[T]],
    reference: &[T],
    start: usize,
    masks: &mut [Mask],
    scales: &[f32],
    weights: &[f32],
    p: &Params,
    out: &mut [T],
) -> u64 {
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
        blk.load_base(&base[s..e]);
        for (m, x) in models.iter().enumerate() {
            blk.delta_and_mask(&x[s..e], start + s, &mut masks[m]);
            let vm = &mut v[m * BLOCK..m * BLOCK + n];
            let scale = scales[m];
            if matches!(masks[m], Mask::All) {
                vm.iter_mut().zip(&blk.delta).for_each(|(v, &d)| *v = scale * d);
            } else {
                for ((v, &d), &k) in vm.iter_mut().zip(&blk.delta).zip(&blk.keep) {
                    *v = if k != 0 { scale * d } else { 0.0 };
                }
            }
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
        let reference = &reference[s..e];
        for j in 0..n {
            let mut delta = mixed[j];
            if p.normalize {
                delta /= divisor[j];
            }
            let merged = T::from_f32(blk.base[j] + delta * p.lambda);
            changed += (merged.to_f32() != reference[j].to_f32()) as u64;
            out[s + j] = merged;
        }
    }
    changed
}

/// TIES "sum" consensus over one block: on entry `mixed` holds Σ v; on exit
/// it holds the sum of the entries whose sign matches Σ v's (ties go to +)
/// and `divisor` the sum of their weights (1 where none join). Adding +0.0
/// for the others is exact: the sums never hold −0.0.
fn elect_signs(v: &[f32], weights: &[f32], mixed: &mut [f32], divisor: &mut [f32]) {
    let n = mixed.len();
    let mut positive = [false; BLOCK];
    positive[..n].iter_mut().zip(mixed.iter()).for_each(|(p, &s)| *p = s >= 0.0);
    mixed.fill(0.0);
    divisor.fill(0.0);
    for (m, &w) in weights.iter().enumerate() {
        let vm = &v[m * BLOCK..m * BLOCK + n];
        for j in 0..n {
            let vi = vm[j];
            let agree = if positive[j] { vi > 0.0 } else { vi < 0.0 };
            mixed[j] += if agree { vi } else { 0.0 };
            divisor[j] += if agree { w } else { 0.0 };
        }
    }
    divisor.iter_mut().for_each(|d| {
        if *d == 0.0 {
            *d = 1.0
        }
    });
}
