"""della / della_linear with ``rng: tensor`` in the Rust core
(``ferrox._core.della_merge``, ``magprune_keep``) against naive numpy
references.

- Masks: ranks are numpy's stable argsort of |τ| per row (τ rounded to the
  input dtype), p_r = (density − ε) + 2ε·r/(n − 1) in float64, and element i
  of model m is kept iff the Philox uniform (ferrox.philox_uniform, stream
  m, offset 0) is below p: compared exactly.
- The merge: given those masks, the whole computation (L1 rescale over the
  tensor, weights, TIES sign election or plain sum, normalisation, lambda)
  in float64 from the weighted deltas rounded to float32 (as the core holds
  them); the core sums in float32 and rounds once to the dtype, so the
  tolerance is one ulp of the dtype plus 2^-20 of the terms' magnitude.
- Sampling: the kept fraction lies within 5 binomial standard deviations of
  density, each rank's frequency within 5 sigma of its p, and the largest
  tenth of |τ| is kept more often than the smallest tenth.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import ferrox.philox
from ferrox import _core
from ferrox.merge import merge_tensors
from ferrox.merge.methods.della import core_keep, mask_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rounded_delta(x, b):
    """τ = x − base in float32, rounded to the inputs' dtype (as the core)."""
    return (x.float() - b.float()).to(x.dtype).double().numpy()


def naive_keep(b, x, row_len, density, epsilon, seed, stream):
    """(keep, ranks) by stable argsort and the Philox uniforms."""
    tau = np.abs(rounded_delta(x, b)).reshape(-1, row_len)
    ranks = np.argsort(np.argsort(tau, axis=1, kind="stable"), axis=1, kind="stable")
    u = ferrox.philox.uniform((b.numel(),), seed=seed, stream=stream)
    n = row_len
    p = (density - epsilon) + (2 * epsilon) * (ranks / (n - 1)) if n > 1 else np.full(ranks.shape, density - epsilon)
    if density >= 1 or density <= 0:
        keep = np.full(ranks.shape, density >= 1)
    else:
        keep = u.double().numpy().reshape(ranks.shape) < p
    return keep.reshape(-1), ranks.reshape(-1)


def naive_della(b, xs, weights, densities, epsilons, seed, row_len, consensus, normalize, rescale, lam):
    """The whole della merge in float64 given the naive masks."""
    base = b.double().numpy().reshape(-1)
    vs = []
    for m, (x, w, d, e) in enumerate(zip(xs, weights, densities, epsilons)):
        keep, _ = naive_keep(b, x, row_len, d, e, seed, m)
        tau = rounded_delta(x, b).reshape(-1)
        kept = tau * keep
        f = 1.0
        if rescale and 0 < d < 1:
            before, after = np.abs(tau).sum(), np.abs(kept).sum()
            f = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
        # Weighted deltas held in float32, as the core (and mergekit) holds them, so the sign election
        # sees the same values (exact ties between models are common with quantised inputs).
        scale = np.float32(np.float32(w) * np.float32(f))
        vs.append((scale * kept.astype(np.float32)).astype(np.float64))
    v = np.stack(vs)
    w = np.array(weights, dtype=np.float32).astype(np.float64)[:, None]
    if consensus:
        positive = v.sum(axis=0) >= 0
        join = np.where(positive, v > 0, v < 0)
        mixed = (v * join).sum(axis=0)
        divisor = (w * join).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = v.sum(axis=0)
        divisor = np.full(mixed.shape, w.sum())
        divisor[np.abs(divisor) < 1e-8] = 1
    magnitude = np.abs(v).sum(axis=0)
    if normalize:
        mixed = mixed / divisor
        magnitude = magnitude / np.abs(divisor)
    return base + np.float32(lam) * mixed, np.abs(base) + abs(lam) * magnitude


def ulp(values, dtype):
    """One ulp of ``dtype`` at each value."""
    bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[dtype]
    tiny = {torch.float32: 2.0 ** -149, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}[dtype]
    a = np.maximum(np.abs(values), 1e-300)
    return np.maximum(np.exp2(np.floor(np.log2(a)) - bits), tiny)


def core_della(b, xs, weights, densities, epsilons, seed, row_len, consensus, normalize, rescale, lam):
    out = torch.empty_like(b)
    _core.della_merge(out, b, xs, weights, densities, epsilons, consensus, normalize, rescale, lam, row_len, seed)
    return out


def inputs(shape, dtype, n_models, seed, quantize=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    xs = [b + 0.05 * torch.randn(shape, generator=g) for _ in range(n_models)]
    if quantize:  # many equal |τ|: ties ranked by index
        xs = [b + torch.round(x - b, decimals=2) for x in xs]
    return b.to(dtype), [x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,row_len", [((13, 70), 70), ((300,), 300), ((9, 1), 1), ((1,), 1), ((4, 64), 64)])
def test_masks_and_ranks_equal_the_naive_reference(dtype, shape, row_len):
    b, xs = inputs(shape, dtype, 1, 1, quantize=True)
    for density, eps, stream in [(0.5, 0.2, 0), (0.3, 0.1, 3), (1.0, 0.1, 0), (0.0, 0.1, 1)]:
        keep = torch.empty(b.numel(), dtype=torch.uint8)
        ranks = torch.empty(b.numel(), dtype=torch.int32)
        _core.magprune_keep(keep, b, xs[0], row_len, density, eps, 77, stream, ranks)
        want_keep, want_ranks = naive_keep(b, xs[0], row_len, density, eps, 77, stream)
        assert np.array_equal(ranks.numpy(), want_ranks)
        assert np.array_equal(keep.numpy().astype(bool), want_keep), (density, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("consensus", [True, False])
def test_merge_equals_the_naive_reference(dtype, consensus):
    b, xs = inputs((21, 45), dtype, 3, 2)
    weights, densities, epsilons = [0.8, -0.3, 0.5], [0.5, 0.3, 1.0], [0.2, 0.1, 0.1]
    for normalize, rescale, lam in [(True, True, 1.0), (False, True, 1.3), (True, False, 0.7)]:
        args = (weights, densities, epsilons, 123, 45, consensus, normalize, rescale, lam)
        got = core_della(b, xs, *args).double().numpy().reshape(-1)
        want, magnitude = naive_della(b, xs, *args)
        tol = ulp(want, dtype) + 2.0 ** -20 * magnitude
        assert np.all(np.abs(got - want) <= tol), float(np.max(np.abs(got - want) / tol))


@given(rows=st.integers(1, 6), row_len=st.integers(1, 40), density=st.floats(0.05, 0.95),
       eps_frac=st.floats(0.0, 0.99), seed=st.integers(0, 2 ** 64 - 1), consensus=st.booleans())
def test_property_merge_equals_the_naive_reference(rows, row_len, density, eps_frac, seed, consensus):
    b, xs = inputs((rows, row_len), torch.float32, 2, seed % 1000, quantize=seed % 2 == 0)
    eps = eps_frac * min(density, 1 - density)
    args = ([0.6, 0.9], [density, 0.5], [eps, 0.2], seed, row_len, consensus, True, True, 1.0)
    got = core_della(b, xs, *args).double().numpy().reshape(-1)
    want, magnitude = naive_della(b, xs, *args)
    assert np.all(np.abs(got - want) <= ulp(want, torch.float32) + 2.0 ** -20 * magnitude)


def test_kept_fraction_and_larger_deltas_kept_more_often():
    rows, n, density, eps = 3000, 20, 0.4, 0.25
    b, xs = inputs((rows, n), torch.float32, 1, 5)
    keep = torch.empty(rows * n, dtype=torch.uint8)
    ranks = torch.empty(rows * n, dtype=torch.int32)
    _core.magprune_keep(keep, b, xs[0], n, density, eps, 9, 0, ranks)
    keep, ranks = keep.numpy().astype(float), ranks.numpy()
    p = density - eps + 2 * eps * ranks / (n - 1)
    # Kept fraction: mean p is density; within 5 binomial standard deviations.
    sd = np.sqrt((p * (1 - p)).sum()) / keep.size
    assert abs(keep.mean() - density) < 5 * sd
    # Every rank's frequency within 5 sigma of its p; the top ranks kept more often than the bottom ones.
    freq = np.array([keep[ranks == r].mean() for r in range(n)])
    pr = density - eps + 2 * eps * np.arange(n) / (n - 1)
    assert np.all(np.abs(freq - pr) < 5 * np.sqrt(pr * (1 - pr) / rows))
    assert freq[-2:].mean() > freq[:2].mean() + 0.3


def test_same_bits_for_any_thread_count():
    b, xs = inputs((130, 257), torch.bfloat16, 3, 8)
    args = ([0.5, 0.7, -0.2], [0.4, 0.6, 0.5], [0.2, 0.15, 0.3], 4, 257, True, True, True, 1.0)
    before = _core.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 5):
            _core.set_num_threads(threads)
            outs.append(core_della(b, xs, *args))
    finally:
        _core.set_num_threads(before)
    assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_merge_tensors_shapes_rows_along_dim_1(method):
    """merge_tensors (rng: tensor) ranks along dim 1, as mergekit: a 3-D
    tensor is ranked like its dim-1-last permutation; 1-D and 0-d tensors are
    one row; empty tensors come back unchanged."""
    name = "t"
    kw = dict(weight=[0.7, 0.4], density=[0.5, 0.4], seed=3, tensor_name=name)  # epsilon: the default 0.15
    b, xs = inputs((4, 6, 5), torch.float32, 2, 4)
    got = merge_tensors(method, b, xs, **kw)
    perm = lambda t: t.movedim(1, -1).contiguous()  # noqa: E731
    want = core_della(perm(b), [perm(x) for x in xs], [0.7, 0.4], [0.5, 0.4], [0.15, 0.15], mask_seed(3, name), 6,
                      method == "della", method == "della", True, 1.0).movedim(-1, 1)
    assert torch.equal(got, want)
    keep, ranks = core_keep(b, xs[1], 0.4, 0.15, 3, name, 1, ranks=True)
    assert torch.equal(ranks, torch.from_numpy(naive_keep(perm(b), perm(xs[1]), 6, 0.4, 0.15, mask_seed(3, name), 1)[1])
                       .reshape(4, 5, 6).movedim(-1, 1).to(torch.int32))
    for shape in [(50,), (), (5, 1)]:
        b, xs = inputs(shape, torch.bfloat16, 2, 6)
        got = merge_tensors(method, b, xs, **kw)
        assert got.shape == b.shape and got.dtype == b.dtype
        rows = b.reshape(1, -1) if b.dim() < 2 else b
        # merge_tensors computes in float32 from the bfloat16 inputs and rounds the result.
        want = core_della(rows.float().contiguous(),
                          [(x.reshape(1, -1) if x.dim() < 2 else x).float().contiguous() for x in xs],
                          [0.7, 0.4], [0.5, 0.4], [0.15, 0.15], mask_seed(3, name), rows.shape[-1],
                          method == "della", method == "della", True, 1.0).to(torch.bfloat16)
        assert torch.equal(got.reshape(-1).view(torch.int16), want.reshape(-1).view(torch.int16)), shape
    for shape in [(0, 4), (3, 0), (0,)]:  # nothing to merge
        b, xs = inputs(shape, torch.bfloat16, 2, 6)
        got = merge_tensors(method, b, xs, **kw)
        assert got.shape == b.shape and got.dtype == b.dtype


def test_merge_tensors_takes_epsilon_per_model():
    """merge_tensors passes della's per-model epsilon (a number or a list) to
    the core: the result equals the naive reference with those epsilons."""
    b, xs = inputs((12, 50), torch.float32, 2, 4)
    name, seed = "model.layers.0.mlp.up_proj.weight", 9
    got = merge_tensors("della", b, xs, weight=[0.7, 0.4], density=[0.5, 0.4], epsilon=[0.3, 0.05], seed=seed,
                        tensor_name=name).double().numpy().reshape(-1)
    args = ([0.7, 0.4], [0.5, 0.4], [0.3, 0.05], mask_seed(seed, name), 50, True, True, True, 1.0)
    want, magnitude = naive_della(b, xs, *args)
    assert np.all(np.abs(got - want) <= ulp(want, torch.float32) + 2.0 ** -20 * magnitude)
    one = merge_tensors("della", b, xs, weight=[0.7, 0.4], density=0.5, epsilon=0.2, seed=seed, tensor_name=name)
    both = merge_tensors("della", b, xs, weight=[0.7, 0.4], density=0.5, epsilon=[0.2, 0.2], seed=seed,
                         tensor_name=name)
    assert torch.equal(one, both)
    with pytest.raises(ValueError, match="epsilon: expected 2 values"):
        merge_tensors("della", b, xs, weight=[0.7, 0.4], density=0.5, epsilon=[0.2])


def test_errors_name_the_input():
    b, xs = inputs((4, 5), torch.float32, 1, 0)
    out = torch.empty_like(b)
    with pytest.raises(ValueError, match=r"models\[0\]\.density: expected a fraction"):
        _core.della_merge(out, b, xs, [1.0], [1.5], [0.1], True, True, True, 1.0, 5, 0)
    with pytest.raises(ValueError, match="row length 3 does not divide"):
        _core.della_merge(out, b, xs, [1.0], [0.5], [0.1], True, True, True, 1.0, 3, 0)
    with pytest.raises(ValueError, match="expected 1 entries"):
        _core.della_merge(out, b, xs, [1.0, 2.0], [0.5], [0.1], True, True, True, 1.0, 5, 0)
    with pytest.raises(ValueError, match=r"models\[0\]: float16 \[4, 5\] on cpu does not match base float32"):
        _core.della_merge(out, b, [xs[0].half()], [1.0], [0.5], [0.1], True, True, True, 1.0, 5, 0)


@pytest.mark.gpu
def test_cuda_tensors_give_the_cpu_bits():
    b, xs = inputs((8, 33), torch.float32, 2, 1)
    kw = dict(weight=[0.7, 0.4], density=0.5, seed=1, tensor_name="w")
    cpu = merge_tensors("della", b, xs, **kw)
    gpu = merge_tensors("della", b.cuda(), [x.cuda() for x in xs], **kw)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
