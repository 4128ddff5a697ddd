//! Codebook weight quantization: scalar and vector (product) k-means
//! codebooks, assignment to packed codes, decode, and row grouping.
//!
//! Codes use the one layout of [`crate::pack`]. Everything here is
//! deterministic for a seed and any rayon thread count: parallel work is cut
//! into pieces that depend only on the input's shape, and partial sums are
//! combined in piece order.

pub mod assign;
pub mod kmeans;
pub mod vector;

#[cfg(test)]
mod tests;

pub use assign::{assign, decode, quantize, row_stats, Layout, Options};
pub use kmeans::{kmeans, Method, Scalar};
pub use vector::{kmeans_vec, VectorCodebook};

pub mod linear;
#[cfg(feature = "cuda")]
pub mod cuda;
