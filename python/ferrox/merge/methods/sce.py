"""SCE (select, calculate, erase): keep the ``select_topk`` fraction of
elements whose task vectors vary most across the models (by the variance
over models, among elements where it is non-zero), weight each model by its
task vector's mean square (normalised to sum 1), erase the elements whose
sign disagrees with the elected sign, and average what is left. As mergekit
0.1.5 (the same torch operations in its order: a float32 merge gives its
bits); deterministic."""

from .base import Param, TensorMethod
from .della import sign_consensus


def sce_weights(tvs):
    import torch

    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:  # every task vector ~0: equal weights
        return torch.ones_like(w) / w.shape[0]
    return w / total


def sce_selection(tvs, fraction: float):
    """1 at the ``fraction`` of non-zero-variance elements with the largest
    variance over the models (torch.topk's choice among equal variances)."""
    import torch

    if fraction <= 0:
        return torch.zeros_like(tvs[0])
    if fraction >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def _sce_kernel(inputs, select_topk, int8_mask):
    import torch

    base = inputs.base
    others = inputs.non_base
    if not others:
        return base
    tvs = torch.stack([x - base for x in others], dim=0)
    if select_topk < 1:
        tvs = tvs * sce_selection(tvs, select_topk).unsqueeze(0)
    erase = sign_consensus(tvs)
    w = sce_weights(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    kept = w * erase
    return base + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


METHODS = [
    TensorMethod("sce", "https://arxiv.org/abs/2408.07990", _sce_kernel,
                 (Param("select_topk", "fraction", 1.0, doc="fraction of highest-variance elements kept"),
                  Param("int8_mask", "flag", False, doc="mergekit's mask dtype switch (no numerical effect)")),
                 base="required", min_inputs=1, shape_of_inputs="base_model and the models"),
]
