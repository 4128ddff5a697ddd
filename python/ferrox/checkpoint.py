"""Checkpoints on disk: a safetensors file, or a Hugging Face model folder
(single file or sharded with ``model.safetensors.index.json``). Headers are
parsed and bounds-checked in Rust without reading tensor data."""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import _core


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    file: str
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointInfo:
    root: str
    index: Optional[str]
    files: List[str]
    tensors: List[TensorEntry]
    metadata: Dict[str, Dict[str, str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def dtype_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return counts


def read_checkpoint(path) -> CheckpointInfo:
    """Lists the tensors of a checkpoint. Raises ``FileNotFoundError``/
    ``OSError`` for missing files and ``ValueError`` naming the file and
    tensor for a corrupt or inconsistent one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    raw = _core.read_checkpoint(path)
    tensors = [
        TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), str(t["file"]), int(t["nbytes"]))
        for t in raw["tensors"]
    ]
    files = [str(f["path"]) for f in raw["files"]]
    meta = {str(f["path"]): dict(f["metadata"]) for f in raw["files"]}
    index = str(raw["index"]) if raw["index"] is not None else None
    return CheckpointInfo(str(raw["root"]), index, files, tensors, meta)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
