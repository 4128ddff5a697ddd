"""Model merging: task vectors, TIES, DARE, Model Breadcrumbs (and, next,
aTLAS, weight matching and streaming checkpoint merges).

``merge_tensors`` merges one tensor in a single fused Rust pass (no N×n
temporaries, exact thresholds by selection, Philox DARE masks);
``METHODS`` is the one registry of merge methods.
"""

from .methods import METHODS, MergeMethod, get_method
from .tensor import merge_tensors, rng_stream

__all__ = ["METHODS", "MergeMethod", "get_method", "merge_tensors", "rng_stream"]
