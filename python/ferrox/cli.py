"""The ``ferrox`` command line: ``ferrox --version``, ``ferrox doctor``,
``ferrox inspect PATH``, ``ferrox merge CONFIG OUT``."""

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


def parse_count(text: str) -> int:
    """mergekit's element counts: 500M, 1B, 5B, or a plain integer."""
    text = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 500M or 5B, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return value


def _cmd_merge(args) -> int:
    from .merge import load_config, merge_checkpoints

    out = args.out or args.out_positional
    if not out:
        raise ValueError("give the output folder: ferrox merge CONFIG OUT (or --out OUT)")
    if args.out and args.out_positional and args.out != args.out_positional:
        raise ValueError(f"two output folders given: {args.out_positional} and --out {args.out}")
    device = "cuda" if args.cuda else args.device
    cfg = load_config(args.config)
    if args.random_seed is not None:
        cfg.seed = args.random_seed
    report = merge_checkpoints(cfg, out, force=args.force, max_shard_elements=args.out_shard_size,
                               allow_nonfinite=args.allow_nonfinite, progress=False if args.no_progress else None,
                               device=device, fsync=not args.no_fsync)
    print(f"merged {report.merged} tensors ({report.copied} copied) with {cfg.method.name} into {report.out}: "
          f"{checkpoint.human_bytes(report.bytes_written)} in {report.seconds:.1f} s")
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
    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config")
    m.add_argument("config", help="YAML config (mergekit's keys, plus keep_frac/outlier_frac/granularity/seed)")
    m.add_argument("out_positional", nargs="?", metavar="OUT", help="output folder (or --out)")
    m.add_argument("--out", help="output folder")
    m.add_argument("--force", action="store_true", help="replace an existing output folder")
    m.add_argument("--device", default="cpu", help="where to merge: cpu (default, streamed from disk) or cuda[:N]")
    m.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's flag)")
    m.add_argument("--random-seed", type=int, help="seed for DARE masks (overrides the config's seed)")
    m.add_argument("--out-shard-size", type=parse_count, default=parse_count("5B"),
                   help="elements per output shard, mergekit's units (default 5B)")
    m.add_argument("--allow-crimes", action="store_true", help="accepted for mergekit compatibility (no effect)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge NaN/Inf inputs instead of refusing them")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--no-fsync", action="store_true",
                   help="don't wait for the output to reach the disk before renaming it into place (faster; "
                        "a power loss or OS crash may then leave incomplete files)")
    m.set_defaults(func=_cmd_merge)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"ferrox {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError) as e:
        print(f"ferrox {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
