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
//!
//! Streaming: a merge reads its inputs chunk by chunk through [`Inputs`]
//! (slices, or positioned reads from safetensors files) and writes through
//! [`Output`], so memory is O(chunk × inputs). Whole-tensor selection is
//! exact across chunks: radix histograms are summed over every chunk, and
//! the tie ordinal at each `UNIT` boundary is counted before the write pass.
//! Rescale sums and tie ordinals are kept per `UNIT` and combined in index
//! order, so the output is bitwise the same for every chunk length and
//! thread count.


mod block;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod finite;
pub mod interp;
mod magprune;
mod source;

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::select::{self, Cut, CutHistograms, Keys, RankCut, Rule};
use crate::simd::multiversion;
use crate::Float;
use block::Mask;

pub use magprune::{magprune_keep, merge_della, DellaTerm};
pub use source::{Chunk, FileInputs, FileOutput, FileTensor, Inputs, Output, SliceInputs, SliceOutput};

/// Elements per parallel work unit of a whole-tensor merge; rescale sums and
/// tie ordinals are kept per unit, so chunks are whole units.
pub const UNIT: usize = 1 << 16;
/// Default elements per streamed chunk.
pub const DEFAULT_CHUNK: usize = 1 << 22;


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
#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub weight: f32,
    pub sparsify: Sparsify,
}

/// One fine-tuned model's values and term, for merges of slices.
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

/// What a merge did, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStats {
    /// Output elements that differ from the base (from the first model when
    /// there is no base).
    pub changed: u64,
}

/// Merges one tensor held in memory: out = base + λ · combine_i(w_i ·
/// sparsify_i(x_i − base)). On error `out` may be partly written.
pub fn merge_tensor<T: Float>(base: &[T], terms: &[Term<'_, T>], p: &Params, out: &mut [T]) -> Result<MergeStats> {
    merge_tensor_chunked(base, terms, p, out, DEFAULT_CHUNK)
}

/// `merge_tensor` streaming `chunk_len` elements at a time (the result does
/// not depend on it).
pub fn merge_tensor_chunked<T: Float>(
    base: &[T],
    terms: &[Term<'_, T>],
    p: &Params,
    out: &mut [T],
    chunk_len: usize,
) -> Result<MergeStats> {
    check_len("out", base.len(), out.len())?;
    for (m, t) in terms.iter().enumerate() {
        check_len(&format!("models[{m}]"), base.len(), t.values.len())?;
    }
    let mut inputs = SliceInputs { base, models: terms.iter().map(|t| t.values).collect(), has_base: true };
    let models: Vec<Model> = terms.iter().map(|t| Model { weight: t.weight, sparsify: t.sparsify }).collect();
    merge_stream(&mut inputs, &models, p, &mut SliceOutput(out), chunk_len)
}

/// Merges one tensor read through `inputs` into `out`, `chunk_len` elements
/// at a time (rounded up to whole units, or whole rows).
pub fn merge_stream<T: Float>(
    inputs: &mut dyn Inputs<T>,
    models: &[Model],
    p: &Params,
    out: &mut dyn Output<T>,
    chunk_len: usize,
) -> Result<MergeStats> {
    validate(models, inputs.models(), inputs.len(), p)?;
    match p.granularity {
        Granularity::Tensor => merge_whole(inputs, models, p, out, chunk_len.max(1).next_multiple_of(UNIT)),
        Granularity::Row(row_len) => merge_rows(inputs, models, p, out, row_len, (chunk_len / row_len).max(1)),
    }
}

fn validate(models: &[Model], count: usize, n: usize, p: &Params) -> Result<()> {
    if models.is_empty() {
        return Err(Error::Value("models: expected at least one fine-tuned model, got none".into()));
    }
    if models.len() != count {
        return Err(Error::Shape(format!("models: {} terms for {count} input models", models.len())));
    }
    for (m, t) in models.iter().enumerate() {
        t.sparsify.validate(m)?;
        if !t.weight.is_finite() {
            return Err(Error::Value(format!("models[{m}].weight: expected a finite number, got {}", t.weight)));
        }
    }
    if let Granularity::Row(r) = p.granularity {
        if r == 0 || n % r != 0 {
            return Err(Error::Shape(format!("row length {r} does not divide the tensor's {n} elements")));
        }
    }
    Ok(())
}

fn chunks(n: usize, chunk_len: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(chunk_len.max(1)).map(move |s| s..(s + chunk_len).min(n))
}

/// τ = x − base, rounded to the input dtype, as keys for selection.
struct DeltaKeys<'a, T> {
    base: &'a [T],
    x: &'a [T],
}

impl<T: Float> Keys for DeltaKeys<'_, T> {
    fn len(&self) -> usize {
        self.x.len()
    }
    #[inline(always)]
    fn key(&self, i: usize) -> Option<u32> {
        let k = T::key_of_f32(T::round_f32(self.x[i].to_f32() - self.base[i].to_f32()));
        (k <= T::key_of_f32(f32::INFINITY)).then_some(k)
    }
    fn for_each_block(&self, range: Range<usize>, mut f: impl FnMut(&[u32])) -> std::result::Result<(), usize> {
        const KEYS: usize = 512;
        let inf = T::key_of_f32(f32::INFINITY);
        let mut buf = [0u32; KEYS];
        for s in range.clone().step_by(KEYS) {
            let e = (s + KEYS).min(range.end);
            let keys = &mut buf[..e - s];
            if delta_keys(&self.x[s..e], &self.base[s..e], keys) {
                return Err(s + keys.iter().position(|&k| k > inf).unwrap_or(0));
            }
            f(keys);
        }
        Ok(())
    }
}

multiversion! {
    /// keys[j] = key of round(x[j] − base[j]); true if one is NaN.
    fn delta_keys<T: Float>(x: &[T], base: &[T], keys: &mut [u32]) -> bool {
        let inf = T::key_of_f32(f32::INFINITY);
        let mut nan = false;
        for ((k, x), b) in keys.iter_mut().zip(x).zip(base) {
            *k = T::key_of_f32(T::round_f32(x.to_f32() - b.to_f32()));
            nan |= *k > inf;
        }
        nan
    }
}

/// The error for a NaN delta of model `m` at chunk index `i`: with the
/// finite check on, the first NaN/Inf input of the chunk is named instead.
fn nan_error<T: Float>(c: &Chunk<'_, T>, p: &Params, m: usize, start: usize, i: usize) -> Error {
    if p.check_finite {
        if let Err(e) = check_finite(c, start) {
            return e;
        }
    }
    nan_delta_error(m, start + i)
}

/// The error for a NaN/Inf input (`input`: "base" or "models[i]") at a flat
/// index: one message for the CPU and the CUDA merge.
pub(crate) fn nonfinite_error(input: &str, value: f32, index: usize) -> Error {
    Error::Value(format!("{input}: non-finite value {value} at flat index {index}"))
}

/// The error for a NaN delta of model `m` (inputs not checked for NaN/Inf):
/// one message for the CPU and the CUDA merge.
pub(crate) fn nan_delta_error(m: usize, index: usize) -> Error {
    Error::Value(format!("models[{m}]: the delta from the base is NaN at flat index {index}"))
}

/// Refuses NaN/Inf in a chunk, naming the lowest flat index holding one and
/// the first input (base, models[0], ...) holding it there, whatever the
/// scheduling: the same choice as the write pass makes. (The write pass
/// checks as it converts; this names the culprit when a selection pass meets
/// a NaN delta first.)
fn check_finite<T: Float>(c: &Chunk<'_, T>, start: usize) -> Result<()> {
    let inputs: Vec<(String, &[T])> = std::iter::once(("base".to_string(), c.base))
        .chain(c.models.iter().enumerate().map(|(m, x)| (format!("models[{m}]"), *x)))
        .collect();
    let first_bad = |xs: &[T]| {
        xs.par_chunks(UNIT)
            .enumerate()
            .filter_map(|(u, chunk)| {
                let bad = chunk.iter().fold(false, |acc, v| acc | !v.to_f32().is_finite());
                bad.then(|| u * UNIT + chunk.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0))
            })
            .min()
    };
    // min_by_key keeps the first input among equal indices.
    let worst = inputs.iter().filter_map(|(name, xs)| first_bad(xs).map(|i| (i, name, xs[i]))).min_by_key(|t| t.0);
    match worst {
        Some((i, name, v)) => Err(nonfinite_error(name, v.to_f32(), start + i)),
        None => Ok(()),
    }
}

/// The rank band of a model whose mask depends on ranks over the tensor.
fn tensor_band(s: &Sparsify, n: usize) -> Option<(usize, usize)> {
    s.rank_band(n).filter(|&(lo, hi)| !(lo == 0 && hi == n))
}

/// A model's whole-tensor cuts [lo, hi] and the tie ordinal at the start of
/// every unit (missing entries: every taken tie is already behind).
struct TensorCuts {
    cuts: [Cut; 2],
    starts: [Vec<usize>; 2],
}

impl TensorCuts {
    fn mask(&self, unit: usize) -> Mask<'static> {
        let rule = |j: usize| {
            let c = self.cuts[j];
            // A cut whose ordinals do not matter starts its walker at 0 (see
            // `select::band_keys`).
            let seen = if c.partial() { self.starts[j].get(unit).copied().unwrap_or(c.cut.ties) } else { 0 };
            Rule::new(c.cut, seen, c.partial())
        };
        Mask::Band { lo: rule(0), hi: rule(1) }
    }
}

fn simple_mask(s: &Sparsify) -> Mask<'static> {
    match *s {
        Sparsify::Random { density, seed, stream } if density < 1.0 => {
            Mask::Random { threshold: density as f32, seed, stream }
        }
        _ => Mask::All,
    }
}

/// Radix histograms of every rank-masked model's deltas, summed over chunks.
fn tensor_cuts<T: Float>(
    inputs: &mut dyn Inputs<T>,
    models: &[Model],
    p: &Params,
    chunk_len: usize,
) -> Result<Vec<Option<TensorCuts>>> {
    let n = inputs.len();
    let mut hists: Vec<Option<CutHistograms>> = models
        .iter()
        .map(|m| tensor_band(&m.sparsify, n).map(|(lo, hi)| CutHistograms::new(&[lo, hi], T::KEY_BITS)))
        .collect();
    let any = hists.iter().any(Option::is_some);
    if any {
        for range in chunks(n, chunk_len) {
            let c = inputs.load(range.clone())?;
            for (m, h) in hists.iter_mut().enumerate() {
                if let Some(h) = h {
                    h.count_high(&DeltaKeys { base: c.base, x: c.models[m] })
                        .map_err(|i| nan_error(&c, p, m, range.start, i))?;
                }
            }
        }
    }
    if any && T::KEY_BITS > 15 {
        for range in chunks(n, chunk_len) {
            let c = inputs.load(range)?;
            for (m, h) in hists.iter_mut().enumerate() {
                if let Some(h) = h {
                    h.count_low(&DeltaKeys { base: c.base, x: c.models[m] });
                }
            }
        }
    }
    let mut cuts: Vec<Option<TensorCuts>> = hists
        .iter()
        .map(|h| {
            h.as_ref().map(|h| {
                let c = h.cuts();
                TensorCuts { cuts: [c[0], c[1]], starts: [Vec::new(), Vec::new()] }
            })
        })
        .collect();
    count_tie_starts(inputs, &mut cuts, chunk_len)?;
    Ok(cuts)
}

/// For each partial cut, the tie ordinal at every unit start, counted in
/// index order until every taken tie is behind (later units need no count).
fn count_tie_starts<T: Float>(
    inputs: &mut dyn Inputs<T>,
    cuts: &mut [Option<TensorCuts>],
    chunk_len: usize,
) -> Result<()> {
    // (model, which cut, ties seen so far)
    let mut pending: Vec<(usize, usize, usize)> = cuts
        .iter()
        .enumerate()
        .filter_map(|(m, c)| c.as_ref().map(|c| (m, c)))
        .flat_map(|(m, c)| (0..2).filter(move |&j| c.cuts[j].partial()).map(move |j| (m, j, 0)))
        .collect();
    for range in chunks(inputs.len(), chunk_len) {
        if pending.is_empty() {
            break;
        }
        let c = inputs.load(range)?;
        for (m, j, seen) in pending.iter_mut() {
            let tc = cuts[*m].as_mut().expect("pending models have cuts");
            let key = tc.cuts[*j].cut.key;
            let keys = DeltaKeys { base: c.base, x: c.models[*m] };
            let counts: Vec<usize> = (0..keys.len().div_ceil(UNIT))
                .into_par_iter()
                .map(|u| {
                    let mut count = 0;
                    // NaN was refused when the cuts were found.
                    let _ = keys.for_each_block(u * UNIT..((u + 1) * UNIT).min(keys.len()), |ks| {
                        count += ks.iter().filter(|&&k| k == key).count()
                    });
                    count
                })
                .collect();
            for count in counts {
                tc.starts[*j].push(*seen);
                *seen += count;
            }
        }
        pending.retain(|&(m, j, seen)| seen < cuts[m].as_ref().map_or(0, |c| c.cuts[j].cut.ties));
    }
    Ok(())
}

/// mergekit's rescale factor Σ|τ| / Σ|kept τ| (1 when either is tiny).
fn rescale_factor((all, kept): (f64, f64)) -> f32 {
    if all < 1e-7 || kept < 1e-7 {
        1.0
    } else {
        (all / kept) as f32
    }
}

fn merge_whole<T: Float>(
    inputs: &mut dyn Inputs<T>,
    models: &[Model],
    p: &Params,
    out: &mut dyn Output<T>,
    chunk_len: usize,
) -> Result<MergeStats> {
    let n = inputs.len();
    let cuts = tensor_cuts(inputs, models, p, chunk_len)?;
    let masks_at = |unit: usize| -> Vec<Mask<'static>> {
        models.iter().zip(&cuts).map(|(m, c)| c.as_ref().map_or_else(|| simple_mask(&m.sparsify), |c| c.mask(unit))).collect()
    };
    let weights: Vec<f32> = models.iter().map(|m| m.weight).collect();
    let mut scales = weights.clone();
    if p.rescale {
        let sparse: Vec<bool> = models.iter().map(|m| m.sparsify != Sparsify::Keep).collect();
        let mut sums = vec![(0.0f64, 0.0f64); models.len()];
        if sparse.iter().any(|&s| s) {
            for range in chunks(n, chunk_len) {
                let c = inputs.load(range.clone())?;
                let first_unit = range.start / UNIT;
                let per_unit: Vec<Vec<(f64, f64)>> = (0..range.len().div_ceil(UNIT))
                    .into_par_iter()
                    .map(|u| {
                        let span = u * UNIT..((u + 1) * UNIT).min(range.len());
                        let masks = masks_at(first_unit + u);
                        (0..models.len())
                            .map(|m| match sparse[m] {
                                true => block::l1_sums(&c.base[span.clone()], &c.models[m][span.clone()], range.start + span.start, masks[m]),
                                false => (0.0, 0.0),
                            })
                            .collect()
                    })
                    .collect();
                // Unit sums added in index order: the same bits for every chunk length.
                for unit in per_unit {
                    sums.iter_mut().zip(unit).for_each(|(s, u)| *s = (s.0 + u.0, s.1 + u.1));
                }
            }
        }
        scales.iter_mut().zip(sums).for_each(|(s, f)| *s *= rescale_factor(f));
    }
    let has_base = inputs.has_base();
    let mut changed = 0;
    for range in chunks(n, chunk_len) {
        let c = inputs.load(range.clone())?;
        let reference = if has_base { c.base } else { c.models[0] };
        let first_unit = range.start / UNIT;
        let o = out.buffer(range.clone());
        changed += o
            .par_chunks_mut(UNIT)
            .enumerate()
            .map(|(u, o)| -> Result<u64> {
                let span = u * UNIT..u * UNIT + o.len();
                let models: Vec<&[T]> = c.models.iter().map(|x| &x[span.clone()]).collect();
                block::write_span(
                    &c.base[span.clone()],
                    &models,
                    &reference[span.clone()],
                    range.start + span.start,
                    &mut masks_at(first_unit + u),
                    &scales,
                    &weights,
                    p,
                    o,
                )
            })
            .collect::<Vec<_>>()
            .into_iter()
            .sum::<Result<u64>>()?;
        out.commit(range)?;
    }
    Ok(MergeStats { changed })
}

/// The mask of one model over one row, from the row's delta keys.
fn row_mask<T: Float>(s: &Sparsify, base: &[T], x: &[T], keys: &mut Vec<u32>) -> std::result::Result<Mask<'static>, usize> {
    let row_len = x.len();
    let Some((lo, hi)) = tensor_band(s, row_len) else {
        return Ok(simple_mask(s));
    };
    keys.clear();
    DeltaKeys { base, x }.for_each_block(0..row_len, |ks| keys.extend_from_slice(ks))?;
    let (cut_lo, cut_hi) = select::row_band_cuts(keys, lo, hi);
    let rule = |cut: RankCut| {
        let equal = keys.iter().filter(|&&k| k == cut.key).count();
        Rule::new(cut, 0, Cut { cut, equal }.partial())
    };
    Ok(Mask::Band { lo: rule(cut_lo), hi: rule(cut_hi) })
}

fn merge_rows<T: Float>(
    inputs: &mut dyn Inputs<T>,
    models: &[Model],
    p: &Params,
    out: &mut dyn Output<T>,
    row_len: usize,
    rows_per_chunk: usize,
) -> Result<MergeStats> {
    let weights: Vec<f32> = models.iter().map(|m| m.weight).collect();
    let has_base = inputs.has_base();
    let mut changed = 0;
    for range in chunks(inputs.len(), rows_per_chunk * row_len) {
        let c = inputs.load(range.clone())?;
        let reference = if has_base { c.base } else { c.models[0] };
        let o = out.buffer(range.clone());
        // Per-row results kept in order, so the error reported is the first row's.
        let rows: Vec<Result<u64>> = o
            .par_chunks_mut(row_len)
            .enumerate()
            .map_init(Vec::new, |keys, (r, o)| {
                let span = r * row_len..(r + 1) * row_len;
                let start = range.start + span.start;
                let base = &c.base[span.clone()];
                let xs: Vec<&[T]> = c.models.iter().map(|x| &x[span.clone()]).collect();
                let mut masks = Vec::with_capacity(models.len());
                for (m, (model, x)) in models.iter().zip(&xs).enumerate() {
                    masks.push(row_mask(&model.sparsify, base, x, keys).map_err(|i| nan_error(&c, p, m, range.start, span.start + i))?);
                }
                let mut scales = weights.clone();
                if p.rescale {
                    for (m, (s, x)) in scales.iter_mut().zip(&xs).enumerate() {
                        if models[m].sparsify != Sparsify::Keep {
                            *s *= rescale_factor(block::l1_sums(base, x, start, masks[m]));
                        }
                    }
                }
                block::write_span(base, &xs, &reference[span], start, &mut masks, &scales, &weights, p, o)
            })
            .collect();
        for r in rows {
            changed += r?;
        }
        out.commit(range)?;
    }
    Ok(MergeStats { changed })
}

#[cfg(test)]
mod tests;
