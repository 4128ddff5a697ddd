//! Optimizer state updates: the elementwise parts of ferrox.optim's
//! optimizers (EMAs, clipping, weight decay, ...), one fused call over all
//! tensors of a parameter group. Deterministic for any thread count: every
//! element's update depends only on that element.

pub mod hessian;
#[cfg(feature = "cuda")]
pub mod hessian_cuda;
pub mod mkor;
pub mod mezo;
#[cfg(feature = "cuda")]
pub mod mezo_cuda;
#[cfg(feature = "cuda")]
pub mod mkor_cuda;
