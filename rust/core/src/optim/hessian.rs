//! Fused state updates of the Hessian-based optimizers (SophiaG/H,
//! AdaHessian).
