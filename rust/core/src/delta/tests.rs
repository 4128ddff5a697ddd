//! Compression, restore and the CPU matmul against naive references: signs
//! and α in f64 one element at a time, the ±1 matrix spelled out densely.

use half::{bf16, f16};

use super::matmul::{dot_one, matmul_multi_with, Dims, Kernel};
use super::*;
use crate::test_rng::XorShift;

/// base and ft with exact ties (Δ = 0), ±0 pairs and ordinary deltas.
fn pair<T: Float>(n: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut g = XorShift::new(seed);
    let mut base = Vec::with_capacity(n);
    let mut ft = Vec::with_capacity(n);
    for _ in 0..n {
        let b = T::from_f32(g.normal_ish());
        let f = match g.below(8) {
            0 => b,
            1 => T::from_f32(if g.below(2) == 0 { -0.0 } else { 0.0 }),
            _ => T::from_f32(b.to_f32() + 0.05 * g.normal_ish()),
        };
        let b = if g.below(50) == 0 { T::from_f32(if g.below(2) == 0 { -0.0 } else { 0.0 }) } else { b };
        base.push(b);
        ft.push(f);
    }
    (base, ft)
}

/// The layout bit by bit: bit 1 iff ft < base; padding zero.
fn naive_signs<T: Float>(base: &[T], ft: &[T], row_len: usize) -> Vec<u8> {
    let rb = packed_row_bytes(row_len, 1);
    let mut out = vec![0u8; base.len() / row_len * rb];
    for i in 0..base.len() {
        let d = ft[i].to_f32() as f64 - base[i].to_f32() as f64;
        if d < 0.0 {
            out[i / row_len * rb + (i % row_len) / 8] |= 1 << (i % row_len % 8);
        }
    }
    out
}

/// Σ|Δ| in the documented order, spelled out: blocks, lanes, tree.
fn naive_sum<T: Float>(base: &[T], ft: &[T], range: std::ops::Range<usize>) -> f64 {
    let mut total = 0.0;
    let mut s = range.start;
    while s < range.end {
        let e = ((s / BLOCK + 1) * BLOCK).min(range.end);
        let mut lanes = [0f64; 16];
        for i in s..e {
            lanes[i % 16] += (ft[i].to_f32() as f64 - base[i].to_f32() as f64).abs();
        }
        let mut w = 8;
        while w > 0 {
            for k in 0..w {
                lanes[k] += lanes[k + w];
            }
            w /= 2;
        }
        total += lanes[0];
        s = e;
    }
    total
}

fn check_compress<T: Float>(rows: usize, row_len: usize, seed: u64) {
    let n = rows * row_len;
    let (base, ft) = pair::<T>(n, seed);
    let rb = packed_row_bytes(row_len, 1);
    let want_signs = naive_signs(&base, &ft, row_len);
    let want_sum = naive_sum(&base, &ft, 0..n);
    let want_rows: Vec<f64> = (0..rows).map(|r| naive_sum(&base, &ft, r * row_len..(r + 1) * row_len) / row_len as f64).collect();
    let mut reference: Option<Compressed> = None;
    // Tiny chunks only on small tensors (each chunk is a round of tasks).
    let small: &[usize] = if n <= 5000 { &[1, 7, 8, 24, 1000] } else { &[4104] };
    for &chunk in small.iter().chain(&[BLOCK - 8, BLOCK + 3, 3 * BLOCK, DEFAULT_CHUNK]) {
        let mut signs = vec![0xA5u8; rows * rb];
        let c = compress(&base, &ft, row_len, true, &mut signs, chunk).unwrap();
        assert!(signs == want_signs, "{:?} rows={rows} row_len={row_len} chunk={chunk}: signs", T::DTYPE);
        assert_eq!(c.abs_sum.to_bits(), want_sum.to_bits(), "rows={rows} row_len={row_len} chunk={chunk}");
        assert_eq!(c.alpha, if n == 0 { 0.0 } else { want_sum / n as f64 });
        assert_eq!(c.base_hash, content_hash(&base));
        // Per-row sums: each row's pieces between block boundaries, in order.
        let rows_got = c.row_alphas.clone().unwrap();
        for (r, (&g, &w)) in rows_got.iter().zip(&want_rows).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "row {r}: {g} vs {w}");
        }
        match &reference {
            None => reference = Some(c),
            Some(r) => assert!(r == &c, "chunk {chunk} changed the result"),
        }
    }
}

#[test]
fn compress_matches_naive_for_every_chunk_length() {
    for (rows, row_len) in [(0, 8), (1, 1), (3, 5), (7, 8), (2, 13), (5, 64), (4, 1000), (3, 40_000), (1, 3 * BLOCK + 5), (70_001, 3), (2, 2 * BLOCK + 8), (300, 7)] {
        check_compress::<f32>(rows, row_len, rows as u64 * 31 + row_len as u64);
        check_compress::<bf16>(rows, row_len, 7 + rows as u64);
        check_compress::<f16>(rows, row_len, 9 + row_len as u64);
    }
}

#[test]
fn compress_is_the_same_for_any_thread_count() {
    let (base, ft) = pair::<bf16>(77 * 4300, 5);
    let row_len = 77;
    let mut results = Vec::new();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut signs = vec![0u8; base.len() / row_len * packed_row_bytes(row_len, 1)];
        let c = pool.install(|| compress(&base, &ft, row_len, true, &mut signs, 3 * BLOCK + 100)).unwrap();
        results.push((c, signs));
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn zero_deltas_are_positive_and_negative_zero_too() {
    let base = [1.0f32, -0.0, 0.0, 2.0, -0.0, 0.0, 3.0, 4.0, 5.0];
    let ft = [1.0f32, 0.0, -0.0, 1.0, -0.0, 0.0, 3.5, -4.0, 5.0];
    let mut signs = [0u8; 2];
    let c = compress(&base, &ft, 9, false, &mut signs, 0).unwrap();
    // Only 2 -> 1 and 4 -> -4 are negative deltas; ±0 pairs give bit 0.
    assert_eq!(signs, [0b1000_1000, 0]);
    assert_eq!(c.abs_sum, 1.0 + 0.5 + 8.0);
    assert!(c.row_alphas.is_none());
}

#[test]
fn alpha_star_is_the_l2_optimum() {
    let (base, ft) = pair::<f32>(4096, 3);
    let mut signs = vec![0u8; 512];
    let c = compress(&base, &ft, 4096, false, &mut signs, 0).unwrap();
    let err = |a: f64| -> f64 {
        (0..4096)
            .map(|i| {
                let d = ft[i] as f64 - base[i] as f64;
                let s = if signs[i / 8] >> (i % 8) & 1 == 1 { -1.0 } else { 1.0 };
                (d - a * s) * (d - a * s)
            })
            .sum()
    };
    let best = err(c.alpha);
    for k in 0..200 {
        let a = c.alpha * (k as f64 / 100.0);
        assert!(best <= err(a) * (1.0 + 1e-12), "alpha {a} beats alpha* {}", c.alpha);
    }
}

#[test]
fn nonfinite_inputs_are_named() {
    let (mut base, mut ft) = pair::<f32>(3 * BLOCK, 1);
    let mut signs = vec![0u8; 3 * BLOCK / 8];
    ft[BLOCK + 5] = f32::NAN;
    base[2 * BLOCK + 1] = f32::INFINITY;
    let e = compress(&base, &ft, 1024, false, &mut signs, BLOCK).unwrap_err().to_string();
    assert_eq!(e, format!("finetuned: non-finite value NaN at flat index {}", BLOCK + 5));
    ft[BLOCK + 5] = 0.0;
    let e = compress(&base, &ft, 1024, false, &mut signs, 0).unwrap_err().to_string();
    assert_eq!(e, format!("base: non-finite value inf at flat index {}", 2 * BLOCK + 1));
}

#[test]
fn shape_errors_name_the_argument() {
    let mut signs = [0u8; 2];
    let e = compress(&[1.0f32; 8], &[1.0f32; 9], 8, false, &mut signs, 0).unwrap_err().to_string();
    assert!(e.starts_with("finetuned:"), "{e}");
    let e = compress(&[1.0f32; 9], &[1.0f32; 9], 4, false, &mut signs, 0).unwrap_err().to_string();
    assert!(e.starts_with("row_len:"), "{e}");
    let e = compress(&[1.0f32; 8], &[1.0f32; 8], 8, false, &mut signs, 0).unwrap_err().to_string();
    assert!(e.starts_with("signs (bytes):"), "{e}");
}

#[test]
fn files_give_the_memory_result() {
    let dir = std::env::temp_dir().join(format!("ferrox-delta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (base, ft) = pair::<bf16>(40 * 5000, 11);
    let row_len = 40;
    let write = |name: &str, pad: usize, xs: &[bf16]| {
        let p = dir.join(name);
        let mut bytes = vec![7u8; pad];
        bytes.extend(xs.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let (pb, pf) = (write("base.bin", 24, &base), write("ft.bin", 8, &ft));
    let rb = packed_row_bytes(row_len, 1);
    let nbytes = base.len() / row_len * rb;
    let po = dir.join("out.bin");
    std::fs::write(&po, vec![0xEEu8; nbytes + 100]).unwrap();
    let mut want_signs = vec![0u8; nbytes];
    let want = compress(&base, &ft, row_len, true, &mut want_signs, 0).unwrap();
    for chunk in [8, 1000, BLOCK + 8] {
        let c = compress_files(
            FileTensor { path: pb.clone(), offset: 24, dtype: DType::BF16 },
            FileTensor { path: pf.clone(), offset: 8, dtype: DType::BF16 },
            base.len(),
            row_len,
            (po.clone(), 50),
            true,
            chunk,
        )
        .unwrap();
        assert!(c == want, "chunk {chunk}");
        let out = std::fs::read(&po).unwrap();
        assert!(out[50..50 + nbytes] == want_signs[..]);
        assert!(out[..50].iter().chain(&out[50 + nbytes..]).all(|&b| b == 0xEE));
    }
    let e = compress_files(
        FileTensor { path: pb.clone(), offset: 24, dtype: DType::BF16 },
        FileTensor { path: pf.clone(), offset: 8, dtype: DType::F16 },
        base.len(),
        row_len,
        (po.clone(), 50),
        false,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("float16") && e.contains("bfloat16") && e.contains("base.bin") && e.contains("ft.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Correct rounding of v to T by brute force: the nearest of the
/// neighbours of a first guess, ties to an even bit pattern.
fn nearest<T: Float>(v: f64, to_bits: impl Fn(T) -> u32, from_bits: impl Fn(u32) -> T) -> T {
    let guess = to_bits(T::from_f32(v as f32));
    let mut best: Option<(f64, u32)> = None;
    for b in [guess.wrapping_sub(1), guess, guess + 1] {
        let c = from_bits(b).to_f32() as f64;
        if !c.is_finite() {
            continue;
        }
        let d = (c - v).abs();
        best = match best {
            Some((bd, bb)) if bd < d || (bd == d && bb % 2 == 0) => Some((bd, bb)),
            _ => Some((d, b)),
        };
    }
    from_bits(best.unwrap().1)
}

fn check_restore<T: Float>(rows: usize, row_len: usize, to_bits: impl Fn(T) -> u32 + Copy, from_bits: impl Fn(u32) -> T + Copy) {
    let (base, ft) = pair::<T>(rows * row_len, rows as u64 + 3);
    let mut signs = vec![0u8; rows * packed_row_bytes(row_len, 1)];
    let c = compress(&base, &ft, row_len, true, &mut signs, 0).unwrap();
    let row_alphas = c.row_alphas.clone().unwrap();
    for scale in [Scale::Tensor(c.alpha), Scale::Rows(&row_alphas)] {
        let mut out = vec![T::from_f32(0.0); base.len()];
        restore(&base, &signs, row_len, scale, &mut out).unwrap();
        for i in 0..base.len() {
            let a = match scale {
                Scale::Tensor(a) => a,
                Scale::Rows(r) => r[i / row_len],
            };
            let s = if ft[i].to_f32() < base[i].to_f32() { -1.0 } else { 1.0 };
            let want = nearest::<T>(base[i].to_f32() as f64 + a * s, to_bits, from_bits);
            assert_eq!(to_bits(out[i]), to_bits(want), "{:?} element {i}", T::DTYPE);
        }
    }
}

#[test]
fn restore_rounds_the_f64_value_once() {
    for (rows, row_len) in [(1, 1), (3, 13), (4, 64), (2, 1001)] {
        check_restore::<f32>(rows, row_len, |v| v.to_bits(), f32::from_bits);
        check_restore::<f16>(rows, row_len, |v| v.to_bits() as u32, |b| f16::from_bits(b as u16));
        check_restore::<bf16>(rows, row_len, |v| v.to_bits() as u32, |b| bf16::from_bits(b as u16));
    }
    // A value just above a bf16 tie: rounding through f32 first would land
    // on the tie and round to even (down); once from f64 it rounds up.
    let base = [bf16::from_f32(1.0)];
    let a = f64::from_bits((1.0f64 + 2f64.powi(-8)).to_bits() + 1) - 1.0;
    let mut out = [bf16::from_f32(0.0)];
    restore(&base, &[0], 1, Scale::Tensor(a), &mut out).unwrap();
    assert_eq!(out[0].to_bits(), bf16::from_f32(1.0 + 2f32.powi(-7)).to_bits());
    let base = [f16::from_f32(1.0)];
    let a = f64::from_bits((1.0f64 + 2f64.powi(-11)).to_bits() + 1) - 1.0;
    let mut out = [f16::from_f32(0.0)];
    restore(&base, &[0], 1, Scale::Tensor(a), &mut out).unwrap();
    assert_eq!(out[0].to_bits(), f16::from_f32(1.0 + 2f32.powi(-10)).to_bits());
}

/// The dense reference: y = α·(x·Sᵀ) with S spelled out, in f64.
fn dense(x: &[f32], batch: usize, inf: usize, signs: &[u8], out: usize) -> Vec<f64> {
    let rb = packed_row_bytes(inf, 1);
    let mut y = vec![0f64; batch * out];
    for b in 0..batch {
        for o in 0..out {
            y[b * out + o] = (0..inf).map(|j| if signs[o * rb + j / 8] >> (j % 8) & 1 == 1 { -x[b * inf + j] as f64 } else { x[b * inf + j] as f64 }).sum();
        }
    }
    y
}

fn check_matmul<T: Float>(batch: usize, inf: usize, out: usize, seed: u64) {
    let mut g = XorShift::new(seed);
    let x: Vec<T> = (0..batch * inf).map(|_| T::from_f32(g.normal_ish())).collect();
    let d = Dims { batch, in_features: inf, out_features: out, tenants: 1 };
    let signs: Vec<u8> = (0..out * d.row_bytes()).map(|_| g.next() as u8).collect();
    // Padding bits set at random: the kernel must ignore them.
    let mut clean = signs.clone();
    if !inf.is_multiple_of(8) {
        for o in 0..out {
            clean[o * d.row_bytes() + d.row_bytes() - 1] &= (1u8 << (inf % 8)) - 1;
        }
    }
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let want = dense(&xf, batch, inf, &clean, out);
    let alpha = 0.37f32;
    let mut y = vec![T::from_f32(0.0); batch * out];
    matmul(&x, d, &signs, Alphas { values: &[alpha], per_row: false }, &mut y, false).unwrap();
    let mut y2 = y.clone();
    matmul(&x, d, &clean, Alphas { values: &[alpha], per_row: false }, &mut y2, false).unwrap();
    assert!(y.iter().zip(&y2).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()), "padding bits changed the result");
    let scale: f64 = xf.iter().map(|v| v.abs() as f64).fold(0.0, f64::max) * (inf as f64).sqrt();
    let tol = match T::DTYPE {
        DType::F32 => 1e-5,
        _ => 1e-2,
    };
    for b in 0..batch {
        for o in 0..out {
            let got = y[b * out + o].to_f32() as f64;
            let w = alpha as f64 * want[b * out + o];
            assert!((got - w).abs() <= tol * (w.abs() + alpha as f64 * scale * 1e-2), "{:?} b={b} o={o}: {got} vs {w}", T::DTYPE);
            // The documented order, one row at a time.
            let row = &signs[o * d.row_bytes()..(o + 1) * d.row_bytes()];
            let one = T::from_f32(alpha * dot_one(&xf[b * inf..(b + 1) * inf], row));
            assert_eq!(one.to_f32().to_bits(), y[b * out + o].to_f32().to_bits());
        }
    }
    // Accumulating adds to what is there, rounded once.
    let y0: Vec<T> = (0..batch * out).map(|_| T::from_f32(g.normal_ish())).collect();
    let mut acc = y0.clone();
    matmul(&x, d, &signs, Alphas { values: &[alpha], per_row: false }, &mut acc, true).unwrap();
    for i in 0..batch * out {
        let row = &signs[(i % out) * d.row_bytes()..(i % out + 1) * d.row_bytes()];
        let want = T::from_f32(y0[i].to_f32() + alpha * dot_one(&xf[(i / out) * inf..(i / out + 1) * inf], row));
        assert_eq!(acc[i].to_f32().to_bits(), want.to_f32().to_bits());
    }
}

#[test]
fn matmul_matches_the_dense_reference() {
    for &(batch, inf, out) in &[(1, 1, 1), (1, 7, 3), (2, 32, 5), (3, 33, 17), (5, 100, 40), (16, 257, 9), (17, 64, 2), (64, 40, 3)] {
        check_matmul::<f32>(batch, inf, out, (batch * inf) as u64);
        check_matmul::<f16>(batch, inf, out, 1 + out as u64);
        check_matmul::<bf16>(batch, inf, out, 2 + inf as u64);
    }
}

#[test]
fn multi_tenant_rows_equal_single_tenant_results() {
    let mut g = XorShift::new(77);
    let (batch, inf, out, tenants) = (11, 70, 21, 4);
    let x: Vec<bf16> = (0..batch * inf).map(|_| bf16::from_f32(g.normal_ish())).collect();
    let d = Dims { batch, in_features: inf, out_features: out, tenants };
    let signs: Vec<u8> = (0..tenants * out * d.row_bytes()).map(|_| g.next() as u8).collect();
    let ids: Vec<i64> = (0..batch).map(|_| g.below(tenants as u64) as i64).collect();
    for per_row in [false, true] {
        let alphas: Vec<f32> = (0..if per_row { tenants * out } else { tenants }).map(|_| g.below(100) as f32 / 64.0).collect();
        let mut y: Vec<bf16> = (0..batch * out).map(|_| bf16::from_f32(g.normal_ish())).collect();
        let y0 = y.clone();
        matmul_multi(&x, d, &signs, Alphas { values: &alphas, per_row }, &ids, &mut y, true).unwrap();
        for b in 0..batch {
            let t = ids[b] as usize;
            let one = Dims { batch: 1, tenants: 1, ..d };
            let s = &signs[t * out * d.row_bytes()..(t + 1) * out * d.row_bytes()];
            let a = if per_row { &alphas[t * out..(t + 1) * out] } else { &alphas[t..t + 1] };
            let mut row = y0[b * out..(b + 1) * out].to_vec();
            matmul(&x[b * inf..(b + 1) * inf], one, s, Alphas { values: a, per_row }, &mut row, true).unwrap();
            let same = row.iter().zip(&y[b * out..(b + 1) * out]).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "row {b} (tenant {t}) per_row={per_row}");
        }
    }
}

#[test]
fn matmul_is_the_same_for_any_thread_count() {
    let mut g = XorShift::new(5);
    let (batch, inf, out) = (6, 300, 100);
    let x: Vec<f32> = (0..batch * inf).map(|_| g.normal_ish()).collect();
    let d = Dims { batch, in_features: inf, out_features: out, tenants: 1 };
    let signs: Vec<u8> = (0..out * d.row_bytes()).map(|_| g.next() as u8).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut y = vec![0f32; batch * out];
        pool.install(|| matmul(&x, d, &signs, Alphas { values: &[1.0], per_row: false }, &mut y, false)).unwrap();
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn matmul_errors_name_the_argument() {
    let d = Dims { batch: 2, in_features: 9, out_features: 3, tenants: 2 };
    let x = vec![0f32; 18];
    let signs = vec![0u8; 2 * 3 * 2];
    let mut y = vec![0f32; 6];
    let a = [1.0f32, 2.0];
    let e = matmul_multi(&x, d, &signs, Alphas { values: &a, per_row: false }, &[0, 2], &mut y, false).unwrap_err().to_string();
    assert_eq!(e, "adapter_ids[1]: expected a fine-tune index in [0, 2), got 2");
    let e = matmul_multi(&x, d, &signs[1..], Alphas { values: &a, per_row: false }, &[0, 1], &mut y, false).unwrap_err().to_string();
    assert!(e.starts_with("signs (bytes): expected [2, 3, 2]"), "{e}");
    let e = matmul_multi(&x, d, &signs, Alphas { values: &a, per_row: true }, &[0, 1], &mut y, false).unwrap_err().to_string();
    assert!(e.starts_with("alpha: expected [2, 3]"), "{e}");
    let e = matmul(&x, d, &signs, Alphas { values: &a, per_row: false }, &mut y, false).unwrap_err().to_string();
    assert!(e.contains("single-tenant"), "{e}");
    let one = Dims { tenants: 1, ..d };
    let e = matmul(&x[1..], one, &signs[..6], Alphas { values: &a[..1], per_row: false }, &mut y, false).unwrap_err().to_string();
    assert!(e.starts_with("x: expected [2, 9]"), "{e}");
}

/// Every kernel (portable, AVX-512 where the CPU has it) gives the bits of
/// the reference order, for odd sizes (in not a multiple of 8 or 32, more
/// words than one chunk), batch 1..9 and several tenants.
#[test]
fn every_kernel_gives_the_reference_bits() {
    let kernels = Kernel::available();
    let mut g = XorShift::new(91);
    for &(inf, out, tenants) in &[(1, 3, 1), (31, 9, 2), (33, 17, 3), (100, 21, 1), (1100, 13, 3), (2048 + 40, 19, 2)] {
        for batch in 1..=9 {
            let d = Dims { batch, in_features: inf, out_features: out, tenants };
            let x: Vec<f32> = (0..batch * inf).map(|_| g.normal_ish()).collect();
            let signs: Vec<u8> = (0..tenants * out * d.row_bytes()).map(|_| g.next() as u8).collect();
            let ids: Vec<i64> = (0..batch).map(|_| g.below(tenants as u64) as i64).collect();
            let alphas: Vec<f32> = (0..tenants * out).map(|_| 0.25 + g.below(100) as f32 / 64.0).collect();
            let a = Alphas { values: &alphas, per_row: true };
            let results: Vec<Vec<u32>> = kernels
                .iter()
                .map(|&k| {
                    let mut y = vec![0f32; batch * out];
                    matmul_multi_with(k, &x, d, &signs, a, &ids, &mut y, false).unwrap();
                    y.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            for b in 0..batch {
                let t = ids[b] as usize;
                for o in 0..out {
                    let row = &signs[(t * out + o) * d.row_bytes()..(t * out + o + 1) * d.row_bytes()];
                    let want = (alphas[t * out + o] * dot_one(&x[b * inf..(b + 1) * inf], row)).to_bits();
                    for (k, r) in kernels.iter().zip(&results) {
                        assert_eq!(r[b * out + o], want, "{k:?} in={inf} out={out} tenants={tenants} batch={batch} b={b} o={o}");
                    }
                }
            }
        }
    }
}

// ---- the fused linear ----

/// The documented base order, spelled out: lane j % 32 by fma, the tree.
fn base_order(x: &[f32], w: &[f32]) -> f32 {
    let mut lanes = [0f32; 32];
    for (j, (a, b)) in x.iter().zip(w).enumerate() {
        lanes[j % 32] = a.mul_add(*b, lanes[j % 32]);
    }
    matmul::reduce32(lanes)
}

struct LinearCase<T> {
    d: Dims,
    x: Vec<T>,
    w: Vec<T>,
    bias: Vec<T>,
    signs: Vec<u8>,
    ids: Vec<i64>,
    alphas: Vec<f32>,
}

fn linear_case<T: Float>(batch: usize, inf: usize, out: usize, tenants: usize, per_row: bool, seed: u64) -> LinearCase<T> {
    let mut g = XorShift::new(seed);
    let d = Dims { batch, in_features: inf, out_features: out, tenants };
    LinearCase {
        d,
        x: (0..batch * inf).map(|_| T::from_f32(g.normal_ish())).collect(),
        w: (0..out * inf).map(|_| T::from_f32(0.1 * g.normal_ish())).collect(),
        bias: (0..out).map(|_| T::from_f32(g.normal_ish())).collect(),
        signs: (0..tenants * out * d.row_bytes()).map(|_| g.next() as u8).collect(),
        ids: (0..batch).map(|_| g.below(tenants as u64) as i64).collect(),
        alphas: (0..if per_row { tenants * out } else { tenants }).map(|_| 0.01 + g.below(100) as f32 / 2048.0).collect(),
    }
}

fn run_linear<T: Float>(k: Kernel, c: &LinearCase<T>, per_row: bool, with_bias: bool) -> Vec<T> {
    let mut y = vec![T::from_f32(0.0); c.d.batch * c.d.out_features];
    let a = Alphas { values: &c.alphas, per_row };
    let ids = (c.d.tenants > 1).then_some(&c.ids[..]);
    linear::linear_with(k, &c.x, c.d, &c.w, with_bias.then_some(&c.bias[..]), &c.signs, a, ids, &mut y).unwrap();
    y
}

fn check_linear<T: Float>(batch: usize, inf: usize, out: usize, tenants: usize, per_row: bool, with_bias: bool, seed: u64) {
    let c = linear_case::<T>(batch, inf, out, tenants, per_row, seed);
    let f = |v: &[T]| v.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let (xf, wf, bf) = (f(&c.x), f(&c.w), f(&c.bias));
    let rb = c.d.row_bytes();
    let tol = if T::DTYPE == DType::F32 { 1e-5 } else { 1e-2 };
    for &k in &Kernel::available() {
        let y = run_linear(k, &c, per_row, with_bias);
        for b in 0..batch {
            let t = c.ids[b] as usize * (tenants > 1) as usize;
            let xb = &xf[b * inf..(b + 1) * inf];
            for o in 0..out {
                let wrow = &wf[o * inf..(o + 1) * inf];
                let srow = &c.signs[(t * out + o) * rb..(t * out + o + 1) * rb];
                let a = if per_row { c.alphas[t * out + o] } else { c.alphas[t] };
                let bias = if with_bias { bf[o] } else { 0.0 };
                let got = y[b * out + o].to_f32();
                // The dense reference in f64 (W_ft = W + α·S spelled out).
                let mut want = bias as f64;
                let mut scale = bias.abs() as f64;
                for j in 0..inf {
                    let s = if srow[j / 8] >> (j % 8) & 1 == 1 { -1.0 } else { 1.0 };
                    let wft = wrow[j] as f64 + a as f64 * s;
                    want += xb[j] as f64 * wft;
                    scale += (xb[j] as f64 * wft).abs();
                }
                let err = (got as f64 - want).abs();
                assert!(err <= tol * (want.abs() + 1e-2 * scale), "{:?} {k:?} b={b} o={o}: {got} vs {want}", T::DTYPE);
                // The documented order, bit for bit.
                let exact = T::from_f32((base_order(xb, wrow) + bias) + a * dot_one(xb, srow));
                assert_eq!(got.to_bits(), exact.to_f32().to_bits(), "{:?} {k:?} in={inf} batch={batch} b={b} o={o}", T::DTYPE);
            }
        }
    }
}

#[test]
fn linear_matches_the_dense_reference_and_the_documented_order() {
    for &(batch, inf, out, tenants) in &[(1, 1, 1, 1), (1, 7, 3, 1), (2, 32, 5, 2), (3, 33, 17, 1), (5, 100, 40, 3), (16, 257, 19, 4), (9, 64, 2, 1), (4, 1100, 7, 2)] {
        let s = (batch * inf + out) as u64;
        check_linear::<f32>(batch, inf, out, tenants, false, true, s);
        check_linear::<f32>(batch, inf, out, tenants, true, false, s + 1);
        check_linear::<f16>(batch, inf, out, tenants, out % 2 == 0, true, s + 2);
        check_linear::<bf16>(batch, inf, out, tenants, out % 2 == 1, batch % 2 == 0, s + 3);
    }
}

/// A row's output bits do not depend on which rows share its batch, the
/// batch size, the thread count or the kernel; multi-tenant rows are the
/// single-tenant results of their fine-tune.
#[test]
fn linear_is_independent_of_batch_threads_and_kernel_and_multi_equals_single() {
    let (batch, inf, out, tenants) = (16, 300, 37, 3);
    for per_row in [false, true] {
        let c = linear_case::<bf16>(batch, inf, out, tenants, per_row, 4242 + per_row as u64);
        let full = run_linear(Kernel::best(), &c, per_row, true);
        let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for &k in &Kernel::available() {
            assert_eq!(bits(&run_linear(k, &c, per_row, true)), bits(&full), "{k:?}");
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(bits(&pool.install(|| run_linear(Kernel::best(), &c, per_row, true))), bits(&full), "1 thread");
        // Each row alone, with its own tenant's signs and alphas only.
        let rb = c.d.row_bytes();
        for b in 0..batch {
            let t = c.ids[b] as usize;
            let one = LinearCase {
                d: Dims { batch: 1, tenants: 1, ..c.d },
                x: c.x[b * inf..(b + 1) * inf].to_vec(),
                w: c.w.clone(),
                bias: c.bias.clone(),
                signs: c.signs[t * out * rb..(t + 1) * out * rb].to_vec(),
                ids: vec![0],
                alphas: if per_row { c.alphas[t * out..(t + 1) * out].to_vec() } else { vec![c.alphas[t]] },
            };
            let y = run_linear(Kernel::best(), &one, per_row, true);
            assert_eq!(bits(&y), bits(&full[b * out..(b + 1) * out]), "row {b} (tenant {t}) per_row={per_row}");
        }
        // Sub-batches of 3 and 5 rows.
        for size in [3, 5] {
            for s in (0..batch).step_by(size) {
                let e = (s + size).min(batch);
                let sub = LinearCase {
                    d: Dims { batch: e - s, ..c.d },
                    x: c.x[s * inf..e * inf].to_vec(),
                    w: c.w.clone(),
                    bias: c.bias.clone(),
                    signs: c.signs.clone(),
                    ids: c.ids[s..e].to_vec(),
                    alphas: c.alphas.clone(),
                };
                assert_eq!(bits(&run_linear(Kernel::best(), &sub, per_row, true)), bits(&full[s * out..e * out]), "rows {s}..{e}");
            }
        }
    }
}

#[test]
fn linear_errors_name_the_argument() {
    let d = Dims { batch: 2, in_features: 9, out_features: 3, tenants: 2 };
    let (x, w, bias) = (vec![0f32; 18], vec![0f32; 27], vec![0f32; 3]);
    let signs = vec![0u8; 2 * 3 * 2];
    let mut y = vec![0f32; 6];
    let a = [1.0f32, 2.0];
    let al = Alphas { values: &a, per_row: false };
    let e = linear(&x, d, &w, Some(&bias), &signs, al, None, &mut y).unwrap_err().to_string();
    assert!(e.contains("without adapter_ids"), "{e}");
    let e = linear(&x, d, &w[1..], Some(&bias), &signs, al, Some(&[0, 1]), &mut y).unwrap_err().to_string();
    assert!(e.starts_with("weight: expected [3, 9]"), "{e}");
    let e = linear(&x, d, &w, Some(&bias[1..]), &signs, al, Some(&[0, 1]), &mut y).unwrap_err().to_string();
    assert!(e.starts_with("bias: expected [3]"), "{e}");
    let e = linear(&x, d, &w, None, &signs, al, Some(&[0, 5]), &mut y).unwrap_err().to_string();
    assert_eq!(e, "adapter_ids[1]: expected a fine-tune index in [0, 2), got 5");
    let e = linear(&x, d, &w, None, &signs, al, Some(&[0, 1]), &mut y[1..]).unwrap_err().to_string();
    assert!(e.starts_with("out: expected [2, 3]"), "{e}");
}
