//! Task-vector merging, fused: for one tensor, the base and N fine-tuned
//! values are read, each delta τ_i = x_i − base is sparsified (magnitude
//! top-k, Breadcrumbs band, DARE random drop), weighted, optionally
//! sign-elected (TIES) and summed, and the result is written once. Nothing of
//! size N×n is materialised: deltas are recomputed from the inputs in every
//! pass, selection works on their keys (see `select`), and DARE draws its
//! masks from Philox keyed by (seed, stream, element).
//!
//! Semantics follow mergekit's generalized task arithmetic so that
//! mergekit-style configs mean what their users expect:
//! - τ_i is rounded to the input dtype (mergekit subtracts in that dtype); the
//!   masks are decided on those rounded deltas.
//! - k = max(1, ⌊density·n⌋) for magnitude; Breadcrumbs keeps ⌊density·n⌋
//!   elements after dropping the ⌊gamma·n⌋ largest (fewer dropped when the
//!   two do not fit), exactly as mergekit rounds.
//! - TIES ("sum" consensus): the elected sign is that of Σ w_i τ_i' (ties go
//!   to +), an entry joins when its sign equals it, and the normaliser is the
//!   sum of the joining weights (1 where none join).
//! Everything after the delta is computed in f32 and rounded once, where
//! mergekit rounds every step in the input dtype; see the tests for the
//! resulting bound.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::philox;
use crate::select::{self, CutWalker, Keys, RankCut, TIE_CHUNK};
use crate::Float;

/// How a task vector is sparsified before merging.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsify {
    /// Keep every element.
    Keep,
    /// Keep the max(1, ⌊density·n⌋) largest |τ| (TIES' trim).
    Magnitude { density: f64 },
    /// Model Breadcrumbs: drop the ⌊gamma·n⌋ largest |τ|, keep the next ⌊density·n⌋.
    Band { density: f64, gamma: f64 },
    /// DARE: keep each element with probability `density` (Philox draw).
    Random { density: f64, seed: u64, stream: u64 },
}

impl Sparsify {
    fn validate(&self, who: usize) -> Result<()> {
        let frac = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Value(format!("models[{who}].{name}: expected a fraction in [0, 1], got {v}")))
            }
        };
        match *self {
            Sparsify::Keep => Ok(()),
            Sparsify::Magnitude { density } | Sparsify::Random { density, .. } => frac("density", density),
            Sparsify::Band { density, gamma } => frac("density", density).and(frac("gamma", gamma)),
        }
    }

    /// The rank band [lo, hi) of |τ| kept out of `n`, when rank-based.
    pub fn rank_band(&self, n: usize) -> Option<(usize, usize)> {
        let floor = |f: f64| ((f * n as f64).floor() as usize).min(n);
        match *self {
            Sparsify::Keep | Sparsify::Random { .. } => None,
            Sparsify::Magnitude { density } if density >= 1.0 => Some((0, n)),
            Sparsify::Magnitude { density } if density <= 0.0 || n == 0 => Some((0, 0)),
            Sparsify::Magnitude { density } => Some((0, floor(density).max(1))),
            Sparsify::Band { density, .. } if density >= 1.0 => Some((0, n)),
            Sparsify::Band { density, gamma } => {
                let target = floor(density);
                let top = floor(gamma);
                let bottom = n.saturating_sub(target + top);
                Some((n - bottom - target, n - bottom))
            }
        }
    }
}

/// Selection and rescaling granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Ranks over the whole tensor (mergekit's semantics).
    Tensor,
    /// Ranks within each row of this length (the Breadcrumbs paper's code).
    Row(usize),
}

/// One fine-tuned model's term in the merge.
pub struct Term<'a, T> {
    pub values: &'a [T],
    pub weight: f32,
    pub sparsify: Sparsify,
}

#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// TIES sign election ("sum" consensus).
    pub consensus: bool,
    /// Divide by the sum of (joining) weights.
    pub normalize: bool,
    /// Rescale each sparsified delta to its original L1 norm (mergekit's `rescale`).
    pub rescale: bool,
    /// Final scale of the merged delta (mergekit's `lambda`).
    pub lambda: f32,
    pub granularity: Granularity,
    /// Refuse NaN/Inf in any input.
    pub check_finite: bool,
}

/// τ = x − base, rounded to the input dtype, as keys for selection.
struct DeltaKeys<'a, T> {
    base: &'a [T],
    x: &'a [T],
}

impl<T: Float> DeltaKeys<'_, T> {
    #[inline(always)]
    fn delta(&self, i: usize) -> T {
        T::from_f32(self.x[i].to_f32() - self.base[i].to_f32())
    }
}

impl<T: Float> Keys for DeltaKeys<'_, T> {
    fn len(&self) -> usize {
        self.x.len()
    }
    #[inline(always)]
    fn key(&self, i: usize) -> Option<u32> {
        self.delta(i).abs_key()
    }
}

/// The kept set of one delta over one selection unit (tensor or row).
#[derive(Clone, Copy)]
enum Keep {
    All,
    Band { hi: RankCut, lo: RankCut },
    Random { threshold: f32, seed: u64, stream: u64 },
}

impl Keep {
    fn for_unit<K: Keys + ?Sized>(s: &Sparsify, keys: &K, key_bits: u32) -> Result<Keep> {
        if let Sparsify::Random { density, seed, stream } = *s {
            if density >= 1.0 {
                return Ok(Keep::All);
            }
            return Ok(Keep::Random { threshold: density as f32, seed, stream });
        }
        match s.rank_band(keys.len()) {
            None => Ok(Keep::All),
            Some((0, hi)) if hi == keys.len() => Ok(Keep::All),
            Some((lo, hi)) => Ok(Keep::Band {
                hi: select::top_cut_keys(keys, hi, key_bits)?,
                lo: select::top_cut_keys(keys, lo, key_bits)?,
            }),
        }
    }

    fn for_row(s: &Sparsify, scratch: &mut [u32]) -> Keep {
        match s.rank_band(scratch.len()) {
            Some((lo, hi)) if !(lo == 0 && hi == scratch.len()) => Keep::Band {
                hi: select::row_cut(scratch, hi),
                lo: select::row_cut(scratch, lo),
            },
            _ => match *s {
                Sparsify::Random { density, seed, stream } if density < 1.0 => {
                    Keep::Random { threshold: density as f32, seed, stream }
                }
                _ => Keep::All,
            },
        }
    }
}

/// Streams keep/drop decisions over consecutive elements starting at `start`.
struct KeepCursor {
    keep: Keep,
    hi: CutWalker,
    lo: CutWalker,
    block: u64,
    draws: [u32; 4],
}

impl KeepCursor {
    fn new(keep: Keep, ties_before_hi: usize, ties_before_lo: usize) -> Self {
        let (hi, lo) = match keep {
            Keep::Band { hi, lo } => (hi, lo),
            _ => (RankCut::empty(), RankCut::empty()),
        };
        KeepCursor {
            keep,
            hi: CutWalker::new(hi, ties_before_hi),
            lo: CutWalker::new(lo, ties_before_lo),
            block: u64::MAX,
            draws: [0; 4],
        }
    }

    /// Whether element `i` (index within the tensor) with delta key `key` is kept.
    #[inline(always)]
    fn keep(&mut self, i: usize, key: u32) -> bool {
        match self.keep {
            Keep::All => true,
            Keep::Band { .. } => self.hi.take(key) && !self.lo.take(key),
            Keep::Random { threshold, seed, stream } => {
                let block = i as u64 / 4;
                if block != self.block {
                    self.block = block;
                    self.draws = philox::philox4x32_10(
                        [block as u32, (block >> 32) as u32, stream as u32, (stream >> 32) as u32],
                        [seed as u32, (seed >> 32) as u32],
                    );
                }
                philox::u32_to_uniform(self.draws[i % 4]) < threshold
            }
        }
    }
}

fn validate<T: Float>(base: &[T], terms: &[Term<'_, T>], p: &Params, out: &[T]) -> Result<()> {
    if terms.is_empty() {
        return Err(Error::Value("models: expected at least one fine-tuned model, got none".into()));
    }
    check_len("out", base.len(), out.len())?;
    for (m, t) in terms.iter().enumerate() {
        check_len(&format!("models[{m}]"), base.len(), t.values.len())?;
        t.sparsify.validate(m)?;
        if !t.weight.is_finite() {
            return Err(Error::Value(format!("models[{m}].weight: expected a finite number, got {}", t.weight)));
        }
    }
    if let Granularity::Row(r) = p.granularity {
        if r == 0 || base.len() % r != 0 {
            return Err(Error::Shape(format!("row length {r} does not divide the tensor's {} elements", base.len())));
        }
    }
    if p.check_finite {
        let inputs = std::iter::once(("base".to_string(), base))
            .chain(terms.iter().enumerate().map(|(m, t)| (format!("models[{m}]"), t.values)));
        for (name, xs) in inputs {
            let first_bad = xs
                .par_chunks(TIE_CHUNK)
                .enumerate()
                .filter_map(|(c, chunk)| chunk.iter().position(|v| !v.to_f32().is_finite()).map(|j| c * TIE_CHUNK + j))
                .min();
            if let Some(i) = first_bad {
                return Err(Error::Value(format!(
                    "{name}: non-finite value {} at flat index {i}",
                    xs[i].to_f32()
                )));
            }
        }
    }
    Ok(())
}

/// Combines the per-model contributions of one element into the output.
#[inline(always)]
fn combine(base: f32, v: &[f32], w: &[f32], p: &Params) -> f32 {
    let (mut mixed, mut divisor) = (0.0f32, 0.0f32);
    if p.consensus {
        // Sums start at +0.0 (not Sum's -0.0) so zero signs match the reference.
        let positive = v.iter().fold(0.0f32, |a, &b| a + b) >= 0.0;
        for (&vi, &wi) in v.iter().zip(w) {
            if (positive && vi > 0.0) || (!positive && vi < 0.0) {
                mixed += vi;
                divisor += wi;
            }
        }
        if divisor == 0.0 {
            divisor = 1.0;
        }
    } else {
        mixed = v.iter().fold(0.0f32, |a, &b| a + b);
        divisor = w.iter().fold(0.0f32, |a, &b| a + b);
        if divisor.abs() < 1e-8 {
            divisor = 1.0;
        }
    }
    if p.normalize {
        mixed /= divisor;
    }
    base + mixed * p.lambda
}

/// L1 rescale factor per model over `range`: Σ|τ| / Σ|kept τ| (1 when
/// either is tiny, as mergekit does).
fn rescale_factors<T: Float>(
    base: &[T],
    terms: &[Term<'_, T>],
    cursors: &mut [KeepCursor],
    range: std::ops::Range<usize>,
) -> Vec<(f64, f64)> {
    let mut sums = vec![(0.0f64, 0.0f64); terms.len()];
    for (m, t) in terms.iter().enumerate() {
        let dk = DeltaKeys { base, x: t.values };
        for i in range.clone() {
            let d = dk.delta(i);
            let a = d.to_f32().abs() as f64;
            sums[m].0 += a;
            if cursors[m].keep(i, d.abs_key().unwrap_or(0)) {
                sums[m].1 += a;
            }
        }
    }
    sums
}

fn factor((all, kept): (f64, f64)) -> f32 {
    if all < 1e-7 || kept < 1e-7 {
        1.0
    } else {
        (all / kept) as f32
    }
}

/// Writes `out[range]` given per-model cursors positioned at `range.start`
/// and per-model scale factors (weight × rescale).
fn write_range<T: Float>(
    base: &[T],
    terms: &[Term<'_, T>],
    cursors: &mut [KeepCursor],
    scales: &[f32],
    p: &Params,
    range: std::ops::Range<usize>,
    out: &mut [T],
) {
    let weights: Vec<f32> = terms.iter().map(|t| t.weight).collect();
    let mut v = vec![0.0f32; terms.len()];
    for (o, i) in out.iter_mut().zip(range) {
        let b = base[i].to_f32();
        for (m, t) in terms.iter().enumerate() {
            let d = T::from_f32(t.values[i].to_f32() - b);
            v[m] = if cursors[m].keep(i, d.abs_key().unwrap_or(0)) { scales[m] * d.to_f32() } else { 0.0 };
        }
        *o = T::from_f32(combine(b, &v, &weights, p));
    }
}

/// Merges one tensor: out = base + λ · combine_i(w_i · sparsify_i(x_i − base)).
pub fn merge_tensor<T: Float>(base: &[T], terms: &[Term<'_, T>], p: &Params, out: &mut [T]) -> Result<()> {
    validate(base, terms, p, out)?;
    match p.granularity {
        Granularity::Tensor => merge_whole(base, terms, p, out),
        Granularity::Row(row_len) => merge_rows(base, terms, p, row_len, out),
    }
}

fn merge_whole<T: Float>(base: &[T], terms: &[Term<'_, T>], p: &Params, out: &mut [T]) -> Result<()> {
    let mut keeps = Vec::with_capacity(terms.len());
    let mut ties = Vec::with_capacity(terms.len());
    for t in terms {
        let dk = DeltaKeys { base, x: t.values };
        let keep = Keep::for_unit(&t.sparsify, &dk, T::KEY_BITS)?;
        ties.push(match keep {
            Keep::Band { hi, lo } => (select::tie_offsets(&dk, hi), select::tie_offsets(&dk, lo)),
            _ => (Vec::new(), Vec::new()),
        });
        keeps.push(keep);
    }
    let cursors_at = |chunk: usize| -> Vec<KeepCursor> {
        keeps
            .iter()
            .zip(&ties)
            .map(|(&k, (h, l))| KeepCursor::new(k, h.get(chunk).copied().unwrap_or(0), l.get(chunk).copied().unwrap_or(0)))
            .collect()
    };
    let n = base.len();
    let chunk_range = |c: usize| c * TIE_CHUNK..((c + 1) * TIE_CHUNK).min(n);
    let mut scales: Vec<f32> = terms.iter().map(|t| t.weight).collect();
    if p.rescale {
        // Per-chunk sums added in chunk order: the same bits whatever the
        // thread count (a parallel reduce would reassociate).
        let per_chunk: Vec<Vec<(f64, f64)>> = (0..n.div_ceil(TIE_CHUNK))
            .into_par_iter()
            .map(|c| rescale_factors(base, terms, &mut cursors_at(c), chunk_range(c)))
            .collect();
        let sums = per_chunk.iter().fold(vec![(0.0, 0.0); terms.len()], |a, b| {
            a.iter().zip(b).map(|(x, y)| (x.0 + y.0, x.1 + y.1)).collect()
        });
        scales.iter_mut().zip(sums).for_each(|(s, f)| *s *= factor(f));
    }
    out.par_chunks_mut(TIE_CHUNK).enumerate().for_each(|(c, o)| {
        write_range(base, terms, &mut cursors_at(c), &scales, p, chunk_range(c), o);
    });
    Ok(())
}

fn merge_rows<T: Float>(base: &[T], terms: &[Term<'_, T>], p: &Params, row_len: usize, out: &mut [T]) -> Result<()> {
    out.par_chunks_mut(row_len).enumerate().for_each_init(
        || vec![0u32; row_len],
        |scratch, (r, o)| {
            let range = r * row_len..(r + 1) * row_len;
            let keeps: Vec<Keep> = terms
                .iter()
                .map(|t| {
                    let dk = DeltaKeys { base, x: t.values };
                    for (s, i) in scratch.iter_mut().zip(range.clone()) {
                        *s = dk.key(i).unwrap_or(0);
                    }
                    Keep::for_row(&t.sparsify, scratch)
                })
                .collect();
            let fresh = || keeps.iter().map(|&k| KeepCursor::new(k, 0, 0)).collect::<Vec<_>>();
            let mut scales: Vec<f32> = terms.iter().map(|t| t.weight).collect();
            if p.rescale {
                let sums = rescale_factors(base, terms, &mut fresh(), range.clone());
                scales.iter_mut().zip(sums).for_each(|(s, f)| *s *= factor(f));
            }
            write_range(base, terms, &mut fresh(), &scales, p, range, o);
        },
    );
    Ok(())
}
