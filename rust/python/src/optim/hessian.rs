//! Bindings of `ferrox_core::optim::hessian`.
