"""Merging 3 bf16 fine-tunes of a Llama-layout model: ferrox vs mergekit.

In-process sides: each tool's Python API in this process (each side's peak RSS
is its own, measured in a child process by the harness). Whole-process sides:
the commands a user runs, `ferrox merge CFG OUT` (the console script) and
`mergekit-yaml CFG OUT`, each a fresh process, start-up included.
`granularity: tensor` for ferrox, mergekit's semantics, except in
breadcrumbs_row. Inputs are built once under benches/.cache (seeded); outputs
go to scratch folders that are deleted (untimed) before every run.

Before anything is timed, `check` holds every side to ferrox's output:
ferrox_nofsync and the ferrox CLI bitwise, mergekit within the tolerance of
the parity tests (tests/mergekit_parity.py), mergekit-yaml bitwise mergekit's
in-process output (or, failing that, within the same tolerance of ferrox's).

ferrox fsyncs its output before renaming it into place; the `*nofsync` sides
(`--no-fsync`) skip that wait, as mergekit (which never fsyncs) writes. The
I/O bound is the time to read every input file and write a file of the
output's size (warm cache, no fsync).
"""

import os
import shutil
import sys

import yaml

NAME = "merge"
CASES = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_row"]
MAIN_COMPARATOR = "mergekit"
# mergekit takes most of a minute per sparsified merge at full size; the
# harness still times at least 3 runs of it.
REPEATS = 3
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import mergekit_parity  # noqa: E402  (the parity tests' rule, shared)

# ~370M parameters (hidden 1024, 24 layers, vocab 32000); --quick: ~10M.
FULL = dict(hidden=1024, layers=24, intermediate=2816, vocab=32000)
QUICK = dict(hidden=256, layers=4, intermediate=704, vocab=8000)

# breadcrumbs_row: ferrox with `granularity: row` (the paper's per-row band).
# mergekit has no row mode, so its merge here would be the breadcrumbs case's
# per-tensor merge again: it is not rerun, and its row repeats that case's
# numbers with no speed-up.
FOR_SCALE = {"breadcrumbs_row": {"mergekit": "breadcrumbs", "mergekit-yaml": "breadcrumbs"}}
SCALE_NOTE = "no mergekit equivalent: mergekit ranks per tensor; its per-tensor time shown for scale"
COMMANDS_NOTE = ("`ferrox merge CFG OUT --no-progress` (the console script; fsyncs its output, `--no-fsync` does not) "
                 "vs `mergekit-yaml CFG OUT --allow-crimes --quiet` (mergekit's defaults: no fsync)")


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
    fx_cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "granularity": granularity}}
    scratch = os.path.join(root, f"run-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    paths = {"fx_yml": os.path.join(scratch, f"{case}-ferrox.yml"), "mk_yml": os.path.join(scratch, f"{case}-mergekit.yml")}
    with open(paths["fx_yml"], "w") as f:
        yaml.safe_dump(fx_cfg, f)
    with open(paths["mk_yml"], "w") as f:
        yaml.safe_dump(cfg, f)
    return {"case": case, "method": method, "config": cfg, "fx_config": fx_cfg, "scratch": scratch, **paths}


def _out(d, side):
    return os.path.join(d["scratch"], "out-" + side.replace(" ", "_"))


def before(side, d):
    shutil.rmtree(_out(d, side), ignore_errors=True)


def _merge_ferrox(d, side, **kw):
    from ferrox.merge import merge_checkpoints, parse_config

    merge_checkpoints(parse_config(d["fx_config"]), _out(d, side), progress=False, **kw)
    return _out(d, side)


def run_ferrox(d):
    return _merge_ferrox(d, "ferrox")


def run_ferrox_nofsync(d):
    """`--no-fsync`: like mergekit and the I/O bound, no wait for the disk."""
    return _merge_ferrox(d, "ferrox_nofsync", fsync=False)


def run_ferrox_cuda(d):
    """ferrox's CUDA kernels (--device cuda), same granularity as ferrox."""
    return _merge_ferrox(d, "ferrox_cuda", device="cuda")


MK_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_mergekit(d):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    os.environ.update(MK_ENV)
    cfg = MergeConfiguration.model_validate(d["config"])
    run_merge(cfg, _out(d, "mergekit"), MergeOptions(allow_crimes=True, quiet=True))
    return _out(d, "mergekit")


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
    path = _out(d, "io_bound")
    chunk = bytes(64 << 20)
    with open(path, "wb") as f:
        left = total_out
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
    os.remove(path)
    return None  # nothing to check


def _cli(side, *flags):
    def spec(d):
        return {"argv": [os.path.join(BIN, "ferrox"), "merge", d["fx_yml"], _out(d, side), "--no-progress", *flags],
                "env": None, "result": _out(d, side)}
    return spec


def _mergekit_yaml(d):
    return {"argv": [os.path.join(BIN, "mergekit-yaml"), d["mk_yml"], _out(d, "mergekit-yaml"), "--allow-crimes", "--quiet"],
            "env": MK_ENV, "result": _out(d, "mergekit-yaml")}


SIDES = {"ferrox": run_ferrox, "ferrox_nofsync": run_ferrox_nofsync, "mergekit": run_mergekit, "io_bound": io_bound}
COMMANDS = {"ferrox merge": _cli("ferrox merge"), "ferrox merge --no-fsync": _cli("ferrox merge --no-fsync", "--no-fsync"),
            "mergekit-yaml": _mergekit_yaml}


def STARTUP(quick):
    ferrox = os.path.join(BIN, "ferrox")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "ferrox --version": [ferrox, "--version"],
        "ferrox --help": [ferrox, "--help"],
        "ferrox inspect BASE": [ferrox, "inspect", _models(quick)[1]],
    }


# Sides held bitwise to ferrox; the others by the mergekit rule.
BITWISE = {"ferrox_nofsync", "ferrox_cuda", "ferrox merge", "ferrox merge --no-fsync"}
MERGEKIT = {"mergekit", "mergekit-yaml"}


def _names_by_file(files):
    from safetensors import safe_open

    out = {}
    for path in files:
        with safe_open(path, "pt") as f:
            out.update({k: path for k in f.keys()})
    return out


def _get(files, name):
    from safetensors import safe_open

    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name)


def _bitwise(a, b):
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def _same_folders(side, got, ref):
    g, r = _names_by_file(read_files(got)), _names_by_file(read_files(ref))
    assert set(g) == set(r), f"{side}: tensors {sorted(set(g) ^ set(r))[:5]} differ from ferrox's"
    for name in r:
        assert _bitwise(_get(g, name), _get(r, name)), f"{side}: {name} is not bitwise ferrox's"


def read_files(folder):
    from ferrox.checkpoint import read_checkpoint

    return read_checkpoint(folder).files


def _mergekit_rule(side, got, ref, d):
    """The parity tests' rule, tensor by tensor (streamed: one tensor of each
    folder in memory at a time)."""
    cfg = d["config"]
    fx, mk = _names_by_file(read_files(ref)), _names_by_file(read_files(got))
    base = _names_by_file(read_files(cfg["base_model"]))
    models = [_names_by_file(read_files(m["model"])) for m in cfg["models"]]
    params = [m["parameters"] for m in cfg["models"]]
    assert set(fx) == set(mk), f"{side}: tensors {sorted(set(fx) ^ set(mk))[:5]} differ from ferrox's"
    checked = total = 0
    for name in sorted(fx):
        x, y, b = _get(fx, name), _get(mk, name), _get(base, name)
        ms = [_get(m, name) for m in models]
        if d["method"] in mergekit_parity.DENSE:
            mergekit_parity.check_dense(f"{side}: {name}", x, y, b, ms)
        else:
            # Stricter than the tests' rule: the elements every mask drops
            # are compared too (a third of them at density 0.3 x 3 models).
            checked += mergekit_parity.check_sparsified(f"{side}: {name}", d["method"], params, x, y, b, ms,
                                                        compare_all_dropped=True)
            total += x.numel()
    if total:
        assert checked > mergekit_parity.COVERAGE * total, \
            f"{side}: only {checked} of {total} elements compared by value (< {mergekit_parity.COVERAGE:.0%})"


def check(results, case, d):
    ref = results["ferrox"]
    for side, out in results.items():
        if side == "ferrox" or out is None:
            continue
        if side in BITWISE:
            _same_folders(side, out, ref)
        elif side == "mergekit-yaml" and "mergekit" in results:
            try:  # the same library as the in-process side: normally identical
                _same_folders(side, out, results["mergekit"])
            except AssertionError:
                _mergekit_rule(side, out, ref, d)
        elif side in MERGEKIT:
            _mergekit_rule(side, out, ref, d)
        else:
            raise AssertionError(f"{side}: no agreement rule for this side")


def _has_cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if _has_cuda():
    SIDES["ferrox_cuda"] = run_ferrox_cuda
