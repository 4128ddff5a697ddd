//! Codebook quantization (see `ferrox_core::codebook`): scalar and vector
//! k-means, the exact 1-D optimum, assignment to packed codes, decode, and
//! per-row statistics for grouping. CPU tensors; the GIL is released.

use ferrox_core::codebook::{self, kmeans as km, Layout, Method, Options};
use ferrox_core::{DType, Error};
use pyo3::prelude::*;

use crate::error::to_py;
use crate::runtime::compute;
use crate::tensor::Tensor;
use crate::with_float;

type Res<T> = std::result::Result<T, Error>;

fn expect_shape(t: &Tensor<'_>, want: &[usize]) -> Res<()> {
    if t.shape != want {
        return Err(Error::Shape(format!("{}: expected shape {:?}, got {:?}", t.name, want, t.shape)));
    }
    Ok(())
}

fn float_input<'py>(name: &'static str, obj: &Bound<'py, PyAny>) -> PyResult<Tensor<'py>> {
    let t = Tensor::input(name, obj)?;
    (|| {
        t.expect_cpu()?;
        t.expect_dtype(&[DType::F32, DType::F16, DType::BF16])
    })()
    .map_err(to_py)?;
    Ok(t)
}

/// A small CPU tensor of `dtype` copied out (offsets, permutations, weights).
fn small<'py, E: Copy>(name: &'static str, obj: &Bound<'py, PyAny>, dtype: DType) -> PyResult<Vec<E>> {
    let t = Tensor::input(name, obj)?;
    (|| {
        t.expect_cpu()?;
        t.expect_dtype(&[dtype])
    })()
    .map_err(to_py)?;
    // SAFETY: a CPU tensor of `dtype` (= E), checked above.
    Ok(unsafe { t.slice::<E>() }.to_vec())
}

fn read_col_weight(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<f32>>> {
    obj.map(|o| small::<f32>("col_weight", o, DType::F32)).transpose()
}

fn output<'py>(name: &'static str, obj: &Bound<'py, PyAny>, dtype: DType, shape: &[usize], inputs: &[&Tensor<'_>]) -> PyResult<Tensor<'py>> {
    let t = Tensor::output(name, obj)?;
    (|| {
        t.expect_cpu()?;
        t.expect_dtype(&[dtype])?;
        expect_shape(&t, shape)?;
        for i in inputs {
            t.check_alias(i, false)?;
        }
        Ok(())
    })()
    .map_err(to_py)?;
    Ok(t)
}

/// Scalar k-means over all elements of `x` (rows along its last dim;
/// `col_weight` float32 [row_len] weights each column): writes the `k`
/// sorted codewords into `out` (float32 [k]). `method`: "auto" (exact DP
/// when k·distinct ≤ 2^20, else DP on coarse bins refined by Lloyd),
/// "lloyd" (from weighted quantiles) or "exact". Returns (objective,
/// total_weight, iterations, history, exact).
#[pyfunction]
#[pyo3(signature = (x, k, out, col_weight=None, method="auto", max_iter=300))]
#[allow(clippy::type_complexity)]
pub fn codebook_kmeans(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    k: usize,
    out: &Bound<'_, PyAny>,
    col_weight: Option<&Bound<'_, PyAny>>,
    method: &str,
    max_iter: usize,
) -> PyResult<(f64, f64, usize, Vec<f64>, bool)> {
    let x = float_input("x", x)?;
    let method = Method::parse(method).map_err(to_py)?;
    let out = output("out", out, DType::F32, &[k], &[&x])?;
    let w = read_col_weight(col_weight)?;
    let row_len = x.row_len().max(1);
    let rows: Vec<usize> = (0..x.numel() / row_len).collect();
    let s = with_float!(x.dtype, "x", T => {
        // SAFETY: a CPU float tensor of dtype T, checked above.
        let xs = unsafe { x.slice::<T>() };
        compute(py, || codebook::kmeans(xs, row_len, &rows, w.as_deref(), k, method, max_iter))
    })?;
    // SAFETY: float32 [k] CPU tensor, checked above.
    unsafe { out.slice_mut::<f32>() }.copy_from_slice(&s.codebook);
    Ok((s.objective, s.total_weight, s.iterations, s.history, s.exact))
}

/// Vector k-means: `x` [rows, row_len] cut into sub-vectors of `d` columns,
/// `k` codewords written to `out` (float32 [k, d]). Returns (objective,
/// total_weight, iterations, history).
#[pyfunction]
#[pyo3(signature = (x, d, k, out, col_weight=None, seed=0, max_iter=25, tol=1e-6))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn codebook_kmeans_vec(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    d: usize,
    k: usize,
    out: &Bound<'_, PyAny>,
    col_weight: Option<&Bound<'_, PyAny>>,
    seed: u64,
    max_iter: usize,
    tol: f64,
) -> PyResult<(f64, f64, usize, Vec<f64>)> {
    let x = float_input("x", x)?;
    let out = output("out", out, DType::F32, &[k, d], &[&x])?;
    let w = read_col_weight(col_weight)?;
    let row_len = x.row_len().max(1);
    let rows: Vec<usize> = (0..x.numel() / row_len).collect();
    let s = with_float!(x.dtype, "x", T => {
        // SAFETY: a CPU float tensor of dtype T, checked above.
        let xs = unsafe { x.slice::<T>() };
        compute(py, || codebook::kmeans_vec(xs, row_len, d, &rows, w.as_deref(), k, seed, max_iter, tol))
    })?;
    // SAFETY: float32 [k, d] CPU tensor, checked above.
    unsafe { out.slice_mut::<f32>() }.copy_from_slice(&s.codebook);
    Ok((s.objective, s.total_weight, s.iterations, s.history))
}

/// The exact optimal 1-D k-means of values `x` (float32 [n]) with
/// per-element weights `w` (float32 [n], > 0): (sorted codewords as f64,
/// the optimal Σ w (x − c)²). A test reference (O(k n log n)).
#[pyfunction]
pub fn codebook_exact_1d(py: Python<'_>, x: &Bound<'_, PyAny>, w: &Bound<'_, PyAny>, k: usize) -> PyResult<(Vec<f64>, f64)> {
    let xs = small::<f32>("x", x, DType::F32)?;
    let ws = small::<f32>("w", w, DType::F32)?;
    compute(py, move || {
        km::check_k(k)?;
        ferrox_core::error::check_len("w", xs.len(), ws.len())?;
        if xs.iter().chain(&ws).any(|v| !v.is_finite()) || ws.iter().any(|&v| v <= 0.0) {
            return Err(Error::Value("x, w: expected finite values and weights > 0".into()));
        }
        let mut pairs: Vec<(f64, f64)> = xs.iter().zip(&ws).map(|(&a, &b)| (a as f64, b as f64)).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut p = km::Points::default();
        for (a, b) in pairs {
            if p.x.last() == Some(&a) {
                if let Some(last) = p.w.last_mut() {
                    *last += b;
                }
            } else {
                p.x.push(a);
                p.w.push(b);
            }
        }
        Ok(km::exact(&km::Prefix::new(&p), k))
    })
}

struct LayoutArgs {
    rows: usize,
    row_len: usize,
    offsets: Vec<i32>,
    perm: Option<Vec<i32>>,
}

fn layout_args(x_shape: &[usize], group_offsets: &Bound<'_, PyAny>, perm: Option<&Bound<'_, PyAny>>) -> PyResult<LayoutArgs> {
    if x_shape.len() != 2 {
        return Err(to_py(Error::Shape(format!("expected a 2-D weight [out, in], got shape {x_shape:?}"))));
    }
    let offsets = small::<i32>("group_offsets", group_offsets, DType::I32)?;
    let perm = perm.map(|p| small::<i32>("perm", p, DType::I32)).transpose()?;
    Ok(LayoutArgs { rows: x_shape[0], row_len: x_shape[1], offsets, perm })
}

impl LayoutArgs {
    fn layout(&self, bits: u32, d: usize) -> Layout<'_> {
        Layout { rows: self.rows, row_len: self.row_len, bits, d, perm: self.perm.as_deref(), group_offsets: &self.offsets }
    }
}

fn packed_shape(l: &Layout<'_>) -> Res<Vec<usize>> {
    l.check()?;
    Ok(vec![l.rows, l.packed_row()])
}

/// Quantizes `x` [out, in]: for each group g of permuted rows
/// (`group_offsets` int32 [G+1]; permuted row r = original row perm[r],
/// `perm` int32 [out] or None) k-means with 2^bits codewords of
/// `vector_dim` values into `codebooks_out` (float32 [G, 2^bits,
/// vector_dim]) and the packed codes into `codes_out` (uint8 [out,
/// packed_row_bytes(in / vector_dim, bits)]). Returns per group
/// (objective, total_weight, iterations).
#[pyfunction]
#[pyo3(signature = (x, bits, vector_dim, group_offsets, codebooks_out, codes_out, perm=None, col_weight=None, method="auto", max_iter=300, seed=0, tol=1e-6))]
#[allow(clippy::too_many_arguments)]
pub fn codebook_quantize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    bits: u32,
    vector_dim: usize,
    group_offsets: &Bound<'_, PyAny>,
    codebooks_out: &Bound<'_, PyAny>,
    codes_out: &Bound<'_, PyAny>,
    perm: Option<&Bound<'_, PyAny>>,
    col_weight: Option<&Bound<'_, PyAny>>,
    method: &str,
    max_iter: usize,
    seed: u64,
    tol: f64,
) -> PyResult<Vec<(f64, f64, usize)>> {
    let x = float_input("x", x)?;
    let method = Method::parse(method).map_err(to_py)?;
    let la = layout_args(&x.shape, group_offsets, perm)?;
    let l = la.layout(bits, vector_dim);
    let pshape = packed_shape(&l).map_err(to_py)?;
    let cb = output("codebooks_out", codebooks_out, DType::F32, &[l.groups(), l.k(), vector_dim], &[&x])?;
    let codes = output("codes_out", codes_out, DType::U8, &pshape, &[&x, &cb])?;
    let w = read_col_weight(col_weight)?;
    let opts = Options { method, max_iter, seed, tol };
    with_float!(x.dtype, "x", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (xs, c, o) = unsafe { (x.slice::<T>(), cb.slice_mut::<f32>(), codes.slice_mut::<u8>()) };
        compute(py, || codebook::quantize(xs, &l, w.as_deref(), opts, c, o))
    })
}

/// Packed codes of `x` [out, in] against given codebooks (float32 [G,
/// 2^bits, vector_dim]; scalar ones sorted ascending) into `out` (uint8
/// [out, packed row]): scalar values by midpoint bucketization (ties to the
/// lower codeword), vectors by nearest weighted distance.
#[pyfunction]
#[pyo3(signature = (x, codebooks, group_offsets, bits, vector_dim, out, perm=None, col_weight=None))]
#[allow(clippy::too_many_arguments)]
pub fn codebook_assign(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    codebooks: &Bound<'_, PyAny>,
    group_offsets: &Bound<'_, PyAny>,
    bits: u32,
    vector_dim: usize,
    out: &Bound<'_, PyAny>,
    perm: Option<&Bound<'_, PyAny>>,
    col_weight: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let x = float_input("x", x)?;
    let cbs = small::<f32>("codebooks", codebooks, DType::F32)?;
    let la = layout_args(&x.shape, group_offsets, perm)?;
    let l = la.layout(bits, vector_dim);
    let pshape = packed_shape(&l).map_err(to_py)?;
    let codes = output("out", out, DType::U8, &pshape, &[&x])?;
    let w = read_col_weight(col_weight)?;
    with_float!(x.dtype, "x", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (xs, o) = unsafe { (x.slice::<T>(), codes.slice_mut::<u8>()) };
        compute(py, || codebook::assign(xs, &l, &cbs, w.as_deref(), o))
    })
}

/// Decodes packed codes (uint8 [out, packed row]) into `out` (float [out,
/// in], any float dtype) in the original row order: out[perm[r]] =
/// row_scale[r] · codebooks[g(r), code].
#[pyfunction]
#[pyo3(signature = (codes, codebooks, group_offsets, bits, vector_dim, out, perm=None, row_scale=None))]
#[allow(clippy::too_many_arguments)]
pub fn codebook_decode(
    py: Python<'_>,
    codes: &Bound<'_, PyAny>,
    codebooks: &Bound<'_, PyAny>,
    group_offsets: &Bound<'_, PyAny>,
    bits: u32,
    vector_dim: usize,
    out: &Bound<'_, PyAny>,
    perm: Option<&Bound<'_, PyAny>>,
    row_scale: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let codes = Tensor::input("codes", codes)?;
    let cbs = small::<f32>("codebooks", codebooks, DType::F32)?;
    let out = Tensor::output("out", out)?;
    let la = layout_args(&out.shape, group_offsets, perm)?;
    let l = la.layout(bits, vector_dim);
    let scale = row_scale.map(|s| small::<f32>("row_scale", s, DType::F32)).transpose()?;
    (|| {
        codes.expect_cpu()?;
        codes.expect_dtype(&[DType::U8])?;
        expect_shape(&codes, &packed_shape(&l)?)?;
        out.expect_cpu()?;
        out.check_alias(&codes, false).map(|_| ())
    })()
    .map_err(to_py)?;
    with_float!(out.dtype, "out", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (c, o) = unsafe { (codes.slice::<u8>(), out.slice_mut::<T>()) };
        compute(py, || codebook::decode(c, &l, &cbs, scale.as_deref(), o))
    })
}

/// Per-row statistics of `x` [out, in] into `out` (float32 [out, 3]):
/// std, max|w| / std, kurtosis (m4 / m2²); zeros for a constant row.
#[pyfunction]
pub fn codebook_row_stats(py: Python<'_>, x: &Bound<'_, PyAny>, out: &Bound<'_, PyAny>) -> PyResult<()> {
    let x = float_input("x", x)?;
    if x.shape.len() != 2 {
        return Err(to_py(Error::Shape(format!("x: expected a 2-D weight [out, in], got shape {:?}", x.shape))));
    }
    let o = output("out", out, DType::F32, &[x.shape[0], 3], &[&x])?;
    let row_len = x.shape[1];
    with_float!(x.dtype, "x", T => {
        // SAFETY: dtypes, devices, shapes and aliasing checked above.
        let (xs, os) = unsafe { (x.slice::<T>(), o.slice_mut::<f32>()) };
        compute(py, || codebook::row_stats(xs, row_len, os))
    })
}
