//! Bindings of `ferrox_core::optim`: one file per optimizer family.

pub mod hessian;
pub mod mezo;
pub mod mkor;
