//! Task-vector merging of one tensor (see `ferrox_core::merge`).

use ferrox_core::merge::{self, Granularity, Params, Sparsify, Term};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

/// One model's sparsifier as passed from Python: (kind, density, gamma, seed, stream).
type SparsifySpec = (String, f64, f64, u64, u64);

fn parse_sparsify(i: usize, (kind, density, gamma, seed, stream): &SparsifySpec) -> Result<Sparsify, Error> {
    Ok(match kind.as_str() {
        "none" => Sparsify::Keep,
        "magnitude" => Sparsify::Magnitude { density: *density },
        "band" => Sparsify::Band { density: *density, gamma: *gamma },
        "random" => Sparsify::Random { density: *density, seed: *seed, stream: *stream },
        other => return Err(Error::Value(format!("models[{i}]: unknown sparsifier {other:?}"))),
    })
}

/// out = base + λ·combine_i(w_i·sparsify_i(model_i − base)); `row_len` 0 means
/// whole-tensor granularity.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, weights, sparsify, consensus, normalize, rescale, lam, row_len, check_finite=true))]
pub fn merge_tensor(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    base: &Bound<'_, PyAny>,
    models: Vec<Bound<'_, PyAny>>,
    weights: Vec<f32>,
    sparsify: Vec<SparsifySpec>,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: f32,
    row_len: usize,
    check_finite: bool,
) -> PyResult<()> {
    let out = Tensor::output("out", out)?;
    let base = Tensor::input("base", base)?;
    let models = models.iter().map(|m| Tensor::input("models[i]", m)).collect::<PyResult<Vec<_>>>()?;
    let sparsifiers = (|| {
        base.expect_cpu()?;
        base.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        base.expect_same(&out)?;
        for (i, m) in models.iter().enumerate() {
            if m.dtype != base.dtype || m.shape != base.shape || m.device != base.device {
                return Err(Error::Shape(format!(
                    "models[{i}]: {} {:?} on {} does not match base {} {:?} on {}",
                    m.dtype, m.shape, m.device, base.dtype, base.shape, base.device
                )));
            }
            out.check_alias(m, false)?;
        }
        out.check_alias(&base, false)?;
        if weights.len() != models.len() || sparsify.len() != models.len() {
            return Err(Error::Shape(format!(
                "weights/sparsify: expected {} entries (one per model), got {} and {}",
                models.len(),
                weights.len(),
                sparsify.len()
            )));
        }
        sparsify.iter().enumerate().map(|(i, s)| parse_sparsify(i, s)).collect::<Result<Vec<_>, _>>()
    })()
    .map_err(to_py)?;
    let params = Params {
        consensus,
        normalize,
        rescale,
        lambda: lam,
        granularity: if row_len == 0 { Granularity::Tensor } else { Granularity::Row(row_len) },
        check_finite,
    };
    with_float!(base.dtype, "base", T => {
        let (b, o) = unsafe { (base.slice::<T>(), out.slice_mut::<T>()) };
        let terms: Vec<Term<'_, T>> = models
            .iter()
            .zip(&weights)
            .zip(&sparsifiers)
            .map(|((m, &weight), &sparsify)| Term { values: unsafe { m.slice::<T>() }, weight, sparsify })
            .collect();
        compute(py, move || merge::merge_tensor(b, &terms, &params, o))
    })
}
