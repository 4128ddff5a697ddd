//! Data importance for retrieval corpora: which corpus items help a
//! retrieval-augmented model and which hurt it.
//!
//! `mle` holds the multilinear-extension (MLE) importance of Lyu et al.
//! ("Improving Retrieval-Augmented Large Language Models via Data Importance
//! Learning"): every
//! corpus item exists independently with a probability, the model averages
//! the utilities of the top-k *existing* items of each query's ranking, and
//! the gradient of the expected utility in the probabilities (exact by a
//! dynamic program, or sampled with an (ε, δ) guarantee) drives projected
//! gradient ascent. Items that end with a low probability are the ones to
//! prune or down-weight.
//!
//! `project` holds the implicit seeded Rademacher projection of gradient
//! batches that TRAK-style attribution (`ferrox.importance.trak`) sketches
//! per-example gradients with.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mle;
pub mod project;

pub use mle::{learn_importance, multilinear_gradient, sampled_gradient, sample_count, GroupStep, Retrievals};
