"""What every command shares: output options, the mapping from exceptions
to a one-line message and an exit code, and printing that escapes control
characters (tensor names and paths come from files)."""

import argparse
import os
import sys

from .._core import CudaError, InternalError

#: Exit codes: 0 done, 1 failed (a one-line message says why), 2 usage error
#: (argparse), 130 interrupted (SIGINT, SIGTERM or SIGHUP).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_MAPPED = (ValueError, TypeError, OSError, CudaError, InternalError, MemoryError)


def escape(text) -> str:
    """``text`` with control and other non-printable characters written as
    escapes, so a tensor name cannot move the cursor or recolour the
    terminal."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}"))
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return "".join(out)


def add_command(sub, name: str, run, help: str, description: str = None, full_name: str = None):
    """A command's parser, wired to ``run(args) -> exit code``."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(run=run, command_name=full_name or name)
    return p


def add_group(sub, name: str, help: str, children):
    """A command with subcommands (``ferrox compress bitdelta ...``): each
    child module's ``add_parser(sub, parent=name)`` adds one."""
    p = sub.add_parser(name, help=help, description=help)
    inner = p.add_subparsers(dest=f"{name}_command", metavar="METHOD")
    for child in children:
        child.add_parser(inner, parent=name)

    def run_group(args):
        p.print_help(sys.stderr)
        return EXIT_USAGE

    p.set_defaults(run=run_group, command_name=name)
    return p


def add_output_options(p, *, device: bool = True, positional: bool = True) -> None:
    """The options of every command that writes a model folder."""
    if positional:
        p.add_argument("out_positional", nargs="?", metavar="OUT", help="output folder (or --out)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (never an input: outputs that overlap an input are refused)")
    p.add_argument("--no-fsync", action="store_true",
                   help="don't wait for the output to reach the disk before renaming it into place (faster; "
                        "a power loss or OS crash may then leave incomplete files)")
    if device:
        p.add_argument("--device", default="cpu", help="where to compute: cpu (default, streamed from disk) or cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def output_path(args) -> str:
    """OUT, given as the positional argument or ``--out`` (not two different ones)."""
    pos, opt = getattr(args, "out_positional", None), args.out
    if pos and opt and os.path.abspath(pos) != os.path.abspath(opt):
        raise ValueError(f"two output folders given: {pos} and --out {opt}")
    out = opt or pos
    if not out:
        raise ValueError(f"give the output folder: ferrox {args.command_name} ... OUT (or --out OUT)")
    return out


def progress(args):
    """tqdm's ``disable``-style setting: False (off), or None (on when stderr is a terminal)."""
    return False if (args.no_progress or args.quiet) else None


def say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(escape(message))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not (e.args and isinstance(e.args[0], str)):
        where = e.filename if e.filename is not None else ""
        return f"{e.strerror}: {where}" if where != "" else e.strerror
    text = str(e)
    if isinstance(e, KeyError) or not text:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


def _is_torch_oom(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(e, oom)


def run_command(args) -> int:
    """Runs ``args.run(args)`` and turns what users can cause into a
    one-line message on stderr and an exit code; ``FERROX_DEBUG=1`` lets the
    traceback through instead."""
    name = args.command_name
    debug = os.environ.get("FERROX_DEBUG") == "1"
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        why = str(e) if str(e) else "SIGINT"
        state = getattr(e, "output_state", None)
        print(escape(f"ferrox {name}: interrupted ({why})" + (f"; {state}" if state else "")), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: B902 - narrowed just below
        if debug or not (isinstance(e, _MAPPED) or _is_torch_oom(e)):
            raise
        state = getattr(e, "output_state", None)
        msg = " ".join(_describe(e).split())
        if state and state not in msg:
            msg += f" ({state})"
        print(escape(f"ferrox {name}: error: {msg}"), file=sys.stderr)
        return EXIT_FAILED


def count(text: str) -> int:
    """mergekit's counts: 500M, 1B, 5B, or a plain integer (an argparse type)."""
    text = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = float(digits) * scale
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError
        value = int(value)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a count like 500M or 5B, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return value
