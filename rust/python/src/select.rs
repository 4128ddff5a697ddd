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

/// One top-`r` mask across several tensors (ranked as their concatenation
/// by |x|; ties: earlier tensor, then lower index): writes exactly `r` ones
/// into `outs` and returns the r-th largest |x| (None for r = 0). All
/// tensors share one float dtype (`ferrox.importance` converts mixed ones).
#[pyfunction]
pub fn global_top_mask(
    py: Python<'_>,
    xs: Vec<Bound<'_, PyAny>>,
    r: usize,
    outs: Vec<Bound<'_, PyAny>>,
) -> PyResult<Option<f64>> {
    let xs = xs.iter().map(|x| Tensor::input("xs[i]", x)).collect::<PyResult<Vec<_>>>()?;
    let outs = outs.iter().map(|o| Tensor::output("outs[i]", o)).collect::<PyResult<Vec<_>>>()?;
    let dtype = xs.first().map_or(DType::F32, |x| x.dtype);
    (|| {
        if xs.len() != outs.len() {
            return Err(ferrox_core::Error::Shape(format!(
                "outs: expected {} masks (one per tensor), got {}",
                xs.len(),
                outs.len()
            )));
        }
        for (i, (x, o)) in xs.iter().zip(&outs).enumerate() {
            let name = |what: &str| format!("{what}[{i}]");
            if x.device != crate::tensor::Device::Cpu || o.device != crate::tensor::Device::Cpu {
                return Err(ferrox_core::Error::Device(format!("{}: expected cpu tensors", name("xs/outs"))));
            }
            if !FLOATS.contains(&x.dtype) || x.dtype != dtype {
                return Err(ferrox_core::Error::DType(format!(
                    "{}: expected float32, float16 or bfloat16 like xs[0] ({dtype}), got {}",
                    name("xs"),
                    x.dtype
                )));
            }
            if !matches!(o.dtype, DType::Bool | DType::U8) {
                return Err(ferrox_core::Error::DType(format!("{}: expected bool or uint8, got {}", name("outs"), o.dtype)));
            }
            if o.shape != x.shape {
                return Err(ferrox_core::Error::Shape(format!(
                    "{}: expected shape {:?} (that of xs[{i}]), got {:?}",
                    name("outs"),
                    x.shape,
                    o.shape
                )));
            }
            for (j, other) in xs.iter().chain(&outs).enumerate() {
                if j != xs.len() + i {
                    o.check_alias(other, false)
                        .map_err(|_| ferrox_core::Error::Value(format!("{}: overlaps another input or mask", name("outs"))))?;
                }
            }
        }
        Ok(())
    })()
    .map_err(to_py)?;
    with_float!(dtype, "xs", T => {
        let slices: Vec<&[T]> = xs.iter().map(|x| unsafe { x.slice::<T>() }).collect();
        // SAFETY: each mask was checked to overlap no input and no other mask.
        let mut masks: Vec<&mut [u8]> = outs.iter().map(|o| unsafe { o.slice_mut::<u8>() }).collect();
        compute(py, move || {
            select::global_top_mask(&slices, r, &mut masks)
                .map(|cut| (r > 0).then(|| T::from_abs_key(cut.cut.key).to_f32() as f64))
        })
    })
}
