"""Spherical interpolation: ``slerp`` (two models, a global t), ``nuslerp``
(two models weighted per model, optionally as task vectors from a base,
whole tensor, per row or per column) and ``multislerp`` (any number of models:
a weighted mean on the unit hypersphere through its tangent space).

Semantics, thresholds and the order of operations are mergekit 0.1.5's, so
a float32 merge by these torch functions gives its bits; torch is imported
only when a tensor is merged. A CPU merge by ``slerp`` runs its fused version
in the Rust core (``ferrox_core::merge::interp``): the same formula with the
norms and the dot summed in float64, so its coefficients can differ from
mergekit's in the last bits (tests/mergekit_parity.py states the bound).
"""

from .base import REQUIRED, Param, TensorMethod, _f32_sum

#: |cos θ| above this is treated as colinear: slerp falls back to lerp (mergekit's DOT_THRESHOLD).
DOT_THRESHOLD = 0.9995
#: norms at or below this are taken as 1 (mergekit's eps)
SLERP_EPS = 1e-8
#: mergekit takes each norm and the dot product over chunks of this many
#: elements (a norm of per-chunk norms, a sum of per-chunk sums); the same
#: chunks give the same rounding.
SLERP_CHUNK = 1 << 20


def slerp(t: float, v0, v1, dot_threshold: float = DOT_THRESHOLD, eps: float = SLERP_EPS):
    """Slerp from ``v0`` (t = 0) to ``v1`` (t = 1) over the flattened tensors,
    in float32: the angle between the directions, with a plain lerp when they
    are (anti)colinear and norms ≤ eps taken as 1. t = 0 and 1 give the inputs
    exactly (the coefficients are sin θ / sin θ = 1 and sin 0 = 0)."""
    import torch

    a = v0.reshape(1, -1).to(torch.float32)
    b = v1.reshape(1, -1).to(torch.float32)
    tt = torch.tensor([[t]], dtype=torch.float32, device=a.device)
    n = a.shape[1]
    if n == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    spans = [(s, min(n, s + SLERP_CHUNK)) for s in range(0, n, SLERP_CHUNK)]

    def norm(x):
        parts = torch.stack([torch.linalg.vector_norm(x[:, s:e], dim=1, keepdim=True) for s, e in spans])
        total = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(total > eps, total, 1)

    na, nb = norm(a), norm(b)
    # Directions first, then the dot: a raw dot of large weights could overflow.
    dot = torch.stack([((a[:, s:e] / na) * (b[:, s:e] / nb)).sum(dim=1, keepdim=True) for s, e in spans])
    dot = dot.sum(dim=0).clamp(-1, 1)
    lerp = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lerp, 0, dot))  # acos(0) on the lerp branch keeps sin θ away from 0
    sin_theta = torch.sin(theta)
    ca = torch.where(lerp, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    cb = torch.where(lerp, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for s, e in spans:
        out[:, s:e] = ca * a[:, s:e] + cb * b[:, s:e]
    return out.reshape(v0.shape)


def _slerp_kernel(inputs, t):
    return slerp(t, inputs.base, inputs.non_base[0])


def _slerp_native(shape, t):
    return dict(method="slerp", t=t, dot_threshold=DOT_THRESHOLD, eps=SLERP_EPS)


def nuslerp(t: float, v0, v1, dim: int = -1, eps: float = 1e-8, flatten: bool = False):
    """Slerp of ``v0``→``v1`` by ``t`` along ``dim`` (each vector along it on
    its own), or over the whole flattened tensor. Unlike ``slerp`` the inputs
    keep their norms (sin-weighted sum of the raw vectors) and only exactly
    colinear vectors (1 − cos² ≤ eps²) lerp."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _nuslerp_kernel(inputs, nuslerp_row_wise, nuslerp_flatten):
    w = inputs.values("weight")
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total  # mergekit: weights cancelling give the midpoint
    v0, v1 = inputs.non_base
    dim = 0 if nuslerp_row_wise else -1
    base = inputs.base
    if base is None:
        return nuslerp(t, v0, v1, dim=dim, flatten=nuslerp_flatten)
    return base + nuslerp(t, v0 - base, v1 - base, dim=dim, flatten=nuslerp_flatten)


def _multislerp_kernel(inputs, normalize_weights, eps):
    import torch

    xs, base = inputs.non_base, inputs.base
    if len(xs) == 1:
        return xs[0]
    x = torch.stack(xs, dim=0)
    if base is not None:
        x = x - base
    flat = x.view(x.shape[0], -1)
    w = torch.tensor(inputs.values("weight"), dtype=x.dtype, device=x.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the models' directions is zero (antipodal models "
                             "whose weights cancel); change the weights")
        out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])  # two antipodal models: mergekit lerps
        return out if base is None else out + base
    mean = mean / mean_norm
    # Into the tangent space at the mean, average there, back by the exponential map.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


def _multislerp_check(shared, per_model):
    weights = [m["weight"] for m in per_model]
    if shared["normalize_weights"] and len(weights) > 1 and abs(_f32_sum(weights)) < 1e-8:
        raise ValueError(f"parameters: multislerp with normalize_weights: true divides by the sum of the weights, "
                         f"and the weights {weights} sum to {_f32_sum(weights):g}; change the weights or set "
                         f"normalize_weights: false")


_WEIGHT = Param("weight", "number", REQUIRED, per_model=True, doc="the model's share")

METHODS = [
    TensorMethod(
        "slerp", "https://en.wikipedia.org/wiki/Slerp", _slerp_kernel,
        (Param("t", "number", REQUIRED, lo=0.0, hi=1.0, doc="0: the base model, 1: the other model"),),
        base="required", min_inputs=2, max_inputs=2, shape_of_inputs="base_model and one other model",
        native=_slerp_native,
    ),
    TensorMethod(
        "nuslerp", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", _nuslerp_kernel,
        (_WEIGHT,
         Param("nuslerp_row_wise", "flag", False, doc="interpolate each column (vectors along dim 0)"),
         Param("nuslerp_flatten", "flag", True, doc="interpolate the whole flattened tensor")),
        base="optional", min_inputs=2, min_non_base=2, max_non_base=2,
        shape_of_inputs="two models, and optionally base_model for task vectors",
    ),
    TensorMethod(
        "multislerp", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", _multislerp_kernel,
        (_WEIGHT,
         Param("normalize_weights", "flag", True, doc="divide the weights by their sum"),
         Param("eps", "number", 1e-8, lo=0.0, doc="added to norms before dividing")),
        base="optional", min_inputs=1, min_non_base=1, extra_check=_multislerp_check,
    ),
]
