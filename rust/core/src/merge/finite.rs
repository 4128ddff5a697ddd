//! The first NaN/±inf of a float buffer, by bit tests on the exponent (all
//! ones in every format), without converting an element: the merge refuses
//! non-finite inputs before it reads them for arithmetic.

use rayon::prelude::*;

use crate::simd::multiversion;
use crate::Float;

/// Elements per parallel piece; the answer (the lowest index) does not depend on it.
const PIECE: usize = 1 << 16;

/// `abs_key` is |x|'s bits; infinity has the largest finite-or-inf key and NaN
/// none (or, for the keys of f32, one above it).
#[inline(always)]
fn nonfinite<T: Float>(v: T, inf_key: u32) -> bool {
    v.abs_key().is_none_or(|k| k >= inf_key)
}

multiversion! {
    /// Whether any element of `xs` is NaN or ±inf (a full scan without early
    /// exit: a branch-free fold vectorises).
    fn any_nonfinite<T: Float>(xs: &[T], inf_key: u32) -> bool {
        xs.iter().fold(false, |acc, &v| acc | nonfinite(v, inf_key))
    }
}

/// The flat index of the first NaN or ±inf in `xs`, or `None`.
pub fn first_nonfinite<T: Float>(xs: &[T]) -> Option<usize> {
    let inf_key = T::key_of_f32(f32::INFINITY);
    let piece = xs.par_chunks(PIECE).position_first(|c| any_nonfinite(c, inf_key))?;
    let start = piece * PIECE;
    xs[start..].iter().position(|&v| nonfinite(v, inf_key)).map(|i| start + i)
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn check<T: Float>() {
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN];
        let finite = [0.0f32, -0.0, 1.0, -65504.0, 1e-40, 3.0e38, -3.0e38];
        for n in [0usize, 1, 7, PIECE - 1, PIECE, PIECE + 3, 3 * PIECE + 5] {
            let clean: Vec<T> = (0..n).map(|i| T::from_f32(finite[i % finite.len()])).collect();
            let clean_f32: Vec<f32> = clean.iter().map(|v| v.to_f32()).collect();
            // f32 values that are finite in f32 but round to inf in half are not planted.
            let want_clean = clean_f32.iter().position(|v| !v.is_finite());
            assert_eq!(first_nonfinite(&clean), want_clean, "{} n={n}", T::DTYPE);
            for (s, &bad) in specials.iter().enumerate() {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut xs = clean.clone();
                    xs[at] = T::from_f32(bad);
                    let later = (at + 1 + s).min(n - 1);
                    xs[later] = T::from_f32(f32::NAN); // a later one does not hide the first
                    let want = xs.iter().position(|v| !v.to_f32().is_finite());
                    assert_eq!(first_nonfinite(&xs), want, "{} n={n} at={at} bad={bad}", T::DTYPE);
                }
            }
        }
    }

    #[test]
    fn finds_the_first_nonfinite_element_of_every_dtype() {
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }

    #[test]
    fn the_same_index_for_every_thread_count() {
        let mut xs = vec![bf16::from_f32(1.0); 5 * PIECE + 17];
        xs[4 * PIECE + 9] = bf16::INFINITY;
        xs[2 * PIECE + 1] = bf16::NAN;
        for threads in [1, 2, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
            assert_eq!(pool.install(|| first_nonfinite(&xs)), Some(2 * PIECE + 1));
        }
    }
}
