//! BitDelta: a fine-tune's weight delta Δ = W_ft − W_base stored as one sign
//! bit per element plus a scale α (per matrix, or per row), and the 1-bit
//! matmul that applies it without materialising S or W_ft.
//!
//! Signs use the one packing layout of [`crate::pack`] (rows along the last
//! dimension, each byte-aligned, bit j%8 of byte j/8 LSB first, zero padding)
//! with bit 1 meaning Δ < 0. Δ = 0 (from +0, −0 or equal values) is bit 0,
//! i.e. sign +1 — unlike `pack::pack_signs`, which stores the IEEE sign bit
//! and so packs −0.0 as 1. Δ is computed in f64 from the inputs widened to
//! f32, so its sign is exact.
//!
//! α = Σ|Δ|/n minimises ‖Δ − α·S‖² over α for S = sign(Δ). Σ|Δ| is summed in
//! f64 in a fixed order that depends on nothing but the tensor's shape: the
//! flat index range is cut into [`BLOCK`]s aligned to the tensor start; inside
//! a block, element i goes to lane i % 16 (each lane summed in index order)
//! and the 16 lanes are combined by a fixed tree; block sums are added in
//! block order. Per-row sums use the pieces of a row between block
//! boundaries, each summed the same way, added in order. So the result is
//! bitwise the same for any chunk length and thread count.
//!
//! Compression streams: the two tensors are read chunk by chunk (positioned
//! reads, see [`crate::merge::FileInputs`]), so memory is one chunk per
//! input. The base tensor's raw bytes are hashed (XXH3-64) in the same pass.

pub mod linear;
pub mod matmul;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::error::{check_len, Error, Result};
// NaN/Inf inputs are named as the merge names them.
use crate::merge::{nonfinite_error, FileInputs, FileTensor, Inputs, SliceInputs};
use crate::pack::packed_row_bytes;
use crate::simd::multiversion;
use crate::{DType, Float};

pub use linear::linear;
pub use matmul::{matmul, matmul_multi, Alphas};

/// Elements per α summation block (aligned to the tensor start).
pub const BLOCK: usize = 1 << 16;
/// f64 accumulators per block, element i in lane i % LANES.
const LANES: usize = 16;
/// Default elements per streamed chunk and input.
pub const DEFAULT_CHUNK: usize = 1 << 22;

type Lanes = [f64; LANES];

/// What compressing one tensor gives besides the packed signs.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressed {
    /// Σ|Δ| in the fixed order described in the module doc.
    pub abs_sum: f64,
    pub numel: usize,
    /// abs_sum / numel (0 for an empty tensor).
    pub alpha: f64,
    /// Σ|Δ_row| / row_len per row, when asked for.
    pub row_alphas: Option<Vec<f64>>,
    /// XXH3-64 of the base tensor's little-endian bytes.
    pub base_hash: u64,
}

/// Name of the content hash in `Compressed::base_hash`.
pub const HASH_NAME: &str = "xxh3-64";

/// Where packed signs go, a chunk's bytes at a time.
pub trait SignOutput {
    /// A buffer for packed bytes `range` of the whole tensor's signs.
    fn buffer(&mut self, range: Range<usize>) -> &mut [u8];
    fn commit(&mut self, range: Range<usize>) -> Result<()>;
}

/// Packed signs written in place into memory.
pub struct SliceSigns<'a>(pub &'a mut [u8]);

impl SignOutput for SliceSigns<'_> {
    fn buffer(&mut self, range: Range<usize>) -> &mut [u8] {
        &mut self.0[range]
    }
    fn commit(&mut self, _range: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// Packed signs written into a file at an absolute byte offset (one
/// positioned write per chunk), like a merge writes its output.
pub struct FileSigns {
    path: PathBuf,
    file: File,
    offset: u64,
    buf: Vec<u8>,
}

impl FileSigns {
    /// Opens `path` for writing `bytes` bytes at `offset`; the file must
    /// already be that long (its header and layout written by the caller).
    pub fn open(path: PathBuf, offset: u64, bytes: usize) -> Result<Self> {
        let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let end = offset + bytes as u64;
        if end > size {
            return Err(Error::Format(format!(
                "{}: the packed signs end at byte {end} but the file has {size} bytes",
                path.display()
            )));
        }
        Ok(FileSigns { path, file, offset, buf: Vec::new() })
    }
}

impl SignOutput for FileSigns {
    fn buffer(&mut self, range: Range<usize>) -> &mut [u8] {
        self.buf.resize(range.len(), 0);
        &mut self.buf
    }
    fn commit(&mut self, range: Range<usize>) -> Result<()> {
        let at = self.offset + range.start as u64;
        self.file.write_all_at(&self.buf[..range.len()], at).map_err(|e| Error::io(&self.path, e))
    }
}

/// The fixed combination of a block's lanes.
#[inline(always)]
fn reduce_lanes(mut l: Lanes) -> f64 {
    let mut off = LANES / 2;
    while off > 0 {
        for i in 0..off {
            l[i] += l[i + off];
        }
        off /= 2;
    }
    l[0]
}

/// |Δ| of one element pair, in f64 (exact sign; NaN/Inf propagate).
#[inline(always)]
fn abs_delta<T: Float>(b: T, f: T) -> f64 {
    (f.to_f32() as f64 - b.to_f32() as f64).abs()
}

/// The sign bit of one pair: 1 iff ft < base (Δ < 0; ±0 and equal give 0).
#[inline(always)]
fn neg_bit<T: Float>(b: T, f: T) -> u8 {
    (f.to_f32() < b.to_f32()) as u8
}

/// Packs the signs of up to 8 pairs into one byte.
#[inline(always)]
fn pack_byte<T: Float>(b: &[T], f: &[T]) -> u8 {
    b.iter().zip(f).enumerate().fold(0u8, |acc, (k, (&b, &f))| acc | neg_bit(b, f) << k)
}

multiversion! {
    /// Adds |Δ| of `base`/`ft` (flat indices from `start`) to `lanes`
    /// (element i in lane i % 16) and, when `bits` is not empty, packs their
    /// signs into it (`start` a multiple of 8; a flat bit stream).
    fn block_pass<T: Float>(base: &[T], ft: &[T], start: usize, lanes: &mut Lanes, bits: &mut [u8]) -> () {
        let with_bits = !bits.is_empty();
        let mut l = *lanes;
        let n = base.len();
        // Scalar up to the first index that is a multiple of 16.
        let head = ((LANES - start % LANES) % LANES).min(n);
        for i in 0..head {
            l[(start + i) % LANES] += abs_delta(base[i], ft[i]);
        }
        if with_bits && head > 0 {
            bits[0] = pack_byte(&base[..head], &ft[..head]);
        }
        let body = (n - head) / LANES * LANES;
        let (b16, f16) = (&base[head..head + body], &ft[head..head + body]);
        let byte0 = head / 8;
        for (g, (bg, fg)) in b16.chunks_exact(LANES).zip(f16.chunks_exact(LANES)).enumerate() {
            for k in 0..LANES {
                l[k] += abs_delta(bg[k], fg[k]);
            }
            if with_bits {
                let mut m = 0u16;
                for k in 0..LANES {
                    m |= (neg_bit(bg[k], fg[k]) as u16) << k;
                }
                bits[byte0 + 2 * g] = m as u8;
                bits[byte0 + 2 * g + 1] = (m >> 8) as u8;
            }
        }
        let tail = head + body;
        for i in tail..n {
            l[(start + i) % LANES] += abs_delta(base[i], ft[i]);
        }
        if with_bits {
            for (k, (bg, fg)) in base[tail..].chunks(8).zip(ft[tail..].chunks(8)).enumerate() {
                bits[(tail / 8) + k] = pack_byte(bg, fg);
            }
        }
        *lanes = l;
    }
}

/// First index of `xs` holding NaN/Inf.
fn first_nonfinite<T: Float>(xs: &[T]) -> Option<usize> {
    xs.iter().position(|v| !v.to_f32().is_finite())
}

/// Cuts `0..n` into chunks whose ends are packing boundaries (a row start,
/// or a multiple of 8 inside a row) of at most about `chunk_len` elements.
fn chunk_ranges(n: usize, row_len: usize, chunk_len: usize) -> Vec<Range<usize>> {
    let chunk_len = chunk_len.max(1);
    let step = |s: usize, len: usize| s..(s + len).min(n);
    if row_len.is_multiple_of(8) {
        let len = chunk_len.next_multiple_of(8);
        (0..n).step_by(len).map(|s| step(s, len)).collect()
    } else if row_len <= chunk_len {
        let len = chunk_len / row_len * row_len;
        (0..n).step_by(len).map(|s| step(s, len)).collect()
    } else {
        // Rows longer than a chunk: byte-aligned segments of each row.
        let seg = chunk_len.next_multiple_of(8);
        (0..n)
            .step_by(row_len)
            .flat_map(|r| (r..r + row_len).step_by(seg).map(move |s| s..(s + seg).min(r + row_len)))
            .collect()
    }
}

/// The shape of the packed output.
#[derive(Clone, Copy)]
struct Layout {
    n: usize,
    row_len: usize,
    row_bytes: usize,
}

impl Layout {
    /// Bit position of element `i` (or of the end `i` = a row end) in the
    /// row-padded packed stream.
    fn bit(&self, i: usize) -> usize {
        i / self.row_len * self.row_bytes * 8 + i % self.row_len
    }
    /// Packed bytes holding the signs of elements `r` (a chunk).
    fn bytes(&self, r: &Range<usize>) -> Range<usize> {
        self.bit(r.start) / 8..self.bit(r.end).div_ceil(8)
    }
}

/// Sums carried from one chunk into the next: the lanes of a block (and of
/// a row piece) that the chunk boundary cut.
#[derive(Default)]
struct Carry {
    block: Option<Lanes>,
    piece: Option<Lanes>,
}

/// One block-aligned piece of a chunk, computed in parallel.
struct TaskOut {
    start: usize,
    end: usize,
    lanes: Lanes,
    /// Completed row pieces: (row, sum).
    pieces: Vec<(usize, f64)>,
    /// The last row piece's lanes when the chunk end cut it.
    open_piece: Option<Lanes>,
}

/// Compresses one tensor read through `inputs` (the base, then one model:
/// the fine-tune) into packed signs at `signs`, `chunk_len` elements at a
/// time. `row_len` is the last dimension. On error the output may be partly
/// written.
pub fn compress_stream<T: Float>(
    inputs: &mut dyn Inputs<T>,
    row_len: usize,
    per_row: bool,
    signs: &mut dyn SignOutput,
    chunk_len: usize,
) -> Result<Compressed> {
    let n = inputs.len();
    if inputs.models() != 1 {
        return Err(Error::Value(format!("expected one fine-tuned input, got {}", inputs.models())));
    }
    if row_len == 0 || !n.is_multiple_of(row_len) {
        return Err(Error::Shape(format!("row_len: expected a positive divisor of the {n} elements, got {row_len}")));
    }
    let lay = Layout { n, row_len, row_bytes: packed_row_bytes(row_len, 1) };
    let fused_bits = row_len.is_multiple_of(8);
    let rows = n / row_len;
    let mut row_sums = if per_row { vec![0f64; rows] } else { Vec::new() };
    let mut hasher = Xxh3::new();
    let mut total = 0f64;
    let mut carry = Carry::default();
    for chunk in chunk_ranges(n, row_len, chunk_len) {
        let c = inputs.load(chunk.clone())?;
        let (base, ft) = (c.base, c.models[0]);
        let bytes = lay.bytes(&chunk);
        let out = signs.buffer(bytes.clone());
        let tasks = block_tasks(&chunk);
        let (_, outs) = rayon::join(
            || hasher.update(raw_bytes(base)),
            || compute_tasks(&tasks, &chunk, base, ft, &lay, per_row, &carry, fused_bits, out),
        );
        let outs = outs?;
        if !fused_bits {
            pack_rows(base, ft, &chunk, &lay, out);
        }
        signs.commit(bytes)?;
        for t in outs {
            if t.end.is_multiple_of(BLOCK) || t.end == n {
                total += reduce_lanes(t.lanes);
                carry.block = None;
            } else {
                carry.block = Some(t.lanes);
            }
            for (r, s) in t.pieces {
                row_sums[r] += s;
            }
            carry.piece = t.open_piece;
        }
    }
    let row_alphas = per_row.then(|| row_sums.iter().map(|s| s / row_len as f64).collect());
    Ok(Compressed {
        abs_sum: total,
        numel: n,
        alpha: if n == 0 { 0.0 } else { total / n as f64 },
        row_alphas,
        base_hash: hasher.digest(),
    })
}

/// A chunk cut at block boundaries.
fn block_tasks(chunk: &Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut s = chunk.start;
    while s < chunk.end {
        let e = ((s / BLOCK + 1) * BLOCK).min(chunk.end);
        out.push(s..e);
        s = e;
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn compute_tasks<T: Float>(
    tasks: &[Range<usize>],
    chunk: &Range<usize>,
    base: &[T],
    ft: &[T],
    lay: &Layout,
    per_row: bool,
    carry: &Carry,
    fused_bits: bool,
    out: &mut [u8],
) -> Result<Vec<TaskOut>> {
    // Each task's packed bytes (only when rows are whole bytes: then a
    // block boundary is a byte boundary and the stream has no padding).
    let mut slots: Vec<&mut [u8]> = Vec::with_capacity(tasks.len());
    if fused_bits {
        let mut rest = out;
        for t in tasks {
            let (mine, tail) = rest.split_at_mut((t.end - t.start).div_ceil(8));
            slots.push(mine);
            rest = tail;
        }
    } else {
        slots.resize_with(tasks.len(), || &mut []);
    }
    let results: Vec<std::result::Result<TaskOut, usize>> = tasks
        .par_iter()
        .zip(slots.into_par_iter())
        .map(|(t, bits)| {
            let (b, f) = (&base[t.start - chunk.start..t.end - chunk.start], &ft[t.start - chunk.start..t.end - chunk.start]);
            let mut lanes = if t.start.is_multiple_of(BLOCK) { [0.0; LANES] } else { carry.block.unwrap_or([0.0; LANES]) };
            block_pass(b, f, t.start, &mut lanes, bits);
            // A non-finite input makes a lane NaN or Inf (finite f32 deltas
            // sum far below f64's range), so finite lanes prove a clean block.
            if lanes.iter().any(|v| !v.is_finite()) {
                let bad = first_nonfinite(b).into_iter().chain(first_nonfinite(f)).min().unwrap_or(0);
                return Err(t.start + bad);
            }
            let (pieces, open_piece) = if per_row { row_pieces(b, f, t, chunk, lay, carry) } else { (Vec::new(), None) };
            Ok(TaskOut { start: t.start, end: t.end, lanes, pieces, open_piece })
        })
        .collect();
    let mut outs = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(t) => outs.push(t),
            Err(i) => {
                let j = i - chunk.start;
                let (name, v) = if base[j].to_f32().is_finite() { ("finetuned", ft[j]) } else { ("base", base[j]) };
                return Err(nonfinite_error(name, v.to_f32(), i));
            }
        }
    }
    debug_assert!(outs.windows(2).all(|w| w[0].end == w[1].start));
    Ok(outs)
}

/// Row pieces (a row between block boundaries) of task `t`: completed
/// (row, sum) pairs, and the lanes of a piece the chunk end cuts.
fn row_pieces<T: Float>(b: &[T], f: &[T], t: &Range<usize>, chunk: &Range<usize>, lay: &Layout, carry: &Carry) -> (Vec<(usize, f64)>, Option<Lanes>) {
    let mut pieces = Vec::new();
    let mut s = t.start;
    let mut open = None;
    let mut none: [u8; 0] = [];
    while s < t.end {
        let row = s / lay.row_len;
        let e = ((row + 1) * lay.row_len).min(t.end);
        // Continues a piece from the previous chunk only at the chunk start,
        // when that is neither a row start nor a block start.
        let continues = s == chunk.start && !s.is_multiple_of(lay.row_len) && !s.is_multiple_of(BLOCK);
        let mut lanes = if continues { carry.piece.unwrap_or([0.0; LANES]) } else { [0.0; LANES] };
        block_pass(&b[s - t.start..e - t.start], &f[s - t.start..e - t.start], s, &mut lanes, &mut none);
        if e.is_multiple_of(lay.row_len) || e.is_multiple_of(BLOCK) || e == lay.n {
            pieces.push((row, reduce_lanes(lanes)));
        } else {
            open = Some(lanes);
        }
        s = e;
    }
    (pieces, open)
}

/// Packs the signs of a chunk (whole rows, or a byte-aligned segment of one
/// row) into `out` when rows are not whole bytes.
fn pack_rows<T: Float>(base: &[T], ft: &[T], chunk: &Range<usize>, lay: &Layout, out: &mut [u8]) {
    let (rl, rb) = (lay.row_len, lay.row_bytes);
    if chunk.start.is_multiple_of(rl) && chunk.len().is_multiple_of(rl) {
        base.par_chunks(rl).zip(ft.par_chunks(rl)).zip(out.par_chunks_mut(rb)).with_min_len((BLOCK / rl).max(1)).for_each(
            |((b, f), o)| {
                for ((bg, fg), byte) in b.chunks(8).zip(f.chunks(8)).zip(o.iter_mut()) {
                    *byte = pack_byte(bg, fg);
                }
            },
        );
    } else {
        // A segment inside one row: starts on a multiple of 8.
        for ((bg, fg), byte) in base.chunks(8).zip(ft.chunks(8)).zip(out.iter_mut()) {
            *byte = pack_byte(bg, fg);
        }
    }
}

/// The little-endian bytes of a float slice.
fn raw_bytes<T: Float>(xs: &[T]) -> &[u8] {
    // SAFETY: f32/f16/bf16 are plain integer-backed values without padding;
    // the view covers exactly `xs` (the crate requires a little-endian target).
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// Compresses in-memory tensors (rows of `row_len`) into `signs` (rows of
/// `packed_row_bytes(row_len, 1)`).
pub fn compress<T: Float>(base: &[T], ft: &[T], row_len: usize, per_row: bool, signs: &mut [u8], chunk_len: usize) -> Result<Compressed> {
    check_len("finetuned", base.len(), ft.len())?;
    if row_len == 0 || !base.len().is_multiple_of(row_len) {
        return Err(Error::Shape(format!("row_len: expected a positive divisor of the {} elements, got {row_len}", base.len())));
    }
    check_len("signs (bytes)", base.len() / row_len * packed_row_bytes(row_len, 1), signs.len())?;
    let mut inputs = SliceInputs { base, models: vec![ft], has_base: true };
    compress_stream(&mut inputs, row_len, per_row, &mut SliceSigns(signs), chunk_len)
}

/// Compresses one tensor stored in files: `numel` elements of `base` and
/// `ft` (same dtype), the signs written at byte `out.1` of file `out.0`.
pub fn compress_files(base: FileTensor, ft: FileTensor, numel: usize, row_len: usize, out: (PathBuf, u64), per_row: bool, chunk_len: usize) -> Result<Compressed> {
    if base.dtype != ft.dtype {
        return Err(Error::DType(format!(
            "finetuned: dtype {} ({}) does not match base {} ({})",
            ft.dtype,
            ft.path.display(),
            base.dtype,
            base.path.display()
        )));
    }
    if row_len == 0 || !numel.is_multiple_of(row_len) {
        return Err(Error::Shape(format!("row_len: expected a positive divisor of the {numel} elements, got {row_len}")));
    }
    let bytes = numel / row_len * packed_row_bytes(row_len, 1);
    let mut signs = FileSigns::open(out.0, out.1, bytes)?;
    fn run<T: Float>(base: FileTensor, ft: FileTensor, numel: usize, row_len: usize, per_row: bool, signs: &mut FileSigns, chunk_len: usize) -> Result<Compressed> {
        let mut inputs = FileInputs::<T>::open(Some(base), vec![ft], numel)?;
        compress_stream(&mut inputs, row_len, per_row, signs, chunk_len)
    }
    match base.dtype {
        DType::F32 => run::<f32>(base, ft, numel, row_len, per_row, &mut signs, chunk_len),
        DType::F16 => run::<half::f16>(base, ft, numel, row_len, per_row, &mut signs, chunk_len),
        DType::BF16 => run::<half::bf16>(base, ft, numel, row_len, per_row, &mut signs, chunk_len),
        other => Err(Error::DType(format!("base: expected float32, float16 or bfloat16 data, got {other} ({})", base.path.display()))),
    }
}

/// XXH3-64 of a tensor's bytes, as `Compressed::base_hash` computes it.
pub fn content_hash<T: Float>(xs: &[T]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(raw_bytes(xs))
}

/// The scale applied by `restore`: one per matrix or one per row.
#[derive(Clone, Copy, Debug)]
pub enum Scale<'a> {
    Tensor(f64),
    Rows(&'a [f64]),
}

/// f64 → T, rounded once (to nearest even).
trait FromF64: Float {
    fn from_f64(v: f64) -> Self;
}
impl FromF64 for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

/// f64 → f32 rounded to odd: exact values stay, others go to whichever
/// neighbour has an odd last bit. Rounding that once more to a format with
/// at least 2 fewer bits (f16, bf16) gives the correctly rounded result;
/// going through f32 by nearest-even would round twice (`half`'s
/// `from_f64` does: 1 + 2^-8 + 2^-52 became bf16 1.0).
fn f64_to_f32_odd(v: f64) -> f32 {
    let r = v as f32;
    if r as f64 == v || v.is_nan() {
        return r;
    }
    // Truncate toward zero, then set the last bit (sign-magnitude bits).
    let t = if (r as f64).abs() > v.abs() { f32::from_bits(r.to_bits() - 1) } else { r };
    f32::from_bits(t.to_bits() | 1)
}

impl FromF64 for half::f16 {
    fn from_f64(v: f64) -> Self {
        half::f16::from_f32(f64_to_f32_odd(v))
    }
}
impl FromF64 for half::bf16 {
    fn from_f64(v: f64) -> Self {
        <half::bf16 as Float>::from_f32(f64_to_f32_odd(v))
    }
}

/// out = base + α·s with s = ±1 from `signs` (bit 1 → −1), computed in f64
/// and rounded once to T; rows of `row_len`.
pub fn restore<T: Float>(base: &[T], signs: &[u8], row_len: usize, scale: Scale<'_>, out: &mut [T]) -> Result<()> {
    check_len("out", base.len(), out.len())?;
    if row_len == 0 || !base.len().is_multiple_of(row_len) {
        return Err(Error::Shape(format!("row_len: expected a positive divisor of the {} elements, got {row_len}", base.len())));
    }
    let rows = base.len() / row_len;
    let rb = packed_row_bytes(row_len, 1);
    check_len("signs (bytes)", rows * rb, signs.len())?;
    if let Scale::Rows(a) = scale {
        check_len("alpha (rows)", rows, a.len())?;
    }
    fn run<T: FromF64>(base: &[T], signs: &[u8], row_len: usize, rb: usize, scale: Scale<'_>, out: &mut [T]) {
        let per_task = (BLOCK / row_len).max(1);
        base.par_chunks(row_len)
            .zip(signs.par_chunks(rb))
            .zip(out.par_chunks_mut(row_len))
            .enumerate()
            .with_min_len(per_task)
            .for_each(|(r, ((b, s), o))| {
                let a = match scale {
                    Scale::Tensor(a) => a,
                    Scale::Rows(a) => a[r],
                };
                for (j, (bv, ov)) in b.iter().zip(o.iter_mut()).enumerate() {
                    let neg = s[j / 8] >> (j % 8) & 1 == 1;
                    *ov = T::from_f64(bv.to_f32() as f64 + if neg { -a } else { a });
                }
            });
    }
    match T::DTYPE {
        DType::F32 => run(cast::<T, f32>(base), signs, row_len, rb, scale, cast_mut::<T, f32>(out)),
        DType::F16 => run(cast::<T, half::f16>(base), signs, row_len, rb, scale, cast_mut::<T, half::f16>(out)),
        DType::BF16 => run(cast::<T, half::bf16>(base), signs, row_len, rb, scale, cast_mut::<T, half::bf16>(out)),
        other => return Err(Error::DType(format!("base: expected float32, float16 or bfloat16, got {other}"))),
    }
    Ok(())
}

/// Views a `T` slice as `U` when they are the same type (checked by DTYPE).
fn cast<T: Float, U: Float>(xs: &[T]) -> &[U] {
    assert!(T::DTYPE == U::DTYPE && std::mem::size_of::<T>() == std::mem::size_of::<U>());
    // SAFETY: T and U are the same type (same DTYPE and size).
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<U>(), xs.len()) }
}

fn cast_mut<T: Float, U: Float>(xs: &mut [T]) -> &mut [U] {
    assert!(T::DTYPE == U::DTYPE && std::mem::size_of::<T>() == std::mem::size_of::<U>());
    // SAFETY: as `cast`; the mutable borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<U>(), xs.len()) }
}
