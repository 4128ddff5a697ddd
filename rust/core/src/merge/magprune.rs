//! DELLA (Deep, Lu et al. 2024): generalized task arithmetic whose sparsifier
//! is MagPrune. Within each row, the delta τ = x − base (rounded to the input
//! dtype, as the rest of the core) with the r-th smallest |τ| of n is kept
//! with probability
//!
//! ```text
//! p_r = (density − ε) + 2ε · (r − 1) / (n − 1)     (n = 1: density − ε)
//! ```
//!
//! computed in f64, ties in |τ| ranked by index (a stable sort). Element i of
//! model m is kept when the Philox uniform of (seed, stream m, element i) is
//! below its p: the masks depend on the element alone, never on threads.
//! Kept deltas are rescaled by Σ|τ| / Σ|kept τ| over the whole tensor
//! (mergekit's rule, not 1/p), weighted, sign-elected (TIES "sum", della) or
//! summed (della_linear), normalised and scaled by λ in the fused write pass
//! shared with the other sparsifiers (`block::write_span`).
//!
//! Two passes: rows are ranked (sort of (|τ| key << 32 | index)) and their
//! keep bits and L1 sums found, in parallel over groups of whole rows whose
//! bits fill whole u64 words; then the merged values are written from the
//! inputs and the bits. Sums are kept per group and added in group order, and
//! groups depend on the row length only, so the output is bitwise the same
//! for every thread count.

use rayon::prelude::*;

use super::block::{self, Mask};
use super::{rescale_factor, MergeStats, Params, UNIT};
use crate::error::{check_len, Error, Result};
use crate::philox;
use crate::Float;

/// One fine-tuned model's term of a DELLA merge.
pub struct DellaTerm<'a, T> {
    pub values: &'a [T],
    pub weight: f32,
    /// Mean kept fraction (≥ 1: keep all, no draws; ≤ 0: drop all).
    pub density: f64,
    /// Spread of the keep probabilities around `density`.
    pub epsilon: f64,
}

/// Elements a pass-1 work unit aims for (whole rows, whole words).
const GROUP_TARGET: usize = 1 << 14;
/// Philox blocks computed side by side.
const LANES: usize = 16;

/// Rows per group: enough that a group's bits are whole u64 words and it
/// holds about `GROUP_TARGET` elements.
fn rows_per_group(row_len: usize) -> usize {
    let whole_words = 64 / gcd(row_len, 64);
    let span = whole_words * row_len;
    whole_words * GROUP_TARGET.div_ceil(span).max(1)
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn check_fraction(m: usize, name: &str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::Value(format!("models[{m}].{name}: expected a fraction in [0, 1], got {v}")))
    }
}

fn check_rows(n: usize, row_len: usize) -> Result<()> {
    if row_len == 0 || n % row_len != 0 {
        return Err(Error::Shape(format!("row length {row_len} does not divide the tensor's {n} elements")));
    }
    if row_len > u32::MAX as usize {
        return Err(Error::Shape(format!("row length {row_len}: rows of at most 2^32 - 1 elements are ranked")));
    }
    Ok(())
}

/// Per-worker scratch: one row's sort keys and Philox draws.
#[derive(Default)]
struct Scratch {
    keys: Vec<u64>,
    draws: Vec<u32>,
}

/// MagPrune of one row (tensor elements `start .. start + x.len()`):
/// `emit(j, rank, keep)` for every element j of the row, rank 0 = smallest
/// |τ|. Needs 0 < density < 1.
#[allow(clippy::too_many_arguments)]
fn row_keep<T: Float>(
    base: &[T],
    x: &[T],
    start: usize,
    density: f64,
    epsilon: f64,
    seed: u64,
    stream: u64,
    s: &mut Scratch,
    mut emit: impl FnMut(usize, usize, bool),
) {
    let n = x.len();
    s.keys.clear();
    s.keys.extend(x.iter().zip(base).enumerate().map(|(j, (x, b))| {
        let key = T::key_of_f32(T::round_f32(x.to_f32() - b.to_f32()));
        ((key as u64) << 32) | j as u64
    }));
    // Keys are distinct (the index is in the low bits): unstable is stable here.
    s.keys.sort_unstable();
    // Element e's draw is lane e % 4 of Philox block e / 4.
    let first = start / 4;
    let blocks = (start + n).div_ceil(4) - first;
    s.draws.resize(blocks.next_multiple_of(LANES) * 4, 0);
    for (g, out) in s.draws.chunks_exact_mut(LANES * 4).enumerate() {
        philox::philox_blocks::<LANES>(seed, stream, (first + g * LANES) as u64, out);
    }
    let draws = &s.draws[start - first * 4..];
    let lo = density - epsilon;
    let step = 2.0 * epsilon;
    let denom = n.saturating_sub(1).max(1) as f64;
    for (rank, &k) in s.keys.iter().enumerate() {
        let j = k as u32 as usize;
        let p = if n > 1 { lo + step * (rank as f64 / denom) } else { lo };
        emit(j, rank, (philox::u32_to_uniform(draws[j]) as f64) < p);
    }
}

fn sampled(density: f64) -> bool {
    density > 0.0 && density < 1.0
}

/// One model's MagPrune keep mask (1 kept) and, if asked, each element's
/// 0-based rank of |τ| within its row: the masks `merge_della` uses for model
/// `stream` with this `seed`, for tests and inspection.
#[allow(clippy::too_many_arguments)]
pub fn magprune_keep<T: Float>(
    base: &[T],
    x: &[T],
    row_len: usize,
    density: f64,
    epsilon: f64,
    seed: u64,
    stream: u64,
    keep: &mut [u8],
    ranks: Option<&mut [u32]>,
) -> Result<()> {
    let n = base.len();
    check_len("model", n, x.len())?;
    check_len("keep", n, keep.len())?;
    if let Some(r) = ranks.as_deref() {
        check_len("ranks", n, r.len())?;
    }
    check_fraction(0, "density", density)?;
    check_fraction(0, "epsilon", epsilon)?;
    if n == 0 {
        return Ok(());
    }
    check_rows(n, row_len)?;
    if !sampled(density) {
        keep.fill((density >= 1.0) as u8);
        if ranks.is_none() {
            return Ok(());
        }
    }
    let ranks_rows: Vec<Option<&mut [u32]>> = match ranks {
        Some(r) => r.chunks_mut(row_len).map(Some).collect(),
        None => (0..n / row_len).map(|_| None).collect(),
    };
    keep.par_chunks_mut(row_len).zip(ranks_rows).enumerate().for_each_init(Scratch::default, |s, (r, (k, mut rk))| {
        let span = r * row_len..(r + 1) * row_len;
        row_keep(&base[span.clone()], &x[span.clone()], span.start, density, epsilon, seed, stream, s, |j, rank, kept| {
            if sampled(density) {
                k[j] = kept as u8;
            }
            if let Some(rk) = rk.as_deref_mut() {
                rk[j] = rank as u32;
            }
        })
    });
    Ok(())
}

/// DELLA merge of one tensor held in memory: out = base + λ · combine_m(w_m ·
/// MagPrune_m(x_m − base)), rows of `row_len` elements (`Granularity::Row`;
/// `Tensor`: the whole tensor is one row). Model m draws from Philox stream
/// m of `seed`. On error `out` may be partly written.
pub fn merge_della<T: Float>(
    base: &[T],
    terms: &[DellaTerm<'_, T>],
    seed: u64,
    p: &Params,
    out: &mut [T],
) -> Result<MergeStats> {
    let n = base.len();
    check_len("out", n, out.len())?;
    if terms.is_empty() {
        return Err(Error::Value("models: expected at least one fine-tuned model, got none".into()));
    }
    for (m, t) in terms.iter().enumerate() {
        check_len(&format!("models[{m}]"), n, t.values.len())?;
        check_fraction(m, "density", t.density)?;
        check_fraction(m, "epsilon", t.epsilon)?;
        if !t.weight.is_finite() {
            return Err(Error::Value(format!("models[{m}].weight: expected a finite number, got {}", t.weight)));
        }
    }
    if n == 0 {
        return Ok(MergeStats::default());
    }
    let row_len = match p.granularity {
        super::Granularity::Tensor => n,
        super::Granularity::Row(r) => r,
    };
    check_rows(n, row_len)?;

    // Pass 1: keep bits (one u64 word per 64 elements, per model) and L1 sums.
    let group = rows_per_group(row_len) * row_len;
    let words_per_group = group / 64;
    let mut bits: Vec<Vec<u64>> = terms.iter().map(|_| vec![0u64; n.div_ceil(64)]).collect();
    let groups = n.div_ceil(group);
    let mut per_group: Vec<Vec<&mut [u64]>> = (0..groups).map(|_| Vec::with_capacity(terms.len())).collect();
    for words in bits.iter_mut() {
        for (g, w) in words.chunks_mut(words_per_group).enumerate() {
            per_group[g].push(w);
        }
    }
    let sums: Vec<Vec<(f64, f64)>> = per_group
        .into_par_iter()
        .enumerate()
        .map_init(Scratch::default, |s, (g, mut words)| {
            let span = g * group..((g + 1) * group).min(n);
            let base = &base[span.clone()];
            terms
                .iter()
                .zip(words.iter_mut())
                .enumerate()
                .map(|(m, (t, w))| {
                    if !sampled(t.density) {
                        return (0.0, 0.0); // all kept or all dropped: no rescale
                    }
                    let x = &t.values[span.clone()];
                    for (r, (b, x)) in base.chunks(row_len).zip(x.chunks(row_len)).enumerate() {
                        let at = r * row_len;
                        row_keep(b, x, span.start + at, t.density, t.epsilon, seed, m as u64, s, |j, _, kept| {
                            let i = at + j;
                            w[i >> 6] |= (kept as u64) << (i & 63);
                        });
                    }
                    match p.rescale {
                        true => block::l1_sums(base, x, span.start, Mask::Bits { words: w, first: span.start }),
                        false => (0.0, 0.0),
                    }
                })
                .collect()
        })
        .collect();
    let weights: Vec<f32> = terms.iter().map(|t| t.weight).collect();
    let mut scales = weights.clone();
    if p.rescale {
        for (m, s) in scales.iter_mut().enumerate() {
            if sampled(terms[m].density) {
                // Group sums added in group order: the same bits for any thread count.
                let total = sums.iter().fold((0.0f64, 0.0f64), |a, g| (a.0 + g[m].0, a.1 + g[m].1));
                *s *= rescale_factor(total);
            }
        }
    }

    // Pass 2: the fused combine, from the inputs and the bits.
    let masks: Vec<Mask<'_>> = terms
        .iter()
        .zip(&bits)
        .map(|(t, w)| if t.density >= 1.0 { Mask::All } else { Mask::Bits { words: w, first: 0 } })
        .collect();
    let changed = out
        .par_chunks_mut(UNIT)
        .enumerate()
        .map(|(u, o)| -> Result<u64> {
            let span = u * UNIT..u * UNIT + o.len();
            let xs: Vec<&[T]> = terms.iter().map(|t| &t.values[span.clone()]).collect();
            let b = &base[span.clone()];
            block::write_span(b, &xs, b, span.start, &mut masks.clone(), &scales, &weights, p, o)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .sum::<Result<u64>>()?;
    Ok(MergeStats { changed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Granularity;
    use half::bf16;

    fn params(consensus: bool, row_len: usize) -> Params {
        Params {
            consensus,
            normalize: true,
            rescale: true,
            lambda: 1.0,
            granularity: Granularity::Row(row_len),
            check_finite: true,
        }
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn groups_hold_whole_words() {
        for row_len in [1, 3, 64, 100, 1000, 1024, 2816, 40000] {
            let g = rows_per_group(row_len) * row_len;
            assert_eq!(g % 64, 0, "{row_len}");
            assert!(g >= GROUP_TARGET.min(row_len * 64), "{row_len}");
        }
    }

    #[test]
    fn ranks_are_stable_and_keep_is_the_draw_below_p() {
        let mut st = 7;
        // Quantised values: many ties in |τ|, ranked by index.
        let base: Vec<f32> = (0..3 * 50).map(|_| (lcg(&mut st) * 4.0).round() / 4.0).collect();
        let x: Vec<f32> = base.iter().map(|&b| b + (lcg(&mut st) * 3.0).round() / 8.0).collect();
        let (mut keep, mut ranks) = (vec![0u8; base.len()], vec![0u32; base.len()]);
        magprune_keep(&base, &x, 50, 0.5, 0.3, 9, 2, &mut keep, Some(&mut ranks)).unwrap();
        let mut draws = vec![0f32; base.len()];
        philox::fill_uniform(9, 2, 0, &mut draws);
        for r in 0..3 {
            let row = r * 50..(r + 1) * 50;
            let mut order: Vec<usize> = row.clone().collect();
            order.sort_by(|&a, &b| (x[a] - base[a]).abs().total_cmp(&(x[b] - base[b]).abs()).then(a.cmp(&b)));
            for (rank, &i) in order.iter().enumerate() {
                assert_eq!(ranks[i] as usize, rank);
                let p = 0.2 + 0.6 * (rank as f64 / 49.0);
                assert_eq!(keep[i], ((draws[i] as f64) < p) as u8, "element {i}");
            }
        }
    }

    #[test]
    fn merge_matches_a_naive_reference_for_any_threads() {
        let (rows, row_len) = (37, 77);
        let n = rows * row_len;
        let mut st = 3;
        let base: Vec<bf16> = (0..n).map(|_| bf16::from_f32(lcg(&mut st))).collect();
        let xs: Vec<Vec<bf16>> =
            (0..3).map(|_| base.iter().map(|&b| bf16::from_f32(b.to_f32() + 0.1 * lcg(&mut st))).collect()).collect();
        let (w, d, e) = ([0.7f32, -0.4, 1.1], [0.5, 0.3, 1.0], [0.2, 0.1, 0.1]);
        let terms: Vec<DellaTerm<'_, bf16>> =
            (0..3).map(|m| DellaTerm { values: &xs[m], weight: w[m], density: d[m], epsilon: e[m] }).collect();
        for consensus in [true, false] {
            let p = params(consensus, row_len);
            let mut outs = Vec::new();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut out = vec![bf16::ZERO; n];
                pool.install(|| merge_della(&base, &terms, 5, &p, &mut out)).unwrap();
                outs.push(out);
            }
            assert!(outs[0].iter().zip(&outs[1]).all(|(a, b)| a.to_bits() == b.to_bits()));
            // Reference: the same masks, then mergekit's arithmetic in f64.
            let mut v = vec![vec![0f64; n]; 3];
            for m in 0..3 {
                let mut keep = vec![0u8; n];
                magprune_keep(&base, &xs[m], row_len, d[m], e[m], 5, m as u64, &mut keep, None).unwrap();
                let tau: Vec<f64> = (0..n).map(|i| bf16::from_f32(xs[m][i].to_f32() - base[i].to_f32()).to_f64()).collect();
                let all: f64 = tau.iter().map(|t| t.abs()).sum();
                let kept: f64 = (0..n).map(|i| tau[i].abs() * keep[i] as f64).sum();
                let f = if d[m] < 1.0 { all / kept } else { 1.0 };
                (0..n).for_each(|i| v[m][i] = w[m] as f64 * f * tau[i] * keep[i] as f64);
            }
            for i in 0..n {
                let sum: f64 = (0..3).map(|m| v[m][i]).sum();
                let (mixed, div) = if consensus {
                    let join: Vec<usize> =
                        (0..3).filter(|&m| (v[m][i] > 0.0 && sum >= 0.0) || (v[m][i] < 0.0 && sum < 0.0)).collect();
                    let div: f64 = join.iter().map(|&m| w[m] as f64).sum();
                    (join.iter().map(|&m| v[m][i]).sum::<f64>(), if div == 0.0 { 1.0 } else { div })
                } else {
                    (sum, w.iter().map(|&w| w as f64).sum())
                };
                let want = base[i].to_f64() + mixed / div;
                let got = outs[0][i].to_f64();
                // f32 arithmetic rounded once to bf16: within one bf16 ulp of the f64 value.
                // (plus f32 round-off of the terms where the sum cancels).
                let ulp = (want.abs().max(1e-30)).log2().floor().exp2() / 128.0;
                let slack = 1e-6 * (base[i].to_f64().abs() + (0..3).map(|m| v[m][i].abs()).sum::<f64>());
                assert!((got - want).abs() <= ulp + slack, "element {i}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn one_element_rows_empty_tensors_and_errors() {
        let base = [0.0f32; 4];
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let mut out = [0.0f32; 4];
        let terms = [DellaTerm { values: &x[..], weight: 1.0, density: 0.5, epsilon: 0.1 }];
        merge_della(&base, &terms, 1, &params(false, 1), &mut out).unwrap();
        let (mut keep, mut ranks) = ([0u8; 4], [9u32; 4]);
        magprune_keep(&base, &x, 1, 0.5, 0.1, 1, 0, &mut keep, Some(&mut ranks)).unwrap();
        assert_eq!(ranks, [0; 4]);
        let mut draws = [0f32; 4];
        philox::fill_uniform(1, 0, 0, &mut draws);
        for i in 0..4 {
            assert_eq!(keep[i], (draws[i] < 0.4) as u8);
        }
        let empty: [DellaTerm<'_, f32>; 1] = [DellaTerm { values: &[], weight: 1.0, density: 0.5, epsilon: 0.1 }];
        assert_eq!(merge_della(&[], &empty, 1, &params(true, 0), &mut []).unwrap().changed, 0);
        let bad = [DellaTerm { values: &x[..], weight: 1.0, density: 1.5, epsilon: 0.1 }];
        let err = merge_della(&base, &bad, 1, &params(true, 4), &mut out).unwrap_err().to_string();
        assert!(err.contains("models[0].density"), "{err}");
        let err = merge_della(&base, &terms, 1, &params(true, 3), &mut out).unwrap_err().to_string();
        assert!(err.contains("row length 3"), "{err}");
    }
}
