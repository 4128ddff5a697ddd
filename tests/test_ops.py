"""axpby: the first fused kernel, against torch on CPU and (gpu) CUDA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ferrox
from ferrox.ops import axpby

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(a, x, b, y):
    # Two f32 products and one f32 add, rounded once: ferrox's documented order.
    return ((a * x.float()) + (b * y.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1_000_003])
def test_axpby_matches_torch_bitwise(dtype, n, rng):
    x = torch.randn(n, generator=rng).to(dtype)
    y = torch.randn(n, generator=rng).to(dtype)
    out = torch.empty_like(x)
    axpby(out, 0.75, x, -1.25, y)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       reference(0.75, x, -1.25, y).view(torch.int16 if dtype != torch.float32 else torch.int32))


@given(st.integers(0, 300), st.floats(-4, 4, width=32), st.floats(-4, 4, width=32), st.sampled_from(DTYPES))
@settings(max_examples=settings.default.max_examples * 3 // 5, deadline=None)
def test_axpby_property(n, a, b, dtype):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 100).to(dtype)
    y = (torch.randn(n, generator=g) * 100).to(dtype)
    out = axpby(torch.empty_like(x), a, x, b, y)
    torch.testing.assert_close(out, reference(a, x, b, y), rtol=0, atol=0, equal_nan=True)


def test_axpby_non_contiguous_inputs_are_handled(rng):
    base = torch.randn(64, 32, generator=rng)
    x = base.t()  # strided view
    y = torch.randn(32, 64, generator=rng)
    out = axpby(torch.empty(32, 64), 2.0, x, 3.0, y)
    assert torch.equal(out, reference(2.0, x, 3.0, y))


def test_axpby_non_contiguous_output_is_refused(rng):
    x = torch.randn(32, 64, generator=rng)
    out = torch.empty(64, 32).t()
    with pytest.raises(ValueError, match="out: output tensors must be contiguous"):
        axpby(out, 1.0, x, 1.0, x)


def test_axpby_in_place_aliasing(rng):
    x = torch.randn(1000, generator=rng)
    y = torch.randn(1000, generator=rng)
    want_x = reference(0.5, x, 2.0, y)
    xc = x.clone()
    axpby(xc, 0.5, xc, 2.0, y)
    assert torch.equal(xc, want_x)
    yc = y.clone()
    axpby(yc, 0.5, x, 2.0, yc)
    assert torch.equal(yc, want_x)
    z = x.clone()
    axpby(z, 0.5, z, 2.0, z)
    assert torch.equal(z, reference(0.5, x, 2.0, x))


def test_axpby_partial_overlap_is_refused(rng):
    buf = torch.randn(1001, generator=rng)
    with pytest.raises(ValueError, match="overlaps input x"):
        axpby(buf[1:], 1.0, buf[:-1], 1.0, torch.ones(1000))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_cuda_matches_cpu_bitwise(dtype, rng):
    x = torch.randn(1_000_003, generator=rng).to(dtype)
    y = torch.randn(1_000_003, generator=rng).to(dtype)
    want = axpby(torch.empty_like(x), 1.5, x, -0.5, y)
    got = axpby(torch.empty_like(x, device="cuda"), 1.5, x.cuda(), -0.5, y.cuda())
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu(), reference(1.5, x, -0.5, y))


@pytest.mark.gpu
def test_axpby_cuda_orders_with_torch_streams():
    """Input written on a side stream behind a pending sleep; ferrox runs
    under torch.cuda.stream(s) with no sync and must see the final input."""
    n = 1 << 22
    s = torch.cuda.Stream()
    x = torch.zeros(n, device="cuda")
    y = torch.ones(n, device="cuda")
    out = torch.empty(n, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles, still pending
        x.fill_(3.0)
        axpby(out, 2.0, x, 1.0, y)
    s.synchronize()
    assert torch.all(out == 7.0)


@pytest.mark.gpu
def test_axpby_cuda_device_mismatch_is_refused():
    x = torch.ones(8, device="cuda")
    with pytest.raises(TypeError, match="y: on cpu but out is on cuda:0"):
        axpby(torch.empty_like(x), 1.0, x, 1.0, torch.ones(8))
