//! Vector (product-quantization style) k-means: each row of `row_len` is cut
//! into `row_len / d` sub-vectors of `d` consecutive columns, and all
//! sub-vectors of the chosen rows share one codebook of k d-dim codewords.
//!
//! Distances are weighted per coordinate by the column weights
//! (Σ_j w_col(j) (x_j − c_j)²), so the update is a per-coordinate weighted
//! mean. Each Lloyd iteration is one fused pass: every point finds its
//! nearest codeword (ties to the lower index) and adds itself to that
//! codeword's sums — no n×k distance matrix. Points are cut into blocks that
//! depend only on the point count, each block sums in point order, and the
//! block sums are added in block order: the same bits for any thread count.
//!
//! Initial codewords are k points drawn by a seeded stratified sample (one
//! per stratum of n/k consecutive points); a codeword left without points
//! keeps its value.

use rayon::prelude::*;

use super::kmeans::check_col_weight;
use crate::error::{Error, Result};
use crate::Float;

/// Points per block of the fused pass (at least; more for huge inputs so
/// the block sums stay small).
const BLOCK_POINTS: usize = 4096;
const MAX_BLOCKS: usize = 512;

/// A vector codebook: k·d codewords (row-major [k, d]).
#[derive(Clone, Debug)]
pub struct VectorCodebook {
    pub codebook: Vec<f32>,
    pub objective: f64,
    pub total_weight: f64,
    pub iterations: usize,
    pub history: Vec<f64>,
}

/// The sub-vectors of rows `rows`: point p is row rows[p / per_row], sub-vector
/// p % per_row.
struct View<'a, T> {
    x: &'a [T],
    row_len: usize,
    d: usize,
    rows: &'a [usize],
    w: Option<&'a [f32]>,
}

impl<'a, T: Float> View<'a, T> {
    fn per_row(&self) -> usize {
        self.row_len / self.d
    }

    fn len(&self) -> usize {
        self.rows.len() * self.per_row()
    }

    #[inline(always)]
    fn point(&self, p: usize, buf: &mut [f32]) -> usize {
        let per = self.per_row();
        let col = (p % per) * self.d;
        let start = self.rows[p / per] * self.row_len + col;
        for (b, v) in buf.iter_mut().zip(&self.x[start..start + self.d]) {
            *b = v.to_f32();
        }
        col
    }

    fn block_len(&self) -> usize {
        BLOCK_POINTS.max(self.len().div_ceil(MAX_BLOCKS))
    }
}

/// Index of the nearest codeword of `pt` (weights `w`, or 1), ties to the
/// lower index, and its weighted squared distance.
#[inline(always)]
pub(crate) fn nearest(pt: &[f32], w: Option<&[f32]>, codebook: &[f32], d: usize) -> (usize, f64) {
    let mut best = (0usize, f32::INFINITY);
    for (i, c) in codebook.chunks_exact(d).enumerate() {
        let dist: f32 = match w {
            None => pt.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum(),
            Some(w) => pt.iter().zip(c).zip(w).map(|((a, b), w)| w * (a - b) * (a - b)).sum(),
        };
        if dist < best.1 {
            best = (i, dist);
        }
    }
    (best.0, best.1 as f64)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sums of one block: per codeword and coordinate Σw·x and Σw, and the
/// objective of the block's points.
struct Sums {
    sx: Vec<f64>,
    sw: Vec<f64>,
    obj: f64,
}

fn pass<T: Float>(v: &View<'_, T>, codebook: &[f32], k: usize) -> Sums {
    let d = v.d;
    let n = v.len();
    let bl = v.block_len();
    let blocks: Vec<Sums> = (0..n.div_ceil(bl))
        .into_par_iter()
        .map(|b| {
            let mut s = Sums { sx: vec![0.0; k * d], sw: vec![0.0; k * d], obj: 0.0 };
            let mut buf = vec![0f32; d];
            for p in b * bl..((b + 1) * bl).min(n) {
                let col = v.point(p, &mut buf);
                let w = v.w.map(|w| &w[col..col + d]);
                let (i, dist) = nearest(&buf, w, codebook, d);
                s.obj += dist;
                for j in 0..d {
                    let wj = w.map_or(1.0, |w| w[j]) as f64;
                    s.sx[i * d + j] += wj * buf[j] as f64;
                    s.sw[i * d + j] += wj;
                }
            }
            s
        })
        .collect();
    let mut total = Sums { sx: vec![0.0; k * d], sw: vec![0.0; k * d], obj: 0.0 };
    for s in blocks {
        total.obj += s.obj;
        for (a, b) in total.sx.iter_mut().zip(&s.sx) {
            *a += b;
        }
        for (a, b) in total.sw.iter_mut().zip(&s.sw) {
            *a += b;
        }
    }
    total
}

/// Vector k-means over rows `rows` of `x` (rows of `row_len`, `d` dividing
/// it) with `k` codewords: Lloyd from a seeded stratified sample, at most
/// `max_iter` iterations, stopping when the objective improves by less than
/// `tol` (relative).
#[allow(clippy::too_many_arguments)]
pub fn kmeans_vec<T: Float>(
    x: &[T],
    row_len: usize,
    d: usize,
    rows: &[usize],
    col_weight: Option<&[f32]>,
    k: usize,
    seed: u64,
    max_iter: usize,
    tol: f64,
) -> Result<VectorCodebook> {
    if d == 0 || row_len % d != 0 {
        return Err(Error::Shape(format!("vector_dim: expected a divisor of the row length {row_len}, got {d}")));
    }
    if k == 0 || k > 1 << 16 {
        return Err(Error::Value(format!("k: expected 1 <= k <= 65536 codewords, got {k}")));
    }
    check_col_weight(col_weight, row_len)?;
    if let Some(&r) = rows.iter().find(|&&r| (r + 1) * row_len > x.len()) {
        return Err(Error::Shape(format!("rows: row {r} is out of range for {} rows", x.len() / row_len.max(1))));
    }
    rows.par_iter().try_for_each(|&r| {
        match x[r * row_len..(r + 1) * row_len].iter().position(|v| !v.to_f32().is_finite()) {
            Some(c) => Err(Error::Value(format!(
                "x: non-finite value {} at row {r}, column {c}; k-means needs finite weights",
                x[r * row_len + c].to_f32()
            ))),
            None => Ok(()),
        }
    })?;
    let v = View { x, row_len, d, rows, w: col_weight };
    let n = v.len();
    let total_weight = match col_weight {
        None => (n * d) as f64,
        Some(w) => rows.len() as f64 * w.iter().map(|&v| v as f64).sum::<f64>(),
    };
    let mut codebook = vec![0f32; k * d];
    if n == 0 {
        return Ok(VectorCodebook { codebook, objective: 0.0, total_weight, iterations: 0, history: vec![] });
    }
    let mut buf = vec![0f32; d];
    for i in 0..k {
        let p = if n >= k {
            let lo = i * n / k;
            let span = ((i + 1) * n / k - lo) as u64;
            lo + (splitmix(seed ^ splitmix(i as u64)) % span) as usize
        } else {
            i.min(n - 1)
        };
        v.point(p, &mut buf);
        codebook[i * d..(i + 1) * d].copy_from_slice(&buf);
    }
    let mut history = Vec::new();
    let mut iterations = 0;
    let objective = loop {
        let s = pass(&v, &codebook, k);
        history.push(s.obj);
        let converged = history.len() >= 2 && {
            let prev = history[history.len() - 2];
            prev - s.obj <= tol * prev
        };
        if iterations >= max_iter || converged {
            break s.obj;
        }
        iterations += 1;
        for (c, (sx, sw)) in codebook.iter_mut().zip(s.sx.iter().zip(&s.sw)) {
            if *sw > 0.0 {
                *c = (sx / sw) as f32;
            }
        }
    };
    Ok(VectorCodebook { codebook, objective, total_weight, iterations, history })
}
