"""Merging 3 bf16 fine-tunes of a Llama-layout model: ferrox vs mergekit.

Both run in-process (so each side's peak RSS is its own, measured in a child
process by the harness). `granularity: tensor` for ferrox, mergekit's
semantics. Inputs are built once under benches/.cache (seeded), outputs go to
a scratch folder that is replaced on every run. The I/O bound is the time to
read every input file and write a file of the output's size (warm cache, no
fsync). ferrox fsyncs its output before renaming it into place; the
ferrox_nofsync side (`--no-fsync`) measures it without that wait, as mergekit
writes.
"""

import os
import shutil
import time

import yaml

NAME = "merge"
# breadcrumbs_row: ferrox with `granularity: row` (the paper's per-row band);
# mergekit has no row mode, so its side is the per-tensor merge, for scale.
CASES = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_row"]
MAIN_COMPARATOR = "mergekit"
# Minutes per mergekit run at full size: one timed run after a warm-up that
# also warms the page cache for both sides.
REPEATS = 1
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")

# ~370M parameters (hidden 1024, 24 layers, vocab 32000); --quick: ~10M.
FULL = dict(hidden=1024, layers=24, intermediate=2816, vocab=32000)
QUICK = dict(hidden=256, layers=4, intermediate=704, vocab=8000)


def _models(quick):
    from ferrox import synthetic

    root = os.path.join(CACHE, "quick" if quick else "full")
    base = os.path.join(root, "base")
    if not os.path.exists(os.path.join(root, "done")):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.make_llama(base, **(QUICK if quick else FULL), max_shard_bytes=1 << 30)
        for i in range(3):
            synthetic.fine_tune(base, os.path.join(root, f"ft{i}"), seed=i + 1, max_shard_bytes=1 << 30)
        open(os.path.join(root, "done"), "w").close()
    return root, base, [os.path.join(root, f"ft{i}") for i in range(3)]


def setup(case, quick):
    root, base, fts = _models(quick)
    method = case.removesuffix("_row")
    params = {"task_arithmetic": {}, "ties": {"density": 0.3}, "breadcrumbs": {"density": 0.3, "gamma": 0.01}}[method]
    cfg = {
        "merge_method": method, "base_model": base, "dtype": "bfloat16",
        "models": [{"model": f, "parameters": {"weight": w, **params}} for f, w in zip(fts, (0.5, 0.3, 0.2))],
    }
    granularity = "row" if case.endswith("_row") else "tensor"
    return {"config": cfg, "granularity": granularity, "root": root, "out": os.path.join(root, f"out-{os.getpid()}")}


def _fresh(path):
    shutil.rmtree(path, ignore_errors=True)
    return path


def run_ferrox(d):
    from ferrox.merge import merge_checkpoints, parse_config

    cfg = d["config"]
    cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "granularity": d["granularity"]}}
    merge_checkpoints(parse_config(cfg), _fresh(d["out"] + "-fx"), progress=False)


def run_ferrox_nofsync(d):
    """`--no-fsync`: like mergekit and the I/O bound, no wait for the disk."""
    from ferrox.merge import merge_checkpoints, parse_config

    cfg = d["config"]
    cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "granularity": d["granularity"]}}
    merge_checkpoints(parse_config(cfg), _fresh(d["out"] + "-nf"), progress=False, fsync=False)


def run_mergekit(d):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = MergeConfiguration.model_validate(d["config"])
    run_merge(cfg, _fresh(d["out"] + "-mk"), MergeOptions(allow_crimes=True, quiet=True))


def io_bound(d):
    """Read every input byte and write the output's size: the floor any
    merge of these files has to pay."""
    total_out, buf = 0, bytearray(64 << 20)
    for folder in [d["config"]["base_model"]] + [m["model"] for m in d["config"]["models"]]:
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                with open(os.path.join(folder, name), "rb") as f:
                    while f.readinto(buf):
                        pass
                if folder == d["config"]["base_model"]:
                    total_out += os.path.getsize(os.path.join(folder, name))
    path = d["out"] + "-io"
    chunk = bytes(64 << 20)
    with open(path, "wb") as f:
        left = total_out
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
    os.remove(path)


def run_ferrox_cuda(d):
    """ferrox's CUDA kernels (--device cuda), same granularity as ferrox."""
    from ferrox.merge import merge_checkpoints, parse_config

    cfg = d["config"]
    cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "granularity": d["granularity"]}}
    merge_checkpoints(parse_config(cfg), _fresh(d["out"] + "-cu"), progress=False, device="cuda")


SIDES = {"ferrox": run_ferrox, "ferrox_nofsync": run_ferrox_nofsync, "mergekit": run_mergekit, "io_bound": io_bound}


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if _has_cuda():
    SIDES["ferrox_cuda"] = run_ferrox_cuda
