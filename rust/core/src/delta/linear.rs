//! The fused BitDelta linear for small (decode-style) batches:
//! y[b, o] = Σ_j x[b, j]·W[o, j] + bias[o] + α · Σ_j ±x[b, j]·s[o, j],
//! W the base weight (f32, f16 or bf16, never widened as a whole), s = ±1
//! from the packed sign bits of tenant ids[b], one rounding to the output
//! dtype.
//!
//! Why fused: a GEMM library's small-batch f32 GEMM costs several times its
//! GEMV (measured 2.5–10x at batch 2–16 on the benchmark box) although both
//! read the weight once; here each task streams its block of base rows and
//! the tenants' sign rows once, for every batch row, and the batch rows
//! reuse each loaded word of W from registers.
//!
//! Order of the sums, fixed per (b, o), so a value depends on nothing but
//! x[b], W[o], s[o] (not on the batch size, the tiling, the thread count or
//! the kernel):
//! - base: input j goes to lane j % 32; lane l = fma(x[b, j], W[o, j], l)
//!   for j = l, l + 32, ... in order (inputs past `in` are 0·0), then the
//!   32 lanes by matmul's tree (`reduce32`). Every kernel uses a fused
//!   multiply-add (hardware FMA, or `f32::mul_add`'s exact fallback), so all
//!   give the same bits.
//! - sign: exactly `matmul`'s sum (the same pieces are called), so it equals
//!   `delta_matmul`'s bit for bit.
//! - y = T((base + bias[o]) + α·sign), each operation an f32 rounding.

use rayon::prelude::*;

use super::matmul::{check, prepare, reduce32, sign_block, Alphas, Dims, Kernel, Prepared, WORD};
use crate::error::{Error, Result};
use crate::Float;

/// Output rows per parallel task: 16 rows of a 4096-wide f32 weight are
/// 256 KiB, which stay in L2 while every batch tile reads them.
const ROWS_PER_TASK: usize = 16;

/// y = x·Wᵀ + bias + α ⊙ (x·Sᵀ) for x [batch, in], weight [out, in], bias
/// [out] or none, signs [tenants, out, ceil(in/8)], y [batch, out]; batch
/// row b uses tenant ids[b] (`ids` none: one tenant).
#[allow(clippy::too_many_arguments)]
pub fn linear<T: Float>(x: &[T], d: Dims, weight: &[T], bias: Option<&[T]>, signs: &[u8], alphas: Alphas<'_>, ids: Option<&[i64]>, y: &mut [T]) -> Result<()> {
    linear_with(Kernel::best(), x, d, weight, bias, signs, alphas, ids, y)
}

/// `linear` on a chosen kernel (tests compare them bit for bit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_with<T: Float>(
    kernel: Kernel,
    x: &[T],
    d: Dims,
    weight: &[T],
    bias: Option<&[T]>,
    signs: &[u8],
    alphas: Alphas<'_>,
    ids: Option<&[i64]>,
    y: &mut [T],
) -> Result<()> {
    if ids.is_none() && d.tenants != 1 {
        return Err(Error::Shape(format!("signs: without adapter_ids the linear takes one fine-tune, got {}", d.tenants)));
    }
    check(&d, x.len(), signs.len(), &alphas, ids, y.len())?;
    let (out, inf) = (d.out_features, d.in_features);
    if weight.len() != out * inf {
        return Err(Error::Shape(format!("weight: expected [{out}, {inf}] = {} elements, got {}", out * inf, weight.len())));
    }
    if let Some(b) = bias {
        if b.len() != out {
            return Err(Error::Shape(format!("bias: expected [{out}] elements, got {}", b.len())));
        }
    }
    if d.batch == 0 || out == 0 {
        return Ok(());
    }
    run(kernel, x, d, weight, bias, signs, alphas, ids, y);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run<T: Float>(kernel: Kernel, x: &[T], d: Dims, weight: &[T], bias: Option<&[T]>, signs: &[u8], alphas: Alphas<'_>, ids: Option<&[i64]>, y: &mut [T]) {
    let (batch, out, inf) = (d.batch, d.out_features, d.in_features);
    let p = prepare(x, &d, ids);
    let tenant_of = |b: usize| ids.map_or(0, |ids| ids[b] as usize);
    // vals[o * batch + q]: the f32 result of output row o, batch position q.
    let mut vals = vec![0f32; out * batch];
    vals.par_chunks_mut(ROWS_PER_TASK * batch).enumerate().for_each(|(task, block)| {
        let o0 = task * ROWS_PER_TASK;
        let rows = block.len() / batch;
        let w = &weight[o0 * inf..(o0 + rows) * inf];
        // The base rows first (they are the bytes that come from memory),
        // then the sign rows of each tenant against the same batch.
        base_block(kernel, &p, &d, w, block);
        let mut sums = vec![0f32; block.len()];
        sign_block(kernel, &p, &d, signs, o0, &mut sums);
        for (k, (vrow, srow)) in block.chunks_mut(batch).zip(sums.chunks(batch)).enumerate() {
            let o = o0 + k;
            let b0 = bias.map_or(0.0, |b| b[o].to_f32());
            for (q, (v, s)) in vrow.iter_mut().zip(srow).enumerate() {
                let a = alphas.get(tenant_of(p.order[q]), o, out);
                *v = (*v + b0) + a * s;
            }
        }
    });
    y.par_chunks_mut(out).enumerate().for_each(|(b, yrow)| {
        let q = p.pos[b];
        for (o, v) in yrow.iter_mut().enumerate() {
            *v = T::from_f32(vals[o * batch + q]);
        }
    });
}

/// block[k * batch + q] = Σ_j xp[q, j]·w[k, j] for the rows of `w` (the
/// task's base rows) and every batch position q.
fn base_block<T: Float>(kernel: Kernel, p: &Prepared, d: &Dims, w: &[T], block: &mut [f32]) {
    let (batch, inf, words) = (d.batch, d.in_features, d.words());
    match kernel {
        Kernel::Portable => {
            for (k, sums) in block.chunks_mut(batch).enumerate() {
                base_rows(&p.xp, p.stride, batch, &w[k * inf..(k + 1) * inf], words, sums);
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            // SAFETY: this kernel is only chosen where the CPU has AVX-512F.
            unsafe { x86::block(&p.xp, p.stride, batch, w, inf, words, block) }
        }
    }
}

/// Word `w` of a base row in f32, zero past the row's end.
#[inline(always)]
fn row_word<T: Float>(row: &[T], w: usize) -> [f32; WORD] {
    let mut v = [0f32; WORD];
    let s = (w * WORD).min(row.len());
    for (d, x) in v.iter_mut().zip(&row[s..(s + WORD).min(row.len())]) {
        *d = x.to_f32();
    }
    v
}

/// The lane sums of NB padded batch rows against one base row.
#[inline(always)]
fn base_tile<T: Float, const NB: usize>(xp: &[f32], stride: usize, row: &[T], words: usize, sums: &mut [f32]) {
    let mut acc = [[0f32; WORD]; NB];
    for w in 0..words {
        let wv = row_word(row, w);
        for (b, a) in acc.iter_mut().enumerate() {
            let xs: &[f32; WORD] = xp[b * stride + w * WORD..b * stride + (w + 1) * WORD].try_into().expect("a whole word of x");
            for l in 0..WORD {
                a[l] = xs[l].mul_add(wv[l], a[l]);
            }
        }
    }
    for (s, a) in sums.iter_mut().zip(acc) {
        *s = reduce32(a);
    }
}

#[inline(always)]
fn base_rows_body<T: Float>(xp: &[f32], stride: usize, nb: usize, row: &[T], words: usize, sums: &mut [f32]) {
    let mut b = 0;
    while b + 4 <= nb {
        base_tile::<T, 4>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 4]);
        b += 4;
    }
    while b + 2 <= nb {
        base_tile::<T, 2>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 2]);
        b += 2;
    }
    if b < nb {
        base_tile::<T, 1>(&xp[b * stride..], stride, row, words, &mut sums[b..b + 1]);
    }
}

/// The portable base dot of `nb` batch rows against one row: an AVX2+FMA
/// build where the CPU has it (`multiversion!` enables no FMA, and without
/// it `mul_add` is a slow exact library call), else the baseline build.
fn base_rows<T: Float>(xp: &[f32], stride: usize, nb: usize, row: &[T], words: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn fma_build<T: Float>(xp: &[f32], stride: usize, nb: usize, row: &[T], words: usize, sums: &mut [f32]) {
            base_rows_body(xp, stride, nb, row, words, sums)
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { fma_build(xp, stride, nb, row, words, sums) };
        }
    }
    base_rows_body(xp, stride, nb, row, words, sums)
}

/// The AVX-512 base dot: a register tile of NO base rows × NB batch rows,
/// two 16-lane accumulators per pair (lanes 0–15 and 16–31 of the order
/// above); each word of W is loaded and widened once per tile and shared by
/// its NB batch rows.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::WORD;
    use crate::{DType, Float};

    /// 16 elements of T at `p` widened to f32 (exact).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<T: Float>(p: *const T) -> __m512 {
        // SAFETY (all arms): the caller guarantees 16 readable elements at p.
        unsafe {
            if T::DTYPE == DType::F32 {
                _mm512_loadu_ps(p.cast())
            } else if T::DTYPE == DType::BF16 {
                // bf16 is the high half of an f32.
                let h = _mm256_loadu_si256(p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
            }
        }
    }

    /// Bytes of x per word chunk (the tile's NB batch rows): the chunk stays
    /// in L1 while every row tile of the task passes over it.
    const CHUNK_BYTES: usize = 16 << 10;
    /// How far ahead in each base row to prefetch.
    const PREFETCH: usize = 1024;

    /// Adds words w0..w1 of NO rows of `w` (row length `inf`) times NB batch
    /// rows of `xp` to the lane sums `state[o * sstride + b]` (a plain store
    /// and load between chunks: the order of each lane's sum is untouched).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn tile<T: Float, const NO: usize, const NB: usize>(
        xp: &[f32],
        stride: usize,
        w: &[T],
        inf: usize,
        words: usize,
        w0: usize,
        w1: usize,
        state: &mut [[f32; WORD]],
        sstride: usize,
    ) {
        assert!(NB >= 1 && w0 <= w1 && w1 <= words && xp.len() >= (NB - 1) * stride + words * WORD && w.len() >= NO * inf);
        assert!(state.len() > (NO - 1) * sstride + NB - 1);
        let full = inf / WORD;
        let (xptr, wptr) = (xp.as_ptr(), w.as_ptr());
        let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; NO];
        for o in 0..NO {
            for b in 0..NB {
                let s = state[o * sstride + b].as_ptr();
                // SAFETY: a state entry holds 32 f32.
                acc[o][b] = unsafe { [_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16))] };
            }
        }
        // The last partial word of each row, zero-padded.
        let mut tail = [[T::from_f32(0.0); WORD]; NO];
        if full < w1 {
            for (o, t) in tail.iter_mut().enumerate() {
                t[..inf - full * WORD].copy_from_slice(&w[o * inf + full * WORD..(o + 1) * inf]);
            }
        }
        let mut wv = [[_mm512_setzero_ps(); 2]; NO];
        for wi in w0..w1 {
            for o in 0..NO {
                // W streams from memory once, NO rows at a time: prefetch
                // each row PREFETCH bytes ahead (a prefetch never faults;
                // wrapping_add keeps the address arithmetic defined).
                let p = wptr.wrapping_add(o * inf + wi * WORD).cast::<u8>().wrapping_add(PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
                if std::mem::size_of::<T>() == 4 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
                }
            }
            for (o, v) in wv.iter_mut().enumerate() {
                // SAFETY: a full word lies inside row o (wi < inf / 32); the
                // tail word is a 32-element local array.
                let p = if wi < full { unsafe { wptr.add(o * inf + wi * WORD) } } else { tail[o].as_ptr() };
                *v = unsafe { [load16(p), load16(p.add(16))] };
            }
            for b in 0..NB {
                // SAFETY: b < NB and wi < words, inside xp (asserted above).
                let (x0, x1) = unsafe {
                    let p = xptr.add(b * stride + wi * WORD);
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                for o in 0..NO {
                    acc[o][b][0] = _mm512_fmadd_ps(x0, wv[o][0], acc[o][b][0]);
                    acc[o][b][1] = _mm512_fmadd_ps(x1, wv[o][1], acc[o][b][1]);
                }
            }
        }
        for o in 0..NO {
            for b in 0..NB {
                let s = state[o * sstride + b].as_mut_ptr();
                // SAFETY: a state entry holds 32 f32.
                unsafe {
                    _mm512_storeu_ps(s, acc[o][b][0]);
                    _mm512_storeu_ps(s.add(16), acc[o][b][1]);
                }
            }
        }
    }

    /// Words w0..w1 of every row of `w` against NB batch rows: row tiles of
    /// NO, the rows past the last whole tile one by one.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn chunk<T: Float, const NO: usize, const NB: usize>(
        xp: &[f32],
        stride: usize,
        w: &[T],
        inf: usize,
        words: usize,
        w0: usize,
        w1: usize,
        state: &mut [[f32; WORD]],
        nb: usize,
    ) {
        let n = w.len() / inf;
        let mut o = 0;
        while o + NO <= n {
            tile::<T, NO, NB>(xp, stride, &w[o * inf..], inf, words, w0, w1, &mut state[o * nb..], nb);
            o += NO;
        }
        while o < n {
            tile::<T, 1, NB>(xp, stride, &w[o * inf..], inf, words, w0, w1, &mut state[o * nb..], nb);
            o += 1;
        }
    }

    /// sums[k * nb + q] for all rows k of `w` and batch positions q < nb:
    /// batch tiles of 4 (× 2 rows), 2 or 1 (× 4 rows) outside (≤ 26 of 32
    /// registers), word chunks inside them, the task's rows innermost (they
    /// stay in L2 for the next batch tile).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block<T: Float>(xp: &[f32], stride: usize, nb: usize, w: &[T], inf: usize, words: usize, sums: &mut [f32]) {
        let n = w.len() / inf;
        let mut state = vec![[0f32; WORD]; n * nb];
        let mut b = 0;
        while b < nb {
            let nbt = match nb - b {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let step = (CHUNK_BYTES / (nbt * WORD * 4)).max(8);
            let (x, st) = (&xp[b * stride..], &mut state[b..]);
            let mut w0 = 0;
            while w0 < words {
                let w1 = (w0 + step).min(words);
                match nbt {
                    4 => chunk::<T, 2, 4>(x, stride, w, inf, words, w0, w1, st, nb),
                    2 => chunk::<T, 4, 2>(x, stride, w, inf, words, w0, w1, st, nb),
                    _ => chunk::<T, 4, 1>(x, stride, w, inf, words, w0, w1, st, nb),
                }
                w0 = w1;
            }
            b += nbt;
        }
        // The tree of `reduce32`, vectorised.
        for (s, l) in sums.iter_mut().zip(&state) {
            *s = super::super::matmul::x86::reduce(l);
        }
    }
}
