"""The registry of merge methods: each is data (which sparsifier, whether
TIES sign election runs, mergekit's defaults), not code. The CLI, the config
loader and the docs all read ``METHODS``.

Every method is one parametrisation of generalized task arithmetic:

    merged = base + λ · Σ_i w_i · sparsify_i(θ_i − base)   (÷ Σ w_i when normalize)

with TIES replacing the plain sum by the sign-elected disjoint sum. ``linear``
is the same with a zero base (so τ_i = θ_i) and normalisation on.
"""

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class MergeMethod:
    name: str
    #: "none", "magnitude" (top-k by |τ|), "band" (Breadcrumbs), "random" (DARE)
    sparsify: str
    #: TIES sign election ("sum" consensus)
    consensus: bool
    #: mergekit's defaults for its shared parameters
    normalize: bool
    rescale: bool
    #: the method reads a base model (linear does not)
    needs_base: bool
    #: per-model parameters the method reads
    model_params: Tuple[str, ...]
    reference: str


_ALL = [
    MergeMethod("linear", "none", False, True, False, False, ("weight",), "https://arxiv.org/abs/2203.05482"),
    MergeMethod("task_arithmetic", "none", False, False, False, True, ("weight",), "https://arxiv.org/abs/2212.04089"),
    MergeMethod("ties", "magnitude", True, True, False, True, ("weight", "density"), "https://arxiv.org/abs/2306.01708"),
    MergeMethod("dare_linear", "random", False, False, True, True, ("weight", "density"), "https://arxiv.org/abs/2311.03099"),
    MergeMethod("dare_ties", "random", True, False, True, True, ("weight", "density"), "https://arxiv.org/abs/2311.03099"),
    MergeMethod("breadcrumbs", "band", False, False, False, True, ("weight", "density", "gamma"), "https://arxiv.org/abs/2312.06795"),
    MergeMethod("breadcrumbs_ties", "band", True, False, False, True, ("weight", "density", "gamma"), "https://arxiv.org/abs/2312.06795"),
]

METHODS: Dict[str, MergeMethod] = {m.name: m for m in _ALL}

#: mergekit's per-model defaults (density 1 keeps everything; gamma 0.01).
MODEL_DEFAULTS = {"weight": None, "density": 1.0, "gamma": 0.01}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"merge_method: unknown method {name!r}; ferrox supports {sorted(METHODS)}") from None
