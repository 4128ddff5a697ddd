//! Counter-based Philox4x32-10 random numbers: the same bits for the same
//! (seed, stream, element) on CPU and GPU, whatever the chunking or threads.

use ferrox_core::{philox, DType};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};

/// One Philox4x32-10 block (for known-answer tests and debugging).
#[pyfunction]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    philox::philox4x32_10(ctr, key)
}

#[derive(Clone, Copy)]
enum Dist {
    Uniform,
    Normal,
    Bits,
}

fn fill(py: Python<'_>, out: &Bound<'_, PyAny>, seed: u64, rng_stream: u64, offset: u64, cuda_stream: u64, dist: Dist) -> PyResult<()> {
    let out = Tensor::output("out", out)?;
    let want = match dist {
        Dist::Bits => DType::I32,
        _ => DType::F32,
    };
    out.expect_dtype(&[want]).map_err(to_py)?;
    let n = out.numel();
    match (out.device, dist) {
        (Device::Cpu, Dist::Bits) => {
            let o = unsafe { out.slice_mut::<u32>() };
            compute(py, move || Ok(philox::fill_u32(seed, rng_stream, offset, o)))
        }
        (Device::Cpu, Dist::Uniform) => {
            let o = unsafe { out.slice_mut::<f32>() };
            compute(py, move || Ok(philox::fill_uniform(seed, rng_stream, offset, o)))
        }
        (Device::Cpu, Dist::Normal) => {
            let o = unsafe { out.slice_mut::<f32>() };
            compute(py, move || Ok(philox::fill_normal(seed, rng_stream, offset, o)))
        }
        (Device::Cuda(dev), Dist::Uniform) => {
            let p = out.ptr;
            compute(py, move || unsafe { ferrox_core::cuda::philox_uniform(dev, cuda_stream, seed, rng_stream, offset, p, n) })
        }
        (Device::Cuda(dev), Dist::Normal) => {
            let p = out.ptr;
            compute(py, move || unsafe { ferrox_core::cuda::philox_normal(dev, cuda_stream, seed, rng_stream, offset, p, n) })
        }
        (Device::Cuda(_), Dist::Bits) => Err(to_py(ferrox_core::Error::Device(
            "out: raw Philox bits are produced on the cpu only".into(),
        ))),
    }
}

#[pyfunction]
#[pyo3(signature = (out, seed, stream=0, offset=0, cuda_stream=0))]
pub fn philox_uniform(py: Python<'_>, out: &Bound<'_, PyAny>, seed: u64, stream: u64, offset: u64, cuda_stream: u64) -> PyResult<()> {
    fill(py, out, seed, stream, offset, cuda_stream, Dist::Uniform)
}

#[pyfunction]
#[pyo3(signature = (out, seed, stream=0, offset=0, cuda_stream=0))]
pub fn philox_normal(py: Python<'_>, out: &Bound<'_, PyAny>, seed: u64, stream: u64, offset: u64, cuda_stream: u64) -> PyResult<()> {
    fill(py, out, seed, stream, offset, cuda_stream, Dist::Normal)
}

/// Raw 32-bit outputs, written bit for bit into an int32 tensor.
#[pyfunction]
#[pyo3(signature = (out, seed, stream=0, offset=0))]
pub fn philox_bits(py: Python<'_>, out: &Bound<'_, PyAny>, seed: u64, stream: u64, offset: u64) -> PyResult<()> {
    fill(py, out, seed, stream, offset, 0, Dist::Bits)
}
