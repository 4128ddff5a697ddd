"""Exact selection by |x| against a sorting reference (numpy), with the
documented tie rule: |x| descending, lower index first among equals."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox import select

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ranks_reference(a: np.ndarray) -> np.ndarray:
    """rank[i] of each element of a 1-D float array under the tie rule."""
    mag = np.abs(a.astype(np.float64))
    order = np.lexsort((np.arange(a.size), -mag))  # last key is primary
    ranks = np.empty(a.size, dtype=np.int64)
    ranks[order] = np.arange(a.size)
    return ranks


def band_reference(x: torch.Tensor, lo: int, hi: int, per_row: bool) -> torch.Tensor:
    a = x.float().numpy()
    rows = a.reshape(-1, a.shape[-1]) if per_row else a.reshape(1, -1)
    out = np.stack([(lambda r: (r >= lo) & (r < hi))(ranks_reference(row)) for row in rows]) if rows.size else rows.astype(bool)
    return torch.from_numpy(out.reshape(x.shape))


def tie_heavy(shape, dtype, g):
    levels = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 2.0])
    return levels[torch.randint(0, len(levels), shape, generator=g)].to(dtype)


@st.composite
def tensors(draw, max_rows=6, max_cols=40):
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):
        x = tie_heavy((rows, cols), dtype, g)
    else:
        x = (torch.randn(rows, cols, generator=g) * 10).to(dtype)
    return x


@given(tensors(), st.data())
@settings(max_examples=settings.default.max_examples * 3 // 2, deadline=None)
def test_band_mask_rows_matches_reference(x, data):
    cols = x.shape[-1]
    hi = data.draw(st.integers(0, cols))
    lo = data.draw(st.integers(0, hi))
    got = select.band_mask(x, lo, hi, granularity="row")
    assert torch.equal(got, band_reference(x, lo, hi, per_row=True))


@given(tensors(), st.data())
@settings(max_examples=settings.default.max_examples * 3 // 2, deadline=None)
def test_band_mask_tensor_matches_reference(x, data):
    n = x.numel()
    hi = data.draw(st.integers(0, n))
    lo = data.draw(st.integers(0, hi))
    got = select.band_mask(x, lo, hi, granularity="tensor")
    assert torch.equal(got, band_reference(x, lo, hi, per_row=False))
    assert int(got.sum()) == hi - lo


@given(tensors(max_rows=50, max_cols=50), st.data())
@settings(max_examples=settings.default.max_examples * 3 // 2, deadline=None)
def test_kth_largest_abs_matches_kthvalue(x, data):
    n = x.numel()
    k = data.draw(st.integers(1, n))
    want = torch.kthvalue(x.abs().float().flatten(), n - k + 1).values.item()
    assert select.kth_largest_abs(x, k) == want


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensor_cut_crosses_chunks(dtype, rng):
    n = 3_000_001
    x = (torch.randn(n, generator=rng) * 3).to(dtype)
    for k in (1, 17, n // 10, n // 2, n):
        want = torch.kthvalue(x.abs().float(), n - k + 1).values.item()
        assert select.kth_largest_abs(x, k) == want
    # Tie-heavy bf16/f16 at a chunked size: exact count and index-order ties.
    t = tie_heavy((n,), dtype, rng)
    m = select.band_mask(t, 1000, 2_000_000, granularity="tensor")
    assert int(m.sum()) == 2_000_000 - 1000
    mag = t.abs().float()
    cut_hi = select.kth_largest_abs(t, 2_000_000)
    inside = m & (mag == cut_hi)
    # Tied elements at the lower cut are taken in index order: no gaps.
    idx = torch.nonzero(mag == cut_hi).flatten()
    taken = inside[idx]
    assert torch.all(taken[:-1] >= taken[1:])


def test_f32_keys_sharing_high_bits():
    # Values differing only in low mantissa bits exercise the second radix pass.
    base = np.float32(1.0).view(np.uint32)
    bits = base + np.arange(5000, dtype=np.uint32)[::-1]
    x = torch.from_numpy(bits.view(np.float32).copy())
    x[::2] *= -1
    for k in (1, 2, 2500, 4999, 5000):
        assert select.kth_largest_abs(x, k) == torch.kthvalue(x.abs(), 5001 - k).values.item()


def test_topk_mask_matches_torch_topk_on_distinct_values(rng):
    x = torch.randn(64, 512, generator=rng)
    m = select.topk_mask(x, 51)
    idx = torch.topk(x.abs(), 51, dim=-1).indices
    want = torch.zeros_like(m).scatter_(1, idx, True)
    assert torch.equal(m, want)


def test_nan_is_an_error():
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="NaN"):
        select.kth_largest_abs(x, 1)
    with pytest.raises(ValueError, match="NaN"):
        select.band_mask(x, 0, 1)


def test_infinities_rank_first():
    x = torch.tensor([1.0, -float("inf"), 3.0, float("inf")])
    assert select.band_mask(x, 0, 2, granularity="tensor").tolist() == [False, True, False, True]


def test_argument_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 20, got 0"):
        select.kth_largest_abs(x, 0)
    with pytest.raises(ValueError, match=r"hi: expected 0 <= hi <= 5, got 6"):
        select.band_mask(x, 0, 6)
    with pytest.raises(ValueError, match=r"lo: expected 0 <= lo <= 2, got 3"):
        select.band_mask(x, 3, 2)
    with pytest.raises(ValueError, match="granularity"):
        select.band_mask(x, 0, 2, granularity="layer")
    with pytest.raises(TypeError, match="x: expected dtype float32 or float16 or bfloat16, got int32"):
        select.band_mask(x.int(), 0, 2)
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 5\]"):
        select.band_mask(x, 0, 2, out=torch.empty(4, 4, dtype=torch.bool))


def test_non_contiguous_input(rng):
    x = torch.randn(40, 30, generator=rng)
    got = select.band_mask(x.t(), 3, 9)
    assert torch.equal(got, band_reference(x.t().contiguous(), 3, 9, per_row=True))
