//! MKOR's inverse-factor maintenance: one fused call updates every factor of
//! every layer by a symmetric rank-1 Sherman–Morrison step, checks the
//! norm-based stabiliser and rounds the result to the storage type.
//!
//! A factor is kept as its inverse `W` (n×n, stored in f16, bf16 or f32,
//! computed in f32). With the batch-mean vector `v` of the layer (inputs or
//! output gradients) one update is
//!
//! ```text
//! W̃  = (1−ζ)·W + ζ·I   if the factor was flagged by the stabiliser, else W
//! M  = a·W̃ + b·I,  w = s·v
//! W' = M − (M w)(M w)ᵀ / (1 + wᵀ M w)        (Sherman–Morrison: (M⁻¹ + wwᵀ)⁻¹)
//! ```
//!
//! which covers both of MKOR's modes (see [`Spec`]). M is symmetric, so one
//! GEMV gives both `M w` and `wᵀ M`. Afterwards max|W'| (of the stored
//! values) above the threshold flags the factor for a blend towards I on its
//! next update; a non-finite result (f16 overflow, a bad vector) resets it to
//! I on the spot, so a stored factor is never inf/NaN.
//!
//! Float order, shared bit for bit with `cuda/mkor.cu`: each `(M w)_i` is a
//! sequential sum over j; `wᵀ M w` a sequential sum over i; W'_ij =
//! M_ij − (u_i·u_j)/d. Deterministic for any thread count (column blocks of
//! the GEMV and rows of the write run in parallel, each element's arithmetic
//! is fixed). The GEMV reads M down its columns (the CUDA kernel's
//! coalesced order; M is symmetric), as one vectorised axpy per stored row.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::simd::multiversion;
use crate::Float;

/// The constants of one update: M = a·W̃ + b·I, w = s·v, W̃ blends a flagged
/// factor as (1−ζ)·W + ζ·I.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub a: f32,
    pub b: f32,
    pub s: f32,
    pub zeta: f32,
    /// max|W'| above this flags the factor.
    pub threshold: f32,
}

impl Spec {
    /// The reference code's update (damping in inverse space):
    /// W' = (inv(γ·W̃ + (1−γ)·I) + v·vᵀ)⁻¹.
    pub fn reference(gamma: f32, zeta: f32, threshold: f32) -> Result<Spec> {
        check_constants(gamma, zeta, threshold)?;
        Ok(Spec { a: gamma, b: 1.0 - gamma, s: 1.0, zeta, threshold })
    }

    /// The paper's EMA of the factor, L' = γ·L + (1−γ)·v·vᵀ, kept as its exact
    /// inverse: W' = (γ·W̃⁻¹ + (1−γ)·v·vᵀ)⁻¹ = SM(W̃/γ, √(1−γ)·v) when
    /// `damping` δ = 0. δ > 0 first blends the decayed inverse towards I,
    /// W' = SM((1−δ)·W̃/γ + δ·I, √(1−γ)·v): for δ > 1−γ the factor's
    /// eigenvalues along directions no vector refreshes settle at
    /// (δ+γ−1)/(δγ) instead of decaying as γᵗ.
    pub fn paper(gamma: f32, zeta: f32, threshold: f32, damping: f32) -> Result<Spec> {
        check_constants(gamma, zeta, threshold)?;
        if !(0.0..=1.0).contains(&damping) {
            return Err(Error::Value(format!("damping: expected a value in [0, 1], got {damping}")));
        }
        let a = ((1.0 - damping as f64) / gamma as f64) as f32;
        Ok(Spec { a, b: damping, s: ((1.0 - gamma as f64).sqrt()) as f32, zeta, threshold })
    }
}

fn check_constants(gamma: f32, zeta: f32, threshold: f32) -> Result<()> {
    if !(gamma > 0.0 && gamma < 1.0) {
        return Err(Error::Value(format!("stat_decay: expected 0 < stat_decay < 1, got {gamma}")));
    }
    if !(0.0..=1.0).contains(&zeta) {
        return Err(Error::Value(format!("stabilization_factor: expected a value in [0, 1], got {zeta}")));
    }
    if !(threshold > 0.0) {
        return Err(Error::Value(format!("stabilizer_threshold: expected a positive value, got {threshold}")));
    }
    Ok(())
}

/// One factor: its stored inverse (n×n row-major) and its vector (n).
pub struct Factor<'a, T> {
    pub inv: &'a mut [T],
    pub v: &'a [f32],
}

/// What one update left behind: the stabiliser flag for the next update and
/// max|W'|, or `reset` when the result was not finite and W' = I instead.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outcome {
    pub flagged: bool,
    pub max_abs: f32,
    pub reset: bool,
}

/// Element (i, j) of M = a·W̃ + b·I; `w` is the stored W_ij in f32.
#[inline(always)]
fn m_elem(spec: &Spec, omz: f32, flagged: bool, diag: bool, w: f32) -> f32 {
    let wt = match (flagged, diag) {
        (true, true) => omz * w + spec.zeta,
        (true, false) => omz * w,
        (false, _) => w,
    };
    if diag {
        spec.a * wt + spec.b
    } else {
        spec.a * wt
    }
}

/// Off-diagonal M_ij: `m_elem` without the diagonal's terms (the loops
/// below treat the one diagonal element apart, so they stay branch-free).
#[inline(always)]
fn m_off(spec: &Spec, omz: f32, flagged: bool, w: f32) -> f32 {
    spec.a * if flagged { omz * w } else { w }
}

/// `src` in f32 (f16 through half's slice conversion, which uses F16C where
/// the CPU has it; the same rounding-free widening as `to_f32`).
#[inline(always)]
fn widen<T: Float>(src: &[T], dst: &mut [f32]) {
    if T::DTYPE == crate::DType::F16 {
        use half::slice::HalfFloatSliceExt;
        // SAFETY: T is half::f16 (same DTYPE), a 2-byte Copy type of the same layout.
        let h: &[half::f16] = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const half::f16, src.len()) };
        h.convert_to_f32_slice(dst);
    } else {
        for (d, x) in dst.iter_mut().zip(src) {
            *d = x.to_f32();
        }
    }
}

/// `src` rounded to T (round to nearest even, as `from_f32`).
#[inline(always)]
fn narrow<T: Float>(src: &[f32], dst: &mut [T]) {
    if T::DTYPE == crate::DType::F16 {
        use half::slice::HalfFloatSliceExt;
        // SAFETY: as in `widen`.
        let h: &mut [half::f16] = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut half::f16, dst.len()) };
        h.convert_from_f32_slice(src);
    } else {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = T::from_f32(x);
        }
    }
}

/// Columns per parallel task of the GEMV (and its row buffer).
const COLS: usize = 256;

multiversion! {
    /// u[c] += M_{j, lo+c}·w_j for j = 0..n in order: (M w)_i summed down
    /// column i, which for the symmetric M is row i's sum in the CUDA
    /// kernel's order, here as an axpy per stored row (vectorised).
    fn gemv_cols<T: Float>(inv: &[T], n: usize, lo: usize, u: &mut [f32], w: &[f32], spec: &Spec, omz: f32, flagged: bool, buf: &mut [f32]) -> () {
        let cols = u.len();
        let buf = &mut buf[..cols];
        for (j, &wj) in w.iter().enumerate() {
            widen(&inv[j * n + lo..j * n + lo + cols], buf);
            let axpy = |u: &mut [f32], b: &[f32]| {
                for (uc, &x) in u.iter_mut().zip(b) {
                    *uc += m_off(spec, omz, flagged, x) * wj;
                }
            };
            if (lo..lo + cols).contains(&j) {
                let dj = j - lo;
                let diag = u[dj] + m_elem(spec, omz, flagged, true, buf[dj]) * wj;
                axpy(u, buf);
                u[dj] = diag;
            } else {
                axpy(u, buf);
            }
        }
    }
}

multiversion! {
    /// Row i of W' = M − (u_i·u_j)/d (M where `rank1` is false), stored;
    /// returns (max|stored|, all stored finite).
    fn write_row<T: Float>(row: &mut [T], i: usize, u: &[f32], d: f32, rank1: bool, spec: &Spec, omz: f32, flagged: bool, buf: &mut [f32]) -> (f32, bool) {
        widen(row, buf);
        let diag = m_elem(spec, omz, flagged, true, buf[i]);
        if rank1 {
            let ui = u[i];
            for (x, &uj) in buf.iter_mut().zip(u) {
                *x = m_off(spec, omz, flagged, *x) - (ui * uj) / d;
            }
            buf[i] = diag - (ui * u[i]) / d;
        } else {
            for x in buf.iter_mut() {
                *x = m_off(spec, omz, flagged, *x);
            }
            buf[i] = diag;
        }
        narrow(buf, row);
        widen(row, buf);
        let (mut max_abs, mut finite) = (0f32, true);
        for &kept in buf.iter() {
            finite &= kept.is_finite();
            max_abs = max_abs.max(kept.abs());
        }
        (max_abs, finite)
    }
}

/// Rows of at least this many elements run in parallel.
const PAR_ROWS_FROM: usize = 64;

fn update_one<T: Float>(f: &mut Factor<'_, T>, flagged: bool, spec: &Spec) -> Outcome {
    let n = f.v.len();
    let omz = 1.0 - spec.zeta;
    let w: Vec<f32> = f.v.iter().map(|&x| spec.s * x).collect();
    let mut u = vec![0f32; n];
    {
        let inv: &[T] = f.inv;
        let task = |(k, uc): (usize, &mut [f32])| {
            let mut buf = vec![0f32; uc.len()];
            gemv_cols(inv, n, k * COLS, uc, &w, spec, omz, flagged, &mut buf);
        };
        if n >= PAR_ROWS_FROM {
            u.par_chunks_mut(COLS).enumerate().for_each(task);
        } else {
            u.chunks_mut(COLS).enumerate().for_each(task);
        }
    }
    let mut acc = 0f32;
    for (wi, ui) in w.iter().zip(&u) {
        acc += wi * ui;
    }
    let d = 1.0 + acc;
    // M is positive definite in exact arithmetic, so d >= 1; a rounded W
    // that lost definiteness may give d <= 0, where the rank-1 term is dropped.
    let rank1 = d.is_finite() && d > 0.0;
    let fold = |a: (f32, bool), b: (f32, bool)| (a.0.max(b.0), a.1 & b.1);
    let (max_abs, finite) = if n >= PAR_ROWS_FROM {
        f.inv
            .par_chunks_mut(n)
            .enumerate()
            .map_init(|| vec![0f32; n], |buf, (i, row)| write_row(row, i, &u, d, rank1, spec, omz, flagged, buf))
            .reduce(|| (0.0, true), fold)
    } else {
        let mut buf = vec![0f32; n];
        f.inv.chunks_mut(n).enumerate().map(|(i, row)| write_row(row, i, &u, d, rank1, spec, omz, flagged, &mut buf)).fold((0.0, true), fold)
    };
    if !finite {
        for (k, x) in f.inv.iter_mut().enumerate() {
            *x = T::from_f32(if k / n == k % n { 1.0 } else { 0.0 });
        }
        return Outcome { flagged: false, max_abs: 1.0, reset: true };
    }
    Outcome { flagged: max_abs > spec.threshold, max_abs, reset: false }
}

/// Updates every factor (in parallel across factors and rows). `flagged[k]`
/// says whether factor k was flagged by the previous update; the outcomes
/// come back in factor order.
pub fn rank1_update<T: Float>(factors: &mut [Factor<'_, T>], flagged: &[bool], spec: &Spec) -> Result<Vec<Outcome>> {
    if flagged.len() != factors.len() {
        return Err(Error::Shape(format!("flags: expected {} entries (one per factor), got {}", factors.len(), flagged.len())));
    }
    for (k, f) in factors.iter().enumerate() {
        let n = f.v.len();
        if f.inv.len() != n * n {
            return Err(Error::Shape(format!(
                "factor {k}: inverse of {} elements does not match its vector of {n} (expected {n}x{n})",
                f.inv.len()
            )));
        }
    }
    Ok(factors.par_iter_mut().zip(flagged.par_iter()).map(|(f, &fl)| update_one(f, fl, spec)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;
    use half::{bf16, f16};

    /// The update in f64 with explicit inverses: inv(inv(M) + w wᵀ).
    fn explicit(w0: &[f64], v: &[f64], n: usize, a: f64, b: f64, s: f64) -> Vec<f64> {
        let m: Vec<f64> = (0..n * n).map(|k| a * w0[k] + if k / n == k % n { b } else { 0.0 }).collect();
        let mut minv = invert(&m, n);
        for i in 0..n {
            for j in 0..n {
                minv[i * n + j] += s * s * v[i] * v[j];
            }
        }
        invert(&minv, n)
    }

    fn invert(m: &[f64], n: usize) -> Vec<f64> {
        // Gauss-Jordan with partial pivoting.
        let mut a = m.to_vec();
        let mut inv: Vec<f64> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
        for c in 0..n {
            let p = (c..n).max_by(|&x, &y| a[x * n + c].abs().total_cmp(&a[y * n + c].abs())).unwrap();
            for j in 0..n {
                a.swap(c * n + j, p * n + j);
                inv.swap(c * n + j, p * n + j);
            }
            let d = a[c * n + c];
            for j in 0..n {
                a[c * n + j] /= d;
                inv[c * n + j] /= d;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for j in 0..n {
                        a[r * n + j] -= f * a[c * n + j];
                        inv[r * n + j] -= f * inv[c * n + j];
                    }
                }
            }
        }
        inv
    }

    fn run_modes(n: usize, steps: usize, seed: u64) {
        let mut g = XorShift::new(seed);
        let specs = [Spec::reference(0.9, 0.1, 1e9), Spec::paper(0.9, 0.1, 1e9, 0.0), Spec::paper(0.9, 0.1, 1e9, 0.3)];
        for spec in specs.map(|s| s.unwrap()) {
            let mut inv: Vec<f32> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
            for _ in 0..steps {
                let v: Vec<f32> = (0..n).map(|_| 0.3 * g.normal_ish()).collect();
                let w0: Vec<f64> = inv.iter().map(|&x| x as f64).collect();
                let vd: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                let want = explicit(&w0, &vd, n, spec.a as f64, spec.b as f64, spec.s as f64);
                let out = rank1_update(&mut [Factor { inv: &mut inv, v: &v }], &[false], &spec).unwrap();
                assert!(!out[0].reset);
                let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
                let err = inv.iter().zip(&want).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()));
                assert!(err <= 1e-4 * scale, "n={n} err {err} scale {scale}");
            }
        }
    }

    #[test]
    fn rank1_update_is_the_explicit_inverse_in_f32() {
        run_modes(5, 20, 1);
        run_modes(70, 5, 2); // the parallel row path
    }

    #[test]
    fn flagged_factor_is_blended_towards_identity_first() {
        let n = 3;
        let spec = Spec::reference(0.95, 0.25, 2.0).unwrap();
        let base: Vec<f32> = vec![4.0, 1.0, 0.0, 1.0, 3.0, 0.5, 0.0, 0.5, 2.0];
        let v = vec![0.1f32, -0.2, 0.3];
        let mut got = base.clone();
        rank1_update(&mut [Factor { inv: &mut got, v: &v }], &[true], &spec).unwrap();
        let blended: Vec<f64> = (0..9).map(|k| 0.75 * base[k] as f64 + if k / 3 == k % 3 { 0.25 } else { 0.0 }).collect();
        let want = explicit(&blended, &v.iter().map(|&x| x as f64).collect::<Vec<_>>(), n, 0.95, 0.05, 1.0);
        for (x, y) in got.iter().zip(&want) {
            assert!((*x as f64 - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn threshold_flags_and_nonfinite_resets() {
        let spec = Spec::reference(0.5, 0.1, 2.0).unwrap();
        let mut big: Vec<f16> = [10.0f32, 0.0, 0.0, 10.0].iter().map(|&x| f16::from_f32(x)).collect();
        let v = [0.0f32, 0.0];
        let out = rank1_update(&mut [Factor { inv: &mut big, v: &v }], &[false], &spec).unwrap();
        assert_eq!(out[0], Outcome { flagged: true, max_abs: 5.5, reset: false });
        let mut inv: Vec<f16> = [1.0f32, 0.0, 0.0, 1.0].iter().map(|&x| f16::from_f32(x)).collect();
        // A non-finite vector makes d non-finite: the rank-1 term is dropped
        // and W' = M = 0.5·I + 0.5·I.
        let nan = [f32::NAN, 1.0];
        let out = rank1_update(&mut [Factor { inv: &mut inv, v: &nan }], &[false], &spec).unwrap();
        assert_eq!(out[0], Outcome { flagged: false, max_abs: 1.0, reset: false });
        assert_eq!(inv.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), vec![1.0, 0.0, 0.0, 1.0]);
        // Overflow of f16 storage: M = 1e5·I is already past 65504.
        let spec = Spec::paper(1e-5, 0.0, 2.0, 0.0).unwrap();
        let mut inv: Vec<f16> = [1.0f32, 0.0, 0.0, 1.0].iter().map(|&x| f16::from_f32(x)).collect();
        let out = rank1_update(&mut [Factor { inv: &mut inv, v: &v }], &[false], &spec).unwrap();
        assert!(out[0].reset);
        assert!(inv.iter().all(|x| x.to_f32().is_finite()));
    }

    #[test]
    fn many_factors_match_one_at_a_time_and_any_thread_count() {
        let mut g = XorShift::new(7);
        let sizes = [1usize, 4, 65, 9, 130];
        let spec = Spec::reference(0.95, 0.1, 2.0).unwrap();
        let start: Vec<Vec<bf16>> = sizes.iter().map(|&n| (0..n * n).map(|k| bf16::from_f32(if k / n == k % n { 1.0 } else { 0.01 * g.normal_ish() })).collect()).collect();
        let vs: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| g.normal_ish()).collect()).collect();
        let flags: Vec<bool> = (0..sizes.len()).map(|k| k % 2 == 0).collect();
        let mut one: Vec<Vec<bf16>> = start.clone();
        let mut singles = Vec::new();
        for k in 0..sizes.len() {
            singles.extend(rank1_update(&mut [Factor { inv: &mut one[k], v: &vs[k] }], &flags[k..k + 1], &spec).unwrap());
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut all = start.clone();
            let outs = pool.install(|| {
                let mut fs: Vec<Factor<bf16>> = all.iter_mut().zip(&vs).map(|(inv, v)| Factor { inv, v }).collect();
                rank1_update(&mut fs, &flags, &spec).unwrap()
            });
            assert_eq!(outs, singles);
            for (a, b) in all.iter().zip(&one) {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    #[test]
    fn bad_shapes_and_constants_are_refused() {
        let spec = Spec::reference(0.9, 0.1, 2.0).unwrap();
        let mut inv = vec![1f32; 5];
        let err = rank1_update(&mut [Factor { inv: &mut inv, v: &[1.0, 2.0] }], &[false], &spec).unwrap_err().to_string();
        assert!(err.contains("factor 0") && err.contains("2x2"), "{err}");
        let err = rank1_update::<f32>(&mut [], &[false], &spec).unwrap_err().to_string();
        assert!(err.contains("flags"), "{err}");
        assert!(Spec::reference(1.0, 0.1, 2.0).unwrap_err().to_string().contains("stat_decay"));
        assert!(Spec::paper(0.9, 1.5, 2.0, 0.0).unwrap_err().to_string().contains("stabilization_factor"));
        assert!(Spec::paper(0.9, 0.5, 0.0, 0.0).unwrap_err().to_string().contains("stabilizer_threshold"));
        for bad in [-0.1, 1.5, f32::NAN] {
            assert!(Spec::paper(0.9, 0.5, 2.0, bad).unwrap_err().to_string().contains("damping"));
        }
    }
}
