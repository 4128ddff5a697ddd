"""``kmeans``: a codebook of 2^b codewords for a tensor's values (scalar) or
its d-dim sub-vectors (vector), computed in the Rust core.

Scalar: the values are reduced to sorted distinct points with weights (a
histogram of the 65,536 bit patterns for f16/bf16, one sort for f32); the
default ``method="auto"`` solves 1-D k-means exactly by dynamic programming
when k·(distinct values) ≤ 2^20, and otherwise runs the DP on ≤ 2^20/k
equal-count bins of the sorted values and refines that codebook with Lloyd
iterations on all values (each O(k log m) by binary search of the midpoints).
``"lloyd"`` starts from weighted quantiles instead; ``"exact"`` always runs
the DP. Vector: Lloyd from a seeded stratified sample with a fused
assign-and-update pass (no n×k distance matrix).

``weights`` (float [row_len]) weights each input column (last dimension),
e.g. a diagonal Hessian or the mean squared activation: the objective is
Σ w_col (x − c(x))². Results are bitwise the same for any thread count.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from .. import _checks, _core


@dataclass
class KMeansResult:
    """``codebook``: float32 [k] sorted ascending (scalar) or [k, d];
    ``objective``: Σ w (x − c(x))²; ``mse``: objective / Σ w; ``history``:
    the objective after each Lloyd assignment (non-increasing); ``exact``:
    whether the scalar codebook is the DP optimum."""

    codebook: "object"
    objective: float
    mse: float
    iterations: int
    history: List[float] = field(default_factory=list)
    exact: bool = False


def _weights(weights, row_len: int):
    import torch

    if weights is None:
        return None
    w = torch.as_tensor(weights).detach().cpu().float().reshape(-1).contiguous()
    if w.numel() != row_len:
        raise ValueError(f"weights: expected {row_len} per-column weights, got {w.numel()}")
    return w


def kmeans(x, bits: Optional[int] = None, *, k: Optional[int] = None, weights=None, vector_dim: int = 1,
           method: str = "auto", max_iter: Optional[int] = None, seed: int = 0, tol: float = 1e-6) -> KMeansResult:
    """k-means codebook of ``x`` (a float tensor; rows along its last dim)
    with ``k`` = 2**bits codewords (give ``bits`` or ``k``)."""
    import torch

    _checks.tensor("x", x)
    if (bits is None) == (k is None):
        raise ValueError("kmeans: give exactly one of bits or k")
    if bits is not None:
        _checks.count("bits", bits, 1, 8)
        k = 1 << bits
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x: expected float32, float16 or bfloat16, got {x.dtype}")
    x = x.detach().cpu()
    if x.dim() == 0:
        x = x.reshape(1)
    row_len = x.shape[-1]
    w = _weights(weights, row_len)
    _checks.count("vector_dim", vector_dim, 1, max(1, row_len))
    if vector_dim == 1:
        _checks.count("k", k, 1, 256)
        out = torch.empty(k, dtype=torch.float32)
        obj, tw, iters, hist, exact = _core.codebook_kmeans(x, k, out, w, method, 1000 if max_iter is None else max_iter)
    else:
        _checks.count("k", k, 1, 65536)
        if row_len % vector_dim:
            raise ValueError(f"vector_dim: expected a divisor of the last dimension {row_len}, got {vector_dim}")
        out = torch.empty(k, vector_dim, dtype=torch.float32)
        obj, tw, iters, hist = _core.codebook_kmeans_vec(x.reshape(-1, row_len), vector_dim, k, out, w, seed,
                                                          25 if max_iter is None else max_iter, tol)
        exact = False
    return KMeansResult(out, obj, obj / tw if tw > 0 else 0.0, iters, list(hist), exact)


def exact_1d(x, weights=None, k: int = 8):
    """Reference: the optimal 1-D k-means of the values ``x`` (per-element
    ``weights`` > 0): (sorted codewords as a float64 tensor, optimal Σ w (x − c)²)."""
    import torch

    x = torch.as_tensor(x).detach().cpu().float().reshape(-1).contiguous()
    w = torch.ones_like(x) if weights is None else torch.as_tensor(weights).detach().cpu().float().reshape(-1).contiguous()
    c, cost = _core.codebook_exact_1d(x, w, k)
    return torch.tensor(c, dtype=torch.float64), cost
