"""CUDA runtime: clear errors without a driver, NVRTC compiles every kernel
(no GPU needed), and the GPU tests proper live beside each op."""

import os
import subprocess
import sys

import pytest

import ferrox
from ferrox import cuda


def test_missing_driver_is_a_clear_runtime_error():
    code = (
        "import ferrox, sys\n"
        "try:\n"
        "    ferrox.cuda.driver_info()\n"
        "except RuntimeError as e:\n"
        "    print(type(e).__name__, e); sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    env = dict(os.environ, FERROX_CUDA_DRIVER="/nonexistent/libcuda.so.1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CudaError" in out.stdout and "/nonexistent/libcuda.so.1" in out.stdout


def test_nvrtc_is_found_in_pip_wheels():
    path = cuda.find_nvrtc()
    assert path is not None and "nvrtc" in os.path.basename(path)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles_with_nvrtc(arch):
    rep = cuda.nvrtc_check(arch)
    assert rep["version"][0] >= 12
    assert rep["code_bytes"] and all(v > 0 for v in rep["code_bytes"].values())


def test_is_available_is_false_without_gpu_or_true_with_one():
    import torch

    assert cuda.is_available() == torch.cuda.is_available()


@pytest.mark.gpu
def test_driver_info_on_gpu():
    info = cuda.driver_info()
    assert info["device_count"] >= 1 and info["devices"][0]["compute_capability"][0] >= 7


@pytest.mark.gpu
def test_the_chosen_nvrtc_matches_torchs_cuda_and_its_kernels_load():
    import torch

    from ferrox.cuda import _nvrtc_major

    path = cuda.find_nvrtc()
    assert path is not None
    assert _nvrtc_major(path) == int(torch.version.cuda.split(".")[0]), path
    # The driver loads what that NVRTC compiled: a merge runs.
    x = torch.randn(1000, device="cuda")
    out = ferrox.merge.merge_tensors("ties", x, [x + 1, x - 2], density=0.5)
    assert out.device.type == "cuda"
