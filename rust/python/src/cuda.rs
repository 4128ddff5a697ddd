//! CUDA runtime status for `ferrox doctor` and the tests: driver, devices,
//! and an NVRTC compile of every ferrox kernel (works without a GPU).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::runtime::compute;

#[pyfunction]
pub fn cuda_driver_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let info = compute(py, ferrox_core::cuda::driver_info)?;
    let out = PyDict::new(py);
    out.set_item("driver_version", info.driver_version)?;
    out.set_item("device_count", info.device_count)?;
    let devices = PyList::empty(py);
    for d in &info.devices {
        let dd = PyDict::new(py);
        dd.set_item("ordinal", d.ordinal)?;
        dd.set_item("name", &d.name)?;
        dd.set_item("compute_capability", d.compute_capability)?;
        dd.set_item("total_mem", d.total_mem)?;
        devices.append(dd)?;
    }
    out.set_item("devices", devices)?;
    Ok(out)
}

/// Compiles every kernel source for `arch` (e.g. "sm_90"); returns NVRTC's
/// version and the PTX size per source.
#[pyfunction]
pub fn nvrtc_check<'py>(py: Python<'py>, arch: String) -> PyResult<Bound<'py, PyDict>> {
    let report = compute(py, move || ferrox_core::cuda::nvrtc_check(&arch))?;
    let out = PyDict::new(py);
    out.set_item("version", report.version)?;
    out.set_item("code_bytes", report.code_bytes.clone())?;
    Ok(out)
}
