"""CUDA support: finding the driver and NVRTC, and handing torch's current
stream to ferrox's kernels.

ferrox never links CUDA: the driver (``libcuda``) and NVRTC are opened at
first use. NVRTC is looked up where users have it: ``FERROX_NVRTC`` (a path),
the ``nvidia-*`` wheels that pip's torch brings, then ``CUDA_HOME``/
``CUDA_PATH`` and the system's library path, preferring the one whose major
version is ``torch.version.cuda``'s. ``FERROX_CUDA_DRIVER`` names the
driver library to load instead of the default ``libcuda.so``.
"""

import glob
import os
import re
import site
import sys

import torch

from . import _core


def _site_dirs():
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs.append(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    dirs.extend(p for p in sys.path if p.endswith("site-packages"))
    return [d for d in dict.fromkeys(dirs) if d and os.path.isdir(d)]


def _nvrtc_major(path):
    """The CUDA major version of a libnvrtc path: from the file name
    (libnvrtc.so.13, libnvrtc.so.12.4.127) or pip's folder (nvidia/cu13/lib)."""
    m = re.match(r"libnvrtc\.so\.(\d+)", os.path.basename(path))
    if m:
        return int(m.group(1))
    m = re.search(r"[/\\]cu(\d+)[/\\]lib[/\\]", path)
    return int(m.group(1)) if m else None


def _torch_cuda_major():
    v = getattr(torch.version, "cuda", None)
    try:
        return int(str(v).split(".")[0]) if v else None
    except ValueError:
        return None


def nvrtc_candidates(site_dirs=None, env=None):
    """Every libnvrtc found, in search order: pip's ``nvidia`` wheels in each
    site-packages folder, then ``CUDA_HOME``/``CUDA_PATH``/``/usr/local/cuda``.
    One path per folder: the most specific version (not the builtins helper)."""
    env = os.environ if env is None else env
    folders = []
    for d in _site_dirs() if site_dirs is None else site_dirs:
        # nvidia/cu13/lib, nvidia/cu12/lib, ...: the newest first.
        versioned = [p for p in glob.glob(os.path.join(d, "nvidia", "cu*", "lib"))
                     if re.fullmatch(r"cu\d+", os.path.basename(os.path.dirname(p)))]
        folders += sorted(versioned, key=lambda p: -int(os.path.basename(os.path.dirname(p))[2:]))
        folders.append(os.path.join(d, "nvidia", "cuda_nvrtc", "lib"))
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            folders.append(os.path.join(root, "lib64"))
    found = []
    for folder in dict.fromkeys(folders):
        hits = sorted(p for p in glob.glob(os.path.join(folder, "libnvrtc.so*")) if "builtins" not in os.path.basename(p))
        if hits:
            found.append(hits[-1])
    return found


def find_nvrtc(site_dirs=None, cuda_major=None, env=None):
    """Path of a libnvrtc to use, or None (then the system loader searches).

    ``FERROX_NVRTC`` wins. Otherwise the first candidate whose CUDA major
    version is torch's (``torch.version.cuda``; ``cuda_major`` overrides it):
    kernels from an NVRTC newer than the driver do not load, and torch's own
    wheels tell which CUDA the driver runs. Without such a match, the first
    candidate."""
    env = os.environ if env is None else env
    if env.get("FERROX_NVRTC"):
        return env["FERROX_NVRTC"]
    found = nvrtc_candidates(site_dirs, env)
    want = _torch_cuda_major() if cuda_major is None else cuda_major
    matching = [p for p in found if want is not None and _nvrtc_major(p) == want]
    return (matching or found or [None])[0]


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
