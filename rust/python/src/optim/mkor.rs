//! Binding of `ferrox_core::optim::mkor`: one call updates every inverse
//! factor (a list of n×n tensors) from the concatenated f32 vectors; the
//! stabiliser flags (f32, in/out) and max|W| (f32, out) are tensors on the
//! factors' device, so nothing waits on the GPU.

use ferrox_core::optim::mkor::{self as core, Factor, Spec};
use ferrox_core::{DType, Error, Result};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};
use crate::with_float;

fn spec(mode: &str, stat_decay: f32, stabilization_factor: f32, threshold: f32, damping: f32) -> Result<Spec> {
    match mode {
        // The reference mode's damping is fixed by the reference code (1−γ).
        "reference" if damping != 0.0 => {
            Err(Error::Value(format!("damping: only the 'paper' mode takes it (expected 0 with mode='reference', got {damping})")))
        }
        "reference" => Spec::reference(stat_decay, stabilization_factor, threshold),
        "paper" => Spec::paper(stat_decay, stabilization_factor, threshold, damping),
        other => Err(Error::Value(format!("mode: expected 'reference' or 'paper', got {other:?}"))),
    }
}

/// Checks the lists against each other; returns each factor's n.
fn check(invs: &[Tensor<'_>], vecs: &Tensor<'_>, flags: &Tensor<'_>, maxabs: &Tensor<'_>) -> Result<Vec<usize>> {
    let first = invs.first();
    let (dtype, device) = (first.map_or(DType::F16, |t| t.dtype), first.map_or(vecs.device, |t| t.device));
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::DType(format!("factors[0]: expected float32, float16 or bfloat16, got {dtype}")));
    }
    let mut ns = Vec::with_capacity(invs.len());
    for (k, t) in invs.iter().enumerate() {
        if t.dtype != dtype || t.device != device || t.shape.len() != 2 || t.shape[0] != t.shape[1] {
            return Err(Error::Value(format!(
                "factors[{k}]: expected a square {dtype} matrix on {device} (as factors[0]), got {} {:?} on {}",
                t.dtype, t.shape, t.device
            )));
        }
        ns.push(t.shape[0]);
    }
    let total: usize = ns.iter().sum();
    for (what, t, len) in [("vecs", vecs, total), ("flags", flags, invs.len()), ("maxabs", maxabs, invs.len())] {
        if t.dtype != DType::F32 || t.device != device || t.numel() != len {
            return Err(Error::Value(format!(
                "{what}: expected float32 with {len} elements on {device}, got {} {:?} on {}",
                t.dtype, t.shape, t.device
            )));
        }
    }
    // The written tensors (factors, flags, maxabs) must overlap nothing.
    let mut spans: Vec<(u64, u64, String)> = invs.iter().enumerate().map(|(k, t)| (t.ptr, t.ptr + t.nbytes(), format!("factors[{k}]"))).collect();
    spans.extend([(vecs, "vecs"), (flags, "flags"), (maxabs, "maxabs")].map(|(t, w)| (t.ptr, t.ptr + t.nbytes(), w.to_string())));
    spans.retain(|s| s.1 > s.0);
    spans.sort_by_key(|s| s.0);
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::Value(format!("{}: memory overlaps {}; pass separate tensors", w[0].2, w[1].2)));
        }
    }
    Ok(ns)
}

/// One fused update of every factor (see `ferrox_core::optim::mkor`);
/// `damping` is the paper mode's blend towards I (`Spec::paper`).
/// CUDA also takes `table` (int64 [k, 3] on the device: data pointer, n and
/// offset into `vecs` of each factor, built by ferrox.optim.mkor from the
/// same tensors) and `scratch` (f32, as long as `vecs`).
#[pyfunction]
#[pyo3(signature = (factors, vecs, flags, maxabs, *, mode, stat_decay, stabilization_factor, threshold, damping=0.0, table=None, scratch=None, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn mkor_rank1_update(
    py: Python<'_>, factors: Vec<Bound<'_, PyAny>>, vecs: &Bound<'_, PyAny>, flags: &Bound<'_, PyAny>, maxabs: &Bound<'_, PyAny>,
    mode: &str, stat_decay: f32, stabilization_factor: f32, threshold: f32, damping: f32, table: Option<Bound<'_, PyAny>>,
    scratch: Option<Bound<'_, PyAny>>, stream: u64,
) -> PyResult<()> {
    let invs: Vec<Tensor<'_>> = factors.iter().map(|t| Tensor::output("factors", t)).collect::<PyResult<_>>()?;
    let vecs = Tensor::input("vecs", vecs)?;
    let flags = Tensor::output("flags", flags)?;
    let maxabs = Tensor::output("maxabs", maxabs)?;
    let ns = check(&invs, &vecs, &flags, &maxabs).map_err(to_py)?;
    let spec = spec(mode, stat_decay, stabilization_factor, threshold, damping).map_err(to_py)?;
    let dtype = invs.first().map_or(DType::F16, |t| t.dtype);
    match vecs.device {
        Device::Cuda(ordinal) => {
            let (Some(table), Some(scratch)) = (table, scratch) else {
                return Err(to_py(Error::Value("table, scratch: required for CUDA factors".into())));
            };
            let table = Tensor::input("table", &table)?;
            let scratch = Tensor::output("scratch", &scratch)?;
            let ok = table.dtype == DType::I64 && table.device == vecs.device && table.shape == [invs.len(), 3];
            if !ok || scratch.dtype != DType::F32 || scratch.device != vecs.device || scratch.numel() != vecs.numel() {
                return Err(to_py(Error::Value(format!(
                    "table, scratch: expected int64 [{}, 3] and float32 [{}] on {}, got {} {:?} on {} and {} {:?} on {}",
                    invs.len(), vecs.numel(), vecs.device, table.dtype, table.shape, table.device, scratch.dtype, scratch.shape, scratch.device
                ))));
            }
            let m = ferrox_core::optim::mkor_cuda::DeviceRank1 {
                ordinal, stream, dtype, n_factors: invs.len(), table: table.ptr, vecs: vecs.ptr, scratch: scratch.ptr,
                flags: flags.ptr, maxabs: maxabs.ptr, spec,
            };
            compute(py, move || unsafe { ferrox_core::optim::mkor_cuda::rank1_update(&m) })
        }
        Device::Cpu => with_float!(dtype, "factors", T => {
            // SAFETY: dtypes, devices, shapes and overlaps checked above; the
            // tensors are borrowed for the call.
            let (v, fl, mx) = unsafe { (vecs.slice::<f32>(), flags.slice_mut::<f32>(), maxabs.slice_mut::<f32>()) };
            let mut off = 0;
            let mut fs: Vec<Factor<'_, T>> = Vec::with_capacity(invs.len());
            for (t, &n) in invs.iter().zip(&ns) {
                fs.push(Factor { inv: unsafe { t.slice_mut::<T>() }, v: &v[off..off + n] });
                off += n;
            }
            let was: Vec<bool> = fl.iter().map(|&x| x != 0.0).collect();
            compute(py, move || {
                let outs = core::rank1_update(&mut fs, &was, &spec)?;
                for (k, o) in outs.iter().enumerate() {
                    fl[k] = o.flagged as u8 as f32;
                    mx[k] = if o.reset { -1.0 } else { o.max_abs };
                }
                Ok(())
            })
        }),
    }
}
