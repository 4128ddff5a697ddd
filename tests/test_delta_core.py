"""BitDelta's Rust core through ferrox._core: compression (signs in the pack
layout, α in f64, the base's content hash, streamed from files), restore
rounded once from f64, and the 1-bit matmul (single and multi-tenant)
against dense references built here with torch/numpy."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrox import _core

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK = 1 << 16  # α's summation block (rust/core/src/delta/mod.rs)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def pair(shape, dtype, seed, ties=True):
    """base and a fine-tune of it: small deltas, exact ties and ±0 pairs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    ft = (base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype)
    if ties:
        u = torch.rand(shape, generator=g)
        ft = torch.where(u < 0.1, base, ft)
        zero = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0).to(dtype)
        base = torch.where(u > 0.95, zero, base)
        ft = torch.where(u > 0.95, -zero, ft)
    return base.contiguous(), ft.contiguous()


def rows_of(t):
    return t.reshape(-1, t.shape[-1])


def ref_signs(base, ft):
    """Bit 1 iff ft − base < 0 (in f64), rows packed LSB first."""
    neg = (rows_of(ft).double() - rows_of(base).double()) < 0
    return np.packbits(neg.numpy().astype(np.uint8), axis=-1, bitorder="little")


def compress(base, ft, per_row=False, chunk_len=0):
    signs = torch.full((*base.shape[:-1], (base.shape[-1] + 7) // 8), 0xA5, dtype=torch.uint8)
    rows = torch.empty(base.numel() // base.shape[-1]) if per_row else None
    alpha, h = _core.delta_compress(base, ft, signs, rows, chunk_len)
    return alpha, h, signs, rows


def unpack(signs, n):
    """±1 (f64) from packed rows of n columns."""
    bits = np.unpackbits(rows_of(signs).numpy(), axis=-1, bitorder="little")[:, :n]
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


@given(st.sampled_from(DTYPES), st.integers(1, 6), st.integers(1, 200), st.integers(0, 2**31))
@settings(deadline=None)
def test_compress_matches_the_reference(dtype, rows, cols, seed):
    base, ft = pair((rows, cols), dtype, seed)
    alpha, h, signs, row_alpha = compress(base, ft, per_row=True)
    assert np.array_equal(signs.numpy(), ref_signs(base, ft))  # padding bits are 0
    d = (ft.double() - base.double()).abs()
    assert alpha == pytest.approx(d.mean().item(), rel=1e-12, abs=0)
    assert torch.allclose(row_alpha.double(), d.mean(-1), rtol=1e-6, atol=0)
    assert isinstance(h, str) and len(h) == 16 and _core.delta_hash_name() == "xxh3-64"


def test_zero_and_negative_zero_deltas_are_plus_one():
    base = torch.tensor([[1.0, -0.0, 0.0, 2.0, -0.0, 0.0, 3.0, 4.0, 5.0]])
    ft = torch.tensor([[1.0, 0.0, -0.0, 1.0, -0.0, 0.0, 3.5, -4.0, 5.0]])
    alpha, _, signs, _ = compress(base, ft)
    assert signs.tolist() == [[0b1000_1000, 0]]  # only 2 -> 1 and 4 -> -4
    assert alpha == (1.0 + 0.5 + 8.0) / 9


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_is_identical_for_every_chunk_length(dtype):
    base, ft = pair((7, 13), dtype, 1)
    want = compress(base, ft, per_row=True)
    for chunk in range(1, base.numel() + 2):
        got = compress(base, ft, per_row=True, chunk_len=chunk)
        assert got[0] == want[0] and got[1] == want[1]
        assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    # Past several α blocks, rows of 8k and of a length that is not.
    for shape in [(3, 50_000), (5, 40_003)]:
        base, ft = pair(shape, dtype, 2)
        want = compress(base, ft, per_row=True)
        for chunk in [8, 1000, BLOCK - 8, BLOCK + 1, 3 * BLOCK]:
            got = compress(base, ft, per_row=True, chunk_len=chunk)
            assert got[0] == want[0] and got[1] == want[1], chunk
            assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]), chunk


def test_alpha_is_identical_for_one_and_two_threads():
    base, ft = pair((9, 40_000), torch.bfloat16, 3)
    results = []
    try:
        for n in (1, 2):
            _core.set_num_threads(n)
            results.append(compress(base, ft, per_row=True, chunk_len=BLOCK + 8))
    finally:
        _core.set_num_threads(os.cpu_count() or 1)
    (a1, h1, s1, r1), (a2, h2, s2, r2) = results
    assert a1 == a2 and h1 == h2 and torch.equal(s1, s2) and torch.equal(r1, r2)


def test_alpha_star_beats_every_alpha_on_a_grid():
    base, ft = pair((64, 96), torch.float32, 4)
    alpha, _, signs, _ = compress(base, ft)
    d = ft.double() - base.double()
    s = unpack(signs, 96)

    def err(a):
        return ((d - a * s) ** 2).sum().item()

    best = err(alpha)
    for a in np.linspace(0.0, 3.0 * alpha, 301):
        assert best <= err(a) * (1 + 1e-12), a


def test_base_hash_follows_the_base_bytes():
    base, ft = pair((4, 64), torch.bfloat16, 5)
    _, h, _, _ = compress(base, ft)
    _, h_again, _, _ = compress(base.clone(), ft + 1)
    assert h == h_again  # the fine-tune does not enter the hash
    other = base.clone()
    other.view(torch.int16)[2, 3] ^= 1
    assert compress(other, ft)[1] != h


def _write_raw(path, pad, t):
    with open(path, "wb") as f:
        f.write(b"\x07" * pad)
        f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (96, 1024)), (torch.float16, (33, 77)), (torch.float32, (3, 70_000))])
def test_file_streaming_equals_memory(tmp_path, dtype, shape):
    base, ft = pair(shape, dtype, 6)
    name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    _write_raw(tmp_path / "b.bin", 16, base)
    _write_raw(tmp_path / "f.bin", 40, ft)
    alpha, h, signs, rows = compress(base, ft, per_row=True)
    nbytes = signs.numel()
    out = tmp_path / "o.bin"
    for chunk in [0, 4096, BLOCK + 8]:
        out.write_bytes(b"\xee" * (nbytes + 64))
        a, row_alphas, hf = _core.delta_compress_files(
            (str(tmp_path / "b.bin"), 16, name), (str(tmp_path / "f.bin"), 40, name),
            base.numel(), shape[-1], (str(out), 32), True, chunk)
        assert a == alpha and hf == h
        assert torch.equal(torch.tensor(row_alphas, dtype=torch.float32), rows)
        data = out.read_bytes()
        assert data[32:32 + nbytes] == signs.numpy().tobytes()
        assert data[:32] == b"\xee" * 32 and data[32 + nbytes:] == b"\xee" * 32
    a, none, _ = _core.delta_compress_files(
        (str(tmp_path / "b.bin"), 16, name), (str(tmp_path / "f.bin"), 40, name), base.numel(), shape[-1], (str(out), 32))
    assert a == alpha and none is None


def test_file_errors_name_what_is_wrong(tmp_path):
    base, ft = pair((4, 16), torch.bfloat16, 7)
    _write_raw(tmp_path / "b.bin", 0, base)
    _write_raw(tmp_path / "f.bin", 0, ft.to(torch.float16))
    (tmp_path / "o.bin").write_bytes(bytes(8))
    with pytest.raises(TypeError, match=r"finetuned: dtype float16 \(.*f.bin\) does not match base bfloat16 \(.*b.bin\)"):
        _core.delta_compress_files((str(tmp_path / "b.bin"), 0, "BF16"), (str(tmp_path / "f.bin"), 0, "F16"), 64, 16,
                                   (str(tmp_path / "o.bin"), 0))
    (tmp_path / "big.bin").write_bytes(bytes(64))
    with pytest.raises(ValueError, match="truncated"):
        _core.delta_compress_files((str(tmp_path / "b.bin"), 0, "BF16"), (str(tmp_path / "b.bin"), 0, "BF16"), 65, 13,
                                   (str(tmp_path / "big.bin"), 0))
    with pytest.raises(ValueError, match="the packed signs end at byte 9 but the file has 8 bytes"):
        _core.delta_compress_files((str(tmp_path / "b.bin"), 0, "BF16"), (str(tmp_path / "b.bin"), 0, "BF16"), 64, 16,
                                   (str(tmp_path / "o.bin"), 1))


def test_compress_errors_name_what_is_wrong():
    base, ft = pair((4, 10), torch.float32, 8)
    with pytest.raises(ValueError, match=r"ft: shape \[4, 9\] does not match base shape \[4, 10\]"):
        _core.delta_compress(base, ft[:, :9].contiguous(), torch.empty(4, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="ft: dtype float16 does not match base"):
        _core.delta_compress(base, ft.half(), torch.empty(4, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"signs_out: expected shape \[4, 2\], got \[4, 1\]"):
        _core.delta_compress(base, ft, torch.empty(4, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"row_alpha_out: expected shape \[4\]"):
        _core.delta_compress(base, ft, torch.empty(4, 2, dtype=torch.uint8), torch.empty(3))
    bad = ft.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match="finetuned: non-finite value NaN at flat index 27"):
        _core.delta_compress(base, bad, torch.empty(4, 2, dtype=torch.uint8))
    bad = base.clone()
    bad[3, 1] = float("-inf")
    with pytest.raises(ValueError, match="base: non-finite value -inf at flat index 31"):
        _core.delta_compress(bad, ft, torch.empty(4, 2, dtype=torch.uint8))


def round_once(v: torch.Tensor, dtype) -> torch.Tensor:
    """float64 -> dtype, correctly rounded (nearest, ties to the even bit
    pattern). torch goes through float32 (two roundings), so for 16-bit types
    the nearest of a guess's neighbours is picked here (values away from 0)."""
    if dtype == torch.float32:
        return v.float()
    guess = v.float().to(dtype).view(torch.int16).long()
    cands = torch.stack([guess - 1, guess, guess + 1])
    dist = (cands.to(torch.int16).view(dtype).double() - v).abs()
    dist = torch.where(torch.isnan(dist), torch.inf, dist)  # a neighbour past ±0 or ±inf
    nearest = dist == dist.min(0).values
    score = torch.where(nearest, (cands % 2 != 0).long(), torch.full_like(cands, 2))
    return cands.gather(0, score.argmin(0)[None])[0].to(torch.int16).view(dtype)


@given(st.sampled_from(DTYPES), st.integers(1, 5), st.integers(1, 100), st.booleans(), st.integers(0, 2**31))
@settings(deadline=None)
def test_restore_equals_the_f64_reference_bitwise(dtype, rows, cols, per_row, seed):
    base, ft = pair((rows, cols), dtype, seed)
    base = torch.where(base.float().abs() < 0.1, torch.tensor(0.5).to(dtype), base)  # away from 0
    alpha, _, signs, row_alpha = compress(base, ft, per_row=True)
    a = row_alpha if per_row else alpha
    out = torch.empty_like(base)
    _core.delta_restore(base, signs, a, out)
    scale = row_alpha.double()[:, None] if per_row else alpha
    want = round_once(base.double() + scale * unpack(signs, cols), dtype)
    assert torch.equal(out.view(INTS[dtype]), want.view(INTS[dtype]))


def test_restore_rounds_once_not_through_float32():
    # 1 + 2^-8 + 2^-52: through f32 it is the bf16 tie 1 + 2^-8 (rounds to even,
    # 1.0); rounded once it is above the tie and goes up to 1 + 2^-7.
    base = torch.ones(1, 1, dtype=torch.bfloat16)
    a = float(np.nextafter(1.0 + 2.0**-8, 2.0)) - 1.0
    out = torch.empty_like(base)
    _core.delta_restore(base, torch.zeros(1, 1, dtype=torch.uint8), a, out)
    assert out.item() == 1.0 + 2.0**-7


def test_restore_errors_name_what_is_wrong():
    base = torch.zeros(3, 10)
    signs = torch.zeros(3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"signs: expected shape \[3, 2\], got \[3, 1\]"):
        _core.delta_restore(base, signs[:, :1], 1.0, torch.empty_like(base))
    with pytest.raises(ValueError, match=r"alpha: expected shape \[3\], got \[4\]"):
        _core.delta_restore(base, signs, torch.ones(4), torch.empty_like(base))
    with pytest.raises(TypeError, match="out: dtype float16 does not match base"):
        _core.delta_restore(base, signs, 1.0, torch.empty(3, 10, dtype=torch.float16))


def dense_ref(x, signs, alpha, in_features):
    """α ⊙ (x · Sᵀ) in f64 with S spelled out (±1)."""
    s = unpack(signs, in_features)
    return (x.double().reshape(-1, in_features) @ s.T) * alpha


def assert_close(got, want, x, alpha, dtype):
    # rtol, with an absolute floor of rtol times the row's typical output
    # size α·‖x_b‖₂ (outputs near 0 come from cancellation).
    norm = x.double().reshape(-1, x.shape[-1]).norm(dim=-1, keepdim=True) * (alpha.abs() if torch.is_tensor(alpha) else abs(alpha))
    err = (got.double().reshape(want.shape) - want).abs()
    assert bool((err <= TOL[dtype] * (want.abs() + norm)).all()), (err.max().item(), dtype)


@given(st.sampled_from(DTYPES), st.integers(1, 20), st.integers(1, 300), st.integers(1, 40), st.booleans(),
       st.integers(0, 2**31))
@settings(deadline=None)
def test_matmul_matches_the_dense_reference(dtype, batch, inf, out, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inf, generator=g).to(dtype)
    signs = torch.randint(0, 256, (out, (inf + 7) // 8), dtype=torch.uint8, generator=g)  # padding bits too
    alpha = (torch.rand(out, generator=g) + 0.1) if per_row else 0.25
    y = torch.empty(batch, out, dtype=dtype)
    _core.delta_matmul(x, signs, alpha, y)
    a = alpha.double() if per_row else alpha
    want = dense_ref(x, signs, a, inf)
    assert_close(y, want, x, a, dtype)
    # Accumulating adds α·(x·Sᵀ) to what out holds, rounded once.
    y0 = torch.randn(batch, out, generator=g).to(dtype)
    acc = y0.clone()
    _core.delta_matmul(x, signs, alpha, acc, accumulate=True)
    if dtype == torch.float32:
        assert torch.equal(acc, y0 + y)  # y is α·sum exactly in f32
    else:  # one rounding of y0 + α·sum to the 16-bit type
        err = (acc.double() - y0.double() - want).abs()
        assert bool((err <= TOL[dtype] * (y0.double().abs() + want.abs() + 1e-3)).all()), err.max().item()


def test_matmul_takes_leading_dims_and_is_deterministic():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 50, generator=g)
    signs = torch.randint(0, 256, (7, 7), dtype=torch.uint8, generator=g)
    y = torch.empty(2, 3, 7)
    _core.delta_matmul(x, signs, 0.5, y)
    flat = torch.empty(6, 7)
    _core.delta_matmul(x.reshape(6, 50), signs, 0.5, flat)
    assert torch.equal(y.reshape(6, 7), flat)
    assert_close(flat, dense_ref(x, signs, 0.5, 50), x, 0.5, torch.float32)
    big_x = torch.randn(9, 700, generator=g)
    big_s = torch.randint(0, 256, (300, 88), dtype=torch.uint8, generator=g)
    outs = []
    try:
        for n in (1, 2):
            _core.set_num_threads(n)
            o = torch.empty(9, 300)
            _core.delta_matmul(big_x, big_s, 1.0, o)
            outs.append(o)
    finally:
        _core.set_num_threads(os.cpu_count() or 1)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_multi_tenant_rows_equal_single_tenant(dtype, per_row):
    g = torch.Generator().manual_seed(10)
    tenants, batch, inf, out = 5, 13, 130, 37
    x = torch.randn(batch, inf, generator=g).to(dtype)
    signs = torch.randint(0, 256, (tenants, out, (inf + 7) // 8), dtype=torch.uint8, generator=g)
    alphas = torch.rand((tenants, out) if per_row else (tenants,), generator=g) + 0.1
    ids = torch.randint(0, tenants, (batch,), generator=g)
    y = torch.randn(batch, out, generator=g).to(dtype)
    y0 = y.clone()
    _core.delta_matmul_multi(x, signs, alphas, ids, y, accumulate=True)
    for b in range(batch):
        t = ids[b].item()
        row = y0[b:b + 1].clone()
        _core.delta_matmul(x[b:b + 1], signs[t], alphas[t] if per_row else alphas[t].item(), row, accumulate=True)
        assert torch.equal(row[0].view(INTS[dtype]), y[b].view(INTS[dtype])), (b, t)


def test_matmul_errors_name_what_is_wrong():
    x = torch.randn(3, 20)
    signs = torch.zeros(4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"signs: expected shape \[out_features, 3\] for in_features 20, got \[4, 2\]"):
        _core.delta_matmul(x, signs[:, :2].contiguous(), 1.0, torch.empty(3, 4))
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 4\], got \[3, 5\]"):
        _core.delta_matmul(x, signs, 1.0, torch.empty(3, 5))
    with pytest.raises(TypeError, match=r"out: dtype bfloat16 does not match x \(float32\)"):
        _core.delta_matmul(x, signs, 1.0, torch.empty(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"alpha: expected shape \[1\] or \[4\], got \[3\]"):
        _core.delta_matmul(x, signs, torch.ones(3), torch.empty(3, 4))
    stacked = torch.zeros(2, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\]: expected a fine-tune index in \[0, 2\), got 2"):
        _core.delta_matmul_multi(x, stacked, torch.ones(2), torch.tensor([0, 2, 1]), torch.empty(3, 4))
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape \[3\], got \[2\]"):
        _core.delta_matmul_multi(x, stacked, torch.ones(2), torch.tensor([0, 1]), torch.empty(3, 4))
    with pytest.raises(TypeError, match="adapter_ids: expected dtype int64, got int32"):
        _core.delta_matmul_multi(x, stacked, torch.ones(2), torch.tensor([0, 1, 1], dtype=torch.int32), torch.empty(3, 4))
    with pytest.raises(ValueError, match="alphas: expected a float32 tensor"):
        _core.delta_matmul_multi(x, stacked, 1.0, torch.tensor([0, 1, 1]), torch.empty(3, 4))


MEMORY_CHILD = textwrap.dedent(
    """
    import json, torch
    from ferrox import _core

    def status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])

    out_f, in_f = 11008, 4096
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 256, (out_f, in_f // 8), dtype=torch.uint8, generator=g)
    x = torch.randn(4, in_f, generator=g)
    y = torch.empty(4, out_f)
    _core.delta_matmul(x[:1], signs[:8], 1.0, y[:1, :8])  # thread pool and code paged in
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    baseline = status_kb("VmRSS")
    _core.delta_matmul(x, signs, 0.5, y)
    print(json.dumps({"baseline_kb": baseline, "peak_kb": status_kb("VmHWM")}))
    """
)


def test_matmul_memory_is_far_below_the_dense_weight():
    """A forward on an 11008x4096 layer must not unpack S (or build W_ft):
    peak RSS grows by less than 1/8 of the dense f32 weight's bytes."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.fail("needs /proc/self/clear_refs to measure the peak RSS of the child")
    r = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout.strip().splitlines()[-1])
    grown = (mem["peak_kb"] - mem["baseline_kb"]) * 1024
    limit = 11008 * 4096 * 4 / 8
    print(f"delta_matmul 11008x4096: peak RSS +{grown / 2**20:.1f} MiB (limit {limit / 2**20:.1f} MiB)")
    assert grown < limit


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 4, 16, 37])
def test_cuda_matmul_matches_cpu_bitwise(dtype, batch):
    g = torch.Generator().manual_seed(batch)
    inf, out = 4100, 300
    x = torch.randn(batch, inf, generator=g).to(dtype)
    signs = torch.randint(0, 256, (out, (inf + 7) // 8), dtype=torch.uint8, generator=g)
    alpha = torch.rand(out, generator=g)
    want = torch.randn(batch, out, generator=g).to(dtype)
    got = want.cuda()
    _core.delta_matmul(x, signs, alpha, want, accumulate=True)
    _core.delta_matmul(x.cuda(), signs.cuda(), alpha.cuda(), got, accumulate=True,
                       stream=torch.cuda.current_stream().cuda_stream)
    assert torch.equal(got.cpu().view(INTS[dtype]), want.view(INTS[dtype]))
    ys = torch.empty(batch, out, dtype=dtype, device="cuda")
    _core.delta_matmul(x.cuda(), signs.cuda(), 0.5, ys, stream=torch.cuda.current_stream().cuda_stream)
    yc = torch.empty(batch, out, dtype=dtype)
    _core.delta_matmul(x, signs, 0.5, yc)
    assert torch.equal(ys.cpu().view(INTS[dtype]), yc.view(INTS[dtype]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_multi_tenant_matches_cpu_bitwise(dtype):
    g = torch.Generator().manual_seed(11)
    tenants, batch, inf, out = 8, 8, 4096, 512
    x = torch.randn(batch, inf, generator=g).to(dtype)
    signs = torch.randint(0, 256, (tenants, out, inf // 8), dtype=torch.uint8, generator=g)
    alphas = torch.rand(tenants, generator=g)
    ids = torch.randperm(tenants, generator=g)
    want = torch.empty(batch, out, dtype=dtype)
    _core.delta_matmul_multi(x, signs, alphas, ids, want)
    got = torch.empty(batch, out, dtype=dtype, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _core.delta_matmul_multi(x.cuda(), signs.cuda(), alphas.cuda(), ids.cuda(), got, stream=stream)
    assert torch.equal(got.cpu().view(INTS[dtype]), want.view(INTS[dtype]))
    with pytest.raises(ValueError, match="adapter_ids: expected fine-tune indices in"):
        _core.delta_matmul_multi(x.cuda(), signs.cuda(), alphas.cuda(), (ids + 1).cuda(), got, stream=stream)


def test_alpha_of_one_tenant_may_be_a_one_element_tensor():
    """alphas [1] for a single tenant is a tensor, not a number (torch
    converts one-element tensors to float); 0-d tensors and numpy scalars are
    numbers."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, generator=g)
    signs = torch.randint(0, 256, (1, 9, 5), dtype=torch.uint8, generator=g)
    y1, y2, y3 = (torch.zeros(2, 9) for _ in range(3))
    _core.delta_matmul_multi(x, signs, torch.tensor([0.25]), torch.zeros(2, dtype=torch.int64), y1)
    _core.delta_matmul(x, signs[0], torch.tensor(0.25), y2)
    _core.delta_matmul(x, signs[0], np.float32(0.25), y3)
    assert torch.equal(y1, y2) and torch.equal(y2, y3)


# ------------------------------------------------------------------ the fused linear


def fused_ref(x, w, bias, signs, alpha, inf):
    """x·(W + α ⊙ S)ᵀ + bias in f64, S spelled out (the dense fine-tune)."""
    s = unpack(signs, inf)
    a = alpha.double().reshape(-1, 1) if torch.is_tensor(alpha) else alpha
    w_ft = w.double() + a * s
    y = rows_of(x).double() @ w_ft.T
    return y + bias.double() if bias is not None else y


def linear_inputs(g, dtype, batch, inf, out, tenants=None):
    x = torch.randn(batch, inf, generator=g).to(dtype)
    w = (0.1 * torch.randn(out, inf, generator=g)).to(dtype)
    bias = torch.randn(out, generator=g).to(dtype)
    shape = (out, (inf + 7) // 8) if tenants is None else (tenants, out, (inf + 7) // 8)
    signs = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return x, w, bias, signs


@given(st.sampled_from(DTYPES), st.integers(1, 16), st.integers(1, 300), st.integers(1, 40), st.booleans(),
       st.booleans(), st.integers(0, 2**31))
@settings(deadline=None, max_examples=40)
def test_fused_linear_matches_the_dense_reference(dtype, batch, inf, out, per_row, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, bias, signs = linear_inputs(g, dtype, batch, inf, out)
    bias = bias if with_bias else None
    alpha = (torch.rand(out, generator=g) * 0.05 + 0.01) if per_row else 0.03
    y = torch.empty(batch, out, dtype=dtype)
    _core.delta_linear(x, w, bias, signs, alpha, None, y)
    want = fused_ref(x, w, bias, signs, alpha, inf)
    # Relative to the value, plus a slice of Σ|x|·(|W| + α) for cancellation
    # (x·W and α·x·S are rounded apart; their sum may cancel).
    a = alpha.double().reshape(-1, 1) if per_row else alpha
    norm = (x.double().abs() @ (w.double().abs() + a).T) * 0.1
    err = (y.double() - want).abs()
    assert bool((err <= TOL[dtype] * (want.abs() + norm)).all()), (err.max().item(), dtype)
    # The sign part is delta_matmul's bit for bit: with W = 0 and no bias
    # the fused result is exactly α·(x·Sᵀ).
    zero_w = torch.zeros_like(w)
    y0, ym = torch.empty_like(y), torch.empty_like(y)
    _core.delta_linear(x, zero_w, None, signs, alpha, None, y0)
    _core.delta_matmul(x, signs, alpha, ym)
    assert torch.equal(y0.view(INTS[dtype]), ym.view(INTS[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_rows_do_not_depend_on_the_batch_or_threads(dtype):
    g = torch.Generator().manual_seed(21)
    batch, inf, out = 16, 333, 70
    x, w, bias, signs = linear_inputs(g, dtype, batch, inf, out)
    full = torch.empty(batch, out, dtype=dtype)
    _core.delta_linear(x, w, bias, signs, 0.02, None, full)
    for size in (1, 3, 7):
        for s in range(0, batch, size):
            part = torch.empty(min(size, batch - s), out, dtype=dtype)
            _core.delta_linear(x[s:s + size].contiguous(), w, bias, signs, 0.02, None, part)
            assert torch.equal(part.view(INTS[dtype]), full[s:s + size].view(INTS[dtype])), (size, s)
    try:
        _core.set_num_threads(1)
        one = torch.empty_like(full)
        _core.delta_linear(x, w, bias, signs, 0.02, None, one)
    finally:
        _core.set_num_threads(os.cpu_count() or 1)
    assert torch.equal(one.view(INTS[dtype]), full.view(INTS[dtype]))
    # Leading dims are rows.
    lead = torch.empty(4, 4, out, dtype=dtype)
    _core.delta_linear(x.reshape(4, 4, inf), w, bias, signs, 0.02, None, lead)
    assert torch.equal(lead.reshape(batch, out).view(INTS[dtype]), full.view(INTS[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_multi_tenant_rows_equal_single_tenant(dtype, per_row, with_bias):
    g = torch.Generator().manual_seed(22 + per_row)
    tenants, batch, inf, out = 5, 13, 130, 37
    x, w, bias, signs = linear_inputs(g, dtype, batch, inf, out, tenants)
    bias = bias if with_bias else None
    alphas = torch.rand((tenants, out) if per_row else (tenants,), generator=g) * 0.05 + 0.01
    ids = torch.randint(0, tenants, (batch,), generator=g)
    y = torch.empty(batch, out, dtype=dtype)
    _core.delta_linear(x, w, bias, signs, alphas, ids, y)
    for b in range(batch):
        t = ids[b].item()
        row = torch.empty(1, out, dtype=dtype)
        _core.delta_linear(x[b:b + 1], w, bias, signs[t], alphas[t] if per_row else alphas[t].item(), None, row)
        assert torch.equal(row[0].view(INTS[dtype]), y[b].view(INTS[dtype])), (b, t)
        want = fused_ref(x[b:b + 1], w, bias, signs[t], alphas[t] if per_row else alphas[t].item(), inf)
        assert torch.allclose(row.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * 0.5)


def test_fused_linear_errors_name_what_is_wrong():
    x, w, b = torch.randn(3, 20), torch.randn(4, 20), torch.randn(4)
    signs = torch.zeros(4, 3, dtype=torch.uint8)
    y = torch.empty(3, 4)
    with pytest.raises(ValueError, match=r"weight: expected shape \[4, 20\], got \[4, 19\]"):
        _core.delta_linear(x, w[:, :19].contiguous(), b, signs, 1.0, None, y)
    with pytest.raises(TypeError, match=r"weight: dtype bfloat16 does not match x \(float32\)"):
        _core.delta_linear(x, w.bfloat16(), b, signs, 1.0, None, y)
    with pytest.raises(ValueError, match=r"bias: expected shape \[4\], got \[5\]"):
        _core.delta_linear(x, w, torch.randn(5), signs, 1.0, None, y)
    with pytest.raises(TypeError, match=r"bias: dtype float16 does not match x \(float32\)"):
        _core.delta_linear(x, w, b.half(), signs, 1.0, None, y)
    with pytest.raises(ValueError, match=r"signs: expected shape \[out_features, 3\] for in_features 20"):
        _core.delta_linear(x, w, b, torch.zeros(4, 2, dtype=torch.uint8), 1.0, None, y)
    with pytest.raises(ValueError, match=r"out: expected shape \[3, 4\], got \[3, 5\]"):
        _core.delta_linear(x, w, b, signs, 1.0, None, torch.empty(3, 5))
    with pytest.raises(ValueError, match=r"out.*weight"):
        _core.delta_linear(x, w, b, signs, 1.0, None, w.view(-1)[:12].view(3, 4))
    stacked = torch.zeros(2, 4, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\]: expected a fine-tune index in \[0, 2\), got 2"):
        _core.delta_linear(x, w, b, stacked, torch.ones(2), torch.tensor([0, 2, 1]), y)
    with pytest.raises(ValueError, match=r"adapter_ids: expected shape \[3\], got \[2\]"):
        _core.delta_linear(x, w, b, stacked, torch.ones(2), torch.tensor([0, 1]), y)
    with pytest.raises(ValueError, match="alphas: expected a float32 tensor"):
        _core.delta_linear(x, w, b, stacked, 1.0, torch.tensor([0, 1, 1]), y)
    with pytest.raises(ValueError, match=r"signs: expected shape \[tenants, out_features, 3\]"):
        _core.delta_linear(x, w, b, signs, torch.ones(2), torch.tensor([0, 1, 1]), y)


def test_modules_take_the_fused_kernel_only_for_small_cpu_batches_without_autograd():
    from unittest import mock

    from ferrox.delta import BitDeltaLinear, MultiDeltaLinear
    from ferrox.delta.modules import FUSED_MAX_ROWS

    torch.manual_seed(3)
    lin = torch.nn.Linear(70, 33)
    signs = torch.randint(0, 256, (2, 33, 9), dtype=torch.uint8)
    m = BitDeltaLinear(lin, signs[0], 0.01)
    multi = MultiDeltaLinear(lin, [m, (signs[1], 0.02)])
    calls = []
    real = _core.delta_linear

    def spy(*a):
        calls.append(a[0].shape[0])
        return real(*a)

    with mock.patch.object(_core, "delta_linear", side_effect=spy):
        with torch.no_grad():
            x = torch.randn(FUSED_MAX_ROWS, 70)
            y = m(x)
            ym = multi(x, torch.arange(FUSED_MAX_ROWS) % 2)
            m(torch.randn(FUSED_MAX_ROWS + 1, 70))  # above the threshold: torch's GEMM + delta_matmul
        assert calls == [FUSED_MAX_ROWS, FUSED_MAX_ROWS]
        m(x)  # the base weight requires grad: the autograd path
        assert len(calls) == 2
    want = torch.empty(FUSED_MAX_ROWS, 33)
    real(x, lin.weight.detach(), lin.bias.detach(), signs[0], 0.01, None, want)
    assert torch.equal(y, want)
    assert torch.equal(ym[0::2], want[0::2])
