//! Slerp and Model Stock of one tensor (see `ferrox_core::merge::interp`),
//! from tensors in memory or streamed from files, and the finite scan the
//! merges check their inputs with (`ferrox_core::merge::finite`).

use ferrox_core::merge::interp::{self, Interp, InterpStats};
use ferrox_core::merge::{finite, FileInputs, FileOutput, SliceInputs, SliceOutput};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::merge::{check_models_like_base, chunk_or_default, file_tensor, float_dtype, FileSpec};
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

/// The flat index of the first NaN or ±inf of a CPU float tensor, or None.
#[pyfunction]
pub fn first_nonfinite(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    let x = Tensor::input("x", x)?;
    x.expect_cpu().map_err(to_py)?;
    with_float!(x.dtype, "x", T => {
        // SAFETY: dtype and device checked; `x` is borrowed for the call.
        let xs = unsafe { x.slice::<T>() };
        compute(py, move || Ok(finite::first_nonfinite(xs)))
    })
}

fn parse_interp(method: &str, t: f32, dot_threshold: f32, eps: f32) -> Result<Interp, Error> {
    match method {
        "slerp" => Ok(Interp::Slerp { t, dot_threshold, eps }),
        "model_stock" => Ok(Interp::ModelStock),
        other => Err(Error::Value(format!("method: expected \"slerp\" or \"model_stock\", got {other:?}"))),
    }
}

/// (changed, nonfinite, per-row coefficients) for Python.
type Stats = (u64, bool, Vec<(f32, f32)>);

fn stats(s: InterpStats) -> Stats {
    (s.changed, s.nonfinite, s.coefficients.into_iter().map(|[a, b]| (a, b)).collect())
}

/// Interpolates CPU tensors of one float dtype into `out` (same shape, any
/// float dtype): `method` "slerp" (base → models[0] by `t`) or
/// "model_stock"; `row_len` 0 for one set of coefficients over the whole
/// tensor. Returns (elements differing from the base, whether an input was
/// NaN/inf — then `out` is untouched —, each row's two coefficients).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, method, t=0.0, dot_threshold=0.9995, eps=1e-8, row_len=0))]
pub fn interp_tensor(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    base: &Bound<'_, PyAny>,
    models: Vec<Bound<'_, PyAny>>,
    method: &str,
    t: f32,
    dot_threshold: f32,
    eps: f32,
    row_len: usize,
) -> PyResult<Stats> {
    let out = Tensor::output("out", out)?;
    let base = Tensor::input("base", base)?;
    let models = models.iter().map(|m| Tensor::input("models[i]", m)).collect::<PyResult<Vec<_>>>()?;
    let how = (|| {
        base.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        out.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        base.expect_cpu()?;
        out.expect_cpu()?;
        if out.shape != base.shape {
            return Err(Error::Shape(format!("out: shape {:?} does not match base shape {:?}", out.shape, base.shape)));
        }
        check_models_like_base(&base, &models, &out)?;
        parse_interp(method, t, dot_threshold, eps)
    })()
    .map_err(to_py)?;
    with_float!(base.dtype, "base", T => {
        with_float!(out.dtype, "out", O => {
            // SAFETY: dtypes and devices checked above; `out` overlaps no input.
            let (b, o) = unsafe { (base.slice::<T>(), out.slice_mut::<O>()) };
            let xs: Vec<&[T]> = models.iter().map(|m| unsafe { m.slice::<T>() }).collect();
            compute(py, move || {
                let mut inputs = SliceInputs { base: b, models: xs, has_base: true };
                let n = b.len();
                interp::interpolate(&mut inputs, how, row_len, &mut SliceOutput(o), n.max(1)).map(stats)
            })
        })
    })
}

/// `interp_tensor` streamed from files: `numel` elements of each input read
/// chunk by chunk with positioned reads, converted to `compute_dtype`
/// (mergekit's cast on load), the result written at `out`'s offset in its
/// dtype. Memory is O(chunk_len × inputs); `chunk_len` 0 is the default.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, numel, compute_dtype, method, t=0.0, dot_threshold=0.9995, eps=1e-8, row_len=0, chunk_len=0))]
pub fn interp_tensor_files(
    py: Python<'_>,
    out: FileSpec,
    base: FileSpec,
    models: Vec<FileSpec>,
    numel: usize,
    compute_dtype: String,
    method: &str,
    t: f32,
    dot_threshold: f32,
    eps: f32,
    row_len: usize,
    chunk_len: usize,
) -> PyResult<Stats> {
    let (out, base, inputs, dtype, how) = (|| {
        let out = file_tensor("out", out)?;
        let base = file_tensor("base", base)?;
        let inputs = models
            .into_iter()
            .enumerate()
            .map(|(i, m)| file_tensor(&format!("models[{i}]"), m))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = float_dtype("compute_dtype", &compute_dtype)?;
        Ok((out, base, inputs, dtype, parse_interp(method, t, dot_threshold, eps)?))
    })()
    .map_err(to_py)?;
    let chunk_len = chunk_or_default(chunk_len);
    let out_dtype = out.dtype;
    with_float!(dtype, "compute_dtype", T => {
        with_float!(out_dtype, "out", O => {
            compute(py, move || {
                let mut src = FileInputs::<T>::open(Some(base), inputs, numel)?;
                let mut dst = FileOutput::<O>::open(out, numel)?;
                interp::interpolate(&mut src, how, row_len, &mut dst, chunk_len).map(stats)
            })
        })
    })
}
