"""The codebook representation of a quantized 2-D weight and its folder.

In memory a quantized W [out, in] (original dtype f32/f16/bf16) is a
``CodebookTensor``:

- ``codes``: uint8 [out, packed_row_bytes(in // d, bits)], the codes of the
  PERMUTED rows, row by row in ``ferrox.pack``'s layout;
- ``codebooks``: float32 [G, 2^bits, d] (scalar codebooks, d = 1, sorted
  ascending per group);
- ``group_offsets``: int32 [G+1]: permuted rows offsets[g]..offsets[g+1]
  use codebook g;
- ``perm``: int32 [out] or None: permuted row r is original row perm[r];
- ``row_scale``: float32 [out] or None (permuted order; multiplies decoded
  values);
- ``error``: ‖W − Ŵ‖_F / ‖W‖_F measured when it was made.

Decode: Ŵ_perm[r, c·d:(c+1)·d] = row_scale[r] · codebooks[g(r), code[r, c]],
Ŵ[perm[r]] = Ŵ_perm[r].

On disk (a ferrox output folder, ``ferrox_format: codebook``), matrix ``NAME``
is stored as

- ``NAME.codebook.codes``: uint8, as above;
- ``NAME.codebook.codebooks``: float32 [G, 2^bits] for d = 1, else [G, 2^bits, d];
- ``NAME.codebook.offsets``: int32 [G+1] (only when G > 1);
- ``NAME.codebook.perm``: int16 when out <= 32767 else int32 [out] (only when
  a permutation is not the identity);
- ``NAME.codebook.scale``: float32 [out] (only with row scales);

every other tensor under its own name, verbatim. Each file's metadata holds
``ferrox_codebook``: JSON ``{"select": ..., "tensors": {NAME: {"dtype",
"shape", "kind": "codebook" | "verbatim", and for codebook entries "bits",
"vector_dim", "groups", "error", "grouping"; a selected matrix kept verbatim
because vector_dim does not divide its columns has a "reason"}}}`` in the
model's tensor order.
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .. import checkpoint as ckpt
from .. import dtypes
from ..output import read_folder

FORMAT = "codebook"
META_KEY = "ferrox_codebook"
CODES, CODEBOOKS, OFFSETS, PERM, SCALE = (".codebook.codes", ".codebook.codebooks", ".codebook.offsets",
                                          ".codebook.perm", ".codebook.scale")
SUFFIXES = (CODES, CODEBOOKS, OFFSETS, PERM, SCALE)
BITS = (2, 3, 4, 8)


@dataclass
class CodebookTensor:
    """One quantized 2-D weight (see the module docstring for the fields)."""

    shape: Tuple[int, int]
    dtype: "object"  # torch dtype of the original weight
    bits: int
    vector_dim: int
    codes: "object"
    codebooks: "object"
    group_offsets: "object"
    perm: Optional["object"] = None
    row_scale: Optional["object"] = None
    error: float = float("nan")

    @property
    def groups(self) -> int:
        return int(self.group_offsets.numel()) - 1

    def stored(self) -> Dict[str, "object"]:
        """The tensors written to disk for this weight, by suffix (the
        permutation as int16 when it fits)."""
        import torch

        out = {CODES: self.codes.contiguous(),
               CODEBOOKS: (self.codebooks[..., 0] if self.vector_dim == 1 else self.codebooks).float().contiguous()}
        if self.groups > 1:
            out[OFFSETS] = self.group_offsets.to(torch.int32).contiguous()
        if self.perm is not None:
            out[PERM] = self.perm.to(perm_dtype(self.shape[0])).contiguous()
        if self.row_scale is not None:
            out[SCALE] = self.row_scale.float().contiguous()
        return out

    def nbytes(self) -> int:
        """Bytes this weight takes on disk (codes, codebooks, offsets,
        permutation, scales)."""
        return sum(t.numel() * t.element_size() for t in self.stored().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])

    def record(self) -> dict:
        return {"dtype": dtypes.from_torch(self.dtype), "shape": list(self.shape), "kind": "codebook",
                "bits": self.bits, "vector_dim": self.vector_dim, "groups": self.groups, "error": float(self.error)}


def perm_dtype(rows: int):
    import torch

    return torch.int16 if rows <= 32767 else torch.int32


def planned_shapes(rows: int, cols: int, bits: int, d: int, groups: int, permuted: bool, scaled: bool):
    """(suffix, safetensors dtype, shape) of each stored tensor of a weight,
    known before it is quantized (what the streaming writer plans)."""
    from .. import _core

    out = [(CODES, "U8", (rows, _core.packed_row_bytes(cols // d, bits))),
           (CODEBOOKS, "F32", (groups, 1 << bits) if d == 1 else (groups, 1 << bits, d))]
    if groups > 1:
        out.append((OFFSETS, "I32", (groups + 1,)))
    if permuted:
        out.append((PERM, "I16" if rows <= 32767 else "I32", (rows,)))
    if scaled:
        out.append((SCALE, "F32", (rows,)))
    return out


def from_stored(rec: dict, parts: Dict[str, "object"]) -> CodebookTensor:
    """A ``CodebookTensor`` from its metadata record and stored tensors."""
    import torch

    shape = tuple(rec["shape"])
    d = int(rec["vector_dim"])
    cb = parts[CODEBOOKS].float()
    if d == 1:
        cb = cb.unsqueeze(-1)
    offsets = parts.get(OFFSETS)
    if offsets is None:
        offsets = torch.tensor([0, shape[0]], dtype=torch.int32)
    perm = parts.get(PERM)
    return CodebookTensor(shape, dtypes.to_torch(rec["dtype"]), int(rec["bits"]), d, parts[CODES], cb,
                          offsets.to(torch.int32), None if perm is None else perm.to(torch.int32),
                          parts.get(SCALE), float(rec.get("error", float("nan"))))


@dataclass
class CodebookFolder:
    """A codebook folder read from its headers (tensor data read on use)."""

    path: str
    meta: dict
    entries: Dict[str, Dict[str, ckpt.TensorEntry]]  # NAME -> suffix -> stored tensor
    verbatim: Dict[str, ckpt.TensorEntry]

    @property
    def tensors(self) -> Dict[str, dict]:
        return self.meta["tensors"]

    @classmethod
    def open(cls, path) -> "CodebookFolder":
        path = os.fspath(path)

        def parts(name, rec, by_name):
            found = {s: by_name[name + s] for s in SUFFIXES if name + s in by_name}
            if CODES not in found or CODEBOOKS not in found:
                raise ValueError(f"{path}: tensor {name!r}: its codes or codebooks are missing")
            if not isinstance(rec.get("error"), (int, float)):
                raise ValueError(f"{path}: tensor {name!r}: no reconstruction error recorded "
                                 f"(an interrupted compress?)")
            return found

        meta, entries, verbatim = read_folder(path, FORMAT, META_KEY, "codebook", parts)
        return cls(path, meta, entries, verbatim)

    def codebook_tensor(self, name: str, reader: Optional[ckpt.TensorReader] = None) -> CodebookTensor:
        reader = reader or ckpt.TensorReader()
        parts = {s: reader.read(e) for s, e in self.entries[name].items()}
        return from_stored(self.tensors[name], parts)

    def stored_bytes(self, name: str) -> int:
        return sum(e.nbytes for e in self.entries[name].values())


def load(folder) -> Tuple[Dict[str, CodebookTensor], Dict[str, "object"]]:
    """(name -> CodebookTensor, name -> passthrough tensor) of a codebook
    folder, in the model's tensor order."""
    f = CodebookFolder.open(folder)
    reader = ckpt.TensorReader()
    quantized, passthrough = {}, {}
    for name in f.tensors:
        if name in f.entries:
            quantized[name] = f.codebook_tensor(name, reader)
        else:
            passthrough[name] = reader.read(f.verbatim[name])
    return quantized, passthrough


def save(out, quantized: Dict[str, CodebookTensor], passthrough: Dict[str, "object"], *, order=None,
         select: Optional[dict] = None, force: bool = False, fsync: bool = True, inputs=(),
         max_shard_bytes: int = 5 * 10**9) -> str:
    """Writes a codebook folder (atomically, through the shared writer) and
    returns its path. ``order``: the tensor names in model order (default:
    quantized then passthrough)."""
    from ..output import OutputFolder, PlannedTensor

    order = list(order) if order is not None else [*quantized, *passthrough]
    missing = [n for n in order if n not in quantized and n not in passthrough]
    if missing:
        raise ValueError(f"order: tensor {missing[0]!r} is neither quantized nor passed through")
    records, planned, per = {}, [], {}
    for name in order:
        if name in quantized:
            q = quantized[name]
            records[name] = q.record()
            for s, t in q.stored().items():
                planned.append(PlannedTensor(name + s, dtypes.from_torch(t.dtype), tuple(t.shape),
                                             t.numel() * t.element_size()))
            per[name] = {"bits": q.bits, "groups": q.groups, "bits_per_weight": round(q.bits_per_weight(), 4),
                         "rel_error": float(q.error)}
        else:
            t = passthrough[name]
            records[name] = {"dtype": dtypes.from_torch(t.dtype), "shape": list(t.shape), "kind": "verbatim"}
            planned.append(PlannedTensor(name, dtypes.from_torch(t.dtype), tuple(t.shape), t.numel() * t.element_size()))
    meta = {"select": select or {}, "tensors": records}
    with OutputFolder(out, fmt=FORMAT, inputs=list(inputs), force=force, fsync=fsync) as dest:
        w = dest.writer(planned, max_shard_bytes, metadata={META_KEY: json.dumps(meta, separators=(",", ":"))})
        for name in order:
            if name in quantized:
                for s, t in quantized[name].stored().items():
                    w.write(name + s, t)
            else:
                w.write(name, passthrough[name].detach().cpu().contiguous())
        dest.write_report(summary(records, {n: quantized[n].nbytes() for n in quantized},
                                  sum(p.nbytes for p in planned)), per)
        path = dest.out
    return path


def summary(records: Dict[str, dict], quant_bytes: Dict[str, int], total_bytes: int) -> dict:
    """The folder report: bits per quantized weight with every overhead
    (codebooks, offsets, permutations, scales), and the folder's size."""
    qn = sum(dtypes.numel(records[n]["shape"]) for n in quant_bytes)
    qb = sum(quant_bytes.values())
    orig = sum(dtypes.numel(r["shape"]) * dtypes.itemsize(r["dtype"]) for r in records.values())
    return {
        "quantized_matrices": len(quant_bytes),
        "verbatim_tensors": len(records) - len(quant_bytes),
        "quantized_weights": qn,
        "quantized_bytes": qb,
        "bits_per_quantized_weight": round(8 * qb / qn, 4) if qn else None,
        "folder_tensor_bytes": total_bytes,
        "original_tensor_bytes": orig,
        "ratio_vs_original": round(orig / total_bytes, 4) if total_bytes else None,
    }
