//! Bit packing: one layout for sign bits and 1–8-bit codes.
//!
//! A tensor is viewed as rows along its last dimension; each row is packed on
//! its own into `packed_row_bytes(row_len, bits)` bytes, so rows start on byte
//! boundaries (a row can be unpacked without its neighbours). Inside a row,
//! element j's code occupies bits [j*bits, (j+1)*bits) of a little-endian bit
//! stream: bit p is bit p%8 of byte p/8, a code's low bit first. Padding bits
//! are zero. Signs use bits = 1 and store the IEEE sign bit (-0.0 packs to 1);
//! unpacking gives -1.0 for 1 and +1.0 for 0.

use rayon::prelude::*;

use crate::error::{check_len, Error, Result};
use crate::Float;

/// Groups of 8 elements per parallel segment: 8 codes of `bits` bits fill
/// exactly `bits` bytes, so segments of whole groups never share a byte.
const GROUPS_PER_SEGMENT: usize = 1 << 14;

pub fn packed_row_bytes(row_len: usize, bits: u32) -> usize {
    (row_len * bits as usize).div_ceil(8)
}

fn check_bits(bits: u32) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::Value(format!("bits: expected 1..=8, got {bits}")))
    }
}

/// Checks `row_len` against the element count and returns the row count.
fn rows(what: &str, elements: usize, row_len: usize) -> Result<usize> {
    if row_len == 0 || elements % row_len != 0 {
        return Err(Error::Shape(format!(
            "{what}: row length {row_len} does not divide its {elements} elements"
        )));
    }
    Ok(elements / row_len)
}

/// Runs `f` on matching pieces of `elems` (rows of `row_len`) and `bytes`
/// (rows of `row_bytes`): whole rows in parallel, and long rows split into
/// byte-aligned segments so one huge row still uses every thread.
fn par_rows<E: Send + Sync, B: Send + Sync>(
    elems: &mut [E],
    bytes: &mut [B],
    row_len: usize,
    row_bytes: usize,
    bits: usize,
    f: impl Fn(&mut [E], &mut [B]) + Sync,
) {
    if elems.is_empty() {
        return;
    }
    let (seg_e, seg_b) = (8 * GROUPS_PER_SEGMENT, bits * GROUPS_PER_SEGMENT);
    elems
        .par_chunks_mut(row_len)
        .zip(bytes.par_chunks_mut(row_bytes.max(1)))
        .for_each(|(e, b)| {
            if e.len() > seg_e {
                e.par_chunks_mut(seg_e).zip(b.par_chunks_mut(seg_b)).for_each(|(e, b)| f(e, b));
            } else {
                f(e, b)
            }
        });
}

// The packers take `&mut` views of their inputs only to share `par_rows`;
// they never write to them. These wrappers hide that.
fn as_mut<T>(s: &[T]) -> &mut [T] {
    // SAFETY: callers pass the result to closures that only read it, and the
    // borrow of `s` outlives every use.
    unsafe { std::slice::from_raw_parts_mut(s.as_ptr() as *mut T, s.len()) }
}

fn pack_segment(codes: &[u8], bits: u32, out: &mut [u8]) {
    out.fill(0);
    for (j, &c) in codes.iter().enumerate() {
        let p = j * bits as usize;
        let (byte, off) = (p / 8, p % 8);
        let wide = (c as u16) << off;
        out[byte] |= wide as u8;
        if off + bits as usize > 8 {
            out[byte + 1] |= (wide >> 8) as u8;
        }
    }
}

fn unpack_segment(packed: &[u8], bits: u32, out: &mut [u8]) {
    let mask = ((1u16 << bits) - 1) as u16;
    for (j, c) in out.iter_mut().enumerate() {
        let p = j * bits as usize;
        let (byte, off) = (p / 8, p % 8);
        let mut wide = packed[byte] as u16;
        if off + bits as usize > 8 {
            wide |= (packed[byte + 1] as u16) << 8;
        }
        *c = ((wide >> off) & mask) as u8;
    }
}

pub fn pack_codes(codes: &[u8], bits: u32, row_len: usize, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let n_rows = rows("codes", codes.len(), row_len)?;
    let row_bytes = packed_row_bytes(row_len, bits);
    check_len("out (bytes)", n_rows * row_bytes, out.len())?;
    let limit = 1u16 << bits;
    if let Some(i) = codes.par_iter().position_first(|&c| c as u16 >= limit) {
        return Err(Error::Value(format!(
            "codes: value {} at index {i} does not fit in {bits} bits (max {})",
            codes[i],
            limit - 1
        )));
    }
    par_rows(as_mut(codes), out, row_len, row_bytes, bits as usize, |c, o| pack_segment(c, bits, o));
    Ok(())
}

pub fn unpack_codes(packed: &[u8], bits: u32, row_len: usize, out: &mut [u8]) -> Result<()> {
    check_bits(bits)?;
    let n_rows = rows("out", out.len(), row_len)?;
    let row_bytes = packed_row_bytes(row_len, bits);
    check_len("packed (bytes)", n_rows * row_bytes, packed.len())?;
    par_rows(out, as_mut(packed), row_len, row_bytes, bits as usize, |o, p| unpack_segment(p, bits, o));
    Ok(())
}

pub fn pack_signs<T: Float>(x: &[T], row_len: usize, out: &mut [u8]) -> Result<()> {
    let n_rows = rows("x", x.len(), row_len)?;
    let row_bytes = packed_row_bytes(row_len, 1);
    check_len("out (bytes)", n_rows * row_bytes, out.len())?;
    par_rows(as_mut(x), out, row_len, row_bytes, 1, |e, o| {
        for (byte, group) in o.iter_mut().zip(e.chunks(8)) {
            *byte = group.iter().enumerate().fold(0u8, |acc, (j, v)| acc | ((v.sign_bit() as u8) << j));
        }
    });
    Ok(())
}

pub fn unpack_signs<T: Float>(packed: &[u8], row_len: usize, out: &mut [T]) -> Result<()> {
    let n_rows = rows("out", out.len(), row_len)?;
    let row_bytes = packed_row_bytes(row_len, 1);
    check_len("packed (bytes)", n_rows * row_bytes, packed.len())?;
    let (plus, minus) = (T::from_f32(1.0), T::from_f32(-1.0));
    par_rows(out, as_mut(packed), row_len, row_bytes, 1, |e, p| {
        for (group, &byte) in e.chunks_mut(8).zip(p.iter()) {
            for (j, v) in group.iter_mut().enumerate() {
                *v = if (byte >> j) & 1 == 1 { minus } else { plus };
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn naive_pack(codes: &[u8], bits: u32, row_len: usize) -> Vec<u8> {
        let rb = packed_row_bytes(row_len, bits);
        let mut out = vec![0u8; codes.len() / row_len * rb];
        for (r, row) in codes.chunks(row_len).enumerate() {
            for (j, &c) in row.iter().enumerate() {
                for b in 0..bits as usize {
                    let p = j * bits as usize + b;
                    if (c >> b) & 1 == 1 {
                        out[r * rb + p / 8] |= 1 << (p % 8);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn codes_roundtrip_and_match_naive() {
        let mut s = 12345u64;
        for bits in 1..=8u32 {
            for row_len in [1usize, 3, 7, 8, 9, 13, 1000, 8 * GROUPS_PER_SEGMENT * 2 + 5] {
                let n_rows = if row_len > 10_000 { 1 } else { 5 };
                let codes: Vec<u8> = (0..row_len * n_rows)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((s >> 33) % (1u64 << bits)) as u8
                    })
                    .collect();
                let mut packed = vec![0xAAu8; n_rows * packed_row_bytes(row_len, bits)];
                pack_codes(&codes, bits, row_len, &mut packed).unwrap();
                assert_eq!(packed, naive_pack(&codes, bits, row_len), "bits={bits} row_len={row_len}");
                let mut back = vec![0u8; codes.len()];
                unpack_codes(&packed, bits, row_len, &mut back).unwrap();
                assert_eq!(back, codes);
            }
        }
    }

    #[test]
    fn signs_roundtrip() {
        let x: Vec<bf16> = [1.0f32, -2.0, -0.0, 0.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 0.5]
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let mut packed = vec![0u8; 2];
        pack_signs(&x, 11, &mut packed).unwrap();
        assert_eq!(packed, vec![0b1010_0110, 0b0000_0010]);
        let mut back = vec![bf16::ZERO; 11];
        unpack_signs(&packed, 11, &mut back).unwrap();
        for (a, b) in x.iter().zip(&back) {
            assert_eq!(b.to_f32(), if a.sign_bit() { -1.0 } else { 1.0 });
        }
    }

    #[test]
    fn errors() {
        let mut out = [0u8; 2];
        assert!(matches!(pack_codes(&[0, 1, 4], 2, 3, &mut out[..1]), Err(Error::Value(m)) if m.contains("index 2")));
        assert!(matches!(pack_codes(&[0, 1, 2], 9, 3, &mut out), Err(Error::Value(_))));
        assert!(matches!(pack_codes(&[0, 1, 2], 2, 3, &mut out), Err(Error::Shape(_))));
        assert!(matches!(pack_codes(&[0, 1, 2], 2, 2, &mut out), Err(Error::Shape(_))));
    }
}
