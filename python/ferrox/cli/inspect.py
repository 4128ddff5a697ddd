"""``ferrox inspect [PATH]``: the tensors of a safetensors file or Hugging
Face model folder (name, dtype, shape, size), read from the headers only;
for a folder ferrox wrote, also what wrote it (``ferrox_format``, version,
method) and its per-tensor report."""

import json
import os
import sys

from . import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "inspect", run, "list tensors of a safetensors file or HF model folder")
    p.add_argument("path", nargs="?", help="file or folder (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def ferrox_summary(info) -> dict:
    """What ferrox recorded about a checkpoint it wrote: the ``ferrox_*``
    metadata keys of its files and its ``ferrox_report.json``; empty for
    other checkpoints."""
    from .. import output

    meta = {}
    for f in info.files:
        for k, v in info.metadata.get(f, {}).items():
            if k.startswith("ferrox_"):
                meta.setdefault(k, v)
    if output.FORMAT_KEY not in meta:
        return {}
    folder = info.root if os.path.isdir(info.root) else os.path.dirname(info.root)
    return {"metadata": meta, "report": output.read_report(folder)}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _print_summary(summary: dict) -> None:
    from .. import output

    meta = summary["metadata"]
    extra = ", ".join(f"{k[len('ferrox_'):]} {v}" for k, v in sorted(meta.items())
                      if k not in (output.FORMAT_KEY, output.VERSION_KEY))
    print(_common.escape(f"written by ferrox {meta.get(output.VERSION_KEY, '?')}: format {meta[output.FORMAT_KEY]}"
                         + (f", {extra}" if extra else "")))
    report = summary["report"]
    if not report:
        return
    if report.get("summary"):
        print("  " + _common.escape(", ".join(f"{k} {_value(v)}" for k, v in report["summary"].items())))
    tensors = report.get("tensors") or {}
    if tensors:
        fields = list(dict.fromkeys(k for rec in tensors.values() for k in rec))
        width = max(len(_common.escape(n)) for n in tensors)
        print(f"  per tensor ({output.REPORT_FILE}):")
        print(f"    {'tensor':<{width}}  " + "  ".join(f"{f:>10}" for f in fields))
        for name, rec in tensors.items():
            print(f"    {_common.escape(name):<{width}}  " + "  ".join(f"{_value(rec.get(f, '')):>10}" for f in fields))


def run(args) -> int:
    from .. import checkpoint
    from ..models import default_model_path

    path = args.path or default_model_path()
    info = checkpoint.read_checkpoint(path)
    summary = ferrox_summary(info)
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
                "ferrox": summary or None,
            },
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    esc = _common.escape
    sharded = f", sharded by {os.path.basename(info.index)}" if info.index else ""
    print(esc(f"{info.root}: {len(info.tensors)} tensors in {len(info.files)} file(s){sharded}"))
    width = max((len(esc(t.name)) for t in info.tensors), default=4)
    multi = len(info.files) > 1
    for t in info.tensors:
        shape = "x".join(map(str, t.shape)) or "scalar"
        where = f"  {esc(os.path.basename(t.file))}" if multi else ""
        print(f"  {esc(t.name):<{width}}  {t.dtype:<5} {shape:<16} {checkpoint.human_bytes(t.nbytes):>10}{where}")
    dtypes = ", ".join(f"{d}: {n:,}" for d, n in sorted(info.dtype_counts().items()))
    print(f"total: {info.total_params:,} parameters, {checkpoint.human_bytes(info.total_bytes)} ({dtypes})")
    if summary:
        _print_summary(summary)
    return 0
