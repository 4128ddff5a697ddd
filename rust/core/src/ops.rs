//! Fused elementwise ops on the CPU. Each element is computed in f32 as two
//! products and one sum, then rounded once to the element type; Rust never
//! contracts that into an FMA, and the CUDA kernels (`cuda/ops.cu`, compiled
//! with --fmad=false) use the same order, so both give the same bits (NaN
//! payloads aside: any NaN result is a NaN on both).

use rayon::prelude::*;

use crate::error::{check_len, Result};
use crate::Float;

/// Elements per parallel piece; below one piece the work stays on the caller.
const CHUNK: usize = 1 << 16;

#[inline(always)]
fn axpby1<T: Float>(a: f32, x: T, b: f32, y: T) -> T {
    let ax = a * x.to_f32();
    let by = b * y.to_f32();
    T::from_f32(ax + by)
}

/// out[i] = a*x[i] + b*y[i], rounded once to `T`.
pub fn axpby<T: Float>(out: &mut [T], a: f32, x: &[T], b: f32, y: &[T]) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    check_len("y", out.len(), y.len())?;
    let run = |o: &mut [T], x: &[T], y: &[T]| {
        for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
            *o = axpby1(a, x, b, y);
        }
    };
    if out.len() <= CHUNK {
        run(out, x, y);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| run(o, x, y));
    }
    Ok(())
}

/// x[i] = a*x[i] + b*y[i]: `axpby` with the output aliasing `x`.
pub fn axpby_inplace_x<T: Float>(x: &mut [T], a: f32, b: f32, y: &[T]) -> Result<()> {
    check_len("y", x.len(), y.len())?;
    let run = |x: &mut [T], y: &[T]| {
        for (x, &y) in x.iter_mut().zip(y) {
            *x = axpby1(a, *x, b, y);
        }
    };
    if x.len() <= CHUNK {
        run(x, y);
    } else {
        x.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(x, y)| run(x, y));
    }
    Ok(())
}

/// x[i] = a*x[i] + b*x[i] (the output aliases both inputs); evaluated as
/// two products and a sum like `axpby`, not as (a + b)*x, so it matches.
pub fn axpby_inplace_both<T: Float>(x: &mut [T], a: f32, b: f32) {
    let run = |x: &mut [T]| {
        for v in x.iter_mut() {
            *v = axpby1(a, *v, b, *v);
        }
    };
    if x.len() <= CHUNK {
        run(x);
    } else {
        x.par_chunks_mut(CHUNK).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use half::{bf16, f16};

    fn data<T: Float>(n: usize, seed: u32) -> Vec<T> {
        // Mixed magnitudes, signs, zeros and infinities, deterministic.
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(0x9E37_79B1).rotate_left(13);
                let v = match h % 64 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => f32::INFINITY,
                    3 => 65_000.0,
                    4 => 1e-6,
                    _ => ((h >> 8) as f32 / 16_777_216.0 - 0.5) * 20.0,
                };
                T::from_f32(v)
            })
            .collect()
    }

    fn same_bits<T: Float>(a: T, b: T) -> bool {
        let (a, b) = (a.to_f32(), b.to_f32());
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn check<T: Float + std::fmt::Debug>() {
        for n in [0, 1, 7, CHUNK, 3 * CHUNK + 11] {
            let (x, y) = (data::<T>(n, 1), data::<T>(n, 2));
            for (a, b) in [(0.7f32, -1.3f32), (1.0, 1.0), (-2.5, 0.0), (3.0e4, 3.0e4)] {
                // Reference: a plain scalar loop, same expression.
                let want: Vec<T> = x.iter().zip(&y).map(|(&x, &y)| T::from_f32(a * x.to_f32() + b * y.to_f32())).collect();
                let mut out = vec![T::from_f32(0.0); n];
                axpby(&mut out, a, &x, b, &y).unwrap();
                assert!(out.iter().zip(&want).all(|(&o, &w)| same_bits(o, w)), "axpby n={n} a={a} b={b}");
                let mut xi = x.clone();
                axpby_inplace_x(&mut xi, a, b, &y).unwrap();
                assert!(xi.iter().zip(&want).all(|(&o, &w)| same_bits(o, w)), "inplace_x n={n}");
                let both: Vec<T> = x.iter().map(|&x| T::from_f32(a * x.to_f32() + b * x.to_f32())).collect();
                let mut xb = x.clone();
                axpby_inplace_both(&mut xb, a, b);
                assert!(xb.iter().zip(&both).all(|(&o, &w)| same_bits(o, w)), "inplace_both n={n}");
            }
        }
    }

    #[test]
    fn axpby_matches_scalar_loop() {
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }

    #[test]
    fn no_fused_multiply_add() {
        // a*x + b*y with one rounding per product differs from an FMA here:
        // x*x rounds away the 2^-48 term, which an FMA would keep.
        let x = 1.0f32 + f32::EPSILON;
        let mut out = [0f32];
        axpby(&mut out, x, &[x], -1.0, &[1.0 + 2.0 * f32::EPSILON]).unwrap();
        assert_eq!(out[0], 0.0);
        assert_ne!(x.mul_add(x, -(1.0 + 2.0 * f32::EPSILON)), 0.0);
    }

    #[test]
    fn lengths_are_checked() {
        let (x, y) = (vec![1f32; 5], vec![1f32; 4]);
        let mut out = vec![0f32; 5];
        assert!(matches!(axpby(&mut out, 1.0, &x, 1.0, &y), Err(Error::Shape(m)) if m.contains("y")));
        assert!(matches!(axpby(&mut out[..4], 1.0, &x, 1.0, &y), Err(Error::Shape(m)) if m.contains("x")));
        let mut xi = x.clone();
        assert!(matches!(axpby_inplace_x(&mut xi, 1.0, 1.0, &y), Err(Error::Shape(_))));
        assert_eq!(xi, x, "nothing written on error");
    }
}
