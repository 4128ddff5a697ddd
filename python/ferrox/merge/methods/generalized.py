"""Generalized task arithmetic: every method here is data (which sparsifier,
whether TIES sign election runs, mergekit's defaults), run by the Rust core:

    merged = base + λ · Σ_i w_i · sparsify_i(θ_i − base)   (÷ Σ w_i when normalize)

with TIES replacing the plain sum by the sign-elected disjoint sum. ``linear``
is the same with a zero base (so τ_i = θ_i) and normalisation on.
"""

from dataclasses import dataclass
from typing import Tuple

from .base import MergeMethod, Param, _f32_sum

#: mergekit's per-model defaults (density 1 keeps everything; gamma 0.01).
MODEL_DEFAULTS = {"weight": None, "density": 1.0, "gamma": 0.01}


@dataclass(frozen=True)
class GeneralizedTaskArithmetic(MergeMethod):
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

    in_core = True

    @property
    def base_policy(self) -> str:
        return "origin" if self.needs_base else "input"

    @property
    def params(self) -> Tuple[Param, ...]:
        # Every GTA method accepts the same keys (mergekit's shared set); the
        # sparsifier decides which of them change the result.
        return (
            Param("weight", "number", per_model=True, doc="the model's coefficient"),
            Param("density", "fraction", MODEL_DEFAULTS["density"], per_model=True, doc="kept fraction"),
            Param("gamma", "fraction", MODEL_DEFAULTS["gamma"], per_model=True,
                  doc="fraction of largest-|delta| outliers Breadcrumbs drops"),
            Param("normalize", "flag", self.normalize, doc="divide by the sum of the weights"),
            Param("rescale", "flag", self.rescale, doc="rescale the kept values by sum|tau| / sum|kept|"),
            Param("lambda", "number", 1.0, doc="scale of the merged task vector"),
            Param("granularity", "choice", "tensor", choices=("tensor", "row"), doc="rank per tensor or per row"),
            Param("seed", "integer", 0, doc="DARE's Philox seed"),
            Param("int8_mask", "flag", False, doc="mergekit's mask dtype switch (no numerical effect)"),
        )

    def check_params(self, shared, per_model) -> None:
        if shared.get("normalize") and not self.needs_base:
            weights = [m["weight"] for m in per_model]
            total = _f32_sum(weights)
            # The core would fall back to dividing by 1 here, mergekit to dividing by ~0 (inf/NaN): neither is a merge.
            if abs(total) < 1e-8:
                raise ValueError(f"parameters: {self.name} with normalize: true divides by the sum of the weights, "
                                 f"and the weights {weights} sum to {total:g}; set normalize: false or change the "
                                 f"weights")


_G = GeneralizedTaskArithmetic
METHODS = [
    _G("linear", "none", False, True, False, False, ("weight",), "https://arxiv.org/abs/2203.05482"),
    _G("task_arithmetic", "none", False, False, False, True, ("weight",), "https://arxiv.org/abs/2212.04089"),
    _G("ties", "magnitude", True, True, False, True, ("weight", "density"), "https://arxiv.org/abs/2306.01708"),
    _G("dare_linear", "random", False, False, True, True, ("weight", "density"), "https://arxiv.org/abs/2311.03099"),
    _G("dare_ties", "random", True, False, True, True, ("weight", "density"), "https://arxiv.org/abs/2311.03099"),
    _G("breadcrumbs", "band", False, False, False, True, ("weight", "density", "gamma"),
       "https://arxiv.org/abs/2312.06795"),
    _G("breadcrumbs_ties", "band", True, False, False, True, ("weight", "density", "gamma"),
       "https://arxiv.org/abs/2312.06795"),
]
