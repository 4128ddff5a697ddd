"""LoRA extraction: ``ferrox extract lora`` against ``mergekit-extract-lora``
on the same base/fine-tune pair.

Inputs: a bf16 Llama-layout base (hidden 1024, 4 layers, intermediate 2816,
vocab 8000: 66M parameters; ``--quick`` hidden 256, 2 layers, vocab 2000)
and a fine-tune whose every matrix moved by a planted rank-48 delta with
decaying singular values plus Gaussian noise (norms and embeddings get
noise), rank 32.

- sides: ``ferrox`` (in-process, ``svd="auto"``: randomized for these
  matrices), ``ferrox_exact`` (``svd="exact"``: the full SVD mergekit runs,
  the same work);
- whole process: ``ferrox extract lora`` (the console script) against
  ``mergekit-extract-lora``; both save the embeddings, norms and lm_head whole
  (mergekit's default: ``--save-module`` for ferrox);
- agreement: every side's factored matrices reach the Eckart–Young optimum
  of their task vector within 1% (float64 singular values of Δ), the tensors
  saved whole are bitwise the fine-tune's, and the sides target the same
  modules.
"""

import json
import os
import shutil
import sys

import torch

NAME = "extract_lora"
MAIN_COMPARATOR = "mergekit-extract-lora"
CASES = ["rank32"]
RANK = 32
REPEATS = 3
SLOW_SIDES = {"mergekit-extract-lora"}
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
CACHE = os.path.join(HERE, ".cache", "extract_lora")
FULL = dict(hidden=1024, layers=4, intermediate=2816, vocab=8000)
QUICK = dict(hidden=256, layers=2, intermediate=704, vocab=2000)
SAVES = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]
MK_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
COMMANDS_NOTE = ("`ferrox extract lora --base B --finetuned F --rank 32 --save-module ... OUT --no-progress` "
                 "(randomized SVD; fsyncs its output) vs `mergekit-extract-lora --max-rank 32 --quiet` (full SVD "
                 "of every matrix, no fsync): not the same algorithm; the in-process `ferrox_exact` side runs the "
                 "full SVD")


def _fine_tune(base, folder, seed):
    from safetensors.torch import load_file

    from ferrox import synthetic

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in load_file(os.path.join(base, "model.safetensors")).items():
        x = w.float()
        if x.dim() == 2 and "embed" not in name and "lm_head" not in name:
            m, n, k = *x.shape, 48
            u = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
            v = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
            s = torch.logspace(0, -1.5, k) * 0.05 * float(x.norm())
            x = x + (u * s) @ v.T + 2e-4 * torch.randn(x.shape, generator=g)
        else:
            x = x + 1e-3 * torch.randn(x.shape, generator=g)
        tensors[name] = x.to(w.dtype)
    synthetic.write_model(folder, tensors)
    shutil.copy2(os.path.join(base, "config.json"), os.path.join(folder, "config.json"))


def setup(case, quick):
    from ferrox import synthetic

    root = os.path.join(CACHE, "quick" if quick else "full")
    base, ft = os.path.join(root, "base"), os.path.join(root, "ft")
    if not os.path.exists(os.path.join(root, "done")):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.make_llama(base, **(QUICK if quick else FULL), dtype=torch.bfloat16)
        _fine_tune(base, ft, seed=1)
        open(os.path.join(root, "done"), "w").close()
    scratch = os.path.join(root, f"run-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    return {"base": base, "ft": ft, "scratch": scratch}


def _out(d, side):
    return os.path.join(d["scratch"], "out-" + side.replace(" ", "_"))


def before(side, d):
    shutil.rmtree(_out(d, side), ignore_errors=True)


def _ferrox(d, side, **kw):
    from ferrox.extract import extract_lora

    extract_lora(d["base"], d["ft"], RANK, _out(d, side), modules_to_save=SAVES, progress=False, **kw)
    return _out(d, side)


def run_ferrox(d):
    return _ferrox(d, "ferrox")


def run_ferrox_exact(d):
    return _ferrox(d, "ferrox_exact", svd="exact")


SIDES = {"ferrox": run_ferrox, "ferrox_exact": run_ferrox_exact}


def _cli(d):
    saves = [a for s in SAVES for a in ("--save-module", s)]
    return {"argv": [os.path.join(BIN, "ferrox"), "extract", "lora", "--base", d["base"], "--finetuned", d["ft"],
                     "--rank", str(RANK), *saves, _out(d, "ferrox extract lora"), "--no-progress"],
            "env": None, "result": _out(d, "ferrox extract lora")}


def _mergekit(d):
    return {"argv": [os.path.join(BIN, "mergekit-extract-lora"), "--model", d["ft"], "--base-model", d["base"],
                     "--out-path", _out(d, "mergekit-extract-lora"), "--max-rank", str(RANK), "--quiet"],
            "env": MK_ENV, "result": _out(d, "mergekit-extract-lora")}


COMMANDS = {"ferrox extract lora": _cli, "mergekit-extract-lora": _mergekit}


def check(results, case, d):
    from safetensors.torch import load_file

    base = load_file(os.path.join(d["base"], "model.safetensors"))
    ft = load_file(os.path.join(d["ft"], "model.safetensors"))
    optimum = {}
    for side, out in results.items():
        ad = load_file(os.path.join(out, "adapter_model.safetensors"))
        with open(os.path.join(out, "adapter_config.json")) as f:
            cfg = json.load(f)
        assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"], (side, cfg["target_modules"])
        factored = 0
        for key in ad:
            name = key.removeprefix("base_model.model.")
            if name.endswith(".lora_A.weight"):
                mod = name.removesuffix(".lora_A.weight")
                delta = ft[mod + ".weight"].double() - base[mod + ".weight"].double()
                if mod not in optimum:
                    s = torch.linalg.svdvals(delta)
                    optimum[mod] = float(s[RANK:].square().sum().sqrt())
                got = float((delta - ad[key.replace("lora_A", "lora_B")].double() @ ad[key].double()).norm())
                # bf16 factors: rounding adds a little to the optimum
                assert got <= 1.01 * optimum[mod], f"{side}: {mod}: error {got} vs optimum {optimum[mod]}"
                factored += 1
            elif ".lora_B." not in name:
                assert torch.equal(ad[key], ft[name]), f"{side}: {name} is not the fine-tune's"
        assert factored == 7 * sum(1 for k in base if k.endswith("q_proj.weight")), (side, factored)
