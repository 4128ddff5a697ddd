//! `ferrox._core`: the thin PyO3 layer over `ferrox-core`. Each file wraps
//! one capability: it converts tensors (`tensor.rs`), releases the GIL and
//! catches panics (`runtime.rs`) and maps errors (`error.rs`); algorithms
//! live in the core crate.

use pyo3::prelude::*;

mod checkpoint;
mod codebook;
mod codebook_linear;
mod cuda;
mod della;
mod delta;
mod error;
mod importance;
mod interp;
mod merge;
mod ops;
mod optim;
mod pack;
mod philox;
mod runtime;
mod select;
mod tensor;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("InternalError", py.get_type::<error::InternalError>())?;
    m.add("CudaError", py.get_type::<error::CudaError>())?;
    m.add("BUILD_INFO", build_info())?;
    m.add_function(wrap_pyfunction!(runtime::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(runtime::_debug_panic, m)?)?;
    m.add_function(wrap_pyfunction!(ops::axpby, m)?)?;
    m.add_function(wrap_pyfunction!(select::kth_largest_abs, m)?)?;
    m.add_function(wrap_pyfunction!(select::band_mask, m)?)?;
    m.add_function(wrap_pyfunction!(select::global_top_mask, m)?)?;
    m.add_function(wrap_pyfunction!(merge::merge_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(merge::merge_tensor_files, m)?)?;
    m.add_function(wrap_pyfunction!(interp::first_nonfinite, m)?)?;
    m.add_function(wrap_pyfunction!(interp::interp_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(interp::interp_tensor_files, m)?)?;
    m.add_function(wrap_pyfunction!(della::della_merge, m)?)?;
    m.add_function(wrap_pyfunction!(della::magprune_keep, m)?)?;
    m.add_function(wrap_pyfunction!(pack::packed_row_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(pack::pack_signs, m)?)?;
    m.add_function(wrap_pyfunction!(pack::unpack_signs, m)?)?;
    m.add_function(wrap_pyfunction!(pack::pack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(pack::unpack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(philox::philox4x32_10, m)?)?;
    m.add_function(wrap_pyfunction!(philox::philox_uniform, m)?)?;
    m.add_function(wrap_pyfunction!(philox::philox_normal, m)?)?;
    m.add_function(wrap_pyfunction!(philox::philox_bits, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint::read_tensor_into, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_driver_info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::nvrtc_check, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_compress_files, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_compress, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_restore, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_linear, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_matmul_multi, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_hash_name, m)?)?;
    m.add_function(wrap_pyfunction!(delta::delta_content_hash, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_kmeans_vec, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_exact_1d, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_assign, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_decode, m)?)?;
    m.add_function(wrap_pyfunction!(codebook::codebook_row_stats, m)?)?;
    m.add_function(wrap_pyfunction!(codebook_linear::codebook_linear, m)?)?;
    m.add_function(wrap_pyfunction!(importance::mle_gradient, m)?)?;
    m.add_function(wrap_pyfunction!(importance::mle_sampled_gradient, m)?)?;
    m.add_function(wrap_pyfunction!(importance::mle_sample_count, m)?)?;
    m.add_function(wrap_pyfunction!(importance::mle_learn, m)?)?;
    m.add_function(wrap_pyfunction!(importance::importance_project, m)?)?;
    m.add_function(wrap_pyfunction!(optim::hessian::sophia_update, m)?)?;
    m.add_function(wrap_pyfunction!(optim::hessian::adahessian_update, m)?)?;
    m.add_function(wrap_pyfunction!(optim::hessian::optim_rademacher, m)?)?;
    m.add_function(wrap_pyfunction!(optim::hessian::optim_all_finite, m)?)?;
    m.add_function(wrap_pyfunction!(optim::mkor::mkor_rank1_update, m)?)?;
    m.add_function(wrap_pyfunction!(optim::mezo::mezo_pass, m)?)?;
    Ok(())
}

fn build_info() -> String {
    format!(
        "ferrox-core {} ({} build; CUDA via cudarc, loaded at run time)",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) { "debug" } else { "release" },
    )
}
