//! The codebook linear: the matmul of x with a codebook-quantized weight,
//! decoding the packed codes in registers (no dense weight is ever built).
//!
//! For permuted row r in group g (group_offsets[g] <= r < group_offsets[g+1])
//! and input j, the weight is Ŵ[r, j] = C[g, code[r, j / d], j % d] (d the
//! vector dimension, code[r, c] the c-th `bits`-bit code of packed row r in
//! `crate::pack`'s layout), and
//!     y[b, r] = T((s[r] · Σ_j x[b, j]·Ŵ[r, j]) + bias[r])
//! with s the row scale (1 when absent) and bias (0 when absent) in permuted
//! row order: the caller undoes the permutation on the out-sized result.
//!
//! Order of the sums, fixed per (b, r) so that a value depends on nothing
//! but x[b] and row r (not on the batch size, the tiling, the thread count
//! or the kernel, CUDA's included): input j goes to lane j % 32; lane
//! l += x[b, j] * Ŵ[r, j] (a rounded product, then a rounded sum: no fused
//! multiply-add, as the CUDA kernel compiles with --fmad=false) for
//! j = l, l + 32, ... < in; then the 32 lanes by `reduce32`'s tree; then the
//! scale, then the bias, each an f32 rounding, then one rounding to T.
//!
//! The AVX-512 kernel decodes 16 codes at a time: one unaligned 64-bit load
//! of the packed row, variable shifts into 16 lanes, and a table lookup in
//! registers (`vpermps` for 2^bits·d <= 16 codewords, two-table `vpermt2ps`
//! for <= 32, a gather beyond: 8-bit codes); each decoded word is shared by a
//! tile of up to 8 batch rows.
//!
//! Scalar codes of 1–4 bits (AVX-512BW) take a cheaper decode: a word's 32
//! codes are 4·bits bytes, four runs of 8 codes of `bits` bytes each; one
//! 16-byte broadcast, a byte shuffle putting run q into every 32-bit lane
//! ≡ q (mod 4) and two variable shifts give the 32 codes in the lane order
//! `GROUPED_LANE` (code 8·(i % 4) + i / 4 in lane i, then 4 more per run).
//! The sums keep the module's order: x is laid out per word in that same
//! lane order (once per call) and the 32 lane sums are put back in input
//! order before `reduce32`. At batch 1–3 a tile spans 4 or 2 weight rows as
//! well, so that it always has at least 4 independent sums: one row's sum
//! is a chain of dependent adds, which alone would bound a GEMV.

use rayon::prelude::*;

use crate::delta::matmul::{reduce32, WORD};
use crate::error::{Error, Result};
use crate::{pack, Float};

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// The shape of a codebook-quantized weight [out, in]: `groups` codebooks
/// of 2^bits codewords of `vector_dim` floats each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodebookDims {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub vector_dim: usize,
    pub groups: usize,
}

impl CodebookDims {
    /// Codes per row (in / d).
    pub fn codes_per_row(&self) -> usize {
        self.in_features / self.vector_dim.max(1)
    }
    /// Bytes of one packed row of codes.
    pub fn row_bytes(&self) -> usize {
        pack::packed_row_bytes(self.codes_per_row(), self.bits)
    }
    /// Codewords per codebook (2^bits).
    pub fn codewords(&self) -> usize {
        1usize << self.bits
    }
    /// Floats per codebook (2^bits · d).
    pub fn table_len(&self) -> usize {
        self.codewords() * self.vector_dim
    }

    /// Checks the parameters and the lengths of every buffer (element
    /// counts), naming the tensor that is off.
    #[allow(clippy::too_many_arguments)]
    pub fn check(&self, batch: usize, x: usize, codes: usize, codebooks: usize, offsets: usize, row_scale: Option<usize>, bias: Option<usize>, y: usize) -> Result<()> {
        let (out, inf, d) = (self.out_features, self.in_features, self.vector_dim);
        if !(1..=8).contains(&self.bits) {
            return Err(Error::Value(format!("bits: expected 1..=8, got {}", self.bits)));
        }
        if d == 0 || inf == 0 || !inf.is_multiple_of(d) {
            return Err(Error::Value(format!("vector_dim: expected a divisor of in_features {inf}, got {d}")));
        }
        if self.groups == 0 {
            return Err(Error::Shape("group_offsets: expected [groups + 1] with groups >= 1, got 1 element or none".into()));
        }
        let want = |what: &str, got: usize, want: usize, shape: String| {
            if got == want {
                Ok(())
            } else {
                Err(Error::Shape(format!("{what}: expected {shape} = {want} elements, got {got}")))
            }
        };
        want("x", x, batch * inf, format!("[{batch}, {inf}]"))?;
        want("codes", codes, out * self.row_bytes(), format!("[{out}, {}]", self.row_bytes()))?;
        want("codebooks", codebooks, self.groups * self.table_len(), format!("[{}, {}, {d}]", self.groups, self.codewords()))?;
        want("group_offsets", offsets, self.groups + 1, format!("[{}]", self.groups + 1))?;
        if let Some(n) = row_scale {
            want("row_scale", n, out, format!("[{out}]"))?;
        }
        if let Some(n) = bias {
            want("bias", n, out, format!("[{out}]"))?;
        }
        want("out", y, batch * out, format!("[{batch}, {out}]"))
    }
}

/// A codebook-quantized weight in permuted row order, as the CPU kernel
/// reads it: codes u8 [out, row_bytes], codebooks f32 [groups, 2^bits, d],
/// group_offsets i32 [groups + 1] (0, ..., out; non-decreasing), row_scale
/// f32 [out] or none.
#[derive(Clone, Copy, Debug)]
pub struct CodebookWeight<'a> {
    pub dims: CodebookDims,
    pub codes: &'a [u8],
    pub codebooks: &'a [f32],
    pub group_offsets: &'a [i32],
    pub row_scale: Option<&'a [f32]>,
}

/// The group of every row, checking that the offsets tile 0..out.
pub fn row_groups(offsets: &[i32], out: usize) -> Result<Vec<u32>> {
    let bad = || Error::Value(format!("group_offsets: expected non-decreasing values from 0 to {out}, got {offsets:?}"));
    if offsets.first() != Some(&0) || offsets.last().map(|&v| v as i64) != Some(out as i64) {
        return Err(bad());
    }
    let mut groups = Vec::with_capacity(out);
    for (g, w) in offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(bad());
        }
        groups.extend(std::iter::repeat_n(g as u32, (w[1] - w[0]) as usize));
    }
    Ok(groups)
}

/// Which kernel runs the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Scalar decode, any parameters.
    Portable,
    /// AVX-512F register decode (falls back to `Portable` for parameters it
    /// does not cover: see `x86::Decode::new`).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The grouped decode's lane order: lane p of a word holds input
/// GROUPED_LANE[p] of it (p < 16: the first vector, code 8·(p % 4) + p / 4;
/// then the second, 4 codes further on in each run).
const GROUPED_LANE: [usize; WORD] = {
    let mut t = [0usize; WORD];
    let mut p = 0;
    while p < WORD {
        let i = p % 16;
        t[p] = 8 * (i % 4) + i / 4 + if p >= 16 { 4 } else { 0 };
        p += 1;
    }
    t
};

impl Kernel {
    /// Whether the rows run the grouped decode (scalar 1–4-bit codes on an
    /// AVX-512BW CPU; see the module doc).
    pub(crate) fn grouped(self, d: &CodebookDims) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Kernel::Avx512 && d.vector_dim == 1 && d.bits <= 4 {
            return std::is_x86_feature_detected!("avx512bw");
        }
        let _ = d;
        false
    }

    pub(crate) fn best() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        Kernel::Portable
    }
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            v.push(Kernel::Avx512);
        }
        v
    }
}

/// y [batch, out] = the codebook linear of x [batch, in] (see the module
/// doc), bias f32 [out] (permuted order) or none.
pub fn linear<T: Float>(x: &[T], batch: usize, w: &CodebookWeight<'_>, bias: Option<&[f32]>, y: &mut [T]) -> Result<()> {
    linear_with(Kernel::best(), x, batch, w, bias, y)
}

pub(crate) fn linear_with<T: Float>(kernel: Kernel, x: &[T], batch: usize, w: &CodebookWeight<'_>, bias: Option<&[f32]>, y: &mut [T]) -> Result<()> {
    let d = w.dims;
    d.check(batch, x.len(), w.codes.len(), w.codebooks.len(), w.group_offsets.len(), w.row_scale.map(<[f32]>::len), bias.map(<[f32]>::len), y.len())?;
    let groups = row_groups(w.group_offsets, d.out_features)?;
    if batch == 0 || d.out_features == 0 {
        return Ok(());
    }
    let (out, inf) = (d.out_features, d.in_features);
    // x widened to f32 and zero-padded to whole words (activation-sized);
    // in the grouped decode's lane order where that decode runs.
    let stride = inf.div_ceil(WORD) * WORD;
    let grouped = kernel.grouped(&d);
    let mut xp = vec![0f32; batch * stride];
    xp.par_chunks_mut(stride).zip(x.par_chunks(inf)).for_each(|(dst, src)| {
        if grouped {
            for (w, chunk) in dst.chunks_mut(WORD).enumerate() {
                for (o, &j) in chunk.iter_mut().zip(GROUPED_LANE.iter()) {
                    if let Some(v) = src.get(w * WORD + j) {
                        *o = v.to_f32();
                    }
                }
            }
        } else {
            for (o, v) in dst.iter_mut().zip(src) {
                *o = v.to_f32();
            }
        }
    });
    let rb = d.row_bytes();
    // vals[r * batch + b]: output row r of batch row b, before rounding to T.
    let mut vals = vec![0f32; out * batch];
    vals.par_chunks_mut(ROWS_PER_TASK * batch).enumerate().for_each(|(task, block)| {
        let r0 = task * ROWS_PER_TASK;
        let n = block.len() / batch;
        let table_of = |r: usize| {
            let g = groups[r] as usize;
            &w.codebooks[g * d.table_len()..(g + 1) * d.table_len()]
        };
        let codes = &w.codes[r0 * rb..(r0 + n) * rb];
        if !grouped_block_sums(grouped, &xp, stride, batch, codes, &|k| table_of(r0 + k), &d, block) {
            for (k, sums) in block.chunks_mut(batch).enumerate() {
                row_sums(kernel, &xp, stride, batch, &codes[k * rb..(k + 1) * rb], table_of(r0 + k), &d, sums);
            }
        }
        for (k, sums) in block.chunks_mut(batch).enumerate() {
            let s = w.row_scale.map(|s| s[r0 + k]);
            let b0 = bias.map(|b| b[r0 + k]);
            for v in sums.iter_mut() {
                if let Some(s) = s {
                    *v *= s;
                }
                if let Some(b0) = b0 {
                    *v += b0;
                }
            }
        }
    });
    y.par_chunks_mut(out).enumerate().for_each(|(b, yrow)| {
        for (r, v) in yrow.iter_mut().enumerate() {
            *v = T::from_f32(vals[r * batch + b]);
        }
    });
    Ok(())
}

/// The grouped decode's sums of a block of rows (codes: the block's packed
/// rows; table_of(k): row k's codebook), block[k·batch + b] for row k and
/// batch row b; false (nothing written) where that decode does not run.
#[allow(clippy::too_many_arguments)]
fn grouped_block_sums<'t>(grouped: bool, xp: &[f32], stride: usize, batch: usize, codes: &[u8], table_of: &dyn Fn(usize) -> &'t [f32], d: &CodebookDims, block: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if grouped {
        // SAFETY: `grouped` is only set where the CPU has AVX-512F and BW.
        unsafe { x86::grouped_block_sums(xp, stride, batch, codes, table_of, d, block) };
        return true;
    }
    let _ = (grouped, xp, stride, batch, codes, table_of, d, block);
    false
}

/// sums[b] = Σ_j xp[b, j]·Ŵ[row, j] for every batch row, in the module's order.
#[allow(clippy::too_many_arguments)]
fn row_sums(kernel: Kernel, xp: &[f32], stride: usize, batch: usize, row: &[u8], table: &[f32], d: &CodebookDims, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        // SAFETY: this kernel is only chosen where the CPU has AVX-512F.
        if unsafe { x86::row_sums(xp, stride, batch, row, table, d, sums) } {
            return;
        }
    }
    let _ = kernel;
    let mut b = 0;
    while b < batch {
        let nb = (batch - b).min(4);
        let xs = &xp[b * stride..];
        match nb {
            4 => portable_tile::<4>(xs, stride, row, table, d, &mut sums[b..b + 4]),
            2 | 3 => portable_tile::<2>(xs, stride, row, table, d, &mut sums[b..b + 2]),
            _ => portable_tile::<1>(xs, stride, row, table, d, &mut sums[b..b + 1]),
        }
        b += if nb == 3 { 2 } else { nb };
    }
}

/// Code `c` of a packed row (`bits` bits at bit c·bits; a code spans at
/// most two bytes).
#[inline(always)]
pub(crate) fn code_at(row: &[u8], c: usize, bits: u32) -> usize {
    let o = c * bits as usize;
    let lo = row[o / 8] as u32;
    let hi = row.get(o / 8 + 1).copied().unwrap_or(0) as u32;
    (((lo | hi << 8) >> (o % 8)) & ((1u32 << bits) - 1)) as usize
}

fn portable_tile<const NB: usize>(xp: &[f32], stride: usize, row: &[u8], table: &[f32], d: &CodebookDims, sums: &mut [f32]) {
    let (inf, vd) = (d.in_features, d.vector_dim);
    let mut acc = [[0f32; WORD]; NB];
    for w in 0..inf.div_ceil(WORD) {
        let n = (inf - w * WORD).min(WORD);
        let mut wv = [0f32; WORD];
        for (l, v) in wv[..n].iter_mut().enumerate() {
            let j = w * WORD + l;
            *v = table[code_at(row, j / vd, d.bits) * vd + j % vd];
        }
        for (b, a) in acc.iter_mut().enumerate() {
            let xs = &xp[b * stride + w * WORD..b * stride + w * WORD + n];
            for l in 0..n {
                a[l] += xs[l] * wv[l];
            }
        }
    }
    for (s, a) in sums.iter_mut().zip(acc) {
        *s = reduce32(a);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{CodebookDims, WORD};
    use crate::delta::matmul::reduce32;

    /// How 16 consecutive inputs' codes become 16 table indices: lanes 0–7
    /// come from the low 32 bits of the (shifted) 64-bit load, lanes 8–15
    /// from the 32 bits after `split` (the bit where lane 8's code starts);
    /// lane l's code sits `shift[l]` bits up, and its index is code·d + l % d.
    struct Decode {
        bits: usize,
        d: usize,
        split: u32,
        shifts: __m512i,
        mask: __m512i,
        log2d: __m512i,
        sub: __m512i,
        /// 8-bit scalar codes: the 16 bytes are the indices.
        bytes: bool,
    }

    impl Decode {
        /// None where the register decode does not apply: d not a power of
        /// two up to 16, or 16 lanes' codes (plus the load's misalignment)
        /// not within 64 bits (5–7-bit scalar codes).
        #[target_feature(enable = "avx512f")]
        fn new(dims: &CodebookDims) -> Option<Decode> {
            let (bits, d) = (dims.bits as usize, dims.vector_dim);
            if !d.is_power_of_two() || d > 16 {
                return None;
            }
            let bytes = bits == 8 && d == 1;
            let span = 16 * bits / d;
            if !bytes && !(span <= 57 || (span % 8 == 0 && span <= 64)) {
                return None;
            }
            let mut shifts = [0i32; 16];
            let mut sub = [0i32; 16];
            for l in 0..16 {
                shifts[l] = (((l % 8) / d) * bits) as i32;
                sub[l] = (l % d) as i32;
            }
            // SAFETY: 16-element arrays are 64 bytes.
            let (shifts, sub) = unsafe { (_mm512_loadu_si512(shifts.as_ptr().cast()), _mm512_loadu_si512(sub.as_ptr().cast())) };
            Some(Decode {
                bits,
                d,
                split: ((8 / d) * bits) as u32,
                shifts,
                mask: _mm512_set1_epi32(((1u32 << bits) - 1) as i32),
                log2d: _mm512_set1_epi32(d.trailing_zeros() as i32),
                sub,
                bytes,
            })
        }
    }

    /// Up to 8 bytes of `row` from byte `at` as a little-endian u64 (bytes
    /// past the row read as 0).
    #[inline(always)]
    fn read_u64(row: &[u8], at: usize) -> u64 {
        if at + 8 <= row.len() {
            // SAFETY: 8 bytes inside the row.
            unsafe { std::ptr::read_unaligned(row.as_ptr().add(at).cast::<u64>()) }.to_le()
        } else {
            let mut b = [0u8; 8];
            if at < row.len() {
                b[..row.len() - at].copy_from_slice(&row[at..]);
            }
            u64::from_le_bytes(b)
        }
    }

    /// Table indices of inputs j0 .. j0 + 15 (codes past the row read as 0).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn indices(row: &[u8], j0: usize, dc: &Decode) -> __m512i {
        if dc.bytes {
            let mut b = [0u8; 16];
            if j0 < row.len() {
                let n = (row.len() - j0).min(16);
                b[..n].copy_from_slice(&row[j0..j0 + n]);
            }
            // SAFETY: a 16-byte local array.
            return _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(b.as_ptr().cast()) });
        }
        let o = (j0 / dc.d) * dc.bits;
        let word = read_u64(row, o / 8) >> (o % 8);
        let (lo, hi) = (word as u32, (word >> dc.split) as u32);
        let v = _mm512_inserti64x4::<1>(_mm512_set1_epi32(lo as i32), _mm256_set1_epi32(hi as i32));
        let codes = _mm512_and_si512(_mm512_srlv_epi32(v, dc.shifts), dc.mask);
        _mm512_or_si512(_mm512_sllv_epi32(codes, dc.log2d), dc.sub)
    }

    /// The codebook of a group in registers (KIND 0: <= 16 floats, 1: <= 32)
    /// or in memory (KIND 2: gathered).
    struct Table {
        t0: __m512,
        t1: __m512,
        ptr: *const f32,
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lookup<const KIND: u8>(t: &Table, idx: __m512i) -> __m512 {
        match KIND {
            0 => _mm512_permutexvar_ps(idx, t.t0),
            1 => _mm512_permutex2var_ps(t.t0, idx, t.t1),
            // SAFETY: every index is code·d + l % d < 2^bits·d, the table's length.
            _ => unsafe { _mm512_i32gather_ps::<4>(idx, t.ptr.cast()) },
        }
    }

    /// acc[b] += x[b, word w] · (w0, w1) on the lanes of m0, m1: the step
    /// every kernel here takes (lanes past `in` add nothing).
    ///
    /// # Safety
    /// xptr + b·stride + w·WORD + 32 floats are readable for every b < NB.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn accumulate<const NB: usize>(acc: &mut [[__m512; 2]; NB], xptr: *const f32, stride: usize, w: usize, w0: __m512, w1: __m512, m0: __mmask16, m1: __mmask16) {
        for (b, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            let (x0, x1) = unsafe {
                let p = xptr.add(b * stride + w * WORD);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            a[0] = _mm512_mask_add_ps(a[0], m0, a[0], _mm512_mul_ps(x0, w0));
            a[1] = _mm512_mask_add_ps(a[1], m1, a[1], _mm512_mul_ps(x1, w1));
        }
    }

    /// The 32 lane sums of an accumulator pair, in register order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn lanes(a: [__m512; 2]) -> [f32; WORD] {
        let mut out = [0f32; WORD];
        // SAFETY: 32 f32 of local storage.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), a[1]);
        }
        out
    }

    /// The lane sums of NB batch rows against one row, as the module doc says.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn tile<const NB: usize, const KIND: u8>(xp: &[f32], stride: usize, row: &[u8], dc: &Decode, t: &Table, inf: usize, sums: &mut [f32]) {
        let words = inf.div_ceil(WORD);
        assert!(NB >= 1 && xp.len() >= (NB - 1) * stride + words * WORD && sums.len() >= NB);
        let full = inf / WORD;
        let mut acc = [[_mm512_setzero_ps(); 2]; NB];
        for w in 0..words {
            let w0 = lookup::<KIND>(t, indices(row, w * WORD, dc));
            let w1 = lookup::<KIND>(t, indices(row, w * WORD + 16, dc));
            let rem = inf - w * WORD;
            let (m0, m1): (__mmask16, __mmask16) = if w < full {
                (0xffff, 0xffff)
            } else {
                (((1u32 << rem.min(16)) - 1) as u16, ((1u32 << rem.saturating_sub(16)) - 1) as u16)
            };
            // SAFETY: b < NB and w < words, inside xp (asserted above).
            unsafe { accumulate(&mut acc, xp.as_ptr(), stride, w, w0, w1, m0, m1) };
        }
        for (s, a) in sums.iter_mut().zip(acc) {
            *s = reduce32(lanes(a));
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn rows<const KIND: u8>(xp: &[f32], stride: usize, batch: usize, row: &[u8], dc: &Decode, t: &Table, inf: usize, sums: &mut [f32]) {
        let mut b = 0;
        while b < batch {
            let xs = &xp[b * stride..];
            let nb = match batch - b {
                8.. => 8,
                4..=7 => 4,
                2 | 3 => 2,
                _ => 1,
            };
            match nb {
                8 => tile::<8, KIND>(xs, stride, row, dc, t, inf, &mut sums[b..]),
                4 => tile::<4, KIND>(xs, stride, row, dc, t, inf, &mut sums[b..]),
                2 => tile::<2, KIND>(xs, stride, row, dc, t, inf, &mut sums[b..]),
                _ => tile::<1, KIND>(xs, stride, row, dc, t, inf, &mut sums[b..]),
            }
            b += nb;
        }
    }

    /// The AVX-512 row sums; false (nothing written) where the register
    /// decode does not apply.
    #[target_feature(enable = "avx512f")]
    pub(super) fn row_sums(xp: &[f32], stride: usize, batch: usize, row: &[u8], table: &[f32], dims: &CodebookDims, sums: &mut [f32]) -> bool {
        let Some(dc) = Decode::new(dims) else { return false };
        let mut padded = [0f32; 32];
        let n = table.len().min(32);
        padded[..n].copy_from_slice(&table[..n]);
        // SAFETY: 32 f32 of local storage.
        let (t0, t1) = unsafe { (_mm512_loadu_ps(padded.as_ptr()), _mm512_loadu_ps(padded.as_ptr().add(16))) };
        let t = Table { t0, t1, ptr: table.as_ptr() };
        let inf = dims.in_features;
        match table.len() {
            0..=16 => rows::<0>(xp, stride, batch, row, &dc, &t, inf, sums),
            17..=32 => rows::<1>(xp, stride, batch, row, &dc, &t, inf, sums),
            _ => rows::<2>(xp, stride, batch, row, &dc, &t, inf, sums),
        }
        true
    }

    /// The grouped decode's constants: the byte shuffle (lane i gets the
    /// `bits` bytes of run i % 4) and the two vectors' shifts.
    struct Grouped {
        bits: usize,
        shuffle: __m512i,
        shift0: __m512i,
        shift1: __m512i,
        mask: __m512i,
    }

    impl Grouped {
        #[target_feature(enable = "avx512f")]
        fn new(bits: usize) -> Grouped {
            let mut shuffle = [0x80u8; 64];
            let (mut s0, mut s1) = ([0i32; 16], [0i32; 16]);
            for i in 0..16 {
                for k in 0..bits {
                    // Byte indices are within each 128-bit lane (all four
                    // hold the same 16 bytes).
                    shuffle[4 * i + k] = (bits * (i % 4) + k) as u8;
                }
                s0[i] = (bits * (i / 4)) as i32;
                s1[i] = (bits * (i / 4 + 4)) as i32;
            }
            // SAFETY: 64-byte local arrays.
            unsafe {
                Grouped {
                    bits,
                    shuffle: _mm512_loadu_si512(shuffle.as_ptr().cast()),
                    shift0: _mm512_loadu_si512(s0.as_ptr().cast()),
                    shift1: _mm512_loadu_si512(s1.as_ptr().cast()),
                    mask: _mm512_set1_epi32(((1u32 << bits) - 1) as i32),
                }
            }
        }
    }

    /// The two index vectors of word w (the 4·bits bytes from byte w·4·bits;
    /// bytes past the row read as 0).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn grouped_indices(row: &[u8], w: usize, g: &Grouped) -> (__m512i, __m512i) {
        let at = w * 4 * g.bits;
        let mut local = [0u8; 16];
        let p = if at + 16 <= row.len() {
            row[at..].as_ptr()
        } else {
            let n = row.len().saturating_sub(at).min(16);
            local[..n].copy_from_slice(&row[at..at + n]);
            local.as_ptr()
        };
        // SAFETY: 16 readable bytes at p (inside the row or the local copy).
        unsafe { grouped_decode(p, g) }
    }

    /// The two index vectors of the 4·bits code bytes at p.
    ///
    /// # Safety
    /// 16 bytes are readable at p.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn grouped_decode(p: *const u8, g: &Grouped) -> (__m512i, __m512i) {
        // SAFETY: the caller's contract.
        let v = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(p.cast()) });
        // 4-bit runs are whole 32-bit words: the broadcast already has run
        // i % 4 in lane i.
        let v = if g.bits == 4 { v } else { _mm512_shuffle_epi8(v, g.shuffle) };
        (_mm512_and_si512(_mm512_srlv_epi32(v, g.shift0), g.mask), _mm512_and_si512(_mm512_srlv_epi32(v, g.shift1), g.mask))
    }

    /// A codebook of at most 16 floats in a register (zero-padded).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn table16(table: &[f32]) -> __m512 {
        let mut padded = [0f32; 16];
        let n = table.len().min(16);
        padded[..n].copy_from_slice(&table[..n]);
        // SAFETY: 16 f32 of local storage.
        unsafe { _mm512_loadu_ps(padded.as_ptr()) }
    }

    /// The grouped decode's sums of NB batch rows (xp in `GROUPED_LANE`
    /// order per word) against R weight rows at once: out[i][b] for row i.
    /// Each (row, batch row) pair has its own accumulators and sums its
    /// words in order, so R and NB change nothing but the speed: more
    /// independent sums hide the add latency that bounds a single GEMV.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn grouped_tile<const NB: usize, const R: usize>(xp: &[f32], stride: usize, rows: [&[u8]; R], tables: [__m512; R], g: &Grouped, inf: usize) -> [[f32; NB]; R] {
        let words = inf.div_ceil(WORD);
        assert!(NB >= 1 && xp.len() >= (NB - 1) * stride + words * WORD);
        let full = inf / WORD;
        let rb = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == rb));
        // Words whose 16-byte load stays inside the row and which need no
        // mask: the unchecked loop.
        let fast = if rb >= 16 { full.min((rb - 16) / (4 * g.bits) + 1) } else { 0 };
        // In the last, partial word lane p holds input GROUPED_LANE[p].
        let rem = inf - full * WORD;
        let (mut last0, mut last1) = (0u16, 0u16);
        for (p, &j) in super::GROUPED_LANE.iter().enumerate() {
            if j < rem {
                if p < 16 {
                    last0 |= 1 << p;
                } else {
                    last1 |= 1 << (p - 16);
                }
            }
        }
        let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; R];
        for w in 0..fast {
            for i in 0..R {
                // SAFETY: w < fast: bytes w·4·bits .. + 16 are inside the row.
                let (i0, i1) = unsafe { grouped_decode(rows[i].as_ptr().add(w * 4 * g.bits), g) };
                let (w0, w1) = (_mm512_permutexvar_ps(i0, tables[i]), _mm512_permutexvar_ps(i1, tables[i]));
                // SAFETY: b < NB and w < words, inside xp (asserted above).
                unsafe { accumulate(&mut acc[i], xp.as_ptr(), stride, w, w0, w1, 0xffff, 0xffff) };
            }
        }
        for w in fast..words {
            let (m0, m1) = if w < full { (0xffff, 0xffff) } else { (last0, last1) };
            for i in 0..R {
                let (i0, i1) = grouped_indices(rows[i], w, g);
                let (w0, w1) = (_mm512_permutexvar_ps(i0, tables[i]), _mm512_permutexvar_ps(i1, tables[i]));
                // SAFETY: as above.
                unsafe { accumulate(&mut acc[i], xp.as_ptr(), stride, w, w0, w1, m0, m1) };
            }
        }
        let mut out = [[0f32; NB]; R];
        for (o, a) in out.iter_mut().zip(acc) {
            for (s, a) in o.iter_mut().zip(a) {
                let grouped = lanes(a);
                let mut ordered = [0f32; WORD];
                for (p, &j) in super::GROUPED_LANE.iter().enumerate() {
                    ordered[j] = grouped[p];
                }
                *s = reduce32(ordered);
            }
        }
        out
    }

    /// What every tile of a block reads: the activations, the block's
    /// packed rows and their codebooks in registers.
    struct Block<'a> {
        xp: &'a [f32],
        stride: usize,
        batch: usize,
        codes: &'a [u8],
        rb: usize,
        /// Row k's codebook (a block is at most a task's rows).
        tables: [__m512; super::ROWS_PER_TASK],
        g: Grouped,
        inf: usize,
    }

    /// Rows k0 .. k0 + R of a block against batch rows b .. b + NB.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn grouped_rows<const NB: usize, const R: usize>(c: &Block<'_>, b: usize, k0: usize, block: &mut [f32]) {
        let rows: [&[u8]; R] = std::array::from_fn(|i| &c.codes[(k0 + i) * c.rb..(k0 + i + 1) * c.rb]);
        let t: [__m512; R] = std::array::from_fn(|i| c.tables[k0 + i]);
        let out = grouped_tile::<NB, R>(&c.xp[b * c.stride..], c.stride, rows, t, &c.g, c.inf);
        for (i, o) in out.iter().enumerate() {
            block[(k0 + i) * c.batch + b..][..NB].copy_from_slice(o);
        }
    }

    /// The grouped decode's sums of a block of rows (scalar codes of 1–4
    /// bits: at most 16 codewords, one register): block[k·batch + b].
    /// Batch 1 takes 4 rows a tile, batch 2–3 two, so that a tile always
    /// holds at least 4 independent sums.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grouped_block_sums<'t>(xp: &[f32], stride: usize, batch: usize, codes: &[u8], table_of: &dyn Fn(usize) -> &'t [f32], dims: &CodebookDims, block: &mut [f32]) {
        let n = block.len() / batch;
        assert!(n <= super::ROWS_PER_TASK);
        let c = Block {
            xp,
            stride,
            batch,
            codes,
            rb: dims.row_bytes(),
            tables: std::array::from_fn(|k| if k < n { table16(table_of(k)) } else { _mm512_setzero_ps() }),
            g: Grouped::new(dims.bits as usize),
            inf: dims.in_features,
        };
        let r = match batch {
            1 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        let mut k = 0;
        while k < n {
            let rr = if n - k >= r { r } else { 1 };
            let mut b = 0;
            while b < batch {
                let nb = match batch - b {
                    8.. => 8,
                    4..=7 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                match (nb, rr) {
                    (1, 4) => grouped_rows::<1, 4>(&c, b, k, block),
                    (2, 2) => grouped_rows::<2, 2>(&c, b, k, block),
                    (1, 2) => grouped_rows::<1, 2>(&c, b, k, block),
                    (8, 1) => grouped_rows::<8, 1>(&c, b, k, block),
                    (4, 1) => grouped_rows::<4, 1>(&c, b, k, block),
                    (2, 1) => grouped_rows::<2, 1>(&c, b, k, block),
                    (1, 1) => grouped_rows::<1, 1>(&c, b, k, block),
                    _ => unreachable!("tile {nb}x{rr}: batch {batch} takes no such tile"),
                }
                b += nb;
            }
            k += rr;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::test_rng::XorShift;

    /// A random quantized weight: codes, sorted codebooks, uneven groups.
    pub(crate) struct Case {
        pub dims: CodebookDims,
        pub codes: Vec<u8>,
        pub codebooks: Vec<f32>,
        pub offsets: Vec<i32>,
        pub scale: Option<Vec<f32>>,
    }

    impl Case {
        pub(crate) fn new(g: &mut XorShift, out: usize, inf: usize, bits: u32, d: usize, groups: usize, scaled: bool) -> Case {
            let dims = CodebookDims { out_features: out, in_features: inf, bits, vector_dim: d, groups };
            let raw: Vec<u8> = (0..out * dims.codes_per_row()).map(|_| g.below(1 << bits) as u8).collect();
            let mut codes = vec![0u8; out * dims.row_bytes()];
            pack::pack_codes(&raw, bits, dims.codes_per_row(), &mut codes).unwrap();
            let codebooks = (0..groups * dims.table_len()).map(|_| g.normal_ish() * 0.1).collect();
            let mut offsets = vec![0i32];
            for k in 1..groups {
                offsets.push((g.below(out as u64 + 1) as i32).max(offsets[k - 1]));
            }
            offsets.push(out as i32);
            let scale = scaled.then(|| (0..out).map(|_| 0.5 + g.below(1000) as f32 * 1e-3).collect());
            Case { dims, codes, codebooks, offsets, scale }
        }
        pub(crate) fn weight(&self) -> CodebookWeight<'_> {
            CodebookWeight { dims: self.dims, codes: &self.codes, codebooks: &self.codebooks, group_offsets: &self.offsets, row_scale: self.scale.as_deref() }
        }
        /// The dense weight, decoded element by element from the format's definition.
        fn dense(&self) -> Vec<f32> {
            let d = self.dims;
            let mut raw = vec![0u8; d.out_features * d.codes_per_row()];
            pack::unpack_codes(&self.codes, d.bits, d.codes_per_row(), &mut raw).unwrap();
            let groups = row_groups(&self.offsets, d.out_features).unwrap();
            let mut w = vec![0f32; d.out_features * d.in_features];
            for r in 0..d.out_features {
                for j in 0..d.in_features {
                    let code = raw[r * d.codes_per_row() + j / d.vector_dim] as usize;
                    w[r * d.in_features + j] = self.codebooks[groups[r] as usize * d.table_len() + code * d.vector_dim + j % d.vector_dim];
                }
            }
            w
        }
    }

    fn bits_of<T: Float>(v: &[T]) -> Vec<u32> {
        v.iter().map(|x| x.to_f32().to_bits()).collect()
    }

    /// Against dequantize-then-matmul in f64: |y − ref| ≤ 1e-6·Σ|x·w|·s +
    /// half an ulp of T at |ref| (f32 sums of ≤ 300 terms err ≤ ~3e-5
    /// relative to Σ|x·w|; the bound is far inside that and above f32 error).
    fn against_dense<T: Float>(c: &Case, batch: usize, bias: Option<&[f32]>, g: &mut XorShift) {
        let d = c.dims;
        let x: Vec<T> = (0..batch * d.in_features).map(|_| T::from_f32(g.normal_ish())).collect();
        let w = c.dense();
        let mut y = vec![T::from_f32(0.0); batch * d.out_features];
        let mut runs = Vec::new();
        for k in Kernel::available() {
            linear_with(k, &x, batch, &c.weight(), bias, &mut y).unwrap();
            runs.push(bits_of(&y));
        }
        assert!(runs.windows(2).all(|p| p[0] == p[1]), "kernels differ: {d:?} batch {batch}");
        let ulp = match T::DTYPE {
            crate::DType::F32 => 2f64.powi(-24),
            crate::DType::F16 => 2f64.powi(-11),
            _ => 2f64.powi(-8),
        };
        for b in 0..batch {
            for r in 0..d.out_features {
                let (mut s, mut abs) = (0f64, 0f64);
                for j in 0..d.in_features {
                    let p = x[b * d.in_features + j].to_f32() as f64 * w[r * d.in_features + j] as f64;
                    s += p;
                    abs += p.abs();
                }
                let sc = c.scale.as_ref().map_or(1.0, |s| s[r] as f64);
                let want = s * sc + bias.map_or(0.0, |b| b[r] as f64);
                let got = y[b * d.out_features + r].to_f32() as f64;
                let tol = 1e-5 * abs * sc + ulp * want.abs() + 1e-30;
                assert!((got - want).abs() <= tol, "{:?} {d:?} b={b} r={r}: got {got}, want {want} (tol {tol})", T::DTYPE);
            }
        }
    }

    #[test]
    fn matches_dequantize_then_matmul() {
        let mut g = XorShift::new(7);
        for bits in 1..=8u32 {
            for d in [1usize, 2, 3, 4, 8, 16] {
                for &(out, inf_codes, batch, groups) in &[(5usize, 7usize, 1usize, 1usize), (33, 20, 3, 2), (17, 40, 9, 3), (3, 70, 17, 1)] {
                    let inf = inf_codes * d;
                    let c = Case::new(&mut g, out, inf, bits, d, groups, (bits + d as u32) % 2 == 0);
                    let bias: Option<Vec<f32>> = (bits % 3 == 0).then(|| (0..out).map(|_| g.normal_ish()).collect());
                    against_dense::<f32>(&c, batch, bias.as_deref(), &mut g);
                    against_dense::<bf16>(&c, batch, bias.as_deref(), &mut g);
                    against_dense::<f16>(&c, batch, bias.as_deref(), &mut g);
                }
            }
        }
    }

    /// A row's result does not depend on the batch it is computed in (the
    /// fixed order), nor on the thread count.
    #[test]
    fn rows_are_independent_of_batch_and_threads() {
        let mut g = XorShift::new(11);
        let c = Case::new(&mut g, 70, 300, 3, 1, 4, true);
        let x: Vec<f32> = (0..13 * 300).map(|_| g.normal_ish()).collect();
        let mut all = vec![0f32; 13 * 70];
        linear(&x, 13, &c.weight(), None, &mut all).unwrap();
        for b in [0usize, 5, 12] {
            let mut one = vec![0f32; 70];
            linear(&x[b * 300..(b + 1) * 300], 1, &c.weight(), None, &mut one).unwrap();
            assert_eq!(bits_of(&one), bits_of(&all[b * 70..(b + 1) * 70]));
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut y3 = vec![0f32; 13 * 70];
        pool.install(|| linear(&x, 13, &c.weight(), None, &mut y3).unwrap());
        assert_eq!(bits_of(&y3), bits_of(&all));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_tensor() {
        let mut g = XorShift::new(3);
        let c = Case::new(&mut g, 4, 8, 4, 2, 2, false);
        let x = vec![0f32; 8];
        let mut y = vec![0f32; 4];
        let mut w = c.weight();
        let msg = |w: &CodebookWeight<'_>, x: &[f32], y: &mut [f32]| linear(x, 1, w, None, y).unwrap_err().to_string();
        assert!(msg(&w, &x[..7], &mut y).contains("x:"));
        w.codes = &c.codes[1..];
        assert!(msg(&w, &x, &mut y).contains("codes:"));
        w = c.weight();
        w.codebooks = &c.codebooks[1..];
        assert!(msg(&w, &x, &mut y).contains("codebooks:"));
        w = c.weight();
        let bad = [0, 3, 2];
        w.group_offsets = &bad;
        assert!(msg(&w, &x, &mut y).contains("group_offsets"));
        w = c.weight();
        w.dims.vector_dim = 3;
        assert!(msg(&w, &x, &mut y).contains("vector_dim"));
        w = c.weight();
        w.dims.bits = 9;
        assert!(msg(&w, &x, &mut y).contains("bits"));
        assert!(linear(&x, 1, &c.weight(), Some(&[0.0; 3]), &mut y).unwrap_err().to_string().contains("bias"));
    }
}
