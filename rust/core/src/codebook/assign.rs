//! Assignment of weights to codewords (written as packed codes), decode, and
//! the whole quantization of one matrix.
//!
//! A quantized matrix [out, in] keeps its rows in a permuted order
//! (`perm[r]` = the original row of permuted row r; identity when absent);
//! permuted rows group_offsets[g]..group_offsets[g+1] share codebook g of
//! k = 2^bits codewords of `d` values ([G, k, d] row-major). Row r holds
//! in / d codes, packed with [`crate::pack`] (rows byte-aligned).
//!
//! Scalar codes (d = 1) are bucketized on the midpoints of the sorted
//! codewords, computed in f64 (a value exactly on a midpoint takes the lower
//! codeword, as argmin |x − c| with ties to the lower index does; of equal
//! codewords the lowest index is used). Vector
//! codes take the nearest codeword by the weighted squared distance.

use rayon::prelude::*;

use super::kmeans::{self, Method};
use super::vector::{self, nearest};
use crate::error::{check_len, Error, Result};
use crate::pack::{self, packed_row_bytes};
use crate::Float;

/// Codes packed per task (whole rows).
const TASK_CODES: usize = 1 << 16;

/// Where the rows and codebooks of a quantized matrix are.
#[derive(Clone, Copy)]
pub struct Layout<'a> {
    pub rows: usize,
    pub row_len: usize,
    pub bits: u32,
    pub d: usize,
    pub perm: Option<&'a [i32]>,
    pub group_offsets: &'a [i32],
}

pub fn check_bits(bits: u32) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Value(format!("bits: expected 1 <= bits <= 8, got {bits}")))
    }
}

impl<'a> Layout<'a> {
    pub fn k(&self) -> usize {
        1 << self.bits
    }

    pub fn groups(&self) -> usize {
        self.group_offsets.len().saturating_sub(1)
    }

    pub fn codes_per_row(&self) -> usize {
        self.row_len / self.d
    }

    pub fn packed_row(&self) -> usize {
        packed_row_bytes(self.codes_per_row(), self.bits)
    }

    /// Checks bits, d, the permutation (a permutation of 0..rows) and the
    /// group offsets (0 = o_0 <= ... <= o_G = rows).
    pub fn check(&self) -> Result<()> {
        check_bits(self.bits)?;
        if self.d == 0 || self.row_len % self.d != 0 {
            return Err(Error::Shape(format!(
                "vector_dim: expected a divisor of the row length {}, got {}",
                self.row_len, self.d
            )));
        }
        let o = self.group_offsets;
        if o.len() < 2 || o[0] != 0 || o[o.len() - 1] as usize != self.rows || o.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::Value(format!(
                "group_offsets: expected G+1 non-decreasing offsets from 0 to {} rows, got {:?}",
                self.rows,
                &o[..o.len().min(8)]
            )));
        }
        if let Some(p) = self.perm {
            check_len("perm", self.rows, p.len())?;
            let mut seen = vec![false; self.rows];
            for (r, &v) in p.iter().enumerate() {
                if v < 0 || v as usize >= self.rows || seen[v as usize] {
                    return Err(Error::Value(format!(
                        "perm: expected a permutation of 0..{}, got {v} at {r} (out of range or repeated)",
                        self.rows
                    )));
                }
                seen[v as usize] = true;
            }
        }
        Ok(())
    }

    /// The original row of permuted row r.
    #[inline]
    pub fn source(&self, r: usize) -> usize {
        self.perm.map_or(r, |p| p[r] as usize)
    }

    /// Group of each permuted row.
    pub fn row_groups(&self) -> Vec<u32> {
        let mut g = vec![0u32; self.rows];
        for (i, w) in self.group_offsets.windows(2).enumerate() {
            for v in &mut g[w[0] as usize..w[1] as usize] {
                *v = i as u32;
            }
        }
        g
    }

    /// Original row indices of group g.
    pub fn group_rows(&self, g: usize) -> Vec<usize> {
        let (a, b) = (self.group_offsets[g] as usize, self.group_offsets[g + 1] as usize);
        (a..b).map(|r| self.source(r)).collect()
    }
}

/// f64 midpoints of each group's sorted scalar codebook (k − 1 per group),
/// checking the order.
fn midpoints(codebooks: &[f32], k: usize) -> Result<Vec<f64>> {
    let mut mids = Vec::with_capacity(codebooks.len());
    for (g, c) in codebooks.chunks_exact(k).enumerate() {
        if let Some(i) = c.windows(2).position(|w| !(w[0] <= w[1])) {
            return Err(Error::Value(format!(
                "codebooks: scalar codebooks must be sorted ascending and finite; group {g} has {} before {}",
                c[i],
                c[i + 1]
            )));
        }
        // Equal codewords: a run takes its lowest index (as argmin does), so
        // the midpoints inside a run are the run's upper midpoint.
        let start = mids.len();
        mids.resize(start + k, f64::INFINITY);
        for i in (0..k - 1).rev() {
            mids[start + i] = if c[i] == c[i + 1] { mids[start + i + 1] } else { 0.5 * (c[i] as f64 + c[i + 1] as f64) };
        }
    }
    Ok(mids)
}

/// Number of midpoints < v (k − 1 finite midpoints then +inf, k a power of 2).
#[inline(always)]
fn bucket(mids: &[f64], v: f64) -> u8 {
    let mut lo = 0usize;
    let mut step = mids.len() / 2;
    while step > 0 {
        if mids[lo + step - 1] < v {
            lo += step;
        }
        step /= 2;
    }
    lo as u8
}

/// Writes the packed codes of `x` ([rows, row_len], original row order) in
/// permuted order into `out` ([rows, packed_row]).
pub fn assign<T: Float>(x: &[T], l: &Layout<'_>, codebooks: &[f32], col_weight: Option<&[f32]>, out: &mut [u8]) -> Result<()> {
    l.check()?;
    check_len("x", l.rows * l.row_len, x.len())?;
    check_len("codebooks", l.groups() * l.k() * l.d, codebooks.len())?;
    check_len("out (bytes)", l.rows * l.packed_row(), out.len())?;
    kmeans::check_col_weight(col_weight, l.row_len)?;
    let k = l.k();
    let mids = if l.d == 1 { midpoints(codebooks, k)? } else { vec![] };
    let groups = l.row_groups();
    let per = l.codes_per_row();
    let pr = l.packed_row();
    if pr == 0 {
        return Ok(());
    }
    let rows_per_task = (TASK_CODES / per.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * pr).enumerate().try_for_each(|(t, o)| -> Result<()> {
        let r0 = t * rows_per_task;
        let n = o.len() / pr;
        let mut codes = vec![0u8; n * per];
        let mut buf = vec![0f32; l.d];
        for i in 0..n {
            let r = r0 + i;
            let g = groups[r] as usize;
            let src = l.source(r);
            let row = &x[src * l.row_len..(src + 1) * l.row_len];
            let dst = &mut codes[i * per..(i + 1) * per];
            if l.d == 1 {
                let m = &mids[g * k..(g + 1) * k];
                for (c, (dv, v)) in dst.iter_mut().zip(row).enumerate() {
                    let v = v.to_f32();
                    if v.is_nan() {
                        return Err(Error::Value(format!("x: NaN at row {src}, column {c}")));
                    }
                    *dv = bucket(m, v as f64);
                }
            } else {
                let cb = &codebooks[g * k * l.d..(g + 1) * k * l.d];
                for (j, dv) in dst.iter_mut().enumerate() {
                    for (b, v) in buf.iter_mut().zip(&row[j * l.d..(j + 1) * l.d]) {
                        *b = v.to_f32();
                    }
                    let w = col_weight.map(|w| &w[j * l.d..(j + 1) * l.d]);
                    *dv = nearest(&buf, w, cb, l.d).0 as u8;
                }
            }
        }
        pack::pack_codes(&codes, l.bits, per, o)
    })
}

/// Decodes packed codes into `out` ([rows, row_len]) in the ORIGINAL row
/// order: out[perm[r]] = row_scale[r] · codebooks[g(r), code].
pub fn decode<T: Float>(codes: &[u8], l: &Layout<'_>, codebooks: &[f32], row_scale: Option<&[f32]>, out: &mut [T]) -> Result<()> {
    l.check()?;
    check_len("codes (bytes)", l.rows * l.packed_row(), codes.len())?;
    check_len("codebooks", l.groups() * l.k() * l.d, codebooks.len())?;
    check_len("out", l.rows * l.row_len, out.len())?;
    if let Some(s) = row_scale {
        check_len("row_scale", l.rows, s.len())?;
    }
    let mut inv = vec![0usize; l.rows];
    for r in 0..l.rows {
        inv[l.source(r)] = r;
    }
    let groups = l.row_groups();
    let (k, d, per, pr) = (l.k(), l.d, l.codes_per_row(), l.packed_row());
    if l.row_len == 0 {
        return Ok(());
    }
    out.par_chunks_mut(l.row_len).enumerate().try_for_each(|(o, row)| -> Result<()> {
        let r = inv[o];
        let mut unpacked = vec![0u8; per];
        pack::unpack_codes(&codes[r * pr..(r + 1) * pr], l.bits, per, &mut unpacked)?;
        let cb = &codebooks[groups[r] as usize * k * d..(groups[r] as usize + 1) * k * d];
        let s = row_scale.map_or(1.0, |s| s[r]);
        for (j, &c) in unpacked.iter().enumerate() {
            let cw = &cb[c as usize * d..(c as usize + 1) * d];
            for (dst, &v) in row[j * d..(j + 1) * d].iter_mut().zip(cw) {
                *dst = T::from_f32(if row_scale.is_some() { s * v } else { v });
            }
        }
        Ok(())
    })
}

/// Options of [`quantize`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub method: Method,
    pub max_iter: usize,
    pub seed: u64,
    /// Relative objective improvement below which vector Lloyd stops.
    pub tol: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { method: Method::Auto, max_iter: 300, seed: 0, tol: 1e-6 }
    }
}

/// One group's result: (objective, total weight, iterations).
pub type GroupFit = (f64, f64, usize);

/// Quantizes `x` ([rows, row_len]): one codebook per group (k-means over
/// that group's rows, weighted by `col_weight`) into `codebooks_out`
/// ([G, k, d]) and the packed codes into `codes_out`.
pub fn quantize<T: Float>(
    x: &[T],
    l: &Layout<'_>,
    col_weight: Option<&[f32]>,
    opts: Options,
    codebooks_out: &mut [f32],
    codes_out: &mut [u8],
) -> Result<Vec<GroupFit>> {
    l.check()?;
    check_len("x", l.rows * l.row_len, x.len())?;
    check_len("codebooks_out", l.groups() * l.k() * l.d, codebooks_out.len())?;
    let (k, d) = (l.k(), l.d);
    let fits: Vec<(Vec<f32>, GroupFit)> = (0..l.groups())
        .into_par_iter()
        .map(|g| -> Result<(Vec<f32>, GroupFit)> {
            let rows = l.group_rows(g);
            if d == 1 {
                let s = kmeans::kmeans(x, l.row_len, &rows, col_weight, k, opts.method, opts.max_iter)?;
                Ok((s.codebook, (s.objective, s.total_weight, s.iterations)))
            } else {
                let seed = opts.seed.wrapping_add(g as u64);
                let s = vector::kmeans_vec(x, l.row_len, d, &rows, col_weight, k, seed, opts.max_iter, opts.tol)?;
                Ok((s.codebook, (s.objective, s.total_weight, s.iterations)))
            }
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(fits.len());
    for (g, (cb, fit)) in fits.into_iter().enumerate() {
        codebooks_out[g * k * d..(g + 1) * k * d].copy_from_slice(&cb);
        out.push(fit);
    }
    assign(x, l, codebooks_out, col_weight, codes_out)?;
    Ok(out)
}

/// Per-row statistics for grouping rows: (std, max|w| / std, kurtosis
/// m4 / m2²), each row summed in f64 in column order; 0 for a constant row.
pub fn row_stats<T: Float>(x: &[T], row_len: usize, out: &mut [f32]) -> Result<()> {
    if row_len == 0 || x.len() % row_len != 0 {
        return Err(Error::Shape(format!("row_len: expected a positive divisor of {} elements, got {row_len}", x.len())));
    }
    check_len("out", 3 * (x.len() / row_len), out.len())?;
    out.par_chunks_mut(3).zip(x.par_chunks(row_len)).enumerate().try_for_each(|(r, (o, row))| -> Result<()> {
        let n = row_len as f64;
        let mut mean = 0f64;
        let mut amax = 0f64;
        for (c, v) in row.iter().enumerate() {
            let v = v.to_f32() as f64;
            if !v.is_finite() {
                return Err(Error::Value(format!("x: non-finite value {v} at row {r}, column {c}")));
            }
            mean += v;
            amax = amax.max(v.abs());
        }
        mean /= n;
        let (mut m2, mut m4) = (0f64, 0f64);
        for v in row {
            let y = v.to_f32() as f64 - mean;
            m2 += y * y;
            m4 += y * y * y * y;
        }
        m2 /= n;
        m4 /= n;
        let std = m2.sqrt();
        if std > 0.0 {
            o[0] = std as f32;
            o[1] = (amax / std) as f32;
            o[2] = (m4 / (m2 * m2)) as f32;
        } else {
            o.fill(0.0);
        }
        Ok(())
    })
}
