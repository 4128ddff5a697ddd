"""`ferrox compress codebook --calib`: calibrated (joint) learning of the
codebooks on each Linear's inputs, on the shared tiny GPT (pretrained, seed
0; ``ferrox.testing.tasks``) at 3 bits.

Calibration: 32 windows of 128 bytes of the "statements" training text
(``ferrox.testing.corpus``), as ``input_ids``. Held out: the "statements"
held-out text, which no calibration window comes from. The comparison is the
issue's: ``--calib --groups 8`` against plain per-tensor k-means
(``ferrox compress codebook MODEL --bits 3``), both through the CLI and
decoded by ``ferrox.codebook.restore``.
"""

import pytest
import torch
from safetensors.torch import save_file

from ferrox.cli import main as cli_main
from ferrox.codebook import load
from ferrox.codebook.compress import CALIB_STEPS, input_grams, restore
from ferrox.codebook.format import CodebookFolder
from ferrox.codebook.joint import input_gram, output_error

BITS, GROUPS = 3, 8
#: The issue's bound: held-out layer-output error of --calib --groups 8 over
#: that of plain per-tensor k-means.
OUTPUT_ERROR_RATIO = 0.8
#: Perplexity margins, stated before the first run: the held-out perplexity
#: of the 3-bit model may exceed the original's by at most 5% (relative)
#: with plain per-tensor k-means and at most 2% with --calib --groups 8.
PPL_MARGIN_PLAIN, PPL_MARGIN_CALIB = 0.05, 0.02


def _linears(model):
    return {f"{n}.weight": m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    from ferrox.testing import corpus, load_pretrained, tasks

    tmp = tmp_path_factory.mktemp("calib")
    base = tasks.pretrained(0)
    split = corpus.split(0)
    gen = tasks.batches(split.train_text("statements"), 128, 8, seed=1)
    ids = torch.cat([next(gen)[0] for _ in range(4)]).contiguous()
    save_file({"input_ids": ids}, str(tmp / "calib.safetensors"))
    plain, calib = tmp / "plain", tmp / "calib"
    assert cli_main(["compress", "codebook", base, "--bits", str(BITS), "--out", str(plain),
                     "--no-progress", "--quiet"]) == 0
    assert cli_main(["compress", "codebook", base, "--bits", str(BITS), "--groups", str(GROUPS), "--calib",
                     str(tmp / "calib.safetensors"), "--out", str(calib), "--no-progress", "--quiet"]) == 0
    model = load_pretrained(base).eval()
    held = split.heldout["statements"]
    held_ids = tasks.encode(held)[: 32 * 128].reshape(32, 128)
    names = list(_linears(model))
    return {"base": base, "model": model, "held": held, "ids": ids, "plain": plain, "calib": calib,
            "held_grams": input_grams(model, list(held_ids.split(8)), names),
            "calib_grams": input_grams(model, list(ids.split(8)), names)}


def test_calib_groups8_held_out_output_error_at_most_0_8x_plain_kmeans(gpt):
    w0 = {n: m.weight.detach().float() for n, m in _linears(gpt["model"]).items()}
    plain, calib = restore(gpt["plain"]), restore(gpt["calib"])
    assert set(w0) <= set(plain) and set(w0) <= set(calib)
    e_plain = {n: output_error(w, plain[n].float(), gpt["held_grams"][n]) for n, w in w0.items()}
    e_calib = {n: output_error(w, calib[n].float(), gpt["held_grams"][n]) for n, w in w0.items()}
    mean_plain = sum(e_plain.values()) / len(w0)
    mean_calib = sum(e_calib.values()) / len(w0)
    ratios = sorted(e_calib[n] / e_plain[n] for n in w0)
    ratio = mean_calib / mean_plain
    print(f"held-out relative layer-output error over {len(w0)} matrices: plain k-means {mean_plain:.5f}, "
          f"--calib --groups {GROUPS} {mean_calib:.5f}: ratio {ratio:.3f} (per matrix {ratios[0]:.3f}.."
          f"{ratios[-1]:.3f}, median {ratios[len(ratios) // 2]:.3f})")
    assert ratio <= OUTPUT_ERROR_RATIO


def test_3bit_perplexity_within_the_stated_margins(gpt):
    from ferrox.testing import load_pretrained, tasks

    def ppl_of(state):
        m = load_pretrained(gpt["base"]).eval()
        missing, unexpected = m.load_state_dict(state, strict=False)
        assert not unexpected
        return tasks.perplexity(m, gpt["held"])

    orig = tasks.perplexity(gpt["model"], gpt["held"])
    p_plain, p_calib = ppl_of(restore(gpt["plain"])), ppl_of(restore(gpt["calib"]))
    print(f"held-out perplexity: original {orig:.4f}, 3-bit k-means {p_plain:.4f} (+{p_plain / orig - 1:.2%}), "
          f"3-bit --calib --groups {GROUPS} {p_calib:.4f} (+{p_calib / orig - 1:.2%})")
    assert p_plain <= orig * (1 + PPL_MARGIN_PLAIN)
    assert p_calib <= orig * (1 + PPL_MARGIN_CALIB)


def test_calib_folder_records_scales_and_the_learned_output_error(gpt):
    quantized, _ = load(gpt["calib"])
    recs = CodebookFolder.open(gpt["calib"]).tensors
    w0 = {n: m.weight.detach() for n, m in _linears(gpt["model"]).items()}
    assert set(quantized) == set(w0)
    dense = restore(gpt["calib"])
    for n, q in quantized.items():
        r = recs[n]
        assert q.groups == GROUPS and q.row_scale is not None and q.row_scale.shape == (q.shape[0],)
        assert r["weighted"] is True and r["joint"]["steps"] == CALIB_STEPS
        # the recorded errors are those of the stored weight
        w = w0[n].double()
        assert ((w - dense[n].double()).norm() / w.norm()).item() == pytest.approx(r["error"], rel=1e-6)
        h = gpt["calib_grams"][n]
        assert output_error(w0[n].float(), dense[n].float(), h) == pytest.approx(r["calib_output_error"], rel=1e-3)
        assert r["calib_output_error"] < r["calib_output_error_kmeans"], n


def test_input_grams_match_a_naive_reference(gpt):
    from ferrox.codebook import capture_inputs

    model = gpt["model"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    batches = list(gpt["ids"][:8].split(4))
    got = input_grams(model, batches, [f"{n}.weight" for n in names])
    x = capture_inputs(model, names, batches)
    assert sorted(got) == sorted(f"{n}.weight" for n in names)
    for n in names:
        ref = x[n].double().T @ x[n].double() / x[n].shape[0]
        assert torch.allclose(got[f"{n}.weight"].double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert torch.allclose(got[f"{n}.weight"], input_gram(x[n]), rtol=1e-5, atol=1e-7)


def test_calib_options_and_errors(gpt, tmp_path, capsys):
    calib = str(tmp_path / "c.safetensors")
    save_file({"input_ids": gpt["ids"][:4].contiguous()}, calib)
    sel = ["--select", "model.layers.0.self_attn.q_proj.weight"]
    assert cli_main(["compress", "codebook", gpt["base"], "--bits", "3", "--calib", calib, "--calib-steps", "-1",
                     "--out", str(tmp_path / "x")] + sel) == 1
    assert "--calib-steps" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli_main(["compress", "codebook", gpt["base"], "--bits", "3", "--calib", calib, "--assign-lr", "nan",
                     "--out", str(tmp_path / "x")] + sel) == 1
    assert "--assign-lr" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # --calib-steps 0 and --vector-dim 2: activation-weighted k-means only, no scales
    for extra, out in ((["--calib-steps", "0"], "s0"), (["--vector-dim", "2"], "v2")):
        assert cli_main(["compress", "codebook", gpt["base"], "--bits", "3", "--calib", calib, "--out",
                         str(tmp_path / out), "--no-progress", "--quiet"] + sel + extra) == 0
        (q,) = load(tmp_path / out)[0].values()
        rec = CodebookFolder.open(tmp_path / out).tensors["model.layers.0.self_attn.q_proj.weight"]
        assert q.row_scale is None and rec["weighted"] is True and "joint" not in rec
    # the library refuses joint learning of vector codebooks and a Gram of the wrong size
    from ferrox.codebook.compress import compress

    h = {"model.layers.0.self_attn.q_proj.weight": torch.eye(128)}
    with pytest.raises(ValueError, match="vector_dim"):
        compress(gpt["base"], 3, tmp_path / "y", vector_dim=2, grams=h, select=sel[1], progress=False)
    with pytest.raises(ValueError, match=r"q_proj.*\[128, 128\]"):
        compress(gpt["base"], 3, tmp_path / "y", grams={k: torch.eye(64) for k in h}, select=sel[1], progress=False)
    assert not (tmp_path / "y").exists()


def test_minilm_attention_calib_groups8_held_out_output_error_at_most_0_8x(tmp_path):
    """The same bound on the embedded MiniLM (the attention matrices of its
    first and last layers, to keep the test short) through the library:
    calibration on 64 "statements" training sentences, held out on 32
    "datamodel" held-out sentences (another topic)."""
    from ferrox.codebook.compress import compress
    from ferrox.models import default_model_path
    from ferrox.testing import minilm

    model, tok = minilm.load()
    select = "encoder.layer.5.attention.*"
    names = {f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.5.attention.")}
    train = [a for a, _ in minilm.sentence_pairs("statements")][:64]
    held = [a for a, _ in minilm.sentence_pairs("datamodel", heldout=True)][:32]
    grams = input_grams(model, [minilm.tokenize(tok, train[i:i + 16]) for i in range(0, 64, 16)], names)
    held_grams = input_grams(model, [minilm.tokenize(tok, held[i:i + 16]) for i in (0, 16)], names)
    src = default_model_path()
    plain = restore(compress(src, BITS, tmp_path / "plain", select=select, progress=False))
    calib = restore(compress(src, BITS, tmp_path / "calib", groups=GROUPS, grams=grams, select=select,
                             progress=False))
    w0 = dict(model.state_dict())
    assert len(names) == 4 and names <= set(grams)
    e_plain = {n: output_error(w0[n].float(), plain[n].float(), held_grams[n]) for n in names}
    e_calib = {n: output_error(w0[n].float(), calib[n].float(), held_grams[n]) for n in names}
    ratio = sum(e_calib.values()) / sum(e_plain.values())
    print(f"MiniLM held-out layer-output error over {len(names)} attention matrices: plain k-means "
          f"{sum(e_plain.values()) / len(names):.5f}, --calib --groups {GROUPS} "
          f"{sum(e_calib.values()) / len(names):.5f}: ratio {ratio:.3f} (per matrix "
          f"{min(e_calib[n] / e_plain[n] for n in names):.3f}..{max(e_calib[n] / e_plain[n] for n in names):.3f})")
    assert ratio <= OUTPUT_ERROR_RATIO


def test_a_layer_with_zero_output_keeps_its_weighted_kmeans(tmp_path):
    """A Linear whose calibration inputs are all zero has nothing to fit: it
    is stored as its weighted k-means (unit row scales), the others learn."""
    from safetensors.torch import load_file

    from ferrox.codebook import dequantize, quantize
    from ferrox.codebook.compress import compress

    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(16, 32, generator=g), "b.weight": torch.randn(16, 32, generator=g)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    x = torch.randn(256, 32, generator=g)
    grams = {"a.weight": torch.zeros(32, 32), "b.weight": input_gram(x)}
    folder = compress(tmp_path / "m.safetensors", 2, tmp_path / "d", grams=grams, progress=False)
    q, _ = load(folder.path)
    assert torch.equal(q["a.weight"].row_scale, torch.ones(16))
    # a zero Gram weights every column 0: the k-means of the unweighted weight is the reference
    ref = dequantize(quantize(load_file(str(tmp_path / "m.safetensors"))["a.weight"], 2,
                              weights=torch.zeros(32)))
    assert torch.equal(dequantize(q["a.weight"]), ref)
    rec = folder.tensors["b.weight"]
    assert rec["calib_output_error"] < rec["calib_output_error_kmeans"]


def test_cli_calib_on_minilm_maps_task_head_module_names(tmp_path):
    """transformers loads MiniLM's folder with a task head (``bert.encoder...``
    modules for the checkpoint's ``encoder...`` tensors): the calibration run
    still reaches the selected matrices, which then learn."""
    from ferrox.models import default_model_path
    from ferrox.testing import minilm

    _, tok = minilm.load()
    train = [a for a, _ in minilm.sentence_pairs("statements")][:8]
    save_file({"input_ids": minilm.tokenize(tok, train)["input_ids"].contiguous()}, str(tmp_path / "c.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    assert cli_main(["compress", "codebook", default_model_path(), "--bits", "3", "--calib",
                     str(tmp_path / "c.safetensors"), "--calib-steps", "5", "--select", name, "--out",
                     str(tmp_path / "d"), "--no-progress", "--quiet"]) == 0
    rec = CodebookFolder.open(tmp_path / "d").tensors[name]
    assert rec["joint"]["steps"] == 5 and rec["calib_output_error"] < rec["calib_output_error_kmeans"]
