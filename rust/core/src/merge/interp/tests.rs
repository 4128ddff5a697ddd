//! The fused interpolations against naive f64 references (one element at a
//! time, the formulas as written), their edge cases, and the same bits for
//! every chunk length and thread count.

use half::{bf16, f16};

use super::*;
use crate::merge::{SliceInputs, SliceOutput};
use crate::test_rng::XorShift;

fn run<T: Float, O: Float>(base: &[T], models: &[Vec<T>], how: Interp, row_len: usize, chunk: usize) -> (Vec<O>, InterpStats) {
    let mut out = vec![O::from_f32(f32::NAN); base.len()];
    let mut inputs = SliceInputs { base, models: models.iter().map(|m| &m[..]).collect(), has_base: true };
    let stats = interpolate(&mut inputs, how, row_len, &mut SliceOutput(&mut out), chunk).expect("interpolation");
    (out, stats)
}

fn f64s<T: Float>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// mergekit's slerp in f64: (c_a, c_b).
fn naive_slerp(t: f64, a: &[f64], b: &[f64]) -> (f64, f64) {
    let n = |x: &[f64]| {
        let v = dot(x, x).sqrt();
        if v > 1e-8 { v } else { 1.0 }
    };
    let d = (dot(a, b) / (n(a) * n(b))).clamp(-1.0, 1.0);
    if d.abs() > 0.9995 {
        return (1.0 - t, t);
    }
    let th = d.acos();
    (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin())
}

/// Model Stock's t in f64 over task vectors `taus`.
fn naive_stock_t(taus: &[Vec<f64>]) -> f64 {
    let k = taus.len();
    let mut cos = Vec::new();
    for i in 0..k {
        for j in i + 1..k {
            let norms = dot(&taus[i], &taus[i]).sqrt() * dot(&taus[j], &taus[j]).sqrt();
            cos.push((dot(&taus[i], &taus[j]) / norms.max(1e-6)).clamp(-1.0, 1.0));
        }
    }
    let c = cos.iter().sum::<f64>() / cos.len() as f64;
    let den = 1.0 + (k as f64 - 1.0) * c;
    if den.abs() < 1e-6 { 0.0 } else { k as f64 * c / den }
}

fn inputs<T: Float>(n: usize, k: usize, seed: u64, spread: f32) -> (Vec<T>, Vec<Vec<T>>) {
    let mut g = XorShift::new(seed);
    let base: Vec<T> = (0..n).map(|_| T::from_f32(g.normal_ish())).collect();
    let shared: Vec<f32> = (0..n).map(|_| g.normal_ish()).collect();
    let models = (0..k)
        .map(|_| base.iter().zip(&shared).map(|(b, s)| T::from_f32(b.to_f32() + spread * (s + g.normal_ish()))).collect())
        .collect();
    (base, models)
}

/// |ours − f64| ≤ |c|-weighted rounding: the f64 sums' error is below 2^-40
/// relative here, each f32 coefficient is within 2 ulp of the f64 one (one
/// rounding of an accurately computed value, plus the acos/sin conditioning
/// at most 2^-44 off), the combination takes 3 f32 roundings and the output
/// one rounding in O: so |ours − ref| ≤ 4·2^-24·(|c_a a| + |c_b b|) + ½ ulp_O(ref).
fn assert_close<O: Float>(got: &[O], want: &[f64], scale: &[f64], what: &str) {
    let out_ulp = 2f64.powi(-(match O::DTYPE {
        crate::DType::BF16 => 8,
        crate::DType::F16 => 11,
        _ => 24,
    }));
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let bound = 4.0 * 2f64.powi(-24) * s + out_ulp * w.abs() + 6e-8 * f64::from(O::DTYPE == crate::DType::F16);
        let err = (g.to_f32() as f64 - w).abs();
        assert!(err <= bound, "{what}: element {i}: {} vs {w} (|err| {err:e} > {bound:e})", g.to_f32());
    }
}

fn slerp_case<T: Float, O: Float>(n: usize, t: f32, seed: u64, spread: f32) {
    let (a, bs) = inputs::<T>(n, 1, seed, spread);
    let how = Interp::Slerp { t, dot_threshold: 0.9995, eps: 1e-8 };
    let (out, stats) = run::<T, O>(&a, &bs, how, 0, 1 << 20);
    let (a64, b64) = (f64s(&a), f64s(&bs[0]));
    let (ca, cb) = naive_slerp(t as f64, &a64, &b64);
    let [ga, gb] = stats.coefficients[0];
    let tol = |c: f64| 4.0 * 2f64.powi(-24) * c.abs().max(1e-30) + 1e-12;
    assert!((ga as f64 - ca).abs() <= tol(ca) && (gb as f64 - cb).abs() <= tol(cb), "{ga} {gb} vs {ca} {cb}");
    let want: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| ca * x + cb * y).collect();
    let scale: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| (ca * x).abs() + (cb * y).abs()).collect();
    assert_close(&out, &want, &scale, &format!("slerp {} -> {} n={n} t={t}", T::DTYPE, O::DTYPE));
}

#[test]
fn slerp_matches_a_float64_reference() {
    for n in [0usize, 1, 7, BLOCK - 1, BLOCK, 3 * BLOCK + 5] {
        for (t, seed) in [(0.3f32, 1u64), (0.0, 2), (1.0, 3), (0.77, 4)] {
            slerp_case::<f32, f32>(n, t, seed, 1.0);
            slerp_case::<bf16, bf16>(n, t, seed, 1.0);
            slerp_case::<f16, f16>(n, t, seed, 1.0);
            slerp_case::<bf16, f32>(n, t, seed, 1.0);
            slerp_case::<f32, bf16>(n, t, seed, 0.01); // nearly colinear: the lerp branch
        }
    }
}

#[test]
fn slerp_endpoints_colinear_and_antipodal_inputs() {
    let (a, bs) = inputs::<f32>(1000, 1, 9, 1.0);
    let how = |t| Interp::Slerp { t, dot_threshold: 0.9995, eps: 1e-8 };
    assert_eq!(run::<f32, f32>(&a, &bs, how(0.0), 0, 64).0, a);
    assert_eq!(run::<f32, f32>(&a, &bs, how(1.0), 0, 64).0, bs[0]);
    for scale in [3.0f32, -0.5] {
        let other: Vec<f32> = a.iter().map(|x| scale * x).collect();
        let (out, stats) = run::<f32, f32>(&a, &[other.clone()], how(0.3), 0, 100);
        assert_eq!(stats.coefficients[0], [1.0 - 0.3f32, 0.3]);
        let lerp: Vec<f32> = a.iter().zip(&other).map(|(x, y)| (1.0 - 0.3f32) * x + 0.3 * y).collect();
        assert_eq!(out, lerp);
    }
    // zero vectors: norms count as 1, the cosine is 0 (a quarter circle)
    let zeros = vec![0.0f32; 10];
    let (_, stats) = run::<f32, f32>(&zeros, &[a[..10].to_vec()], how(0.5), 0, 4);
    let c = (std::f64::consts::FRAC_PI_4.sin() / std::f64::consts::FRAC_PI_2.sin()) as f32;
    assert_eq!(stats.coefficients[0], [c, c]);
}

fn stock_case<T: Float, O: Float>(rows: usize, cols: usize, k: usize, row_wise: bool, seed: u64) {
    let n = rows * cols;
    let (base, ms) = inputs::<T>(n, k, seed, 0.1);
    let row_len = if row_wise { cols } else { 0 };
    let (out, stats) = run::<T, O>(&base, &ms, Interp::ModelStock, row_len, 3 * BLOCK + 8);
    let b64 = f64s(&base);
    // task vectors rounded to f32 first, as the torch reference takes them
    let taus: Vec<Vec<f64>> =
        ms.iter().map(|m| m.iter().zip(&base).map(|(x, b)| (x.to_f32() - b.to_f32()) as f64).collect()).collect();
    let span = if row_wise { cols.max(1) } else { n.max(1) };
    let (mut want, mut scale) = (vec![0.0; n], vec![0.0; n]);
    for (r, start) in (0..n).step_by(span).enumerate() {
        let end = (start + span).min(n);
        let row_taus: Vec<Vec<f64>> = taus.iter().map(|t| t[start..end].to_vec()).collect();
        let t = naive_stock_t(&row_taus);
        let [gt, gu] = stats.coefficients[r];
        assert!((gt as f64 - t).abs() <= 1e-5 * t.abs().max(1.0), "row {r}: t {gt} vs {t}");
        assert_eq!(gu, 1.0 - gt);
        for i in start..end {
            let avg = ms.iter().map(|m| m[i].to_f32() as f64).sum::<f64>() / k as f64;
            // With our t (checked just above), only the combination's rounding:
            // the f32 sum of k models errs by < (k − 1)·2^-24·Σ|x_i|, so after
            // the division by k by < 2^-24·Σ|x_i|; then 3 more roundings.
            let abs_sum = ms.iter().map(|m| m[i].to_f32().abs() as f64).sum::<f64>();
            want[i] = gt as f64 * avg + gu as f64 * b64[i];
            scale[i] = (gt as f64).abs() * abs_sum + (gt as f64 * avg).abs() + (gu as f64 * b64[i]).abs();
        }
    }
    assert_close(&out, &want, &scale, &format!("model_stock {} -> {} {rows}x{cols} k={k} rows={row_wise}", T::DTYPE, O::DTYPE));
}

#[test]
fn model_stock_matches_a_float64_reference() {
    for (rows, cols) in [(0usize, 5usize), (1, 1), (3, 7), (5, BLOCK + 3), (1, 2 * BLOCK + 1)] {
        for k in [2usize, 3, 5] {
            for row_wise in [false, true] {
                stock_case::<f32, f32>(rows, cols, k, row_wise, (rows * 31 + cols + k) as u64);
                stock_case::<bf16, bf16>(rows, cols, k, row_wise, 7);
                stock_case::<f16, f32>(rows, cols, k, row_wise, 8);
            }
        }
    }
}

#[test]
fn model_stock_keeps_the_base_where_singular() {
    let (base, ms) = inputs::<f32>(300, 1, 11, 0.1);
    let d: Vec<f32> = ms[0].iter().zip(&base).map(|(x, b)| x - b).collect();
    let plus: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b + d).collect();
    let minus: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b - d).collect();
    for row_len in [0, 30] {
        let (out, stats) = run::<f32, f32>(&base, &[plus.clone(), minus.clone()], Interp::ModelStock, row_len, 64);
        assert!(stats.coefficients.iter().all(|c| *c == [0.0, 1.0]));
        assert_eq!(out, base);
        assert_eq!(stats.changed, 0);
    }
}

#[test]
fn the_same_bits_for_every_chunk_length_and_thread_count() {
    let (base, ms) = inputs::<bf16>(5 * BLOCK + 77, 3, 13, 0.1);
    let n = base.len();
    let row_len = n / 7 * 0 + 77; // rows of 77, n divisible? ensure it is
    let n_rows = n - n % row_len;
    let (base, ms): (Vec<bf16>, Vec<Vec<bf16>>) = (base[..n_rows].to_vec(), ms.iter().map(|m| m[..n_rows].to_vec()).collect());
    let slerp = Interp::Slerp { t: 0.4, dot_threshold: 0.9995, eps: 1e-8 };
    let stock_models = ms.clone();
    let one: Vec<Vec<bf16>> = vec![ms[0].clone()];
    let cases: [(Interp, &[Vec<bf16>], usize); 3] =
        [(slerp, &one, 0), (Interp::ModelStock, &stock_models, 0), (Interp::ModelStock, &stock_models, row_len)];
    for (how, models, rl) in cases {
        let want = run::<bf16, bf16>(&base, models, how, rl, 1 << 22);
        for threads in [1, 3] {
            for chunk in [1, 100, BLOCK, 2 * BLOCK + 1] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
                let got = pool.install(|| run::<bf16, bf16>(&base, models, how, rl, chunk));
                assert_eq!(got.1, want.1, "{how:?} threads={threads} chunk={chunk}");
                assert!(got.0.iter().zip(&want.0).all(|(x, y)| x.to_bits() == y.to_bits()), "{how:?} {threads} {chunk}");
            }
        }
    }
}

#[test]
fn nonfinite_inputs_write_nothing() {
    let (base, ms) = inputs::<f16>(2000, 2, 17, 0.1);
    for (which, at, v) in [(0usize, 5usize, f16::NAN), (1, 1999, f16::INFINITY), (2, 0, f16::NEG_INFINITY)] {
        let (mut b, mut m) = (base.clone(), ms.clone());
        if which == 0 { b[at] = v } else { m[which - 1][at] = v }
        for how in [Interp::ModelStock, Interp::Slerp { t: 0.5, dot_threshold: 0.9995, eps: 1e-8 }] {
            let models = if matches!(how, Interp::ModelStock) { m.clone() } else { vec![m[which.max(1) - 1].clone()] };
            let (out, stats) = run::<f16, f16>(&b, &models, how, 0, 512);
            if matches!(how, Interp::Slerp { .. }) && which == 2 && models[0][at].to_f32().is_finite() {
                continue; // this slerp case does not read the planted model
            }
            assert!(stats.nonfinite, "{how:?} which={which}");
            assert!(out.iter().all(|x| x.to_f32().is_nan()), "the output was written");
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let (base, ms) = inputs::<f32>(12, 2, 19, 0.1);
    let mut out = vec![0.0f32; 12];
    let mut go = |how, models: &[Vec<f32>], row_len| {
        let mut inputs = SliceInputs { base: &base, models: models.iter().map(|m| &m[..]).collect(), has_base: true };
        interpolate(&mut inputs, how, row_len, &mut SliceOutput(&mut out), 8).map(|_| ()).unwrap_err().to_string()
    };
    let slerp = Interp::Slerp { t: 0.5, dot_threshold: 0.9995, eps: 1e-8 };
    assert!(go(slerp, &ms, 0).contains("slerp: expected the base and 1 other model, got 2"));
    assert!(go(Interp::ModelStock, &ms[..1], 0).contains("at least 2 models besides the base, got 1"));
    assert!(go(Interp::ModelStock, &ms, 5).contains("row length 5 does not divide the tensor's 12 elements"));
    let nan_t = Interp::Slerp { t: f32::NAN, dot_threshold: 0.9995, eps: 1e-8 };
    assert!(go(nan_t, &ms[..1], 0).contains("t must be finite"));
}
