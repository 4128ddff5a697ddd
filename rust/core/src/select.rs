//! Exact selection by magnitude without sorting or index arrays.
//!
//! Tie rule (shared by every ferrox sparsifier): elements are ranked by |x|
//! descending, rank 0 being the largest; among equal |x| the element with the
//! LOWER index ranks first (is kept first). -0.0 and +0.0 are equal. A NaN
//! anywhere is an error naming its (first) index.
//!
//! |x| is compared through `Float::abs_key`, an integer with the same order,
//! so the top-`r` set is described by a [`RankCut`]: a key and how many of the
//! elements equal to it (in index order) belong to the set.
//!
//! Whole slices find the cut by radix histograms: one pass of 2^15 bins for
//! f16/bf16, two for f32 (the high 15 bits of the key, then the low 16 bits
//! of the keys inside the chosen high bin). Memory is one histogram per
//! worker, time O(n). Slices below `SMALL` elements and rows (Breadcrumbs'
//! per-row bands) copy their keys into an O(row) buffer and quickselect.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::Float;

/// Elements per parallel work unit: large enough to amortise a histogram
/// merge, small enough to balance 2..64 threads.
const CHUNK: usize = 1 << 18;

/// Below this many keys, copying them and quickselecting beats zeroing and
/// merging per-worker radix histograms.
const SMALL: usize = 1 << 15;

/// Bins of the first radix pass: a whole 15-bit key, or f32's key >> 16.
const HIGH_BINS: usize = 1 << 15;
/// Bins of f32's second radix pass: the low 16 bits of the key.
const LOW_BINS: usize = 1 << 16;

/// The cut that defines the top-`r` set of a slice: every element with key >
/// `key`, plus the first `ties` elements (in index order) whose key == `key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankCut {
    pub key: u32,
    pub ties: usize,
}

impl RankCut {
    /// Selects nothing: no key exceeds u32::MAX, and no tie is taken.
    pub fn empty() -> Self {
        RankCut { key: u32::MAX, ties: 0 }
    }
}

/// Decides top-`r` membership of consecutive elements under one cut.
#[derive(Clone, Copy)]
pub struct CutWalker {
    cut: RankCut,
    seen: usize,
}

impl CutWalker {
    /// `seen`: how many elements with the cut key come before this point.
    pub fn new(cut: RankCut, seen: usize) -> Self {
        CutWalker { cut, seen }
    }

    /// Membership of the next element. Must see every element in order, so
    /// that `seen` is the tie ordinal of each key equal to the cut.
    #[inline(always)]
    pub fn take(&mut self, key: u32) -> bool {
        let tie = key == self.cut.key;
        // Bitwise, not short-circuit: bands are often unpredictable per element.
        let taken = (key > self.cut.key) | (tie & (self.seen < self.cut.ties));
        self.seen += tie as usize;
        taken
    }
}

/// Keys handed over at once by `Keys::for_each_block`: a stack buffer small
/// enough for L1, long enough for vectorised scans over it.
const BLOCK: usize = 512;

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
    /// Hands the keys of `range` to `f` in index order, in blocks of `BLOCK`
    /// (the last may be shorter); stops with `Err(i)` at a NaN at index i.
    /// Slices override it with a bounds-check-free, vectorisable fill.
    fn for_each_block(&self, range: Range<usize>, mut f: impl FnMut(&[u32])) -> std::result::Result<(), usize> {
        let mut buf = [0u32; BLOCK];
        for start in range.clone().step_by(BLOCK) {
            let keys = &mut buf[..BLOCK.min(range.end - start)];
            for (i, k) in (start..).zip(keys.iter_mut()) {
                *k = self.key(i).ok_or(i)?;
            }
            f(keys);
        }
        Ok(())
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
    fn for_each_block(&self, range: Range<usize>, mut f: impl FnMut(&[u32])) -> std::result::Result<(), usize> {
        let mut buf = [0u32; BLOCK];
        for (start, xs) in range.clone().step_by(BLOCK).zip(self[range].chunks(BLOCK)) {
            let keys = &mut buf[..xs.len()];
            // No early exit inside the block, so the fill vectorises.
            let mut nan = false;
            for (k, v) in keys.iter_mut().zip(xs) {
                let key = v.abs_key();
                nan |= key.is_none();
                *k = key.unwrap_or(0);
            }
            if nan {
                return Err(start + xs.iter().position(|v| v.abs_key().is_none()).unwrap_or(0));
            }
            f(keys);
        }
        Ok(())
    }
}

fn nan_at(i: usize) -> Error {
    Error::Value(format!("x contains NaN at index {i}"))
}

/// The index of the first NaN, for a NaN found somewhere by a parallel pass:
/// rescans so the message does not depend on scheduling.
fn first_nan_index<K: Keys + ?Sized>(x: &K) -> usize {
    (0..x.len()).into_par_iter().position_first(|i| x.key(i).is_none()).unwrap_or(0)
}

fn first_nan<K: Keys + ?Sized>(x: &K) -> Error {
    nan_at(first_nan_index(x))
}

fn check_rank(name: &str, r: usize, lo: usize, hi: usize) -> Result<()> {
    if (lo..=hi).contains(&r) {
        Ok(())
    } else {
        Err(Error::Value(format!("{name}: expected {lo} <= {name} <= {hi}, got {r}")))
    }
}

fn check_band(lo: usize, hi: usize, row_len: usize) -> Result<()> {
    if hi > row_len {
        return Err(Error::Value(format!(
            "hi: expected 0 <= hi <= {row_len} (the row length), got {hi}"
        )));
    }
    check_rank("lo", lo, 0, hi)
}

fn par_ranges(n: usize) -> impl IndexedParallelIterator<Item = Range<usize>> {
    (0..n.div_ceil(CHUNK)).into_par_iter().map(move |c| c * CHUNK..((c + 1) * CHUNK).min(n))
}

/// A cut plus the number of keys equal to its key, which says whether the
/// tie ordinals matter at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub cut: RankCut,
    pub equal: usize,
}

impl Cut {
    pub const EMPTY: Cut = Cut { cut: RankCut { key: u32::MAX, ties: 0 }, equal: 0 };

    /// Some but not all elements equal to the cut key are taken, so each
    /// one's membership depends on how many came before it.
    pub fn partial(&self) -> bool {
        self.cut.ties > 0 && self.cut.ties < self.equal
    }
}

/// Cuts for several ranks at once (each 0 <= r <= n), sharing the passes.
fn cuts<K: Keys + ?Sized, const M: usize>(x: &K, rs: [usize; M], key_bits: u32) -> Result<[Cut; M]> {
    if x.len() < SMALL {
        small_cuts(x, rs)
    } else {
        radix_cuts(x, rs, key_bits)
    }
}

fn small_cuts<K: Keys + ?Sized, const M: usize>(x: &K, rs: [usize; M]) -> Result<[Cut; M]> {
    let mut keys = Vec::with_capacity(x.len());
    x.for_each_block(0..x.len(), |ks| keys.extend_from_slice(ks)).map_err(nan_at)?;
    Ok(rs.map(|r| {
        let cut = row_cut(&mut keys, r);
        let equal = keys.iter().filter(|&&k| k == cut.key).count();
        Cut { cut, equal }
    }))
}

fn zeroed<const B: usize>() -> Box<[u64; B]> {
    vec![0u64; B].into_boxed_slice().try_into().expect("length is B")
}

fn add<const B: usize>(mut a: Box<[u64; B]>, b: &[u64; B]) -> Box<[u64; B]> {
    a.iter_mut().zip(b.iter()).for_each(|(a, b)| *a += b);
    a
}

/// Counts of `(key >> shift) & (HIGH_BINS - 1)`; `Err(i)` for a NaN at
/// index i (the first one, whatever the scheduling). The mask keeps the hot
/// loop free of bounds checks (keys fit: 15 bits, or 31 >> 16).
fn high_histogram<K: Keys + ?Sized>(x: &K, shift: u32) -> std::result::Result<Box<[u64; HIGH_BINS]>, usize> {
    par_ranges(x.len())
        .try_fold(zeroed, |mut h, range| {
            x.for_each_block(range, |keys| {
                for &k in keys {
                    h[(k >> shift) as usize & (HIGH_BINS - 1)] += 1;
                }
            })?;
            Ok(h)
        })
        .try_reduce(zeroed, |a, b| Ok(add(a, &b)))
        .map_err(|_: usize| first_nan_index(x))
}

/// For each `highs[m]`, counts of the low 16 bits of the keys whose high half
/// equals it. Runs after `high_histogram` refused NaN.
fn low_histograms<K: Keys + ?Sized>(x: &K, highs: &[u32]) -> Vec<Box<[u64; LOW_BINS]>> {
    let fresh = || highs.iter().map(|_| zeroed()).collect::<Vec<_>>();
    par_ranges(x.len())
        .fold(fresh, |mut hs: Vec<Box<[u64; LOW_BINS]>>, range| {
            // No NaN is left to stop at (the first pass checked every key).
            let _ = x.for_each_block(range, |keys| {
                for (h, &high) in hs.iter_mut().zip(highs) {
                    // Most blocks hold no key of the chosen high bin; a
                    // vectorised test skips them.
                    if keys.iter().fold(false, |any, &k| any | (k >> 16 == high)) {
                        for &k in keys.iter().filter(|&&k| k >> 16 == high) {
                            h[k as usize & (LOW_BINS - 1)] += 1;
                        }
                    }
                }
            });
            hs
        })
        .reduce(fresh, |a, b| a.into_iter().zip(&b).map(|(a, b)| add(a, b)).collect())
}

/// The bin holding the `r`-th largest counted key (1 <= r <= total count)
/// and how many keys lie in higher bins.
fn descend(hist: &[u64], r: usize) -> (usize, usize) {
    let mut above = 0;
    for (bin, &c) in hist.iter().enumerate().rev() {
        let c = c as usize;
        if above + c >= r {
            return (bin, above);
        }
        above += c;
    }
    unreachable!("rank {r} exceeds the {above} counted keys")
}

/// Exact cuts for several ranks of one key sequence that may arrive in
/// pieces (a tensor streamed from disk chunk by chunk): feed every piece to
/// `count_high`, then, if `needs_low_pass`, every piece again to
/// `count_low`; then `cuts`. The radix passes of whole slices are the
/// one-piece case.
pub struct CutHistograms {
    ranks: Vec<usize>,
    key_bits: u32,
    high: Box<[u64; HIGH_BINS]>,
    /// Per rank, after the high pass: (high bin, keys in higher bins).
    coarse: Vec<Option<(usize, usize)>>,
    lows: Vec<Box<[u64; LOW_BINS]>>,
}

impl CutHistograms {
    /// `key_bits`: 15 for f16/bf16 keys (one pass), 31 for f32 (two).
    pub fn new(ranks: &[usize], key_bits: u32) -> Self {
        CutHistograms { ranks: ranks.to_vec(), key_bits, high: zeroed(), coarse: Vec::new(), lows: Vec::new() }
    }

    fn shift(&self) -> u32 {
        if self.key_bits <= 15 {
            0
        } else {
            16
        }
    }

    pub fn needs_low_pass(&self) -> bool {
        self.key_bits > 15
    }

    /// Counts one piece in the first pass; `Err(i)`: NaN at piece index i.
    pub fn count_high<K: Keys + ?Sized>(&mut self, x: &K) -> std::result::Result<(), usize> {
        let h = high_histogram(x, self.shift())?;
        self.high.iter_mut().zip(h.iter()).for_each(|(a, b)| *a += b);
        Ok(())
    }

    /// Counts one piece in the second pass (after every piece was counted by
    /// `count_high`, which refused NaN).
    pub fn count_low<K: Keys + ?Sized>(&mut self, x: &K) {
        let highs = self.low_pass_highs();
        for (acc, h) in self.lows.iter_mut().zip(low_histograms(x, &highs)) {
            acc.iter_mut().zip(h.iter()).for_each(|(a, b)| *a += b);
        }
    }

    /// Adds a first-pass histogram counted elsewhere (on a GPU): counts of
    /// `(key >> shift) & 0x7fff`, with shift 16 for 31-bit keys, else 0.
    pub fn add_high_counts(&mut self, counts: &[u64]) {
        self.high.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
    }

    /// For the second pass, the high half each rank's keys must have
    /// (u32::MAX, which matches none, for rank 0).
    pub fn low_pass_highs(&mut self) -> Vec<u32> {
        if self.coarse.is_empty() {
            let high = &self.high;
            self.coarse = self.ranks.iter().map(|&r| (r > 0).then(|| descend(&high[..], r))).collect();
            self.lows = self.ranks.iter().map(|_| zeroed()).collect();
        }
        self.coarse.iter().map(|c| c.map_or(u32::MAX, |(bin, _)| bin as u32)).collect()
    }

    /// Adds rank `m`'s second-pass counts (of `key & 0xffff` among keys whose
    /// high half is `low_pass_highs()[m]`) counted elsewhere.
    pub fn add_low_counts(&mut self, m: usize, counts: &[u64]) {
        self.low_pass_highs();
        self.lows[m].iter_mut().zip(counts).for_each(|(a, b)| *a += b);
    }

    /// The shift of the first pass's bins: 16 for 31-bit keys, else 0.
    pub fn high_shift(&self) -> u32 {
        self.shift()
    }

    /// The cut of each rank (each 0 <= r <= number of keys counted).
    pub fn cuts(&self) -> Vec<Cut> {
        if !self.needs_low_pass() {
            return self
                .ranks
                .iter()
                .map(|&r| match r {
                    0 => Cut::EMPTY,
                    _ => {
                        let (bin, above) = descend(&self.high[..], r);
                        Cut { cut: RankCut { key: bin as u32, ties: r - above }, equal: self.high[bin] as usize }
                    }
                })
                .collect();
        }
        let coarse = if self.coarse.is_empty() { vec![None; self.ranks.len()] } else { self.coarse.clone() };
        self.ranks
            .iter()
            .zip(coarse)
            .enumerate()
            .map(|(m, (&r, c))| match c {
                None => Cut::EMPTY,
                Some((hbin, above_high)) => {
                    let (lbin, above_low) = descend(&self.lows[m][..], r - above_high);
                    let key = (hbin as u32) << 16 | lbin as u32;
                    Cut { cut: RankCut { key, ties: r - above_high - above_low }, equal: self.lows[m][lbin] as usize }
                }
            })
            .collect()
    }
}

fn radix_cuts<K: Keys + ?Sized, const M: usize>(x: &K, rs: [usize; M], key_bits: u32) -> Result<[Cut; M]> {
    let mut h = CutHistograms::new(&rs, key_bits);
    h.count_high(x).map_err(nan_at)?;
    if h.needs_low_pass() {
        h.count_low(x);
    }
    let cuts = h.cuts();
    Ok(std::array::from_fn(|m| cuts[m]))
}

/// The cut of the top-`r` set by |x| (0 <= r <= n; r = 0 gives `RankCut::empty()`).
pub fn top_cut<T: Float>(x: &[T], r: usize) -> Result<RankCut> {
    check_rank("r", r, 0, x.len())?;
    Ok(cuts(x, [r], T::KEY_BITS)?[0].cut)
}

/// |x| of the k-th largest element by magnitude (k is 1-based, 1 <= k <= n),
/// as a non-negative value of the same type.
pub fn kth_largest_abs<T: Float>(x: &[T], k: usize) -> Result<T> {
    check_rank("k", k, 1, x.len())?;
    Ok(T::from_abs_key(top_cut(x, k)?.key))
}

/// How many keys equal `cut.key` come before each `CHUNK` chunk: the tie
/// ordinal each chunk's `CutWalker` starts at (all zeros when no tie is taken).
fn tie_offsets<K: Keys + ?Sized>(x: &K, cut: RankCut) -> Vec<usize> {
    if cut.ties == 0 {
        return vec![0; x.len().div_ceil(CHUNK)];
    }
    let counts: Vec<usize> = par_ranges(x.len())
        .map(|range| {
            let mut c = 0;
            // NaN was refused when the cut was found.
            let _ = x.for_each_block(range, |keys| c += keys.iter().filter(|&&k| k == cut.key).count());
            c
        })
        .collect();
    counts
        .iter()
        .scan(0, |before, &c| {
            let start = *before;
            *before += c;
            Some(start)
        })
        .collect()
}

/// Chunk starting ordinals for `cut`, skipping the count when every chunk may
/// start at 0 (no tie, or every tie taken).
fn chunk_starts<K: Keys + ?Sized>(x: &K, cut: Cut) -> Vec<usize> {
    if cut.partial() {
        tie_offsets(x, cut.cut)
    } else {
        vec![0; x.len().div_ceil(CHUNK)]
    }
}

/// out[i] = 1 iff rank(i) is in [lo, hi) over the whole slice, else 0.
pub fn band_mask<T: Float>(x: &[T], lo: usize, hi: usize, out: &mut [u8]) -> Result<()> {
    check_len("out", x.len(), out.len())?;
    check_band(lo, hi, x.len())?;
    let [cut_lo, cut_hi] = cuts(x, [lo, hi], T::KEY_BITS)?;
    let (start_lo, start_hi) = (chunk_starts(x, cut_lo), chunk_starts(x, cut_hi));
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, xs))| {
            let lo = Rule::new(cut_lo.cut, start_lo[c], cut_lo.partial());
            let hi = Rule::new(cut_hi.cut, start_hi[c], cut_hi.partial());
            write_band(xs, o, lo, hi);
        });
    Ok(())
}

/// How one cut decides membership during a mask pass: keys other than `tie`
/// are in iff key >= `least`; keys equal to `tie` (a partial cut's key) need
/// the walker's ordinal. `tie` is u32::MAX, which no key equals, when
/// ordinals do not matter.
#[derive(Clone, Copy)]
pub struct Rule {
    least: u32,
    tie: u32,
    walker: CutWalker,
}

impl Rule {
    /// `seen`: ties before this point; `ordinals`: whether they can matter.
    pub fn new(cut: RankCut, seen: usize, ordinals: bool) -> Self {
        let walker = CutWalker::new(cut, seen);
        if ordinals && cut.ties > 0 {
            // A non-empty cut's key is a real key, below u32::MAX.
            Rule { least: cut.key + 1, tie: cut.key, walker }
        } else {
            // No tie or all taken: in iff key >= cut key (the empty cut's
            // u32::MAX exceeds every key).
            Rule { least: cut.key, tie: u32::MAX, walker }
        }
    }

    /// Once every taken tie has been seen, the remaining ties are out and
    /// comparisons alone decide.
    #[inline(always)]
    fn settle(&mut self) {
        if self.walker.seen >= self.walker.cut.ties {
            self.tie = u32::MAX;
        }
    }
}

/// out[i] = 1 iff keys[i] is in the top-hi set and not in the top-lo set.
/// Blocks holding no `tie` key are decided by comparisons alone
/// (vectorised); the others element by element with the walkers, which thus
/// see every tie key in order. A walker of a cut whose ordinals do not matter
/// may miss ties: it undercounts, and `seen < ties` stays true when all ties
/// are taken (false when none are).
#[inline(always)]
pub fn band_keys(keys: &[u32], out: &mut [u8], lo: &mut Rule, hi: &mut Rule) {
    const BLOCK: usize = 64;
    for (o, ks) in out.chunks_mut(BLOCK).zip(keys.chunks(BLOCK)) {
        lo.settle();
        hi.settle();
        let mut tie = false;
        for (o, &k) in o.iter_mut().zip(ks) {
            tie |= (k == lo.tie) | (k == hi.tie);
            *o = ((k >= hi.least) & (k < lo.least)) as u8;
        }
        if tie {
            for (o, &k) in o.iter_mut().zip(ks) {
                *o = (hi.walker.take(k) & !lo.walker.take(k)) as u8;
            }
        }
    }
}

/// `band_keys` over values (NaN was refused when the cuts were found).
fn write_band<T: Float>(xs: &[T], out: &mut [u8], mut lo: Rule, mut hi: Rule) {
    let mut keys = [0u32; BLOCK];
    for (o, xs) in out.chunks_mut(BLOCK).zip(xs.chunks(BLOCK)) {
        let keys = &mut keys[..xs.len()];
        keys.iter_mut().zip(xs).for_each(|(k, v)| *k = v.abs_key().unwrap_or(0));
        band_keys(keys, o, &mut lo, &mut hi);
    }
}

/// The cut of the top-`r` set of one row from its keys (reordered in place;
/// 0 <= r <= keys.len()).
pub fn row_cut(keys: &mut [u32], r: usize) -> RankCut {
    if r == 0 {
        return RankCut::empty();
    }
    let n = keys.len();
    let (_, &mut key, above) = keys.select_nth_unstable(n - r);
    let greater = above.iter().filter(|&&k| k > key).count();
    RankCut { key, ties: r - greater }
}

/// Cuts for ranks lo <= hi of one row. After the top-`hi` cut, the top-`hi`
/// keys sit in the tail, and every key > the lo-th largest is among them, so
/// the second quickselect only looks there.
pub fn row_band_cuts(keys: &mut [u32], lo: usize, hi: usize) -> (RankCut, RankCut) {
    let n = keys.len();
    let cut_hi = row_cut(keys, hi);
    (row_cut(&mut keys[n - hi..], lo), cut_hi)
}

/// Per-row band masks: `x` is rows of `row_len` elements, each ranked on its
/// own; out[i] = 1 iff the rank of x[i] within its row is in [lo, hi).
pub fn band_mask_rows<T: Float>(x: &[T], row_len: usize, lo: usize, hi: usize, out: &mut [u8]) -> Result<()> {
    check_len("out", x.len(), out.len())?;
    if row_len == 0 || !x.len().is_multiple_of(row_len) {
        return Err(Error::Shape(format!(
            "row_len: expected a positive divisor of the {} elements of x, got {row_len}",
            x.len()
        )));
    }
    check_band(lo, hi, row_len)?;
    // Keep tiny rows from becoming one task each.
    let rows_per_task = (4096 / row_len).max(1);
    out.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .with_min_len(rows_per_task)
        .try_for_each_init(
            || Vec::with_capacity(row_len),
            |keys: &mut Vec<u32>, (o, row)| {
                keys.clear();
                row.for_each_block(0..row_len, |ks| keys.extend_from_slice(ks))?;
                let (cut_lo, cut_hi) = row_band_cuts(keys, lo, hi);
                // Tie counts are unknown here, so treat ordinals as mattering.
                write_band(row, o, Rule::new(cut_lo, 0, true), Rule::new(cut_hi, 0, true));
                Ok(())
            },
        )
        .map_err(|_: usize| first_nan(x))
}

/// Global top-`r` selection over several tensors at once (WAGLE's one mask
/// across all parameters): the tensors are ranked as if concatenated in the
/// order given, each flattened, so the tie rule above applies to the
/// concatenation: among equal |x| the element of the earlier tensor, then
/// the lower index inside one tensor, is kept first. Exactly `r` ones are
/// written in total. One histogram per radix pass is summed over the tensors
/// (the pieces of one `CutHistograms`, as the merge engine sums chunks), so
/// memory is O(bins + chunks), never a copy of the scores. Returns the cut
/// (`Cut::EMPTY` for r = 0).
pub fn global_top_mask<T: Float>(xs: &[&[T]], r: usize, outs: &mut [&mut [u8]]) -> Result<Cut> {
    if xs.len() != outs.len() {
        return Err(Error::Shape(format!("outs: expected {} masks (one per tensor), got {}", xs.len(), outs.len())));
    }
    for (i, (x, o)) in xs.iter().zip(outs.iter()).enumerate() {
        if x.len() != o.len() {
            return Err(Error::Shape(format!("outs[{i}]: expected {} elements (those of x[{i}]), got {}", x.len(), o.len())));
        }
    }
    let total: usize = xs.iter().map(|x| x.len()).sum();
    check_rank("r", r, 0, total)?;
    let nan = |i: usize| move |j: usize| Error::Value(format!("x[{i}] contains NaN at index {j}"));
    let mut h = CutHistograms::new(&[r], T::KEY_BITS);
    for (i, x) in xs.iter().enumerate() {
        h.count_high(*x).map_err(nan(i))?;
    }
    if h.needs_low_pass() {
        for x in xs {
            h.count_low(*x);
        }
    }
    let cut = h.cuts()[0];
    // Tie ordinals run across tensors: each chunk starts at the number of cut
    // keys in every earlier chunk, of this tensor and of the earlier ones.
    let mut before = 0;
    let starts: Vec<Vec<usize>> = xs
        .iter()
        .map(|x| {
            let counts = if cut.partial() { key_counts(*x, cut.cut.key) } else { vec![0; x.len().div_ceil(CHUNK)] };
            counts
                .iter()
                .map(|&c| {
                    let start = before;
                    before += c;
                    start
                })
                .collect()
        })
        .collect();
    for ((x, out), starts) in xs.iter().zip(outs.iter_mut()).zip(&starts) {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(starts.par_iter()).for_each(|((o, xs), &seen)| {
            let hi = Rule::new(cut.cut, seen, cut.partial());
            write_band(xs, o, Rule::new(RankCut::empty(), 0, false), hi);
        });
    }
    Ok(cut)
}

/// Per `CHUNK` chunk of `x`, how many keys equal `key` (NaN was refused).
fn key_counts<K: Keys + ?Sized>(x: &K, key: u32) -> Vec<usize> {
    par_ranges(x.len())
        .map(|range| {
            let mut c = 0;
            let _ = x.for_each_block(range, |keys| c += keys.iter().filter(|&&k| k == key).count());
            c
        })
        .collect()
}

#[cfg(test)]
mod global_tests {
    use super::*;
    use half::{bf16, f16};

    use crate::test_rng::XorShift;

    fn random<T: Float>(n: usize, seed: u64, tie_heavy: bool) -> Vec<T> {
        let mut g = XorShift::new(seed);
        let levels = [0.0f32, -0.0, 1.0, -1.0, 0.5, -2.0];
        (0..n).map(|_| T::from_f32(if tie_heavy { levels[g.below(6) as usize] } else { g.normal_ish() })).collect()
    }

    /// The mask from a stable sort of the concatenation by |x| descending.
    fn reference<T: Float>(xs: &[Vec<T>], r: usize) -> Vec<u8> {
        let all: Vec<f32> = xs.iter().flatten().map(|v| v.to_f32().abs()).collect();
        let mut idx: Vec<usize> = (0..all.len()).collect();
        idx.sort_by(|&a, &b| all[b].partial_cmp(&all[a]).unwrap());
        let mut mask = vec![0u8; all.len()];
        idx[..r].iter().for_each(|&i| mask[i] = 1);
        mask
    }

    fn check<T: Float>(sizes: &[usize], seed: u64, tie_heavy: bool) {
        let xs: Vec<Vec<T>> = sizes.iter().enumerate().map(|(i, &n)| random(n, seed * 31 + i as u64, tie_heavy)).collect();
        let total: usize = sizes.iter().sum();
        for r in [0, 1, total / 3, total / 2 + 1, total.saturating_sub(1), total].into_iter().filter(|&r| r <= total) {
            let mut outs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![7u8; n]).collect();
            let slices: Vec<&[T]> = xs.iter().map(|x| &x[..]).collect();
            let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            global_top_mask(&slices, r, &mut out_refs).unwrap();
            let got: Vec<u8> = outs.concat();
            assert_eq!(got.iter().map(|&o| o as usize).sum::<usize>(), r, "sizes={sizes:?} r={r}");
            assert!(got == reference(&xs, r), "{:?} sizes={sizes:?} seed={seed} ties={tie_heavy} r={r}", T::DTYPE);
        }
    }

    #[test]
    fn matches_a_stable_sort_of_the_concatenation() {
        for sizes in [&[][..], &[0, 0], &[1], &[5, 0, 3], &[17, 1000, 1], &[4097, 33, 2000]] {
            for seed in 0..3 {
                for ties in [false, true] {
                    check::<f32>(sizes, seed, ties);
                    check::<f16>(sizes, seed, ties);
                    check::<bf16>(sizes, seed, ties);
                }
            }
        }
    }

    #[test]
    fn tie_ordinals_cross_chunks_and_tensors() {
        // Tensors longer than a CHUNK, all drawn from a few levels, so the
        // cut is partial and its ties span chunks and tensors.
        let sizes = [CHUNK + 7, 5, 2 * CHUNK + 1];
        check::<bf16>(&sizes, 9, true);
        check::<f32>(&sizes, 10, true);
    }

    #[test]
    fn errors_name_the_tensor() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, f32::NAN];
        let (mut oa, mut ob) = ([0u8; 2], [0u8; 2]);
        let err = global_top_mask(&[&a[..], &b[..]], 1, &mut [&mut oa[..], &mut ob[..]]).unwrap_err();
        assert!(matches!(err, Error::Value(m) if m == "x[1] contains NaN at index 1"));
        let err = global_top_mask(&[&a[..], &a[..]], 5, &mut [&mut oa[..], &mut ob[..]]).unwrap_err();
        assert!(matches!(err, Error::Value(m) if m == "r: expected 0 <= r <= 4, got 5"));
        let mut short = [0u8; 1];
        let err = global_top_mask(&[&a[..], &a[..]], 1, &mut [&mut oa[..], &mut short[..]]).unwrap_err();
        assert!(matches!(err, Error::Shape(m) if m.starts_with("outs[1]")));
        assert!(matches!(global_top_mask(&[&a[..]], 1, &mut []), Err(Error::Shape(_))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    use crate::test_rng::XorShift;

    /// Values drawn from a handful of levels, many of them ±0.0.
    const LEVELS: [f32; 8] = [0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.5, -2.0];

    fn random<T: Float>(n: usize, seed: u64, tie_heavy: bool) -> Vec<T> {
        let mut g = XorShift::new(seed);
        (0..n)
            .map(|_| T::from_f32(if tie_heavy { LEVELS[g.below(8) as usize] } else { g.normal_ish() }))
            .collect()
    }

    /// rank[i] from a stable sort of indices by |x| descending (so equal |x|
    /// keep index order), comparing floats, not keys.
    fn reference_ranks<T: Float>(x: &[T]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[b].to_f32().abs().partial_cmp(&x[a].to_f32().abs()).unwrap());
        let mut rank = vec![0; x.len()];
        for (r, &i) in idx.iter().enumerate() {
            rank[i] = r;
        }
        rank
    }

    fn reference_cut<T: Float>(x: &[T], r: usize) -> Cut {
        if r == 0 {
            return Cut::EMPTY;
        }
        let mut keys: Vec<u32> = x.iter().map(|v| v.abs_key().unwrap()).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let key = keys[r - 1];
        let greater = keys.iter().filter(|&&k| k > key).count();
        let equal = keys.iter().filter(|&&k| k == key).count();
        Cut { cut: RankCut { key, ties: r - greater }, equal }
    }

    fn assert_band(x_ranks: &[usize], lo: usize, hi: usize, out: &[u8], what: &str) {
        for (i, (&rank, &o)) in x_ranks.iter().zip(out).enumerate() {
            assert_eq!(o == 1, (lo..hi).contains(&rank), "{what}: i={i} rank={rank} lo={lo} hi={hi}");
        }
    }

    fn ranks_to_try(n: usize) -> Vec<usize> {
        let mut rs = vec![0, 1, 2, n / 3, n / 2, n.saturating_sub(1), n];
        rs.retain(|&r| r <= n);
        rs
    }

    /// Both cut strategies and the public API against the reference.
    fn check_slice<T: Float>(x: &[T], what: &str) {
        let n = x.len();
        let ranks = reference_ranks(x);
        let mut sorted: Vec<f32> = x.iter().map(|v| v.to_f32().abs()).collect();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        for r in ranks_to_try(n) {
            let want = reference_cut(x, r);
            assert_eq!(small_cuts(x, [r]).unwrap()[0], want, "{what}: small r={r}");
            assert_eq!(radix_cuts(x, [r], T::KEY_BITS).unwrap()[0], want, "{what}: radix r={r}");
            assert_eq!(top_cut(x, r).unwrap(), want.cut, "{what}: r={r}");
            if r >= 1 {
                let got = kth_largest_abs(x, r).unwrap();
                assert_eq!(got.to_f32().to_bits(), sorted[r - 1].to_bits(), "{what}: k={r}");
            }
        }
        let mut out = vec![7u8; n];
        for (lo, hi) in [(0, 0), (0, n), (n / 4, n / 2), (1.min(n), 5.min(n)), (n / 3, n / 3), (n, n)] {
            band_mask(x, lo, hi, &mut out).unwrap();
            assert_band(&ranks, lo, hi, &out, what);
        }
    }

    fn check_all_types(n: usize, seed: u64, tie_heavy: bool) {
        let what = format!("n={n} seed={seed} ties={tie_heavy}");
        check_slice(&random::<f32>(n, seed, tie_heavy), &format!("f32 {what}"));
        check_slice(&random::<bf16>(n, seed, tie_heavy), &format!("bf16 {what}"));
        check_slice(&random::<f16>(n, seed, tie_heavy), &format!("f16 {what}"));
    }

    #[test]
    fn tiny_slices_match_reference() {
        for n in 0..=3 {
            for seed in 0..20 {
                check_all_types(n, seed, seed % 2 == 0);
            }
        }
    }

    #[test]
    fn random_slices_match_reference() {
        for n in [17, 1000, 4097] {
            for seed in 0..4 {
                check_all_types(n, seed, false);
                check_all_types(n, seed, true);
            }
        }
    }

    #[test]
    fn signed_zeros_are_equal_and_ties_go_to_lower_index() {
        let x = [-0.0f32, 0.0, -0.0, 3.0, 0.0];
        let mut out = [0u8; 5];
        band_mask(&x, 1, 3, &mut out).unwrap();
        assert_eq!(out, [1, 1, 0, 0, 0]);
        assert_eq!(top_cut(&x, 3).unwrap(), RankCut { key: 0, ties: 2 });
        assert_eq!(kth_largest_abs(&x, 5).unwrap().to_bits(), 0);
    }

    #[test]
    fn one_partial_cut_beside_one_taking_all_ties() {
        // Top-lo takes every 2.0 (its walker only runs in blocks holding a
        // 1.0, so it undercounts); top-hi takes the first few 1.0s.
        let n = 3 * SMALL + 11;
        let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { -2.0 } else { 1.0 }).collect();
        let twos = n.div_ceil(3);
        let ranks = reference_ranks(&x);
        let mut out = vec![0u8; n];
        for (lo, hi) in [(twos, twos + 5), (twos - 1, twos + 70), (twos, n)] {
            band_mask(&x, lo, hi, &mut out).unwrap();
            assert_band(&ranks, lo, hi, &out, "partial beside full");
        }
    }

    #[test]
    fn infinities_rank_first() {
        let x = [1.0f32, f32::NEG_INFINITY, 3.0, f32::INFINITY];
        let mut out = [0u8; 4];
        band_mask(&x, 0, 2, &mut out).unwrap();
        assert_eq!(out, [0, 1, 0, 1]);
        assert_eq!(kth_largest_abs(&x, 2).unwrap(), f32::INFINITY);
    }

    #[test]
    fn crosses_chunk_boundaries() {
        // Large enough for the radix path and several CHUNKs; tie-heavy data
        // makes the tie ordinals cross chunks.
        let n = 3_000_001;
        for (seed, tie_heavy) in [(1, true), (2, false)] {
            let x: Vec<bf16> = random(n, seed, tie_heavy);
            check_big(&x);
            let x: Vec<f32> = random(n, seed, tie_heavy);
            check_big(&x);
        }
    }

    fn check_big<T: Float>(x: &[T]) {
        let n = x.len();
        let ranks = reference_ranks(x);
        let mut out = vec![0u8; n];
        for (lo, hi) in [(n / 5, n / 2), (0, n / 3 + 1), (n / 2, n)] {
            band_mask(x, lo, hi, &mut out).unwrap();
            assert_band(&ranks, lo, hi, &out, "big");
            assert_eq!(top_cut(x, hi).unwrap(), reference_cut(x, hi).cut);
        }
    }

    #[test]
    fn f32_second_radix_pass() {
        // Keys share their high 16 bits and differ only in the low ones; the
        // duplicate of every 7th element makes ties inside the low bins.
        let x: Vec<f32> = (0..5000u32)
            .map(|i| {
                let v = f32::from_bits(0x3f80_0000 + i - i % 7 * (i % 2));
                if i % 3 == 0 { -v } else { v }
            })
            .collect();
        let ranks = reference_ranks(&x);
        for r in [1, 2, 77, 2500, 4999, 5000] {
            assert_eq!(radix_cuts(&x[..], [r], 31).unwrap()[0], reference_cut(&x, r), "r={r}");
        }
        let [lo, hi] = radix_cuts(&x[..], [100, 2600], 31).unwrap();
        assert_eq!((lo, hi), (reference_cut(&x, 100), reference_cut(&x, 2600)));
        let mut out = vec![0u8; x.len()];
        band_mask(&x, 100, 2600, &mut out).unwrap();
        assert_band(&ranks, 100, 2600, &out, "shared high bits");
    }

    #[test]
    fn f32_cuts_in_different_high_bins() {
        let x: Vec<f32> = random(SMALL + 5, 11, false);
        let n = x.len();
        let got = radix_cuts(&x[..], [0, 10, n / 2, n], 31).unwrap();
        assert_eq!(got, [0, 10, n / 2, n].map(|r| reference_cut(&x, r)));
    }

    #[test]
    fn rows_match_reference() {
        for row_len in [1usize, 2, 3, 5, 64, 333] {
            for tie_heavy in [false, true] {
                let x: Vec<bf16> = random(row_len * 7, row_len as u64, tie_heavy);
                let y: Vec<f32> = random(row_len * 7, row_len as u64, tie_heavy);
                let bands = [(0, 0), (0, row_len), (row_len / 4, row_len / 2 + 1), (0, 1), (1, 1), (row_len, row_len)];
                for (lo, hi) in bands {
                    let hi = hi.min(row_len);
                    let lo = lo.min(hi);
                    check_rows(&x, row_len, lo, hi);
                    check_rows(&y, row_len, lo, hi);
                }
            }
        }
    }

    fn check_rows<T: Float>(x: &[T], row_len: usize, lo: usize, hi: usize) {
        let mut out = vec![9u8; x.len()];
        band_mask_rows(x, row_len, lo, hi, &mut out).unwrap();
        for (row, o) in x.chunks(row_len).zip(out.chunks(row_len)) {
            assert_band(&reference_ranks(row), lo, hi, o, &format!("row_len={row_len}"));
        }
    }

    #[test]
    fn nan_is_an_error_naming_the_first_index() {
        let is_nan_at =
            |r: Result<()>, i: usize| matches!(r, Err(Error::Value(m)) if m.ends_with(&format!("NaN at index {i}")));
        let x = [1.0f32, f32::NAN, 2.0, f32::NAN];
        assert!(matches!(kth_largest_abs(&x, 1), Err(Error::Value(m)) if m.contains("NaN at index 1")));
        assert!(top_cut(&x, 0).is_err());
        assert!(is_nan_at(band_mask(&x, 0, 1, &mut [0u8; 4]), 1));
        assert!(is_nan_at(band_mask_rows(&x, 2, 0, 1, &mut [0u8; 4]), 1));
        let mut big: Vec<f16> = random(3 * CHUNK, 3, false);
        big[2 * CHUNK + 5] = f16::NAN;
        big[3 * CHUNK - 1] = f16::NAN;
        assert!(is_nan_at(band_mask(&big, 0, 10, &mut vec![0u8; big.len()]), 2 * CHUNK + 5));
        assert!(is_nan_at(band_mask_rows(&big, 1024, 0, 10, &mut vec![0u8; big.len()]), 2 * CHUNK + 5));
        let mut wide: Vec<f32> = random(SMALL * 2, 4, false);
        wide[SMALL + 1] = f32::NAN;
        assert!(matches!(top_cut(&wide, 5), Err(Error::Value(m)) if m.ends_with(&format!("index {}", SMALL + 1))));
    }

    #[test]
    fn argument_errors() {
        let y = [1.0f32; 4];
        let value = |r: Result<()>, want: &str| matches!(r, Err(Error::Value(m)) if m == want);
        assert!(matches!(kth_largest_abs(&y, 0), Err(Error::Value(m)) if m == "k: expected 1 <= k <= 4, got 0"));
        assert!(kth_largest_abs(&y, 5).is_err());
        assert!(kth_largest_abs::<f32>(&[], 1).is_err());
        assert!(matches!(top_cut(&y, 5), Err(Error::Value(m)) if m == "r: expected 0 <= r <= 4, got 5"));
        assert_eq!(top_cut(&y, 0).unwrap(), RankCut::empty());
        assert!(value(band_mask(&y, 3, 2, &mut [0u8; 4]), "lo: expected 0 <= lo <= 2, got 3"));
        assert!(value(band_mask(&y, 0, 5, &mut [0u8; 4]), "hi: expected 0 <= hi <= 4 (the row length), got 5"));
        assert!(value(band_mask_rows(&y, 2, 0, 3, &mut [0u8; 4]), "hi: expected 0 <= hi <= 2 (the row length), got 3"));
        assert!(matches!(band_mask(&y, 0, 2, &mut [0u8; 3]), Err(Error::Shape(_))));
        assert!(matches!(band_mask_rows(&y, 3, 0, 1, &mut [0u8; 4]), Err(Error::Shape(_))));
        assert!(matches!(band_mask_rows(&y, 0, 0, 0, &mut [0u8; 4]), Err(Error::Shape(_))));
        assert!(matches!(band_mask_rows(&y, 2, 0, 1, &mut [0u8; 5]), Err(Error::Shape(_))));
    }

    #[test]
    #[ignore]
    fn bench_kth_64m() {
        let n = 64 << 20;
        let x: Vec<f32> = random(n, 1, false);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let v = kth_largest_abs(&x, n / 10).unwrap();
            println!("kth_largest_abs, 64M f32, k = n/10: {:?} -> {v}", t.elapsed());
        }
        let mut out = vec![0u8; n];
        let t = std::time::Instant::now();
        band_mask(&x, n / 10, n / 2, &mut out).unwrap();
        println!("band_mask, 64M f32: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        band_mask_rows(&x, 4096, 400, 2048, &mut out).unwrap();
        println!("band_mask_rows, 64M f32 in rows of 4096: {:?}", t.elapsed());
    }
}
