"""The ferrox command line, run as users run it."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

import ferrox
from ferrox.models import default_model_path

FERROX = [sys.executable, "-m", "ferrox.cli"]


def run(*args, check=True):
    out = subprocess.run([*FERROX, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_version():
    assert run("--version").stdout.strip() == f"ferrox {ferrox.__version__}"


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "ferrox")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ferrox ")


def test_inspect_default_model_lists_every_tensor():
    out = run("inspect").stdout
    path = os.path.join(default_model_path(), "model.safetensors")
    with safe_open(path, "pt") as f:
        names = list(f.keys())
    for name in names:
        assert name in out
    assert f"{len(names)} tensors in 1 file(s)" in out
    assert "total: 22," in out


def test_inspect_json(tmp_path):
    data = json.loads(run("inspect", default_model_path(), "--json").stdout)
    with safe_open(os.path.join(default_model_path(), "model.safetensors"), "pt") as f:
        want = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}
    assert {t["name"]: t["shape"] for t in data["tensors"]} == want


def test_inspect_errors_are_clear(tmp_path):
    out = run("inspect", str(tmp_path / "missing.safetensors"), check=False)
    assert out.returncode == 1 and "missing.safetensors" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    out = run("inspect", str(bad), check=False)
    assert out.returncode == 1 and "bad.safetensors" in out.stderr and "Traceback" not in out.stderr


def test_doctor_compiles_every_kernel():
    # No --allow-missing-cuda: a kernel that does not compile fails this test.
    out = run("doctor").stdout
    assert "threads: ferrox" in out
    assert "compiled all kernels for sm_90" in out
    for kernel_file in ("merge", "ops", "philox"):
        assert f"{kernel_file}.cu " in out.split("compiled all kernels", 1)[1]


def test_doctor_fails_when_a_kernel_does_not_compile(tmp_path):
    # NVRTC that cannot be loaded stands in for a compile failure: exit 1 unless allowed.
    env = dict(os.environ, FERROX_NVRTC=str(tmp_path / "libnvrtc.so.missing"))
    out = subprocess.run([*FERROX, "doctor"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "kernels did not compile" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([*FERROX, "doctor", "--allow-missing-cuda"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0


def test_inspect_shows_what_ferrox_wrote(tmp_path):
    from ferrox import synthetic
    import torch
    import yaml

    base = synthetic.make_llama(tmp_path / "base", hidden=16, layers=1, dtype=torch.float32)
    ft = synthetic.fine_tune(base, tmp_path / "ft", seed=1)
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                   "models": [{"model": str(ft), "parameters": {"weight": 1.0, "density": 0.3}}]}))
    run("merge", str(cfg), str(tmp_path / "out"), "--quiet")
    out = run("inspect", str(tmp_path / "out")).stdout
    assert f"written by ferrox {ferrox.__version__}: format merge, method ties" in out
    assert "tensors_merged" in out and "per tensor (ferrox_report.json)" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("model.layers.0.mlp.up_proj.weight") and "changed" not in l
                and l.startswith("    "))
    assert 0.0 < float(line.split()[-1]) <= 0.31  # ties keeps 30%: at most that fraction changes
    data = json.loads(run("inspect", str(tmp_path / "out"), "--json").stdout)
    assert data["ferrox"]["metadata"]["ferrox_format"] == "merge"
    assert set(data["ferrox"]["report"]["tensors"]) == {t["name"] for t in data["tensors"]}  # every one merged
    plain = json.loads(run("inspect", "--json").stdout)
    assert plain["ferrox"] is None
