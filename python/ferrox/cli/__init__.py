"""The ``ferrox`` command line: one module per command, each with
``add_parser(sub)`` and ``run(args)``.

    ferrox --version
    ferrox doctor                    threads, CUDA driver, NVRTC, build
    ferrox inspect [PATH]            tensors of a checkpoint, and a ferrox output's report
    ferrox merge CONFIG OUT          a mergekit-style merge, streamed from disk
    ferrox compress bitdelta ...     a fine-tune as 1-bit deltas of its base
    ferrox extract lora ...          a fine-tune's task vectors as a PEFT LoRA adapter
    ferrox restore D --out M         the dense model back from a compressed folder

Shared pieces (output options, error mapping, escaping) live in
``_common``. Nothing here imports torch: ``--version``, ``--help`` and
``inspect`` never pay for it, and ``merge`` imports it only for what needs it
(CUDA).
"""

import argparse
import sys

from .. import __version__
from . import _common, compress, doctor, extract, inspect, merge, moe, restore

COMMANDS = (doctor, inspect, merge, moe, compress, extract, restore)


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ferrox",
        description="Merge and compress model checkpoints (safetensors files or Hugging Face folders), and "
                    "inspect them.",
        epilog="Exit codes: 0 done, 1 failed (one line on stderr says why; FERROX_DEBUG=1 shows the traceback), "
               "2 bad usage, 130 interrupted.",
    )
    p.add_argument("--version", action="version", version=f"ferrox {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        command.add_parser(sub)
    return p


def main(argv=None, commands=COMMANDS) -> int:
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return _common.EXIT_USAGE
    return _common.run_command(args)
