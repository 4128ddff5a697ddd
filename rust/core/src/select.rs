//! Exact selection by magnitude without sorting or index arrays.
//!
//! Tie rule (shared by every ferrox sparsifier): elements are ranked by |x|
//! descending, rank 0 being the largest; among equal |x| the element with the
//! LOWER index ranks first. -0.0 and +0.0 are equal. A NaN is an error.
//!
//! |x| is compared through `Float::abs_key`, an integer with the same order,
//! so a threshold is found by radix histograms: one pass of 2^15 bins for
//! f16/bf16, two passes (high 15 bits, then low 16 bits) for f32. Memory is
//! one histogram per thread; time is O(n). Rows (Breadcrumbs' per-row bands)
//! use quickselect on an O(row) per-thread key buffer instead.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::Float;

/// Elements per parallel work unit: large enough to amortise a histogram
/// merge, small enough to balance 2..64 threads.
const CHUNK: usize = 1 << 18;

/// The top-`r` set of a slice: every element whose key is greater than `key`,
/// plus the first `ties` elements (in index order) whose key equals `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankCut {
    pub key: u32,
    pub ties: usize,
}

impl RankCut {
    /// Selects nothing (no key exceeds or equals u32::MAX: NaN keys are refused).
    pub fn empty() -> Self {
        RankCut { key: u32::MAX, ties: 0 }
    }
}

/// Walks the top-`r` membership of consecutive elements with the same cut.
#[derive(Clone, Copy)]
pub struct CutWalker {
    cut: RankCut,
    seen: usize,
}

impl CutWalker {
    /// `seen`: how many elements equal to the cut key came before this point.
    pub fn new(cut: RankCut, seen: usize) -> Self {
        CutWalker { cut, seen }
    }

    #[inline(always)]
    pub fn take(&mut self, key: u32) -> bool {
        if key > self.cut.key {
            true
        } else if key == self.cut.key {
            self.seen += 1;
            self.seen <= self.cut.ties
        } else {
            false
        }
    }
}

fn nan_at(i: usize) -> Error {
    Error::Value(format!("x contains NaN at index {i}"))
}

/// Anything that yields |x| keys by index: a slice of floats, or values
/// computed on the fly (a task vector's delta), so selection never needs the
/// values materialised.
pub trait Keys: Sync {
    fn len(&self) -> usize;
    /// The abs key of element `i`, `None` for NaN.
    fn key(&self, i: usize) -> Option<u32>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Float> Keys for [T] {
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
    #[inline(always)]
    fn key(&self, i: usize) -> Option<u32> {
        self[i].abs_key()
    }
}

fn chunks(n: usize) -> impl IndexedParallelIterator<Item = std::ops::Range<usize>> {
    (0..n.div_ceil(CHUNK)).into_par_iter().map(move |c| c * CHUNK..((c + 1) * CHUNK).min(n))
}

/// Histogram of `(key >> shift) & (bins-1)` over the keys whose `key >> 16`
/// equals `high` (when given). The first pass also refuses NaN.
fn histogram<K: Keys + ?Sized>(x: &K, shift: u32, bins: usize, high: Option<u32>) -> Result<Vec<u64>> {
    let mask = (bins - 1) as u32;
    chunks(x.len())
        .try_fold(
            || vec![0u64; bins],
            |mut h, range| {
                for i in range {
                    let key = x.key(i).ok_or_else(|| nan_at(i))?;
                    if high.map_or(true, |hb| key >> 16 == hb) {
                        h[((key >> shift) & mask) as usize] += 1;
                    }
                }
                Ok(h)
            },
        )
        .try_reduce(
            || vec![0u64; bins],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                Ok(a)
            },
        )
}

/// The bin holding the `r`-th largest element (r >= 1) and how many counted
/// elements lie in higher bins.
fn descend(hist: &[u64], r: u64) -> (u32, u64) {
    let mut above = 0u64;
    for (bin, &c) in hist.iter().enumerate().rev() {
        if above + c >= r {
            return (bin as u32, above);
        }
        above += c;
    }
    // Unreachable when r <= total; fall back to the smallest bin.
    (0, above)
}

/// The cut of the top-`r` set by |x| (0 <= r <= n).
pub fn top_cut<T: Float>(x: &[T], r: usize) -> Result<RankCut> {
    top_cut_keys(x, r, T::KEY_BITS)
}

/// `top_cut` over any key source whose keys have `key_bits` significant bits
/// (15 for f16/bf16: one histogram pass; 31 for f32: two).
pub fn top_cut_keys<K: Keys + ?Sized>(x: &K, r: usize, key_bits: u32) -> Result<RankCut> {
    top_cut_bits(x, r, key_bits)
}

fn top_cut_bits<K: Keys + ?Sized>(x: &K, r: usize, key_bits: u32) -> Result<RankCut> {
    if r > x.len() {
        return Err(Error::Value(format!("r: expected 0 <= r <= {}, got {r}", x.len())));
    }
    if r == 0 {
        // Still refuse NaN so that results never depend on r.
        histogram(x, 0, 2, None)?;
        return Ok(RankCut::empty());
    }
    let (key, above) = if key_bits <= 16 {
        let h = histogram(x, 0, 1 << key_bits, None)?;
        let (bin, above) = descend(&h, r as u64);
        (bin, above)
    } else {
        let hi = histogram(x, 16, 1 << 15, None)?;
        let (hbin, above_hi) = descend(&hi, r as u64);
        let lo = histogram(x, 0, 1 << 16, Some(hbin))?;
        let (lbin, above_lo) = descend(&lo, r as u64 - above_hi);
        ((hbin << 16) | lbin, above_hi + above_lo)
    };
    Ok(RankCut { key, ties: r - above as usize })
}

/// |x| of the k-th largest element by magnitude (k is 1-based).
pub fn kth_largest_abs<T: Float>(x: &[T], k: usize) -> Result<T> {
    if k == 0 || k > x.len() {
        return Err(Error::Value(format!("k: expected 1 <= k <= {}, got {k}", x.len())));
    }
    Ok(T::from_abs_key(top_cut(x, k)?.key))
}

fn check_band(lo: usize, hi: usize, len: usize) -> Result<()> {
    if lo > hi || hi > len {
        return Err(Error::Value(format!(
            "band [lo, hi) = [{lo}, {hi}): expected 0 <= lo <= hi <= {len} (the row length)"
        )));
    }
    Ok(())
}

/// How many keys equal `cut.key` come before each chunk: the tie ordinal
/// each chunk starts at (all zeros when no partial tie needs counting).
pub fn tie_offsets<K: Keys + ?Sized>(x: &K, cut: RankCut) -> Vec<usize> {
    let n_chunks = x.len().div_ceil(CHUNK);
    if cut.ties == 0 {
        return vec![0; n_chunks];
    }
    let counts: Vec<usize> = chunks(x.len())
        .map(|range| range.filter(|&i| x.key(i) == Some(cut.key)).count())
        .collect();
    counts
        .iter()
        .scan(0usize, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect()
}

/// The chunk size that `tie_offsets` counts in.
pub const TIE_CHUNK: usize = CHUNK;

/// out[i] = 1 iff rank(x[i]) is in [lo, hi) over the whole slice.
pub fn band_mask<T: Float>(x: &[T], lo: usize, hi: usize, out: &mut [u8]) -> Result<()> {
    check_len("out", x.len(), out.len())?;
    check_band(lo, hi, x.len())?;
    let cut_hi = top_cut(x, hi)?;
    let cut_lo = top_cut(x, lo)?;
    let start_hi = tie_offsets(x, cut_hi);
    let start_lo = tie_offsets(x, cut_lo);
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(ci, (o, c))| {
            let mut in_hi = CutWalker::new(cut_hi, start_hi[ci]);
            let mut in_lo = CutWalker::new(cut_lo, start_lo[ci]);
            for (m, v) in o.iter_mut().zip(c) {
                // NaN was refused by top_cut, so every key exists.
                let key = v.abs_key().unwrap_or(0);
                *m = (in_hi.take(key) && !in_lo.take(key)) as u8;
            }
        });
    Ok(())
}

/// The cut of the top-`r` set of one row, from its keys (reordered in place).
pub fn row_cut(keys: &mut [u32], r: usize) -> RankCut {
    if r == 0 {
        return RankCut::empty();
    }
    let n = keys.len();
    let (_, &mut key, _) = keys.select_nth_unstable(n - r);
    let above = keys.iter().filter(|&&k| k > key).count();
    RankCut { key, ties: r - above }
}

/// Per-row band masks: each row of `row_len` elements is ranked on its own.
pub fn band_mask_rows<T: Float>(x: &[T], row_len: usize, lo: usize, hi: usize, out: &mut [u8]) -> Result<()> {
    check_len("out", x.len(), out.len())?;
    if row_len == 0 || x.len() % row_len != 0 {
        return Err(Error::Shape(format!(
            "row_len: {row_len} does not divide the {} elements of x",
            x.len()
        )));
    }
    check_band(lo, hi, row_len)?;
    out.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .enumerate()
        .try_for_each_init(
            || Vec::with_capacity(row_len),
            |keys: &mut Vec<u32>, (ri, (o, row))| {
                keys.clear();
                for (j, v) in row.iter().enumerate() {
                    keys.push(v.abs_key().ok_or_else(|| nan_at(ri * row_len + j))?);
                }
                let cut_hi = row_cut(keys, hi);
                let cut_lo = row_cut(keys, lo);
                let (mut in_hi, mut in_lo) = (CutWalker::new(cut_hi, 0), CutWalker::new(cut_lo, 0));
                for (m, v) in o.iter_mut().zip(row) {
                    let key = v.abs_key().unwrap_or(0);
                    *m = (in_hi.take(key) && !in_lo.take(key)) as u8;
                }
                Ok(())
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn normal_ish(&mut self) -> f32 {
            (0..4).map(|_| (self.next() % 2001) as f32 / 1000.0 - 1.0).sum::<f32>() * 3.0
        }
    }

    fn random<T: Float>(n: usize, seed: u64, tie_heavy: bool) -> Vec<T> {
        let mut g = XorShift(seed * 2 + 1);
        let levels = [0.0f32, -0.0, 1.0, -1.0, 0.5, -2.0, 2.0];
        (0..n)
            .map(|_| {
                let v = if tie_heavy { levels[(g.next() % 7) as usize] } else { g.normal_ish() };
                T::from_f32(v)
            })
            .collect()
    }

    /// Ranks by (|x| desc, index asc) through a stable sort.
    fn reference_ranks<T: Float>(x: &[T]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[b].to_f32().abs().partial_cmp(&x[a].to_f32().abs()).unwrap());
        let mut rank = vec![0; x.len()];
        for (r, &i) in idx.iter().enumerate() {
            rank[i] = r;
        }
        rank
    }

    fn check_all<T: Float>(n: usize, seed: u64, tie_heavy: bool) {
        let x: Vec<T> = random(n, seed, tie_heavy);
        let ranks = reference_ranks(&x);
        let mut sorted: Vec<f32> = x.iter().map(|v| v.to_f32().abs()).collect();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for k in [1, 2, n / 3, n / 2, n.saturating_sub(1), n].into_iter().filter(|&k| k >= 1 && k <= n) {
            assert_eq!(kth_largest_abs(&x, k).unwrap().to_f32(), sorted[k - 1], "k={k} n={n}");
        }
        let mut out = vec![0u8; n];
        for (lo, hi) in [(0, 0), (0, n), (n / 4, n / 2), (1.min(n), n.min(5)), (n / 3, n / 3)] {
            band_mask(&x, lo, hi, &mut out).unwrap();
            for i in 0..n {
                assert_eq!(out[i] == 1, ranks[i] >= lo && ranks[i] < hi, "i={i} lo={lo} hi={hi}");
            }
        }
    }

    #[test]
    fn whole_slice_matches_reference() {
        for n in [0usize, 1, 2, 3, 17, 1000] {
            for seed in 0..3 {
                for tie in [false, true] {
                    check_all::<f32>(n, seed, tie);
                    check_all::<bf16>(n, seed, tie);
                    check_all::<f16>(n, seed, tie);
                }
            }
        }
    }

    #[test]
    fn crosses_chunk_boundaries() {
        check_all::<bf16>(3 * CHUNK + 7, 9, true);
        check_all::<f32>(2 * CHUNK + 3, 5, false);
    }

    #[test]
    fn rows_match_reference() {
        for row_len in [1usize, 2, 5, 64, 333] {
            for tie in [false, true] {
                let x: Vec<bf16> = random(row_len * 7, row_len as u64, tie);
                for (lo, hi) in [(0, 0), (0, row_len), (row_len / 4, row_len / 2 + 1), (0, 1)] {
                    let hi = hi.min(row_len);
                    let lo = lo.min(hi);
                    let mut out = vec![0u8; x.len()];
                    band_mask_rows(&x, row_len, lo, hi, &mut out).unwrap();
                    for (r, row) in x.chunks(row_len).enumerate() {
                        let ranks = reference_ranks(row);
                        for j in 0..row_len {
                            assert_eq!(out[r * row_len + j] == 1, ranks[j] >= lo && ranks[j] < hi);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f32_second_radix_pass() {
        // Keys share their high 16 bits and differ in the low ones.
        let x: Vec<f32> = (0..5000u32).map(|i| f32::from_bits(0x3f80_0000 + i) * if i % 2 == 0 { -1.0 } else { 1.0 }).collect();
        for k in [1, 2, 2500, 4999, 5000] {
            assert_eq!(kth_largest_abs(&x, k).unwrap().to_bits(), 0x3f80_0000 + 5000 - k as u32);
        }
    }

    #[test]
    fn errors() {
        let x = [1.0f32, f32::NAN, 2.0];
        assert!(matches!(kth_largest_abs(&x, 1), Err(Error::Value(m)) if m.contains("NaN at index 1")));
        let mut out = [0u8; 3];
        assert!(band_mask(&x, 0, 1, &mut out).is_err());
        assert!(band_mask_rows(&x, 3, 0, 1, &mut out).is_err());
        let y = [1.0f32; 4];
        assert!(kth_largest_abs(&y, 0).is_err());
        assert!(kth_largest_abs(&y, 5).is_err());
        assert!(matches!(band_mask(&y, 3, 2, &mut [0u8; 4]), Err(Error::Value(_))));
        assert!(matches!(band_mask(&y, 0, 2, &mut [0u8; 3]), Err(Error::Shape(_))));
        assert!(matches!(band_mask_rows(&y, 3, 0, 1, &mut [0u8; 4]), Err(Error::Shape(_))));
    }

    #[test]
    #[ignore]
    fn bench_kth_64m() {
        let x: Vec<f32> = random(64 << 20, 1, false);
        let t = std::time::Instant::now();
        let v = kth_largest_abs(&x, (64 << 20) / 10).unwrap();
        println!("kth_largest_abs 64M f32: {:?} -> {v}", t.elapsed());
    }
}
