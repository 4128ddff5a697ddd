"""Data importance: which retrieval-corpus items help a retrieval-augmented
model and which hurt it.

``multilinear_gradient`` is the exact gradient of the multilinear extension
of a top-k additive utility in the items' existence probabilities (a dynamic
program in the Rust core); ``sampled_gradient`` its (ε, δ) Monte-Carlo
estimate; ``learn_importance`` runs projected gradient ascent on the
probabilities (also in ragbooster's list-of-dicts form); ``prune_lowest``,
``reweight_scores`` and ``rerank`` turn the learned weights into a smaller
corpus or a new retrieval order. ``project`` (an implicit seeded Rademacher
projection) and ``TRAKer`` do TRAK-style gradient-sketch attribution. Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "multilinear_gradient": "mle", "sampled_gradient": "mle", "sample_count": "mle",
    "learn_importance": "mle", "group_gradient": "mle",
    "prune_lowest": "mle", "reweight_scores": "mle", "rerank": "mle",
    "project": "trak", "TRAKer": "trak", "margin_output": "trak", "margin_out_to_loss": "trak",
    "module_seed": "trak",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
