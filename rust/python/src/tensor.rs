//! The tensor bridge: a torch tensor crosses as its raw data pointer, dtype,
//! shape, strides and device, read from the Python object (no libtorch link,
//! so one abi3 wheel serves every torch 2.x).
//!
//! Inputs that are not contiguous are replaced by `tensor.contiguous()` (the
//! copy is kept alive here), so kernels always see dense memory. Outputs must
//! already be contiguous: writing into a hidden copy would silently lose the
//! result, so a strided output is refused.

use ferrox_core::{DType, Error, Result};
use pyo3::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

pub struct Tensor<'py> {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub device: Device,
    pub ptr: u64,
    // Keeps a contiguous copy (or the original) alive while we use `ptr`.
    _keep: Bound<'py, PyAny>,
}

fn read_dtype(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<DType> {
    let s: String = obj.getattr("dtype")?.str()?.extract()?;
    DType::parse(&s).ok_or_else(|| {
        crate::error::to_py(Error::DType(format!(
            "{name}: unsupported dtype {s} (ferrox takes float32, float16, bfloat16, uint8, int32, int64, bool)"
        )))
    })
}

fn read_device(obj: &Bound<'_, PyAny>) -> PyResult<Device> {
    let dev = obj.getattr("device")?;
    let kind: String = dev.getattr("type")?.extract()?;
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(dev.getattr("index")?.extract::<Option<i32>>()?.unwrap_or(0))),
        other => Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "unsupported device type {other:?} (ferrox runs on cpu and cuda)"
        ))),
    }
}

fn is_contiguous(shape: &[usize], strides: &[isize]) -> bool {
    // An empty tensor has no element to misplace, whatever torch reports as
    // its strides (torch.empty(3, 0).stride() is (1, 1)).
    if shape.contains(&0) {
        return true;
    }
    let mut expected: isize = 1;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected *= n as isize;
    }
    true
}

impl<'py> Tensor<'py> {
    fn read(name: &'static str, obj: Bound<'py, PyAny>) -> PyResult<(Self, bool)> {
        if !obj.hasattr("data_ptr")? || !obj.hasattr("stride")? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "{name}: expected a torch.Tensor, got {}",
                obj.get_type().name()?
            )));
        }
        let dtype = read_dtype(name, &obj)?;
        let device = read_device(&obj)?;
        let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
        let strides: Vec<isize> = obj.call_method0("stride")?.extract()?;
        let ptr: u64 = obj.call_method0("data_ptr")?.extract()?;
        let dense = is_contiguous(&shape, &strides);
        Ok((Tensor { name, dtype, shape, device, ptr, _keep: obj }, dense))
    }

    /// An input: a strided tensor is made contiguous first.
    pub fn input(name: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let (t, dense) = Self::read(name, obj.clone())?;
        if dense {
            return Ok(t);
        }
        let (t, _) = Self::read(name, obj.call_method0("contiguous")?)?;
        Ok(t)
    }

    /// An output: written in place, so it must be contiguous.
    pub fn output(name: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let (t, dense) = Self::read(name, obj.clone())?;
        if !dense {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{name}: output tensors must be contiguous (got shape {:?}); pass a contiguous tensor, e.g. torch.empty_like(x)",
                t.shape
            )));
        }
        Ok(t)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// Length of the last dimension (1 for a 0-d tensor).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        Err(Error::DType(format!(
            "{}: expected dtype {}, got {}",
            self.name,
            names.join(" or "),
            self.dtype
        )))
    }

    pub fn expect_cpu(&self) -> Result<()> {
        match self.device {
            Device::Cpu => Ok(()),
            d => Err(Error::Device(format!("{}: expected a cpu tensor, got one on {d}", self.name))),
        }
    }

    pub fn expect_same(&self, other: &Tensor<'_>) -> Result<()> {
        if self.dtype != other.dtype {
            return Err(Error::DType(format!(
                "{}: dtype {} does not match {} ({})",
                other.name, other.dtype, self.name, self.dtype
            )));
        }
        if self.device != other.device {
            return Err(Error::Device(format!(
                "{}: on {} but {} is on {}",
                other.name, other.device, self.name, self.device
            )));
        }
        if self.shape != other.shape {
            return Err(Error::Shape(format!(
                "{}: shape {:?} does not match {} shape {:?}",
                other.name, other.shape, self.name, self.shape
            )));
        }
        Ok(())
    }

    fn byte_range(&self) -> (u64, u64) {
        (self.ptr, self.ptr + self.nbytes())
    }

    /// `self` (an output) may be exactly `other` when `exact_ok` (elementwise
    /// kernels), but never partly overlap it: that would read values the
    /// kernel has already overwritten.
    pub fn check_alias(&self, other: &Tensor<'_>, exact_ok: bool) -> Result<Alias> {
        let (a0, a1) = self.byte_range();
        let (b0, b1) = other.byte_range();
        if a0 >= b1 || b0 >= a1 || self.numel() == 0 || other.numel() == 0 {
            return Ok(Alias::Disjoint);
        }
        if exact_ok && a0 == b0 && a1 == b1 && self.dtype == other.dtype {
            return Ok(Alias::Same);
        }
        Err(Error::Value(format!(
            "{}: output memory overlaps input {}; pass a separate output tensor",
            self.name, other.name
        )))
    }

    /// # Safety
    /// The caller checked dtype == T and that the tensor is on the CPU; the
    /// Python object outlives the slice (it is borrowed for the call).
    pub unsafe fn slice<T>(&self) -> &[T] {
        if self.numel() == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const T, self.numel())
    }

    /// # Safety
    /// As `slice`, and no other live slice overlaps this memory.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<T>(&self) -> &mut [T] {
        if self.numel() == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut T, self.numel())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alias {
    Disjoint,
    Same,
}

/// Runs `$body` (a PyResult) with `$T` bound to the Rust type of a float dtype.
#[macro_export]
macro_rules! with_float {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            ferrox_core::DType::F32 => {
                type $T = f32;
                $body
            }
            ferrox_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            ferrox_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err($crate::error::to_py(ferrox_core::Error::DType(format!(
                "{}: expected dtype float32, float16 or bfloat16, got {}",
                $what, other
            )))),
        }
    };
}
