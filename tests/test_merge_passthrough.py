"""passthrough with ``slices``/``layer_range`` (layer stacking) and ``scale``
with filters, against mergekit 0.1.5 in float32: the same output tensor names
(layers renumbered consecutively; embeddings from the first slice's model,
final norm and lm_head from the last slice's), bitwise the same values, and
config.json's num_hidden_layers set to the stacked count. A naive reference
rebuilds each output tensor from its source layer; malformed slices are
refused naming the key."""

import json

import pytest
import torch

from ferrox import synthetic
from ferrox.merge import ConfigError, parse_config
from methods_helpers import assert_bitwise, config, fx_merge, load_folder, run_mergekit

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    a = synthetic.make_llama(root / "a", hidden=32, layers=4, vocab=64, dtype=torch.float32)
    b = synthetic.fine_tune(a, root / "b", seed=7, scale=0.5)
    return str(a), str(b)


SCALE = [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0.5, 0.25]}, {"value": 1.0}]


def stack(a, b):
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": SCALE}}]},
        {"sources": [{"model": a, "layer_range": [2, 3]}], "parameters": {"scale": 2.0}},
    ]}


def naive(a, b):
    """Each output tensor from its source, written out: (model, source layer, scale rule)."""
    ta, tb = load_folder(a), load_folder(b)
    plan = [(ta, i, None) for i in range(3)] + [(tb, i, "b") for i in range(1, 4)] + [(ta, 2, "x2")]
    # Outside the layers: embeddings from the first slice, norm/lm_head from the last (its scale 2 too).
    out = {"model.embed_tokens.weight": ta["model.embed_tokens.weight"],
           "model.norm.weight": ta["model.norm.weight"] * 2.0, "lm_head.weight": ta["lm_head.weight"] * 2.0}
    for j, (src, i, rule) in enumerate(plan):
        for name, x in src.items():
            if not name.startswith(f"model.layers.{i}."):
                continue
            out_name = name.replace(f"model.layers.{i}.", f"model.layers.{j}.")
            if rule == "x2":
                x = x * 2.0
            elif rule == "b":
                t = (i - 1) / 2  # the slice's 3 layers: t = 0, 0.5, 1
                if "o_proj" in name:
                    x = x * 0.5
                elif "down_proj" in name:
                    x = x * (0.5 + t * (0.25 - 0.5))
            out[out_name] = x
    return out


def test_stacked_slices_with_filtered_scale_are_bitwise_mergekit(models, tmp_path):
    a, b = models
    raw = stack(a, b)
    fx = fx_merge(raw, tmp_path / "fx")
    mk = run_mergekit(raw, tmp_path / "mk")
    assert_bitwise(fx, mk)
    want = naive(a, b)
    assert set(fx) == set(want)
    for name, x in want.items():
        assert torch.equal(fx[name], x), name
    for folder in ("fx", "mk"):
        with open(tmp_path / folder / "config.json") as f:
            assert json.load(f)["num_hidden_layers"] == 7, folder
    assert not torch.equal(fx["model.layers.3.self_attn.o_proj.weight"], load_folder(b)["model.layers.1.self_attn.o_proj.weight"])


def test_post_layer_tensors_come_from_the_last_slice_and_models_syntax_scale(models, tmp_path):
    a, b = models
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [2, 4]}]}]}
    fx = fx_merge(raw, tmp_path / "fx")
    assert_bitwise(fx, run_mergekit(raw, tmp_path / "mk"))
    tb = load_folder(b)
    assert torch.equal(fx["lm_head.weight"], tb["lm_head.weight"])  # mergekit: post weights from the last slice
    assert torch.equal(fx["model.embed_tokens.weight"], load_folder(a)["model.embed_tokens.weight"])
    # models syntax: one model, scaled where a filter says so.
    raw = config("passthrough", None, [b], None, [{"scale": [{"filter": "mlp", "value": [1.0, 0.0]}]}])
    fx = fx_merge(raw, tmp_path / "fx2")
    assert_bitwise(fx, run_mergekit(raw, tmp_path / "mk2"))
    assert torch.equal(fx["model.layers.3.mlp.up_proj.weight"], torch.zeros_like(tb["model.layers.3.mlp.up_proj.weight"]))
    assert torch.equal(fx["model.layers.3.self_attn.q_proj.weight"], tb["model.layers.3.self_attn.q_proj.weight"])


def test_slerp_over_slices_matches_mergekit(models, tmp_path):
    """Slices drive any torch method: slerp of two models' layer ranges, t a
    gradient within each slice, the base a slice source."""
    a, b = models
    raw = {"merge_method": "slerp", "base_model": a, "parameters": {"t": [0.2, 0.9]}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [2, 4]}]},
        {"sources": [{"model": a, "layer_range": [3, 4]}, {"model": b, "layer_range": [0, 1]}],
         "parameters": {"t": 0.4}}]}
    assert_bitwise(fx_merge(raw, tmp_path / "fx"), run_mergekit(raw, tmp_path / "mk"))


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(slices=[]), "slices: expected a non-empty list"),
    (lambda c: c.update(models=[{"model": c["slices"][0]["sources"][0]["model"]}]), "exactly one of models and slices"),
    (lambda c: c["slices"][0].update(sources=[]), "slices[0].sources: expected a non-empty list"),
    (lambda c: c["slices"][0]["sources"][0].pop("layer_range"), "slices[0].sources[0]: expected a mapping with"),
    (lambda c: c["slices"][0]["sources"][0].update(layer_range=[2, 1]), "slices[0].sources[0].layer_range: expected 0 <= start < end"),
    (lambda c: c["slices"][0]["sources"][0].update(layer_range=[0, 9]), "ends past the model's 4 layers"),
    (lambda c: c["slices"][0]["sources"][0].update(layer_range=[0, 1.5]), "expected [start, end] (two integers"),
    (lambda c: c["slices"][0]["sources"][0].update(layers=[0, 1]), "slices[0].sources[0]: unknown key 'layers'"),
    (lambda c: c["slices"][0].update(residual_weight=0.5), "slices[0]: key 'residual_weight' is not supported"),
    (lambda c: c["slices"][0]["sources"].append(dict(c["slices"][1]["sources"][0], layer_range=[0, 3])),
     "slices[0]: merge_method 'passthrough' merges exactly 1 inputs (one model per slice), got 2"),
    (lambda c: c["slices"][1]["sources"][0]["parameters"].update(scale=[]), "scale: an empty gradient list"),
    (lambda c: c["slices"][1]["sources"][0]["parameters"].update(scale=[{"filter": "mlp"}]), "needs a 'value'"),
    (lambda c: c.update(merge_method="ties"), "'slices' is not supported by ferrox yet for ties"),
])
def test_malformed_slices_are_refused_naming_the_key(models, edit, needle):
    a, b = models
    raw = stack(a, b)
    edit(raw)
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert needle in str(e.value)


def test_slices_of_different_lengths_are_refused(models):
    a, b = models
    raw = {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 3]}]}]}
    with pytest.raises(ConfigError, match=r"slices\[0\]: every source of a slice must span the same number"):
        parse_config(raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stacking_with_scale_is_bitwise_mergekit(tmp_path, dtype):
    """mergekit multiplies half tensors by the scale in their dtype (one
    product, rounded once); ferrox multiplies in f32 and rounds to the dtype
    once, which for a single product gives the same bits."""
    a = str(synthetic.make_llama(tmp_path / "a", hidden=32, layers=3, vocab=64, dtype=dtype))
    b = str(synthetic.fine_tune(a, tmp_path / "b", seed=3))
    raw = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}], "parameters": {"scale": [0.3, 0.7]}},
        {"sources": [{"model": b, "layer_range": [1, 3]}],
         "parameters": {"scale": [{"filter": "o_proj", "value": 0.37}, {"value": 1.1}]}}]}
    fx = fx_merge(raw, tmp_path / "fx")
    assert all(v.dtype == dtype for v in fx.values())
    assert_bitwise(fx, run_mergekit(raw, tmp_path / "mk"))


def test_cli_merges_a_sliced_config(models, tmp_path, capsys):
    import yaml

    from ferrox.cli import main

    a, b = models
    raw = stack(a, b)
    path = tmp_path / "stack.yml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "with passthrough" in "".join(capsys.readouterr())
    assert_bitwise(load_folder(tmp_path / "out"), fx_merge(raw, tmp_path / "api"))
    resolved = yaml.safe_load((tmp_path / "out" / "ferrox_config.yml").read_text())
    assert [s["sources"][0]["layer_range"] for s in resolved["slices"]] == [[0, 3], [1, 4], [2, 3]]
    assert resolved["slices"][1]["sources"][0]["parameters"]["scale"] == SCALE
    # The resolved config is itself a config that merges to the same bits.
    again = dict(resolved, slices=[dict(s, sources=[{k: v for k, v in src.items() if k != "parameters" or v}
                                                    for src in s["sources"]]) for s in resolved["slices"]])
    again = {k: v for k, v in again.items() if v is not None}
    for s in again["slices"]:
        if not s["parameters"]:
            s.pop("parameters")
    assert_bitwise(fx_merge(again, tmp_path / "again"), load_folder(tmp_path / "out"))
