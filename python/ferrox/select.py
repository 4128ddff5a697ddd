"""Exact selection by magnitude without sorting.

Ranks are by ``|x|`` descending (rank 0 is the largest); among equal ``|x|``
the element with the lower flat index (within its row) ranks first. This tie
rule is deterministic and shared by every ferrox sparsifier, so masks are
reproducible across threads, chunkings and devices.
"""

import torch

from . import _checks, _core

GRANULARITIES = ("row", "tensor")


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    """``|x|`` of the k-th largest element by magnitude (``k`` 1-based).

    Equals ``torch.kthvalue(x.abs().flatten(), n - k + 1).values`` but runs in
    O(n) by radix selection on the bit patterns, with no index arrays.
    """
    _checks.tensor("x", x)
    _checks.count("k", k, 1, x.numel())
    return _core.kth_largest_abs(x, k)


def band_mask(x: torch.Tensor, lo: int, hi: int, *, granularity: str = "row", out=None) -> torch.Tensor:
    """Boolean mask of the elements whose rank by ``|x|`` is in ``[lo, hi)``.

    ``granularity="row"`` ranks within each row of the last dimension (Model
    Breadcrumbs' official code); ``"tensor"`` ranks over the whole tensor.
    """
    _checks.tensor("x", x)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    per_row = granularity == "row" and x.dim() > 0
    size = x.shape[-1] if per_row else x.numel()
    _checks.count("hi", hi, 0, size)
    _checks.count("lo", lo, 0, hi)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bool)
    _core.band_mask(x, lo, hi, out, per_row)
    return out


def topk_mask(x: torch.Tensor, k: int, *, granularity: str = "row") -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude elements (per row or per tensor)."""
    return band_mask(x, 0, k, granularity=granularity)
