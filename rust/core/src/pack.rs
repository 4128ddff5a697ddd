//! Bit packing: one layout for sign bits and 1–8-bit codes.
//!
//! A tensor is viewed as rows along its last dimension; each row is packed on
//! its own into `packed_row_bytes(row_len, bits)` = ceil(row_len·bits / 8)
//! bytes, so rows start on byte boundaries (a row can be unpacked without its
//! neighbours). Inside a row, element j's code occupies bit positions
//! [j·bits, (j+1)·bits) of a little-endian bit stream: bit p is bit p % 8
//! (LSB first) of byte p / 8, and a code's low bit comes first. Padding bits
//! at the end of a row are zero.
//!
//! Signs use bits = 1 and store the IEEE sign bit, so -0.0 packs to 1 and
//! +0.0 to 0; unpacking gives -1.0 for a 1 and +1.0 for a 0.
//!
//! Eight codes of `bits` bits fill exactly `bits` bytes, which is both the
//! unit of the kernels (one u64 per group) and what lets one long row be
//! split into byte-aligned segments that are packed in parallel.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::Float;

/// Groups of 8 elements per parallel task (a segment of a long row, or a
/// batch of short rows).
const SEGMENT_GROUPS: usize = 1 << 14;

/// Bytes one packed row of `row_len` codes of `bits` bits takes.
pub fn packed_row_bytes(row_len: usize, bits: u32) -> usize {
    (row_len * bits as usize).div_ceil(8)
}

fn check_bits(bits: u32) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Value(format!("bits: expected 1 <= bits <= 8, got {bits}")))
    }
}

/// Checks that rows of `row_len` tile `elements` and returns the row count.
fn row_count(what: &str, elements: usize, row_len: usize) -> Result<usize> {
    if row_len == 0 || !elements.is_multiple_of(row_len) {
        return Err(Error::Shape(format!(
            "row_len: expected a positive divisor of the {elements} elements of {what}, got {row_len}"
        )));
    }
    Ok(elements / row_len)
}

/// How one side of a packing job is cut: items per row, and items per
/// segment when a row is long enough to split.
#[derive(Clone, Copy)]
struct Split {
    row: usize,
    segment: usize,
}

impl Split {
    fn elements(row_len: usize) -> Self {
        Split { row: row_len, segment: 8 * SEGMENT_GROUPS }
    }

    fn bytes(row_len: usize, bits: u32) -> Self {
        Split { row: packed_row_bytes(row_len, bits), segment: bits as usize * SEGMENT_GROUPS }
    }
}

/// Runs `f` on matching pieces of `src` and `dst` in parallel: whole rows,
/// batched when short, and byte-aligned segments of rows when long (the
/// k-th segment of a row holds the same groups of 8 on both sides).
fn par_rows<S: Sync, D: Send>(src: &[S], s: Split, dst: &mut [D], d: Split, f: impl Fn(&[S], &mut [D]) + Sync) {
    let rows_per_task = (s.segment / s.row).max(1);
    src.par_chunks(s.row)
        .zip(dst.par_chunks_mut(d.row))
        .with_min_len(rows_per_task)
        .for_each(|(a, b)| {
            if a.len() > s.segment {
                a.par_chunks(s.segment).zip(b.par_chunks_mut(d.segment)).for_each(|(a, b)| f(a, b));
            } else {
                f(a, b);
            }
        });
}

/// Up to eight codes of B bits as the little-endian bit stream, in the low
/// B bytes.
#[inline(always)]
fn pack_group<const B: usize>(codes: &[u8]) -> [u8; 8] {
    let word = codes.iter().enumerate().fold(0u64, |w, (j, &c)| w | (c as u64) << (j * B));
    word.to_le_bytes()
}

#[inline(always)]
fn unpack_group<const B: usize>(bytes: [u8; 8], out: &mut [u8]) {
    let word = u64::from_le_bytes(bytes);
    for (j, c) in out.iter_mut().enumerate() {
        *c = (word >> (j * B)) as u8 & (u8::MAX >> (8 - B));
    }
}

/// Packs codes (each < 2^B, which keeps the padding zero) into
/// ceil(len·B / 8) bytes.
fn pack_run<const B: usize>(codes: &[u8], out: &mut [u8]) {
    let groups = codes.len() / 8;
    let (codes, rest) = codes.split_at(groups * 8);
    let (out, tail) = out.split_at_mut(groups * B);
    for (g, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(B)) {
        o.copy_from_slice(&pack_group::<B>(g)[..B]);
    }
    if !rest.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&pack_group::<B>(rest)[..n]);
    }
}

fn unpack_run<const B: usize>(packed: &[u8], out: &mut [u8]) {
    let groups = out.len() / 8;
    let (out, rest) = out.split_at_mut(groups * 8);
    let (packed, tail) = packed.split_at(groups * B);
    for (o, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(B)) {
        let mut bytes = [0u8; 8];
        bytes[..B].copy_from_slice(p);
        unpack_group::<B>(bytes, o);
    }
    if !rest.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..tail.len()].copy_from_slice(tail);
        unpack_group::<B>(bytes, rest);
    }
}

type Kernel = fn(&[u8], &mut [u8]);

/// The width-specialised (pack, unpack) kernels for 1 <= bits <= 8.
fn kernels(bits: u32) -> (Kernel, Kernel) {
    match bits {
        1 => (pack_run::<1>, unpack_run::<1>),
        2 => (pack_run::<2>, unpack_run::<2>),
        3 => (pack_run::<3>, unpack_run::<3>),
        4 => (pack_run::<4>, unpack_run::<4>),
        5 => (pack_run::<5>, unpack_run::<5>),
        6 => (pack_run::<6>, unpack_run::<6>),
        7 => (pack_run::<7>, unpack_run::<7>),
        8 => (pack_run::<8>, unpack_run::<8>),
        _ => unreachable!("bits checked to be in 1..=8"),
    }
}

/// Index of the first code >= 2^bits. Chunks are tested by their maximum
/// (a vectorised reduction) and only a failing one is searched.
fn first_too_wide(codes: &[u8], bits: u32) -> Option<usize> {
    let chunk = 8 * SEGMENT_GROUPS;
    let too_wide = |c: &u8| u32::from(*c) >> bits != 0;
    let bad = codes.par_chunks(chunk).position_first(|c| too_wide(&c.iter().fold(0, |m, &v| m.max(v))))?;
    codes[bad * chunk..].iter().position(too_wide).map(|j| bad * chunk + j)
}

/// Packs `codes` (rows of `row_len`, each code < 2^bits) into `out`
/// (rows of `packed_row_bytes(row_len, bits)`).
pub fn pack_codes(codes: &[u8], bits: u32, row_len: usize, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let rows = row_count("codes", codes.len(), row_len)?;
    check_len("out (bytes)", rows * packed_row_bytes(row_len, bits), out.len())?;
    if let Some(i) = first_too_wide(codes, bits) {
        return Err(Error::Value(format!(
            "codes: value {} at index {i} does not fit in {bits} bits (max {})",
            codes[i],
            (1u32 << bits) - 1
        )));
    }
    let (pack, _) = kernels(bits);
    par_rows(codes, Split::elements(row_len), out, Split::bytes(row_len, bits), pack);
    Ok(())
}

/// Unpacks `packed` (rows of `packed_row_bytes(row_len, bits)`) into `out`
/// (rows of `row_len` codes).
pub fn unpack_codes(packed: &[u8], bits: u32, row_len: usize, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let rows = row_count("out", out.len(), row_len)?;
    check_len("packed (bytes)", rows * packed_row_bytes(row_len, bits), packed.len())?;
    let (_, unpack) = kernels(bits);
    par_rows(packed, Split::bytes(row_len, bits), out, Split::elements(row_len), unpack);
    Ok(())
}

/// Packs the IEEE sign bits of `x` (rows of `row_len`) into `out` (rows of
/// `packed_row_bytes(row_len, 1)`).
pub fn pack_signs<T: Float>(x: &[T], row_len: usize, out: &mut [u8]) -> Result<()> {
    let rows = row_count("x", x.len(), row_len)?;
    check_len("out (bytes)", rows * packed_row_bytes(row_len, 1), out.len())?;
    par_rows(x, Split::elements(row_len), out, Split::bytes(row_len, 1), |xs, o| {
        for (byte, group) in o.iter_mut().zip(xs.chunks(8)) {
            *byte = group.iter().enumerate().fold(0, |b, (j, v)| b | (v.sign_bit() as u8) << j);
        }
    });
    Ok(())
}

/// Writes -1 for each set bit of `packed` and +1 for each clear one into
/// `out` (rows of `row_len`).
pub fn unpack_signs<T: Float>(packed: &[u8], row_len: usize, out: &mut [T]) -> Result<()> {
    let rows = row_count("out", out.len(), row_len)?;
    check_len("packed (bytes)", rows * packed_row_bytes(row_len, 1), packed.len())?;
    let (plus, minus) = (T::from_f32(1.0), T::from_f32(-1.0));
    par_rows(packed, Split::bytes(row_len, 1), out, Split::elements(row_len), |p, o| {
        for (group, &byte) in o.chunks_mut(8).zip(p) {
            for (j, v) in group.iter_mut().enumerate() {
                *v = if byte >> j & 1 == 1 { minus } else { plus };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    use crate::test_rng::XorShift;

    fn random_codes(n: usize, bits: u32, seed: u64) -> Vec<u8> {
        let mut g = XorShift::new(seed);
        (0..n).map(|_| (g.next() >> 40) as u8 >> (8 - bits)).collect()
    }

    /// The layout, bit by bit, straight from the module doc.
    fn naive_pack(codes: &[u8], bits: u32, row_len: usize) -> Vec<u8> {
        let row_bytes = packed_row_bytes(row_len, bits);
        let mut out = vec![0u8; codes.len() / row_len * row_bytes];
        for (r, row) in codes.chunks(row_len).enumerate() {
            for (j, &c) in row.iter().enumerate() {
                for b in 0..bits as usize {
                    let p = j * bits as usize + b;
                    out[r * row_bytes + p / 8] |= ((c >> b) & 1) << (p % 8);
                }
            }
        }
        out
    }

    fn roundtrip(bits: u32, row_len: usize, rows: usize, seed: u64) {
        let codes = random_codes(row_len * rows, bits, seed);
        let mut packed = vec![0xA5u8; rows * packed_row_bytes(row_len, bits)];
        pack_codes(&codes, bits, row_len, &mut packed).unwrap();
        assert!(packed == naive_pack(&codes, bits, row_len), "bits={bits} row_len={row_len} rows={rows}");
        let mut back = vec![0xA5u8; codes.len()];
        unpack_codes(&packed, bits, row_len, &mut back).unwrap();
        assert!(back == codes, "bits={bits} row_len={row_len} rows={rows}");
    }

    #[test]
    fn codes_match_naive_layout_and_roundtrip() {
        for bits in 1..=8 {
            for row_len in [1, 3, 7, 8, 9, 13, 1000] {
                for rows in [0, 1, 2, 37] {
                    roundtrip(bits, row_len, rows, bits as u64 * 1000 + row_len as u64);
                }
            }
            // Many short rows batched per task, and long rows split into segments.
            roundtrip(bits, 5, 100_003, bits as u64);
            roundtrip(bits, 8 * SEGMENT_GROUPS * 3 + 5, 1, bits as u64);
            roundtrip(bits, 8 * SEGMENT_GROUPS + 1, 3, bits as u64);
        }
    }

    #[test]
    fn layout_examples() {
        let mut out = [0u8; 2];
        // 3-bit codes 5, 2, 7: bits 101 | 010 | 111 from bit 0 up.
        pack_codes(&[5, 2, 7], 3, 3, &mut out).unwrap();
        assert_eq!(out, [0b1101_0101, 0b0000_0001]);
        // Each row starts on a byte: two rows of one 2-bit code.
        pack_codes(&[3, 1], 2, 1, &mut out).unwrap();
        assert_eq!(out, [0b11, 0b01]);
    }

    fn check_signs<T: Float>(row_len: usize, rows: usize) {
        let mut g = XorShift::new(row_len as u64 * 7 + 1);
        let values = [1.5f32, -2.0, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, -1e-3];
        let x: Vec<T> = (0..row_len * rows).map(|_| T::from_f32(values[(g.next() % 7) as usize])).collect();
        let mut packed = vec![0xFFu8; rows * packed_row_bytes(row_len, 1)];
        pack_signs(&x, row_len, &mut packed).unwrap();
        let bits: Vec<u8> = x.iter().map(|v| v.sign_bit() as u8).collect();
        assert!(packed == naive_pack(&bits, 1, row_len), "row_len={row_len}");
        let mut back = vec![T::from_f32(0.0); x.len()];
        unpack_signs(&packed, row_len, &mut back).unwrap();
        for (v, b) in x.iter().zip(&back) {
            assert_eq!(b.to_f32(), if v.sign_bit() { -1.0 } else { 1.0 });
        }
    }

    #[test]
    fn signs_roundtrip() {
        for row_len in [1, 3, 7, 8, 9, 13, 1000, 8 * SEGMENT_GROUPS * 2 + 3] {
            check_signs::<f32>(row_len, 3);
            check_signs::<bf16>(row_len, 2);
            check_signs::<f16>(row_len, 1);
        }
    }

    #[test]
    fn negative_zero_packs_to_one() {
        let x = [-0.0f32, 0.0, -1.0, 2.0, -0.0, 0.0, 0.0, 0.0, -0.0];
        let mut packed = [0u8; 2];
        pack_signs(&x, 9, &mut packed).unwrap();
        assert_eq!(packed, [0b0001_0101, 0b1]);
        let mut back = [0.0f32; 9];
        unpack_signs(&packed, 9, &mut back).unwrap();
        assert_eq!(back, [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0]);
    }

    #[test]
    fn errors() {
        let mut out = [0u8; 2];
        let value = |r: Result<()>, want: &str| matches!(r, Err(Error::Value(m)) if m == want);
        let msg = "codes: value 4 at index 2 does not fit in 2 bits (max 3)";
        assert!(value(pack_codes(&[0, 1, 4, 9], 2, 4, &mut out[..1]), msg));
        // The first offending index, also past the first parallel chunk.
        let mut codes = vec![1u8; 3 * 8 * SEGMENT_GROUPS];
        codes[8 * SEGMENT_GROUPS + 17] = 200;
        codes[2 * 8 * SEGMENT_GROUPS] = 2;
        let msg = format!("codes: value 200 at index {} does not fit in 1 bits (max 1)", 8 * SEGMENT_GROUPS + 17);
        assert!(value(pack_codes(&codes, 1, codes.len(), &mut vec![0; codes.len() / 8]), &msg));
        assert!(value(pack_codes(&[0, 1, 2], 9, 3, &mut out), "bits: expected 1 <= bits <= 8, got 9"));
        assert!(value(pack_codes(&[0], 0, 1, &mut out[..0]), "bits: expected 1 <= bits <= 8, got 0"));
        assert!(value(unpack_codes(&[0], 0, 1, &mut out), "bits: expected 1 <= bits <= 8, got 0"));
        let shape = |r: Result<()>| matches!(r, Err(Error::Shape(_)));
        assert!(shape(pack_codes(&[0, 1, 2], 2, 3, &mut out)));
        assert!(shape(pack_codes(&[0, 1, 2], 2, 2, &mut out)));
        assert!(shape(pack_codes(&[0, 1, 2], 2, 0, &mut out)));
        assert!(shape(unpack_codes(&out, 2, 3, &mut [0u8; 3])));
        assert!(shape(unpack_codes(&out[..1], 2, 2, &mut [0u8; 3])));
        assert!(shape(pack_signs(&[1.0f32; 9], 9, &mut out[..1])));
        assert!(shape(pack_signs(&[1.0f32; 9], 4, &mut out)));
        assert!(shape(unpack_signs(&out, 8, &mut [0.0f32; 9])));
    }
}
