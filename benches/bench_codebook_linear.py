"""The codebook linear (``CodebookLinear``'s kernel, ``_core.codebook_linear``)
against the dense matmul it replaces.

y = x·Ŵᵀ for x [batch, in], Ŵ a 4096x4096 (``--quick``: 1024 of its rows) weight
with 3- or 4-bit scalar codes, 4 row groups and row scales (the permutation
gather is a separate out-sized op, not timed). ferrox: the LUT kernel
reading the packed codes; torch: ``x @ W.T`` with the dense weight in the
activation dtype (f32, or bf16 weights for bf16 activations; on CUDA f16).
Batch 1, 4, 16, 64. Checked to agree first (both from the same decoded
weight: f32 to 1e-4, 16-bit to 2e-2 of the largest output).

One 4096x4096 matrix stays in a large last-level cache between runs (32 MiB
bf16; this box's L3 is 105 MiB), so those cases compare compute, not memory
traffic. The ``24x`` cases are a stack of 24 such matrices (a 400M-weight
model's linears), one call of each per timed run with the same x, as a
batch-1 decode step reads them: the dense weights (768 MiB bf16, 1.5 GiB
f32) come from DRAM, the codes (144 MiB at 3 bits, 192 MiB at 4) mostly too.

Achieved bandwidth: each case's note gives the bytes each side must read
(codes + codebooks + scales for ferrox, the dense weight for torch); divide
by the median time. CUDA cases (fp16) are listed only where torch sees a
device.
"""

import torch

from ferrox import _core, pack

NAME = "codebook_linear"
MAIN_COMPARATOR = "torch"

BATCHES = [1, 4, 16, 64]
GROUPS = 4


STACK = 24


def _cases():
    shape = "4096x4096"
    cases = [f"{shape} {b}bit b{n} {dt}" for b in (3, 4) for dt in ("f32", "bf16") for n in BATCHES]
    cases += [f"{STACK}x{shape} {b}bit b{n} {dt}" for b in (3, 4) for dt in ("f32", "bf16") for n in (1, 4)]
    if torch.cuda.is_available():
        cases += [f"{shape} {b}bit b{n} cuda-f16" for b in (3, 4) for n in BATCHES]
    return cases


CASES = _cases()
CASE_NOTES = {}
for _c in CASES:
    *_n, _o, _i = map(int, _c.split()[0].split("x"))
    _n = _n[0] if _n else 1
    _b = int(_c.split()[1][0])
    _dense = _n * _o * _i * (4 if _c.endswith(" f32") else 2)
    _codes = _n * (_o * pack.packed_row_bytes(_i, _b) + GROUPS * 2 ** _b * 4 + _o * 4)
    CASE_NOTES[_c] = (f"bytes read: ferrox {_codes / 2**20:.2f} MiB (codes, codebooks, scales), "
                      f"torch {_dense / 2**20:.2f} MiB (dense weight); --quick: a quarter of the rows, a quarter of the bytes")


def _layer(out_f, in_f, bits, dtype, g):
    raw = torch.randint(2 ** bits, (out_f, in_f), dtype=torch.uint8, generator=g)
    books = torch.sort(torch.randn(GROUPS, 2 ** bits, 1, generator=g) * 0.02, dim=1).values
    offsets = torch.tensor([round(k * out_f / GROUPS) for k in range(GROUPS + 1)], dtype=torch.int32)
    scale = torch.rand(out_f, generator=g) + 0.5
    rows_g = torch.searchsorted(offsets.long(), torch.arange(out_f), right=True) - 1
    dense = (books[rows_g.unsqueeze(1), raw.long(), 0] * scale[:, None]).to(dtype)
    return {"codes": pack.pack_codes(raw, bits), "codebooks": books, "offsets": offsets, "scale": scale,
            "dense": dense}


def setup(case, quick):
    shape, bits, batch, dt = case.split()
    *n, out_f, in_f = map(int, shape.split("x"))
    n = n[0] if n else 1
    out_f = out_f // 4 if quick else out_f
    bits, batch = int(bits[0]), int(batch[1:])
    device = "cuda" if dt.startswith("cuda") else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "cuda-f16": torch.float16}[dt]
    g = torch.Generator().manual_seed(0)
    layers = [_layer(out_f, in_f, bits, dtype, g) for _ in range(n)]
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    if device == "cuda":
        x = x.cuda()
        layers = [{k: v.cuda() for k, v in layer.items()} for layer in layers]
    ys = [torch.empty(batch, out_f, dtype=dtype, device=device) for _ in layers]
    return {"x": x, "layers": layers, "bits": bits, "ys": ys, "device": device}


def _sync(d):
    if d["device"] == "cuda":
        torch.cuda.synchronize()


def _ferrox(d):
    stream = torch.cuda.current_stream().cuda_stream if d["device"] == "cuda" else 0
    for layer, y in zip(d["layers"], d["ys"]):
        _core.codebook_linear(d["x"], layer["codes"], layer["codebooks"], layer["offsets"], layer["scale"], None,
                              d["bits"], 1, y, stream)
    _sync(d)
    return torch.stack([y.float().cpu() for y in d["ys"]])


def _torch(d):
    ys = [d["x"] @ layer["dense"].T for layer in d["layers"]]
    _sync(d)
    return torch.stack([y.float().cpu() for y in ys])


SIDES = {"ferrox": _ferrox, "torch": _torch}


def check(results, case, inputs):
    f, t = results["ferrox"], results["torch"]
    tol = 1e-4 if case.endswith(" f32") else 2e-2
    scale = t.abs().max().item()
    err = (f - t).abs().max().item()
    assert err <= tol * scale, f"{case}: max error {err} vs scale {scale}"
