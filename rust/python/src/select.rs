//! Exact selection by |x|: k-th largest magnitude and rank-band masks.

use ferrox_core::{select, DType, Float};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// |x| of the k-th largest element by magnitude (k is 1-based), as a float.
#[pyfunction]
pub fn kth_largest_abs(py: Python<'_>, x: &Bound<'_, PyAny>, k: usize) -> PyResult<f64> {
    let x = Tensor::input("x", x)?;
    x.expect_cpu().map_err(to_py)?;
    with_float!(x.dtype, "x", T => {
        let xs = unsafe { x.slice::<T>() };
        compute(py, move || select::kth_largest_abs(xs, k).map(|v| v.to_f32() as f64))
    })
}

/// out[i] = 1 where the rank of x[i] by |x| (0 = largest, ties: lower index
/// first) is in [lo, hi); ranks are taken per row of the last dimension when
/// `per_row`, else over the whole tensor.
#[pyfunction]
pub fn band_mask(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    lo: usize,
    hi: usize,
    out: &Bound<'_, PyAny>,
    per_row: bool,
) -> PyResult<()> {
    let x = Tensor::input("x", x)?;
    let out = Tensor::output("out", out)?;
    (|| {
        x.expect_cpu()?;
        x.expect_dtype(&FLOATS)?;
        out.expect_cpu()?;
        out.expect_dtype(&[DType::Bool, DType::U8])?;
        if out.shape != x.shape {
            return Err(ferrox_core::Error::Shape(format!(
                "out: expected shape {:?} (the shape of x), got {:?}",
                x.shape, out.shape
            )));
        }
        out.check_alias(&x, false).map(|_| ())
    })()
    .map_err(to_py)?;
    let row_len = if per_row { x.row_len() } else { x.numel() };
    with_float!(x.dtype, "x", T => {
        let (xs, o) = unsafe { (x.slice::<T>(), out.slice_mut::<u8>()) };
        compute(py, move || {
            if per_row && row_len > 0 {
                select::band_mask_rows(xs, row_len, lo, hi, o)
            } else {
                select::band_mask(xs, lo, hi, o)
            }
        })
    })
}
