"""What the Rust core takes for one tensor's merge besides the tensors: the
per-model weights and sparsifier specs, and the row length ranks are taken
within. No torch here: a streamed CPU merge never imports it."""

import hashlib

from .. import _checks
from ..dtypes import numel
from .methods import MergeMethod

GRANULARITIES = ("tensor", "row")
#: The sparsifiers every method is built from (``MergeMethod.sparsify``).
SPARSIFIERS = ("none", "magnitude", "band", "random")


def rng_stream(tensor_name: str, model_index: int) -> int:
    """The Philox stream of one model's DARE mask on one tensor: a stable
    hash, so masks do not depend on tensor order, threads or chunking."""
    digest = hashlib.blake2b(f"{tensor_name}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _per_model(name, value, n, default):
    if value is None:
        value = default
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} values (one per model), got {len(value)}")
    return value


def merge_terms(m: MergeMethod, n: int, *, weight=None, density=None, gamma=None, seed: int = 0,
                tensor_name: str = ""):
    """(weights, sparsifier specs) of n models, as the Rust core takes them."""
    weights = [_checks.finite("weight", w) for w in _per_model("weight", weight, n, 1.0)]
    densities = [_checks.fraction("density", d) for d in _per_model("density", density, n, 1.0)]
    gammas = [_checks.fraction("gamma", g) for g in _per_model("gamma", gamma, n, 0.01)]
    _checks.count("seed", seed, 0, 2**64 - 1)
    sparsify = [(m.sparsify, d, g, seed, rng_stream(tensor_name, i)) for i, (d, g) in enumerate(zip(densities, gammas))]
    return weights, sparsify


def row_length(granularity: str, shape: tuple) -> int:
    """The row length selection ranks within (0: the whole tensor)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    return shape[-1] if granularity == "row" and len(shape) > 0 and numel(shape) > 0 else 0
