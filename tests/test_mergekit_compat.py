"""Regression tests for the five mergekit-compatibility bugs of issue 13,
each run against mergekit 0.1.5 on the same tiny Llama-layout checkpoints
(float32, so both tools do their arithmetic in the same precision).

mergekit runs in this process (``run_merge``, what ``mergekit-yaml`` calls)
so that its import is paid once per module, not once per test.
"""

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import mergekit_parity
from ferrox import synthetic
from ferrox.checkpoint import read_checkpoint
from ferrox.merge import ConfigError, load_config, merge_checkpoints, parse_config

pytest.importorskip("mergekit")  # a test dependency; pinned to 0.1.5 in the venv


def run_mergekit(raw: dict, out, **options):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False,
                                              write_model_card=False, **options), config_source=yaml.safe_dump(raw))


def load_folder(folder):
    out = {}
    for f in read_checkpoint(folder).files:
        out.update(load_file(f))
    return out


def unfused_linear(tensors, weights, normalize):
    """linear as a naive float32 loop, each w*x rounded before the add."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for x, w in zip(tensors, weights):
        acc = acc + x.float() * torch.tensor(w, dtype=torch.float32)
    if normalize:
        total = torch.zeros((), dtype=torch.float32)
        for w in weights:
            total = total + torch.tensor(w, dtype=torch.float32)
        acc = acc / total
    return acc


def assert_bitwise(fx, mk):
    assert set(fx) == set(mk)
    for name in fx:
        assert fx[name].dtype == mk[name].dtype, name
        assert torch.equal(fx[name], mk[name]), f"{name}: max |diff| {float((fx[name] - mk[name]).abs().max())}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base = synthetic.make_llama(root / "base", hidden=32, layers=1, vocab=64, dtype=torch.float32)
    fts = [synthetic.fine_tune(base, root / f"ft{i}", seed=i + 1) for i in range(2)]
    return root, base, fts


def fx_merge(raw, out, **kw):
    return merge_checkpoints(parse_config(raw), out, progress=False, **kw)


# --- bug 1 ------------------------------------------------------------------

def test_linear_with_listed_base_is_a_plain_weighted_sum(models, tmp_path):
    """linear + base_model listed among the models + normalize: false:
    mergekit sums base + ft0 + ft1 (each weighted); ferrox used to take the
    fine-tunes' deltas from the base (ft0 + ft1 - base).

    Not bitwise: mergekit's ``addcmul_`` is a fused multiply-add on CPU (one
    rounding per term), ferrox rounds w*x and then adds (two), so they meet
    the shared dense rule (4 ulp of the largest magnitude; measured: up to 3),
    and ferrox equals the unfused float32 loop bit for bit."""
    root, base, fts = models
    raw = {"merge_method": "linear", "base_model": str(base), "parameters": {"normalize": False},
           "models": [{"model": str(base), "parameters": {"weight": 0.7}},
                      {"model": str(fts[0]), "parameters": {"weight": 0.3}},
                      {"model": str(fts[1]), "parameters": {"weight": 1.1}}]}
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    fx, mk = load_folder(tmp_path / "fx"), load_folder(tmp_path / "mk")
    b, f0, f1 = load_folder(base), load_folder(fts[0]), load_folder(fts[1])
    assert set(fx) == set(mk)
    for name in fx:
        ins = [b[name], f0[name], f1[name]]
        assert torch.equal(fx[name], unfused_linear(ins, [0.7, 0.3, 1.1], False)), name
        mergekit_parity.check_dense(name, fx[name], mk[name], None, ins)
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = f0[name] * 0.3 + f1[name] * 1.1 - b[name]  # the old result, far from the merge
    assert float((fx[name] - wrong).abs().max()) > 0.1


def test_linear_adds_an_unlisted_base_last_as_mergekit_does(models, tmp_path):
    """mergekit appends an unlisted base_model to linear's inputs (last, with
    the global parameters); without a global weight it is refused by both."""
    root, base, fts = models
    raw = {"merge_method": "linear", "base_model": str(base),
           "parameters": {"normalize": True, "weight": 0.5},
           "models": [{"model": str(fts[0]), "parameters": {"weight": 0.3}},
                      {"model": str(fts[1]), "parameters": {"weight": 1.1}}]}
    cfg = parse_config(raw)
    assert [m.path for m in cfg.models] == [str(fts[0]), str(fts[1]), str(base)] and cfg.merge_base is None
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    fx, mk = load_folder(tmp_path / "fx"), load_folder(tmp_path / "mk")
    b, f0, f1 = load_folder(base), load_folder(fts[0]), load_folder(fts[1])
    assert set(fx) == set(mk)
    for name in fx:  # fused vs unfused multiply-add, as above
        ins = [f0[name], f1[name], b[name]]
        assert torch.equal(fx[name], unfused_linear(ins, [0.3, 1.1, 0.5], True)), name
        mergekit_parity.check_dense(name, fx[name], mk[name], None, ins)
    del raw["parameters"]["weight"]
    with pytest.raises(ConfigError, match="base_model: linear merges its base_model as one more input"):
        parse_config(raw)
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        run_mergekit(raw, tmp_path / "mk2")


# --- bug 2 ------------------------------------------------------------------

def test_relative_paths_resolve_from_the_current_directory(models, tmp_path, monkeypatch):
    """A config in another folder names models relative to the current
    directory (mergekit's rule). The config's own folder holds different
    models under the same names, and ``lnk/../base`` crosses a symlink, so
    the OS (and mergekit) open ``deep/base`` where a lexical
    normalisation would open ``./base``."""
    root, base, fts = models
    work, conf = tmp_path / "work", tmp_path / "conf"
    (work / "deep" / "sub").mkdir(parents=True)
    (conf / "deep" / "sub").mkdir(parents=True)
    os.symlink(work / "deep" / "sub", work / "lnk")
    os.symlink(conf / "deep" / "sub", conf / "lnk")
    os.symlink(base, work / "deep" / "base")  # what the OS opens from work/
    os.symlink(fts[1], work / "base")  # what a lexical "lnk/../base" would name
    os.symlink(fts[0], work / "ft")
    for decoy in (conf / "deep" / "base", conf / "base", conf / "ft"):
        os.symlink(fts[1], decoy)
    raw = {"merge_method": "task_arithmetic", "base_model": "lnk/../base",
           "models": [{"model": "ft", "parameters": {"weight": 0.6}}]}
    (conf / "m.yml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(work)
    cfg = load_config(conf / "m.yml")
    assert os.path.samefile(cfg.base, base) and os.path.samefile(cfg.models[0].path, fts[0])
    merge_checkpoints(cfg, tmp_path / "fx", progress=False)
    run_mergekit(raw, tmp_path / "mk")
    fx, mk = load_folder(tmp_path / "fx"), load_folder(tmp_path / "mk")
    assert_bitwise(fx, mk)  # base + 0.6 * (ft - base): the same f32 steps in both
    decoy = load_folder(fts[1])
    assert not any(torch.equal(fx[n], decoy[n]) for n in fx)


# --- bug 3 ------------------------------------------------------------------

def test_duplicate_inputs_and_zero_weight_sums_are_refused(models, tmp_path, capsys, monkeypatch):
    root, base, fts = models
    dup = {"merge_method": "linear", "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}},
                                                 {"model": str(fts[0]), "parameters": {"weight": 2.0}}]}
    with pytest.raises(ValueError, match="Duplicate merge inputs"):
        run_mergekit(dup, tmp_path / "mk-dup")
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: .* is the same model as models\[0\]"):
        parse_config(dup)
    # also when the base of a task-vector method is listed twice, and through a symlink
    os.symlink(fts[0], tmp_path / "alias")
    for raw in ({"merge_method": "task_arithmetic", "base_model": str(base),
                 "models": [{"model": str(base)}, {"model": str(fts[0]), "parameters": {"weight": 1.0}},
                            {"model": str(base)}]},
                {"merge_method": "linear", "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}},
                                                      {"model": str(tmp_path / "alias"), "parameters": {"weight": 1.0}}]}):
        with pytest.raises(ConfigError, match="same model as models"):
            parse_config(raw)
    # Weights that cancel: mergekit divides by zero and writes inf/NaN; ferrox refuses.
    zero = {"merge_method": "linear", "parameters": {"normalize": True},
            "models": [{"model": str(fts[0]), "parameters": {"weight": 0.5}},
                       {"model": str(fts[1]), "parameters": {"weight": -0.5}}]}
    run_mergekit(zero, tmp_path / "mk-zero")
    assert not all(torch.isfinite(t).all() for t in load_folder(tmp_path / "mk-zero").values())
    with pytest.raises(ConfigError, match=r"normalize: true divides by the sum of the weights.*sum to 0"):
        parse_config(zero)
    assert parse_config({**zero, "parameters": {"normalize": False}}).normalize is False
    # the CLI: exit 1 with one line naming the problem
    from ferrox.cli import main

    (tmp_path / "z.yml").write_text(yaml.safe_dump(zero))
    (tmp_path / "d.yml").write_text(yaml.safe_dump(dup))
    for cfg_file, what in (("z.yml", "sum of the weights"), ("d.yml", "same model as models[0]")):
        assert main(["merge", str(tmp_path / cfg_file), str(tmp_path / "out"), "--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err, err
    assert not (tmp_path / "out").exists()


# --- bug 4 ------------------------------------------------------------------

def test_out_shard_size_counts_bytes_like_mergekit(models, tmp_path):
    """Same tensors, same --out-shard-size: the same shards as mergekit
    (file names and which tensors each holds), sized in bytes."""
    from mergekit.common import parse_kmb

    from ferrox.cli.merge import shard_size

    for text in ("5B", "5b", "500M", "20K", "20k", "123", "0", "1000000"):
        assert shard_size(text) == parse_kmb(text), text
    for bad in ("1.5B", "-5", "5G", "", "K", "1e9"):
        with pytest.raises(Exception):
            parse_kmb(bad)
        with pytest.raises(Exception):
            shard_size(bad)
    root, base, fts = models
    raw = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts]}
    from ferrox.cli import main

    (tmp_path / "m.yml").write_text(yaml.safe_dump(raw))
    assert main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "fx"), "--out-shard-size", "20K", "--no-progress"]) == 0
    limit = parse_kmb("20K")
    run_mergekit(raw, tmp_path / "mk", out_shard_size=limit)

    def layout(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = {}
        for name, fname in index["weight_map"].items():
            shards.setdefault(fname, set()).add(name)
        return shards

    fx, mk = layout(tmp_path / "fx"), layout(tmp_path / "mk")
    assert len(fx) > 2 and fx == mk
    for fname, names in fx.items():
        sizes = [t.numel() * t.element_size() for t in load_file(tmp_path / "fx" / fname).values()]
        assert sum(sizes) <= limit or len(sizes) == 1, fname
    # 0: one shard, as mergekit's "no limit"
    fx_merge(raw, tmp_path / "one", max_shard_bytes=0)
    assert [p for p in os.listdir(tmp_path / "one") if p.endswith(".safetensors")] == ["model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_bytes"):
        fx_merge(raw, tmp_path / "neg", max_shard_bytes=-1)


# --- bug 5 ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
def test_config_json_dtype_follows_the_output_dtype(models, tmp_path, key):
    """config.json's dtype field names the output's dtype (mergekit sets
    ``torch_dtype`` from out_dtype, else dtype); every other value is the
    donor's. Tensors bitwise mergekit's: both merge then round to bf16."""
    root, base, fts = models
    raw = {"merge_method": "linear", key: "bfloat16",
           "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]}
    if key == "out_dtype":
        raw["dtype"] = "float32"
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    fx_cfg = json.loads((tmp_path / "fx" / "config.json").read_text())
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    donor = json.loads((fts[0] / "config.json").read_text())
    assert donor["torch_dtype"] == "float32"
    mk_dtype = mk_cfg.get("torch_dtype", mk_cfg.get("dtype"))
    assert fx_cfg["torch_dtype"] == mk_dtype == "bfloat16"
    assert {k: v for k, v in fx_cfg.items() if k != "torch_dtype"} == {k: v for k, v in donor.items() if k != "torch_dtype"}
    assert list(fx_cfg) == list(donor)  # key order kept
    fx, mk = load_folder(tmp_path / "fx"), load_folder(tmp_path / "mk")
    # weights 1: both sum exactly in f32 (from bf16 inputs with dtype: bfloat16) and round once to bf16
    assert_bitwise(fx, mk)
    assert all(t.dtype == torch.bfloat16 for t in fx.values())


def test_mixed_input_dtypes_are_cast_like_mergekit(models, tmp_path):
    """An f32 base with bf16 fine-tunes: mergekit computes in the promoted
    dtype (f32) when ``dtype`` is unset and writes the base's dtype; ferrox
    used to refuse the mix. int8_mask is accepted (no numerical effect)."""
    root, base, fts = models
    bf = []
    for i, f in enumerate(fts):
        dst = tmp_path / f"bf{i}"
        dst.mkdir()
        save_file({k: v.bfloat16() for k, v in load_file(f / "model.safetensors").items()}, dst / "model.safetensors")
        (dst / "config.json").write_text((f / "config.json").read_text())
        bf.append(dst)
    raw = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"int8_mask": True},
           "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(bf, (0.6, 0.4))]}
    assert parse_config(raw).int8_mask is True
    fx_merge(raw, tmp_path / "fx")
    run_mergekit(raw, tmp_path / "mk")
    fx, mk = load_folder(tmp_path / "fx"), load_folder(tmp_path / "mk")
    # bitwise: both widen the bf16 inputs to f32 exactly, then take the same unfused f32 steps
    assert_bitwise(fx, mk)
    assert all(t.dtype == torch.float32 for t in fx.values())
    # with dtype: bfloat16 every input is rounded to bf16 first (mergekit casts on load)
    raw16 = {**raw, "dtype": "bfloat16"}
    fx_merge(raw16, tmp_path / "fx16")
    run_mergekit(raw16, tmp_path / "mk16")
    fx16, mk16 = load_folder(tmp_path / "fx16"), load_folder(tmp_path / "mk16")
    b, ms = load_folder(base), [load_folder(f) for f in bf]
    assert set(fx16) == set(mk16)
    for name in fx16:  # mergekit rounds every step to bf16, ferrox once from f32: the shared 4-ulp rule
        assert fx16[name].dtype == mk16[name].dtype == torch.bfloat16, name
        mergekit_parity.check_dense(name, fx16[name], mk16[name], b[name].bfloat16(), [m[name] for m in ms])
    # the config.json is the base's, untouched: no dtype was asked for
    assert (tmp_path / "fx" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="int8_mask must be true or false"):
        parse_config({**raw, "parameters": {"int8_mask": "yes"}})
