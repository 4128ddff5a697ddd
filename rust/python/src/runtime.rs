//! Where compute runs: a rayon pool sized like torch's intra-op pool (or
//! FERROX_NUM_THREADS), entered with the GIL released and panics caught.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

use pyo3::prelude::*;
use rayon::ThreadPool;

use crate::error::{panic_to_py, to_py};

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

fn build_pool(n: usize) -> PyResult<Arc<ThreadPool>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("ferrox-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start {n} threads: {e}")))
}

fn pool() -> PyResult<Arc<ThreadPool>> {
    if let Some(p) = POOL.read().ok().and_then(|g| g.clone()) {
        return Ok(p);
    }
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let p = build_pool(n)?;
    if let Ok(mut g) = POOL.write() {
        *g = Some(p.clone());
    }
    Ok(p)
}

/// Sets the number of worker threads for all ferrox CPU kernels.
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err("num_threads: expected >= 1, got 0"));
    }
    let p = build_pool(n)?;
    if let Ok(mut g) = POOL.write() {
        *g = Some(p);
    }
    Ok(())
}

#[pyfunction]
pub fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// Runs `f` on the ferrox pool without the GIL; core errors and panics come
/// back as Python exceptions.
pub fn compute<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> ferrox_core::Result<T> + Send,
{
    let pool = pool()?;
    match py.detach(|| catch_unwind(AssertUnwindSafe(|| pool.install(f)))) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(e)),
        Err(payload) => Err(panic_to_py(payload)),
    }
}

/// Test-only hook: panics inside `compute` so tests can see that a panic
/// surfaces as `ferrox.InternalError`, not an abort.
#[pyfunction]
pub fn _debug_panic(py: Python<'_>, message: String) -> PyResult<()> {
    compute(py, move || -> ferrox_core::Result<()> { panic!("{message}") })
}
