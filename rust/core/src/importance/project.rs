//! Implicit random projection of gradients (the sketch of TRAK, Park et al.,
//! "TRAK: Attributing Model Behavior at Scale"): `P = G·Rᵀ/√p` for a batch
//! `G` [n, d] and a Rademacher matrix `R` [p, d] that is never stored.
//!
//! The mapping (fixed; CPU and any other implementation must follow it):
//! `R[i, j] = -1` if bit `j % 32` of Philox element `j / 32` of stream
//! (`seed`, `i`) is set, else `+1` — i.e. bit `j % 32` of word
//! `(j / 32) % 4` of `philox_block(seed, i, j / 128)` (see `crate::philox`
//! for the element addressing). So `R` is a function of (seed, i, j) only.
//!
//! Order (f32 throughout): the columns go in groups of 4, zero-padded past
//! d. For row r, output i and group q, `t_q = (((0 ± G[r,4q]) ± G[r,4q+1])
//! ± G[r,4q+2]) ± G[r,4q+3]` (the sign of R[i, j]; `a - x` is `a + (-x)`
//! exactly), then `s = (((0 + t_0) + t_1) + ...)` in ascending q and the
//! output is `fl32(s · fl32(1/√p))`. The kernel gets the t's from a 16-entry
//! table per group and 32 rows (all sign patterns, built once in that order
//! and shared by 256 outputs), so one vector add covers 4 columns × 8 rows.
//! Work is split over output blocks, row blocks and column passes, but no
//! split changes that sequence: the result has the same bits for any thread
//! count and equals a naive loop in that order over a materialised `R`.
//! Memory beyond the output: about 100 KiB of tables per running task and f32
//! accumulators the size of the output (rounded up to 32 rows × 256 outputs).

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::philox::{philox_block, philox_rounds};
use crate::simd::multiversion;
use crate::Float;

/// Outputs (rows of R) per task: enough to amortise the tables over.
const IB: usize = 256;
/// Rows of G per task: four AVX2 registers per output (one table index serves
/// 32 rows; 16 was 1.7x slower at 32 rows, 1.25x faster at 8).
const RB: usize = 32;
/// Columns of R per tile: one Philox block (4 words × 32 bits) per output.
const JT: usize = 128;

/// `R[i, j]` of the documented mapping (±1.0).
#[inline(always)]
pub fn rademacher(seed: u64, i: u64, j: u64) -> f32 {
    let w = philox_block(seed, i, j / 128)[((j / 32) % 4) as usize];
    sign((w >> (j % 32)) & 1)
}

/// +1.0 for bit 0, -1.0 for bit 1 (the bit becomes the sign bit).
#[inline(always)]
fn sign(bit: u32) -> f32 {
    f32::from_bits(0x3f80_0000 | (bit << 31))
}

/// The blocks of IB streams side by side (`crate::philox::philox_rounds`;
/// the tests check them against `philox_block`):
/// `w[k][ii]` = word k of `philox_block(seed, i0 + ii, b)`, ii < IB.
#[inline(always)]
fn block_words(seed: u64, i0: u64, b: u64, w: &mut [[u32; IB]; 4]) {
    *w = [[b as u32; IB], [(b >> 32) as u32; IB], [0u32; IB], [0u32; IB]];
    for l in 0..IB {
        let s = i0.wrapping_add(l as u64);
        (w[2][l], w[3][l]) = (s as u32, (s >> 32) as u32);
    }
    philox_rounds(seed, w);
}

multiversion! {
    /// Adds columns `c0 .. c1` (c0 a multiple of JT) of rows `r0 .. r1` ×
    /// outputs `i0 .. i0 + IB` into `acc` [row blocks of RB][IB][RB] (rows past
    /// `r1` count as zeros); outputs past p (streams past the last row of R)
    /// are computed and dropped by the caller.
    fn block<T: Float>(g: &[T], d: usize, r0: usize, r1: usize, c0: usize, c1: usize, i0: usize, seed: u64, acc: &mut [[f32; RB]]) -> () {
        let mut words = [[0u32; IB]; 4];
        // gt[jj][rr] = G[r0 + rr, j0 + jj] (zero past d and past r1).
        let mut gt = vec![[0f32; RB]; JT];
        // lut[q][b][rr]: group q's signed sum for sign pattern b (see the module docs).
        let mut lut = vec![[[0f32; RB]; 16]; JT / 4];
        let mut j0 = c0;
        while j0 < c1 {
            let jn = JT.min(c1 - j0);
            block_words(seed, i0 as u64, (j0 / JT) as u64, &mut words);
            // The words serve every row block of the task.
            for (rb0, acc) in (r0..r1).step_by(RB).zip(acc.chunks_exact_mut(IB)) {
            let rb1 = (rb0 + RB).min(r1);
            for t in gt.iter_mut() {
                *t = [0f32; RB];
            }
            for (rr, r) in (rb0..rb1).enumerate() {
                for (t, x) in gt.iter_mut().zip(&g[r * d + j0..r * d + j0 + jn]) {
                    t[rr] = x.to_f32();
                }
            }
            for (q, l) in lut.iter_mut().enumerate() {
                let x = &gt[4 * q..4 * q + 4];
                for rr in 0..RB {
                    l[0][rr] = 0.0 + x[0][rr];
                    l[1][rr] = 0.0 - x[0][rr];
                }
                for (k, x) in x.iter().enumerate().skip(1) {
                    let h = 1 << k;
                    for b in 0..h {
                        for rr in 0..RB {
                            l[b + h][rr] = l[b][rr] - x[rr];
                            l[b][rr] += x[rr];
                        }
                    }
                }
            }
            let groups = jn.div_ceil(4);
            for (ii, a) in acc.iter_mut().enumerate() {
                let mut loc = *a;
                for q in 0..groups {
                    let b = ((words[q / 8][ii] >> ((q % 8) * 4)) & 15) as usize;
                    let l = &lut[q][b];
                    for rr in 0..RB {
                        loc[rr] += l[rr];
                    }
                }
                *a = loc;
            }
            }
            j0 += JT;
        }
    }
}

/// Projects `grads` [n, d] (row-major) to `out` [n, p] f32: `out = G·Rᵀ/√p`
/// with `R` as in the module docs. Non-finite gradients propagate.
pub fn project<T: Float>(
    grads: &[T],
    n: usize,
    d: usize,
    p: usize,
    seed: u64,
    out: &mut [f32],
) -> Result<()> {
    if p == 0 {
        return Err(Error::Value(
            "p: the projection dimension must be at least 1".into(),
        ));
    }
    let nd = n
        .checked_mul(d)
        .ok_or_else(|| Error::Shape(format!("grads: shape [{n}, {d}] overflows")))?;
    check_len("grads", nd, grads.len())?;
    let np = n
        .checked_mul(p)
        .ok_or_else(|| Error::Shape(format!("out: shape [{n}, {p}] overflows")))?;
    check_len("out", np, out.len())?;
    if n == 0 {
        return Ok(());
    }
    let out_blocks = p.div_ceil(IB);
    // Tasks take all rows of an output block (Philox words generated once);
    // the rows are split into groups of row blocks only when p has too few
    // output blocks for the threads.
    let row_blocks = n.div_ceil(RB);
    let groups = (2 * rayon::current_num_threads())
        .div_ceil(out_blocks)
        .clamp(1, row_blocks);
    let rows_per_task = row_blocks.div_ceil(groups) * RB;
    let row_tasks = n.div_ceil(rows_per_task);
    let scale = (1.0 / (p as f64).sqrt()) as f32;
    // Columns in passes of about 256 KiB of `grads`, which every task of a
    // pass reads: the pass stays in cache instead of each task streaming all
    // of `grads` from memory (that was latency-bound, ~2x slower).
    let chunk = ((1usize << 16) / n).max(1).div_ceil(JT) * JT;
    let mut accs: Vec<Vec<[f32; RB]>> = (0..row_tasks * out_blocks)
        .map(|t| {
            let r0 = (t / out_blocks) * rows_per_task;
            vec![[0f32; RB]; (rows_per_task.min(n - r0)).div_ceil(RB) * IB]
        })
        .collect();
    let mut c0 = 0;
    while c0 < d {
        let c1 = (c0 + chunk).min(d);
        accs.par_iter_mut().enumerate().for_each(|(t, acc)| {
            let (rti, obi) = (t / out_blocks, t % out_blocks);
            let r0 = rti * rows_per_task;
            block(
                grads,
                d,
                r0,
                (r0 + rows_per_task).min(n),
                c0,
                c1,
                obi * IB,
                seed,
                acc,
            );
        });
        c0 = c1;
    }
    for (t, acc) in accs.iter().enumerate() {
        let (rt0, i0) = ((t / out_blocks) * rows_per_task, (t % out_blocks) * IB);
        let ni = IB.min(p - i0);
        for (k, blk) in acc.chunks_exact(IB).enumerate() {
            let r0 = rt0 + k * RB;
            let nr = RB.min(n - r0);
            for (ii, a) in blk[..ni].iter().enumerate() {
                for (rr, &v) in a[..nr].iter().enumerate() {
                    out[(r0 + rr) * p + i0 + ii] = v * scale;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::philox::philox4x32_10;
    use crate::test_rng::XorShift;

    /// The documented order on a materialised R: groups of 4 columns
    /// (zero-padded), each summed from 0 in column order, then added up.
    fn naive(g: &[f32], n: usize, d: usize, p: usize, seed: u64) -> Vec<f32> {
        let dp = d.div_ceil(4) * 4;
        let r: Vec<f32> = (0..p * dp)
            .map(|k| rademacher(seed, (k / dp) as u64, (k % dp) as u64))
            .collect();
        let scale = (1.0 / (p as f64).sqrt()) as f32;
        let mut out = vec![0f32; n * p];
        for row in 0..n {
            for i in 0..p {
                let mut s = 0f32;
                for q in 0..dp / 4 {
                    let mut t = 0f32;
                    for j in 4 * q..4 * q + 4 {
                        let x = if j < d { g[row * d + j] } else { 0.0 };
                        t += x * r[i * dp + j];
                    }
                    s += t;
                }
                out[row * p + i] = s * scale;
            }
        }
        out
    }

    fn grads(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = XorShift::new(seed);
        (0..n * d).map(|_| rng.normal_ish()).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn entries_follow_the_documented_mapping() {
        let seed = 0x1234_5678_9abc_def0u64;
        for (i, j) in [
            (0u64, 0u64),
            (3, 31),
            (3, 32),
            (7, 127),
            (7, 128),
            (65, 1000),
            (2047, 999_999),
        ] {
            let ctr = [
                (j / 128) as u32,
                ((j / 128) >> 32) as u32,
                i as u32,
                (i >> 32) as u32,
            ];
            let w = philox4x32_10(ctr, [seed as u32, (seed >> 32) as u32])[((j / 32) % 4) as usize];
            let want = if (w >> (j % 32)) & 1 == 1 { -1.0 } else { 1.0 };
            assert_eq!(rademacher(seed, i, j), want, "R[{i}, {j}]");
        }
        // Balanced: about half the entries are -1.
        let neg = (0..20_000u64)
            .filter(|&j| rademacher(7, 5, j) < 0.0)
            .count();
        assert!((9_600..10_400).contains(&neg), "{neg} of 20000 negative");
    }

    #[test]
    fn side_by_side_blocks_match_philox() {
        let mut w = [[0u32; IB]; 4];
        for (seed, i0, b) in [
            (0u64, 0u64, 0u64),
            (99, 64, 7),
            (u64::MAX, u64::MAX - 10, 1 << 40),
        ] {
            block_words(seed, i0, b, &mut w);
            for ii in 0..IB {
                let want = philox_block(seed, i0.wrapping_add(ii as u64), b);
                assert_eq!(
                    [w[0][ii], w[1][ii], w[2][ii], w[3][ii]],
                    want,
                    "stream {ii}"
                );
            }
        }
    }

    #[test]
    fn matches_naive_bitwise() {
        // Sizes around the tile edges (64 outputs, 128 columns).
        for (n, d, p, seed) in [
            (1, 1, 1, 0),
            (3, 127, 5, 1),
            (5, 129, 64, 2),
            (4, 300, 65, 3),
            (33, 257, 300, 4),
            (64, 3000, 70, 6),
        ] {
            // (Past the 32-row and 256-output blocks; the last has several column
            // passes: 2^16 / 64 = 1024 columns each.)
            let g = grads(n, d, seed + 100);
            let mut out = vec![f32::NAN; n * p];
            project(&g, n, d, p, seed, &mut out).unwrap();
            assert_eq!(
                bits(&out),
                bits(&naive(&g, n, d, p, seed)),
                "n={n} d={d} p={p}"
            );
        }
    }

    #[test]
    fn half_inputs_are_widened_exactly() {
        let (n, d, p) = (3, 200, 70);
        let g32 = grads(n, d, 9);
        let gh: Vec<half::bf16> = g32.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let gw: Vec<f32> = gh.iter().map(|x| x.to_f32()).collect();
        let (mut a, mut b) = (vec![0f32; n * p], vec![0f32; n * p]);
        project(&gh, n, d, p, 11, &mut a).unwrap();
        project(&gw, n, d, p, 11, &mut b).unwrap();
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn same_bits_for_any_thread_count() {
        let (n, d, p) = (40, 5000, 600); // several column passes, row and output blocks
        let g = grads(n, d, 5);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0f32; n * p];
            pool.install(|| project(&g, n, d, p, 42, &mut out)).unwrap();
            bits(&out)
        };
        let one = run(1);
        for t in [2, 3, 8] {
            assert_eq!(run(t), one, "{t} threads");
        }
        let mut other = vec![0f32; n * p];
        project(&g, n, d, p, 43, &mut other).unwrap();
        assert_ne!(bits(&other), one, "another seed, another projection");
    }

    #[test]
    fn bad_shapes_are_refused() {
        let g = vec![0f32; 6];
        let mut out = vec![0f32; 4];
        assert!(matches!(project(&g, 2, 3, 2, 0, &mut out), Ok(())));
        assert!(
            matches!(project(&g, 2, 4, 2, 0, &mut out), Err(Error::Shape(m)) if m.contains("grads"))
        );
        assert!(
            matches!(project(&g, 2, 3, 3, 0, &mut out), Err(Error::Shape(m)) if m.contains("out"))
        );
        assert!(
            matches!(project(&g, 2, 3, 0, 0, &mut out[..0]), Err(Error::Value(m)) if m.contains("p"))
        );
    }
}
