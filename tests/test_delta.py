"""BitDelta end to end (``ferrox.delta`` and ``ferrox compress bitdelta`` /
``ferrox restore``): the format, restore exactness, verbatim tensors,
wrong-base refusal, storage ratio, the modules and scale distillation."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ferrox import delta as fd
from ferrox import synthetic
from ferrox.checkpoint import read_checkpoint
from ferrox.cli import main as cli_main

FERROX = [sys.executable, "-m", "ferrox.cli"]


def folder_tensors(path):
    out = {}
    for f in read_checkpoint(path).files:
        out.update(load_file(f))
    return out


def reference_restore(base: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """base + α·sign(Δ) in f64, α = mean|Δ|, Δ = 0 counted as +1, rounded once."""
    d = ft.double() - base.double()
    alpha = d.abs().mean()
    s = torch.where(d < 0, -1.0, 1.0).double()
    return (base.double() + alpha.float().double() * s).to(base.dtype)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "f32", "f16"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bitdelta-{str(request.param)[6:]}")
    base = synthetic.make_llama(root / "base", hidden=24, layers=2, intermediate=40, vocab=64, dtype=request.param)
    ft = synthetic.fine_tune(base, root / "ft", seed=3)
    # an integer buffer and a tensor of another shape (added tokens) in the fine-tune
    w = load_file(ft / "model.safetensors")
    w["model.position_ids"] = torch.arange(7, dtype=torch.int64)
    w["model.layers.1.mlp.extra.weight"] = torch.randn(3, 5).to(request.param)
    save_file(w, ft / "model.safetensors")
    return root, base, ft


def test_restore_equals_base_plus_alpha_sign_and_verbatim_tensors_are_bit_exact(pair, tmp_path):
    root, base, ft = pair
    d = fd.compress(base, ft, out=tmp_path / "d", progress=False)
    rest = fd.restore(base, d, progress=False)
    b, f = folder_tensors(base), folder_tensors(ft)
    assert list(rest) == list(f)  # every fine-tune tensor, in its order
    assert set(d.entries) == {n for n in f if ".layers." in n and "norm" not in n and "extra" not in n}
    for name, t in f.items():
        assert rest[name].dtype == t.dtype and rest[name].shape == t.shape
        if name in d.entries:
            assert torch.equal(rest[name], reference_restore(b[name], t)), name
        else:
            assert torch.equal(rest[name].view(torch.uint8) if t.is_floating_point() else rest[name],
                               t.view(torch.uint8) if t.is_floating_point() else t), name


def test_cli_compress_restore_inspect_round_trip(pair, tmp_path):
    root, base, ft = pair
    r = subprocess.run([*FERROX, "compress", "bitdelta", "--base", str(base), "--finetuned", str(ft), "--out",
                        str(tmp_path / "d"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "smaller than an fp16 delta" in r.stdout
    r = subprocess.run([*FERROX, "restore", str(tmp_path / "d"), "--base", str(base), "--out", str(tmp_path / "m"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lib = fd.restore(base, tmp_path / "d")
    cli = folder_tensors(tmp_path / "m")
    assert list(cli) == list(lib) and all(torch.equal(cli[k], lib[k]) for k in lib)
    assert (tmp_path / "m" / "config.json").is_file()
    info = read_checkpoint(tmp_path / "m")
    assert {n for n, _ in [(t.name, 0) for t in info.tensors]} == set(lib)
    out = subprocess.run([*FERROX, "inspect", str(tmp_path / "d")], capture_output=True, text=True, timeout=120).stdout
    assert "format bitdelta" in out and "ratio_vs_fp16_delta" in out and "alpha" in out


def test_restore_needs_base_and_refuses_another_one(pair, tmp_path, capsys):
    root, base, ft = pair
    fd.compress(base, ft, out=tmp_path / "d", progress=False)
    assert cli_main(["restore", str(tmp_path / "d"), "--out", str(tmp_path / "m")]) == 1
    assert "--base" in capsys.readouterr().err
    other = synthetic.fine_tune(base, tmp_path / "other", seed=9)  # same names/shapes, other values
    assert cli_main(["restore", str(tmp_path / "d"), "--base", str(other), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "another base model" in err and "content hash" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not [p for p in os.listdir(tmp_path) if "ferrox" in p]
    with pytest.raises(ValueError, match="another base model"):
        fd.restore(other, tmp_path / "d")
    small = synthetic.make_llama(tmp_path / "small", hidden=16, layers=2, vocab=64)
    with pytest.raises(ValueError, match="another base model"):
        fd.restore(small, tmp_path / "d")


def test_dtype_mismatch_and_bad_inputs_write_nothing(tmp_path, capsys):
    base = synthetic.make_llama(tmp_path / "base", hidden=16, layers=1, dtype=torch.float32)
    ft32 = synthetic.fine_tune(base, tmp_path / "ft", seed=1)
    w = {k: v.to(torch.bfloat16) for k, v in load_file(ft32 / "model.safetensors").items()}
    (tmp_path / "ft16").mkdir()
    save_file(w, tmp_path / "ft16" / "model.safetensors")
    with pytest.raises(ValueError, match="the base is F32 and the fine-tune BF16"):
        fd.compress(base, tmp_path / "ft16", out=tmp_path / "d")
    assert not (tmp_path / "d").exists()
    bad = load_file(ft32 / "model.safetensors")
    bad["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(bad, tmp_path / "nan" / "model.safetensors")
    assert cli_main(["compress", "bitdelta", "--base", str(base), "--finetuned", str(tmp_path / "nan"),
                     "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()
    assert cli_main(["restore", str(base), "--base", str(base), "--out", str(tmp_path / "m")]) == 1
    assert "no ferrox_format" in capsys.readouterr().err


def test_selected_matrices_are_at_least_15_5x_smaller_than_an_fp16_delta(tmp_path):
    base = synthetic.make_llama(tmp_path / "base", hidden=64, layers=2, dtype=torch.bfloat16)
    ft = synthetic.fine_tune(base, tmp_path / "ft", seed=1)
    d = fd.compress(base, ft, out=tmp_path / "d")
    s = d.report()["summary"]
    on_disk = sum(e.signs.nbytes + e.alpha.nbytes for e in d.entries.values())
    fp16 = sum(2 * e.shape[0] * e.shape[1] for e in d.entries.values())
    assert s["delta_bytes"] == on_disk and s["fp16_delta_bytes"] == fp16
    assert fp16 / on_disk >= 15.5


def test_selection_globs(tmp_path):
    base = synthetic.make_llama(tmp_path / "base", hidden=16, layers=2, dtype=torch.float32)
    ft = synthetic.fine_tune(base, tmp_path / "ft", seed=1)
    only_mlp = fd.compress(base, ft, ["*mlp*"], out=tmp_path / "a")
    assert only_mlp.entries and all(".mlp." in n for n in only_mlp.entries)
    everything = fd.compress(base, ft, ["*", "!*norm*"], out=tmp_path / "b")
    assert "lm_head.weight" in everything.entries and "model.embed_tokens.weight" in everything.entries
    with pytest.raises(ValueError, match="glob"):
        fd.compress(base, ft, [""], out=tmp_path / "c")


def test_bitdelta_linear_matches_the_dense_reference_and_multi_tenant_rows_match_single(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 19)
    fts = [base.weight.detach() + 0.01 * torch.randn(19, 37) for _ in range(3)]
    mods = []
    for w in fts:
        d = fd.compress({"l.weight": base.weight.detach().clone()}, {"l.weight": w}, ["l.weight"])
        dense = reference_restore(base.weight.detach(), w)
        m = fd.BitDeltaLinear(base, d.signs("l.weight"), d.alpha("l.weight"))
        x = torch.randn(5, 37)
        with torch.no_grad():
            torch.testing.assert_close(m(x), x @ dense.T + base.bias, rtol=1e-5, atol=1e-5)
        mods.append(m)
    multi = fd.MultiDeltaLinear(base, mods)
    x = torch.randn(6, 37)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        y = multi(x, ids)
        # the same batch through each single-tenant module (so torch's base GEMM
        # sees the same shapes): row i equals tenant ids[i]'s row i bitwise
        single = [m(x) for m in mods]
        for i in range(6):
            assert torch.equal(y[i], single[int(ids[i])][i]), i
    with pytest.raises(ValueError, match="adapter_ids"):
        multi(x, ids[:3])


def test_apply_bitdelta_checks_the_base_and_distillation_lowers_the_output_mse():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    ft = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    ft.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            # a structured delta: a per-row scale pattern a single α cannot fit
            p.add_(0.05 * torch.randn_like(p) * torch.linspace(0.1, 2, p.shape[0]).view(-1, *[1] * (p.dim() - 1)))
    d = fd.compress({k: v.clone() for k, v in net.state_dict().items()}, ft.state_dict(), ["*.weight"])
    calib = [torch.randn(32, 16) for _ in range(4)]
    held = [torch.randn(32, 16) for _ in range(4)]
    r = fd.distill(net, d, ft, calib, steps=60, lr=0.3, per_row=True, progress=False)
    before = fd.output_mse(_applied(net, d), ft, held)
    after = fd.output_mse(r.model, ft, held)
    assert after < 0.8 * before, (before, after)
    assert r.losses[-1] < r.initial_loss
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="another base model"):
        fd.apply_bitdelta(other, d)


def _applied(net, d):
    import copy

    m = copy.deepcopy(net)
    fd.apply_bitdelta(m, fd.BitDelta.load(d.path))
    return m


def test_forward_does_not_materialise_the_dense_weight(tmp_path):
    """A BitDeltaLinear forward on 11008x4096 raises peak RSS by < 1/8 of the
    dense f32 weight's bytes (the child process's own high-water mark)."""
    code = r"""
import resource, torch, ferrox
from ferrox.delta import BitDeltaLinear
torch.manual_seed(0)
lin = torch.nn.Linear(4096, 11008, bias=False)
signs = torch.randint(0, 256, (11008, 512), dtype=torch.uint8)
m = BitDeltaLinear(lin, signs, 0.01)
x = torch.randn(4, 4096)
with torch.no_grad():
    m(x)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
with torch.no_grad():
    for _ in range(3):
        y = m(x)
print(status("VmHWM") - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.strip().splitlines()[-1])
    dense = 11008 * 4096 * 4
    assert grown < dense / 8, f"peak grew by {grown / 2**20:.1f} MiB; the dense weight is {dense / 2**20:.0f} MiB"


def test_cli_distill_trains_the_scales_from_a_calibration_file(tmp_path, capsys):
    """``compress bitdelta --distill --calib``: token-id batches from a
    .safetensors file; the saved α's are the trained ones and lower the
    output MSE against the fine-tune on other batches."""
    from ferrox.testing import TinyGPT, TinyGPTConfig, load_pretrained, save_pretrained

    cfg = TinyGPTConfig(dim=32, n_layers=2, n_heads=2, ffn=64, max_seq=64)
    base = save_pretrained(TinyGPT(cfg, seed=0), tmp_path / "base")
    ft_model = TinyGPT(cfg, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ft_model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                # rows moved by different amounts: one α per matrix cannot fit it, so training it helps
                p.add_(0.02 * torch.randn_like(p) * torch.linspace(0.2, 2, p.shape[0]).unsqueeze(1))
    ft = save_pretrained(ft_model, tmp_path / "ft")
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, 256, (16, 32), generator=g)}, tmp_path / "calib.safetensors")
    assert cli_main(["compress", "bitdelta", "--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "x"),
                     "--distill", "--calib", str(tmp_path / "calib.safetensors"), "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli_main(["compress", "bitdelta", "--base", str(base), "--finetuned", str(ft), "--out",
                     str(tmp_path / "d"), "--distill", "--calib", str(tmp_path / "calib.safetensors"), "--steps", "30",
                     "--lr", "0.2", "--per-row", "--no-progress"]) == 0
    assert "distilled the scales in 30 steps" in capsys.readouterr().out
    trained = fd.BitDelta.load(tmp_path / "d")
    plain = fd.compress(base, ft, per_row=True)
    assert trained.scale == "row"
    assert any(not torch.equal(trained.alpha(n), plain.alpha(n)) for n in trained.entries)
    held = [torch.randint(0, 256, (8, 32), generator=g) for _ in range(2)]
    ft_loaded = load_pretrained(ft)
    mse = [fd.output_mse(_applied(load_pretrained(base), d), ft_loaded, held) for d in (plain, trained)]
    assert mse[1] < mse[0], mse
    # restore of the distilled delta: base + α_row·sign, in the fine-tune's dtype
    rest = fd.restore(base, tmp_path / "d")
    name = next(iter(trained.entries))
    assert rest[name].dtype == torch.float32 and rest[name].shape == trained.entries[name].shape
