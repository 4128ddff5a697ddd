"""The CUDA codebook linear (cuda/codebook.cu) on the device: against
dequantize-then-matmul in float64 with test_codebook_linear's stated
tolerance, and bit for bit against the CPU kernel (the kernel sums in the
CPU's order; the host simulation checks that in cargo test); the layer runs
on torch's current stream."""

import pytest
import torch

from ferrox.codebook.modules import CodebookEmbedding, CodebookLinear

from test_codebook_linear import DTYPES, assert_matches, reference_dense, tiny_quantize


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,d", [(2, 1), (3, 1), (4, 1), (8, 1), (3, 2), (4, 4)])
@pytest.mark.parametrize("batch", [1, 9])
def test_cuda_linear_matches_reference_and_cpu(dtype, bits, d, batch):
    g = torch.Generator().manual_seed(bits + 10 * d + batch)
    ct = tiny_quantize(torch.randn(75, 256, generator=g), bits, d, groups=3, permute=True, scale=True)
    bias = torch.randn(75, generator=g)
    cpu = CodebookLinear(ct, bias)
    gpu = CodebookLinear(ct, bias).cuda()
    x = torch.randn(batch, 256, generator=g).to(dtype)
    y = gpu(x.cuda())
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_matches(y.cpu(), x, reference_dense(ct), bias)
    assert torch.equal(y.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32),
                       cpu(x).view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.gpu
def test_cuda_linear_runs_on_the_current_stream():
    g = torch.Generator().manual_seed(1)
    ct = tiny_quantize(torch.randn(512, 1024, generator=g), 4, 1, groups=2, permute=True)
    layer = CodebookLinear(ct).cuda()
    x = torch.randn(4, 1024, generator=g).cuda()
    want = layer(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = layer(x * 1.0)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, want)


@pytest.mark.gpu
def test_cuda_embedding_lookup():
    g = torch.Generator().manual_seed(2)
    ct = tiny_quantize(torch.randn(200, 32, generator=g), 4, 2, groups=2, permute=True, scale=True)
    emb = CodebookEmbedding(ct).cuda()
    ids = torch.tensor([3, 199, 0, 3]).cuda()
    want = torch.from_numpy(reference_dense(ct)).float()[ids.cpu()]
    torch.testing.assert_close(emb(ids).cpu(), want, rtol=1e-6, atol=1e-7)
