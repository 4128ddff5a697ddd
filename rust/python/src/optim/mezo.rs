//! Binding of `ferrox_core::optim::mezo`: one fused in-place pass over a
//! list of f32 parameter tensors (CPU or one CUDA device, on `stream`), each
//! with its tensor index (the Philox stream of its z).

use ferrox_core::optim::mezo::{self as mcore, MezoPass};
use ferrox_core::{DType, Error, Result};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};

fn check(params: &[Tensor<'_>], streams: &[u64]) -> Result<Device> {
    if streams.len() != params.len() {
        return Err(Error::Shape(format!("streams: expected {} indices (one per param), got {}", params.len(), streams.len())));
    }
    let device = params.first().map_or(Device::Cpu, |p| p.device);
    for (i, p) in params.iter().enumerate() {
        if p.dtype != DType::F32 {
            return Err(Error::DType(format!("params[{i}]: expected float32, got {}", p.dtype)));
        }
        if p.device != device {
            return Err(Error::Device(format!("params[{i}]: on {} but params[0] is on {device}", p.device)));
        }
        for (j, q) in params.iter().enumerate().take(i) {
            p.check_alias(q, false).map_err(|_| Error::Value(format!("params[{i}]: overlaps params[{j}]")))?;
        }
    }
    Ok(device)
}

/// In place, for each tensor `params[i]` (float32, contiguous) with z drawn
/// from Philox stream (seed, streams[i]): θ = θ + restore·z (if restore ≠ 0),
/// θ = θ·decay (if decay ≠ 1), θ = θ + coef·z (if coef ≠ 0), in f32,
/// bitwise the same on CPU and CUDA.
#[pyfunction]
#[pyo3(signature = (params, streams, seed, restore, decay, coef, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn mezo_pass(
    py: Python<'_>,
    params: Vec<Bound<'_, PyAny>>,
    streams: Vec<u64>,
    seed: u64,
    restore: f32,
    decay: f32,
    coef: f32,
    stream: u64,
) -> PyResult<()> {
    let ts: Vec<Tensor<'_>> = params.iter().map(|t| Tensor::output("params", t)).collect::<PyResult<_>>()?;
    let device = check(&ts, &streams).map_err(to_py)?;
    let m = MezoPass { seed, restore, decay, coef };
    match device {
        Device::Cpu => {
            // SAFETY: f32 CPU tensors, contiguous, pairwise disjoint (checked).
            let slices: Vec<(&mut [f32], u64)> = ts.iter().zip(&streams).map(|(t, &s)| (unsafe { t.slice_mut::<f32>() }, s)).collect();
            compute(py, move || {
                for (p, s) in slices {
                    mcore::mezo_pass(p, s, m);
                }
                Ok(())
            })
        }
        Device::Cuda(ordinal) => {
            use ferrox_core::optim::mezo_cuda::{self as mc, DeviceParam};
            let dp: Vec<DeviceParam> = ts.iter().zip(&streams).map(|(t, &s)| DeviceParam { ptr: t.ptr, n: t.numel(), stream: s }).collect();
            // SAFETY: f32 tensors on this device, contiguous, disjoint; queued on torch's stream.
            compute(py, move || unsafe { mc::mezo_pass(ordinal, stream, &dp, m) })
        }
    }
}
