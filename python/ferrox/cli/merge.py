"""``ferrox merge CONFIG OUT``: runs a mergekit-style YAML merge config,
streaming every tensor from the input files to the output, through the Rust
core for generalized task arithmetic (torch is imported only for
``--device cuda``) and one tensor at a time in torch for the other methods."""

import argparse

from . import _common

_KMB = {"k": 10**3, "m": 10**6, "b": 10**9}


def shard_size(text: str) -> int:
    """--out-shard-size in bytes, parsed as mergekit parses it: an integer,
    optionally with a k/m/b suffix (powers of 1000); 0 means one shard."""
    text = str(text)
    digits, scale = (text[:-1], _KMB[text[-1].lower()]) if text[-1:].lower() in _KMB else (text, 1)
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a count of bytes like 500M or 5B (an integer, optional "
                                         f"k/m/b, as mergekit reads it), got {text!r}")
    return int(digits) * scale



def add_parser(sub, parent=None):
    p = _common.add_command(sub, "merge", run, "merge checkpoints from a mergekit-style YAML config")
    from ..merge.methods import METHODS  # the registry (no torch import)

    p.add_argument("config", help="YAML config (mergekit's keys, plus keep_frac/outlier_frac/granularity/seed); "
                                  f"merge_method: {', '.join(sorted(METHODS))}")
    _common.add_output_options(p)
    p.add_argument("--cuda", action="store_true", help="same as --device cuda (mergekit's flag)")
    p.add_argument("--random-seed", type=int, help="seed for DARE and DELLA masks (overrides the config's seed)")
    p.add_argument("--out-shard-size", type=shard_size, default=shard_size("5B"),
                   help="bytes per output shard, as mergekit counts them (default 5B = 5*10^9 bytes; "
                        "a larger tensor gets a shard of its own; 0: one shard)")
    p.add_argument("--allow-crimes", action="store_true", help="accepted for mergekit compatibility (no effect)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="merge NaN/Inf inputs instead of refusing them (methods that rank |delta|, ties and "
                        "breadcrumbs, still refuse a NaN delta: it has no rank)")
    return p


def run(args) -> int:
    from .. import checkpoint
    from ..merge.checkpoints import merge_checkpoints
    from ..merge.config import _seed, load_config

    out = _common.output_path(args)
    device = "cuda" if args.cuda else args.device
    cfg = load_config(args.config)
    if args.random_seed is not None:
        cfg.seed = _seed("--random-seed", args.random_seed)
    report = merge_checkpoints(cfg, out, force=args.force, max_shard_bytes=args.out_shard_size,
                               allow_nonfinite=args.allow_nonfinite, progress=_common.progress(args),
                               device=device, fsync=not args.no_fsync)
    _common.say(args, f"merged {report.merged} tensors ({report.copied} copied) with {cfg.method.name} into "
                      f"{report.out}: {checkpoint.human_bytes(report.bytes_written)} in {report.seconds:.1f} s")
    return 0
