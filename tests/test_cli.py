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


def test_doctor_reports_threads_and_nvrtc():
    out = run("doctor", "--allow-missing-cuda").stdout
    assert "threads: ferrox" in out
    assert "nvrtc" in out
