"""The BitDelta format: a ferrox output folder (``ferrox_format: bitdelta``)
of safetensors files holding, for each compressed matrix ``NAME``,

- ``NAME.bitdelta.signs``: uint8 [rows, ceil(cols/8)], the signs of
  Δ = W_ft − W_base in ``ferrox.pack``'s layout (bit 1 = Δ < 0; Δ = 0 is +1);
- ``NAME.bitdelta.alpha``: float32 [] (one scale per matrix) or [rows];

every other tensor of the fine-tune under its own name, verbatim (its dtype
and bytes). Each file's metadata records

- ``ferrox_bitdelta``: JSON ``{"select": the selection rule, "scale":
  "matrix" | "row", "hash": "xxh3-64", "tensors": {NAME: {"dtype", "shape",
  "kind": "bitdelta" | "verbatim"}} (the fine-tune's tensors, in order),
  "base": {NAME: [dtype, shape, hash or null]}}`` — every base tensor, with
  the content hash of those the deltas were taken against.

``ferrox_report.json`` holds the compression report (bytes against an fp16
delta, α per matrix) that ``ferrox inspect`` shows.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .. import checkpoint as ckpt
from .. import dtypes
from ..output import read_folder

FORMAT = "bitdelta"
META_KEY = "ferrox_bitdelta"
SIGNS = ".bitdelta.signs"
ALPHA = ".bitdelta.alpha"
#: Placeholder of a content hash in a header written before the hashes are known
#: (same length, patched in place once the pass has computed them).
HASH_PLACEHOLDER = "?" * 16


@dataclass
class DeltaEntry:
    """One compressed matrix: where its signs and α live."""
    name: str
    dtype: str  # the fine-tune's dtype (what restore writes)
    shape: Tuple[int, int]
    signs: ckpt.TensorEntry
    alpha: ckpt.TensorEntry


@dataclass
class BitDelta:
    """A BitDelta folder, read from its headers (tensor data is read on use).

    ``entries``: the compressed matrices; ``verbatim``: the fine-tune's other
    tensors; ``base``: what the deltas were taken against (name -> (dtype,
    shape, hash or None)); ``select``/``scale``: how it was made."""

    path: str
    tensors: Dict[str, dict]
    entries: Dict[str, DeltaEntry]
    verbatim: Dict[str, ckpt.TensorEntry]
    base: Dict[str, Tuple[str, Tuple[int, ...], Optional[str]]]
    select: dict
    scale: str
    alphas_override: Dict[str, "object"] = field(default_factory=dict)

    @classmethod
    def load(cls, path) -> "BitDelta":
        path = os.fspath(path)

        def entry(name, rec, by_name):
            signs, alpha = by_name.get(name + SIGNS), by_name.get(name + ALPHA)
            if signs is None or alpha is None:
                raise ValueError(f"{path}: tensor {name!r}: its signs or alpha are missing")
            return DeltaEntry(name, rec["dtype"], tuple(rec["shape"]), signs, alpha)

        meta, entries, verbatim = read_folder(path, FORMAT, META_KEY, "BitDelta", entry)
        base = {n: (v[0], tuple(v[1]), v[2]) for n, v in meta["base"].items()}
        if any(h == HASH_PLACEHOLDER for _, _, h in base.values()):
            raise ValueError(f"{path}: base hashes were never written (an interrupted compress?)")
        return cls(path, meta["tensors"], entries, verbatim, base, meta["select"], meta["scale"])

    # --- reading data ---------------------------------------------------------

    def signs(self, name: str):
        """The packed signs of matrix ``name`` (uint8 [rows, ceil(cols/8)])."""
        return ckpt.TensorReader().read(self.entries[name].signs)

    def alpha(self, name: str):
        """α of matrix ``name``: a float32 tensor [] or [rows] (the trained one
        after ``set_alpha``)."""
        if name in self.alphas_override:
            return self.alphas_override[name]
        return ckpt.TensorReader().read(self.entries[name].alpha)

    def set_alpha(self, name: str, alpha) -> None:
        """Replaces α of matrix ``name`` (in memory; ``save`` writes it): a
        scalar, or one per row."""
        import torch

        rows = self.entries[name].shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().cpu().clone()
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] != rows):
            raise ValueError(f"alpha of {name!r}: expected a scalar or [{rows}], got shape {list(alpha.shape)}")
        if not torch.isfinite(alpha).all():
            raise ValueError(f"alpha of {name!r}: not finite")
        self.alphas_override[name] = alpha

    def save(self, out, *, force: bool = False, fsync: bool = True) -> "BitDelta":
        """Writes this BitDelta (with any α's replaced by ``set_alpha``) to the
        folder ``out`` and returns it loaded from there."""
        import numpy as np

        from ..output import OutputFolder, PlannedTensor

        alphas = {n: self.alpha(n) for n in self.entries}
        scale = "row" if any(a.dim() == 1 for a in alphas.values()) else "matrix"
        planned, report = [], self.report()
        for name, rec in self.tensors.items():
            if name in self.entries:
                e = self.entries[name]
                a = alphas[name]
                if scale == "row" and a.dim() == 0:
                    alphas[name] = a = a.expand(e.shape[0]).clone()
                planned += [PlannedTensor(e.signs.name, "U8", tuple(e.signs.shape), e.signs.nbytes),
                            PlannedTensor(e.alpha.name, "F32", tuple(a.shape), 4 * a.numel())]
            else:
                v = self.verbatim[name]
                planned.append(PlannedTensor(name, v.dtype, tuple(v.shape), v.nbytes))
        meta = {"select": self.select, "scale": scale, "hash": "xxh3-64", "tensors": self.tensors,
                "base": {n: [d, list(s), h] for n, (d, s, h) in self.base.items()}}
        with OutputFolder(out, fmt=FORMAT, inputs=[self.path], force=force, fsync=fsync) as dest:
            w = dest.writer(planned, 5 * 10**9, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})
            for name in self.tensors:
                if name in self.entries:
                    e = self.entries[name]
                    w.copy(e.signs.name, e.signs)
                    w.write(e.alpha.name, np.asarray(alphas[name].numpy(), dtype=np.float32))
                else:
                    w.copy(name, self.verbatim[name])
            dest.copy_side_files(self.path)
            if report:
                per = report.get("tensors", {})
                for n, a in alphas.items():
                    if n in per:
                        per[n]["alpha"] = float(a.mean())
                dest.write_report(report.get("summary", {}), per)
            out_abs = dest.out
        return BitDelta.load(out_abs)

    def verbatim_tensor(self, name: str):
        return ckpt.TensorReader().read(self.verbatim[name])

    # --- checks ---------------------------------------------------------------

    def check_base_tensor(self, name: str, dtype: str, shape, content_hash: Optional[str] = None) -> None:
        """``ValueError`` unless base tensor ``name`` is the one the deltas
        were taken against (dtype, shape and, when given, content hash)."""
        want = self.base.get(name)
        if want is None:
            raise ValueError(f"base tensor {name!r} was not in the base this BitDelta was made against")
        if want[0] != dtype or tuple(want[1]) != tuple(shape):
            raise ValueError(f"base tensor {name!r} is {dtype} {list(shape)}, but the BitDelta was made against "
                             f"{want[0]} {list(want[1])}: another base model")
        if content_hash is not None and want[2] is not None and want[2] != content_hash:
            raise ValueError(f"base tensor {name!r} differs from the one the BitDelta was made against "
                             f"(content hash {content_hash}, expected {want[2]}): another base model")

    def check_base_names(self, names: List[str]) -> None:
        missing = [n for n in self.base if n not in set(names)]
        if missing:
            raise ValueError(f"base tensor {missing[0]!r} is missing from the given base: another base model")

    def report(self) -> dict:
        from ..output import read_report

        return read_report(self.path) or {}


def storage_report(tensors: Dict[str, dict], entries: Dict[str, dict], alphas: Dict[str, float],
                   total_bytes: int) -> Tuple[dict, Dict[str, dict]]:
    """The compression report: bytes of the selected matrices' deltas vs an
    fp16 delta of them, and of the whole folder vs the fp16 model."""
    delta_bytes = sum(e["signs_bytes"] + e["alpha_bytes"] for e in entries.values())
    fp16_delta = sum(2 * dtypes.numel(e["shape"]) for e in entries.values())
    fp16_model = sum(2 * dtypes.numel(t["shape"]) for t in tensors.values())
    summary = {
        "compressed_matrices": len(entries),
        "verbatim_tensors": len(tensors) - len(entries),
        "delta_bytes": delta_bytes,
        "fp16_delta_bytes": fp16_delta,
        "ratio_vs_fp16_delta": round(fp16_delta / delta_bytes, 4) if delta_bytes else None,
        "folder_tensor_bytes": total_bytes,
        "fp16_model_bytes": fp16_model,
        "ratio_vs_fp16_model": round(fp16_model / total_bytes, 4) if total_bytes else None,
    }
    per = {n: {"alpha": float(alphas[n]), "bits_per_weight": round(8 * (e["signs_bytes"] + e["alpha_bytes"])
                                                                 / dtypes.numel(e["shape"]), 4)}
           for n, e in entries.items()}
    return summary, per
