"""The ``ferrox`` command line: ``ferrox --version``, ``ferrox doctor``,
``ferrox inspect PATH``."""

import argparse
import json
import os
import platform
import sys

from . import __version__, _core, checkpoint, cuda, get_num_threads
from .models import default_model_path


def _cmd_doctor(args) -> int:
    import torch

    print(f"ferrox {__version__} ({_core.BUILD_INFO})")
    print(f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__}")
    print(f"threads: ferrox {get_num_threads()}, torch {torch.get_num_threads()}"
          f" (FERROX_NUM_THREADS={os.environ.get('FERROX_NUM_THREADS', 'unset')})")
    ok = True
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
        sizes = ", ".join(f"{k} {v} B" for k, v in sorted(rep["code_bytes"].items()))
        print(f"nvrtc {rep['version'][0]}.{rep['version'][1]}: compiled all kernels for {arch} ({sizes})")
    except RuntimeError as e:
        print(f"nvrtc: kernels did not compile for {arch}: {e}")
        ok = False
    return 0 if ok or args.allow_missing_cuda else 1


def _cmd_inspect(args) -> int:
    path = args.path or default_model_path()
    info = checkpoint.read_checkpoint(path)
    if args.json:
        json.dump(
            {
                "root": info.root,
                "index": info.index,
                "files": info.files,
                "total_bytes": info.total_bytes,
                "total_params": info.total_params,
                "tensors": [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes,
                     "file": os.path.basename(t.file)}
                    for t in info.tensors
                ],
            },
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    sharded = f", sharded by {os.path.basename(info.index)}" if info.index else ""
    print(f"{info.root}: {len(info.tensors)} tensors in {len(info.files)} file(s){sharded}")
    width = max((len(t.name) for t in info.tensors), default=4)
    multi = len(info.files) > 1
    for t in info.tensors:
        shape = "x".join(map(str, t.shape)) or "scalar"
        where = f"  {os.path.basename(t.file)}" if multi else ""
        print(f"  {t.name:<{width}}  {t.dtype:<5} {shape:<16} {checkpoint.human_bytes(t.nbytes):>10}{where}")
    dtypes = ", ".join(f"{d}: {n:,}" for d, n in sorted(info.dtype_counts().items()))
    print(f"total: {info.total_params:,} parameters, {checkpoint.human_bytes(info.total_bytes)} ({dtypes})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrox", description="Merge, compress and inspect model checkpoints.")
    p.add_argument("--version", action="version", version=f"ferrox {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("doctor", help="show threads, CUDA driver and NVRTC status, build info")
    d.add_argument("--arch", default="sm_90", help="NVRTC target when no GPU is present (default sm_90)")
    d.add_argument("--allow-missing-cuda", action="store_true", help="exit 0 even if kernels do not compile")
    d.set_defaults(func=_cmd_doctor)
    i = sub.add_parser("inspect", help="list tensors of a safetensors file or HF model folder")
    i.add_argument("path", nargs="?", help="file or folder (default: the embedded all-MiniLM-L6-v2)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as e:
        print(f"ferrox {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
