//! Scalar (1-D) k-means: weighted Lloyd over sorted points with prefix sums,
//! and the exact optimum by dynamic programming.
//!
//! The values of a tensor (or of a set of its rows) are first reduced to
//! sorted distinct points `x_j` with weights `w_j` (`Points`):
//! - 16-bit inputs (f16, bf16): a histogram over the 65,536 bit patterns in
//!   one O(n) pass (per-task histograms over row blocks fixed by the shape,
//!   added in block order);
//! - f32: one parallel sort of (value, weight) keys, equal values merged.
//!
//! An element's weight is the weight of its input column (`col_weight`, e.g.
//! a diagonal Hessian or mean x² statistic), 1 without one. From prefix sums
//! of w, w·x and w·x² (f64, values centred on their weighted mean), one
//! Lloyd iteration is O(k log m): the clusters of sorted codewords are the
//! ranges between the codeword midpoints (binary search; a value on a
//! midpoint belongs to the lower codeword) and each new codeword is its
//! range's weighted mean. Lloyd starts from weighted quantiles and stops when
//! no range boundary moves (or after `max_iter` iterations).
//!
//! `exact` minimises Σ w_j (x_j − c(x_j))² over all k-codeword codebooks:
//! the optimal clusters of sorted 1-D points are contiguous ranges, so
//! D_l(j) = min_{i ≤ j} D_{l−1}(i) + cost(i, j) over l = 1..k, computed
//! by divide and conquer over the monotone argmin (O(k m log m)).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::Float;

/// Elements per histogram / gather task (rows are grouped up to this).
const TASK_ELEMS: usize = 1 << 20;
/// `Method::Auto` runs the exact DP when k·m is at most this.
pub const AUTO_EXACT_WORK: usize = 1 << 20;

/// How the codebook is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Exact when k·m ≤ [`AUTO_EXACT_WORK`], else Lloyd.
    Auto,
    Lloyd,
    Exact,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "auto" => Ok(Method::Auto),
            "lloyd" => Ok(Method::Lloyd),
            "exact" => Ok(Method::Exact),
            _ => Err(Error::Value(format!("method: expected 'auto', 'lloyd' or 'exact', got {s:?}"))),
        }
    }
}

/// Sorted distinct values with their total weights (all weights > 0).
#[derive(Clone, Debug, Default)]
pub struct Points {
    pub x: Vec<f64>,
    pub w: Vec<f64>,
}

/// A 1-D codebook: `k` codewords sorted ascending, and how it was found.
#[derive(Clone, Debug)]
pub struct Scalar {
    pub codebook: Vec<f32>,
    /// Σ w (x − c(x))² with c(x) the nearest (f32) codeword.
    pub objective: f64,
    /// Σ w over all points (objective / total_weight is the weighted MSE).
    pub total_weight: f64,
    pub iterations: usize,
    /// Lloyd: the objective after each assignment step (non-increasing).
    pub history: Vec<f64>,
    pub exact: bool,
}

pub fn check_k(k: usize) -> Result<()> {
    if (1..=256).contains(&k) {
        Ok(())
    } else {
        Err(Error::Value(format!("k: expected 1 <= k <= 256 codewords, got {k}")))
    }
}

/// Checks a per-column weight vector (finite, >= 0) against the row length.
pub(crate) fn check_col_weight(col_weight: Option<&[f32]>, row_len: usize) -> Result<()> {
    if let Some(w) = col_weight {
        if w.len() != row_len {
            return Err(Error::Shape(format!(
                "col_weight: expected {row_len} weights (one per input column), got {}",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Value(format!("col_weight: expected finite weights >= 0, got {} at column {i}", w[i])));
        }
    }
    Ok(())
}

/// Row blocks of about [`TASK_ELEMS`] elements (depends only on the shape).
fn row_blocks(rows: &[usize], row_len: usize) -> Vec<&[usize]> {
    let per = (TASK_ELEMS / row_len.max(1)).max(1);
    rows.chunks(per).collect()
}

fn nonfinite(value: f32, row: usize, col: usize) -> Error {
    Error::Value(format!("x: non-finite value {value} at row {row}, column {col}; k-means needs finite weights"))
}

/// The sorted weighted points of rows `rows` of `x` (rows of `row_len`).
pub fn points<T: Float>(x: &[T], row_len: usize, rows: &[usize], col_weight: Option<&[f32]>) -> Result<Points> {
    check_col_weight(col_weight, row_len)?;
    if let Some(&r) = rows.iter().find(|&&r| (r + 1) * row_len > x.len()) {
        return Err(Error::Shape(format!("rows: row {r} is out of range for {} rows", x.len() / row_len.max(1))));
    }
    if T::KEY_BITS <= 15 {
        histogram_points(x, row_len, rows, col_weight)
    } else {
        sorted_points(x, row_len, rows, col_weight)
    }
}

/// The 16 bits of a 16-bit float (sign bit 15), or `None` for NaN.
#[inline(always)]
fn bits16<T: Float>(v: T) -> Option<usize> {
    v.abs_key().map(|k| k as usize | (v.sign_bit() as usize) << 15)
}

fn histogram_points<T: Float>(x: &[T], row_len: usize, rows: &[usize], col_weight: Option<&[f32]>) -> Result<Points> {
    let blocks = row_blocks(rows, row_len);
    let hists: Vec<Vec<f64>> = blocks
        .par_iter()
        .map(|block| -> Result<Vec<f64>> {
            let mut h = vec![0f64; 1 << 16];
            for &r in block.iter() {
                let row = &x[r * row_len..(r + 1) * row_len];
                match col_weight {
                    None => {
                        for (c, &v) in row.iter().enumerate() {
                            let b = bits16(v).ok_or_else(|| nonfinite(v.to_f32(), r, c))?;
                            h[b] += 1.0;
                        }
                    }
                    Some(w) => {
                        for (c, (&v, &wc)) in row.iter().zip(w).enumerate() {
                            let b = bits16(v).ok_or_else(|| nonfinite(v.to_f32(), r, c))?;
                            h[b] += wc as f64;
                        }
                    }
                }
            }
            Ok(h)
        })
        .collect::<Result<_>>()?;
    let mut total = vec![0f64; 1 << 16];
    total.par_chunks_mut(4096).enumerate().for_each(|(i, t)| {
        for h in &hists {
            for (a, b) in t.iter_mut().zip(&h[i * 4096..]) {
                *a += b;
            }
        }
    });
    let mut bins: Vec<(f32, f64)> = Vec::new();
    for (b, &w) in total.iter().enumerate() {
        if w > 0.0 {
            let v = T::from_abs_key((b & 0x7fff) as u32).to_f32();
            if !v.is_finite() {
                let (r, c) = locate(x, row_len, rows, |e| bits16(e) == Some(b));
                return Err(nonfinite(if b >> 15 == 1 { -v } else { v }, r, c));
            }
            bins.push((if b >> 15 == 1 { -v } else { v }, w));
        }
    }
    bins.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(merge_equal(bins.into_iter()))
}

/// Where the first element matching `pred` is (for an error message).
fn locate<T: Float>(x: &[T], row_len: usize, rows: &[usize], pred: impl Fn(T) -> bool) -> (usize, usize) {
    for &r in rows {
        if let Some(c) = x[r * row_len..(r + 1) * row_len].iter().position(|&v| pred(v)) {
            return (r, c);
        }
    }
    (0, 0)
}

/// Total order key of an f32 (−0 just below +0).
#[inline(always)]
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[inline(always)]
fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

fn sorted_points<T: Float>(x: &[T], row_len: usize, rows: &[usize], col_weight: Option<&[f32]>) -> Result<Points> {
    let blocks = row_blocks(rows, row_len);
    // A key per element: the value's order key, and (weighted) the weight's
    // bits below it, so the sorted sequence is unique and sums over it are
    // the same whatever the sort's internal order.
    let check = |r: usize| -> Result<()> {
        match x[r * row_len..(r + 1) * row_len].iter().position(|v| !v.to_f32().is_finite()) {
            Some(c) => Err(nonfinite(x[r * row_len + c].to_f32(), r, c)),
            None => Ok(()),
        }
    };
    blocks.par_iter().try_for_each(|b| b.iter().try_for_each(|&r| check(r)))?;
    let pts = match col_weight {
        None => {
            let mut keys: Vec<u32> = Vec::with_capacity(rows.len() * row_len);
            for block in &blocks {
                for &r in block.iter() {
                    keys.extend(x[r * row_len..(r + 1) * row_len].iter().map(|v| order_key(v.to_f32())));
                }
            }
            keys.par_sort_unstable();
            merge_equal(keys.iter().map(|&k| (from_order_key(k), 1.0)))
        }
        Some(w) => {
            let mut keys: Vec<u64> = Vec::with_capacity(rows.len() * row_len);
            for block in &blocks {
                for &r in block.iter() {
                    let row = &x[r * row_len..(r + 1) * row_len];
                    keys.extend(row.iter().zip(w).filter(|(_, &wc)| wc > 0.0).map(|(v, wc)| {
                        (order_key(v.to_f32()) as u64) << 32 | wc.to_bits() as u64
                    }));
                }
            }
            keys.par_sort_unstable();
            merge_equal(keys.iter().map(|&k| (from_order_key((k >> 32) as u32), f32::from_bits(k as u32) as f64)))
        }
    };
    Ok(pts)
}

/// Points from sorted (value, weight) pairs, equal values (±0 too) merged
/// and zero weights dropped.
fn merge_equal(it: impl Iterator<Item = (f32, f64)>) -> Points {
    let mut p = Points::default();
    for (v, w) in it {
        if w <= 0.0 {
            continue;
        }
        let v = v as f64;
        match p.x.last() {
            Some(&last) if last == v => *p.w.last_mut().expect("w grows with x") += w,
            _ => {
                p.x.push(v);
                p.w.push(w);
            }
        }
    }
    p
}

/// Prefix sums over sorted points, values centred on their weighted mean
/// (less cancellation in Σw·x² − (Σw·x)²/Σw).
pub struct Prefix<'a> {
    pub x: &'a [f64],
    shift: f64,
    cw: Vec<f64>,
    cs: Vec<f64>,
    cq: Vec<f64>,
}

impl<'a> Prefix<'a> {
    pub fn new(p: &'a Points) -> Self {
        let total: f64 = p.w.iter().sum();
        let shift = if total > 0.0 { p.x.iter().zip(&p.w).map(|(x, w)| x * w).sum::<f64>() / total } else { 0.0 };
        let n = p.x.len();
        let (mut cw, mut cs, mut cq) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
        let (mut a, mut b, mut c) = (0f64, 0f64, 0f64);
        cw.push(0.0);
        cs.push(0.0);
        cq.push(0.0);
        for (&x, &w) in p.x.iter().zip(&p.w) {
            let y = x - shift;
            a += w;
            b += w * y;
            c += w * y * y;
            cw.push(a);
            cs.push(b);
            cq.push(c);
        }
        Prefix { x: &p.x, shift, cw, cs, cq }
    }

    pub fn len(&self) -> usize {
        self.x.len()
    }

    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    pub fn total_weight(&self) -> f64 {
        self.cw[self.len()]
    }

    /// Σ w over points i..j.
    fn weight(&self, i: usize, j: usize) -> f64 {
        self.cw[j] - self.cw[i]
    }

    /// Weighted mean of points i..j (i < j).
    fn mean(&self, i: usize, j: usize) -> f64 {
        (self.cs[j] - self.cs[i]) / self.weight(i, j) + self.shift
    }

    /// Σ w (x − c)² over points i..j.
    pub fn cost_at(&self, i: usize, j: usize, c: f64) -> f64 {
        let y = c - self.shift;
        let w = self.weight(i, j);
        let s = self.cs[j] - self.cs[i];
        let q = self.cq[j] - self.cq[i];
        (q - 2.0 * y * s + y * y * w).max(0.0)
    }

    /// Σ w (x − mean)² over points i..j (0 when empty).
    pub fn cost(&self, i: usize, j: usize) -> f64 {
        if j <= i {
            return 0.0;
        }
        let w = self.weight(i, j);
        let s = self.cs[j] - self.cs[i];
        let q = self.cq[j] - self.cq[i];
        if w > 0.0 {
            (q - s * s / w).max(0.0)
        } else {
            0.0
        }
    }

    /// Range boundaries of sorted codewords: cluster i is points
    /// b[i]..b[i+1]; a point on a midpoint goes to the lower codeword.
    fn boundaries(&self, c: &[f64], b: &mut Vec<usize>) {
        b.clear();
        b.push(0);
        for pair in c.windows(2) {
            let mid = 0.5 * (pair[0] + pair[1]);
            b.push(self.x.partition_point(|&v| v <= mid));
        }
        b.push(self.len());
    }

    fn objective(&self, c: &[f64], b: &[usize]) -> f64 {
        c.iter().enumerate().map(|(i, &ci)| self.cost_at(b[i], b[i + 1], ci)).sum()
    }
}

/// Weighted quantile codewords; if they collide (many equal values), k
/// distinct points spread evenly over the sorted order instead.
fn init(p: &Prefix<'_>, k: usize) -> Vec<f64> {
    let m = p.len();
    let total = p.total_weight();
    let mut c: Vec<f64> = (0..k)
        .map(|i| {
            let target = (i as f64 + 0.5) / k as f64 * total;
            let j = p.cw[1..].partition_point(|&cw| cw < target).min(m - 1);
            p.x[j]
        })
        .collect();
    if c.windows(2).any(|w| w[0] >= w[1]) {
        c = (0..k).map(|i| p.x[(2 * i + 1) * m / (2 * k)]).collect();
    }
    c
}

/// Weighted Lloyd from `c` (sorted, distinct); returns (codewords,
/// iterations, history of the objective after each assignment).
pub fn lloyd(p: &Prefix<'_>, mut c: Vec<f64>, max_iter: usize) -> (Vec<f64>, usize, Vec<f64>) {
    let mut b = Vec::with_capacity(c.len() + 1);
    let mut prev: Vec<usize> = Vec::new();
    let mut history = Vec::new();
    let mut iters = 0;
    while iters < max_iter {
        p.boundaries(&c, &mut b);
        history.push(p.objective(&c, &b));
        if b == prev {
            break;
        }
        iters += 1;
        for i in 0..c.len() {
            if b[i + 1] > b[i] {
                c[i] = p.mean(b[i], b[i + 1]);
            }
        }
        // Means of consecutive ranges are sorted; an empty cluster kept its
        // old codeword, which may now sit out of order.
        c.sort_by(|a, b| a.total_cmp(b));
        std::mem::swap(&mut prev, &mut b);
    }
    (c, iters, history)
}

/// Exact optimal 1-D k-means: (codewords sorted, objective). Codewords of
/// empty clusters (fewer distinct points than k) repeat the largest point.
pub fn exact(p: &Prefix<'_>, k: usize) -> (Vec<f64>, f64) {
    let m = p.len();
    if m == 0 {
        return (vec![0.0; k], 0.0);
    }
    let kk = k.min(m);
    // d[j] = best cost of the first j points with l clusters; opt[l][j] the
    // start of the last cluster.
    let mut d: Vec<f64> = (0..=m).map(|j| p.cost(0, j)).collect();
    let mut opt: Vec<Vec<u32>> = vec![vec![0; m + 1]];
    for _ in 1..kk {
        let mut nd = vec![0f64; m + 1];
        let mut no = vec![0u32; m + 1];
        solve(p, &d, &mut nd, &mut no, 0, m, 0, m);
        d = nd;
        opt.push(no);
    }
    let mut c = vec![0f64; k];
    let mut j = m;
    for l in (0..kk).rev() {
        let i = opt[l][j] as usize;
        c[l] = if j > i { p.mean(i, j) } else { f64::NAN };
        j = i;
    }
    // Empty clusters (possible only through exact ties) take a neighbour.
    let last = p.x[m - 1];
    for l in 0..k {
        if c[l].is_nan() || l >= kk {
            c[l] = if l > 0 { c[l - 1] } else { p.x[0] };
        }
    }
    if kk < k {
        for v in c.iter_mut().skip(kk) {
            *v = last;
        }
    }
    c.sort_by(|a, b| a.total_cmp(b));
    (c, d[m])
}

/// Fills nd[j] for j in lo..=hi with min over i in olo..=min(ohi, j) of
/// d[i] + cost(i, j), the argmin being monotone in j.
#[allow(clippy::too_many_arguments)]
fn solve(p: &Prefix<'_>, d: &[f64], nd: &mut [f64], no: &mut [u32], lo: usize, hi: usize, olo: usize, ohi: usize) {
    if lo > hi {
        return;
    }
    let mid = (lo + hi) / 2;
    let (mut best, mut arg) = (f64::INFINITY, olo);
    for i in olo..=ohi.min(mid) {
        let v = d[i] + p.cost(i, mid);
        if v < best {
            best = v;
            arg = i;
        }
    }
    nd[mid] = best;
    no[mid] = arg as u32;
    if mid > lo {
        solve(p, d, nd, no, lo, mid - 1, olo, arg);
    }
    solve(p, d, nd, no, mid + 1, hi, arg, ohi);
}

/// The objective of f32 codewords on the points (each point at its nearest
/// codeword, ties to the lower one).
pub fn objective_of(p: &Prefix<'_>, c: &[f32]) -> f64 {
    let c: Vec<f64> = c.iter().map(|&v| v as f64).collect();
    let mut b = Vec::new();
    p.boundaries(&c, &mut b);
    p.objective(&c, &b)
}

/// k-means on prepared points.
pub fn kmeans_points(pts: &Points, k: usize, method: Method, max_iter: usize) -> Result<Scalar> {
    kmeans_points_budget(pts, k, method, max_iter, AUTO_EXACT_WORK)
}

/// Up to `bins` points: consecutive runs of sorted points of (about) equal
/// count, each as its weighted mean with its total weight.
fn coarse(p: &Prefix<'_>, bins: usize) -> Points {
    let m = p.len();
    let mut out = Points::default();
    for b in 0..bins {
        let (i, j) = (b * m / bins, (b + 1) * m / bins);
        if j > i && p.weight(i, j) > 0.0 {
            out.x.push(p.mean(i, j));
            out.w.push(p.weight(i, j));
        }
    }
    out
}

/// [`kmeans_points`] with the exact-DP work limit `work` (k·m): above it,
/// `Auto` runs the DP on ≤ work/k coarse bins of the sorted points and
/// refines that codebook by Lloyd on all points.
pub fn kmeans_points_budget(pts: &Points, k: usize, method: Method, max_iter: usize, work: usize) -> Result<Scalar> {
    check_k(k)?;
    let p = Prefix::new(pts);
    let total_weight = p.total_weight();
    if p.is_empty() {
        return Ok(Scalar { codebook: vec![0.0; k], objective: 0.0, total_weight, iterations: 0, history: vec![], exact: true });
    }
    let m = p.len();
    let use_exact = match method {
        Method::Exact => true,
        Method::Lloyd => m <= k,
        Method::Auto => m <= k || k * m <= work,
    };
    let (c, iterations, history) = if use_exact {
        (exact(&p, k).0, 0, vec![])
    } else if method == Method::Auto {
        let bins = coarse(&p, (work / k).max(2 * k));
        let start = exact(&Prefix::new(&bins), k).0;
        lloyd(&p, start, max_iter)
    } else {
        lloyd(&p, init(&p, k), max_iter)
    };
    let mut codebook: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    codebook.sort_by(|a, b| a.total_cmp(b));
    let objective = objective_of(&p, &codebook);
    Ok(Scalar { codebook, objective, total_weight, iterations, history, exact: use_exact })
}

/// k-means with `k` codewords over rows `rows` of `x` (rows of `row_len`),
/// each element weighted by its column's `col_weight` (1 without).
pub fn kmeans<T: Float>(
    x: &[T],
    row_len: usize,
    rows: &[usize],
    col_weight: Option<&[f32]>,
    k: usize,
    method: Method,
    max_iter: usize,
) -> Result<Scalar> {
    check_k(k)?;
    let pts = points(x, row_len, rows, col_weight)?;
    kmeans_points(&pts, k, method, max_iter)
}
