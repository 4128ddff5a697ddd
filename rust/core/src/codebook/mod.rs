//! Codebook weight quantization: scalar and vector (product) k-means
//! codebooks, assignment to packed codes, decode, and row grouping.
//!
//! Codes use the one layout of [`crate::pack`]. Everything here is
//! deterministic for a seed and any rayon thread count: parallel work is cut
//! into pieces that depend only on the input's shape, and partial sums are
//! combined in piece order.

pub mod kmeans;

pub mod linear;
#[cfg(feature = "cuda")]
pub mod cuda;
