//! Task-vector merging of one tensor (see `ferrox_core::merge`).

use std::path::PathBuf;

use ferrox_core::merge::{self, FileInputs, FileOutput, FileTensor, Granularity, Model, Params, Sparsify, Term};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};
use crate::with_float;

/// One model's sparsifier as passed from Python: (kind, density, gamma, seed, stream).
type SparsifySpec = (String, f64, f64, u64, u64);

/// Every model has the base's dtype, shape and device, and `out` aliases
/// none of the inputs (shared by the della and interpolation bindings).
pub(crate) fn check_models_like_base(base: &Tensor, models: &[Tensor], out: &Tensor) -> Result<(), Error> {
    for (i, m) in models.iter().enumerate() {
        if m.dtype != base.dtype || m.shape != base.shape || m.device != base.device {
            return Err(Error::Shape(format!(
                "models[{i}]: {} {:?} on {} does not match base {} {:?} on {}",
                m.dtype, m.shape, m.device, base.dtype, base.shape, base.device
            )));
        }
        out.check_alias(m, false)?;
    }
    out.check_alias(base, false)?;
    Ok(())
}

fn parse_sparsify(i: usize, (kind, density, gamma, seed, stream): &SparsifySpec) -> Result<Sparsify, Error> {
    Ok(match kind.as_str() {
        "none" => Sparsify::Keep,
        "magnitude" => Sparsify::Magnitude { density: *density },
        "band" => Sparsify::Band { density: *density, gamma: *gamma },
        "random" => Sparsify::Random { density: *density, seed: *seed, stream: *stream },
        other => return Err(Error::Value(format!("models[{i}]: unknown sparsifier {other:?}"))),
    })
}

/// Each model's weight and sparsifier, checking there is one of each per model.
fn parse_models(weights: &[f32], sparsify: &[SparsifySpec], count: usize) -> Result<Vec<Model>, Error> {
    if weights.len() != count || sparsify.len() != count {
        return Err(Error::Shape(format!(
            "weights/sparsify: expected {count} entries (one per model), got {} and {}",
            weights.len(),
            sparsify.len()
        )));
    }
    let parsed = sparsify.iter().enumerate().map(|(i, s)| parse_sparsify(i, s));
    weights.iter().zip(parsed).map(|(&weight, sparsify)| Ok(Model { weight, sparsify: sparsify? })).collect()
}

pub(crate) fn float_dtype(what: &str, name: &str) -> Result<DType, Error> {
    DType::parse(name)
        .filter(|d| d.is_float())
        .ok_or_else(|| Error::DType(format!("{what}: expected float32, float16 or bfloat16 (F32, F16, BF16), got {name:?}")))
}

pub(crate) fn chunk_or_default(chunk_len: usize) -> usize {
    if chunk_len == 0 {
        merge::DEFAULT_CHUNK
    } else {
        chunk_len
    }
}

fn params(consensus: bool, normalize: bool, rescale: bool, lam: f32, row_len: usize, check_finite: bool) -> Params {
    Params {
        consensus,
        normalize,
        rescale,
        lambda: lam,
        granularity: if row_len == 0 { Granularity::Tensor } else { Granularity::Row(row_len) },
        check_finite,
    }
}

/// out = base + λ·combine_i(w_i·sparsify_i(model_i − base)); `row_len` 0 means
/// whole-tensor granularity; `chunk_len` 0 the default chunk. Returns how
/// many elements differ from the base.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, weights, sparsify, consensus, normalize, rescale, lam, row_len, check_finite=true, chunk_len=0, stream=0))]
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
    chunk_len: usize,
    stream: u64,
) -> PyResult<u64> {
    let out = Tensor::output("out", out)?;
    let base_device = base.getattr("device")?;
    let base = Tensor::input("base", base)?;
    let models = models.iter().map(|m| Tensor::input("models[i]", m)).collect::<PyResult<Vec<_>>>()?;
    let terms = (|| {
        base.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        base.expect_same(&out)?;
        check_models_like_base(&base, &models, &out)?;
        parse_models(&weights, &sparsify, models.len())
    })()
    .map_err(to_py)?;
    let params = params(consensus, normalize, rescale, lam, row_len, check_finite);
    let chunk_len = chunk_or_default(chunk_len);
    if let Device::Cuda(ordinal) = base.device {
        let model_ptrs: Vec<u64> = models.iter().map(|m| m.ptr).collect();
        let (dtype, po, pb, numel) = (base.dtype, out.ptr, base.ptr, base.numel());
        let bytes = merge::cuda::workspace_bytes(dtype, numel, &terms, &params).map_err(to_py)?;
        // Scratch from torch's caching allocator on the current stream (the
        // one the merge runs on): torch's memory stats count it, running out
        // is torch.OutOfMemoryError, and freeing it waits for nothing.
        let torch = py.import("torch")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("dtype", torch.getattr("uint8")?)?;
        kwargs.set_item("device", base_device)?;
        let workspace = torch.getattr("empty")?.call(((bytes.max(1),),), Some(&kwargs))?;
        let ws: u64 = workspace.call_method0("data_ptr")?.extract()?;
        let changed = compute(py, move || {
            let t = merge::cuda::DeviceTensors {
                ordinal, stream, dtype, out: po, base: pb, models: &model_ptrs, numel, workspace: ws, workspace_bytes: bytes,
            };
            // SAFETY: every tensor was checked to be a contiguous `dtype`
            // tensor of `numel` elements on this device; `out` overlaps none;
            // the workspace is ours, `bytes` long, alive until this returns
            // (the merge waits for its stream before returning).
            unsafe { merge::cuda::merge_tensor(&t, &terms, &params) }.map(|s| s.changed)
        });
        drop(workspace);
        return changed;
    }
    with_float!(base.dtype, "base", T => {
        let (b, o) = unsafe { (base.slice::<T>(), out.slice_mut::<T>()) };
        let terms: Vec<Term<'_, T>> = models
            .iter()
            .zip(&terms)
            .map(|(m, t)| Term { values: unsafe { m.slice::<T>() }, weight: t.weight, sparsify: t.sparsify })
            .collect();
        compute(py, move || merge::merge_tensor_chunked(b, &terms, &params, o, chunk_len).map(|s| s.changed))
    })
}

/// A tensor inside a file as passed from Python: (path, byte offset, dtype).
pub(crate) type FileSpec = (PathBuf, u64, String);

pub(crate) fn file_tensor(what: &str, (path, offset, dtype): FileSpec) -> Result<FileTensor, Error> {
    Ok(FileTensor { path, offset, dtype: float_dtype(what, &dtype)? })
}

/// The streaming merge of one tensor stored in files: reads `numel` elements
/// of each input chunk by chunk with positioned reads, computes in
/// `compute_dtype` (inputs are converted to it, as mergekit's `dtype`), and
/// writes the result at `out`'s offset in its dtype. Memory is O(chunk_len ×
/// inputs). Returns how many elements differ from the base (from models[0]
/// without a base).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (out, base, models, numel, compute_dtype, weights, sparsify, consensus, normalize, rescale, lam, row_len, check_finite=true, chunk_len=0))]
pub fn merge_tensor_files(
    py: Python<'_>,
    out: FileSpec,
    base: Option<FileSpec>,
    models: Vec<FileSpec>,
    numel: usize,
    compute_dtype: String,
    weights: Vec<f32>,
    sparsify: Vec<SparsifySpec>,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lam: f32,
    row_len: usize,
    check_finite: bool,
    chunk_len: usize,
) -> PyResult<u64> {
    let (out, base, inputs, dtype, terms) = (|| {
        let out = file_tensor("out", out)?;
        let base = base.map(|b| file_tensor("base", b)).transpose()?;
        let inputs = models
            .into_iter()
            .enumerate()
            .map(|(i, m)| file_tensor(&format!("models[{i}]"), m))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = float_dtype("compute_dtype", &compute_dtype)?;
        let terms = parse_models(&weights, &sparsify, inputs.len())?;
        Ok((out, base, inputs, dtype, terms))
    })()
    .map_err(to_py)?;
    let params = params(consensus, normalize, rescale, lam, row_len, check_finite);
    let chunk_len = chunk_or_default(chunk_len);
    with_float!(dtype, "compute_dtype", T => {
        compute(py, move || {
            let mut src = FileInputs::<T>::open(base, inputs, numel)?;
            let mut dst = FileOutput::<T>::open(out, numel)?;
            merge::merge_stream(&mut src, &terms, &params, &mut dst, chunk_len).map(|s| s.changed)
        })
    })
}
