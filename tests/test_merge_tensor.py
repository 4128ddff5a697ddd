"""One-tensor merges against a plain torch/numpy reference of the documented
semantics (mergekit's generalized task arithmetic, ferrox's tie rule)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ferrox
from ferrox.merge import merge_tensors, rng_stream
from ferrox.merge.methods import GENERALIZED as METHODS  # the methods the Rust core runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ranks(a: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(a.size), -np.abs(a.astype(np.float64))))
    r = np.empty(a.size, dtype=np.int64)
    r[order] = np.arange(a.size)
    return r


def band(kind, d, g, n):
    if kind == "magnitude":
        if d >= 1:
            return 0, n
        if d <= 0 or n == 0:
            return 0, 0
        return 0, max(1, int(d * n))
    if d >= 1:
        return 0, n
    target, top = int(d * n), int(g * n)
    bottom = max(0, n - target - top)
    return n - bottom - target, n - bottom


def keep_mask(kind, delta, d, g, seed, stream, row_len):
    flat = delta.float().numpy().reshape(-1)
    if kind == "none":
        return np.ones(flat.size, bool)
    if kind == "random":
        if d >= 1:
            return np.ones(flat.size, bool)
        u = ferrox.philox.uniform((flat.size,), seed=seed, stream=stream).numpy()
        return u < np.float32(d)
    units = flat.reshape(-1, row_len) if row_len else flat.reshape(1, -1)
    out = []
    for unit in units:
        lo, hi = band(kind, d, g, unit.size)
        r = ranks(unit)
        out.append((r >= lo) & (r < hi))
    return np.concatenate(out) if out else np.zeros(0, bool)


def reference(method, base, models, weights, density, gamma, lam=1.0, rescale=None, normalize=None,
              granularity="tensor", seed=0, name="t"):
    m = METHODS[method]
    normalize = m.normalize if normalize is None else normalize
    rescale = m.rescale if rescale is None else rescale
    if base is None:
        base = torch.zeros_like(models[0])
    row_len = base.shape[-1] if granularity == "row" else 0
    b = base.float().reshape(-1)
    vs = []
    for i, x in enumerate(models):
        delta = (x - base)  # rounded in the input dtype, like mergekit
        keep = torch.from_numpy(keep_mask(m.sparsify, delta, density[i], gamma[i], seed, rng_stream(name, i), row_len))
        d = delta.float().reshape(-1)
        scale = torch.full_like(d, weights[i])
        if rescale:
            units = d.reshape(-1, row_len) if row_len else d.reshape(1, -1)
            kept = (d * keep).reshape(units.shape)
            allsum = units.double().abs().sum(-1)
            keptsum = kept.double().abs().sum(-1)
            f = torch.where((allsum < 1e-7) | (keptsum < 1e-7), 1.0, allsum / keptsum).float()
            scale = (torch.tensor(weights[i], dtype=torch.float32) * f).repeat_interleave(units.shape[1])
        vs.append(torch.where(keep, scale * d, torch.zeros_like(d)))
    w = [torch.tensor(x, dtype=torch.float32) for x in weights]
    mixed = torch.zeros_like(b)
    if m.consensus:
        s = torch.zeros_like(b)
        for v in vs:
            s = s + v
        pos = s >= 0
        div = torch.zeros_like(b)
        for v, wi in zip(vs, w):
            join = torch.where(pos, v > 0, v < 0)
            mixed = mixed + torch.where(join, v, torch.zeros_like(v))
            div = div + torch.where(join, wi, torch.zeros_like(v))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        for v in vs:
            mixed = mixed + v
        div = torch.zeros((), dtype=torch.float32)
        for wi in w:
            div = div + wi
        div = torch.ones(()) if div.abs() < 1e-8 else div
    if normalize:
        mixed = mixed / div
    mixed = mixed * torch.tensor(lam, dtype=torch.float32)
    return (b + mixed).to(base.dtype).reshape(base.shape)


def make(shape, dtype, n_models, seed, tie_heavy=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    models = []
    for _ in range(n_models):
        if tie_heavy:
            levels = torch.tensor([0.0, 0.01, -0.01, 0.02, -0.03])
            delta = levels[torch.randint(0, 5, shape, generator=g)]
        else:
            delta = torch.randn(shape, generator=g) * 0.05
        models.append((base.float() + delta).to(dtype))
    return base, models


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a.view(INT[a.dtype]) != b.view(INT[b.dtype])).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at {diff[0].tolist()}: {a[tuple(diff[0])]} vs {b[tuple(diff[0])]}"


@given(
    method=st.sampled_from(sorted(METHODS)),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 5),
    cols=st.integers(1, 40),
    n_models=st.integers(1, 4),
    tie_heavy=st.booleans(),
    granularity=st.sampled_from(["tensor", "row"]),
    data=st.data(),
)
@settings(max_examples=2 * settings.default.max_examples, deadline=None)
def test_every_method_matches_reference(method, dtype, rows, cols, n_models, tie_heavy, granularity, data):
    base, models = make((rows, cols), dtype, n_models, data.draw(st.integers(0, 10**6)), tie_heavy)
    weights = [data.draw(st.sampled_from([0.25, 0.5, 1.0, 1.5])) for _ in models]
    density = [data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])) for _ in models]
    gamma = [data.draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])) for _ in models]
    lam = data.draw(st.sampled_from([1.0, 0.7]))
    kw = dict(weight=weights, density=density, gamma=gamma, lam=lam, granularity=granularity, seed=7, tensor_name="w")
    got = merge_tensors(method, base, models, **kw)
    want = reference(method, None if method == "linear" else base, models, weights, density, gamma, lam,
                     granularity=granularity, seed=7, name="w")
    if METHODS[method].rescale:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6)
    else:
        assert_bitwise(got, want)


def test_breadcrumbs_without_pruning_is_task_arithmetic():
    base, models = make((64, 96), torch.bfloat16, 3, 1)
    ta = merge_tensors("task_arithmetic", base, models, weight=[0.3, 0.3, 0.4])
    for gran in ("tensor", "row"):
        bc = merge_tensors("breadcrumbs", base, models, weight=[0.3, 0.3, 0.4], density=1.0, gamma=0.0, granularity=gran)
        assert_bitwise(bc, ta)


def test_planted_outlier_never_survives_breadcrumbs():
    base, models = make((32, 128), torch.float32, 2, 3)
    models[0][5, 17] = base[5, 17] + 100.0
    for gran in ("tensor", "row"):
        out = merge_tensors("breadcrumbs", base, models, weight=1.0, density=0.5, gamma=0.02, granularity=gran)
        assert abs(out[5, 17] - base[5, 17]) < 1.0


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic", "linear", "breadcrumbs"])
def test_order_invariance(method):
    base, models = make((48, 80), torch.float32, 3, 5)
    kw = dict(weight=[0.5, 0.25, 0.25], density=[0.4, 0.4, 0.4], gamma=[0.05] * 3)
    a = merge_tensors(method, base, models, **kw)
    perm = [2, 0, 1]
    b = merge_tensors(method, base, [models[i] for i in perm], **{k: [v[i] for i in perm] for k, v in kw.items()})
    # Sums are reassociated, so equal to f32 rounding, not bitwise.
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_dare_kept_fraction_and_unbiased_mean():
    n = 1_000_000
    base = torch.zeros(n)
    model = torch.ones(n)
    d = 0.3
    out = merge_tensors("dare_linear", base, [model], weight=1.0, density=d, rescale=False, seed=11, tensor_name="x")
    kept = int((out != 0).sum())
    sigma = (n * d * (1 - d)) ** 0.5
    assert abs(kept - n * d) < 4 * sigma
    # With mergekit's L1 rescale the mean delta is preserved exactly in expectation.
    res = merge_tensors("dare_linear", base, [model], weight=1.0, density=d, seed=11, tensor_name="x")
    assert abs(res.double().mean().item() - 1.0) < 1e-5


def test_dare_is_bitwise_reproducible_across_threads():
    base, models = make((300, 1000), torch.bfloat16, 3, 9)
    kw = dict(weight=[0.4, 0.3, 0.3], density=0.2, seed=123, tensor_name="layer.0")
    t = ferrox.get_num_threads()
    a = merge_tensors("dare_ties", base, models, **kw)
    ferrox.set_num_threads(1)
    try:
        b = merge_tensors("dare_ties", base, models, **kw)
    finally:
        ferrox.set_num_threads(t)
    assert_bitwise(a, b)
    c = merge_tensors("dare_ties", base, models, **{**kw, "seed": 124})
    assert not torch.equal(a, c)


def test_errors_name_the_problem():
    base, models = make((4, 5), torch.float32, 2, 0)
    with pytest.raises(ValueError, match="density: expected a fraction in \\[0, 1\\], got 1.5"):
        merge_tensors("ties", base, models, density=1.5)
    with pytest.raises(ValueError, match="models: expected at least one model"):
        merge_tensors("ties", base, [])
    with pytest.raises(ValueError, match="unknown method 'not_a_method'"):
        merge_tensors("not_a_method", base, models)
    with pytest.raises(ValueError, match=r"models\[1\]: float32 \[4, 4\]"):
        merge_tensors("ties", base, [models[0], torch.zeros(4, 4)])
    bad = models[1].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"models\[1\]: non-finite value NaN at flat index 13"):
        merge_tensors("task_arithmetic", base, [models[0], bad])
    out = merge_tensors("task_arithmetic", base, [models[0], bad], check_finite=False)
    assert torch.isnan(out[2, 3])


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunk_length_does_not_change_the_result(method, granularity):
    # Over several 65536-element units, tie-heavy bf16: cuts, tie ordinals and
    # rescale sums all cross chunk boundaries.
    g = torch.Generator().manual_seed(11)
    levels = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, -1.0, 1.0])
    base = torch.randn(3 * 65536 + 512, generator=g).to(torch.bfloat16).view(-1, 512)
    models = [(base.float() + levels[torch.randint(0, 7, base.shape, generator=g)]).to(torch.bfloat16) for _ in range(3)]
    kw = dict(weight=[0.5, 0.3, 0.8], density=0.4, gamma=0.02, granularity=granularity, seed=5, tensor_name="w")
    whole = merge_tensors(method, base, models, **kw, chunk_len=base.numel())
    for chunk in (1, 65536, 2 * 65536 + 7, 1000 * 512):
        got = merge_tensors(method, base, models, **kw, chunk_len=chunk)
        assert torch.equal(got.view(torch.int16), whole.view(torch.int16)), chunk
