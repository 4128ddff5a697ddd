//! Checkpoint headers (safetensors files, HF model folders, sharded indexes)
//! for `ferrox inspect`, read without touching tensor data; and the one reader
//! of tensor bytes (`read_tensor_into`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use ferrox_core::checkpoint::{read_file_bytes, Checkpoint};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyByteArrayMethods, PyDict, PyList, PyMemoryView};

use crate::error::{panic_to_py, to_py};
use crate::runtime::compute;

/// {"root", "index", "files": [{"path", "metadata"}], "tensors": [{"name",
/// "dtype", "shape", "file", "nbytes", "data_start"}]} in file and offset order.
#[pyfunction]
pub fn read_checkpoint<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let ckpt = compute(py, move || Checkpoint::open(&path))?;
    let out = PyDict::new(py);
    out.set_item("root", &ckpt.root)?;
    out.set_item("index", &ckpt.index)?;
    let files = PyList::empty(py);
    let tensors = PyList::empty(py);
    for f in &ckpt.files {
        let d = PyDict::new(py);
        d.set_item("path", &f.path)?;
        d.set_item("metadata", f.metadata.clone())?;
        files.append(d)?;
        for t in &f.tensors {
            let d = PyDict::new(py);
            d.set_item("name", &t.name)?;
            d.set_item("dtype", &t.dtype)?;
            d.set_item("shape", t.shape.clone())?;
            d.set_item("file", &t.file)?;
            d.set_item("nbytes", t.nbytes)?;
            d.set_item("data_start", t.data_start)?;
            tensors.append(d)?;
        }
    }
    out.set_item("files", files)?;
    out.set_item("tensors", tensors)?;
    Ok(out)
}

/// read_tensor_into(path, offset, buffer, name=None) -> None
///
/// Fills `buffer` (any writable C-contiguous buffer: a bytearray, a numpy
/// array of any dtype, a memoryview of either) completely with the bytes of
/// `path` from absolute byte `offset`, with positioned reads and the GIL
/// released. `name` (the tensor's) is added to errors. A file too short is a
/// ValueError naming the file; a path that is not a regular file is a
/// ValueError, raised before the file is opened for reading.
#[pyfunction]
#[pyo3(signature = (path, offset, buffer, name=None))]
pub fn read_tensor_into(py: Python<'_>, path: PathBuf, offset: u64, buffer: &Bound<'_, PyAny>, name: Option<String>) -> PyResult<()> {
    // The abi3 build (Python >= 3.9) has no buffer-protocol API, so a
    // memoryview checks the buffer and pins it while we read without the GIL
    // (a bytearray cannot be resized while a view of it exists); the address
    // is the bytearray's own, or else what ctypes sees through the buffer.
    let view = PyMemoryView::from(buffer)
        .map_err(|_| PyTypeError::new_err(format!("buffer: expected a writable buffer (bytearray, numpy array), got {}", type_name(buffer))))?;
    let readonly: bool = view.getattr("readonly")?.extract()?;
    let contiguous: bool = view.getattr("c_contiguous")?.extract()?;
    let nbytes: usize = view.getattr("nbytes")?.extract()?;
    if readonly || !contiguous {
        return Err(PyValueError::new_err(format!(
            "buffer: expected a writable C-contiguous buffer, got a {} {}",
            if readonly { "read-only" } else { "non-contiguous" },
            type_name(buffer)
        )));
    }
    let mut _pin = None;
    let addr: usize = if let Ok(ba) = buffer.cast::<PyByteArray>() {
        ba.data() as usize
    } else if nbytes == 0 {
        0
    } else {
        let ctypes = py.import("ctypes")?;
        // A c_char over the first byte: holds its own export of the buffer.
        let first = ctypes.getattr("c_char")?.call_method1("from_buffer", (&view,))?;
        let addr = ctypes.call_method1("addressof", (&first,))?.extract()?;
        _pin = Some(first);
        addr
    };
    let result = py.detach(move || {
        catch_unwind(AssertUnwindSafe(|| {
            let buf: &mut [u8] = if nbytes == 0 {
                &mut []
            } else {
                // SAFETY: `addr` is the first byte of a writable, C-contiguous
                // buffer of `nbytes` bytes, kept alive and unresizable by
                // `view` until after this closure returns.
                unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, nbytes) }
            };
            read_file_bytes(&path, offset, buf, name.as_deref())
        }))
    });
    drop(_pin);
    drop(view);
    match result {
        Ok(r) => r.map_err(to_py),
        Err(payload) => Err(panic_to_py(payload)),
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".to_string())
}
