//! BitDelta (see `ferrox_core::delta`): compress a fine-tune against its
//! base into packed signs + α, restore it, and the 1-bit matmul (CPU, and
//! CUDA tensors on torch's current stream).

use std::path::PathBuf;

use ferrox_core::delta::{self, matmul::Dims, Alphas, Scale};
use ferrox_core::merge::FileTensor;
use ferrox_core::{pack, DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::{Device, Tensor};
use crate::with_float;

type Res<T> = std::result::Result<T, Error>;

/// A tensor inside a file as passed from Python: (path, byte offset, dtype).
type FileSpec = (PathBuf, u64, String);

fn file_tensor(what: &str, (path, offset, dtype): FileSpec) -> Res<FileTensor> {
    let dtype = DType::parse(&dtype)
        .filter(|d| d.is_float())
        .ok_or_else(|| Error::DType(format!("{what}: expected float32, float16 or bfloat16 (F32, F16, BF16), got {dtype:?}")))?;
    Ok(FileTensor { path, offset, dtype })
}

fn chunk_or_default(chunk_len: usize) -> usize {
    if chunk_len == 0 {
        delta::DEFAULT_CHUNK
    } else {
        chunk_len
    }
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Compresses one tensor stored in files, streaming: `numel` elements of
/// `base` and `ft` (each (path, offset, dtype), same dtype), rows of
/// `row_len`; the packed signs (rows of ceil(row_len/8) bytes) are written
/// at byte `out[1]` of the existing file `out[0]`. Returns (alpha,
/// row_alphas or None, base_hash): alpha = Σ|Δ|/numel (f64), row_alphas a
/// list of Σ|Δ_row|/row_len when `per_row`, base_hash the XXH3-64 of the
/// base tensor's bytes as 16 hex digits. `chunk_len` 0 = the default.
#[pyfunction]
#[pyo3(signature = (base, ft, numel, row_len, out, per_row=false, chunk_len=0))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn delta_compress_files(
    py: Python<'_>,
    base: FileSpec,
    ft: FileSpec,
    numel: usize,
    row_len: usize,
    out: (PathBuf, u64),
    per_row: bool,
    chunk_len: usize,
) -> PyResult<(f64, Option<Vec<f64>>, String)> {
    let (base, ft) = (|| Ok::<_, Error>((file_tensor("base", base)?, file_tensor("ft", ft)?)))().map_err(to_py)?;
    let chunk_len = chunk_or_default(chunk_len);
    let c = compute(py, move || delta::compress_files(base, ft, numel, row_len, out, per_row, chunk_len))?;
    Ok((c.alpha, c.row_alphas, hex(c.base_hash)))
}

fn expect_shape(t: &Tensor<'_>, want: &[usize]) -> Res<()> {
    if t.shape != want {
        return Err(Error::Shape(format!("{}: expected shape {:?}, got {:?}", t.name, want, t.shape)));
    }
    Ok(())
}

/// The packed shape of a tensor's signs: its leading dims, last dim
/// ceil(row_len / 8).
fn packed_shape(t: &Tensor<'_>) -> Vec<usize> {
    let mut s = t.shape.clone();
    match s.last_mut() {
        Some(l) => *l = pack::packed_row_bytes(*l, 1),
        None => s.push(1),
    }
    s
}

/// Compresses in-memory CPU tensors: signs of ft − base into `signs_out`
/// (uint8, base's leading dims and ceil(row_len/8) bytes per row), per-row
/// α into `row_alpha_out` (float32 [rows]) when given. Returns (alpha,
/// base_hash) as `delta_compress_files` does; the same inputs give the same
/// bits either way.
#[pyfunction]
#[pyo3(signature = (base, ft, signs_out, row_alpha_out=None, chunk_len=0))]
pub fn delta_compress(
    py: Python<'_>,
    base: &Bound<'_, PyAny>,
    ft: &Bound<'_, PyAny>,
    signs_out: &Bound<'_, PyAny>,
    row_alpha_out: Option<&Bound<'_, PyAny>>,
    chunk_len: usize,
) -> PyResult<(f64, String)> {
    let base = Tensor::input("base", base)?;
    let ft = Tensor::input("ft", ft)?;
    let signs = Tensor::output("signs_out", signs_out)?;
    let rows_out = row_alpha_out.map(|t| Tensor::output("row_alpha_out", t)).transpose()?;
    let row_len = base.row_len();
    (|| {
        base.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        base.expect_cpu()?;
        base.expect_same(&ft)?;
        signs.expect_cpu()?;
        signs.expect_dtype(&[DType::U8])?;
        expect_shape(&signs, &packed_shape(&base))?;
        signs.check_alias(&base, false)?;
        signs.check_alias(&ft, false)?;
        if let Some(r) = &rows_out {
            r.expect_cpu()?;
            r.expect_dtype(&[DType::F32])?;
            let rows = base.numel().checked_div(row_len).unwrap_or(0);
            expect_shape(r, &[rows])?;
            r.check_alias(&base, false)?;
            r.check_alias(&ft, false)?;
            r.check_alias(&signs, false)?;
        }
        Ok(())
    })()
    .map_err(to_py)?;
    let chunk_len = chunk_or_default(chunk_len);
    let per_row = rows_out.is_some();
    let c = with_float!(base.dtype, "base", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (b, f, s) = unsafe { (base.slice::<T>(), ft.slice::<T>(), signs.slice_mut::<u8>()) };
        compute(py, move || delta::compress(b, f, row_len.max(1), per_row, s, chunk_len))
    })?;
    if let (Some(r), Some(vals)) = (&rows_out, &c.row_alphas) {
        // SAFETY: a float32 CPU tensor of `rows` elements, checked above.
        let dst = unsafe { r.slice_mut::<f32>() };
        for (d, v) in dst.iter_mut().zip(vals) {
            *d = *v as f32;
        }
    }
    Ok((c.alpha, hex(c.base_hash)))
}

/// α as passed from Python: a number, or a tensor.
enum PyAlpha<'py> {
    Scalar(f64),
    Tensor(Tensor<'py>),
}

fn read_alpha<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyAlpha<'py>> {
    // A one-element tensor [1] converts to float too, but it is a tensor
    // (alphas of a single tenant); only numbers and 0-d tensors are scalars.
    let zero_dim = match obj.getattr("shape") {
        Ok(shape) => shape.len()? == 0,
        Err(_) => true,
    };
    if zero_dim {
        if let Ok(v) = obj.extract::<f64>() {
            return Ok(PyAlpha::Scalar(v));
        }
    }
    Ok(PyAlpha::Tensor(Tensor::input("alpha", obj)?))
}

/// out = base + α·s (s = ±1 from `signs`, bit 1 → −1), computed in f64 and
/// rounded once to out's dtype (= base's). `alpha`: a number, or a float32
/// tensor [rows] (one per row, widened to f64). CPU tensors.
#[pyfunction]
pub fn delta_restore(py: Python<'_>, base: &Bound<'_, PyAny>, signs: &Bound<'_, PyAny>, alpha: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let base = Tensor::input("base", base)?;
    let signs = Tensor::input("signs", signs)?;
    let alpha = read_alpha(alpha)?;
    let out = Tensor::output("out", out)?;
    let row_len = base.row_len();
    let rows_scale: Option<Vec<f64>> = (|| {
        base.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
        base.expect_cpu()?;
        base.expect_same(&out)?;
        signs.expect_cpu()?;
        signs.expect_dtype(&[DType::U8])?;
        expect_shape(&signs, &packed_shape(&base))?;
        out.check_alias(&base, false)?;
        out.check_alias(&signs, false)?;
        match &alpha {
            PyAlpha::Scalar(_) => Ok(None),
            PyAlpha::Tensor(t) => {
                t.expect_cpu()?;
                t.expect_dtype(&[DType::F32])?;
                let rows = base.numel().checked_div(row_len).unwrap_or(0);
                expect_shape(t, &[rows])?;
                // SAFETY: a float32 CPU tensor, checked just above.
                Ok(Some(unsafe { t.slice::<f32>() }.iter().map(|&v| v as f64).collect()))
            }
        }
    })()
    .map_err(to_py)?;
    let a = match alpha {
        PyAlpha::Scalar(a) => a,
        PyAlpha::Tensor(_) => 0.0,
    };
    with_float!(base.dtype, "base", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (b, s, o) = unsafe { (base.slice::<T>(), signs.slice::<u8>(), out.slice_mut::<T>()) };
        let rows_scale = &rows_scale;
        compute(py, move || {
            let scale = match rows_scale {
                Some(r) => Scale::Rows(r),
                None => Scale::Tensor(a),
            };
            delta::restore(b, s, row_len.max(1), scale, o)
        })
    })
}

/// The shapes of a matmul call: x [..., in], signs [tenants?, out, rb],
/// out [..., out_features].
fn matmul_dims(x: &Tensor<'_>, signs: &Tensor<'_>, y: &Tensor<'_>, multi: bool) -> Res<Dims> {
    x.expect_dtype(&[DType::F32, DType::F16, DType::BF16])?;
    signs.expect_dtype(&[DType::U8])?;
    if y.dtype != x.dtype {
        return Err(Error::DType(format!("out: dtype {} does not match x ({})", y.dtype, x.dtype)));
    }
    for t in [signs, y] {
        if t.device != x.device {
            return Err(Error::Device(format!("{}: on {} but x is on {}", t.name, t.device, x.device)));
        }
    }
    let inf = x.row_len();
    if x.shape.is_empty() || inf == 0 {
        return Err(Error::Shape(format!("x: expected shape [..., in_features] with in_features > 0, got {:?}", x.shape)));
    }
    let want_dims = if multi { 3 } else { 2 };
    let rb = pack::packed_row_bytes(inf, 1);
    if signs.shape.len() != want_dims || signs.shape[want_dims - 1] != rb {
        let shape = if multi { format!("[tenants, out_features, {rb}]") } else { format!("[out_features, {rb}]") };
        return Err(Error::Shape(format!("signs: expected shape {shape} for in_features {inf}, got {:?}", signs.shape)));
    }
    let (tenants, out) = if multi { (signs.shape[0], signs.shape[1]) } else { (1, signs.shape[0]) };
    let batch = x.numel() / inf;
    let mut want = x.shape.clone();
    if let Some(l) = want.last_mut() {
        *l = out;
    }
    expect_shape(y, &want)?;
    y.check_alias(x, false)?;
    y.check_alias(signs, false)?;
    Ok(Dims { batch, in_features: inf, out_features: out, tenants })
}

/// α for the CPU kernel: a number (single tenant), or a float32 tensor
/// [out] / [tenants] / [tenants, out].
fn cpu_alphas(alpha: &PyAlpha<'_>, d: &Dims, multi: bool) -> Res<(Vec<f32>, bool)> {
    match alpha {
        PyAlpha::Scalar(a) if !multi => Ok((vec![*a as f32], false)),
        PyAlpha::Scalar(_) => Err(Error::Value("alphas: expected a float32 tensor [tenants] or [tenants, out_features], got a number".into())),
        PyAlpha::Tensor(t) => {
            t.expect_dtype(&[DType::F32])?;
            let per_row = alpha_per_row(t, d, multi)?;
            // SAFETY: a float32 CPU tensor (device checked by the caller).
            Ok((unsafe { t.slice::<f32>() }.to_vec(), per_row))
        }
    }
}

/// Whether an α tensor is per row, from its shape.
fn alpha_per_row(t: &Tensor<'_>, d: &Dims, multi: bool) -> Res<bool> {
    let (per_tensor, per_row): (Vec<usize>, Vec<usize>) =
        if multi { (vec![d.tenants], vec![d.tenants, d.out_features]) } else { (vec![1], vec![d.out_features]) };
    if t.shape == per_row {
        Ok(true)
    } else if t.shape == per_tensor || (!multi && t.shape.is_empty()) {
        Ok(false)
    } else {
        Err(Error::Shape(format!("{}: expected shape {per_tensor:?} or {per_row:?}, got {:?}", t.name, t.shape)))
    }
}

#[allow(clippy::too_many_arguments)]
fn matmul_impl(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    signs: &Bound<'_, PyAny>,
    alpha: &Bound<'_, PyAny>,
    ids: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    accumulate: bool,
    check_ids: bool,
    stream: u64,
) -> PyResult<()> {
    let multi = ids.is_some();
    let x = Tensor::input("x", x)?;
    let signs = Tensor::input("signs", signs)?;
    let alpha = read_alpha(alpha)?;
    let ids_t = ids.map(|t| Tensor::input("adapter_ids", t)).transpose()?;
    let y = Tensor::output("out", out)?;
    let d = (|| {
        let d = matmul_dims(&x, &signs, &y, multi)?;
        if let Some(t) = &ids_t {
            t.expect_dtype(&[DType::I64])?;
            if t.device != x.device {
                return Err(Error::Device(format!("adapter_ids: on {} but x is on {}", t.device, x.device)));
            }
            expect_shape(t, &[d.batch])?;
        }
        if let PyAlpha::Tensor(t) = &alpha {
            if t.device != x.device {
                return Err(Error::Device(format!("alpha: on {} but x is on {}", t.device, x.device)));
            }
        }
        Ok(d)
    })()
    .map_err(to_py)?;
    match x.device {
        Device::Cpu => {
            let (alphas, per_row) = cpu_alphas(&alpha, &d, multi).map_err(to_py)?;
            let ids_v: Option<Vec<i64>> = ids_t.as_ref().map(|t| unsafe { t.slice::<i64>() }.to_vec());
            with_float!(x.dtype, "x", T => {
                // SAFETY: dtypes, device, shapes and aliasing checked above.
                let (xs, s, o) = unsafe { (x.slice::<T>(), signs.slice::<u8>(), y.slice_mut::<T>()) };
                let (alphas, ids_v) = (&alphas, &ids_v);
                compute(py, move || {
                    let a = Alphas { values: alphas, per_row };
                    match ids_v {
                        Some(ids) => delta::matmul_multi(xs, d, s, a, ids, o, accumulate),
                        None => delta::matmul(xs, d, s, a, o, accumulate),
                    }
                })
            })
        }
        Device::Cuda(ordinal) => cuda_matmul(py, ordinal, stream, &x, &signs, &alpha, ids.filter(|_| check_ids), ids_t.as_ref(), &y, d, multi, accumulate),
    }
}

#[allow(clippy::too_many_arguments)]
fn cuda_matmul(
    py: Python<'_>,
    ordinal: i32,
    stream: u64,
    x: &Tensor<'_>,
    signs: &Tensor<'_>,
    alpha: &PyAlpha<'_>,
    ids_to_check: Option<&Bound<'_, PyAny>>,
    ids: Option<&Tensor<'_>>,
    y: &Tensor<'_>,
    d: Dims,
    multi: bool,
    accumulate: bool,
) -> PyResult<()> {
    use ferrox_core::delta::cuda::{DeviceAlpha, DeviceMatmul};
    let alpha = match alpha {
        PyAlpha::Scalar(a) if !multi => DeviceAlpha::Scalar(*a as f32),
        PyAlpha::Scalar(_) => {
            return Err(to_py(Error::Value("alphas: expected a float32 tensor [tenants] or [tenants, out_features], got a number".into())))
        }
        PyAlpha::Tensor(t) => {
            (|| {
                t.expect_dtype(&[DType::F32])?;
                Ok(if alpha_per_row(t, &d, multi)? { DeviceAlpha::PerRow(t.ptr) } else { DeviceAlpha::PerTenant(t.ptr) })
            })()
            .map_err(to_py)?
        }
    };
    if let Some(ids) = ids_to_check {
        // One host wait, so a bad id is an error instead of NaN rows; callers
        // that checked the ids already pass check_ids=False.
        let bad: bool = ids.call_method1("lt", (0,))?.call_method1("logical_or", (ids.call_method1("ge", (d.tenants,))?,))?.call_method0("any")?.call_method0("item")?.extract()?;
        if bad {
            return Err(to_py(Error::Value(format!("adapter_ids: expected fine-tune indices in [0, {})", d.tenants))));
        }
    }
    let m = DeviceMatmul {
        ordinal,
        stream,
        dtype: x.dtype,
        dims: d,
        x: x.ptr,
        signs: signs.ptr,
        alpha,
        ids: ids.map_or(0, |t| t.ptr),
        y: y.ptr,
        accumulate,
    };
    // SAFETY: every tensor was checked to be contiguous with the shapes in
    // `d` on this device, `out` overlaps no input; the launch is queued on
    // torch's stream, which orders it before any later use or free.
    compute(py, move || unsafe { ferrox_core::delta::cuda::matmul(&m) })
}

/// out = α ⊙ (x·Sᵀ) (out += it with `accumulate`): x [..., in] float32/16/
/// bfloat16, signs uint8 [out_features, ceil(in/8)], alpha a number or a
/// float32 tensor [out_features], out [..., out_features] in x's dtype.
/// f32 accumulation in a fixed order (bitwise the same on CPU and CUDA, for
/// any thread count). CUDA tensors run on `stream` (torch's current stream).
#[pyfunction]
#[pyo3(signature = (x, signs, alpha, out, accumulate=false, stream=0))]
pub fn delta_matmul(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    signs: &Bound<'_, PyAny>,
    alpha: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    accumulate: bool,
    stream: u64,
) -> PyResult<()> {
    matmul_impl(py, x, signs, alpha, None, out, accumulate, false, stream)
}

/// The multi-tenant matmul: signs uint8 [tenants, out_features,
/// ceil(in/8)], alphas float32 [tenants] or [tenants, out_features],
/// adapter_ids int64 [batch] (x's rows); row b of out uses fine-tune
/// adapter_ids[b], bitwise as `delta_matmul` with that fine-tune. One call
/// for the whole batch. On CUDA `check_ids` costs one host wait (pass False
/// when the ids were checked already; a bad id then gives NaN rows).
#[pyfunction]
#[pyo3(signature = (x, signs, alphas, adapter_ids, out, accumulate=false, check_ids=true, stream=0))]
#[allow(clippy::too_many_arguments)]
pub fn delta_matmul_multi(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    signs: &Bound<'_, PyAny>,
    alphas: &Bound<'_, PyAny>,
    adapter_ids: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    accumulate: bool,
    check_ids: bool,
    stream: u64,
) -> PyResult<()> {
    matmul_impl(py, x, signs, alphas, Some(adapter_ids), out, accumulate, check_ids, stream)
}

/// The fused BitDelta linear on the CPU, for small batches: out = x·Wᵀ +
/// bias + α ⊙ (x·Sᵀ) in one pass over the base rows and the sign rows,
/// f32 accumulation in a fixed order per output element (the sign part
/// bitwise `delta_matmul`'s), one rounding to x's dtype. x [..., in]
/// float32/16/bfloat16, weight [out, in] and bias [out] (or None) in x's
/// dtype; without `adapter_ids`: signs uint8 [out, ceil(in/8)], alphas a
/// number or float32 [out]; with adapter_ids (int64 [rows of x]): signs
/// [tenants, out, ceil(in/8)], alphas float32 [tenants] or [tenants, out].
#[pyfunction]
#[pyo3(signature = (x, weight, bias, signs, alphas, adapter_ids, out))]
#[allow(clippy::too_many_arguments)]
pub fn delta_linear(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    signs: &Bound<'_, PyAny>,
    alphas: &Bound<'_, PyAny>,
    adapter_ids: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let multi = adapter_ids.is_some();
    let x = Tensor::input("x", x)?;
    let w = Tensor::input("weight", weight)?;
    let bias = bias.map(|b| Tensor::input("bias", b)).transpose()?;
    let signs = Tensor::input("signs", signs)?;
    let alpha = read_alpha(alphas)?;
    let ids_t = adapter_ids.map(|t| Tensor::input("adapter_ids", t)).transpose()?;
    let y = Tensor::output("out", out)?;
    let (d, alphas, per_row, ids_v) = (|| {
        x.expect_cpu()?;
        let d = matmul_dims(&x, &signs, &y, multi)?;
        w.expect_cpu()?;
        if w.dtype != x.dtype {
            return Err(Error::DType(format!("weight: dtype {} does not match x ({})", w.dtype, x.dtype)));
        }
        expect_shape(&w, &[d.out_features, d.in_features])?;
        y.check_alias(&w, false)?;
        if let Some(b) = &bias {
            b.expect_cpu()?;
            if b.dtype != x.dtype {
                return Err(Error::DType(format!("bias: dtype {} does not match x ({})", b.dtype, x.dtype)));
            }
            expect_shape(b, &[d.out_features])?;
            y.check_alias(b, false)?;
        }
        if let PyAlpha::Tensor(t) = &alpha {
            t.expect_cpu()?;
        }
        let (alphas, per_row) = cpu_alphas(&alpha, &d, multi)?;
        let ids_v = match &ids_t {
            Some(t) => {
                t.expect_cpu()?;
                t.expect_dtype(&[DType::I64])?;
                expect_shape(t, &[d.batch])?;
                // SAFETY: an int64 CPU tensor, checked just above.
                Some(unsafe { t.slice::<i64>() }.to_vec())
            }
            None => None,
        };
        Ok((d, alphas, per_row, ids_v))
    })()
    .map_err(to_py)?;
    with_float!(x.dtype, "x", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (xs, ws, s, o) = unsafe { (x.slice::<T>(), w.slice::<T>(), signs.slice::<u8>(), y.slice_mut::<T>()) };
        let bs = bias.as_ref().map(|b| unsafe { b.slice::<T>() });
        let (alphas, ids_v) = (&alphas, &ids_v);
        compute(py, move || delta::linear(xs, d, ws, bs, s, Alphas { values: alphas, per_row }, ids_v.as_deref(), o))
    })
}

/// Name of the content hash `delta_compress*` return.
#[pyfunction]
pub fn delta_hash_name() -> &'static str {
    delta::HASH_NAME
}

/// The content hash `delta_compress*` return for their base, of a CPU
/// float32/16/bfloat16 tensor (16 hex digits): how a restore checks that it
/// was given the base a delta was made against.
#[pyfunction]
pub fn delta_content_hash(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<String> {
    let x = Tensor::input("x", x)?;
    (|| {
        x.expect_cpu()?;
        x.expect_dtype(&[DType::F32, DType::F16, DType::BF16])
    })()
    .map_err(to_py)?;
    let h = with_float!(x.dtype, "x", T => {
        // SAFETY: a CPU tensor of dtype T, checked above.
        let xs = unsafe { x.slice::<T>() };
        compute(py, move || Ok::<_, Error>(delta::content_hash(xs)))
    })?;
    Ok(hex(h))
}
