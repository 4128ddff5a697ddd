//! Fused elementwise ops on the CPU. The f32 expression order matches the
//! CUDA kernels (compiled with --fmad=false), so both give the same bits.

use rayon::prelude::*;

use crate::error::{check_len, Result};
use crate::Float;

const CHUNK: usize = 1 << 16;

#[inline(always)]
fn axpby1<T: Float>(a: f32, x: T, b: f32, y: T) -> T {
    // Two products, one add, one rounding to T: no FMA contraction.
    let ax = a * x.to_f32();
    let by = b * y.to_f32();
    T::from_f32(ax + by)
}

/// out = a*x + b*y.
pub fn axpby<T: Float>(out: &mut [T], a: f32, x: &[T], b: f32, y: &[T]) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    check_len("y", out.len(), y.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
        .for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = axpby1(a, x, b, y);
            }
        });
    Ok(())
}

/// x = a*x + b*y (the output aliases x).
pub fn axpby_inplace_x<T: Float>(x: &mut [T], a: f32, b: f32, y: &[T]) -> Result<()> {
    check_len("y", x.len(), y.len())?;
    x.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(x, y)| {
        for (x, &y) in x.iter_mut().zip(y) {
            *x = axpby1(a, *x, b, y);
        }
    });
    Ok(())
}

/// x = (a + b) * x computed as a*x + b*x (output aliases both inputs).
pub fn axpby_inplace_both<T: Float>(x: &mut [T], a: f32, b: f32) {
    x.par_chunks_mut(CHUNK).for_each(|x| {
        for v in x.iter_mut() {
            *v = axpby1(a, *v, b, *v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn check<T: Float + PartialEq + std::fmt::Debug>() {
        let n = 3 * CHUNK + 11;
        let x: Vec<T> = (0..n).map(|i| T::from_f32((i as f32 * 0.37).sin() * 10.0)).collect();
        let y: Vec<T> = (0..n).map(|i| T::from_f32((i as f32 * 0.11).cos() * 3.0)).collect();
        let mut out = vec![T::from_f32(0.0); n];
        axpby(&mut out, 0.7, &x, -1.3, &y).unwrap();
        for i in 0..n {
            let want = T::from_f32(0.7 * x[i].to_f32() + -1.3 * y[i].to_f32());
            assert_eq!(out[i].to_f32().to_bits(), want.to_f32().to_bits());
        }
        let mut xi = x.clone();
        axpby_inplace_x(&mut xi, 0.7, -1.3, &y).unwrap();
        assert_eq!(xi, out);
        assert!(axpby(&mut out[..n - 1], 1.0, &x, 1.0, &y).is_err());
    }

    #[test]
    fn axpby_matches_scalar_loop() {
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }
}
