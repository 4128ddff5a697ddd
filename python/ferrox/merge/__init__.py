"""Model merging: task vectors, TIES, DARE, Model Breadcrumbs, aTLAS and
weight-matching alignment, with streaming checkpoint merges.

``merge_tensors`` merges one tensor in a single fused Rust pass (no N×n
temporaries, exact thresholds by selection, Philox DARE masks);
``merge_checkpoints`` streams whole checkpoints chunk by chunk from disk;
``METHODS`` is the one registry of merge methods; ``ATLAS`` learns
per-block task-vector coefficients with autograd.

Names are imported on first use: a streamed CPU merge (config, checkpoints,
methods) runs without importing torch.
"""

from .._lazy import exports

_WHERE = {
    "ATLAS": "atlas", "fit_atlas": "atlas", "prediction_entropy": "atlas", "train_atlas": "atlas",
    "MergeError": "checkpoints", "MergeReport": "checkpoints", "load_state_dict": "checkpoints",
    "merge_checkpoints": "checkpoints",
    "ConfigError": "config", "MergeConfig": "config", "load_config": "config", "parse_config": "config",
    "METHODS": "methods", "MergeMethod": "methods", "get_method": "methods",
    "PermutationSpec": "permute", "apply_permutation": "permute", "invert_permutations": "permute",
    "mlp_spec": "permute", "weight_matching": "permute",
    "TaskVector": "task_vector",
    "SPARSIFIERS": "terms", "rng_stream": "terms",
    "merge_tensors": "tensor", "sparsify": "tensor",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
