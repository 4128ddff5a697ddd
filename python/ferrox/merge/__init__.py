"""Model merging: task vectors, TIES, DARE, Model Breadcrumbs, aTLAS and
weight-matching alignment, with streaming checkpoint merges.

``merge_tensors`` merges one tensor in a single fused Rust pass (no N×n
temporaries, exact thresholds by selection, Philox DARE masks);
``merge_checkpoints`` streams whole checkpoints chunk by chunk from disk;
``METHODS`` is the one registry of merge methods; ``ATLAS`` learns
per-block task-vector coefficients with autograd.
"""

from .atlas import ATLAS, fit_atlas, prediction_entropy, train_atlas
from .checkpoints import MergeError, MergeReport, load_state_dict, merge_checkpoints
from .config import ConfigError, MergeConfig, load_config, parse_config
from .methods import METHODS, MergeMethod, get_method
from .permute import PermutationSpec, apply_permutation, invert_permutations, mlp_spec, weight_matching
from .task_vector import TaskVector
from .tensor import SPARSIFIERS, merge_tensors, rng_stream, sparsify

__all__ = [
    "ATLAS", "fit_atlas", "prediction_entropy", "train_atlas",
    "PermutationSpec", "apply_permutation", "invert_permutations", "mlp_spec", "weight_matching",
    "METHODS", "TaskVector", "ConfigError", "MergeConfig", "MergeError", "MergeMethod", "MergeReport",
    "SPARSIFIERS", "get_method", "load_config", "load_state_dict", "merge_checkpoints", "merge_tensors", "parse_config",
    "rng_stream", "sparsify",
]
