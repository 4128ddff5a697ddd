"""Merging one tensor (the unit every checkpoint merge streams through)."""

from typing import Optional, Sequence

import torch

from .. import _checks, _core
from ..cuda import stream_of
from .methods import GeneralizedTaskArithmetic, MergeMethod, get_method
from .methods.base import first_nonfinite
from .terms import GRANULARITIES, SPARSIFIERS, merge_terms, rng_stream, row_length  # noqa: F401


def merge_tensors(
    method,
    base: Optional[torch.Tensor],
    models: Sequence[torch.Tensor],
    *,
    weight=None,
    density=None,
    gamma=None,
    lam: float = 1.0,
    normalize: Optional[bool] = None,
    rescale: Optional[bool] = None,
    granularity: str = "tensor",
    seed: int = 0,
    tensor_name: str = "",
    check_finite: bool = True,
    out: Optional[torch.Tensor] = None,
    chunk_len: int = 0,
    **params,
) -> torch.Tensor:
    """Merges one tensor of several fine-tuned models.

    ``method`` is a registry name (``ferrox.merge.METHODS``) or a
    ``MergeMethod``. ``weight``/``density``/``gamma`` are a number or one
    value per model (mergekit's meaning: ``density`` is the kept fraction,
    ``gamma`` the fraction of largest-|τ| outliers Breadcrumbs drops).
    ``normalize``/``rescale`` default to the method's mergekit defaults.
    ``granularity="row"`` ranks |τ| within each row of the last dimension
    (the Breadcrumbs paper); ``"tensor"`` over the whole tensor (mergekit).
    ``chunk_len`` (elements, 0 = default) only changes how the work is
    streamed, never the result. CUDA tensors merge in ferrox's kernels on
    torch's current stream, bitwise the CPU result (per tensor or per row),
    with their scratch taken from torch's allocator.

    Methods outside generalized task arithmetic (``slerp``, ``nuslerp``,
    ``multislerp``, ``karcher``, ``nearswap``, ``model_stock``, ``della``,
    ``della_linear``, ``sce``, ``passthrough``) take their global parameters
    as keywords (``t=0.3``, ``filter_wise=True``; mergekit's defaults
    otherwise) and their per-model parameters (``weight``, ``density``,
    della's ``epsilon``) as a number or one value per model (della's masks
    are seeded by ``seed`` and ``tensor_name``). Their
    inputs are ``base`` (when given) then ``models``; they compute in float32
    and return the inputs' dtype (``out``, when given, receives the result).
    """
    m: MergeMethod = method if isinstance(method, MergeMethod) else get_method(method)
    if not m.in_core:
        return _merge_torch(m, base, list(models), weight=weight, check_finite=check_finite, out=out,
                            tensor_name=tensor_name,
                            unused=dict(density=density, gamma=gamma, lam=lam, normalize=normalize, rescale=rescale,
                                        granularity=granularity, seed=seed, chunk_len=chunk_len), params=params)
    if params:
        raise ValueError(f"{sorted(params)[0]}: not a parameter of {m.name} (it reads weight, density, gamma, "
                         f"lam, normalize, rescale, granularity, seed)")
    models = list(models)
    if not models:
        raise ValueError("models: expected at least one model, got none")
    for i, t in enumerate(models):
        _checks.tensor(f"models[{i}]", t)
    if m.needs_base:
        if base is None:
            raise ValueError(f"base: method {m.name!r} needs a base model")
        _checks.tensor("base", base)
    else:
        base = torch.zeros_like(models[0])
    terms = merge_terms(m, len(models), weight=weight, density=density, gamma=gamma, seed=seed,
                        tensor_name=tensor_name)
    row_len = row_length(granularity, tuple(base.shape))
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    _core.merge_tensor(
        out, base, models, *terms, m.consensus,
        m.normalize if normalize is None else bool(normalize),
        m.rescale if rescale is None else bool(rescale),
        float(lam), row_len, check_finite, chunk_len, stream_of(base),
    )
    return out


_GTA_DEFAULTS = dict(density=None, gamma=None, lam=1.0, normalize=None, rescale=None, granularity="tensor", seed=0,
                    chunk_len=0)


def _merge_torch(m, base, models, *, weight, check_finite, out, unused, params, tensor_name=""):
    if not models:
        raise ValueError("models: expected at least one model, got none")
    # Per-model values a torch method declares (della's density) are read like weight.
    lists = {k: unused.pop(k) for k in ("density", "gamma") if k in m.model_params and unused.get(k) is not None}
    # Shared GTA keywords a torch method declares (della's seed, normalize, rescale, lambda) are its parameters.
    params = dict(params)
    # Other per-model parameters (della's epsilon) come as keywords: a number or one value per model.
    for key in [k for k in params if k in m.model_params and k != "weight"]:
        lists[key] = params.pop(key)
    for key in list(unused):
        name = "lambda" if key == "lam" else key
        declared = m.param(name)
        if declared is not None and not declared.per_model:
            value = unused.pop(key)
            if value is not None and name not in params:
                params[name] = value
    for key, value in unused.items():
        if value != _GTA_DEFAULTS[key]:
            raise ValueError(f"{key}: {m.name} does not read {key} (its parameters: "
                             f"{[p.name for p in m.params]})")
    tensors = ([] if base is None else [_checks.tensor("base", base)])
    tensors += [_checks.tensor(f"models[{i}]", t) for i, t in enumerate(models)]
    names = ([] if base is None else ["base"]) + [f"models[{i}]" for i in range(len(models))]
    if check_finite:
        for name, t in zip(names, tensors):
            j = first_nonfinite(t)
            if j is not None:
                raise ValueError(f"{name}: non-finite value {float(t.reshape(-1)[j])} at flat index {j}")
    base_index = None if base is None or m.base_policy == "input" else 0
    n_other = len(tensors) - (base_index is not None)
    if "weight" in m.model_params:
        if weight is None:
            raise ValueError(f"weight: {m.name} needs a weight per model")
        weights = [weight] * n_other if isinstance(weight, (int, float)) else list(weight)
        if len(weights) != n_other:
            raise ValueError(f"weight: expected {n_other} values (one per model), got {len(weights)}")
        per_model = [{"weight": w} for w in weights]
    elif weight is not None:
        raise ValueError(f"weight: {m.name} does not read per-model weights")
    else:
        per_model = [{} for _ in range(n_other)]
    for key, value in lists.items():
        values = [value] * n_other if isinstance(value, (int, float, bool)) else list(value)
        if len(values) != n_other:
            raise ValueError(f"{key}: expected {n_other} values (one per model), got {len(values)}")
        for pm, v in zip(per_model, values):
            pm[key] = v
    result = m.merge(tensors, base_index, params, per_model, tensor_name=tensor_name, out_dtype=tensors[0].dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def sparsify(
    tau: torch.Tensor,
    kind: str,
    *,
    density: float = 1.0,
    gamma: float = 0.01,
    granularity: str = "tensor",
    rescale: bool = False,
    seed: int = 0,
    tensor_name: str = "",
) -> torch.Tensor:
    """One task vector's tensor with a sparsifier applied, the same mask the
    merges use: ``"magnitude"`` keeps the max(1, ⌊density·n⌋) largest |τ|
    (TIES' trim), ``"band"`` drops the ⌊gamma·n⌋ largest and keeps the next
    ⌊density·n⌋ (Model Breadcrumbs: ``density`` = keep_frac, ``gamma`` =
    outlier_frac), ``"random"`` keeps each element with probability
    ``density`` (DARE; Philox keyed by ``seed`` and ``tensor_name``).
    Ranks are by |τ| with ties to the lower index, per tensor or per row of
    the last dimension. ``rescale`` multiplies the kept values by
    Σ|τ| / Σ|kept τ| (mergekit's rescale; DARE's unbiasing). Kept values are
    returned unchanged, dropped ones as zeros."""
    if kind not in SPARSIFIERS:
        raise ValueError(f"kind: expected one of {SPARSIFIERS}, got {kind!r}")
    _checks.tensor("tau", tau)
    # A one-model task arithmetic over a zero base is exactly the sparsified τ.
    m = GeneralizedTaskArithmetic(f"sparsify_{kind}", kind, consensus=False, normalize=False, rescale=rescale, needs_base=False,
                    model_params=("density", "gamma"), reference="")
    return merge_tensors(m, None, [tau], weight=1.0, density=density, gamma=gamma, granularity=granularity,
                         seed=seed, tensor_name=tensor_name)
