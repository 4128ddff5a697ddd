//! Multilinear-extension data importance (see `ferrox_core::importance`).
//! The arrays are float64/int64, which the torch bridge does not carry, so
//! they cross as numpy arrays through `__array_interface__` (pointer, dtype,
//! shape); `ferrox.importance` makes them C-contiguous and of the right dtype
//! first, so here a mismatch is refused rather than converted.

use ferrox_core::importance::{self, GroupStep, Retrievals};
use ferrox_core::Error;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;

/// A C-contiguous numpy array borrowed for the call.
struct Array<'py> {
    name: &'static str,
    ptr: usize,
    shape: Vec<usize>,
    _keep: Bound<'py, PyAny>,
}

impl<'py> Array<'py> {
    fn new(name: &'static str, obj: &Bound<'py, PyAny>, typestr: &str, writable: bool) -> PyResult<Self> {
        let ai = obj.getattr("__array_interface__").map_err(|_| {
            PyTypeError::new_err(format!("{name}: expected a numpy array, got {}", obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()))
        })?;
        let got: String = ai.get_item("typestr")?.extract()?;
        if got != typestr {
            return Err(PyTypeError::new_err(format!("{name}: expected numpy dtype {typestr}, got {got}")));
        }
        if !ai.get_item("strides")?.is_none() {
            return Err(PyValueError::new_err(format!("{name}: expected a C-contiguous array")));
        }
        let (ptr, readonly): (usize, bool) = ai.get_item("data")?.extract()?;
        if writable && readonly {
            return Err(PyValueError::new_err(format!("{name}: the output array is read-only")));
        }
        let shape: Vec<usize> = ai.get_item("shape")?.extract()?;
        Ok(Array { name, ptr, shape, _keep: obj.clone() })
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn expect_ndim(&self, ndim: usize) -> PyResult<()> {
        if self.shape.len() != ndim {
            return Err(PyValueError::new_err(format!(
                "{}: expected a {ndim}-d array, got shape {:?}",
                self.name, self.shape
            )));
        }
        Ok(())
    }

    /// # Safety
    /// The dtype was checked against `T` in `new`; the array outlives the call.
    unsafe fn slice<T>(&self) -> &'static [T] {
        if self.len() == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr as *const T, self.len())
    }

    /// # Safety
    /// As `slice`, and no other slice of this memory is alive.
    unsafe fn slice_mut<T>(&self) -> &'static mut [T] {
        if self.len() == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len())
    }
}

/// The retrievals as raw slices plus their layout, checked in the core.
struct Input {
    ids: &'static [i64],
    utility: &'static [f64],
    indptr: Option<&'static [i64]>,
    shape: (usize, usize),
    num_items: usize,
}

impl Input {
    fn retrievals(&self) -> Result<Retrievals<'static>, Error> {
        match self.indptr {
            Some(p) => Retrievals::csr(self.ids, self.utility, p, self.num_items),
            None => Retrievals::padded(self.ids, self.utility, self.shape.0, self.shape.1, self.num_items),
        }
    }
}

/// Checks shapes (the core checks values) and borrows the slices. The arrays
/// must stay alive (they are held by the caller's frame) while `Input` is used.
fn input<'py>(
    retrieved: &Array<'py>,
    utility: &Array<'py>,
    indptr: Option<&Array<'py>>,
    num_items: usize,
) -> PyResult<Input> {
    if utility.shape != retrieved.shape {
        return Err(PyValueError::new_err(format!(
            "utility: shape {:?} does not match retrieved shape {:?}",
            utility.shape, retrieved.shape
        )));
    }
    let shape = match indptr {
        Some(p) => {
            retrieved.expect_ndim(1)?;
            p.expect_ndim(1)?;
            (p.len().saturating_sub(1), 0)
        }
        None => {
            retrieved.expect_ndim(2)?;
            (retrieved.shape[0], retrieved.shape[1])
        }
    };
    // SAFETY: dtypes were checked when the arrays were read; they outlive the call.
    unsafe {
        Ok(Input {
            ids: retrieved.slice::<i64>(),
            utility: utility.slice::<f64>(),
            indptr: indptr.map(|p| p.slice::<i64>()),
            shape,
            num_items,
        })
    }
}

fn vector<'py>(name: &'static str, obj: &Bound<'py, PyAny>, writable: bool) -> PyResult<Array<'py>> {
    let a = Array::new(name, obj, "<f8", writable)?;
    a.expect_ndim(1)?;
    Ok(a)
}

/// Exact MLE gradient into `out` (float64 [N]); `probs` float64 [N];
/// `retrieved` int64 [Q, M] (−1 padded) or, with `indptr`, int64 [nnz].
#[pyfunction]
#[pyo3(signature = (retrieved, utility, indptr, k, probs, out))]
pub fn mle_gradient(
    py: Python<'_>,
    retrieved: &Bound<'_, PyAny>,
    utility: &Bound<'_, PyAny>,
    indptr: Option<&Bound<'_, PyAny>>,
    k: usize,
    probs: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let (r, u) = (Array::new("retrieved", retrieved, "<i8", false)?, Array::new("utility", utility, "<f8", false)?);
    let p = indptr.map(|x| Array::new("indptr", x, "<i8", false)).transpose()?;
    let (probs, out) = (vector("probs", probs, false)?, vector("out", out, true)?);
    let inp = input(&r, &u, p.as_ref(), probs.len())?;
    let (pr, o) = unsafe { (probs.slice::<f64>(), out.slice_mut::<f64>()) };
    compute(py, move || importance::multilinear_gradient(&inp.retrievals()?, k, pr, o))
}

/// The (ε, δ) sampled gradient into `out`; returns the patterns drawn per query.
#[pyfunction]
#[pyo3(signature = (retrieved, utility, indptr, k, probs, eps, delta, seed, out))]
#[allow(clippy::too_many_arguments)]
pub fn mle_sampled_gradient(
    py: Python<'_>,
    retrieved: &Bound<'_, PyAny>,
    utility: &Bound<'_, PyAny>,
    indptr: Option<&Bound<'_, PyAny>>,
    k: usize,
    probs: &Bound<'_, PyAny>,
    eps: f64,
    delta: f64,
    seed: u64,
    out: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let (r, u) = (Array::new("retrieved", retrieved, "<i8", false)?, Array::new("utility", utility, "<f8", false)?);
    let p = indptr.map(|x| Array::new("indptr", x, "<i8", false)).transpose()?;
    let (probs, out) = (vector("probs", probs, false)?, vector("out", out, true)?);
    let inp = input(&r, &u, p.as_ref(), probs.len())?;
    let (pr, o) = unsafe { (probs.slice::<f64>(), out.slice_mut::<f64>()) };
    compute(py, move || importance::sampled_gradient(&inp.retrievals()?, k, pr, eps, delta, seed, o))
}

/// Patterns per query that `mle_sampled_gradient` draws for utilities of
/// range `span` (max − min over the utilities and 0).
#[pyfunction]
pub fn mle_sample_count(span: f64, k: usize, eps: f64, delta: f64) -> PyResult<usize> {
    importance::sample_count(span, k, eps, delta).map_err(to_py)
}

/// Projected gradient ascent on `v` (float64 [N], updated in place) for
/// `num_epochs`; `groups` int64 [N] with `group_step` "sum" or "mean".
#[pyfunction]
#[pyo3(signature = (retrieved, utility, indptr, k, learning_rate, num_epochs, v, groups=None, group_step="sum"))]
#[allow(clippy::too_many_arguments)]
pub fn mle_learn(
    py: Python<'_>,
    retrieved: &Bound<'_, PyAny>,
    utility: &Bound<'_, PyAny>,
    indptr: Option<&Bound<'_, PyAny>>,
    k: usize,
    learning_rate: f64,
    num_epochs: usize,
    v: &Bound<'_, PyAny>,
    groups: Option<&Bound<'_, PyAny>>,
    group_step: &str,
) -> PyResult<()> {
    let step = match group_step {
        "sum" => GroupStep::Sum,
        "mean" => GroupStep::Mean,
        other => return Err(PyValueError::new_err(format!("group_step: expected 'sum' or 'mean', got {other:?}"))),
    };
    let (r, u) = (Array::new("retrieved", retrieved, "<i8", false)?, Array::new("utility", utility, "<f8", false)?);
    let p = indptr.map(|x| Array::new("indptr", x, "<i8", false)).transpose()?;
    let v = vector("probs", v, true)?;
    let g = groups.map(|x| Array::new("grouping", x, "<i8", false)).transpose()?;
    if let Some(g) = &g {
        g.expect_ndim(1)?;
    }
    let inp = input(&r, &u, p.as_ref(), v.len())?;
    let vs = unsafe { v.slice_mut::<f64>() };
    let gs = g.as_ref().map(|g| unsafe { g.slice::<i64>() });
    compute(py, move || {
        importance::learn_importance(&inp.retrievals()?, k, learning_rate, num_epochs, gs.map(|g| (g, step)), vs)
    })
}

/// Projects `grads` (torch, [n, d], float32/float16/bfloat16) into `out`
/// (torch, float32 [n, p], contiguous, on grads' device): `out = grads·Rᵀ/√p`
/// with the implicit Rademacher `R` of `ferrox_core::importance::project`.
/// CUDA tensors run on `stream` (torch's current stream), bitwise the CPU's.
#[pyfunction]
#[pyo3(signature = (grads, seed, p, out, stream=0))]
pub fn importance_project(
    py: Python<'_>,
    grads: &Bound<'_, PyAny>,
    seed: u64,
    p: usize,
    out: &Bound<'_, PyAny>,
    stream: u64,
) -> PyResult<()> {
    use crate::tensor::Device;
    let g = crate::tensor::Tensor::input("grads", grads)?;
    let o = crate::tensor::Tensor::output("out", out)?;
    let checked = (|| {
        o.expect_dtype(&[ferrox_core::DType::F32])?;
        if o.device != g.device {
            return Err(Error::Device(format!("out: on {} but grads is on {}", o.device, g.device)));
        }
        if g.shape.len() != 2 {
            return Err(Error::Shape(format!("grads: expected a 2-d tensor [n, d], got shape {:?}", g.shape)));
        }
        if o.shape != [g.shape[0], p] {
            return Err(Error::Shape(format!(
                "out: expected shape [{}, {p}] (grads rows, p), got {:?}",
                g.shape[0], o.shape
            )));
        }
        o.check_alias(&g, false)?;
        Ok(())
    })();
    checked.map_err(to_py)?;
    let (n, d) = (g.shape[0], g.shape[1]);
    match g.device {
        Device::Cpu => {
            // SAFETY: both on the CPU, dtypes checked (out here, grads by with_float), disjoint.
            let os = unsafe { o.slice_mut::<f32>() };
            crate::with_float!(g.dtype, "grads", T => {
                let gs = unsafe { g.slice::<T>() };
                compute(py, move || importance::project::project(gs, n, d, p, seed, os))
            })
        }
        Device::Cuda(ordinal) => {
            let m = importance::cuda::DeviceProject { ordinal, stream, dtype: g.dtype, n, d, p, seed, grads: g.ptr, out: o.ptr };
            // SAFETY: both contiguous on this device with the shapes in `m`,
            // disjoint; queued on torch's stream, which orders it before any
            // later use or free of the tensors.
            compute(py, move || unsafe { importance::cuda::project(&m) })
        }
    }
}
