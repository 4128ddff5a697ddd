//! Core errors -> Python exceptions. The class says what kind of mistake it
//! was (ValueError: shape/value, TypeError: dtype/device, RuntimeError: CUDA,
//! OSError: files); the message, built in the core, says which argument.

use ferrox_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

// A Rust panic is a ferrox bug, not a user error, but it must still reach
// Python as an ordinary Exception (pyo3's PanicException is a BaseException
// and would slip past `except Exception`).
create_exception!(ferrox, InternalError, PyRuntimeError, "A bug inside ferrox's Rust core (a caught panic).");
create_exception!(ferrox, CudaError, PyRuntimeError, "The CUDA driver, NVRTC or a ferrox kernel failed.");

pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Shape(_) | Error::Value(_) | Error::Format(_) => PyValueError::new_err(msg),
        Error::DType(_) | Error::Device(_) => PyTypeError::new_err(msg),
        Error::Cuda(_) => CudaError::new_err(msg),
        Error::Io { .. } => PyOSError::new_err(msg),
    }
}

pub fn panic_to_py(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_string());
    InternalError::new_err(format!(
        "internal error in ferrox's Rust core (please report it): {what}"
    ))
}
