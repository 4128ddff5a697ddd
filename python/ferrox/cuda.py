"""CUDA support: finding the driver and NVRTC, and handing torch's current
stream to ferrox's kernels.

ferrox never links CUDA: the driver (``libcuda``) and NVRTC are opened at
first use. NVRTC is looked up where users have it: ``FERROX_NVRTC`` (a path),
the ``nvidia-*`` wheels that pip's torch brings, then ``CUDA_HOME``/
``CUDA_PATH`` and the system's library path. ``FERROX_CUDA_DRIVER`` names the
driver library to load instead of the default ``libcuda.so``.
"""

import glob
import os
import site
import sys

import torch

from . import _core


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    dirs.extend(p for p in sys.path if p.endswith("site-packages"))
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def find_nvrtc():
    """Path of a libnvrtc to use, or None (then the system loader searches)."""
    env = os.environ.get("FERROX_NVRTC")
    if env:
        return env
    patterns = []
    for d in _site_dirs():
        patterns += [
            os.path.join(d, "nvidia", "cu*", "lib", "libnvrtc.so*"),
            os.path.join(d, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"),
        ]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            patterns.append(os.path.join(root, "lib64", "libnvrtc.so*"))
    for pattern in patterns:
        # Prefer the versioned library proper, not the builtins helper.
        hits = sorted(p for p in glob.glob(pattern) if "builtins" not in os.path.basename(p))
        if hits:
            return hits[-1]
    return None


def _prepare_nvrtc():
    path = find_nvrtc()
    if path and "FERROX_NVRTC" not in os.environ:
        os.environ["FERROX_NVRTC"] = path
    return path


def driver_info() -> dict:
    """Driver version and devices; raises ``ferrox.CudaError`` when the
    driver cannot be loaded or initialised."""
    return _core.cuda_driver_info()


def nvrtc_check(arch: str = "sm_90") -> dict:
    """Compiles every ferrox kernel for ``arch`` with NVRTC (no GPU needed)."""
    _prepare_nvrtc()
    return _core.nvrtc_check(arch)


def is_available() -> bool:
    """True when torch sees a GPU and ferrox can load the CUDA driver."""
    if not torch.cuda.is_available():
        return False
    try:
        driver_info()
    except RuntimeError:
        return False
    return True


def stream_of(t: torch.Tensor) -> int:
    """torch's current stream on ``t``'s device as a raw CUstream (0 for CPU).

    ferrox launches on this stream so its kernels are ordered with the torch
    ops around them, exactly as a torch op would be.
    """
    if t.device.type != "cuda":
        return 0
    _prepare_nvrtc()
    return torch.cuda.current_stream(t.device).cuda_stream
