"""The Rust core's fused slerp / model_stock (``_core.interp_tensor``,
``interp_tensor_files``) and its finite scan (``_core.first_nonfinite``):
the scan against torch.isfinite with NaN/±inf planted in every dtype, the
fused merges against float64 numpy references (empty, 1-element, sizes off
the core's 8192-element blocks, colinear and antipodal inputs, filter_wise
rows), the same bits for every thread count, from files as from memory, and
the torch fallback when an input is non-finite."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ferrox import _core
from ferrox.merge import merge_tensors
from ferrox.merge.methods.model_stock import model_stock
from ferrox.merge.methods.slerp import slerp

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one rounding to the output dtype, relative
OUT_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@given(n=st.integers(0, 70_000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31),
       plants=st.lists(st.tuples(st.floats(0, 1), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3))
def test_first_nonfinite_matches_torch_isfinite(n, dtype, seed, plants):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for where, value in plants:
        if n:
            x[min(n - 1, int(where * n))] = value
    bad = (~torch.isfinite(x)).nonzero()
    want = int(bad[0]) if len(bad) else None
    assert _core.first_nonfinite(x) == want
    assert _core.first_nonfinite(x.reshape(1, -1) if n else x) == want


def naive_slerp(t, a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    d = float(np.clip(np.dot(a / (na if na > 1e-8 else 1), b / (nb if nb > 1e-8 else 1)), -1, 1))
    if abs(d) > 0.9995:
        return 1 - t, t
    th = math.acos(d)
    return math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)


def naive_stock(base, models, filter_wise):
    base = base.astype(np.float64)
    rows = base.reshape(-1, base.shape[-1]) if filter_wise and base.ndim > 1 else base.reshape(1, -1)
    taus = [(m.astype(np.float32) - base.astype(np.float32)).astype(np.float64).reshape(rows.shape) for m in models]
    k = len(models)
    ts = []
    for r in range(rows.shape[0]):
        cos = [np.dot(x[r], y[r]) / max(np.linalg.norm(x[r]) * np.linalg.norm(y[r]), 1e-6)
               for i, x in enumerate(taus) for y in taus[i + 1:]]
        c = float(np.mean(np.clip(cos, -1, 1)))
        den = 1 + (k - 1) * c
        ts.append(0.0 if abs(den) < 1e-6 else k * c / den)
    return np.array(ts)


@given(shape=st.sampled_from([(0,), (1,), (7,), (8191,), (3, 8195), (0, 5), (3, 0), (4, 33)]),
       dtype=st.sampled_from(DTYPES), out_dtype=st.sampled_from(DTYPES), t=st.floats(0, 1),
       kind=st.sampled_from(["random", "colinear", "antipodal"]), seed=st.integers(0, 2**31))
def test_fused_slerp_matches_a_float64_reference(shape, dtype, out_dtype, t, kind, seed):
    """|ours − ref| <= 4·2^-24·(|c_a·a| + |c_b·b|) + one rounding to the
    output dtype: the f64 sums are exact to far below f32, each coefficient
    is one rounding of an accurate value (2 ulp allowed), and the
    combination takes three f32 roundings."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(dtype)
    b = {"random": torch.randn(shape, generator=g), "colinear": 2 * a.float(), "antipodal": -0.5 * a.float()}[kind]
    b = b.to(dtype)
    out = torch.empty(shape, dtype=out_dtype)
    _, nonfinite, coefs = _core.interp_tensor(out, a, [b], "slerp", t=t)
    assert not nonfinite and len(coefs) == 1
    a64, b64 = a.double().numpy().ravel(), b.double().numpy().ravel()
    tf = float(np.float32(t))
    ca, cb = naive_slerp(tf, a64, b64)
    got_a, got_b = coefs[0]
    assert abs(got_a - ca) <= 4 * 2**-24 * abs(ca) + 1e-12 and abs(got_b - cb) <= 4 * 2**-24 * abs(cb) + 1e-12
    want = ca * a64 + cb * b64
    bound = 4 * 2**-24 * (np.abs(ca * a64) + np.abs(cb * b64)) + OUT_EPS[out_dtype] * np.abs(want) + 6e-8
    assert (np.abs(out.double().numpy().ravel() - want) <= bound).all()
    if kind != "random" and a.numel() and float(a.float().norm()) > 1e-8:
        assert coefs[0] == (np.float32(1) - np.float32(t), np.float32(t))  # (anti)colinear: the lerp


@given(shape=st.sampled_from([(0,), (1,), (9,), (8193,), (3, 2051), (6, 5), (1, 1)]), dtype=st.sampled_from(DTYPES),
       k=st.integers(2, 4), filter_wise=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_model_stock_matches_a_float64_reference(shape, dtype, k, filter_wise, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = 0.1 * torch.randn(shape, generator=g)
    models = [(base + shared + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(k)]
    base = base.to(dtype)
    out = torch.empty(shape, dtype=torch.float32)
    row_len = shape[-1] if filter_wise and len(shape) > 1 else 0
    _, nonfinite, coefs = _core.interp_tensor(out, base, models, "model_stock", row_len=row_len)
    assert not nonfinite
    want_t = naive_stock(base.numpy() if dtype == torch.float32 else base.float().numpy(),
                         [m.float().numpy() for m in models], filter_wise)
    got_t = np.array([c[0] for c in coefs])
    assert got_t.shape == want_t.shape
    np.testing.assert_allclose(got_t, want_t, rtol=1e-6, atol=1e-7)
    # the combination: the torch reference's f32 steps, whose t differs by the f32 reductions only
    ref = model_stock(base.float(), [m.float() for m in models], filter_wise=filter_wise)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_the_same_bits_for_every_thread_count_and_from_files(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = torch.randn(257, 131, generator=g).bfloat16()
    models = [(base.float() + 0.05 * torch.randn(257, 131, generator=g)).bfloat16() for _ in range(3)]
    before = _core.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            _core.set_num_threads(threads)
            for how in (dict(method="slerp", t=0.3), dict(method="model_stock", row_len=131)):
                out = torch.empty_like(base)
                ms = models[:1] if how["method"] == "slerp" else models
                results.append((threads, how["method"], _core.interp_tensor(out, base, ms, **how), out))
    finally:
        _core.set_num_threads(before)
    for _, method, stats, out in results:
        first = next(r for r in results if r[1] == method)
        assert stats == first[2] and torch.equal(out.view(torch.int16), first[3].view(torch.int16)), method
    # streamed from safetensors files in small chunks: the in-memory bits
    paths = []
    for i, x in enumerate([base] + models):
        p = tmp_path / f"in{i}.safetensors"
        save_file({"w": x}, str(p))
        paths.append(p)
    out_path = tmp_path / "out.safetensors"
    save_file({"w": torch.zeros(257, 131, dtype=torch.bfloat16)}, str(out_path))

    def spec(p):
        raw = p.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        return (str(p), 8 + header, "BF16")  # one tensor: its data starts right after the header

    for method, ms, kw in (("slerp", paths[1:2], dict(t=0.3)), ("model_stock", paths[1:], dict(row_len=131))):
        stats = _core.interp_tensor_files(spec(out_path), spec(paths[0]), [spec(p) for p in ms], 257 * 131, "BF16",
                                          method, chunk_len=1000, **kw)
        from safetensors.torch import load_file

        got = load_file(str(out_path))["w"]
        want = next(r for r in results if r[1] == method)
        assert stats == want[2] and torch.equal(got.view(torch.int16), want[3].view(torch.int16)), method


def test_nonfinite_inputs_fall_back_to_the_torch_reference():
    a = torch.randn(40)
    b = torch.randn(40)
    b[7] = math.inf
    out = torch.full((40,), 5.0)
    _, nonfinite, _ = _core.interp_tensor(out, a, [b], "slerp", t=0.5)
    assert nonfinite and torch.equal(out, torch.full((40,), 5.0))  # nothing written
    with pytest.raises(ValueError, match=r"models\[0\]: non-finite value inf at flat index 7"):
        merge_tensors("slerp", a, [b], t=0.5)
    got = merge_tensors("slerp", a, [b], t=0.5, check_finite=False)  # the torch kernel's result, as before
    torch.testing.assert_close(got, slerp(0.5, a, b), rtol=0, atol=0, equal_nan=True)
