"""The CUDA implicit projection (cuda/importance.cu) against the CPU one:
the same Philox signs bit for bit (projecting unit vectors reads R back),
outputs within 1e-5 relative (the kernel sums in the CPU's order, so they are
expected to be bitwise equal; 1e-5 is the documented contract), and ΦᵀΦ
accumulated on the device. The `gram` option is also checked on the CPU."""

import pytest
import torch

from ferrox.importance.trak import project

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_gram_accumulates_phi_t_phi_on_the_cpu():
    g = torch.randn(7, 300, generator=torch.Generator().manual_seed(0))
    gram = torch.ones(33, 33, dtype=torch.float64)
    phi = project(g, 33, seed=5, gram=gram)
    want = 1 + phi.double().T @ phi.double()
    torch.testing.assert_close(gram, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="gram"):
        project(g, 33, seed=5, gram=torch.zeros(32, 33))


@pytest.mark.gpu
@pytest.mark.parametrize("d,p,seed", [(300, 33, 1), (1031, 257, 2**64 - 3)])
def test_cuda_signs_are_bitwise_the_cpu_signs(d, p, seed):
    eye = torch.eye(d)
    cpu = project(eye, p, seed=seed)
    gpu = project(eye.cuda(), p, seed=seed)
    assert gpu.device.type == "cuda"
    # e_j projects to R[:, j]/√p exactly: the signs, compared as bits.
    assert torch.equal(torch.signbit(gpu.cpu()), torch.signbit(cpu))
    assert torch.equal(gpu.cpu().abs(), torch.full_like(cpu, p ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,p", [(1, 1, 1), (5, 129, 64), (33, 5000, 300), (32, 1 << 16, 2048)])
def test_cuda_projection_matches_the_cpu(dtype, n, d, p):
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d)).to(dtype)
    cpu = project(g, p, seed=11)
    gpu = project(g.cuda(), p, seed=11).cpu()
    scale = cpu.abs().max().clamp_min(1e-30)
    assert float((gpu - cpu).abs().max() / scale) <= 1e-5
    # The kernel follows the CPU's summation order: expected bit for bit.
    assert torch.equal(gpu.view(torch.int32), cpu.view(torch.int32))


@pytest.mark.gpu
def test_cuda_out_and_gram_stay_on_the_device():
    g = torch.randn(9, 700, device="cuda")
    out = torch.empty(9, 65, device="cuda")
    gram = torch.zeros(65, 65, dtype=torch.float64, device="cuda")
    assert project(g, 65, seed=3, out=out, gram=gram) is out
    cpu = project(g.cpu(), 65, seed=3)
    assert torch.equal(out.cpu(), cpu)
    torch.testing.assert_close(gram.cpu(), cpu.double().T @ cpu.double(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="out"):
        project(g, 65, seed=3, out=torch.empty(9, 65))


@pytest.mark.gpu
def test_cuda_projection_is_ordered_on_the_current_stream():
    # grads are written on a side stream behind a long sleep; a projection
    # queued on that stream must see them.
    s = torch.cuda.Stream()
    g = torch.full((4, 3000), float("nan"), device="cuda")
    src = torch.randn(4, 3000, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        g.copy_(src)
        phi = project(g, 128, seed=9)
    torch.cuda.synchronize()
    assert torch.equal(phi.cpu(), project(src.cpu(), 128, seed=9))
