//! Scalar 1-D k-means (placeholder while the module is written).
