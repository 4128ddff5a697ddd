//! Elementwise ops: the first kernel proven on both CPU and CUDA.

use ferrox_core::{ops, DType, Error};
use pyo3::prelude::*;

use crate::runtime::compute;
use crate::tensor::{Alias, Device, Tensor};
use crate::with_float;

/// out = a*x + b*y, elementwise. `out` may be `x` or `y` itself; on CUDA it
/// runs on `stream` (torch's current stream, passed by the Python wrapper).
#[pyfunction]
#[pyo3(signature = (out, a, x, b, y, stream=0))]
pub fn axpby(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    a: f32,
    x: &Bound<'_, PyAny>,
    b: f32,
    y: &Bound<'_, PyAny>,
    stream: u64,
) -> PyResult<()> {
    let out = Tensor::output("out", out)?;
    let x = Tensor::input("x", x)?;
    let y = Tensor::input("y", y)?;
    let checked = (|| {
        out.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        out.expect_same(&x)?;
        out.expect_same(&y)?;
        Ok::<_, Error>((out.check_alias(&x, true)?, out.check_alias(&y, true)?))
    })();
    let (alias_x, alias_y) = checked.map_err(crate::error::to_py)?;
    let n = out.numel();
    match out.device {
        Device::Cuda(ordinal) => {
            let (dtype, po, px, py_) = (out.dtype, out.ptr, x.ptr, y.ptr);
            compute(py, move || unsafe {
                ferrox_core::cuda::axpby(ordinal, stream, dtype, po, a, px, b, py_, n)
            })
        }
        Device::Cpu => with_float!(out.dtype, "out", T => {
            // SAFETY: dtype and device checked above; aliasing resolved below
            // so no two live slices overlap.
            let o = unsafe { out.slice_mut::<T>() };
            match (alias_x, alias_y) {
                (Alias::Disjoint, Alias::Disjoint) => {
                    let (xs, ys) = unsafe { (x.slice::<T>(), y.slice::<T>()) };
                    compute(py, move || ops::axpby(o, a, xs, b, ys))
                }
                (Alias::Same, Alias::Disjoint) => {
                    let ys = unsafe { y.slice::<T>() };
                    compute(py, move || ops::axpby_inplace_x(o, a, b, ys))
                }
                (Alias::Disjoint, Alias::Same) => {
                    let xs = unsafe { x.slice::<T>() };
                    compute(py, move || ops::axpby_inplace_x(o, b, a, xs))
                }
                (Alias::Same, Alias::Same) => compute(py, move || {
                    ops::axpby_inplace_both(o, a, b);
                    Ok(())
                }),
            }
        }),
    }
}
