//! Slerp and Model Stock of one tensor, fused and streamed: the inputs are
//! read in their own dtype, chunk by chunk (see `source`), in two passes.
//!
//! Pass 1 takes every reduction the method needs in one read: the Gram
//! matrix (all norms² and pairwise dots) of its vectors, per row or over the
//! whole tensor. Slerp's vectors are the two inputs; Model Stock's the task
//! vectors τ_i = x_i − base, rounded to f32 as the torch reference rounds
//! them. Products are exact in f64 and summed in f64: per `BLOCK` of a row in
//! `LANES` interleaved sums, the lanes and then the blocks added in index
//! order, so the result is the same bits for every thread count and chunk
//! length. Pass 2 writes the combination straight into the output dtype,
//! with the torch reference's f32 operations in its order (two products and
//! a sum; Model Stock's average summed from +0 then divided by k), so where
//! the coefficients agree the outputs agree bit for bit.
//!
//! A NaN or inf in any input makes a diagonal entry of the Gram matrix
//! non-finite (squares of finite f32 never overflow f64); the merge then
//! writes nothing and says so, and the caller takes the reference path
//! (which names the culprit or merges non-finite values as it always did).

use std::ops::Range;

use rayon::prelude::*;

use super::source::{Chunk, Inputs, Output};
use crate::error::{Error, Result};
use crate::simd::multiversion;
use crate::Float;

/// Elements per partial sum within a row.
pub const BLOCK: usize = 1 << 13;
const LANES: usize = 8;

/// Which interpolation, with its scalar parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Interp {
    /// From the base (t = 0) to models[0] (t = 1) along the great circle of
    /// their directions; a lerp when |cos θ| > `dot_threshold`; norms ≤ `eps`
    /// count as 1.
    Slerp { t: f32, dot_threshold: f32, eps: f32 },
    /// Model Stock: t = k·c / (1 + (k − 1)·c), c the mean pairwise cosine of
    /// the task vectors; out = t·mean(models) + (1 − t)·base, and the base
    /// where |1 + (k − 1)·c| < 1e-6.
    ModelStock,
}

/// What one interpolation did.
#[derive(Clone, Debug, PartialEq)]
pub struct InterpStats {
    /// Output elements that differ from the base (after rounding it to the output dtype).
    pub changed: u64,
    /// An input (or a task vector) held NaN or inf: nothing was written.
    pub nonfinite: bool,
    /// Per row, the two f32 coefficients of pass 2: slerp's (c_base,
    /// c_model), Model Stock's (t, 1 − t) of (average, base).
    pub coefficients: Vec<[f32; 2]>,
}

impl Interp {
    /// Vectors in the Gram matrix for `models` fine-tuned inputs.
    fn vectors(&self, models: usize) -> usize {
        match self {
            Interp::Slerp { .. } => 2,
            Interp::ModelStock => models,
        }
    }

    fn task_vectors(&self) -> bool {
        matches!(self, Interp::ModelStock)
    }

    fn validate(&self, models: usize) -> Result<()> {
        match *self {
            Interp::Slerp { t, dot_threshold, eps } => {
                if models != 1 {
                    return Err(Error::Value(format!("slerp: expected the base and 1 other model, got {models} others")));
                }
                for (name, v) in [("t", t), ("dot_threshold", dot_threshold), ("eps", eps)] {
                    if !v.is_finite() {
                        return Err(Error::Value(format!("slerp: {name} must be finite, got {v}")));
                    }
                }
                Ok(())
            }
            Interp::ModelStock if models < 2 => {
                Err(Error::Value(format!("model_stock: expected at least 2 models besides the base, got {models}")))
            }
            Interp::ModelStock => Ok(()),
        }
    }

    /// Pass 2's coefficients of one row from its Gram entries (`tri` order).
    pub fn coefficients(&self, gram: &[f64], m: usize) -> [f32; 2] {
        match *self {
            Interp::Slerp { t, dot_threshold, eps } => {
                let norm = |ss: f64| {
                    let v = ss.sqrt();
                    if v > eps as f64 { v } else { 1.0 }
                };
                let dot = (gram[tri(0, 1, m)] / (norm(gram[tri(0, 0, m)]) * norm(gram[tri(1, 1, m)]))).clamp(-1.0, 1.0);
                // The reference decides on its f32 cosine.
                if (dot as f32).abs() > dot_threshold {
                    return [1.0 - t, t];
                }
                let theta = dot.acos();
                let sin = theta.sin();
                let u = (1.0 - t) as f64; // the reference's f32 1 − t
                [((u * theta).sin() / sin) as f32, ((t as f64 * theta).sin() / sin) as f32]
            }
            Interp::ModelStock => {
                let (mut sum, mut pairs) = (0.0f64, 0usize);
                for i in 0..m {
                    for j in i + 1..m {
                        let norms = gram[tri(i, i, m)].sqrt() * gram[tri(j, j, m)].sqrt();
                        sum += (gram[tri(i, j, m)] / norms.max(1e-6)).clamp(-1.0, 1.0);
                        pairs += 1;
                    }
                }
                let cos = sum / pairs as f64;
                let k = m as f64;
                let denom = 1.0 + (k - 1.0) * cos;
                let t = if denom.abs() < 1e-6 { 0.0 } else { (k * cos / denom) as f32 };
                [t, 1.0 - t]
            }
        }
    }
}

/// Index of Gram entry (i, j), i ≤ j, in the upper triangle stored row by row.
#[inline(always)]
fn tri(i: usize, j: usize, m: usize) -> usize {
    i * m - i * (i + 1) / 2 + j
}

/// The vectors' lanes at `at..at + LANES` (the slices' lengths are multiples of LANES).
#[inline(always)]
fn load_lanes<T: Float>(base: &[T], models: &[&[T]], task: bool, at: usize, v: &mut [[f32; LANES]]) {
    let b = &base[at..at + LANES];
    if task {
        for (vi, x) in v.iter_mut().zip(models) {
            let x = &x[at..at + LANES];
            for l in 0..LANES {
                vi[l] = x[l].to_f32() - b[l].to_f32();
            }
        }
    } else {
        for l in 0..LANES {
            v[0][l] = b[l].to_f32();
        }
        for (vi, x) in v[1..].iter_mut().zip(models) {
            let x = &x[at..at + LANES];
            for l in 0..LANES {
                vi[l] = x[l].to_f32();
            }
        }
    }
}

#[inline(always)]
fn accumulate<T: Float>(base: &[T], models: &[&[T]], task: bool, v: &mut [[f32; LANES]], acc: &mut [[f64; LANES]]) {
    let m = v.len();
    for at in (0..base.len()).step_by(LANES) {
        load_lanes(base, models, task, at, v);
        let mut q = 0;
        for i in 0..m {
            for j in i..m {
                let (a, b, s) = (&v[i], &v[j], &mut acc[q]);
                for l in 0..LANES {
                    s[l] += a[l] as f64 * b[l] as f64;
                }
                q += 1;
            }
        }
    }
}

multiversion! {
    /// The Gram matrix (upper triangle, `tri` order) of one block.
    fn block_gram<T: Float>(base: &[T], models: &[&[T]], task: bool, m: usize) -> Vec<f64> {
        let n = base.len();
        let mut acc = vec![[0f64; LANES]; m * (m + 1) / 2];
        let mut v = vec![[0f32; LANES]; m];
        let full = n - n % LANES;
        let heads: Vec<&[T]> = models.iter().map(|x| &x[..full]).collect();
        accumulate(&base[..full], &heads, task, &mut v, &mut acc);
        if full < n {
            // The tail padded with zeros: zero vectors add nothing.
            let pad = |x: &[T]| {
                let mut p = [T::from_f32(0.0); LANES];
                p[..n - full].copy_from_slice(&x[full..]);
                p
            };
            let tails: Vec<[T; LANES]> = models.iter().map(|x| pad(x)).collect();
            let tail_refs: Vec<&[T]> = tails.iter().map(|x| &x[..]).collect();
            accumulate(&pad(base), &tail_refs, task, &mut v, &mut acc);
        }
        acc.iter().map(|lanes| lanes.iter().fold(0.0, |s, x| s + x)).collect()
    }
}

/// Chunks of the tensor: whole rows when they fit in `chunk_len`, else
/// pieces of one row whose lengths are multiples of BLOCK (so blocks never
/// straddle a chunk and the sums do not depend on the chunking).
fn plan_chunks(n: usize, row_len: usize, chunk_len: usize) -> Vec<Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let chunk_len = chunk_len.max(1);
    if row_len >= chunk_len {
        let step = chunk_len.next_multiple_of(BLOCK);
        (0..n / row_len)
            .flat_map(|r| (0..row_len).step_by(step).map(move |s| r * row_len + s..r * row_len + (s + step).min(row_len)))
            .collect()
    } else {
        let step = (chunk_len / row_len) * row_len;
        (0..n).step_by(step).map(|s| s..(s + step).min(n)).collect()
    }
}

/// The (row, range) blocks of a chunk: split at row starts and at every
/// BLOCK from a row's start.
fn blocks(chunk: &Range<usize>, row_len: usize) -> Vec<(usize, Range<usize>)> {
    let mut out = Vec::new();
    let mut at = chunk.start;
    while at < chunk.end {
        let row = at / row_len;
        let row_start = row * row_len;
        let next = row_start + ((at - row_start) / BLOCK + 1) * BLOCK;
        let end = next.min(row_start + row_len).min(chunk.end);
        out.push((row, at..end));
        at = end;
    }
    out
}

multiversion! {
    /// Pass 2 over one block: the combination in f32, rounded once to `O`;
    /// returns how many elements differ from the base.
    fn combine_block<T: Float, O: Float>(how: &Interp, c: [f32; 2], base: &[T], models: &[&[T]], out: &mut [O]) -> u64 {
        let differs = |b: &T, v: f32, o: &mut O| {
            *o = O::from_f32(v);
            u64::from(O::round_f32(b.to_f32()) != o.to_f32())
        };
        match how {
            Interp::Slerp { .. } => {
                let x = models[0];
                out.iter_mut().zip(base).zip(x).map(|((o, b), x)| differs(b, c[0] * b.to_f32() + c[1] * x.to_f32(), o)).sum()
            }
            Interp::ModelStock => {
                let mut avg = vec![0.0f32; base.len()];
                for x in models {
                    avg.iter_mut().zip(x.iter()).for_each(|(s, v)| *s += v.to_f32());
                }
                let k = models.len() as f32;
                out.iter_mut()
                    .zip(base)
                    .zip(avg)
                    .map(|((o, b), s)| differs(b, c[0] * (s / k) + c[1] * b.to_f32(), o))
                    .sum()
            }
        }
    }
}

/// Pass 1 over one loaded chunk: adds each block's Gram entries to its row's.
fn add_gram<T: Float>(c: &Chunk<'_, T>, range: &Range<usize>, row_len: usize, how: &Interp, m: usize, gram: &mut [f64]) {
    let p = m * (m + 1) / 2;
    let tasks = blocks(range, row_len);
    let partials: Vec<Vec<f64>> = tasks
        .par_iter()
        .map(|(_, r)| {
            let local = r.start - range.start..r.end - range.start;
            let models: Vec<&[T]> = c.models.iter().map(|x| &x[local.clone()]).collect();
            block_gram(&c.base[local], &models, how.task_vectors(), m)
        })
        .collect();
    for ((row, _), part) in tasks.iter().zip(partials) {
        gram[row * p..(row + 1) * p].iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
}

/// Pass 2 over one loaded chunk: writes and commits its output; returns how
/// many elements differ from the base.
fn combine_chunk<T: Float, O: Float>(
    c: &Chunk<'_, T>, range: &Range<usize>, row_len: usize, how: &Interp, coefficients: &[[f32; 2]], out: &mut dyn Output<O>,
) -> Result<u64> {
    let tasks = blocks(range, row_len);
    let mut rest = out.buffer(range.clone());
    let mut pieces = Vec::with_capacity(tasks.len());
    for (_, r) in &tasks {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
        pieces.push(piece);
        rest = tail;
    }
    let changed = tasks
        .par_iter()
        .zip(pieces)
        .map(|((row, r), o)| {
            let local = r.start - range.start..r.end - range.start;
            let models: Vec<&[T]> = c.models.iter().map(|x| &x[local.clone()]).collect();
            combine_block(how, coefficients[*row], &c.base[local], &models, o)
        })
        .sum::<u64>();
    out.commit(range.clone())?;
    Ok(changed)
}

/// Interpolates one tensor from `inputs` (its base and fine-tuned models, in
/// the compute dtype `T`) into `out` (in the output dtype `O`), `chunk_len`
/// elements at a time. `row_len` 0 takes one set of coefficients for the
/// whole tensor; otherwise one per row of that length.
pub fn interpolate<T: Float, O: Float>(
    inputs: &mut dyn Inputs<T>,
    how: Interp,
    row_len: usize,
    out: &mut dyn Output<O>,
    chunk_len: usize,
) -> Result<InterpStats> {
    let n = inputs.len();
    how.validate(inputs.models())?;
    if !inputs.has_base() {
        return Err(Error::Value("interpolation: expected a base model".into()));
    }
    let row_len = if row_len == 0 { n } else { row_len };
    if n > 0 && n % row_len != 0 {
        return Err(Error::Shape(format!("row length {row_len} does not divide the tensor's {n} elements")));
    }
    let rows = if n == 0 { usize::from(row_len == 0) } else { n / row_len };
    let m = how.vectors(inputs.models());
    let p = m * (m + 1) / 2;
    let chunks = plan_chunks(n, row_len, chunk_len);
    let mut gram = vec![0f64; rows * p];
    let coefficients = |gram: &[f64]| -> Option<Vec<[f32; 2]>> {
        let diagonal_finite = gram.chunks(p.max(1)).all(|g| (0..m).all(|i| g[tri(i, i, m)].is_finite()));
        diagonal_finite.then(|| gram.chunks(p.max(1)).take(rows).map(|g| how.coefficients(g, m)).collect())
    };
    let nonfinite = || InterpStats { changed: 0, nonfinite: true, coefficients: Vec::new() };
    if let [range] = &chunks[..] {
        // One chunk (most tensors): both passes over the same loaded inputs.
        let c = inputs.load(range.clone())?;
        add_gram(&c, range, row_len, &how, m, &mut gram);
        let Some(coefficients) = coefficients(&gram) else { return Ok(nonfinite()) };
        let changed = combine_chunk(&c, range, row_len, &how, &coefficients, out)?;
        return Ok(InterpStats { changed, nonfinite: false, coefficients });
    }
    for range in &chunks {
        let c = inputs.load(range.clone())?;
        add_gram(&c, range, row_len, &how, m, &mut gram);
    }
    let Some(coefficients) = coefficients(&gram) else { return Ok(nonfinite()) };
    let mut changed = 0;
    for range in &chunks {
        let c = inputs.load(range.clone())?;
        changed += combine_chunk(&c, range, row_len, &how, &coefficients, out)?;
    }
    Ok(InterpStats { changed, nonfinite: false, coefficients })
}

#[cfg(test)]
mod tests;
