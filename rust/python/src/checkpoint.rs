//! Checkpoint headers (safetensors files, HF model folders, sharded indexes)
//! for `ferrox inspect`, read without touching tensor data.

use std::path::PathBuf;

use ferrox_core::checkpoint::Checkpoint;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

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
