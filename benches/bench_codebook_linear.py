"""The codebook linear (``CodebookLinear``'s kernel, ``_core.codebook_linear``)
against the dense matmul it replaces.

y = x·Ŵᵀ for x [batch, in], Ŵ a 4096x4096 (``--quick``: 1024 of its rows) weight
with 3- or 4-bit scalar codes, 4 row groups and row scales (the permutation
gather is a separate out-sized op, not timed). ferrox: the LUT kernel
reading the packed codes; torch: ``x @ W.T`` with the dense weight in the
activation dtype (f32, or bf16 weights for bf16 activations; on CUDA f16).
Batch 1, 4, 16, 64. Checked to agree first (both from the same decoded
weight: f32 to 1e-4, 16-bit to 2e-2 of the largest output).

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


def _cases():
    shape = "4096x4096"
    cases = [f"{shape} {b}bit b{n} {dt}" for b in (3, 4) for dt in ("f32", "bf16") for n in BATCHES]
    if torch.cuda.is_available():
        cases += [f"{shape} {b}bit b{n} cuda-f16" for b in (3, 4) for n in BATCHES]
    return cases


CASES = _cases()
CASE_NOTES = {}
for _c in CASES:
    _o, _i = map(int, _c.split()[0].split("x"))
    _b = int(_c.split()[1][0])
    _dense = _o * _i * (4 if _c.endswith(" f32") else 2)
    _codes = _o * pack.packed_row_bytes(_i, _b) + GROUPS * 2 ** _b * 4 + _o * 4
    CASE_NOTES[_c] = (f"bytes read: ferrox {_codes / 2**20:.2f} MiB (codes, codebooks, scales), "
                      f"torch {_dense / 2**20:.2f} MiB (dense weight); --quick: a quarter of the rows, a quarter of the bytes")


def setup(case, quick):
    shape, bits, batch, dt = case.split()
    out_f, in_f = map(int, shape.split("x"))
    out_f = out_f // 4 if quick else out_f
    bits, batch = int(bits[0]), int(batch[1:])
    device = "cuda" if dt.startswith("cuda") else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "cuda-f16": torch.float16}[dt]
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(2 ** bits, (out_f, in_f), dtype=torch.uint8, generator=g)
    books = torch.sort(torch.randn(GROUPS, 2 ** bits, 1, generator=g) * 0.02, dim=1).values
    offsets = torch.tensor([round(k * out_f / GROUPS) for k in range(GROUPS + 1)], dtype=torch.int32)
    scale = torch.rand(out_f, generator=g) + 0.5
    rows_g = torch.searchsorted(offsets.long(), torch.arange(out_f), right=True) - 1
    dense = (books[rows_g.unsqueeze(1), raw.long(), 0] * scale[:, None]).to(dtype)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    d = {"x": x, "codes": pack.pack_codes(raw, bits), "codebooks": books, "offsets": offsets, "scale": scale,
         "bits": bits, "dense": dense, "y": torch.empty(batch, out_f, dtype=dtype), "device": device}
    if device == "cuda":
        for k in ("x", "codes", "codebooks", "offsets", "scale", "dense", "y"):
            d[k] = d[k].cuda()
    return d


def _sync(d):
    if d["device"] == "cuda":
        torch.cuda.synchronize()


def _ferrox(d):
    stream = torch.cuda.current_stream().cuda_stream if d["device"] == "cuda" else 0
    _core.codebook_linear(d["x"], d["codes"], d["codebooks"], d["offsets"], d["scale"], None, d["bits"], 1, d["y"],
                          stream)
    _sync(d)
    return d["y"].float().cpu().clone()


def _torch(d):
    y = d["x"] @ d["dense"].T
    _sync(d)
    return y.float().cpu()


SIDES = {"ferrox": _ferrox, "torch": _torch}


def check(results, case, inputs):
    f, t = results["ferrox"], results["torch"]
    tol = 1e-4 if case.endswith(" f32") else 2e-2
    scale = t.abs().max().item()
    err = (f - t).abs().max().item()
    assert err <= tol * scale, f"{case}: max error {err} vs scale {scale}"
