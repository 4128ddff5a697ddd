"""``ferrox doctor``: what ferrox found on this machine — threads, the CUDA
driver and devices, NVRTC and whether every kernel compiles with it."""

import os
import platform

from . import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "doctor", run, "show threads, CUDA driver and NVRTC status, build info")
    p.add_argument("--arch", default="sm_90", help="NVRTC target when no GPU is present (default sm_90)")
    p.add_argument("--allow-missing-cuda", action="store_true", help="exit 0 even if kernels do not compile")
    return p


def run(args) -> int:
    import torch

    from .. import __version__, _core, checkpoint, cuda, get_num_threads

    print(f"ferrox {__version__} ({_core.BUILD_INFO})")
    print(f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__}"
          f" (CUDA {torch.version.cuda or 'none'})")
    print(f"threads: ferrox {get_num_threads()}, torch {torch.get_num_threads()}"
          f" (FERROX_NUM_THREADS={os.environ.get('FERROX_NUM_THREADS', 'unset')})")
    try:
        info = cuda.driver_info()
        print(f"cuda driver: version {info['driver_version']}, {info['device_count']} device(s)")
        for d in info["devices"]:
            cc = d["compute_capability"]
            print(f"  [{d['ordinal']}] {d['name']} sm_{cc[0]}{cc[1]}, {checkpoint.human_bytes(d['total_mem'])}")
        arch = "sm_%d%d" % tuple(info["devices"][0]["compute_capability"]) if info["devices"] else args.arch
    except RuntimeError as e:
        print(f"cuda driver: not available ({e})")
        arch = args.arch
    print(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
    nvrtc = cuda.find_nvrtc()
    print(f"nvrtc library: {nvrtc or 'system loader search'}")
    try:
        rep = cuda.nvrtc_check(arch)
    except RuntimeError as e:
        print(f"nvrtc: kernels did not compile for {arch}: {e}")
        return 0 if args.allow_missing_cuda else _common.EXIT_FAILED
    sizes = ", ".join(f"{k} {v} B" for k, v in sorted(rep["code_bytes"].items()))
    print(f"nvrtc {rep['version'][0]}.{rep['version'][1]}: compiled all kernels for {arch} ({sizes})")
    return 0
