"""ferrox moe: dense experts into a Mixtral checkpoint (mergekit-moe, Branch-Train-MiX).

Checked on synthetic Llama checkpoints and on the tiny GPT of ferrox.testing:
expert tensors are the source FFNs bit for bit; shared tensors are the base's
or the exact float64 mean of the experts'; transformers' MixtralForCausalLM
loads both layouts with no missing or unexpected keys, and a router whose
rows send every token to expert i (top-1) reproduces the dense Llama made of
the shared tensors and expert i's FFN; routers of each gate mode against
naive references; config errors; the command line end to end.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from ferrox import synthetic
from ferrox.checkpoint import read_checkpoint
from ferrox.moe import build_moe, expert_names, load_config, parse_config, random_gates, router_name
from ferrox.moe.build import FFN

HIDDEN, LAYERS, INTER, VOCAB, N_EXP = 64, 2, 96, 256, 3
SHARED_IN_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                   "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def _state(folder) -> dict:
    out = {}
    for t in read_checkpoint(folder).tensors:
        with safe_open(t.file, "pt") as f:
            out[t.name] = f.get_tensor(t.name)
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _shared_names(state) -> list:
    return [n for n in state if ".mlp." not in n]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A synthetic f32 Llama base and three fine-tunes of it (and bf16 copies)."""
    root = tmp_path_factory.mktemp("moe-models")
    out = {}
    for dt, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        base = synthetic.make_llama(str(root / f"base-{tag}"), hidden=HIDDEN, layers=LAYERS, intermediate=INTER,
                                    vocab=VOCAB, dtype=dt, seed=0)
        exps = [synthetic.fine_tune(base, str(root / f"e{i}-{tag}"), seed=11 + i, scale=0.3) for i in range(N_EXP)]
        out[tag] = (base, exps)
    out["root"] = root
    return out


def _cfg(base, exps, **extra) -> dict:
    return {"base_model": base, "experts": [{"source_model": e} for e in exps], "gate_mode": "random", **extra}


def _load_mixtral(folder):
    model, info = transformers.MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"transformers did not load {folder} cleanly: {bad}"
    return model.eval()


# --- what is written -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["experts", "fused"])
def test_experts_bitwise_shared_from_base(models, tmp_path, layout):
    base, exps = models["f32"]
    rep = build_moe(parse_config(_cfg(base, exps, seed=5)), tmp_path / "moe", layout=layout, progress=False)
    out, bstate = _state(rep.out), _state(base)
    estates = [_state(e) for e in exps]
    for layer in range(LAYERS):
        for e in range(N_EXP):
            names = expert_names(layer, e, layout)
            for proj in FFN:
                src = estates[e][f"model.layers.{layer}.mlp.{proj}.weight"]
                got = out[names[proj]]
                if layout == "fused":
                    got = got[e] if proj == "down_proj" else got[e].chunk(2, dim=0)[proj == "up_proj"]
                assert _bits_equal(got, src), (layer, e, proj)
        # random routers: a seeded standard normal [layers, experts, hidden] (naive: the same draw)
        ref = torch.randn((LAYERS, N_EXP, HIDDEN), generator=torch.Generator().manual_seed(5))[layer]
        assert _bits_equal(out[router_name(layer, layout)], ref)
    for n in _shared_names(bstate):
        assert _bits_equal(out[n], bstate[n]), n
    assert sorted(out) == sorted(
        _shared_names(bstate) + [router_name(l, layout) for l in range(LAYERS)]
        + sorted({v for l in range(LAYERS) for e in range(N_EXP) for v in expert_names(l, e, layout).values()}))
    cfg = json.load(open(os.path.join(rep.out, "config.json")))
    assert (cfg["model_type"], cfg["architectures"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == \
        ("mixtral", ["MixtralForCausalLM"], N_EXP, 2)
    # the Llama defaults the base left out, not Mixtral's (rope_theta 1e6, 8 KV heads)
    assert cfg["rope_theta"] == 10000.0 and cfg["num_key_value_heads"] == HIDDEN // 16
    assert cfg["torch_dtype"] == "float32"
    report = json.load(open(os.path.join(rep.out, "ferrox_report.json")))
    assert report["summary"]["layout"] == layout and report["ferrox_format"] == "moe"
    _load_mixtral(rep.out)


@pytest.mark.parametrize("tag", ["f32", "bf16"])
def test_average_shared_is_the_exact_mean(models, tmp_path, tag):
    base, exps = models[tag]
    rep = build_moe(parse_config(_cfg(base, exps, average_shared=True)), tmp_path / "btx", progress=False)
    out, estates = _state(rep.out), [_state(e) for e in exps]
    dt = estates[0]["model.norm.weight"].dtype
    for n in _shared_names(estates[0]):
        # naive: the mean of the experts' values in float64, one rounding
        mean = sum(s[n].double() for s in estates) / N_EXP
        assert _bits_equal(out[n], mean.to(dt)), n
        assert not _bits_equal(out[n], _state(base)[n]) or n.endswith("norm.weight")
    for layer in range(LAYERS):
        for e in range(N_EXP):
            for proj, name in expert_names(layer, e).items():
                assert _bits_equal(out[name], estates[e][f"model.layers.{layer}.mlp.{proj}.weight"])


def test_dtype_and_expert_scales(models, tmp_path):
    base, exps = models["f32"]
    raw = _cfg(base, exps, dtype="bfloat16", seed=3)
    raw["experts"][1]["residual_scale"] = 0.5
    raw["experts"][2]["noise_scale"] = 0.01
    rep = build_moe(parse_config(raw), tmp_path / "bf16", progress=False)
    out, estates = _state(rep.out), [_state(e) for e in exps]
    cfg = json.load(open(os.path.join(rep.out, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16" and all(t.dtype == torch.bfloat16 for t in out.values())
    for layer in range(LAYERS):
        names = [expert_names(layer, e) for e in range(N_EXP)]
        src = [{p: s[f"model.layers.{layer}.mlp.{p}.weight"] for p in FFN} for s in estates]
        for p in FFN:  # expert 0: a plain cast (round to nearest even)
            assert _bits_equal(out[names[0][p]], src[0][p].to(torch.bfloat16))
        assert _bits_equal(out[names[1]["down_proj"]], (src[1]["down_proj"] * 0.5).to(torch.bfloat16))
        assert _bits_equal(out[names[1]["gate_proj"]], src[1]["gate_proj"].to(torch.bfloat16))
        noisy = out[names[2]["up_proj"]].float() - src[2]["up_proj"]
        assert 0.005 < float(noisy.std()) < 0.02  # noise of std 0.01 (plus bf16 rounding)
    again = build_moe(parse_config(raw), tmp_path / "again", progress=False)
    assert all(_bits_equal(a, b) for a, b in zip(_state(again.out).values(), out.values()))  # seeded


# --- forward passes ------------------------------------------------------------------------------------------


def _dense_with_ffn(shared_state: dict, ffn_state: dict, config: dict):
    """A LlamaForCausalLM of ``shared_state``'s non-FFN tensors and ``ffn_state``'s FFN tensors."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in config.items()
                                                                      if k not in ("architectures", "torch_dtype")}))
    state = {n: t.float() for n, t in shared_state.items() if ".mlp." not in n and "block_sparse_moe" not in n}
    state.update({n: t.float() for n, t in ffn_state.items() if ".mlp." in n})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model.float().eval()


def _route_to(moe, dense, expert: int, ids: torch.Tensor, layout: str):
    """Sets every MoE router so that expert ``expert`` wins every token of ``ids`` by a margin of 30: the
    dense model's FFN inputs X_l (which the MoE reproduces when routing to that expert) are captured and
    the winning row solves X_l w = 30 (fewer tokens than hidden dims), the other rows zero."""
    inputs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
             for layer in dense.model.layers]
    with torch.no_grad():
        want = dense(ids).logits
    for h in hooks:
        h.remove()
    for layer, x in zip(moe.model.layers, inputs):
        w = torch.zeros_like(layer.mlp.gate.weight)
        w[expert] = torch.linalg.lstsq(x.double(), torch.full((x.shape[0], 1), 30.0, dtype=torch.float64)).solution[:, 0]
        assert float((x.double() @ w[expert].double()).min()) > 29  # it does win every token
        layer.mlp.gate.weight.data.copy_(w)
    return want


@pytest.mark.parametrize("layout,average", [("experts", False), ("fused", False), ("experts", True)])
def test_top1_router_gives_expert_dense_forward(models, tmp_path, layout, average):
    base, exps = models["f32"]
    rep = build_moe(parse_config(_cfg(base, exps, experts_per_token=1, average_shared=average)),
                    tmp_path / "moe", layout=layout, progress=False)
    moe = _load_mixtral(rep.out)
    base_cfg = json.load(open(os.path.join(base, "config.json")))
    shared = _state(rep.out)  # the shared tensors as written (checked against base/mean above)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for e in range(N_EXP):
        dense = _dense_with_ffn(shared, _state(exps[e]), base_cfg)
        want = _route_to(moe, dense, e, ids, layout)
        with torch.no_grad():
            got = moe(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # without the shared tensors from the right place the forward differs: the comparison can fail
    last = N_EXP - 1  # the expert the routers send every token to now
    other = _dense_with_ffn(_state(exps[last]) if not average else _state(base), _state(exps[last]), base_cfg)
    with torch.no_grad():
        assert not torch.allclose(other(ids).logits, moe(ids).logits, rtol=1e-3, atol=1e-3)


def test_identical_experts_equal_the_seed_for_any_router(models, tmp_path):
    """BTX's identity check: branches never trained give the seed model back whatever the router does
    (top-2 weights renormalised to sum to 1)."""
    base, _ = models["f32"]
    rep = build_moe(parse_config(_cfg(base, [base] * N_EXP, seed=9)), tmp_path / "same", progress=False)
    moe = _load_mixtral(rep.out)
    dense = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


# --- the tiny GPT and prompt-based routers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from ferrox.testing import corpus, tasks

    return tasks.pretrained(0), [tasks.fine_tuned(p, 0) for p in corpus.FINETUNE_TOPICS]


PROMPTS = {0: (["The statement is true.", "Every claim here holds."], ["class Model:"]),
           1: (["def field(self):", "schema = {'id': int}"], [])}


def _tiny_cfg(base, exps, mode):
    return {"base_model": base, "gate_mode": mode, "experts": [
        {"source_model": e, "positive_prompts": PROMPTS[i][0], **({"negative_prompts": PROMPTS[i][1]} if PROMPTS[i][1] else {})}
        for i, e in enumerate(exps)]}


def _normalise(v):
    return v / v.norm().clamp(min=1e-8)


def _naive_states(model, prompt: str):
    """The residual stream entering each layer at each position (ferrox's own TinyGPT, not transformers)."""
    ids = torch.tensor(list(prompt.encode()))[None]
    x = model.model.embed_tokens(ids)
    cos, sin = model._rotary(ids.shape[1], x.device, x.dtype)
    states = []
    for block in model.model.layers:
        states.append(x[0])
        x = block(x, cos, sin)
    return torch.stack(states)  # [layers, seq, hidden]


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_tiny_gpt_hidden_gates_and_forward(tiny, tmp_path, mode):
    from ferrox.testing.tiny_gpt import load_pretrained

    base, exps = tiny
    rep = build_moe(parse_config(_tiny_cfg(base, exps, mode)), tmp_path / "tiny", progress=False)
    out = _state(rep.out)
    gpt = load_pretrained(base).eval()
    n_layers = gpt.config.n_layers
    with torch.no_grad():
        for i in range(len(exps)):
            def mean_state(prompts):
                s = [_naive_states(gpt, p) for p in prompts]
                return sum((x.mean(1) if mode == "hidden_avg" else x[:, -1]) for x in s) / len(s)
            pos, neg = PROMPTS[i]
            v = mean_state(pos) - (mean_state(neg) if neg else 0)
            for layer in range(n_layers):
                row = out[router_name(layer)][i]
                torch.testing.assert_close(row, _normalise(v[layer]), rtol=1e-4, atol=1e-5)
                assert abs(float(row.norm()) - 1) < 1e-5
    # the routers differ between experts and layers (prompts do matter)
    assert not torch.allclose(out[router_name(0)][0], out[router_name(0)][1], atol=1e-2)
    moe = _load_mixtral(rep.out)
    cfg = json.load(open(os.path.join(base, "config.json")))
    ids = torch.tensor([list(b"The model of the statement.")])[:, :24]
    for e in range(len(exps)):
        dense = _dense_with_ffn(_state(base), _state(exps[e]), cfg)
        want = _route_to(moe, dense, e, ids, "experts")
        with torch.no_grad():
            torch.testing.assert_close(moe(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_tiny_gpt_cheap_embed_gates(tiny, tmp_path):
    base, exps = tiny
    rep = build_moe(parse_config(_tiny_cfg(base, exps, "cheap_embed")), tmp_path / "cheap", layout="fused",
                    progress=False)
    out = _state(rep.out)
    embed = _state(base)["model.embed_tokens.weight"].double()

    def mean_embed(prompts):  # naive: every byte of every prompt, one at a time
        acc, n = torch.zeros(embed.shape[1], dtype=torch.float64), 0
        for p in prompts:
            for b in p.encode():
                acc += embed[b]
                n += 1
        return acc / n

    for i in range(len(exps)):
        pos, neg = PROMPTS[i]
        v = _normalise(mean_embed(pos))
        if neg:
            v = v - _normalise(mean_embed(neg))
        for layer in range(4):
            torch.testing.assert_close(out[router_name(layer, "fused")][i].double(), _normalise(v), rtol=1e-5,
                                       atol=1e-6)


def test_prompt_gates_need_a_tokenizer(models, tmp_path):
    base, exps = models["f32"]
    raw = _tiny_cfg(base, exps[:2], "cheap_embed")
    with pytest.raises(ValueError, match="no tokenizer"):
        build_moe(parse_config(raw), tmp_path / "x", progress=False)
    assert not os.path.exists(tmp_path / "x")
    # a tokenizer given by the caller
    rep = build_moe(parse_config(raw), tmp_path / "y", progress=False, tokenize=lambda p: list(p.encode()))
    assert _state(rep.out)[router_name(1)].shape == (2, HIDDEN)


# --- config errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(merge_method="linear"), "unknown config key 'merge_method'"),
    (lambda c: c.pop("base_model"), "base_model is required"),
    (lambda c: c.update(base_model="/no/such/model"), "base_model: no such model"),
    (lambda c: c.update(base_model="org/model"), "hub model id"),
    (lambda c: c.update(experts=[]), "experts: expected a non-empty list"),
    (lambda c: c.update(experts="e0"), "experts: expected a non-empty list"),
    (lambda c: c["experts"][1].update(source_model=3), r"experts\[1\].source_model: expected a local model path"),
    (lambda c: c["experts"][0].update(lora="x"), r"experts\[0\]: unknown key 'lora'"),
    (lambda c: c["experts"][0].pop("source_model"), r"experts\[0\].source_model is required"),
    (lambda c: c.update(gate_mode="softmax"), "gate_mode: expected one of"),
    (lambda c: c.update(dtype="int8"), "dtype: expected one of"),
    (lambda c: c.update(experts_per_token=0), "experts_per_token: expected an integer in"),
    (lambda c: c.update(experts_per_token=4), "experts_per_token: 4 is more than the 3 experts"),
    (lambda c: c.update(experts_per_token=True), "experts_per_token: expected an integer"),
    (lambda c: c.update(average_shared="yes"), "average_shared: expected true or false"),
    (lambda c: c.update(seed=-1), "seed: expected an integer in"),
    (lambda c: c.update(architecture="qwen"), "architecture: ferrox moe writes Mixtral only"),
    (lambda c: c.update(shared_experts=[{"source_model": "x"}]), "shared_experts"),
    (lambda c: c["experts"][2].update(noise_scale="big"), r"experts\[2\].noise_scale: expected a number"),
    (lambda c: c["experts"][2].update(residual_scale=float("nan")), r"experts\[2\].residual_scale: expected a finite"),
    (lambda c: c["experts"][0].update(positive_prompts="math"), r"experts\[0\].positive_prompts: expected a list"),
    (lambda c: c["experts"][0].update(positive_prompts=["a", 1]), r"experts\[0\].positive_prompts\[1\]: expected a string"),
    (lambda c: c.update(gate_mode="hidden"), r"experts\[0\].positive_prompts: gate_mode hidden needs positive"),
    (lambda c: [c.update(gate_mode="cheap_embed")] + [e.update(positive_prompts=["x"]) for e in c["experts"]],
     "the same positive and negative prompts"),
])
def test_config_errors(models, change, match):
    base, exps = models["f32"]
    raw = _cfg(base, exps)
    change(raw)
    with pytest.raises(ValueError, match=match):
        parse_config(raw)


def test_all_same_experts_need_the_flag(models):
    base, _ = models["f32"]
    raw = {"base_model": base, "gate_mode": "cheap_embed",
           "experts": [{"source_model": base, "positive_prompts": [p]} for p in ("a", "b")]}
    with pytest.raises(ValueError, match="every expert is the same model"):
        parse_config(raw)
    assert parse_config(raw, allow_all_same=True).n_experts == 2


def test_checkpoint_errors(models, tmp_path):
    base, exps = models["f32"]
    short = str(tmp_path / "short")
    state = _state(exps[0])
    state.pop("model.layers.1.mlp.up_proj.weight")
    synthetic.write_model(short, state)
    os.link(os.path.join(exps[0], "config.json"), os.path.join(short, "config.json"))
    with pytest.raises(ValueError, match=r"experts\[1\].source_model: no tensor 'model.layers.1.mlp.up_proj.weight'"):
        build_moe(parse_config(_cfg(base, [exps[0], short])), tmp_path / "o1", progress=False)
    biased = str(tmp_path / "biased")
    state = _state(base)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(HIDDEN)
    synthetic.write_model(biased, state, json.load(open(os.path.join(base, "config.json"))))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.bias' has no place"):
        build_moe(parse_config(_cfg(biased, exps)), tmp_path / "o2", progress=False)
    wide = synthetic.make_llama(str(tmp_path / "wide"), hidden=HIDDEN, layers=LAYERS, intermediate=2 * INTER,
                                vocab=VOCAB, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"experts\[1\].source_model: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        build_moe(parse_config(_cfg(base, [exps[0], wide])), tmp_path / "o3", progress=False)
    assert not any(os.path.exists(tmp_path / o) for o in ("o1", "o2", "o3"))


@settings(max_examples=max(5, settings.default.max_examples // 10), deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3), st.integers(1, 3),
       st.sampled_from(["random", "uniform_random", "cheap_embed", "hidden"]), st.booleans())
def test_config_roundtrip_property(models, prompts, k, mode, avg):
    """Any well-formed config parses to exactly what it says."""
    base, exps = models["f32"]
    raw = {"base_model": base, "gate_mode": mode, "experts_per_token": k, "average_shared": avg,
           "experts": [{"source_model": e, "positive_prompts": prompts + [str(i)]} for i, e in enumerate(exps)]}
    cfg = parse_config(raw)
    assert (cfg.gate_mode, cfg.experts_per_token, cfg.average_shared, cfg.n_experts) == (mode, k, avg, N_EXP)
    assert [e.positive_prompts for e in cfg.experts] == [tuple(prompts + [str(i)]) for i in range(N_EXP)]


def test_uniform_random_bounds():
    g = random_gates(3, 4, 64, seed=2, uniform=True)
    assert g.shape == (3, 4, 64) and float(g.abs().max()) <= 64 ** -0.5
    assert not torch.equal(g, random_gates(3, 4, 64, seed=3, uniform=True))


# --- the command line ----------------------------------------------------------------------------------------


def _ferrox(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ferrox.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_end_to_end(models, tmp_path):
    base, exps = models["bf16"]
    cfg_path = tmp_path / "moe.yml"
    # relative model paths resolve from the current directory, as in mergekit
    rel = {"base_model": os.path.relpath(base, models["root"]), "gate_mode": "random", "average_shared": True,
           "experts": [{"source_model": os.path.relpath(e, models["root"])} for e in exps], "experts_per_token": 2}
    cfg_path.write_text(yaml.safe_dump(rel))
    out = tmp_path / "out"
    r = _ferrox("moe", cfg_path, out, "--no-progress", "--layout", "fused", "--random-seed", "4", cwd=models["root"])
    assert r.returncode == 0, r.stderr
    assert "Mixtral of 3 experts x 2 layers" in r.stdout
    assert (out / "mergekit_moe_config.yml").read_text() == cfg_path.read_text()
    written = _state(out)
    ref = torch.randn((LAYERS, N_EXP, HIDDEN), generator=torch.Generator().manual_seed(4))[1].to(torch.bfloat16)
    assert _bits_equal(written[router_name(1, "fused")], ref)
    _load_mixtral(str(out))
    # an existing output is kept without --force
    r = _ferrox("moe", cfg_path, out, "--no-progress", cwd=models["root"])
    assert r.returncode == 1 and "exists; pass --force" in r.stderr
    # a bad config: one line naming the key, exit 1, nothing written
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({**rel, "gate_mode": "routed"}))
    r = _ferrox("moe", bad, tmp_path / "o2", cwd=models["root"])
    assert r.returncode == 1 and "gate_mode: expected one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    r = _ferrox("moe", "--help")
    assert r.returncode == 0 and "--layout" in r.stdout


def test_load_config_from_file(models, tmp_path):
    base, exps = models["f32"]
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(_cfg(base, exps)))
    cfg = load_config(p)
    assert cfg.text == p.read_text() and cfg.gate_mode == "random"
    p.write_text("base_model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(p)


# --- parity with mergekit 0.1.5's mergekit-moe -----------------------------------------------------------------


def _with_tokenizer(folder):
    """A word-level tokenizer with a BOS token (mergekit-moe always loads the base's tokenizer)."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    words = "the a math code wiki story number plus def class return of to is".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenized_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-tok")
    base = _with_tokenizer(synthetic.make_llama(str(root / "base"), hidden=HIDDEN, layers=LAYERS, intermediate=INTER,
                                                vocab=VOCAB, dtype=torch.float32, seed=1))
    return base, [synthetic.fine_tune(base, str(root / f"e{i}"), seed=21 + i, scale=0.3) for i in range(2)]


def _mergekit_moe(raw: dict, out, seed: int):
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)  # mergekit draws random routers from the global RNG
    build(MoEMergeConfig.model_validate(raw), str(out),
          MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False), device="cpu")
    return _state(out)


@pytest.mark.parametrize("mode", ["cheap_embed", "random", "uniform_random"])
def test_parity_with_mergekit_moe(tokenized_models, tmp_path, mode):
    base, exps = tokenized_models
    raw = {"base_model": base, "gate_mode": mode, "dtype": "float32", "experts": [
        {"source_model": exps[0], "positive_prompts": ["the math", "a number plus number of the"],
         "negative_prompts": ["code"]},
        {"source_model": exps[1], "positive_prompts": ["def class return"]}]}
    mk = _mergekit_moe(raw, tmp_path / "mk", seed=7)
    fx = _state(build_moe(parse_config({**raw, "seed": 7}), tmp_path / "fx", layout="fused", progress=False).out)
    assert sorted(fx) == sorted(mk)
    for name in mk:
        if name.endswith("mlp.gate.weight") and mode == "cheap_embed":
            # mergekit sums the one-hot embeddings in f32, ferrox in f64: the unit rows agree to f32 rounding
            torch.testing.assert_close(fx[name], mk[name], rtol=0, atol=1e-6)
        else:
            assert _bits_equal(fx[name], mk[name]), name
    fx_cfg, mk_cfg = (json.load(open(tmp_path / d / "config.json")) for d in ("fx", "mk"))
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
                "rms_norm_eps", "tie_word_embeddings", "sliding_window", "vocab_size", "dtype"):
        assert fx_cfg.get(key) == mk_cfg.get(key), key
    ids = torch.randint(3, 18, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = _load_mixtral(str(tmp_path / "fx"))(ids).logits
        b = _load_mixtral(str(tmp_path / "mk"))(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- streaming, shards, tied embeddings ------------------------------------------------------------------------


def test_streams_one_input_tensor_at_a_time(models, tmp_path, monkeypatch):
    """Every tensor read from the inputs is gone before the next is read (BTX's f64 accumulator aside)."""
    import weakref

    from ferrox import checkpoint

    live, peak, reads = [], [0], [0]
    original = checkpoint.TensorReader.read

    def read(self, entry):
        alive = [r for r in live if r() is not None]
        peak[0] = max(peak[0], len(alive))
        x = original(self, entry)
        live.append(weakref.ref(x))
        reads[0] += 1
        return x

    monkeypatch.setattr(checkpoint.TensorReader, "read", read)
    base, exps = models["f32"]
    build_moe(parse_config(_cfg(base, exps, average_shared=True, dtype="bfloat16")), tmp_path / "m", progress=False)
    n_shared = len(_shared_names(_state(base)))
    assert reads[0] == n_shared * N_EXP + LAYERS * N_EXP * len(FFN)  # every input tensor read once, through read()
    assert peak[0] == 0


def test_shards_and_tied_embeddings(models, tmp_path):
    base, exps = models["f32"]
    one = build_moe(parse_config(_cfg(base, exps, seed=1)), tmp_path / "one", progress=False)
    many = build_moe(parse_config(_cfg(base, exps, seed=1)), tmp_path / "many", max_shard_bytes=100_000,
                     progress=False)
    assert len(read_checkpoint(many.out).files) > 3 and os.path.isfile(os.path.join(many.out, "model.safetensors.index.json"))
    a, b = _state(one.out), _state(many.out)
    assert sorted(a) == sorted(b) and all(_bits_equal(a[n], b[n]) for n in a)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_load_mixtral(many.out)(ids).logits, _load_mixtral(one.out)(ids).logits,
                                   rtol=0, atol=0)
    # a base with tied embeddings and no lm_head: the MoE ties them too
    tied_folders = []
    for src in [base, *exps]:
        state = _state(src)
        state.pop("lm_head.weight")
        cfg = {**json.load(open(os.path.join(base, "config.json"))), "tie_word_embeddings": True}
        tied_folders.append(synthetic.write_model(str(tmp_path / f"tied-{len(tied_folders)}"), state, cfg))
    rep = build_moe(parse_config(_cfg(tied_folders[0], tied_folders[1:])), tmp_path / "tied", progress=False)
    assert "lm_head.weight" not in _state(rep.out)
    moe = _load_mixtral(rep.out)
    assert json.load(open(os.path.join(rep.out, "config.json")))["tie_word_embeddings"] is True
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()


def test_mistral_base(models, tmp_path):
    """A Mistral base: its defaults (not Mixtral's) fill the config, the sliding window is dropped as mergekit
    does, and identical experts give the dense Mistral back."""
    base, exps = models["f32"]
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096)
    cfg.pop("num_key_value_heads")  # Mistral's default (8) is not Llama's (= heads)
    cfg["num_attention_heads"] = 16  # so that the defaults (8 for Mistral, = heads for Llama) differ
    state = _state(base)
    for n in [n for n in state if n.endswith(("k_proj.weight", "v_proj.weight"))]:
        state[n] = state[n][:32].clone()  # 8 KV heads of 4 dims
    mistral = synthetic.write_model(str(tmp_path / "mistral"), state, cfg)
    rep = build_moe(parse_config(_cfg(mistral, [mistral] * 2)), tmp_path / "moe", progress=False)
    out_cfg = json.load(open(os.path.join(rep.out, "config.json")))
    assert out_cfg["num_key_value_heads"] == 8 and out_cfg["sliding_window"] is None
    dense = transformers.MistralForCausalLM.from_pretrained(mistral, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(_load_mixtral(rep.out)(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"experts\[1\].source_model: model_type 'llama', the base's is 'mistral'"):
        build_moe(parse_config(_cfg(mistral, [mistral, exps[0]])), tmp_path / "mixed", progress=False)
