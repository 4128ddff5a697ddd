//! Bit packing of sign bits and 1–8-bit codes (layout documented in
//! `ferrox_core::pack`): rows along the last dimension, each byte-aligned.

use ferrox_core::{pack, DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

/// Bytes one packed row of `row_len` codes of `bits` bits takes.
#[pyfunction]
pub fn packed_row_bytes(row_len: usize, bits: u32) -> usize {
    pack::packed_row_bytes(row_len, bits)
}

/// `out` must have x's leading dims and a last dim of `last`.
fn expect_rows(what: &Tensor<'_>, rows_of: &Tensor<'_>, last: usize) -> ferrox_core::Result<()> {
    let mut want = rows_of.shape.clone();
    match want.last_mut() {
        Some(l) => *l = last,
        None => want.push(last),
    }
    if what.shape != want {
        return Err(Error::Shape(format!(
            "{}: expected shape {:?}, got {:?}",
            what.name, want, what.shape
        )));
    }
    Ok(())
}

fn expect_cpu_pair(a: &Tensor<'_>, b: &Tensor<'_>) -> PyResult<()> {
    (|| {
        a.expect_cpu()?;
        b.expect_cpu()?;
        b.check_alias(a, false).map(|_| ())
    })()
    .map_err(to_py)
}

/// Both tensors are uint8 and `packed` has `unpacked`'s rows of packed width.
fn expect_codes(a: &Tensor<'_>, b: &Tensor<'_>, packed: &Tensor<'_>, unpacked: &Tensor<'_>, bits: u32, row_len: usize) -> PyResult<()> {
    (|| {
        a.expect_dtype(&[DType::U8])?;
        b.expect_dtype(&[DType::U8])?;
        if !(1..=8).contains(&bits) {
            return Err(Error::Value(format!("bits: expected 1..=8, got {bits}")));
        }
        expect_rows(packed, unpacked, pack::packed_row_bytes(row_len, bits))
    })()
    .map_err(to_py)
}

#[pyfunction]
pub fn pack_signs(py: Python<'_>, x: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let x = Tensor::input("x", x)?;
    let out = Tensor::output("out", out)?;
    expect_cpu_pair(&x, &out)?;
    let row_len = x.row_len();
    (|| {
        out.expect_dtype(&[DType::U8])?;
        expect_rows(&out, &x, pack::packed_row_bytes(row_len, 1))
    })()
    .map_err(to_py)?;
    with_float!(x.dtype, "x", T => {
        let (xs, o) = unsafe { (x.slice::<T>(), out.slice_mut::<u8>()) };
        compute(py, move || pack::pack_signs(xs, row_len.max(1), o))
    })
}

#[pyfunction]
pub fn unpack_signs(py: Python<'_>, packed: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let packed = Tensor::input("packed", packed)?;
    let out = Tensor::output("out", out)?;
    expect_cpu_pair(&packed, &out)?;
    let row_len = out.row_len();
    (|| {
        packed.expect_dtype(&[DType::U8])?;
        expect_rows(&packed, &out, pack::packed_row_bytes(row_len, 1))
    })()
    .map_err(to_py)?;
    with_float!(out.dtype, "out", T => {
        let (p, o) = unsafe { (packed.slice::<u8>(), out.slice_mut::<T>()) };
        compute(py, move || pack::unpack_signs(p, row_len.max(1), o))
    })
}

#[pyfunction]
pub fn pack_codes(py: Python<'_>, codes: &Bound<'_, PyAny>, bits: u32, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let codes = Tensor::input("codes", codes)?;
    let out = Tensor::output("out", out)?;
    expect_cpu_pair(&codes, &out)?;
    let row_len = codes.row_len();
    expect_codes(&codes, &out, &out, &codes, bits, row_len)?;
    let (c, o) = unsafe { (codes.slice::<u8>(), out.slice_mut::<u8>()) };
    compute(py, move || pack::pack_codes(c, bits, row_len.max(1), o))
}

#[pyfunction]
pub fn unpack_codes(py: Python<'_>, packed: &Bound<'_, PyAny>, bits: u32, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let packed = Tensor::input("packed", packed)?;
    let out = Tensor::output("out", out)?;
    expect_cpu_pair(&packed, &out)?;
    let row_len = out.row_len();
    expect_codes(&packed, &out, &packed, &out, bits, row_len)?;
    let (p, o) = unsafe { (packed.slice::<u8>(), out.slice_mut::<u8>()) };
    compute(py, move || pack::unpack_codes(p, bits, row_len.max(1), o))
}
