"""``compress``: a fine-tune against its base into a BitDelta folder, in one
streaming pass of the Rust core over both checkpoints (chunked positioned
reads: memory is a chunk per input, whatever the model's size).

``restore``: the fine-tune back from its base and a BitDelta, every tensor in
the fine-tune's dtype: compressed matrices as base + α·sign, computed in
f64 and rounded once; the rest bit for bit."""

import json
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Optional

from .. import _core, dtypes
from .. import checkpoint as ckpt
from ..output import OutputFolder, PlannedTensor
from . import format as fmt
from .select import Selection


@dataclass
class CompressReport:
    out: str
    compressed: int
    verbatim: int
    bytes_written: int
    seconds: float
    summary: dict


def _as_checkpoint(x, what: str, keep: list) -> str:
    """A path for a checkpoint given as a path or a state dict (saved to a
    temporary file that lives as long as ``keep``)."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    if isinstance(x, dict):
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix=f"ferrox-{what}-")
        path = os.path.join(tmp, "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in x.items()}, path)
        keep.append(tmp)
        return path
    raise TypeError(f"{what}: expected a checkpoint path or a state dict, got {type(x).__name__}")


def _plan(bi: ckpt.CheckpointInfo, fi: ckpt.CheckpointInfo, sel: Selection, per_row: bool):
    base_by_name = {t.name: t for t in bi.tensors}
    planned, jobs, records = [], [], {}
    for t in fi.tensors:
        b = base_by_name.get(t.name)
        if sel(t.name, t.dtype, t.shape) and b is not None and tuple(b.shape) == tuple(t.shape):
            if b.dtype != t.dtype:
                raise ValueError(f"tensor {t.name!r}: the base is {b.dtype} and the fine-tune {t.dtype}; BitDelta "
                                 f"takes deltas of tensors of one dtype (convert one checkpoint)")
            rows, cols = t.shape
            rb = _core.packed_row_bytes(cols, 1)
            signs = PlannedTensor(t.name + fmt.SIGNS, "U8", (rows, rb), rows * rb)
            alpha = PlannedTensor(t.name + fmt.ALPHA, "F32", (rows,) if per_row else (), 4 * (rows if per_row else 1))
            planned += [signs, alpha]
            jobs.append(("bitdelta", t, b, signs, alpha))
            records[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "kind": "bitdelta"}
        else:
            planned.append(PlannedTensor(t.name, t.dtype, tuple(t.shape), t.nbytes))
            jobs.append(("verbatim", t))
            records[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "kind": "verbatim"}
    return planned, jobs, records


def compress(base, finetuned, select=None, out=None, *, per_row: bool = False, force: bool = False,
             fsync: bool = True, progress: Optional[bool] = None, chunk_len: int = 0,
             max_shard_bytes: int = 5 * 10**9) -> fmt.BitDelta:
    """Compresses ``finetuned`` against ``base`` (checkpoint files/folders or
    state dicts) and returns the BitDelta, written to the folder ``out``
    (a temporary folder when ``out`` is None, removed with the object).

    ``select``: glob patterns choosing the compressed matrices (``GLOB``
    includes, ``!GLOB`` excludes); by default every 2-D float tensor except
    ``*embed*``, ``*lm_head*``, ``*norm*``, ``*pooler*``. A selected tensor
    whose shape differs from the base's (added tokens) is stored whole, as
    are all others. ``per_row``: one α per output row instead of per matrix.
    """
    import numpy as np
    from tqdm import tqdm

    start = time.perf_counter()
    keep: list = []
    base_path = _as_checkpoint(base, "base", keep)
    ft_path = _as_checkpoint(finetuned, "finetuned", keep)
    sel = Selection.from_patterns(select)
    bi, fi = ckpt.read_checkpoint(base_path), ckpt.read_checkpoint(ft_path)
    planned, jobs, records = _plan(bi, fi, sel, per_row)
    compressed = {j[1].name for j in jobs if j[0] == "bitdelta"}
    base_meta = {t.name: [t.dtype, list(t.shape), fmt.HASH_PLACEHOLDER if t.name in compressed else None]
                 for t in bi.tensors}

    def meta_json():
        return json.dumps({"select": sel.to_json(), "scale": "row" if per_row else "matrix", "hash": "xxh3-64",
                           "tensors": records, "base": base_meta}, separators=(",", ":"))

    temp_out = out is None
    if temp_out:
        out = os.path.join(tempfile.mkdtemp(prefix="ferrox-bitdelta-"), "delta")
    total = sum(p.nbytes for p in planned)
    entries, alphas = {}, {}
    with OutputFolder(out, fmt=fmt.FORMAT, inputs=[base_path, ft_path], force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={fmt.META_KEY: meta_json()})
        read = sum(t.nbytes for t in fi.tensors) + sum(j[2].nbytes for j in jobs if j[0] == "bitdelta")
        with tqdm(total=read, desc="ferrox compress bitdelta", unit="B", unit_scale=True,
                  disable=None if progress is None else not progress) as bar:
            for job in jobs:
                if job[0] == "verbatim":
                    writer.copy(job[1].name, job[1])
                    bar.update(job[1].nbytes)
                    continue
                _, t, b, signs, alpha = job
                path, offset, _ = writer.where[signs.name]
                try:
                    a, row_alphas, h = _core.delta_compress_files(
                        (b.file, b.data_start, b.dtype), (t.file, t.data_start, t.dtype), t.numel, t.shape[-1],
                        (path, offset), per_row, chunk_len)
                except ValueError as e:
                    raise ValueError(f"tensor {t.name!r}: {e}") from None
                writer.write(alpha.name, np.asarray(row_alphas if per_row else a, dtype=np.float32))
                base_meta[t.name][2] = h
                alphas[t.name] = a
                entries[t.name] = {"shape": list(t.shape), "signs_bytes": signs.nbytes, "alpha_bytes": alpha.nbytes}
                bar.update(t.nbytes + b.nbytes)
        writer.patch_metadata(fmt.META_KEY, meta_json())
        dest.copy_side_files(ft_path if os.path.isdir(ft_path) else None)
        summary, per = fmt.storage_report(records, entries, alphas, total)
        dest.write_report(summary, per)
        dest.model_card("BitDelta of a fine-tune (ferrox)", [
            f"Base: `{base_path}`", "", f"Fine-tune: `{ft_path}`", "",
            f"{summary['compressed_matrices']} matrices as 1-bit signs + {'per-row' if per_row else 'one'} "
            f"scale ({summary['ratio_vs_fp16_delta']}x smaller than their fp16 delta); "
            f"{summary['verbatim_tensors']} tensors stored verbatim. Restore with "
            f"`ferrox restore {os.path.basename(out)} --base BASE --out OUT`."])
        out_abs = dest.out
    for tmp in keep:
        shutil.rmtree(tmp, ignore_errors=True)
    delta = fmt.BitDelta.load(out_abs)
    delta.compress_report = CompressReport(out_abs, len(entries), len(jobs) - len(entries), total,
                                           time.perf_counter() - start, summary)
    if temp_out:
        weakref.finalize(delta, shutil.rmtree, os.path.dirname(out_abs), True)
    return delta


def restore(base, delta, out=None, *, force: bool = False, fsync: bool = True,
            progress: Optional[bool] = None, max_shard_bytes: int = 5 * 10**9):
    """The fine-tune from ``base`` (a checkpoint path or state dict) and
    ``delta`` (a BitDelta or its folder): written to the folder ``out``, or
    returned as a state dict when ``out`` is None. A base other than the one
    the delta was made against is refused (``ValueError`` naming the first
    tensor that differs) before anything is written to ``out``."""
    import torch
    from tqdm import tqdm

    d = delta if isinstance(delta, fmt.BitDelta) else fmt.BitDelta.load(delta)
    keep: list = []
    base_path = _as_checkpoint(base, "base", keep)
    try:
        bi = ckpt.read_checkpoint(base_path)
        by_name = {t.name: t for t in bi.tensors}
        d.check_base_names(list(by_name))
        for name in d.base:
            t = by_name[name]
            d.check_base_tensor(name, t.dtype, t.shape)
        reader = ckpt.TensorReader()

        def restored(name: str):
            e = d.entries[name]
            b = by_name[name]
            w = reader.read(b)
            d.check_base_tensor(name, b.dtype, b.shape, _core.delta_content_hash(w))
            result = torch.empty(e.shape, dtype=dtypes.to_torch(e.dtype))
            _core.delta_restore(w, d.signs(name), _alpha_arg(d.alpha(name)), result)
            return result

        names = list(d.tensors)
        if out is None:
            state = {}
            for name in names:
                state[name] = restored(name) if name in d.entries else d.verbatim_tensor(name)
            return state
        planned = [PlannedTensor(n, r["dtype"], tuple(r["shape"]), dtypes.numel(r["shape"]) * dtypes.itemsize(r["dtype"]))
                   for n, r in d.tensors.items()]
        with OutputFolder(out, fmt="restore", inputs=[base_path, d.path], force=force, fsync=fsync) as dest:
            writer = dest.writer(planned, max_shard_bytes, metadata={"ferrox_restored_from": "bitdelta"})
            with tqdm(total=sum(p.nbytes for p in planned), desc="ferrox restore", unit="B", unit_scale=True,
                      disable=None if progress is None else not progress) as bar:
                for p in planned:
                    if p.name in d.entries:
                        writer.write(p.name, restored(p.name))
                    else:
                        writer.copy(p.name, d.verbatim[p.name])
                    bar.update(p.nbytes)
            dest.copy_side_files(d.path)  # the fine-tune's config/tokenizer, kept by compress
            return dest.out
    finally:
        for tmp in keep:  # a state-dict base saved for the reader
            shutil.rmtree(tmp, ignore_errors=True)


def _alpha_arg(alpha):
    """A scalar α as a float, a per-row α as its float32 tensor."""
    return float(alpha) if alpha.dim() == 0 else alpha.float().contiguous()
