"""CodebookLinear / CodebookEmbedding / apply_codebook (ferrox.codebook.modules)
and the LUT kernel behind them (_core.codebook_linear).

References are independent of the kernel: the weight is decoded element by
element from the format's definition (codebook_format: Ŵ_perm[r, c*d:(c+1)*d] =
row_scale[r]·codebooks[g(r), code[r, c]], Ŵ[perm[r]] = Ŵ_perm[r]) with numpy
and multiplied in float64. Tolerance for an output element y of dtype T:
|y − ref| ≤ 1e-5·(|x|·|Ŵ|ᵀ) + ulp_T·|ref| (f32 accumulation error of the
kernel's fixed-order sum plus the final rounding to T). The CodebookTensors
come from a tiny quantizer here (quantile codebooks, nearest assignment),
built to the format, so these tests do not depend on ferrox.codebook's
clustering."""

import copy
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ferrox import _core, pack
from ferrox.codebook import modules as cbm
from ferrox.codebook.modules import CodebookEmbedding, CodebookLinear, apply_codebook, fold_pairs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def tiny_quantize(w: torch.Tensor, bits: int, d: int = 1, groups: int = 1, permute: bool = False,
                  scale: bool = False, seed: int = 0):
    """A CodebookTensor-shaped namespace for w [out, in]: rows ordered by std
    (when permute), contiguous groups, per-row RMS scale (when scale), per
    group K = 2^bits codewords of d dims (scalar: quantiles, sorted, codes by
    bucketizing on the midpoints; vector: random sub-vectors, nearest by
    distance)."""
    w32 = w.detach().float()
    out, inf = w32.shape
    perm = torch.argsort(w32.std(1), stable=True) if permute else None
    wp = w32 if perm is None else w32[perm]
    rs = wp.pow(2).mean(1).sqrt().clamp_min(1e-12) if scale else None
    wn = wp if rs is None else wp / rs[:, None]
    offsets = [round(g * out / groups) for g in range(groups + 1)]
    k = 2 ** bits
    gen = torch.Generator().manual_seed(seed)
    codes = torch.empty(out, inf // d, dtype=torch.uint8)
    books = torch.empty(groups, k, d)
    for g in range(groups):
        vecs = wn[offsets[g]:offsets[g + 1]].reshape(-1, d)
        if vecs.shape[0] == 0:
            books[g] = 0
            continue
        if d == 1:
            srt = torch.sort(vecs[:, 0]).values
            books[g, :, 0] = srt[((torch.arange(k) + 0.5) / k * (srt.numel() - 1)).long()]
            nearest = torch.bucketize(vecs[:, 0], (books[g, 1:, 0] + books[g, :-1, 0]) / 2)
        else:
            books[g] = vecs[torch.randint(vecs.shape[0], (k,), generator=gen)]
            nearest = torch.cat([torch.cdist(v, books[g]).argmin(1) for v in vecs.split(1 << 18)])
        codes[offsets[g]:offsets[g + 1]] = nearest.to(torch.uint8).reshape(-1, inf // d)
    return types.SimpleNamespace(
        shape=(out, inf), dtype=w.dtype, bits=bits, vector_dim=d, codes=pack.pack_codes(codes, bits),
        codebooks=books, group_offsets=torch.tensor(offsets, dtype=torch.int32),
        perm=None if perm is None else perm.to(torch.int32), row_scale=rs, error=0.0)


def reference_dense(ct) -> np.ndarray:
    """Ŵ [out, in] in float64, in the original row order, from the definition."""
    out, inf = ct.shape
    d = ct.vector_dim
    codes = pack.unpack_codes(ct.codes, ct.bits, inf // d).numpy().astype(np.int64)
    books = ct.codebooks.double().numpy()
    offs = ct.group_offsets.numpy()
    g = np.searchsorted(offs, np.arange(out), side="right") - 1
    wp = books[g[:, None], codes].reshape(out, inf)
    if ct.row_scale is not None:
        wp = wp * ct.row_scale.double().numpy()[:, None]
    w = np.empty_like(wp)
    perm = np.arange(out) if ct.perm is None else ct.perm.numpy()
    w[perm] = wp
    return w


def assert_matches(y: torch.Tensor, x: torch.Tensor, w: np.ndarray, bias=None):
    xd = x.double().reshape(-1, w.shape[1]).numpy()
    ref = xd @ w.T + (0 if bias is None else bias.double().numpy())
    bound = 1e-5 * (np.abs(xd) @ np.abs(w).T) + ULP[y.dtype] * np.abs(ref) + 1e-30
    err = np.abs(y.double().reshape(ref.shape).numpy() - ref)
    assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_linear_matches_dequantize_then_matmul(dtype, bits, d):
    g = torch.Generator().manual_seed(bits * 10 + d)
    w = torch.randn(37, 64, generator=g)
    ct = tiny_quantize(w, bits, d, groups=3, permute=True, scale=(bits + d) % 2 == 0, seed=bits)
    bias = torch.randn(37, generator=g)
    layer = CodebookLinear(ct, bias)
    x = torch.randn(2, 3, 64, generator=g).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 37) and y.dtype == dtype
    assert_matches(y, x, reference_dense(ct), bias)
    # dequantize() is the same weight (the definition, through the module's decode).
    np.testing.assert_allclose(layer.dequantize().double().numpy(), reference_dense(ct), rtol=1e-6, atol=1e-7)


@given(st.integers(1, 8), st.sampled_from([1, 2, 4, 3]), st.integers(1, 40), st.integers(1, 20), st.integers(1, 9),
       st.integers(1, 4), st.booleans(), st.booleans(), st.sampled_from(DTYPES), st.integers(0, 2**31))
@settings(deadline=None)
def test_kernel_property(bits, d, out, codes_per_row, batch, groups, permute, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    inf = codes_per_row * d
    # Random codes and codebooks straight into the format (any bits, any groups).
    raw = torch.randint(2 ** bits, (out, inf // d), generator=g).to(torch.uint8)
    cuts = sorted(torch.randint(out + 1, (groups - 1,), generator=g).tolist())
    ct = types.SimpleNamespace(
        shape=(out, inf), dtype=torch.float32, bits=bits, vector_dim=d, codes=pack.pack_codes(raw, bits),
        codebooks=torch.randn(groups, 2 ** bits, d, generator=g),
        group_offsets=torch.tensor([0] + cuts + [out], dtype=torch.int32),
        perm=torch.randperm(out, generator=g).to(torch.int32) if permute else None,
        row_scale=torch.rand(out, generator=g) + 0.5 if scale else None, error=0.0)
    x = torch.randn(batch, inf, generator=g).to(dtype)
    layer = CodebookLinear(ct)
    assert_matches(layer(x), x, reference_dense(ct))


def test_kernel_rows_are_independent_of_the_batch():
    """The fixed summation order: a row's output is bitwise the same alone
    or inside a batch (and with the permutation applied or folded)."""
    g = torch.Generator().manual_seed(3)
    ct = tiny_quantize(torch.randn(50, 96, generator=g), 3, 1, groups=2, permute=True, scale=True)
    layer = CodebookLinear(ct)
    x = torch.randn(11, 96, generator=g)
    full = layer(x)
    for b in (0, 4, 10):
        assert torch.equal(layer(x[b:b + 1]), full[b:b + 1])
    layer.permuted_output = True
    assert torch.equal(layer(x)[:, torch.argsort(ct.perm.long())], full)


def test_core_rejects_bad_inputs():
    ct = tiny_quantize(torch.randn(8, 16), 4, 2, groups=2)
    x, y = torch.randn(1, 16), torch.empty(1, 8)
    args = dict(codes=ct.codes, codebooks=ct.codebooks, group_offsets=ct.group_offsets, row_scale=None, bias=None,
                bits=4, vector_dim=2)
    _core.codebook_linear(x, out=y, **args)
    with pytest.raises(ValueError, match="group_offsets"):
        _core.codebook_linear(x, out=y, **{**args, "group_offsets": torch.tensor([0, 5, 3], dtype=torch.int32)})
    with pytest.raises(Exception, match="codebooks"):
        _core.codebook_linear(x, out=y, **{**args, "codebooks": ct.codebooks[:, :8]})
    with pytest.raises(Exception, match="vector_dim"):
        _core.codebook_linear(torch.randn(1, 15), out=y, **args)
    with pytest.raises(Exception, match="out"):
        _core.codebook_linear(x, out=torch.empty(1, 8, dtype=torch.float16), **args)
    with pytest.raises(Exception, match="bias"):
        _core.codebook_linear(x, out=y, **{**args, "bias": torch.zeros(7)})
    layer = CodebookLinear(ct)
    with pytest.raises(TypeError, match="x"):
        layer(torch.zeros(1, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="16"):
        layer(torch.zeros(1, 15))
    bad = types.SimpleNamespace(**{**vars(ct), "codes": ct.codes[:, :-1]})
    with pytest.raises(ValueError, match="codes"):
        CodebookLinear(bad)
    bad = types.SimpleNamespace(**{**vars(ct), "perm": torch.zeros(8, dtype=torch.int32)})
    with pytest.raises(ValueError, match="perm"):
        CodebookLinear(bad)


def test_gradient_for_x_matches_the_dense_layer():
    g = torch.Generator().manual_seed(4)
    ct = tiny_quantize(torch.randn(20, 32, generator=g), 4, 1, groups=2, permute=True, scale=True)
    bias = torch.randn(20, generator=g)
    layer = CodebookLinear(ct, bias)
    dense = nn.Linear(32, 20)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(reference_dense(ct)).float())
        dense.bias.copy_(bias)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    up = torch.randn(3, 20, generator=g)
    (layer(x) * up).sum().backward()
    (dense(x2) * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_module_cast_to_bf16_keeps_f32_tables():
    g = torch.Generator().manual_seed(5)
    ct = tiny_quantize(torch.randn(16, 32, generator=g), 3, 1, scale=True)
    layer = CodebookLinear(ct, torch.randn(16, generator=g))
    x = torch.randn(4, 32, generator=g)
    y32 = layer(x)
    layer.to(torch.bfloat16)  # casts the float buffers: the forward converts them back
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)


_ALLOC_PROBE = r"""
import json, sys, torch, ferrox
from ferrox import pack
from ferrox.codebook.modules import CodebookLinear
import types
torch.manual_seed(0)
out, inf, bits = 4096, 4096, 4
ct = types.SimpleNamespace(shape=(out, inf), dtype=torch.float32, bits=bits, vector_dim=1,
    codes=pack.pack_codes(torch.randint(16, (out, inf), dtype=torch.uint8), bits),
    codebooks=torch.randn(4, 16, 1), group_offsets=torch.tensor([0, 1000, 2000, 3000, 4096], dtype=torch.int32),
    perm=torch.randperm(out).to(torch.int32), row_scale=torch.rand(out) + 0.5, error=0.0)
layer = CodebookLinear(ct, torch.randn(out))
x = torch.randn(8, inf)
def reset():  # restart the kernel's peak-RSS mark (VmHWM) at the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
layer(x[:1]); reset(); base = peak()
with torch.no_grad():
    for _ in range(3):
        layer(x)
fwd = peak() - base
reset(); base = peak()
w = layer.dequantize()
deq = peak() - base
print(json.dumps({"forward": fwd, "dequantize": deq, "weight": out * inf * 4}))
"""


def test_forward_allocates_no_weight_sized_tensor():
    """Peak RSS growth (VmHWM) of a child process over forward passes of a
    4096x4096 4-bit layer (64 MiB as dense f32, 8 MiB of codes) stays under
    an eighth of the dense weight, Rust-side buffers included; the same
    probe sees dequantize() (which builds the weight) grow by at least the
    weight's size, so the measurement can fail."""
    # Allocations of 1 MiB and up are mmapped (returned to the OS when freed),
    # so a weight-sized temporary cannot hide in memory an earlier free left
    # in the heap; the peak mark is reset before each measurement.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    res = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["forward"] < m["weight"] / 8, m
    assert m["dequantize"] >= m["weight"] * 0.9, m


# ------------------------------------------------------------ folding


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _quantize_all(model, bits, d=1, skip=()):
    tensors = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2 and not any(s in name for s in skip):
            tensors[name] = tiny_quantize(p, bits, d, groups=2, permute=True, scale=True, seed=len(tensors))
    return tensors


def _dense_copy(model, tensors):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, ct in tensors.items():
            m.get_parameter(name).copy_(torch.from_numpy(reference_dense(ct)).to(m.get_parameter(name).dtype))
    return m


def test_fold_pairs_finds_only_the_safe_patterns():
    seq = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.0), nn.Linear(32, 8), nn.LayerNorm(8),
                        nn.Linear(8, 4))
    assert fold_pairs(seq) == [("0", "3")]  # not across the LayerNorm
    assert fold_pairs(_Residual()) == []  # fc2 feeds a residual; nothing here is a known pattern
    nested = nn.Sequential(_Residual(), nn.Sequential(nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 2)))
    assert fold_pairs(nested) == [("1.0", "1.2")]


@pytest.mark.parametrize("consumer_quantized,d", [(True, 1), (False, 1), (True, 2)])
def test_folding_leaves_the_function_unchanged(consumer_quantized, d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    skip = () if consumer_quantized else ("2.weight", "4.weight")
    tensors = _quantize_all(model, 4, d, skip=skip)
    plain, folded = copy.deepcopy(model), copy.deepcopy(model)
    apply_codebook(plain, (tensors, {}))
    apply_codebook(folded, (tensors, {}), fold_permutation=True)
    dense = _dense_copy(model, tensors)
    x = torch.randn(5, 16)
    with torch.no_grad():
        yp, yf, yd = plain(x), folded(x), dense(x)
    torch.testing.assert_close(yp, yd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
    # The fold really happened where it is possible: scalar codes or a dense consumer.
    assert folded[0].permuted_output == (d == 1 or not consumer_quantized)
    if consumer_quantized:
        assert isinstance(folded[4], CodebookLinear) and not folded[4].permuted_output  # the model's output
    assert not plain[0].permuted_output


def test_fold_keeps_residual_rows_in_order():
    torch.manual_seed(1)
    model = _Residual().eval()
    tensors = _quantize_all(model, 4)
    folded = copy.deepcopy(model)
    apply_codebook(folded, (tensors, {}), fold_permutation=True)
    assert not folded.fc1.permuted_output and not folded.fc2.permuted_output
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), _dense_copy(model, tensors)(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ embeddings


def test_embedding_decodes_only_the_requested_rows(monkeypatch):
    g = torch.Generator().manual_seed(6)
    table = torch.randn(300, 24, generator=g)
    ct = tiny_quantize(table, 4, 2, groups=3, permute=True, scale=True)
    emb = CodebookEmbedding(ct)
    ids = torch.tensor([[5, 299, 0], [5, 17, 120]])
    seen = []
    real = cbm.decode_rows

    def spy(codes, codebooks, offsets, scale, rows, *a):
        seen.append(rows.numel())
        return real(codes, codebooks, offsets, scale, rows, *a)

    monkeypatch.setattr(cbm, "decode_rows", spy)
    got = emb(ids)
    assert seen == [ids.numel()]
    want = torch.from_numpy(reference_dense(ct)).float()[ids]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(IndexError):
        emb(torch.tensor([300]))


# ------------------------------------------------------------ MiniLM


@pytest.fixture(scope="module")
def minilm():
    from ferrox.testing import minilm as ml

    model, tok = ml.load()
    sentences = [p[0] for p in ml.sentence_pairs("statements")[:6]]
    return model, tok, ml.tokenize(tok, sentences)


def test_apply_codebook_on_minilm_matches_the_dequantized_model(minilm):
    """Layer 0's six matrices and every MLP matrix at 4 bits (2 groups,
    permuted, row scales) and the word embeddings (2 bits, d = 4): the swapped model's hidden states match the
    dense model holding the dequantized weights to 2e-4 (f32 summation order
    only; the hidden states are O(1)); folding the MLP permutations changes
    nothing beyond that; the 6 intermediate→output pairs are the only folds."""
    model, _, batch = minilm
    chosen = lambda n: (n.startswith("encoder.layer.0.") or ".intermediate." in n or
                        (".output.dense" in n and ".attention." not in n))
    tensors = {n: tiny_quantize(p, 4, 1, groups=2, permute=True, scale=True, seed=i)
               for i, (n, p) in enumerate(model.named_parameters()) if chosen(n) and p.dim() == 2}
    emb = "embeddings.word_embeddings.weight"
    tensors[emb] = tiny_quantize(model.get_parameter(emb), 2, 4, groups=1, seed=99)
    dense = _dense_copy(model, tensors)
    swapped, folded = copy.deepcopy(model), copy.deepcopy(model)
    new = apply_codebook(swapped, (tensors, {}))
    apply_codebook(folded, (tensors, {}), fold_permutation=True)
    assert len(new) == 17 and isinstance(swapped.embeddings.word_embeddings, CodebookEmbedding)
    pairs = fold_pairs(model)
    assert sorted(pairs) == sorted((f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense")
                                   for i in range(6))
    assert [n for n, m in folded.named_modules() if getattr(m, "permuted_output", False)] == [p for p, _ in sorted(pairs)]
    with torch.no_grad():
        hd = dense(**batch).last_hidden_state
        hs = swapped(**batch).last_hidden_state
        hf = folded(**batch).last_hidden_state
    assert float((hs - hd).abs().max()) <= 2e-4
    assert float((hf - hd).abs().max()) <= 2e-4
