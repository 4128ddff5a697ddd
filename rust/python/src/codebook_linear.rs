//! The codebook linear (see `ferrox_core::codebook::linear`): a matmul with
//! a codebook-quantized weight that decodes the packed codes in registers,
//! on the CPU or on CUDA tensors (torch's current stream).

use ferrox_core::codebook::linear::{self as cbl, CodebookDims, CodebookWeight};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};
use crate::with_float;

type Res<T> = std::result::Result<T, Error>;

fn expect_shape(t: &Tensor<'_>, want: &[usize]) -> Res<()> {
    if t.shape != want {
        return Err(Error::Shape(format!("{}: expected shape {:?}, got {:?}", t.name, want, t.shape)));
    }
    Ok(())
}

/// out[..., r] = row_scale[r] · Σ_c x[..., c]·Ŵ[r, c] + bias[r] for the
/// permuted rows r, Ŵ decoded on the fly from `codes` (uint8 [out,
/// packed_row_bytes(in / vector_dim, bits)], ferrox.pack's layout),
/// `codebooks` (float32 [groups, 2^bits, vector_dim]) and `group_offsets`
/// (int32 [groups + 1], non-decreasing from 0 to out: checked on the CPU,
/// trusted on CUDA). row_scale and bias: float32 [out] in permuted order, or
/// None. x [..., in] float32/16/bfloat16; out [..., out] in x's dtype. f32
/// accumulation in a fixed order per element, bitwise the same on CPU and
/// CUDA and for any thread count. CUDA tensors run on `stream`.
#[pyfunction]
#[pyo3(signature = (x, codes, codebooks, group_offsets, row_scale, bias, bits, vector_dim, out, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn codebook_linear(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    codes: &Bound<'_, PyAny>,
    codebooks: &Bound<'_, PyAny>,
    group_offsets: &Bound<'_, PyAny>,
    row_scale: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    bits: u32,
    vector_dim: usize,
    out: &Bound<'_, PyAny>,
    stream: u64,
) -> PyResult<()> {
    let x = Tensor::input("x", x)?;
    let codes = Tensor::input("codes", codes)?;
    let cb = Tensor::input("codebooks", codebooks)?;
    let offs = Tensor::input("group_offsets", group_offsets)?;
    let scale = row_scale.map(|t| Tensor::input("row_scale", t)).transpose()?;
    let bias = bias.map(|t| Tensor::input("bias", t)).transpose()?;
    let y = Tensor::output("out", out)?;
    let (dims, batch) = (|| {
        x.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        codes.expect_dtype(&[DType::U8])?;
        cb.expect_dtype(&[DType::F32])?;
        offs.expect_dtype(&[DType::I32])?;
        if y.dtype != x.dtype {
            return Err(Error::DType(format!("out: dtype {} does not match x ({})", y.dtype, x.dtype)));
        }
        let inf = x.row_len();
        if x.shape.is_empty() || inf == 0 {
            return Err(Error::Shape(format!("x: expected shape [..., in_features] with in_features > 0, got {:?}", x.shape)));
        }
        if codes.shape.len() != 2 || cb.shape.len() != 3 || offs.shape.len() != 1 {
            return Err(Error::Shape(format!(
                "codes, codebooks, group_offsets: expected [out, row_bytes], [groups, 2^bits, vector_dim], [groups + 1]; got {:?}, {:?}, {:?}",
                codes.shape, cb.shape, offs.shape
            )));
        }
        let dims = CodebookDims { out_features: codes.shape[0], in_features: inf, bits, vector_dim, groups: offs.shape[0].saturating_sub(1) };
        if (1..=8).contains(&bits) && vector_dim > 0 {
            expect_shape(&cb, &[dims.groups, dims.codewords(), vector_dim])?;
        }
        let batch = x.numel() / inf;
        dims.check(batch, x.numel(), codes.numel(), cb.numel(), offs.numel(), scale.as_ref().map(Tensor::numel), bias.as_ref().map(Tensor::numel), y.numel())?;
        let mut want = x.shape.clone();
        if let Some(l) = want.last_mut() {
            *l = dims.out_features;
        }
        expect_shape(&y, &want)?;
        if y.device != x.device {
            return Err(Error::Device(format!("out: on {} but x is on {}", y.device, x.device)));
        }
        for t in [Some(&codes), Some(&cb), Some(&offs), scale.as_ref(), bias.as_ref()].into_iter().flatten() {
            if t.device != x.device {
                return Err(Error::Device(format!("{}: on {} but x is on {}", t.name, t.device, x.device)));
            }
            y.check_alias(t, false)?;
        }
        for t in [scale.as_ref(), bias.as_ref()].into_iter().flatten() {
            t.expect_dtype(&[DType::F32])?;
            expect_shape(t, &[dims.out_features])?;
        }
        y.check_alias(&x, false)?;
        Ok((dims, batch))
    })()
    .map_err(to_py)?;
    match x.device {
        Device::Cpu => with_float!(x.dtype, "x", T => {
            // SAFETY: dtypes, devices, shapes and aliasing checked above.
            let (xs, ys) = unsafe { (x.slice::<T>(), y.slice_mut::<T>()) };
            let w = unsafe {
                CodebookWeight {
                    dims,
                    codes: codes.slice::<u8>(),
                    codebooks: cb.slice::<f32>(),
                    group_offsets: offs.slice::<i32>(),
                    row_scale: scale.as_ref().map(|t| t.slice::<f32>()),
                }
            };
            let bs = bias.as_ref().map(|t| unsafe { t.slice::<f32>() });
            compute(py, move || cbl::linear(xs, batch, &w, bs, ys))
        }),
        Device::Cuda(ordinal) => {
            use ferrox_core::codebook::cuda::{linear, DeviceLinear};
            let m = DeviceLinear {
                ordinal,
                stream,
                dtype: x.dtype,
                dims,
                batch,
                x: x.ptr,
                codes: codes.ptr,
                codebooks: cb.ptr,
                group_offsets: offs.ptr,
                row_scale: scale.as_ref().map_or(0, |t| t.ptr),
                bias: bias.as_ref().map_or(0, |t| t.ptr),
                y: y.ptr,
            };
            // SAFETY: every tensor was checked to be contiguous with the
            // shapes in `dims` on this device, `out` overlaps no input; the
            // launch is queued on torch's stream, which orders it before any
            // later use or free.
            compute(py, move || unsafe { linear(&m) })
        }
    }
}
