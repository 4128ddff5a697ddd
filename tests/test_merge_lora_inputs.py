"""``model+lora`` merge inputs (mergekit's syntax): a PEFT LoRA adapter
applied to the model tensor by tensor while the merge streams, compared
with mergekit 0.1.5 (which merges the adapter with PEFT first) and with a
naive W + (alpha/r)·B·A computed here from the adapter's files."""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ferrox import synthetic
from ferrox.checkpoint import read_checkpoint
from ferrox.extract.lora import extract_lora
from ferrox.merge import ConfigError, merge_checkpoints, parse_config
from ferrox.merge.checkpoints import MergeError

pytest.importorskip("mergekit")
pytest.importorskip("peft")


def build(root, dtype):
    base = str(synthetic.make_llama(root / "base", hidden=32, layers=2, vocab=64, dtype=dtype))
    ft = str(synthetic.fine_tune(base, root / "ft", seed=3, scale=0.3))
    other = str(synthetic.fine_tune(base, root / "other", seed=4))
    # an adapter on the projections and the embedding (PEFT's lora_embedding_A/B), lm_head saved whole
    extract_lora(base, ft, 4, str(root / "ad"), select=["*proj*", "*embed_tokens*"], modules_to_save=["lm_head"],
                 progress=False)
    return base, other, str(root / "ad")


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lora32"), torch.float32)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return build(tmp_path_factory.mktemp("lora16"), torch.bfloat16)


def run_mergekit(raw, out, cache):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False, write_model_card=False,
                                   lora_merge_cache=str(cache)), config_source=yaml.safe_dump(raw))


def load_folder(folder):
    out = {}
    for f in read_checkpoint(str(folder)).files:
        out.update(load_file(f))
    return out


def assert_bitwise(fx, mk):
    a, b = load_folder(fx), load_folder(mk)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name}: max |diff| {float((a[name].float() - b[name].float()).abs().max())}"


def naive_applied(model, adapter):
    """W + (alpha/r)·B·A per adapted module in f64, rounded once to W's dtype;
    PEFT's embedding layout (``lora_embedding_A`` [r, vocab]) transposed.
    Also returns, per adapted tensor, |W| + (alpha/r)·|B|·|A| (the scale of
    the f32 rounding errors)."""
    w = load_folder(model)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    scale = cfg["lora_alpha"] / cfg["r"]
    ad = {k.removeprefix("base_model.model."): v for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()}
    out, mags = dict(w), {}
    for k, a in ad.items():
        for kind, emb in (("lora_A", False), ("lora_embedding_A", True)):
            suffix = f".{kind}.weight" if not emb else f".{kind}"
            if k.endswith(suffix):
                module = k[: -len(suffix)]
                b = ad[module + suffix.replace("_A", "_B")]
                upd = b.double() @ a.double()
                name = module + ".weight"
                out[name] = (w[name].double() + scale * (upd.T if emb else upd)).to(w[name].dtype)
                mag = b.double().abs() @ a.double().abs()
                mags[name] = w[name].double().abs() + scale * (mag.T if emb else mag)
    for k, v in ad.items():
        if "lora_" not in k:
            out[k] = v.to(w[k].dtype)
    return out, ad, mags


def assert_close_to(x, want, mag, name):
    """|x - want| <= 4·eps_f32·(|W| + s·|B|·|A|): the f32 matmul's (rank 4) and
    the add's roundings."""
    bound = 4 * torch.finfo(torch.float32).eps * mag
    assert bool(((x.double() - want.double()).abs() <= bound).all()), name


def test_applied_adapter_is_w_plus_scaled_ba(f32, tmp_path):
    """passthrough of one model+lora: every adapted tensor within the f32
    rounding bound of the f64 reference, the others bit for bit; lm_head
    from modules_to_save."""
    base, other, ad = f32
    raw = {"merge_method": "passthrough", "models": [{"model": f"{other}+{ad}"}]}
    merge_checkpoints(parse_config(raw), str(tmp_path / "fx"), progress=False)
    fx = load_folder(tmp_path / "fx")
    want, adapter, mags = naive_applied(other, ad)
    orig = load_folder(other)
    assert any(k.endswith("lora_embedding_A") for k in adapter)
    changed = 0
    for name, x in fx.items():
        if name in mags:
            assert_close_to(x, want[name], mags[name], name)
        else:
            assert torch.equal(x, want[name]), name
        changed += not torch.equal(x, orig[name])
    assert changed == 2 * 7 + 2  # every projection, the embedding and lm_head
    assert torch.equal(fx["lm_head.weight"], adapter["lm_head.weight"])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_linear_with_a_lora_input_bitwise_mergekit(request, tmp_path, dtype):
    base, other, ad = request.getfixturevalue(dtype)
    raw = {"merge_method": "linear", "models": [{"model": f"{other}+{ad}", "parameters": {"weight": 0.5}},
                                                {"model": base, "parameters": {"weight": 0.5}}],
           "dtype": "float32" if dtype == "f32" else "bfloat16"}
    merge_checkpoints(parse_config(raw), str(tmp_path / "fx"), progress=False)
    run_mergekit(raw, tmp_path / "mk", tmp_path / "cache")
    assert_bitwise(tmp_path / "fx", tmp_path / "mk")


def test_lora_base_model_and_relative_paths_bitwise_mergekit(f32, tmp_path, monkeypatch):
    """base_model: model+lora under a GTA method (streamed by the core where
    the adapter changes nothing, merged in memory where it does); relative
    paths resolved from the current directory, as mergekit."""
    base, other, ad = f32
    monkeypatch.chdir(os.path.dirname(base))
    raw = {"merge_method": "task_arithmetic", "base_model": "base+ad",
           "models": [{"model": "other", "parameters": {"weight": 0.7}}, {"model": "base", "parameters": {"weight": 0.4}}],
           "dtype": "float32"}
    cfg = parse_config(raw)
    assert cfg.base_lora == os.path.realpath(ad) and [m.lora for m in cfg.models] == [None, None]
    merge_checkpoints(cfg, str(tmp_path / "fx"), progress=False)
    run_mergekit(raw, tmp_path / "mk", tmp_path / "cache")
    assert_bitwise(tmp_path / "fx", tmp_path / "mk")


def test_lora_slice_source(f32, tmp_path):
    """A slices source with a LoRA: the stacked layers are the adapted model's."""
    base, other, ad = f32
    raw = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": f"{other}+{ad}", "layer_range": [1, 2]}]},
                      {"sources": [{"model": base, "layer_range": [0, 1]}]}]}
    merge_checkpoints(parse_config(raw), str(tmp_path / "fx"), progress=False)
    run_mergekit(raw, tmp_path / "mk", tmp_path / "cache")
    assert_bitwise(tmp_path / "fx", tmp_path / "mk")
    fx = load_folder(tmp_path / "fx")
    want, _, mags = naive_applied(other, ad)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert_close_to(fx["model.layers.0.self_attn.q_proj.weight"], want[name], mags[name], name)


def test_the_same_model_with_and_without_an_adapter_are_two_inputs(f32, tmp_path):
    base, other, ad = f32
    raw = {"merge_method": "linear", "models": [{"model": other, "parameters": {"weight": 1.0}},
                                                {"model": f"{other}+{ad}", "parameters": {"weight": 1.0}}]}
    assert len(parse_config(raw).models) == 2
    raw["models"][0]["model"] = f"{other}+{ad}"
    with pytest.raises(ConfigError, match="same model as models\\[0\\]"):
        parse_config(raw)


@pytest.mark.parametrize("ref,needle", [
    ("{other}+{root}/nonesuch", "no such LoRA adapter folder"),
    ("{other}+{root}/base", "has no adapter_config.json"),
    ("{other}+{ad}+{ad}", "neither a path nor MODEL\\+LORA"),
    ("{root}/nonesuch+{ad}", "no such model file or folder"),
])
def test_bad_lora_references_are_refused(f32, ref, needle):
    base, other, ad = f32
    root = os.path.dirname(base)
    raw = {"merge_method": "linear",
           "models": [{"model": ref.format(other=other, ad=ad, root=root), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=needle):
        parse_config(raw)


def test_an_adapter_of_another_shape_is_refused_before_writing(f32, tmp_path):
    base, other, ad = f32
    small = str(synthetic.make_llama(tmp_path / "small", hidden=16, layers=2, vocab=64, dtype=torch.float32))
    raw = {"merge_method": "linear", "models": [{"model": f"{small}+{ad}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeError, match=r"lora_embedding_A' gives a 32x64 update to 'model.embed_tokens.weight' of shape \[64, 16\]"):
        merge_checkpoints(parse_config(raw), str(tmp_path / "o"), progress=False)
    assert not os.path.exists(tmp_path / "o")


def test_an_adapter_with_a_non_finite_factor_is_caught(f32, tmp_path):
    base, other, ad = f32
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(ad, "adapter_config.json")) as f:
        (bad / "adapter_config.json").write_text(f.read())
    t = load_file(os.path.join(ad, "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, str(bad / "adapter_model.safetensors"))
    raw = {"merge_method": "linear", "models": [{"model": f"{other}+{bad}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(MergeError, match="non-finite"):
        merge_checkpoints(parse_config(raw), str(tmp_path / "o"), progress=False)


def test_gradient_over_layers_with_a_lora_input_bitwise_mergekit(f32, tmp_path):
    """slerp with t a gradient over the layers (the layer count read from the
    model folder of the model+lora input); the resolved config written beside
    the weights parses back to the same inputs."""
    base, other, ad = f32
    raw = {"merge_method": "slerp", "base_model": f"{other}+{ad}", "parameters": {"t": [0.1, 0.9]},
           "models": [{"model": f"{other}+{ad}"}, {"model": base}], "dtype": "float32"}
    merge_checkpoints(parse_config(raw), str(tmp_path / "fx"), progress=False)
    run_mergekit(raw, tmp_path / "mk", tmp_path / "cache")
    assert_bitwise(tmp_path / "fx", tmp_path / "mk")
    with open(tmp_path / "fx" / "ferrox_config.yml") as f:
        again = parse_config(yaml.safe_load(f))
    assert [(m.path, m.lora) for m in again.models] == [(other, ad), (base, None)]
    assert (again.base, again.base_lora) == (other, ad)
