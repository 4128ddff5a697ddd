"""Standalone sparsifiers (magnitude top-k, Breadcrumbs band, DARE) against
the rank/mask reference the merge tests use."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merge_tensor import DTYPES, keep_mask

from ferrox.merge import SPARSIFIERS, TaskVector, rng_stream, sparsify


def tau(shape, dtype, seed, tie_heavy=False):
    g = torch.Generator().manual_seed(seed)
    if tie_heavy:
        levels = torch.tensor([0.0, 0.5, -0.5, 0.25, -1.0])
        return levels[torch.randint(0, 5, shape, generator=g)].to(dtype)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


@given(
    kind=st.sampled_from(SPARSIFIERS),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 6),
    cols=st.integers(1, 50),
    density=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.99, 1.0]),
    gamma=st.sampled_from([0.0, 0.01, 0.1, 0.4]),
    granularity=st.sampled_from(["tensor", "row"]),
    tie_heavy=st.booleans(),
    seed=st.integers(0, 10**6),
)
@settings(max_examples=2 * settings.default.max_examples, deadline=None)
def test_mask_matches_reference(kind, dtype, rows, cols, density, gamma, granularity, tie_heavy, seed):
    t = tau((rows, cols), dtype, seed, tie_heavy)
    got = sparsify(t, kind, density=density, gamma=gamma, granularity=granularity, seed=seed, tensor_name="w")
    keep = keep_mask(kind, t, density, gamma, seed, rng_stream("w", 0), cols if granularity == "row" else 0)
    want = torch.where(torch.from_numpy(keep).view(t.shape), t, torch.zeros_like(t))
    assert got.dtype == t.dtype and got.shape == t.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_rescale_restores_the_l1_norm(granularity):
    t = tau((40, 300), torch.float32, 3)
    got = sparsify(t, "band", density=0.2, gamma=0.05, granularity=granularity, rescale=True)
    unit = (1, -1) if granularity == "tensor" else (40, 300)
    before = t.view(unit).double().abs().sum(-1)
    after = got.view(unit).double().abs().sum(-1)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=0)
    plain = sparsify(t, "band", density=0.2, gamma=0.05, granularity=granularity)
    assert torch.equal(got != 0, plain != 0)


def test_magnitude_keeps_the_planted_top_k_and_band_drops_outliers():
    t = torch.zeros(10, 100)
    big = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:50]
    t.view(-1)[big] = torch.linspace(1.0, 2.0, 50)
    t.view(-1)[t.view(-1) == 0] = 0.01
    top = sparsify(t, "magnitude", density=0.05)
    assert set(top.view(-1).nonzero().flatten().tolist()) == set(big.tolist())
    # Breadcrumbs dropping the top 5% leaves exactly the small values.
    band = sparsify(t, "band", density=0.5, gamma=0.05)
    assert (band.abs() <= 0.01).all() and int((band != 0).sum()) == 500


def test_dare_keeps_about_density_and_is_keyed_by_name():
    t = torch.ones(200_000)
    a = sparsify(t, "random", density=0.25, seed=9, tensor_name="layer.0")
    kept = int((a != 0).sum())
    assert abs(kept - 50_000) < 4 * (200_000 * 0.25 * 0.75) ** 0.5
    assert torch.equal(a, sparsify(t, "random", density=0.25, seed=9, tensor_name="layer.0"))
    assert not torch.equal(a, sparsify(t, "random", density=0.25, seed=9, tensor_name="layer.1"))


def test_task_vector_sparsify_is_per_tensor():
    g = torch.Generator().manual_seed(4)
    base = {"a": torch.randn(8, 30, generator=g), "b": torch.randn(64, generator=g)}
    ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    tv = TaskVector.from_state_dicts(base, ft)
    for kind in ("magnitude", "band", "random"):
        sp = tv.sparsify(kind, density=0.3, gamma=0.1, granularity="row", seed=2)
        for k, d in tv.deltas.items():
            assert torch.equal(sp.deltas[k], sparsify(d, kind, density=0.3, gamma=0.1, granularity="row", seed=2,
                                                      tensor_name=k))
        kept = sum(int((v != 0).sum()) for v in sp.deltas.values())
        assert 0 < kept < sum(v.numel() for v in tv.deltas.values())
    assert np.isclose(tv.sparsify("band", density=1.0, gamma=0.0).cosine(tv), 1.0)


def test_errors_name_the_argument():
    t = torch.ones(4, 4)
    with pytest.raises(ValueError, match="kind: expected one of"):
        sparsify(t, "topk")
    with pytest.raises(ValueError, match=r"density: expected a fraction in \[0, 1\], got 1.5"):
        sparsify(t, "magnitude", density=1.5)
    with pytest.raises(ValueError, match="granularity"):
        sparsify(t, "band", granularity="column")
    with pytest.raises(TypeError, match="tau: expected a torch.Tensor"):
        sparsify(np.ones(3), "band")
