"""``ferrox restore D --out M``: a model back from a ferrox compressed
folder, dispatched on the folder's ``ferrox_format`` (``bitdelta`` needs
``--base``, the model the delta was taken against; ``codebook`` takes none)."""

from . import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "restore", run, "write the dense model back from a ferrox compressed folder")
    p.add_argument("folder", help="a folder written by ferrox compress")
    p.add_argument("--base", help="the base model (required for bitdelta)")
    _common.add_output_options(p, device=False, positional=False)
    return p


def run(args) -> int:
    from .. import checkpoint, output

    out = _common.output_path(args)
    info = checkpoint.read_checkpoint(args.folder)
    formats = {info.metadata.get(f, {}).get(output.FORMAT_KEY) for f in info.files}
    fmt = formats.pop() if len(formats) == 1 else None
    if fmt == "bitdelta":
        if not args.base:
            raise ValueError(f"{args.folder} is a BitDelta: give the model it was made against with --base BASE")
        from ..delta import restore

        path = restore(args.base, args.folder, out, force=args.force, fsync=not args.no_fsync,
                       progress=_common.progress(args))
        _common.say(args, f"restored {args.folder} onto {args.base} into {path}")
        return 0
    if fmt == "codebook":
        if args.base:
            raise ValueError(f"{args.folder} is a codebook folder: it restores on its own; drop --base")
        from ..codebook.compress import restore as restore_codebook

        path = restore_codebook(args.folder, out, force=args.force, fsync=not args.no_fsync,
                                progress=_common.progress(args))
        _common.say(args, f"restored {args.folder} into {path}")
        return 0
    what = f"format {fmt!r}" if fmt else "no ferrox_format"
    raise ValueError(f"{args.folder}: {what}; ferrox restore reads folders written by 'ferrox compress' (bitdelta, codebook)")
