"""The command line as a package: start-up without torch, nested
subcommands, one exception mapping for every command, every config value
validated, inputs never lost (the red-team cases), escaped output."""

import argparse
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import ferrox
from ferrox import cli, synthetic
from ferrox.cli import _common


def inproc(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def tree_digest(path) -> dict:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny f32 base and two fine-tunes (Llama layout), made once."""
    import torch

    root = tmp_path_factory.mktemp("cli-models")
    base = synthetic.make_llama(root / "base", hidden=16, layers=1, dtype=torch.float32)
    fts = [synthetic.fine_tune(base, root / f"ft{i}", seed=i + 1) for i in range(2)]
    return root, base, fts


def config(path, base, fts, method="ties", **params):
    raw = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts],
           "parameters": params}
    path.write_text(yaml.safe_dump(raw))
    return path


# --- start-up ------------------------------------------------------------------

def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["merge", "--help"], ["inspect"], []])
def test_version_help_and_inspect_do_not_import_torch(argv):
    code = f"from ferrox.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert not _imports_torch(code)


def test_a_cpu_merge_does_not_import_torch(models, tmp_path):
    root, base, fts = models
    cfg = config(tmp_path / "m.yml", base, fts)
    code = f"from ferrox.cli import main\nassert main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}, '--quiet']) == 0"
    assert not _imports_torch(code)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_import_ferrox_does_not_import_torch_but_its_modules_load_on_use():
    assert not _imports_torch("import ferrox, ferrox.merge, ferrox.checkpoint, ferrox.output")
    assert _imports_torch("import ferrox\nferrox.select")


# --- the package: commands, nesting, exception mapping ---------------------------

class _Command:
    """A test command module: ``run`` raises whatever ``--raise`` names."""

    def __init__(self, name, exc=None):
        self.name, self.exc = name, exc

    def add_parser(self, sub, parent=None):
        full = f"{parent} {self.name}" if parent else self.name
        p = _common.add_command(sub, self.name, self.run, f"test command {self.name}", full_name=full)
        _common.add_output_options(p)
        return p

    def run(self, args):
        if self.exc is not None:
            raise self.exc
        print(f"ran {args.command_name} into {_common.output_path(args)} force={args.force}")
        return 0


class _Group:
    def __init__(self, name, children):
        self.name, self.children = name, children

    def add_parser(self, sub, parent=None):
        return _common.add_group(sub, self.name, f"test group {self.name}", self.children)


def test_nested_subcommands_share_the_output_options(capsys, tmp_path):
    cmds = (_Group("compress", [_Command("bitdelta"), _Command("codebook")]),)
    assert cli.main(["compress", "bitdelta", str(tmp_path / "a"), "--force"], commands=cmds) == 0
    assert capsys.readouterr().out.strip() == f"ran compress bitdelta into {tmp_path / 'a'} force=True"
    assert cli.main(["compress", "codebook", "--out", str(tmp_path / "b")], commands=cmds) == 0
    assert "ran compress codebook" in capsys.readouterr().out
    assert cli.main(["compress"], commands=cmds) == 2  # no method: its help, usage exit code
    assert "bitdelta" in capsys.readouterr().err
    assert cli.main(["compress", "codebook", str(tmp_path / "x"), "--out", str(tmp_path / "y")], commands=cmds) == 1
    assert "two output folders given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", "nosuch"], commands=cmds)
    assert e.value.code == 2


@pytest.mark.parametrize("exc", [
    ValueError("bad value for 'x'"), TypeError("bad type"), FileNotFoundError(2, "No such file or directory", "/nope"),
    PermissionError("cannot write /root/x"), ferrox.CudaError("cuLaunchKernel failed: out of resources"),
    ferrox.InternalError("panic in merge: index out of bounds"), MemoryError("cannot allocate 10 GiB"),
], ids=lambda e: type(e).__name__)
def test_every_user_error_is_one_line_and_exit_1(capsys, exc, monkeypatch):
    monkeypatch.delenv("FERROX_DEBUG", raising=False)
    assert cli.main(["boom", "out"], commands=(_Command("boom", exc),)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ferrox boom: error: ") and "Traceback" not in err
    text = exc.strerror if isinstance(exc, FileNotFoundError) else str(exc)
    assert text in err
    monkeypatch.setenv("FERROX_DEBUG", "1")
    with pytest.raises(type(exc)):
        cli.main(["boom", "out"], commands=(_Command("boom", exc),))


def test_interrupt_is_exit_130_and_a_bug_keeps_its_traceback(capsys):
    assert cli.main(["boom", "out"], commands=(_Command("boom", KeyboardInterrupt()),)) == 130
    assert capsys.readouterr().err.strip() == "ferrox boom: interrupted (SIGINT)"
    with pytest.raises(ZeroDivisionError):  # not something a user caused: the traceback is the report
        cli.main(["boom", "out"], commands=(_Command("boom", ZeroDivisionError()),))


def test_control_characters_are_escaped(capsys, tmp_path):
    assert _common.escape("a\x1b[31mred\x07\nb\u200bc") == "a\\x1b[31mred\\x07\\nb\\u200bc"
    assert _common.escape("model.layers.0.é") == "model.layers.0.é"
    path = tmp_path / "evil.safetensors"
    save_file({"x\x1b[2J\x1b[31mgotcha": np.zeros(2, np.float32)}, str(path))
    out = inproc(capsys, "inspect", path).stdout
    assert "\x1b" not in out and "x\\x1b[2J\\x1b[31mgotcha" in out
    assert cli.main(["boom", "out"], commands=(_Command("boom", ValueError("tensor 'a\x1b[2Jb': bad")),)) == 1
    assert "\x1b" not in capsys.readouterr().err


# --- merge: inputs are never lost ------------------------------------------------

@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
@pytest.mark.parametrize("where", ["base", "inside-base", "root-of-inputs", "input-file", "config", "symlink-to-ft"])
def test_merge_never_writes_over_or_into_an_input(capsys, models, tmp_path, where, force):
    root, base, fts = models
    cfg = config(tmp_path / "m.yml", base, fts)
    link = tmp_path / "link"
    if not link.exists():
        link.symlink_to(fts[0], target_is_directory=True)
    out = {"base": base, "inside-base": base / "merged", "root-of-inputs": root,
           "input-file": fts[1] / "model.safetensors", "config": cfg, "symlink-to-ft": link}[where]
    before = tree_digest(root), cfg.read_bytes()
    r = inproc(capsys, "merge", cfg, out, *(["--force"] if force else []), "--no-progress")
    assert r.returncode == 1 and "refusing" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (tree_digest(root), cfg.read_bytes()) == before
    assert not (base / "merged").exists() and not [p for p in os.listdir(root) if "ferrox" in p]


def test_interrupt_message_says_what_is_at_out(models, tmp_path):
    root, base, fts = models
    cfg = config(tmp_path / "m.yml", base, fts)
    code = ("import ferrox.merge.checkpoints as c\n"
            "def stop(*a, **k):\n    raise KeyboardInterrupt('signal SIGTERM')\n"
            "c._merge_one = stop\nfrom ferrox.cli import main\nimport sys\nsys.exit(main(sys.argv[1:]))")
    for existing in (False, True):
        out = tmp_path / f"out-{existing}"
        if existing:
            out.mkdir()
        r = subprocess.run([sys.executable, "-c", code, "merge", str(cfg), str(out), "--force", "--quiet"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 130, r.stderr
        want = f"{out} was left as it was" if existing else f"nothing was written to {out}"
        assert r.stderr.strip() == f"ferrox merge: interrupted (signal SIGTERM); {want}"


# --- merge: every value validated ------------------------------------------------

@pytest.mark.parametrize("key,value,needle", [
    ("lambda", float("nan"), "lambda must be a finite number"),
    ("lambda", 1e39, "lambda must be a finite number within float32's range"),
    ("lambda", "1.0", "lambda must be a number"),
    ("normalize", "false", "normalize must be true or false, got 'false' (a string)"),
    ("rescale", 1, "rescale must be true or false"),
    ("seed", 1.7, "seed must be an integer, got 1.7"),
    ("seed", float("inf"), "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("seed", -1, "seed must be in [0, 2**64)"),
    ("seed", 2**64, "seed must be in [0, 2**64)"),
    ("granularity", 5, "granularity must be one of"),
    ("density", float("nan"), "density must be a finite number"),
    ("weight", "heavy", "weight must be a number, got 'heavy'"),
    ("weight", float("inf"), "weight must be a finite number"),
    ("weight", -4e38, "weight must be a finite number within float32's range"),
], ids=lambda v: repr(v)[:20])
def test_bad_values_are_one_line_errors_naming_the_key(capsys, models, tmp_path, key, value, needle):
    root, base, fts = models
    raw = yaml.safe_load(config(tmp_path / "m.yml", base, fts).read_text())
    params = raw["models"][0]["parameters"] if key in ("weight", "density") else raw["parameters"]
    params[key] = value
    (tmp_path / "m.yml").write_text(yaml.safe_dump(raw))
    r = inproc(capsys, "merge", tmp_path / "m.yml", tmp_path / "out", "--no-progress")
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("merge_method: [ties]\nmodels: []\n", "merge_method must be a method name"),
    ("merge_method: ties\nmodels: [{model: a}]\ndtype: [bfloat16]\n", "dtype must be one of"),
    ("\xff\xfe", "not UTF-8"),
    ("a: b: c", "not valid YAML"),
])
def test_malformed_config_files(capsys, tmp_path, text, needle):
    path = tmp_path / "m.yml"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    r = inproc(capsys, "merge", path, tmp_path / "out")
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_that_is_a_fifo_is_refused_without_blocking(capsys, tmp_path):
    fifo = tmp_path / "m.yml"
    os.mkfifo(fifo)
    r = inproc(capsys, "merge", fifo, tmp_path / "out")
    assert r.returncode == 1 and "not a regular file" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--out-shard-size", "inf"], "expected a count"),
    (["--out-shard-size", "nan"], "expected a count"),
    (["--out-shard-size", "1e400"], "expected a count"),
    (["--random-seed", "1.5"], "invalid int value"),
])
def test_bad_arguments_are_usage_errors(capsys, tmp_path, args, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out"), *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_random_seed_out_of_range_is_named(capsys, models, tmp_path):
    root, base, fts = models
    r = inproc(capsys, "merge", config(tmp_path / "m.yml", base, fts), tmp_path / "out", "--random-seed", "-3")
    assert r.returncode == 1 and "--random-seed: seed must be in [0, 2**64)" in r.stderr


def test_f64_tensors_are_refused_by_name(capsys, tmp_path):
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        save_file({"w": np.full(4, 1.0 if name == "base" else 2.0, np.float64)}, str(tmp_path / name / "model.safetensors"))
    cfg = config(tmp_path / "m.yml", tmp_path / "base", [tmp_path / "ft"], method="task_arithmetic")
    r = inproc(capsys, "merge", cfg, tmp_path / "out")
    assert r.returncode == 1 and "tensor 'w' is F64" in r.stderr


def test_allow_nonfinite_says_why_ranking_methods_still_refuse_nan(capsys, tmp_path):
    for name, v in (("base", 1.0), ("ft", float("nan"))):
        (tmp_path / name).mkdir()
        save_file({"w": np.array([1.0, v, 3.0, 4.0], np.float32)}, str(tmp_path / name / "model.safetensors"))
    ties = config(tmp_path / "ties.yml", tmp_path / "base", [tmp_path / "ft"], method="ties")
    r = inproc(capsys, "merge", ties, tmp_path / "o1", "--allow-nonfinite")
    assert r.returncode == 1 and "a NaN has no rank" in r.stderr
    ta = config(tmp_path / "ta.yml", tmp_path / "base", [tmp_path / "ft"], method="task_arithmetic")
    assert inproc(capsys, "merge", ta, tmp_path / "o2", "--allow-nonfinite").returncode == 0


# --- property tests: no input makes a traceback ------------------------------------

_yaml_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=12), st.sampled_from(["ties", "linear", "base", "model", "weight", ".nan"]))
_yaml_doc = st.recursive(_yaml_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(["merge_method", "base_model", "models", "model", "parameters", "weight",
                                     "density", "gamma", "lambda", "seed", "normalize", "rescale", "dtype",
                                     "granularity", "slices", "x"]) | st.text(max_size=6), kids, max_size=5)),
    max_leaves=20)


@settings(max_examples=settings.default.max_examples * 3 // 5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_yaml_doc, model_keys=st.booleans())
def test_random_yaml_configs_exit_1_without_traceback(doc, model_keys, tmp_path_factory, models):
    root, base, fts = models
    tmp = tmp_path_factory.mktemp("fuzz")
    if model_keys and isinstance(doc, dict):  # reach deeper: real model paths
        doc.setdefault("merge_method", "ties")
        doc["models"] = [{"model": str(f), "parameters": doc.get("parameters")} for f in fts]
        doc["base_model"] = str(base)
    (tmp / "m.yml").write_text(yaml.safe_dump(doc))
    code = cli.main(["merge", str(tmp / "m.yml"), str(tmp / "out"), "--quiet"])
    assert code in (0, 1)


_tokens = st.sampled_from(["merge", "inspect", "doctor", "--force", "--out", "--device", "cuda:99", "--quiet",
                           "--no-fsync", "--random-seed", "--out-shard-size", "inf", "-1", "1e400", "--json",
                           "m.yml", "out", "missing", "--help", "\x1b[2J", "", "--allow-nonfinite"])


@settings(max_examples=settings.default.max_examples * 3 // 5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(_tokens | st.text(max_size=8), max_size=6))
def test_random_argument_strings_exit_0_1_or_2(argv, tmp_path_factory, monkeypatch):
    if "doctor" in argv or "--help" in argv:
        argv = [a for a in argv if a not in ("doctor", "--help")]  # slow / prints help: covered elsewhere
    monkeypatch.chdir(tmp_path_factory.mktemp("argv"))
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code in (0, 1, 2)


def test_count_parses_mergekit_units():
    assert _common.count("5B") == 5 * 10**9 and _common.count("500M") == 5 * 10**8 and _common.count("12") == 12
    for bad in ("0", "-1", "inf", "nan", "x", "1e400"):
        with pytest.raises(argparse.ArgumentTypeError):
            _common.count(bad)


def test_integer_buffers_are_copied_from_the_reference_model_bit_for_bit(capsys, tmp_path):
    ids = np.array([3, -1, 2**40, 0], np.int64)
    for name, v in (("base", 1.0), ("ft", 2.0)):
        (tmp_path / name).mkdir()
        save_file({"w": np.full((2, 3), v, np.float32), "position_ids": ids if name == "base" else ids * 0},
                  str(tmp_path / name / "model.safetensors"))
    cfg = config(tmp_path / "m.yml", tmp_path / "base", [tmp_path / "ft"], method="task_arithmetic")
    assert inproc(capsys, "merge", cfg, tmp_path / "out").returncode == 0
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["position_ids"].tobytes() == ids.tobytes() and got["w"].tolist() == [[1.5] * 3] * 2  # 1 + 0.5·(2 − 1)
