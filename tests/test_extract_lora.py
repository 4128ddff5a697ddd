"""``ferrox extract lora``: the factors' error against the Eckart–Young
optimum (a float64 SVD of the same task vector), PEFT loading the adapter
onto the base and merging it back, low-precision inputs, refusals, the CLI."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ferrox import synthetic
from ferrox.cli import main as cli_main
from ferrox.extract import extract_lora, factor
from ferrox.output import REPORT_FILE


def planted(m, n, k, noise, seed, dtype=torch.float32):
    """A rank-``k`` matrix with spread singular values plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -1, k, dtype=torch.float64)
    return ((u * s) @ v.T + noise / (m * n) ** 0.25 * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)


def optimum(delta64, rank):
    """Eckart–Young: the least Frobenius error of a rank-``rank`` matrix."""
    s = torch.linalg.svdvals(delta64)
    return float(s[rank:].square().sum().sqrt())


def pair(m, n, k, noise, seed, dtype=torch.float32):
    """Base/fine-tune state dicts whose one matrix differs by a planted delta."""
    g = torch.Generator().manual_seed(seed + 1000)
    w = torch.randn(m, n, generator=g).to(dtype)
    delta = planted(m, n, k, noise, seed)
    ft = (w.float() + delta).to(dtype)
    return {"layer.proj.weight": w}, {"layer.proj.weight": ft}


def adapter_product(state, name="layer.proj"):
    a = state[f"base_model.model.{name}.lora_A.weight"].double()
    b = state[f"base_model.model.{name}.lora_B.weight"].double()
    return b @ a


# --- error vs Eckart–Young ---------------------------------------------------

@pytest.mark.parametrize("m,n,k,rank,noise", [
    (96, 80, 12, 12, 1e-2),   # the rank takes the whole planted part
    (96, 80, 12, 6, 1e-2),    # the rank cuts inside it
    (64, 130, 8, 40, 1e-1),   # 2·rank >= min side
    (40, 40, 5, 40, 1e-2),    # full rank: exact up to f32
])
def test_exact_path_reaches_eckart_young(m, n, k, rank, noise):
    base, ft = pair(m, n, k, noise, seed=m + rank)
    r = extract_lora(base, ft, rank, progress=False)
    rec = r.tensors["layer.proj.weight"]
    assert rec["method"] == "exact"
    delta64 = ft["layer.proj.weight"].double() - base["layer.proj.weight"].double()
    err = float((delta64 - adapter_product(r.state)).norm())
    best = optimum(delta64, rank)
    if rank == min(m, n):
        assert err <= 1e-5 * float(delta64.norm())
    else:
        assert abs(err - best) <= 0.01 * best, (err, best)
    # the report's error is the written factors' error, and its optimum is Eckart–Young's
    assert rec["rel_error"] == pytest.approx(err / float(delta64.norm()), rel=1e-3, abs=1e-6)
    assert rec["optimal_rel_error"] == pytest.approx(best / float(delta64.norm()), rel=1e-3, abs=1e-6)
    s = torch.linalg.svdvals(delta64)
    assert rec["energy_kept"] == pytest.approx(float(s[:rank].square().sum() / s.square().sum()), rel=1e-4)


@pytest.mark.parametrize("m,n,k,rank,noise", [
    (1100, 700, 16, 16, 1e-2),
    (700, 1100, 16, 8, 1e-2),
    (800, 800, 24, 24, 3e-1),
])
def test_randomized_path_reaches_eckart_young(m, n, k, rank, noise):
    base, ft = pair(m, n, k, noise, seed=rank)
    r = extract_lora(base, ft, rank, progress=False)  # auto: min side > 512 and 2·rank < it
    rec = r.tensors["layer.proj.weight"]
    assert rec["method"] == "randomized"
    delta64 = ft["layer.proj.weight"].double() - base["layer.proj.weight"].double()
    err = float((delta64 - adapter_product(r.state)).norm())
    best = optimum(delta64, rank)
    assert err >= best * (1 - 1e-4)  # nothing beats the optimum: the test would catch a wrong reference
    assert err <= 1.01 * best, (err, best)
    assert rec["rel_error"] == pytest.approx(err / float(delta64.norm()), rel=1e-3)


@settings(max_examples=max(5, settings.default.max_examples // 10))
@given(m=st.integers(2, 48), n=st.integers(2, 48), data=st.data())
def test_factor_property(m, n, data):
    """Any shape and rank, forced through either path: B·A has rank ≤ r, the
    exact path is optimal and the randomized one within 1% of it (the sketch
    covers small matrices nearly whole)."""
    rank = data.draw(st.integers(1, min(m, n)))
    method = data.draw(st.sampled_from(["exact", "randomized"]))
    k = data.draw(st.integers(1, min(m, n)))
    delta = planted(m, n, k, 1e-2, seed=data.draw(st.integers(0, 10**6)))
    b, a, s, used, tail = factor(delta, rank, method, oversample=10, niter=4)
    assert b.shape == (m, rank) and a.shape == (rank, n) and s.shape == (rank,)
    err = float((delta.double() - b.double() @ a.double()).norm())
    best = optimum(delta.double(), rank)
    scale = float(delta.double().norm())
    assert err <= 1.01 * best + 1e-5 * scale
    if used == "exact":
        assert tail == pytest.approx(best ** 2, rel=1e-3, abs=1e-9 * scale ** 2)


def test_randomized_is_seeded():
    delta = planted(600, 520, 20, 1e-1, seed=3)
    b1, a1, *_ = factor(delta, 10, "randomized", seed=7)
    torch.manual_seed(123)  # the global generator's state does not matter
    b2, a2, *_ = factor(delta, 10, "randomized", seed=7)
    assert torch.equal(b1, b2) and torch.equal(a1, a2)
    b3, a3, *_ = factor(delta, 10, "randomized", seed=8)
    assert not torch.equal(b1 @ a1, b3 @ a3)


def test_split_is_sqrt_s():
    """B = U·√S, A = √S·Vᵀ: A's rows are orthogonal, B's columns too, with equal norms."""
    delta = planted(50, 40, 6, 1e-2, seed=4)
    b, a, s, *_ = factor(delta, 6, "exact")
    torch.testing.assert_close(a @ a.T, torch.diag(s), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.T @ b, torch.diag(s), rtol=1e-4, atol=1e-6)


# --- PEFT round trip -----------------------------------------------------------

def tiny_gpt_pair(tmp_path, dtype=torch.float32):
    from ferrox.testing import TinyGPT, TinyGPTConfig, save_pretrained

    cfg = TinyGPTConfig(dim=32, n_layers=2, n_heads=2, ffn=64, max_seq=32)
    base = save_pretrained(TinyGPT(cfg, seed=0), tmp_path / "base", dtype)
    ft = synthetic.fine_tune(base, str(tmp_path / "ft"), seed=1, scale=0.05)
    return base, ft


@pytest.mark.parametrize("select,saves", [
    (None, ["lm_head"]),                                     # every projection, compact target_modules
    (["*layers.0.*", "!*norm*"], None),                      # one layer: full module names
    (["*embed_tokens*", "*q_proj*"], None),                  # PEFT's embedding LoRA layout
])
def test_peft_loads_and_merges(tmp_path, select, saves):
    import peft
    import transformers

    base, ft = tiny_gpt_pair(tmp_path)
    r = extract_lora(base, ft, 4, out=tmp_path / "adapter", select=select, modules_to_save=saves, progress=False)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4 and cfg["task_type"] == "CAUSAL_LM"
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).merge_and_unload()
    got = merged.state_dict()
    bw, fw = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(ft, "model.safetensors"))
    factored = set(r.tensors)
    assert factored, "nothing factored"
    for name, w in bw.items():
        module = name.rsplit(".", 1)[0]
        if name in factored:
            if name.endswith("embed_tokens.weight"):
                a = adapter[f"base_model.model.{module}.lora_embedding_A"]
                b = adapter[f"base_model.model.{module}.lora_embedding_B"]
                want = w + (b @ a).T
            else:
                want = w + adapter[f"base_model.model.{module}.lora_B.weight"] @ \
                    adapter[f"base_model.model.{module}.lora_A.weight"]
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
            assert not torch.equal(got[name], w)
        elif saves and module.rsplit(".", 1)[-1] in saves:
            assert torch.equal(got[name], fw[name])
        else:
            assert torch.equal(got[name], w), name  # untouched by the adapter
    if select is None:
        assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    elif select[0] == "*layers.0.*":
        assert all(t.startswith("model.layers.0.") for t in cfg["target_modules"])


def test_full_rank_adapter_reproduces_the_fine_tune(tmp_path):
    """With r = the smaller side of every matrix, base + adapter is the
    fine-tune's forward pass (up to f32 rounding)."""
    import peft
    import transformers

    base = synthetic.make_llama(str(tmp_path / "base"), hidden=32, layers=1, intermediate=32, vocab=64,
                                dtype=torch.float32)
    ft = synthetic.fine_tune(base, str(tmp_path / "ft"), seed=2, scale=0.1)
    # norms changed too: keep them whole
    extract_lora(base, ft, 32, out=tmp_path / "a", modules_to_save=["input_layernorm", "post_attention_layernorm",
                                                                    "norm", "embed_tokens", "lm_head"],
                 progress=False)
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), str(tmp_path / "a"))
    want = transformers.LlamaForCausalLM.from_pretrained(ft)
    ids = torch.arange(20).reshape(2, 10) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(tmp_path, dtype):
    """The task vector of bf16/f16 checkpoints is taken in f32 (exact: the
    difference of two such numbers is an f32), its factors written in the
    input dtype are the f32 factors rounded once, and with f32 factors the
    error is Eckart–Young's."""
    base, ft = pair(96, 72, 10, 3e-2, seed=5, dtype=dtype)
    f32 = extract_lora(base, ft, 10, dtype="float32", progress=False)
    low = extract_lora(base, ft, 10, out=tmp_path / "a", progress=False)
    written = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, t in f32.state.items():
        assert t.dtype == torch.float32
        assert written[name].dtype == dtype
        assert torch.equal(written[name], t.to(dtype))
    delta64 = ft["layer.proj.weight"].double() - base["layer.proj.weight"].double()
    err = float((delta64 - adapter_product(f32.state)).norm())
    best = optimum(delta64, 10)
    assert abs(err - best) <= 0.01 * best
    report = json.loads((tmp_path / "a" / REPORT_FILE).read_text())
    rec = report["tensors"]["layer.proj.weight"]
    low_err = float((delta64 - adapter_product(written)).norm()) / float(delta64.norm())
    assert rec["rel_error"] == pytest.approx(low_err, rel=1e-3)
    assert low.summary["factored_matrices"] == 1


# --- refusals ----------------------------------------------------------------

def assert_nothing_written(tmp_path, out):
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if "ferrox-tmp" in p]


@pytest.mark.parametrize("rank", [0, -3, 2.0, True, "4"])
def test_bad_rank(tmp_path, rank):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        extract_lora(base, ft, rank, out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_rank_above_a_matrix_side(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    with pytest.raises(ValueError, match=r"rank 17 .*'layer\.proj\.weight' \[20, 16\]"):
        extract_lora(base, ft, 17, out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_shape_mismatch(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    base["other.weight"] = torch.zeros(8, 8)
    ft["other.weight"] = torch.zeros(9, 8)
    with pytest.raises(ValueError, match=r"'other\.weight'.*\[8, 8\].*\[9, 8\]"):
        extract_lora(base, ft, 2, out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")
    # saved whole instead, it is accepted
    r = extract_lora(base, ft, 2, out=tmp_path / "b", modules_to_save=["other"], progress=False)
    assert torch.equal(load_file(tmp_path / "b" / "adapter_model.safetensors")["base_model.model.other.weight"],
                       ft["other.weight"])
    assert r.config["modules_to_save"] == ["other"]


def test_nothing_selected(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    with pytest.raises(ValueError, match="select: no matrix selected"):
        extract_lora(base, ft, 2, out=tmp_path / "a", select=["*mlp*"], progress=False)
    with pytest.raises(ValueError, match="select"):  # the default excludes embeddings
        extract_lora({"embed.weight": torch.zeros(4, 4)}, {"embed.weight": torch.ones(4, 4)}, 2,
                     out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_unknown_module_to_save(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    with pytest.raises(ValueError, match="modules_to_save.*'lm_head'"):
        extract_lora(base, ft, 2, out=tmp_path / "a", modules_to_save=["lm_head"], progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_missing_in_base(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    ft["extra.weight"] = torch.ones(4, 4)
    with pytest.raises(ValueError, match="'extra.weight'.*base has no such tensor"):
        extract_lora(base, ft, 2, out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_non_finite_delta_writes_nothing(tmp_path):
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    base["z.weight"] = torch.zeros(6, 6)
    ft["z.weight"] = torch.zeros(6, 6)
    ft["z.weight"][2, 3] = float("inf")
    with pytest.raises(ValueError, match="'z.weight'.*non-finite"):
        extract_lora(base, ft, 2, out=tmp_path / "a", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "a")


def test_unchanged_matrix_gives_zero_factors():
    base, ft = pair(20, 16, 3, 1e-2, seed=0)
    base["same.weight"] = ft["same.weight"] = torch.randn(6, 5)
    r = extract_lora(base, ft, 2, progress=False)
    assert r.tensors["same.weight"]["method"] == "zero"
    assert not adapter_product(r.state, "same").any()


# --- the command line -----------------------------------------------------------

def test_cli(tmp_path, capsys):
    base = synthetic.make_llama(str(tmp_path / "base"), hidden=32, layers=2, vocab=64, dtype=torch.bfloat16)
    ft = synthetic.fine_tune(base, str(tmp_path / "ft"), seed=3)
    out = tmp_path / "adapter"
    rc = cli_main(["extract", "lora", "--base", base, "--finetuned", ft, "--rank", "3", "--out", str(out),
                   "--select", "*self_attn*", "--save-module", "lm_head", "--no-progress"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "rank-3 LoRA of 8 matrices" in said
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["modules_to_save"] == ["lm_head"] and cfg["base_model_name_or_path"] == base
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["ferrox_format"] == "lora" and len(report["tensors"]) == 8
    assert all(0 < t["rel_error"] < 1 and 0 < t["energy_kept"] <= 1 for t in report["tensors"].values())
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].dtype == torch.bfloat16
    # an existing folder is refused without --force, replaced with it
    assert cli_main(["extract", "lora", "--base", base, "--finetuned", ft, "--rank", "3", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(["extract", "lora", "--base", base, "--finetuned", ft, "--rank", "2", str(out), "--force",
                     "--quiet", "--dtype", "float32", "--svd", "randomized"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    # a bad rank: one line naming it, exit 1, nothing written
    assert cli_main(["extract", "lora", "--base", base, "--finetuned", ft, "--rank", "0", str(tmp_path / "x")]) == 1
    assert "rank" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_files_as_inputs(tmp_path):
    """Plain safetensors files work as well as folders."""
    base, ft = pair(30, 20, 4, 1e-2, seed=9)
    save_file(base, tmp_path / "b.safetensors")
    save_file(ft, tmp_path / "f.safetensors")
    r = extract_lora(str(tmp_path / "b.safetensors"), str(tmp_path / "f.safetensors"), 4, out=tmp_path / "a",
                     progress=False)
    assert r.out == str(tmp_path / "a") and r.config["task_type"] is None
    assert sorted(os.listdir(tmp_path / "a")) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                  REPORT_FILE]


# --- the reverse: an adapter merged into its model ---------------------------------

@pytest.mark.parametrize("edit", [{}, {"lora_alpha": 10}, {"use_rslora": True, "lora_alpha": 6},
                                  {"alpha_pattern": {"q_proj": 1}}])
def test_apply_lora_matches_peft(tmp_path, edit):
    """apply_lora(base, adapter) equals PEFT's merge_and_unload for the
    adapter's scales (lora_alpha / r, rsLoRA, per-module alpha), including the
    embedding layout and modules_to_save."""
    import peft
    import transformers

    from ferrox.extract import apply_lora

    base, ft = tiny_gpt_pair(tmp_path)
    adapter = tmp_path / "adapter"
    extract_lora(base, ft, 4, out=adapter, select=["*proj*", "*embed_tokens*"], modules_to_save=["lm_head"],
                 progress=False)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(edit)
    cfg_path.write_text(json.dumps(cfg))
    peft_merged = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base),
                                                 str(adapter)).merge_and_unload().state_dict()
    out = apply_lora(base, adapter, tmp_path / "merged", progress=False)
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert set(ours) == set(load_file(os.path.join(base, "model.safetensors")))
    for name, t in ours.items():
        torch.testing.assert_close(t, peft_merged[name], rtol=1e-5, atol=1e-6)
    assert os.path.isfile(os.path.join(out, "config.json"))
    # in memory, the same tensors
    state = apply_lora(base, adapter, progress=False)
    assert all(torch.equal(state[k], ours[k]) for k in ours)


def test_apply_lora_bf16_rounds_once(tmp_path):
    base, ft = tiny_gpt_pair(tmp_path, dtype=torch.bfloat16)
    from ferrox.extract import apply_lora

    extract_lora(base, ft, 3, out=tmp_path / "a", progress=False)
    state = apply_lora(base, tmp_path / "a", progress=False)
    bw = load_file(os.path.join(base, "model.safetensors"))
    ad = load_file(tmp_path / "a" / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    want = (bw[name + ".weight"].double() + ad[f"base_model.model.{name}.lora_B.weight"].double()
            @ ad[f"base_model.model.{name}.lora_A.weight"].double())
    got = state[name + ".weight"]
    assert got.dtype == torch.bfloat16
    # within one bf16 rounding of the exact sum
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-30).all()


def test_apply_lora_refusals(tmp_path):
    from ferrox.extract import apply_lora, split_lora_ref

    base, ft = tiny_gpt_pair(tmp_path)
    adapter = tmp_path / "adapter"
    extract_lora(base, ft, 2, out=adapter, progress=False)
    other = synthetic.make_llama(str(tmp_path / "other"), hidden=48, layers=2, vocab=256, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora_A.weight' gives a 32x\d+ update to .* of shape \[48, \d+\]"):
        apply_lora(other, adapter, tmp_path / "x", progress=False)
    assert_nothing_written(tmp_path, tmp_path / "x")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        apply_lora(base, adapter, progress=False)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        apply_lora(base, adapter, progress=False)
    with pytest.raises(ValueError, match="adapter_config.json"):
        apply_lora(base, tmp_path, progress=False)
    assert split_lora_ref("models/a+loras/b") == ("models/a", "loras/b")
    assert split_lora_ref("models/a") == ("models/a", None)
    with pytest.raises(ValueError, match="MODEL\\+LORA"):
        split_lora_ref("models/a+")


def test_streams_one_matrix_pair_at_a_time(tmp_path, monkeypatch):
    """Tensors are read one at a time from each checkpoint and dropped before
    the next: at most a base and a fine-tune tensor are alive at once."""
    import weakref

    from ferrox import checkpoint

    base = synthetic.make_llama(str(tmp_path / "base"), hidden=32, layers=3, vocab=64, dtype=torch.bfloat16)
    ft = synthetic.fine_tune(base, str(tmp_path / "ft"), seed=4)
    live, peak, reads = [0], [0], []
    original = checkpoint.TensorReader.read

    def counted(self, entry):
        t = original(self, entry)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        reads.append(entry.name)

        def dead():
            live[0] -= 1

        weakref.finalize(t, dead)
        return t

    monkeypatch.setattr(checkpoint.TensorReader, "read", counted)
    r = extract_lora(base, ft, 2, out=tmp_path / "a", modules_to_save=["lm_head"], progress=False)
    assert peak[0] <= 2
    assert len(r.tensors) == 21 and len(reads) == 2 * 21 + 1  # each factored matrix from both, lm_head once
