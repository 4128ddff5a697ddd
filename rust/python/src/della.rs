//! DELLA / MagPrune merging of one CPU tensor (see `ferrox_core::merge::merge_della`).

use ferrox_core::merge::{self, DellaTerm, Granularity, Params};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::merge::check_models_like_base;
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Checks `base` is a CPU float tensor and `other` matches it.
fn check_like(base: &Tensor<'_>, other: &Tensor<'_>) -> Result<(), Error> {
    base.expect_dtype(&FLOATS)?;
    base.expect_cpu()?;
    base.expect_same(other)
}

/// out = base + λ·combine_m(w_m·MagPrune_m(model_m − base)) over rows of
/// `row_len` elements (0: the whole tensor is one row); model m's masks come
/// from Philox stream m of `seed`. `consensus`: TIES sign election (della),
/// else a plain sum (della_linear). Returns how many elements differ from
/// the base.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, weights, densities, epsilons, consensus, normalize, rescale, lam, row_len, seed, check_finite=false))]
pub fn della_merge(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    base: &Bound<'_, PyAny>,
    models: Vec<Bound<'_, PyAny>>,
    weights: Vec<f32>,
    densities: Vec<f64>,
    epsilons: Vec<f64>,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: f32,
    row_len: usize,
    seed: u64,
    check_finite: bool,
) -> PyResult<u64> {
    let out = Tensor::output("out", out)?;
    let base = Tensor::input("base", base)?;
    let models = models.iter().map(|m| Tensor::input("models[i]", m)).collect::<PyResult<Vec<_>>>()?;
    (|| {
        check_like(&base, &out)?;
        check_models_like_base(&base, &models, &out)?;
        let count = models.len();
        if weights.len() != count || densities.len() != count || epsilons.len() != count {
            return Err(Error::Shape(format!(
                "weights/densities/epsilons: expected {count} entries (one per model), got {}, {} and {}",
                weights.len(),
                densities.len(),
                epsilons.len()
            )));
        }
        Ok(())
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
        // SAFETY: every tensor was checked to be a contiguous CPU `T` tensor
        // of the base's shape, and `out` overlaps none of the inputs.
        let (b, o) = unsafe { (base.slice::<T>(), out.slice_mut::<T>()) };
        let terms: Vec<DellaTerm<'_, T>> = models
            .iter()
            .enumerate()
            .map(|(m, x)| DellaTerm { values: unsafe { x.slice::<T>() }, weight: weights[m], density: densities[m], epsilon: epsilons[m] })
            .collect();
        compute(py, move || merge::merge_della(b, &terms, seed, &params, o).map(|s| s.changed))
    })
}

/// The MagPrune keep mask (uint8, 1 kept) of `model` against `base` that
/// `della_merge` uses for model index `stream`, and, when `ranks` (int32) is
/// given, each element's 0-based rank of |delta| within its row.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (keep, base, model, row_len, density, epsilon, seed, stream, ranks=None))]
pub fn magprune_keep(
    py: Python<'_>,
    keep: &Bound<'_, PyAny>,
    base: &Bound<'_, PyAny>,
    model: &Bound<'_, PyAny>,
    row_len: usize,
    density: f64,
    epsilon: f64,
    seed: u64,
    stream: u64,
    ranks: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let keep = Tensor::output("keep", keep)?;
    let base = Tensor::input("base", base)?;
    let model = Tensor::input("model", model)?;
    let ranks = ranks.as_ref().map(|r| Tensor::output("ranks", r)).transpose()?;
    (|| {
        check_like(&base, &model)?;
        keep.expect_dtype(&[DType::U8])?;
        keep.expect_cpu()?;
        if keep.numel() != base.numel() {
            return Err(Error::Shape(format!("keep: {} elements for a tensor of {}", keep.numel(), base.numel())));
        }
        if let Some(r) = &ranks {
            r.expect_dtype(&[DType::I32])?;
            r.expect_cpu()?;
            if r.numel() != base.numel() {
                return Err(Error::Shape(format!("ranks: {} elements for a tensor of {}", r.numel(), base.numel())));
            }
        }
        Ok(())
    })()
    .map_err(to_py)?;
    let row_len = if row_len == 0 { base.numel() } else { row_len };
    with_float!(base.dtype, "base", T => {
        // SAFETY: dtypes, devices and sizes checked above; the outputs are
        // fresh tensors the caller passed for writing.
        let (b, x, k) = unsafe { (base.slice::<T>(), model.slice::<T>(), keep.slice_mut::<u8>()) };
        let r = ranks.as_ref().map(|r| unsafe { r.slice_mut::<u32>() });
        compute(py, move || merge::magprune_keep(b, x, row_len, density, epsilon, seed, stream, k, r))
    })
}
