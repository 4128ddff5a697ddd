//! Fused state updates of the Hessian-based optimizers (SophiaG/H,
//! AdaHessian): one call per parameter group over all of its tensors
//! (foreach style), parallel over pieces of `CHUNK` elements.
//!
//! Parameters and gradients are f32, f16 or bf16; the state (EMAs) is f32
//! and every element is computed in f32 in one fixed order of correctly
//! rounded operations (Rust never contracts them into FMAs), which
//! `cuda/optim_hessian.cu` repeats, so CPU and CUDA give the same bits. The
//! counts returned are integers summed over pieces, so they do not depend on
//! the thread count either.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::simd::multiversion;
use crate::Float;

/// Elements per parallel piece.
const CHUNK: usize = 1 << 15;

/// One Sophia step's hyperparameters (shared by a parameter group).
#[derive(Clone, Copy, Debug)]
pub struct Sophia {
    pub lr: f32,
    pub beta1: f32,
    /// 1 − β1, rounded once from the exact value (1 − β1 in f32 would be
    /// 1.3e-5 off for β = 0.999).
    pub one_minus_beta1: f32,
    /// γ of the paper (the `rho` of the official code): the Hessian scale.
    pub rho: f32,
    /// Floor of the denominator, max(ρ·h, ε).
    pub eps: f32,
    /// Decoupled weight decay as a factor, 1 − lr·λ (rounded to f32 by the caller).
    pub decay: f32,
}

/// A Hessian refresh fused into the step: h ← β2·h + (1 − β2)·(scale·x·y),
/// where x·y is z ⊙ Hz (Hutchinson) or g ⊙ g on sampled labels with scale B
/// (Gauss–Newton–Bartlett).
#[derive(Clone, Copy, Debug)]
pub struct Refresh {
    pub beta2: f32,
    /// 1 − β2, rounded once.
    pub one_minus_beta2: f32,
    pub scale: f32,
}

/// One AdaHessian step's hyperparameters.
#[derive(Clone, Copy, Debug)]
pub struct AdaHessian {
    /// lr / (1 − β1^t): the bias-corrected step size.
    pub step_size: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 − β1 and 1 − β2, each rounded once.
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// 1 − β2^t.
    pub bias_correction2: f32,
    pub eps: f32,
    /// The Hessian power k: the denominator is (v / (1 − β2^t))^(k/2) + ε.
    pub power: f32,
    /// 1 − lr·λ.
    pub decay: f32,
}

/// The tensors of one parameter for [`sophia_update`].
pub struct SophiaTensor<'a, T> {
    pub param: &'a mut [T],
    pub grad: &'a [T],
    pub m: &'a mut [f32],
    pub h: &'a mut [f32],
    /// (x, y) of the refresh, when the call refreshes h.
    pub probe: Option<(&'a [T], &'a [T])>,
}

/// The tensors of one parameter for [`adahessian_update`].
pub struct AdaHessianTensor<'a, T> {
    pub param: &'a mut [T],
    pub grad: &'a [T],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    /// The (spatially averaged) Hessian diagonal estimate D, on refresh steps;
    /// with `probe`, D is `d ⊙ probe` (Hz and z, the product fused here).
    pub d: Option<&'a [T]>,
    pub probe: Option<&'a [T]>,
}

/// Element counts of one call, for the optimizers' `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sophia: elements whose ratio m / max(ρh, ε) was clipped to ±1.
    pub clipped: u64,
    /// Elements with a positive Hessian estimate after a refresh (Sophia: h;
    /// AdaHessian: D); 0 without a refresh.
    pub positive: u64,
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts { clipped: self.clipped + o.clipped, positive: self.positive + o.positive }
    }
}

/// One Sophia element: refresh h (when `probe`), decay θ, m ← β1·m + (1−β1)·g,
/// θ ← θ − lr·clip(m / max(ρ·h, ε), 1). Returns (θ, m, h, clipped, positive).
#[inline(always)]
pub(crate) fn sophia1(s: &Sophia, refresh: Option<(f32, f32, f32, f32, f32)>, p: f32, g: f32, m: f32, h: f32) -> (f32, f32, f32, bool, bool) {
    let (h, positive) = match refresh {
        Some((beta2, omb2, scale, x, y)) => {
            let est = scale * x * y;
            let h = beta2 * h + omb2 * est;
            (h, h > 0.0)
        }
        None => (h, false),
    };
    let p = p * s.decay;
    let m = s.beta1 * m + s.one_minus_beta1 * g;
    let scaled = s.rho * h;
    // `>` keeps ε for a NaN ρh as fmaxf does on the device.
    let den = if scaled > s.eps { scaled } else { s.eps };
    let r = m / den;
    // Selects, not branches (the sign of a clipped ratio is a coin flip, so
    // branches mispredict); a NaN ratio is neither clipped nor changed.
    let (hi, lo) = (r >= 1.0, r <= -1.0);
    let r = if hi { 1.0 } else if lo { -1.0 } else { r };
    (p - s.lr * r, m, h, hi | lo, positive)
}

/// One AdaHessian element. Returns (θ, m, v, positive). `SQRT` is
/// `a.power == 1`, decided once per piece so the loop has no call in it.
#[inline(always)]
pub(crate) fn adahessian1<const SQRT: bool>(a: &AdaHessian, d: Option<f32>, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32, bool) {
    let m = a.beta1 * m + a.one_minus_beta1 * g;
    let (v, positive) = match d {
        Some(d) => (a.beta2 * v + a.one_minus_beta2 * (d * d), d > 0.0),
        None => (v, false),
    };
    let q = v / a.bias_correction2;
    // k = 1 (the default) is a square root, correctly rounded on both sides.
    let den = (if SQRT { q.sqrt() } else { crate::philox::det_pow(q, 0.5 * a.power) }) + a.eps;  // bitwise the GPU's
    let p = p * a.decay;
    (p - a.step_size * (m / den), m, v, positive)
}

fn check(what: &str, i: usize, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Shape(format!("{what}[{i}]: expected {expected} elements (those of params[{i}]), got {actual}")))
    }
}

fn check_hyper(name: &str, v: f32) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::Value(format!("{name}: expected a finite value, got {v}")))
    }
}

multiversion! {
    /// One parallel piece of [`sophia_update`]; refresh decided once per piece.
    fn sophia_piece<T: Float>(s: &Sophia, p: &mut [T], g: &[T], m: &mut [f32], h: &mut [f32], probe: Option<(&[T], &[T])>, r: Option<Refresh>) -> Counts {
        let mut c = Counts::default();
        match (probe, r) {
            (Some((x, y)), Some(r)) => {
                for i in 0..p.len() {
                    let rf = Some((r.beta2, r.one_minus_beta2, r.scale, x[i].to_f32(), y[i].to_f32()));
                    let (np, nm, nh, clipped, positive) = sophia1(s, rf, p[i].to_f32(), g[i].to_f32(), m[i], h[i]);
                    (p[i], m[i], h[i]) = (T::from_f32(np), nm, nh);
                    c.clipped += clipped as u64;
                    c.positive += positive as u64;
                }
            }
            _ => {
                for i in 0..p.len() {
                    let (np, nm, _, clipped, _) = sophia1(s, None, p[i].to_f32(), g[i].to_f32(), m[i], h[i]);
                    (p[i], m[i]) = (T::from_f32(np), nm);
                    c.clipped += clipped as u64;
                }
            }
        }
        c
    }
}

multiversion! {
    /// One parallel piece of [`adahessian_update`]: `est` is (D, None) or
    /// (Hz, Some(z)) on refresh steps.
    fn adahessian_piece<T: Float>(a: &AdaHessian, sqrt: bool, p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], est: Option<(&[T], Option<&[T]>)>) -> Counts {
        if sqrt {
            ada_loops::<T, true>(a, p, g, m, v, est)
        } else {
            ada_loops::<T, false>(a, p, g, m, v, est)
        }
    }
}

/// `SQRT` is `a.power == 1`, decided once per piece so the loop has no call in it.
#[inline(always)]
fn ada_loops<T: Float, const SQRT: bool>(a: &AdaHessian, p: &mut [T], g: &[T], m: &mut [f32], v: &mut [f32], est: Option<(&[T], Option<&[T]>)>) -> Counts {
    let mut c = Counts::default();
    match est {
        Some((d, Some(z))) => {
            for i in 0..p.len() {
                // z = ±1 for Hutchinson, so the product is exact (as z * hz in torch).
                let dz = d[i].to_f32() * z[i].to_f32();
                let (np, nm, nv, positive) = adahessian1::<SQRT>(a, Some(dz), p[i].to_f32(), g[i].to_f32(), m[i], v[i]);
                (p[i], m[i], v[i]) = (T::from_f32(np), nm, nv);
                c.positive += positive as u64;
            }
        }
        Some((d, None)) => {
            for i in 0..p.len() {
                let (np, nm, nv, positive) = adahessian1::<SQRT>(a, Some(d[i].to_f32()), p[i].to_f32(), g[i].to_f32(), m[i], v[i]);
                (p[i], m[i], v[i]) = (T::from_f32(np), nm, nv);
                c.positive += positive as u64;
            }
        }
        None => {
            for i in 0..p.len() {
                let (np, nm, _, _) = adahessian1::<SQRT>(a, None, p[i].to_f32(), g[i].to_f32(), m[i], v[i]);
                (p[i], m[i]) = (T::from_f32(np), nm);
            }
        }
    }
    c
}

/// One fused Sophia step over all tensors of a group; `refresh` is given
/// exactly when every tensor has a probe.
pub fn sophia_update<T: Float>(tensors: &mut [SophiaTensor<'_, T>], s: &Sophia, refresh: Option<&Refresh>) -> Result<Counts> {
    for (name, v) in [("lr", s.lr), ("beta1", s.beta1), ("one_minus_beta1", s.one_minus_beta1), ("rho", s.rho), ("eps", s.eps), ("decay", s.decay)] {
        check_hyper(name, v)?;
    }
    if let Some(r) = refresh {
        check_hyper("beta2", r.beta2)?;
        check_hyper("one_minus_beta2", r.one_minus_beta2)?;
        check_hyper("scale", r.scale)?;
    }
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check("grads", i, n, t.grad.len())?;
        check("exp_avg", i, n, t.m.len())?;
        check("hessian", i, n, t.h.len())?;
        match (t.probe, refresh) {
            (Some((x, y)), Some(_)) => {
                check("probe_x", i, n, x.len())?;
                check("probe_y", i, n, y.len())?;
            }
            (None, None) => {}
            (Some(_), None) => return Err(Error::Value(format!("probe[{i}]: given without a refresh (beta2)"))),
            (None, Some(_)) => return Err(Error::Value(format!("probe[{i}]: missing; a refresh needs one per tensor"))),
        }
    }
    let mut pieces = Vec::new();
    for t in tensors.iter_mut() {
        let probe = t.probe;
        let chunks = t.param.chunks_mut(CHUNK).zip(t.grad.chunks(CHUNK)).zip(t.m.chunks_mut(CHUNK)).zip(t.h.chunks_mut(CHUNK));
        for (k, (((p, g), m), h)) in chunks.enumerate() {
            let probe = probe.map(|(x, y)| (&x[k * CHUNK..k * CHUNK + p.len()], &y[k * CHUNK..k * CHUNK + p.len()]));
            pieces.push((p, g, m, h, probe));
        }
    }
    let refresh = refresh.copied();
    Ok(pieces
        .into_par_iter()
        .map(|(p, g, m, h, probe)| sophia_piece(s, p, g, m, h, probe, refresh))
        .reduce(Counts::default, |a, b| a + b))
}

/// One fused AdaHessian step over all tensors of a group; D is given (for
/// every tensor) on refresh steps, when v is updated.
pub fn adahessian_update<T: Float>(tensors: &mut [AdaHessianTensor<'_, T>], a: &AdaHessian) -> Result<Counts> {
    for (name, v) in [
        ("step_size", a.step_size), ("beta1", a.beta1), ("beta2", a.beta2), ("one_minus_beta1", a.one_minus_beta1),
        ("one_minus_beta2", a.one_minus_beta2), ("bias_correction2", a.bias_correction2),
        ("eps", a.eps), ("power", a.power), ("decay", a.decay),
    ] {
        check_hyper(name, v)?;
    }
    let refresh = tensors.first().is_some_and(|t| t.d.is_some());
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        check("grads", i, n, t.grad.len())?;
        check("exp_avg", i, n, t.m.len())?;
        check("exp_hessian_diag_sq", i, n, t.v.len())?;
        match t.d {
            Some(d) if refresh => check("hessian", i, n, d.len())?,
            None if !refresh => {}
            _ => return Err(Error::Value(format!("hessian[{i}]: give a Hessian estimate for every tensor or for none"))),
        }
        match t.probe {
            Some(z) if t.d.is_some() => check("probe", i, n, z.len())?,
            Some(_) => return Err(Error::Value(format!("probe[{i}]: given without a Hessian estimate"))),
            None => {}
        }
    }
    let mut pieces = Vec::new();
    for t in tensors.iter_mut() {
        let (d, z) = (t.d, t.probe);
        let chunks = t.param.chunks_mut(CHUNK).zip(t.grad.chunks(CHUNK)).zip(t.m.chunks_mut(CHUNK)).zip(t.v.chunks_mut(CHUNK));
        for (k, (((p, g), m), v)) in chunks.enumerate() {
            let r = k * CHUNK..k * CHUNK + p.len();
            pieces.push((p, g, m, v, d.map(|d| (&d[r.clone()], z.map(|z| &z[r])))));
        }
    }
    let sqrt = a.power == 1.0;
    Ok(pieces
        .into_par_iter()
        .map(|(p, g, m, v, d)| adahessian_piece(a, sqrt, p, g, m, v, d))
        .reduce(Counts::default, |a, b| a + b))
}

/// Rademacher probes from the Philox stream: element `e` of a tensor written
/// at `offset` is +1 when lane `offset + e` of stream (`seed`, `stream`) has
/// its top bit clear, −1 otherwise. That is `uniform < 0.5` for ferrox's
/// uniforms (`((bits >> 9) + 0.5)·2^-23 < 0.5` ⇔ `bits < 2^31`), so the probes
/// equal `philox.uniform(...) < 0.5` bit for bit, without the f32 detour.
/// One call fills every tensor of a step, in parallel.
pub fn rademacher_fill<T: Float>(seed: u64, stream: u64, outs: &mut [(u64, &mut [T])]) {
    let mut pieces = Vec::new();
    for (offset, out) in outs.iter_mut() {
        for (k, piece) in out.chunks_mut(CHUNK).enumerate() {
            pieces.push((offset.wrapping_add((k * CHUNK) as u64), piece));
        }
    }
    pieces.into_par_iter().for_each(|(e0, out)| rademacher_piece(seed, stream, e0, out));
}

#[inline(always)]
fn sign<T: Float>(bits: u32) -> T {
    T::from_f32(f32::from_bits(0x3f80_0000 | (bits & 0x8000_0000)))
}

multiversion! {
    /// Probes of elements `e0 ..` into `out`: scalar blocks up to a block
    /// boundary and at the tail, `L` blocks side by side (so the rounds
    /// vectorise) in between.
    fn rademacher_piece<T: Float>(seed: u64, stream: u64, e0: u64, out: &mut [T]) -> () {
        const L: usize = 16;
        let (mut e, mut i) = (e0, 0usize);
        while i < out.len() {
            if e & 3 == 0 && out.len() - i >= 4 * L {
                let mut bits = [0u32; 4 * L];
                crate::philox::philox_blocks::<L>(seed, stream, e >> 2, &mut bits);
                for (o, &b) in out[i..i + 4 * L].iter_mut().zip(&bits) {
                    *o = sign(b);
                }
                i += 4 * L;
                e = e.wrapping_add(4 * L as u64);
            } else {
                let lane = (e & 3) as usize;
                let block = crate::philox::philox_block(seed, stream, e >> 2);
                let take = (4 - lane).min(out.len() - i);
                for j in 0..take {
                    out[i + j] = sign(block[lane + j]);
                }
                i += take;
                e = e.wrapping_add(take as u64);
            }
        }
    }
}

multiversion! {
    /// No NaN or ±inf in `p` (branch-free, so it vectorises).
    fn finite_piece<T: Float>(p: &[T]) -> bool {
        p.iter().fold(true, |ok, v| ok & v.to_f32().is_finite())
    }
}

/// True when no element of `tensors` is NaN or ±inf; a parallel scan that
/// allocates nothing (the optimizers' pre-update check).
pub fn all_finite<T: Float>(tensors: &[&[T]]) -> bool {
    let pieces: Vec<&[T]> = tensors.iter().flat_map(|t| t.chunks(CHUNK)).collect();
    // Branch-free per piece (so it vectorises); pieces stop early once one fails.
    pieces.into_par_iter().all(|p| finite_piece(p))
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::test_rng::XorShift;

    const S: Sophia = Sophia { lr: 0.01, beta1: 0.965, one_minus_beta1: 0.035, rho: 0.04, eps: 1e-12, decay: 1.0 - 0.01 * 0.1 };

    fn vals(rng: &mut XorShift, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.normal_ish() * scale).collect()
    }

    /// A scalar f64 reference of the paper's update, for the tolerance checks.
    fn sophia_ref(p: f64, g: f64, m: f64, h: f64, xy: Option<f64>, beta2: f64) -> (f64, f64, f64) {
        let h = xy.map_or(h, |e| beta2 * h + 0.01f32 as f64 * e);
        let m = S.beta1 as f64 * m + S.one_minus_beta1 as f64 * g;
        let r = (m / (S.rho as f64 * h).max(S.eps as f64)).clamp(-1.0, 1.0);
        (p * S.decay as f64 - S.lr as f64 * r, m, h)
    }

    #[test]
    fn sophia_matches_an_f64_reference_and_is_thread_count_free() {
        let mut rng = XorShift::new(7);
        let sizes = [1usize, 33, CHUNK + 5, 3];
        let mk = |rng: &mut XorShift| sizes.iter().map(|&n| (vals(rng, n, 1.0), vals(rng, n, 0.1), vals(rng, n, 0.01), vals(rng, n, 0.5))).collect::<Vec<_>>();
        let data = mk(&mut rng);
        let probes: Vec<(Vec<f32>, Vec<f32>)> = sizes.iter().map(|&n| (vals(&mut rng, n, 1.0), vals(&mut rng, n, 1.0))).collect();
        let run = |threads: usize, refresh: bool| {
            let mut d = data.clone();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let counts = pool.install(|| {
                let mut ts: Vec<SophiaTensor<f32>> = d
                    .iter_mut()
                    .zip(&probes)
                    .map(|((p, g, m, h), (x, y))| SophiaTensor { param: p, grad: g, m, h, probe: refresh.then_some((&x[..], &y[..])) })
                    .collect();
                sophia_update(&mut ts, &S, refresh.then_some(&Refresh { beta2: 0.99, one_minus_beta2: 0.01, scale: 2.0 })).unwrap()
            });
            (d, counts)
        };
        for refresh in [false, true] {
            let (one, c1) = run(1, refresh);
            let (four, c4) = run(4, refresh);
            assert_eq!(c1, c4);
            let mut clipped = 0;
            for (t, ((p0, g, m0, h0), (x, y))) in data.iter().zip(&probes).enumerate() {
                for i in 0..p0.len() {
                    let xy = refresh.then(|| 2.0 * x[i] as f64 * y[i] as f64);
                    let (p, m, h) = sophia_ref(p0[i] as f64, g[i] as f64, m0[i] as f64, h0[i] as f64, xy, 0.99f32 as f64);
                    let (gp, gm, gh) = (one[t].0[i], one[t].2[i], one[t].3[i]);
                    assert_eq!(gp.to_bits(), four[t].0[i].to_bits());
                    // A few f32 roundings, relative to the terms (they may cancel).
                    let b1 = S.beta1 as f64;
                    let m_scale = b1 * (m0[i] as f64).abs() + S.one_minus_beta1 as f64 * (g[i] as f64).abs();
                    let h_scale = 0.99 * (h0[i] as f64).abs() + 0.01 * xy.unwrap_or(0.0).abs();
                    assert!((gm as f64 - m).abs() <= 4.0 * f32::EPSILON as f64 * m_scale, "m {gm} vs {m}");
                    assert!((gh as f64 - h).abs() <= 4.0 * f32::EPSILON as f64 * h_scale, "h {gh} vs {h}");
                    // Near the clip boundary the f32 ratio may round either way: allow lr·1e-4.
                    assert!((gp as f64 - p).abs() <= 1e-6 * p.abs() + 1e-4 * S.lr as f64, "p {gp} vs {p}");
                    // |Δθ| ≤ lr, up to the two f32 roundings of θ.
                    let bound = S.lr as f64 + 2.0 * f32::EPSILON as f64 * (p0[i] as f64).abs().max(1.0);
                    assert!((gp as f64 - p0[i] as f64 * S.decay as f64).abs() <= bound, "|Δθ| > lr");
                    let ratio = m / (S.rho as f64 * h).max(S.eps as f64);
                    clipped += (ratio.abs() >= 1.0) as u64;
                }
            }
            assert!(c1.clipped.abs_diff(clipped) <= 2, "clip count {} vs {clipped}", c1.clipped);
        }
    }

    #[test]
    fn bf16_params_round_once_from_the_f32_update() {
        let mut rng = XorShift::new(3);
        let n = 1000;
        let p0: Vec<bf16> = vals(&mut rng, n, 1.0).into_iter().map(bf16::from_f32).collect();
        let g: Vec<bf16> = vals(&mut rng, n, 0.1).into_iter().map(bf16::from_f32).collect();
        let (mut m, mut h) = (vec![0f32; n], vec![0.5f32; n]);
        let mut p = p0.clone();
        sophia_update(&mut [SophiaTensor { param: &mut p, grad: &g, m: &mut m, h: &mut h, probe: None }], &S, None).unwrap();
        for i in 0..n {
            let (want, wm, _, _, _) = sophia1(&S, None, p0[i].to_f32(), g[i].to_f32(), 0.0, 0.5);
            assert_eq!(p[i], bf16::from_f32(want));
            assert_eq!(m[i].to_bits(), wm.to_bits());
        }
    }

    #[test]
    fn adahessian_matches_an_f64_reference() {
        let mut rng = XorShift::new(11);
        let n = CHUNK + 77;
        let (p0, g, m0) = (vals(&mut rng, n, 1.0), vals(&mut rng, n, 0.1), vals(&mut rng, n, 0.05));
        let v0: Vec<f32> = vals(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
        let d = vals(&mut rng, n, 1.0);
        for power in [1.0f32, 0.5] {
            let a = AdaHessian { step_size: 0.1 / (1.0 - 0.9f32.powi(3)), beta1: 0.9, beta2: 0.999, one_minus_beta1: 0.1, one_minus_beta2: 0.001, bias_correction2: 1.0 - 0.999f32.powi(3), eps: 1e-4, power, decay: 0.999 };
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            let c = adahessian_update(&mut [AdaHessianTensor { param: &mut p, grad: &g, m: &mut m, v: &mut v, d: Some(&d), probe: None }], &a).unwrap();
            assert_eq!(c.positive, d.iter().filter(|&&x| x > 0.0).count() as u64);
            // D fused from (|D|, sign) — a ±1 probe — gives the same bits.
            let (abs, z): (Vec<f32>, Vec<f32>) = d.iter().map(|&x| (x.abs(), if x.is_sign_negative() { -1.0 } else { 1.0 })).unzip();
            let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
            let c2 = adahessian_update(&mut [AdaHessianTensor { param: &mut p2, grad: &g, m: &mut m2, v: &mut v2, d: Some(&abs), probe: Some(&z) }], &a).unwrap();
            assert_eq!(c2, c);
            assert!(p2.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()) && v2 == v);
            for i in 0..n {
                // The f32 hyperparameters, exactly (1 − 0.999f32 is 1.3e-5 off 0.001).
                let (b1, b2, c1, c2) = (a.beta1 as f64, a.beta2 as f64, a.one_minus_beta1 as f64, a.one_minus_beta2 as f64);
                let wm = b1 * m0[i] as f64 + c1 * g[i] as f64;
                let wv = b2 * v0[i] as f64 + c2 * (d[i] as f64).powi(2);
                let den = (wv / a.bias_correction2 as f64).powf(power as f64 / 2.0) + a.eps as f64;
                let wp = p0[i] as f64 * a.decay as f64 - a.step_size as f64 * wm / den;
                let m_scale = b1 * (m0[i] as f64).abs() + c1 * (g[i] as f64).abs();
                assert!((m[i] as f64 - wm).abs() <= 4.0 * f32::EPSILON as f64 * m_scale);
                assert!((v[i] as f64 - wv).abs() <= 4.0 * f32::EPSILON as f64 * wv);
                assert!((p[i] as f64 - wp).abs() <= 1e-5 * wp.abs().max(1e-2), "p {} vs {wp}", p[i]);
            }
        }
    }

    #[test]
    fn shapes_and_hyperparameters_are_checked_before_writing() {
        let (mut p, g, mut m, mut h) = (vec![1f32; 4], vec![1f32; 3], vec![0f32; 4], vec![0f32; 4]);
        let err = sophia_update(&mut [SophiaTensor { param: &mut p, grad: &g, m: &mut m, h: &mut h, probe: None }], &S, None).unwrap_err();
        assert!(err.to_string().contains("grads[0]"), "{err}");
        assert_eq!(p, vec![1f32; 4]);
        let g = vec![1f32; 4];
        let bad = Sophia { lr: f32::NAN, ..S };
        let err = sophia_update(&mut [SophiaTensor { param: &mut p, grad: &g, m: &mut m, h: &mut h, probe: None }], &bad, None).unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        let err = sophia_update(&mut [SophiaTensor { param: &mut p, grad: &g, m: &mut m, h: &mut h, probe: None }], &S, Some(&Refresh { beta2: 0.9, one_minus_beta2: 0.1, scale: 1.0 }))
            .unwrap_err();
        assert!(err.to_string().contains("probe[0]"), "{err}");
        assert_eq!(p, vec![1f32; 4]);
    }

    #[test]
    fn rademacher_is_the_sign_of_the_uniform_at_any_offset_and_thread_count() {
        let seed = 0x1234_5678_9abc_def0u64;
        for (offset, n) in [(0u64, 1usize), (3, 70), (5u64 << 40, CHUNK + 37), (u64::MAX - 2, 9)] {
            let mut u = vec![0f32; n];
            crate::philox::fill_uniform(seed, 7, offset, &mut u);
            let want: Vec<f32> = u.iter().map(|&u| if u < 0.5 { 1.0 } else { -1.0 }).collect();
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (mut a, mut b) = (vec![0f32; n], vec![bf16::ZERO; n + 2]);
                pool.install(|| {
                    rademacher_fill(seed, 7, &mut [(offset, &mut a[..]), (offset.wrapping_add(1), &mut vec![0f32; n][..])]);
                    rademacher_fill(seed, 7, &mut [(offset, &mut b[..n])]);
                });
                assert_eq!(a, want, "offset {offset}");
                assert!(b[..n].iter().zip(&want).all(|(x, &w)| x.to_f32() == w) && b[n..] == [bf16::ZERO; 2]);
            }
        }
    }

    #[test]
    fn all_finite_finds_one_bad_element_anywhere() {
        let n = 2 * CHUNK + 3;
        let ok = vec![1.5f32; n];
        assert!(all_finite::<f32>(&[&ok, &ok[..1]]));
        assert!(all_finite::<f32>(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, CHUNK, n - 1] {
                let mut v = ok.clone();
                v[at] = bad;
                assert!(!all_finite::<f32>(&[&ok, &v]), "{bad} at {at}");
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                assert!(!all_finite::<bf16>(&[&h]));
            }
        }
        // The largest finite values are finite (no overflow as in a sum).
        assert!(all_finite::<f32>(&[&[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0]]));
    }
}
