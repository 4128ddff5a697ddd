//! ferrox-core: the Python-free algorithms behind ferrox.
//!
//! Every module here is plain Rust over slices, unit-tested with `cargo test`;
//! `rust/python` only converts tensors, releases the GIL and maps errors.

pub mod checkpoint;
pub mod codebook;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod delta;
pub mod dtype;
pub mod error;
pub mod importance;
pub mod merge;
pub mod ops;
pub mod optim;
pub mod pack;
pub mod philox;
pub mod select;
mod simd;
#[cfg(test)]
mod test_rng;

pub use dtype::{DType, Float};
pub use error::{Error, Result};
