//! MeZO's fused in-place pass (Malladi et al., "Fine-Tuning Language Models
//! with Just Forward Passes"): perturbation, restore and SPSA update of a
//! parameter tensor with the Gaussian direction z regenerated from Philox,
//! never stored, so the optimizer needs no memory of parameter size.
//!
//! z[k] of tensor `stream` under probe seed `seed` is element k of
//! `crate::philox::fill_normal(seed, stream, 0, ..)`: lane k % 4 of
//! `normals_of(philox_block(seed, stream, k / 4))`. One pass computes, per
//! element, in f32 with correctly rounded operations in this order:
//!
//! ```text
//! if restore != 0: θ = θ + fl(restore · z)
//! if decay   != 1: θ = θ · decay
//! if coef    != 0: θ = θ + fl(coef · z)
//! ```
//!
//! (the terms left out are skipped rather than computed as ±0, which would
//! turn a −0 parameter into +0). A perturbation is `coef = ±ε` (or −2ε), the
//! last restore of a step is fused with its update (`restore = ε`,
//! `decay = 1 − lr·λ`, `coef = −lr·g/n`). `cuda/mezo.cu` repeats the same
//! operations, so CPU and CUDA give the same bits; the result does not depend
//! on the thread count (every element depends only on itself).

use rayon::prelude::*;

use crate::philox::{normals_of, philox_block};

/// Elements per parallel piece (a multiple of 4: pieces never split a
/// Philox block).
const CHUNK: usize = 1 << 15;

/// The scalars of one pass (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct MezoPass {
    /// The probe's Philox key.
    pub seed: u64,
    pub restore: f32,
    pub decay: f32,
    pub coef: f32,
}

/// The per-element operation shared by the CPU pass and its tests.
#[inline(always)]
pub fn apply(theta: f32, z: f32, m: &MezoPass) -> f32 {
    let mut t = theta;
    if m.restore != 0.0 {
        t += m.restore * z;
    }
    if m.decay != 1.0 {
        t *= m.decay;
    }
    if m.coef != 0.0 {
        t += m.coef * z;
    }
    t
}

/// Runs `m` over `param` (f32, tensor index `stream`) in place.
pub fn mezo_pass(param: &mut [f32], stream: u64, m: MezoPass) {
    if m.restore == 0.0 && m.decay == 1.0 && m.coef == 0.0 {
        return;
    }
    param.par_chunks_mut(CHUNK).enumerate().for_each(|(c, piece)| {
        let first = (c * CHUNK / 4) as u64;
        for (b, quad) in piece.chunks_mut(4).enumerate() {
            let z = normals_of(philox_block(m.seed, stream, first + b as u64));
            for (t, &z) in quad.iter_mut().zip(&z) {
                *t = apply(*t, z, &m);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::philox::fill_normal;
    use crate::test_rng::XorShift;

    fn params(n: usize, seed: u64) -> Vec<f32> {
        let mut g = XorShift::new(seed);
        (0..n).map(|_| g.normal_ish() * 0.1).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn pass_is_the_documented_elementwise_formula() {
        let n = 3 * CHUNK + 7; // several pieces and a ragged last block
        let p0 = params(n, 1);
        let mut z = vec![0f32; n];
        fill_normal(99, 5, 0, &mut z);
        for m in [
            MezoPass { seed: 99, restore: 0.0, decay: 1.0, coef: 1e-3 },
            MezoPass { seed: 99, restore: 1e-3, decay: 0.999, coef: -2.5e-4 },
            MezoPass { seed: 99, restore: -2e-3, decay: 1.0, coef: 0.0 },
        ] {
            let mut got = p0.clone();
            mezo_pass(&mut got, 5, m);
            let want: Vec<f32> = p0.iter().zip(&z).map(|(&t, &z)| {
                let mut t = t;
                if m.restore != 0.0 { t += m.restore * z; }
                if m.decay != 1.0 { t *= m.decay; }
                if m.coef != 0.0 { t += m.coef * z; }
                t
            }).collect();
            assert_eq!(bits(&got), bits(&want), "{m:?}");
        }
    }

    #[test]
    fn same_bits_for_any_thread_count_and_streams_differ() {
        let p0 = params(5 * CHUNK + 3, 2);
        let m = MezoPass { seed: 7, restore: 1e-3, decay: 0.99, coef: 3e-4 };
        let run = |threads: usize, stream: u64| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut p = p0.clone();
            pool.install(|| mezo_pass(&mut p, stream, m));
            bits(&p)
        };
        let one = run(1, 0);
        assert_eq!(run(3, 0), one);
        assert_eq!(run(8, 0), one);
        assert_ne!(run(1, 1), one, "another tensor index, another direction");
    }

    #[test]
    fn identity_pass_leaves_signed_zeros_alone() {
        let mut p = vec![-0.0f32, 0.0, 1.5];
        mezo_pass(&mut p, 0, MezoPass { seed: 1, restore: 0.0, decay: 1.0, coef: 0.0 });
        assert_eq!(bits(&p), bits(&[-0.0, 0.0, 1.5]));
        // decay only: −0 · decay is −0 (no +0 term is added)
        mezo_pass(&mut p, 0, MezoPass { seed: 1, restore: 0.0, decay: 0.5, coef: 0.0 });
        assert_eq!(bits(&p), bits(&[-0.0, 0.0, 0.75]));
    }
}
