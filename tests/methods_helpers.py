"""Shared by the parity tests of the torch merge methods (slerp family,
karcher, nearswap, model_stock): tiny Llama-layout checkpoints, mergekit
0.1.5 run in this process (its import paid once per module) and ferrox's
merge of the same config."""

import os

import torch
import yaml
from safetensors.torch import load_file

from ferrox import synthetic
from ferrox.checkpoint import read_checkpoint
from ferrox.merge import merge_checkpoints, parse_config


def make_models(root, n_fine_tunes=3, dtype=torch.float32, hidden=32):
    base = synthetic.make_llama(root / "base", hidden=hidden, layers=1, vocab=64, dtype=dtype)
    fts = [synthetic.fine_tune(base, root / f"ft{i}", seed=i + 1) for i in range(n_fine_tunes)]
    return base, fts


def config(method, base, models, parameters=None, model_params=None, **top):
    """A merge config: ``models`` paths, ``model_params`` one dict per model (or None)."""
    model_params = model_params or [None] * len(models)
    raw = {"merge_method": method,
           "models": [{"model": str(m), **({"parameters": p} if p else {})} for m, p in zip(models, model_params)]}
    if base is not None:
        raw["base_model"] = str(base)
    if parameters:
        raw["parameters"] = parameters
    raw.update(top)
    return raw


def run_mergekit(raw: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False, write_model_card=False),
              config_source=yaml.safe_dump(raw))
    return load_folder(out)


def fx_merge(raw: dict, out, **kw):
    merge_checkpoints(parse_config(raw), str(out), progress=False, fsync=False, **kw)
    return load_folder(out)


def load_folder(folder):
    out = {}
    for f in read_checkpoint(str(folder)).files:
        out.update(load_file(f))
    return out


def assert_bitwise(fx, mk):
    assert set(fx) == set(mk)
    for name in fx:
        assert fx[name].dtype == mk[name].dtype, name
        bits = torch.int32 if fx[name].dtype == torch.float32 else torch.int16
        same = torch.equal(fx[name].view(bits), mk[name].view(bits)) if fx[name].is_floating_point() \
            else torch.equal(fx[name], mk[name])
        assert same, f"{name}: max |diff| {float((fx[name].float() - mk[name].float()).abs().max())}"


def load_inputs(paths):
    """Each input checkpoint's tensors, by name."""
    return [load_folder(p) for p in paths]
