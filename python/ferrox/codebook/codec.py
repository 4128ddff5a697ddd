"""``quantize``: a 2-D weight to a ``CodebookTensor`` (k-means codebooks per
tensor or per group of rows, packed codes); ``dequantize``: back to dense in
the original dtype and row order. Clustering, assignment and decode run in
the Rust core (GIL released)."""

from typing import Optional

from .. import _checks, _core
from .format import BITS, CodebookTensor

_FLOATS = ("torch.float32", "torch.float16", "torch.bfloat16")


def _weight(w):
    import torch

    _checks.tensor("w", w)
    if w.dim() != 2 or 0 in w.shape:
        raise ValueError(f"w: expected a non-empty 2-D weight [out, in], got shape {list(w.shape)}")
    if str(w.dtype) not in _FLOATS:
        raise TypeError(f"w: expected float32, float16 or bfloat16, got {w.dtype}")
    return w.detach().to("cpu").contiguous() if w.device.type != "cpu" else w.detach().contiguous()


def quantize(w, bits: int, *, groups: int = 1, vector_dim: int = 1, weights=None, perm=None, group_offsets=None,
             method: str = "auto", max_iter: Optional[int] = None, seed: int = 0, tol: float = 1e-6) -> CodebookTensor:
    """Quantizes ``w`` [out, in] with 2**bits codewords (bits in 2, 3, 4, 8).

    ``groups`` > 1: rows are grouped by their statistics
    (``ferrox.codebook.grouping``) and each group gets its own codebook;
    ``perm``/``group_offsets`` give a grouping explicitly instead.
    ``vector_dim`` d > 1: codewords are d-dim sub-vectors of consecutive
    columns (in % d == 0). ``weights`` (float [in]): per-input-column weights
    of the objective Σ w_col (W − Ŵ)² (e.g. mean x² of the layer's inputs).
    ``error`` is the relative Frobenius error of the result."""
    import torch

    from .grouping import group_rows

    w = _weight(w)
    if bits not in BITS:
        raise ValueError(f"bits: expected one of {BITS}, got {bits!r}")
    rows, cols = w.shape
    _checks.count("vector_dim", vector_dim, 1, cols)
    if cols % vector_dim:
        raise ValueError(f"vector_dim: expected a divisor of the {cols} input columns, got {vector_dim}")
    if (perm is None) != (group_offsets is None):
        raise ValueError("perm and group_offsets go together")
    if perm is None:
        perm, group_offsets = group_rows(w, groups, seed=seed)
    perm = torch.as_tensor(perm).to(torch.int32).contiguous()
    group_offsets = torch.as_tensor(group_offsets).to(torch.int32).contiguous()
    g = group_offsets.numel() - 1
    identity = bool(torch.equal(perm, torch.arange(rows, dtype=torch.int32)))
    cw = None
    if weights is not None:
        cw = torch.as_tensor(weights).detach().cpu().float().reshape(-1).contiguous()
        if cw.numel() != cols:
            raise ValueError(f"weights: expected {cols} per-column weights, got {cw.numel()}")
    k = 1 << bits
    codebooks = torch.empty(g, k, vector_dim, dtype=torch.float32)
    codes = torch.empty(rows, _core.packed_row_bytes(cols // vector_dim, bits), dtype=torch.uint8)
    if max_iter is None:
        max_iter = 1000 if vector_dim == 1 else 25
    _core.codebook_quantize(w, bits, vector_dim, group_offsets, codebooks, codes, None if identity else perm, cw,
                            method, max_iter, seed, tol)
    q = CodebookTensor((rows, cols), w.dtype, bits, vector_dim, codes, codebooks, group_offsets,
                       None if identity else perm, None)
    q.error = relative_error(w, dequantize(q))
    return q


def relative_error(w, w_hat) -> float:
    """‖w − ŵ‖_F / ‖w‖_F (in float64; 0 when both are zero)."""
    a = w.double()
    num = (a - w_hat.double()).norm().item()
    den = a.norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def dequantize(q: CodebookTensor, dtype=None):
    """The dense weight [out, in] in the original row order and dtype (or
    ``dtype``)."""
    import torch

    out = torch.empty(q.shape, dtype=dtype or q.dtype)
    _core.codebook_decode(q.codes, q.codebooks.float().contiguous(), q.group_offsets.to(torch.int32).contiguous(),
                          q.bits, q.vector_dim, out,
                          None if q.perm is None else q.perm.to(torch.int32).contiguous(),
                          None if q.row_scale is None else q.row_scale.float().contiguous())
    return out


def codes(q: CodebookTensor):
    """The unpacked codes uint8 [out, in // d] (permuted row order)."""
    from ..pack import unpack_codes

    return unpack_codes(q.codes, q.bits, q.shape[1] // q.vector_dim)
