"""``ferrox compress codebook`` / ``restore`` / ``inspect`` on the embedded
MiniLM: size budget, bits/weight = bytes on disk, round trip, errors."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ferrox import checkpoint as ckpt
from ferrox.cli import main as cli_main
from ferrox.codebook import dequantize, load
from ferrox.codebook.format import CodebookFolder
from ferrox.models import default_model_path

BITS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("cb") / "d"
    assert cli_main(["compress", "codebook", default_model_path(), "--bits", str(BITS), "--out", str(out),
                     "--no-progress", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def original():
    return load_file(os.path.join(default_model_path(), "model.safetensors"))


def safetensors_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def test_default_selection_and_size_budget(folder, original):
    quantized, passthrough = load(folder)
    for name, t in original.items():
        sel = t.dim() == 2 and not any(s in name for s in ("embed", "lm_head", "norm"))
        assert (name in quantized) == sel, name
        if not sel:
            assert passthrough[name].dtype == t.dtype and torch.equal(passthrough[name], t), name
    assert any(t.dtype == torch.int64 for t in passthrough.values())  # position_ids buffer, verbatim
    nq = sum(t.numel() for n, t in original.items() if n in quantized)
    other = sum(t.numel() * t.element_size() for n, t in original.items() if n not in quantized)
    budget = (BITS + 0.6) * nq / 8 + other + 256 * 1024
    assert safetensors_bytes(folder) <= budget, (safetensors_bytes(folder), budget)


def test_reported_bits_per_weight_equal_bytes_on_disk(folder):
    f = CodebookFolder.open(folder)
    report = json.load(open(os.path.join(folder, "ferrox_report.json")))
    info = ckpt.read_checkpoint(str(folder))
    sizes = {t.name: t.nbytes for t in info.tensors}
    total_q, total_n = 0, 0
    for name, rec in f.tensors.items():
        if rec["kind"] != "codebook":
            continue
        on_disk = sum(v for k, v in sizes.items() if k.startswith(name + ".codebook."))
        n = rec["shape"][0] * rec["shape"][1]
        assert report["tensors"][name]["bits_per_weight"] == pytest.approx(8 * on_disk / n, abs=1e-4)
        total_q += on_disk
        total_n += n
    s = report["summary"]
    assert s["quantized_bytes"] == total_q
    assert s["bits_per_quantized_weight"] == pytest.approx(8 * total_q / total_n, abs=1e-4)
    assert s["folder_tensor_bytes"] == sum(sizes.values())
    # The data sections of the files hold exactly these bytes (+ headers).
    assert safetensors_bytes(folder) >= s["folder_tensor_bytes"]


def test_restore_round_trip_in_original_dtypes_and_order(folder, original, tmp_path):
    out = tmp_path / "m"
    assert cli_main(["restore", str(folder), "--out", str(out), "--no-progress", "--quiet"]) == 0
    restored = load_file(os.path.join(out, "model.safetensors"))
    info = ckpt.read_checkpoint(str(out))
    assert [t.name for t in info.tensors] == [t.name for t in ckpt.read_checkpoint(default_model_path()).tensors]
    quantized, _ = load(folder)
    for name, t in original.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape
        if name in quantized:
            q = quantized[name]
            assert torch.equal(restored[name], dequantize(q))
            err = ((t.double() - restored[name].double()).norm() / t.double().norm()).item()
            assert err == pytest.approx(q.error, rel=1e-9)
            assert err < 0.3  # 3-bit per-tensor k-means on MiniLM: measured max 0.229
        else:
            assert torch.equal(restored[name], t)


def test_inspect_shows_bits_and_errors(folder, capsys):
    assert cli_main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "format codebook" in text
    assert "bits_per_quantized_weight" in text and "rel_error" in text
    assert "encoder.layer.0.attention.self.query.weight" in text


def test_groups_vector_and_calib_weights(tmp_path, original):
    calib = tmp_path / "calib.safetensors"
    name = "encoder.layer.1.attention.self.key.weight"
    save_file({name: torch.linspace(0.1, 2.0, 384)}, str(calib))
    out = tmp_path / "g"
    assert cli_main(["compress", "codebook", default_model_path(), "--bits", "2", "--groups", "4",
                     "--select", "encoder.layer.1.attention.*", "--calib", str(calib), "--out", str(out),
                     "--no-progress", "--quiet"]) == 0
    quantized, passthrough = load(out)
    assert sorted(quantized) == sorted(n for n in original if n.startswith("encoder.layer.1.attention.")
                                       and original[n].dim() == 2)
    assert all(q.groups == 4 and q.perm is not None for q in quantized.values())
    assert CodebookFolder.open(out).tensors[name]["weighted"] is True
    out2 = tmp_path / "v"
    assert cli_main(["compress", "codebook", default_model_path(), "--bits", "4", "--vector-dim", "4",
                     "--select", "encoder.layer.0.attention.self.query.weight", "--out", str(out2),
                     "--no-progress", "--quiet"]) == 0
    (q,) = load(out2)[0].values()
    assert q.vector_dim == 4 and q.codebooks.shape == (1, 16, 4)
    w = original["encoder.layer.0.attention.self.query.weight"]
    from ferrox.codebook.codec import codes

    assert torch.equal(dequantize(q), q.codebooks[0][codes(q).long()].reshape(w.shape))
    assert ((w.double() - dequantize(q).double()).norm() / w.double().norm()).item() == pytest.approx(q.error, rel=1e-9)


def test_cli_errors(folder, tmp_path, capsys):
    model = default_model_path()
    assert cli_main(["restore", str(folder), "--base", model, "--out", str(tmp_path / "m")]) == 1
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert cli_main(["compress", "codebook", str(tmp_path / "nope"), "--bits", "3", "--out", str(tmp_path / "x")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["compress", "codebook", model, "--bits", "5", "--out", str(tmp_path / "x")])
    assert cli_main(["compress", "codebook", model, "--bits", "3", "--groups", "0", "--out", str(tmp_path / "x")]) == 1
    assert "--groups" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(3, 3)}, str(bad))
    assert cli_main(["compress", "codebook", model, "--bits", "3", "--calib", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "per-column weights" in capsys.readouterr().err
    # A NaN weight: a clean error naming the tensor, and no output folder.
    sd = {"layer.weight": torch.randn(8, 16), "layer.bias": torch.zeros(8)}
    sd["layer.weight"][3, 5] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(sd, str(nan))
    assert cli_main(["compress", "codebook", str(nan), "--bits", "3", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "layer.weight" in err and "row 3, column 5" in err
    assert not (tmp_path / "y").exists()
    # Restoring something that is not a ferrox folder.
    assert cli_main(["restore", str(nan), "--out", str(tmp_path / "z")]) == 1
    assert "codebook" in capsys.readouterr().err


def test_calib_token_ids_weight_every_linear(tmp_path):
    from ferrox.testing.tiny_gpt import TinyGPT, save_pretrained

    save_pretrained(TinyGPT(seed=0), str(tmp_path / "gpt"))
    save_file({"input_ids": torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "calib.safetensors"))
    out = tmp_path / "d"
    # Two joint steps are enough for what this checks (the default 30 only cost time).
    assert cli_main(["compress", "codebook", str(tmp_path / "gpt"), "--bits", "3", "--groups", "4", "--calib",
                     str(tmp_path / "calib.safetensors"), "--calib-steps", "2", "--out", str(out), "--no-progress",
                     "--quiet"]) == 0
    recs = CodebookFolder.open(out).tensors
    quantized = [n for n, r in recs.items() if r["kind"] == "codebook"]
    assert quantized and all(recs[n]["weighted"] is True for n in quantized)


def test_vector_dim_not_dividing_a_selected_matrix(tmp_path, capsys):
    sd = {"a.weight": torch.randn(8, 30), "b.weight": torch.randn(8, 32), "c.weight": torch.randn(4, 6)}
    model = tmp_path / "m.safetensors"
    save_file(sd, str(model))
    # Named by an include glob: an error naming each tensor, its shape and d; nothing written.
    out = tmp_path / "x"
    assert cli_main(["compress", "codebook", str(model), "--bits", "2", "--vector-dim", "4", "--select", "*.weight",
                     "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "vector_dim 4" in err and "'a.weight' (F32 [8, 30])" in err and "'c.weight' (F32 [4, 6])" in err
    assert "b.weight" not in err
    assert not out.exists()
    # Default selection: those two verbatim (bit-exact), reported, and recorded with the reason.
    out = tmp_path / "d"
    with pytest.warns(UserWarning, match=r"'a.weight' \(F32 \[8, 30\]\).*'c.weight'"):
        assert cli_main(["compress", "codebook", str(model), "--bits", "2", "--vector-dim", "4", "--out", str(out),
                         "--no-progress"]) == 0
    assert "does not divide the columns of 2 selected matrices, stored verbatim: a.weight, c.weight" in \
        capsys.readouterr().out
    quantized, passthrough = load(out)
    assert sorted(quantized) == ["b.weight"] and quantized["b.weight"].vector_dim == 4
    assert all(torch.equal(passthrough[n], sd[n]) for n in ("a.weight", "c.weight"))
    recs = CodebookFolder.open(out).tensors
    assert recs["a.weight"]["reason"] == "vector_dim 4 does not divide 30 columns"
