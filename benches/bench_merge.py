"""Merging bf16 fine-tunes of a Llama-layout model: ferrox vs mergekit.

Cases: the generalized task-arithmetic family in the Rust core
(task_arithmetic, ties, breadcrumbs, breadcrumbs_row: 3 fine-tunes) and the
torch methods (slerp of the base and one fine-tune with mergekit's classic
filtered gradient `t`; model_stock and della over 3 fine-tunes; passthrough:
layer stacking with `slices`, the first 2/3 of one fine-tune's layers then
the last 2/3 of another's).

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

Where the two tools do not do the same work (each is in `CASE_NOTES`, printed
under the tables):
- della: mergekit computes MagPrune's ranks and keep probabilities in bf16 on
  bf16 inputs (ranks above 256 round), ferrox in f32, so the random masks
  differ whatever the generator; ferrox runs its default (`rng: tensor`:
  Philox draws per tensor in the Rust core; `rng: mergekit` is bitwise
  mergekit in f32, tests/test_merge_della.py). Here the check is
  statistical: per tensor, the kept fraction and the L1 norm of the merged
  delta agree;
- slerp: both compute in f32 and round once, the coefficients from float64
  (ferrox) or float32 (mergekit) cosines: the parity tests' slerp bound;
- model_stock: mergekit rounds every step in bf16, ferrox computes in f32 and
  rounds once: the dense rule (4 ulp) holds;
- passthrough: ferrox copies an unscaled tensor's bytes without decoding
  them, mergekit loads and writes each tensor; the output is the same, bit
  for bit;
- breadcrumbs_row (below).

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
CASES = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_row", "slerp", "model_stock", "della", "passthrough"]
MAIN_COMPARATOR = "mergekit"
# mergekit takes most of a minute per sparsified merge at full size; the
# harness still times at least 3 runs of it.
REPEATS = 3
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import mergekit_parity  # noqa: E402  (the parity tests' rule, shared)

# ~370M parameters (hidden 1024, 24 layers, vocab 32000); --quick: ~10M;
# --quick with BENCH_MERGE_SIZE=tiny: ~0.2M, a smoke run of every case and
# side on a loaded machine (numbers meaningless).
FULL = dict(hidden=1024, layers=24, intermediate=2816, vocab=32000)
QUICK = dict(hidden=256, layers=4, intermediate=704, vocab=8000)
TINY = dict(hidden=64, layers=3, intermediate=176, vocab=512)


def _size(quick):
    if not quick:
        return "full", FULL
    tiny = os.environ.get("BENCH_MERGE_SIZE", "") == "tiny"
    return ("tiny", TINY) if tiny else ("quick", QUICK)

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

    label, size = _size(quick)
    root = os.path.join(CACHE, label)
    base = os.path.join(root, "base")
    if not os.path.exists(os.path.join(root, "done")):
        shutil.rmtree(root, ignore_errors=True)
        synthetic.make_llama(base, **size, max_shard_bytes=1 << 30)
        for i in range(3):
            synthetic.fine_tune(base, os.path.join(root, f"ft{i}"), seed=i + 1, max_shard_bytes=1 << 30)
        open(os.path.join(root, "done"), "w").close()
    return root, base, [os.path.join(root, f"ft{i}") for i in range(3)]


# mergekit's classic slerp config: attention from the base towards the
# fine-tune over the layers, the MLPs the other way, the rest halfway.
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
DELLA_SEED = 7
TORCH_METHODS = {"slerp", "model_stock", "della", "passthrough"}
CASE_NOTES = {
    "della": "not the same random masks: mergekit ranks and draws in bf16 (ranks above 256 round) from torch's "
             "generator; ferrox ranks in f32 and draws from Philox per tensor (its default `rng: tensor`; "
             "`rng: mergekit` is bitwise mergekit in f32, tested, and runs the slower torch path); checked "
             "statistically (kept fraction, L1 norm of the merged delta per tensor)",
    "slerp": "the same work; not bitwise: ferrox's coefficients come from a float64 cosine, mergekit's from float32 "
             "norms and dots (held to the parity tests' slerp bound)",
    "model_stock": "mergekit rounds every step in bf16, ferrox computes in f32 and rounds once (agree within 4 ulp)",
    "passthrough": "same output bit for bit; ferrox copies unscaled tensors' bytes, mergekit decodes and re-encodes them",
    "breadcrumbs_row": SCALE_NOTE,
}


def _config(case, base, fts, layers):
    """The mergekit config of a case (ferrox's adds its own keys in setup)."""
    method = case.removesuffix("_row")
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "dtype": "bfloat16",
                "models": [{"model": base}, {"model": fts[0]}], "parameters": {"t": SLERP_T}}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": base, "dtype": "bfloat16",
                "models": [{"model": f} for f in fts]}
    if method == "passthrough":
        cut = layers // 3
        return {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
            {"sources": [{"model": fts[0], "layer_range": [0, layers - cut]}]},
            {"sources": [{"model": fts[1], "layer_range": [cut, layers]}]}]}
    params = {"task_arithmetic": {}, "ties": {"density": 0.3}, "breadcrumbs": {"density": 0.3, "gamma": 0.01},
              "della": {"density": 0.5, "epsilon": 0.1}}[method]
    cfg = {"merge_method": method, "base_model": base, "dtype": "bfloat16",
           "models": [{"model": f, "parameters": {"weight": w, **params}} for f, w in zip(fts, (0.5, 0.3, 0.2))]}
    if method == "della":
        cfg["parameters"] = {"lambda": 0.9}
    return cfg


def _read_plan(cfg):
    """What any merge of `cfg` has to read ((file, offset, bytes), each
    tensor once) and the output's size in bytes."""
    from ferrox.checkpoint import read_checkpoint

    def layer(name):
        parts = name.split(".")
        return int(parts[2]) if name.startswith("model.layers.") else None

    if "slices" not in cfg:
        folders = list(dict.fromkeys([cfg["base_model"]] + [m["model"] for m in cfg["models"]]))
        reads = [(t.file, t.data_start, t.nbytes) for f in folders for t in read_checkpoint(f).tensors]
        return reads, read_checkpoint(cfg["base_model"]).total_bytes
    reads, out = [], 0
    slices = cfg["slices"]
    for j, sl in enumerate(slices):
        src = sl["sources"][0]
        lo, hi = src["layer_range"]
        for t in read_checkpoint(src["model"]).tensors:
            i = layer(t.name)
            if i is None:
                # embeddings from the first slice's model, the final norm and lm_head from the last's
                wanted = j == 0 if "embed" in t.name else j == len(slices) - 1
            else:
                wanted = lo <= i < hi
            if wanted:
                reads.append((t.file, t.data_start, t.nbytes))
                out += t.nbytes
    return reads, out


def setup(case, quick):
    root, base, fts = _models(quick)
    cfg = _config(case, base, fts, _size(quick)[1]["layers"])
    method = cfg["merge_method"]
    if method == "della":
        # ferrox's default draws (Philox per tensor, in the Rust core): in bf16
        # mergekit's masks differ from any f32 ranking anyway (CASE_NOTES)
        fx_cfg = {**cfg, "parameters": {**cfg["parameters"], "seed": DELLA_SEED}}
    elif method in TORCH_METHODS:
        fx_cfg = cfg
    else:
        granularity = "row" if case.endswith("_row") else "tensor"
        fx_cfg = {**cfg, "parameters": {**cfg.get("parameters", {}), "granularity": granularity}}
    scratch = os.path.join(root, f"run-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    paths = {"fx_yml": os.path.join(scratch, f"{case}-ferrox.yml"), "mk_yml": os.path.join(scratch, f"{case}-mergekit.yml")}
    with open(paths["fx_yml"], "w") as f:
        yaml.safe_dump(fx_cfg, f)
    with open(paths["mk_yml"], "w") as f:
        yaml.safe_dump(cfg, f)
    reads, out_bytes = _read_plan(cfg)
    return {"case": case, "method": method, "config": cfg, "fx_config": fx_cfg, "scratch": scratch,
            "reads": reads, "out_bytes": out_bytes, "layers": _size(quick)[1]["layers"], **paths}


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
    seed = {"random_seed": DELLA_SEED} if d["method"] == "della" else {}
    run_merge(cfg, _out(d, "mergekit"), MergeOptions(allow_crimes=True, quiet=True, **seed))
    return _out(d, "mergekit")


def io_bound(d):
    """Read every input byte the merge needs (each input tensor once; for
    passthrough only the stacked layers) and write the output's size: the
    floor any merge of these files has to pay."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for path, start, nbytes in d["reads"]:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            left = nbytes
            while left > 0:
                got = f.readinto(view[: min(left, len(buf))])
                if not got:
                    break
                left -= got
    path = _out(d, "io_bound")
    chunk = bytes(64 << 20)
    with open(path, "wb") as f:
        left = d["out_bytes"]
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
    seed = ["--random-seed", str(DELLA_SEED)] if d["method"] == "della" else []
    return {"argv": [os.path.join(BIN, "mergekit-yaml"), d["mk_yml"], _out(d, "mergekit-yaml"), "--allow-crimes", "--quiet", *seed],
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


# della's statistical rule: tensors this large are compared (smaller ones,
# the norms, have too few elements for a bound) and must cover most of the
# model; each kept fraction within 6 binomial sigma plus 0.2% of the other
# tool's, each merged delta's L1 norm within 3% + 3/sqrt(n) (with rescale,
# each model's masked delta keeps its L1 norm exactly: only the sign
# election and the overlap of the masks vary).
DELLA_MIN_NUMEL = 4096
DELLA_SIGMAS = 6.0
DELLA_L1_RTOL = 0.03


def _della_rule(name, x, y, b):
    """ferrox's and mergekit's della of one tensor drew different masks (see
    CASE_NOTES): the merged deltas must keep the same share of elements and
    the same L1 norm."""
    import torch

    dx, dy = x.float() - b.float(), y.float() - b.float()
    n = dx.numel()
    qx, qy = float((dx != 0).float().mean()), float((dy != 0).float().mean())
    sigma = (2 * max(qx * (1 - qx), qy * (1 - qy), 1e-12) / n) ** 0.5
    assert abs(qx - qy) <= DELLA_SIGMAS * sigma + 2e-3, f"{name}: kept fraction {qx:.4f} vs mergekit's {qy:.4f}"
    lx, ly = float(dx.abs().sum()), float(dy.abs().sum())
    rtol = DELLA_L1_RTOL + 3 / n ** 0.5
    assert abs(lx - ly) <= rtol * max(lx, ly), f"{name}: L1 norm of the delta {lx:.6g} vs mergekit's {ly:.6g}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"


def _slerp_t(cfg, n_layers):
    """The slerp `t` of each tensor under `cfg` (mergekit's filters and
    gradients, resolved by ferrox's settings module)."""
    from ferrox.merge.methods import METHODS
    from ferrox.merge.settings import layer_index, layer_t, parse_setting

    setting = parse_setting("bench", "t", cfg["parameters"]["t"], METHODS["slerp"].param("t"))

    def t_of(name):
        i = layer_index(name)
        return setting.evaluate(name, 0.0 if i is None else layer_t(i, n_layers))

    return t_of


def _mergekit_rule(side, got, ref, d):
    """The parity tests' rule, tensor by tensor (streamed: one tensor of each
    folder in memory at a time)."""
    cfg, method = d["config"], d["method"]
    fx, mk = _names_by_file(read_files(ref)), _names_by_file(read_files(got))
    assert set(fx) == set(mk), f"{side}: tensors {sorted(set(fx) ^ set(mk))[:5]} differ from ferrox's"
    if method == "passthrough":
        # a stacked layer is a copy: bitwise
        for name in sorted(fx):
            assert _bitwise(_get(mk, name), _get(fx, name)), f"{side}: {name} is not bitwise ferrox's"
        return
    if method == "slerp":
        # both tools compute in f32 and round once; the coefficients come from
        # float64 (ferrox) vs float32 (mergekit) cosines: the parity tests' bound
        t_of = _slerp_t(cfg, d["layers"])
        a_files = _names_by_file(read_files(cfg["models"][0]["model"]))
        b_files = _names_by_file(read_files(cfg["models"][1]["model"]))
        for name in sorted(fx):
            x, y = _get(fx, name), _get(mk, name)
            if _bitwise(y, x):
                continue
            mergekit_parity.check_slerp(f"{side}: {name}", x, y, _get(a_files, name), _get(b_files, name), t_of(name))
        return
    base = _names_by_file(read_files(cfg["base_model"]))
    models = [_names_by_file(read_files(m["model"])) for m in cfg["models"]]
    params = [m.get("parameters", {}) for m in cfg["models"]]
    checked = total = 0
    for name in sorted(fx):
        x, y, b = _get(fx, name), _get(mk, name), _get(base, name)
        if method == "della":
            total += x.numel()
            if x.numel() >= DELLA_MIN_NUMEL:
                _della_rule(f"{side}: {name}", x, y, b)
                checked += x.numel()
            continue
        ms = [_get(m, name) for m in models]
        if method in mergekit_parity.DENSE or method == "model_stock":
            mergekit_parity.check_dense(f"{side}: {name}", x, y, b, ms)
        else:
            # Stricter than the tests' rule: the elements every mask drops
            # are compared too (a third of them at density 0.3 x 3 models).
            checked += mergekit_parity.check_sparsified(f"{side}: {name}", method, params, x, y, b, ms,
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
