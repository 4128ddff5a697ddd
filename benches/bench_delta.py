"""BitDelta's Rust core: compression speed, and the 1-bit matmul against the
dense matmul it replaces.

- ``compress``: a synthetic bf16 base/fine-tune pair of 18 layers of
  4096x4096 (302M elements; ``--quick`` 2 layers, 34M) in safetensors files.
  ferrox: ``delta_compress_files`` per tensor (positioned reads, one chunk
  per input in RAM, signs written into a preallocated file). torch: the
  reference code's packing on the loaded tensors (Δ = ft − base, sign bits
  shifted and summed over int64 groups of 64, α = mean |Δ|). Checked to
  agree (the int64 words' bytes are ferrox's packed rows) before timing.
- ``matmul``: y = x·W_ftᵀ for x [batch, in]. ferrox: what ``BitDeltaLinear``
  runs: up to ``FUSED_MAX_ROWS`` rows the fused ``delta_linear`` (base rows
  and sign rows in one pass), above it the base GEMM in torch (x·W_baseᵀ)
  plus ``delta_matmul(..., accumulate=True)``; torch: the dense
  matmul with W_ft = W_base + α·S materialised. f32 and bf16 activations
  (bf16 weights for bf16), 4096x4096 and 11008x4096 (out x in), batch
  1/4/16/64 (``--quick``: 4096x4096, batch 1 and 16).
- ``multi8``: 8 tenants, one batch row each (batch 8): ferrox one fused
  ``delta_linear`` with adapter ids; torch 8 dense GEMVs, one per tenant's W_ft.
"""

import json
import os
import struct
import tempfile

import torch

from ferrox import _core
from ferrox.delta.modules import FUSED_MAX_ROWS

NAME = "delta"
MAIN_COMPARATOR = "torch"

LAYER = (4096, 4096)


def _matmul_cases(quick):
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]
    batches = [1, 16] if quick else [1, 4, 16, 64]
    return [f"matmul {o}x{i} b{b} {dt}" for (o, i) in shapes for dt in ("f32", "bf16") for b in batches]


# --quick shrinks only the compress case; pick matmul cases with --cases
# (e.g. the quick set: "compress,matmul 4096x4096 b1 f32,matmul 4096x4096 b16 bf16,multi8 4096x4096 f32").
CASES = ["compress"] + _matmul_cases(False) + ["multi8 4096x4096 f32", "multi8 4096x4096 bf16"]


def _random_bf16(g, shape):
    bits = torch.randint(0x3800, 0x3F80, shape, dtype=torch.int16, generator=g)
    sign = torch.randint(0, 2, shape, dtype=torch.int16, generator=g) << 15
    return (bits | sign).view(torch.bfloat16)


def _write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def _read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


def _compress_inputs(quick):
    layers = 2 if quick else 18
    root = os.path.join(tempfile.gettempdir(), f"ferrox-bench-delta-{layers}")
    base_p, ft_p = os.path.join(root, "base.safetensors"), os.path.join(root, "ft.safetensors")
    if not os.path.exists(ft_p):  # made once, reused by the memory children
        os.makedirs(root, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        base = {f"layers.{i}.weight": _random_bf16(g, LAYER) for i in range(layers)}
        _write_safetensors(base_p + ".tmp", base)
        ft = {}
        for k, v in base.items():
            keep = torch.rand(v.shape, generator=g) < 0.5
            ft[k] = torch.where(keep, v, (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16())
        _write_safetensors(ft_p + ".tmp", ft)
        os.replace(base_p + ".tmp", base_p)
        os.replace(ft_p + ".tmp", ft_p)
    start_b, header = _read_header(base_p)
    start_f, header_f = _read_header(ft_p)
    out = os.path.join(root, "signs.bin")
    names = sorted(header)
    sizes = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
    total = sum(s // 2 // 8 for s in sizes.values())
    with open(out, "wb") as f:
        f.truncate(total)
    return {"base": base_p, "ft": ft_p, "out": out, "names": names, "header": header, "header_f": header_f,
            "start_b": start_b, "start_f": start_f}


def _ferrox_compress(d):
    alphas, at = [], 0
    for k in d["names"]:
        meta, meta_f = d["header"][k], d["header_f"][k]
        numel = meta["shape"][0] * meta["shape"][1]
        a, _, _ = _core.delta_compress_files(
            (d["base"], d["start_b"] + meta["data_offsets"][0], "BF16"),
            (d["ft"], d["start_f"] + meta_f["data_offsets"][0], "BF16"),
            numel, meta["shape"][1], (d["out"], at))
        alphas.append(a)
        at += numel // 8
    with open(d["out"], "rb") as f:
        head = f.read(4096)
    return {"alphas": alphas, "head": head}


def _torch_compress(d):
    from safetensors import safe_open

    alphas, head = [], None
    with safe_open(d["base"], "pt") as fb, safe_open(d["ft"], "pt") as ff:
        for k in d["names"]:
            delta = ff.get_tensor(k).float() - fb.get_tensor(k).float()
            bits = (delta < 0).reshape(-1, 64).long()
            packed = (bits << torch.arange(64)).sum(-1)  # int64 words, LSB = first element
            alphas.append(delta.abs().double().mean().item())
            if head is None:
                head = packed.view(torch.uint8)[:4096].numpy().tobytes()
    return {"alphas": alphas, "head": head}


def _matmul_inputs(case):
    kind, shape, *rest = case.split()
    out_f, in_f = map(int, shape.split("x"))
    g = torch.Generator().manual_seed(1)
    dt = torch.float32 if rest[-1] == "f32" else torch.bfloat16
    tenants = 8 if kind == "multi8" else 1
    batch = 8 if kind == "multi8" else int(rest[0][1:])
    base = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dt)
    signs = torch.randint(0, 256, (tenants, out_f, in_f // 8), dtype=torch.uint8, generator=g)
    alphas = torch.rand(tenants, generator=g) * 1e-3
    bits = torch.arange(8, dtype=torch.uint8)
    w_ft = []
    for t in range(tenants):
        s = 1.0 - 2.0 * ((signs[t].unsqueeze(-1) >> bits) & 1).reshape(out_f, in_f).float()
        w_ft.append((base.float() + alphas[t] * s).to(dt))
    x = torch.randn(batch, in_f, generator=g).to(dt)
    y = torch.empty(batch, out_f, dtype=dt)
    return {"kind": kind, "x": x, "base": base, "signs": signs, "alphas": alphas, "w_ft": w_ft, "y": y,
            "ids": torch.arange(batch) % tenants, "dt": dt}


def setup(case, quick):
    if case == "compress":
        return _compress_inputs(quick)
    return _matmul_inputs(case)


def _ferrox(d):
    if "names" in d:
        return _ferrox_compress(d)
    y = d["y"]
    if d["x"].shape[0] <= FUSED_MAX_ROWS:  # the modules' fused CPU path
        multi = d["kind"] == "multi8"
        _core.delta_linear(d["x"], d["base"], None, d["signs"] if multi else d["signs"][0],
                           d["alphas"] if multi else d["alphas"][0].item(), d["ids"] if multi else None, y)
        return y.float().clone()
    torch.matmul(d["x"], d["base"].T, out=y)
    if d["kind"] == "multi8":
        _core.delta_matmul_multi(d["x"], d["signs"], d["alphas"], d["ids"], y, accumulate=True)
    else:
        _core.delta_matmul(d["x"], d["signs"][0], d["alphas"][0].item(), y, accumulate=True)
    return y.float().clone()


def _torch(d):
    if "names" in d:
        return _torch_compress(d)
    if d["kind"] == "multi8":
        return torch.cat([d["x"][b:b + 1] @ d["w_ft"][b].T for b in range(d["x"].shape[0])]).float()
    return (d["x"] @ d["w_ft"][0].T).float()


SIDES = {"ferrox": _ferrox, "torch": _torch}


def check(results, case, inputs):
    f, t = results["ferrox"], results["torch"]
    if case == "compress":
        assert f["head"] == t["head"], "packed signs differ"
        for a, b in zip(f["alphas"], t["alphas"]):
            assert abs(a - b) <= 1e-6 * abs(b), (a, b)
        return
    # Different rounding: W_ft is rounded to the weight dtype on the torch side.
    tol = 1e-4 if inputs["dt"] == torch.float32 else 3e-2
    scale = t.abs().max().item()
    err = (f - t).abs().max().item()
    assert err <= tol * scale, f"{case}: max error {err} vs scale {scale}"
