"""Data importance: which retrieval-corpus items help a retrieval-augmented
model and which hurt it.

``multilinear_gradient`` is the exact gradient of the multilinear extension
of a top-k additive utility in the items' existence probabilities (a dynamic
program in the Rust core); ``sampled_gradient`` its (ε, δ) Monte-Carlo
estimate; ``learn_importance`` runs projected gradient ascent on the
probabilities (also in ragbooster's list-of-dicts form); ``prune_lowest``,
``reweight_scores`` and ``rerank`` turn the learned weights into a smaller
corpus or a new retrieval order. ``project`` (an implicit seeded Rademacher
projection) and ``TRAKer`` do TRAK-style gradient-sketch attribution.
``fit_datamodels``, ``datamodel_targets`` and ``dmm_unlearn`` unlearn a
forget set by datamodel matching, scored by ``klom`` (KL of margins against
retrained oracles). ``wagle_scores`` attributes the forget/retain trade-off
to weights, ``global_topk_mask`` keeps the top fraction over all tensors
(exact, in the Rust core) and ``masked_unlearn`` changes only those weights.
Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "multilinear_gradient": "mle", "sampled_gradient": "mle", "sample_count": "mle",
    "learn_importance": "mle", "group_gradient": "mle",
    "prune_lowest": "mle", "reweight_scores": "mle", "rerank": "mle",
    "project": "trak", "TRAKer": "trak", "margin_output": "trak", "margin_out_to_loss": "trak",
    "module_seed": "trak",
    "margins": "unlearn", "klom_scores": "unlearn", "klom": "unlearn", "fit_datamodels": "unlearn",
    "datamodel_targets": "unlearn", "dmm_unlearn": "unlearn",
    "loss_gradients": "wagle", "wagle_scores": "wagle", "global_topk_mask": "wagle", "masked_unlearn": "wagle",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
