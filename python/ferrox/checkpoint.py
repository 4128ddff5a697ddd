"""Checkpoints on disk: a safetensors file, or a Hugging Face model folder
(single file or sharded with ``model.safetensors.index.json``). Headers are
parsed and bounds-checked in Rust without reading tensor data."""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import _core, dtypes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    file: str
    nbytes: int
    #: absolute offset of the tensor's first byte in ``file``
    data_start: int = 0

    @property
    def numel(self) -> int:
        return dtypes.numel(self.shape)


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
        TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), str(t["file"]), int(t["nbytes"]), int(t["data_start"]))
        for t in raw["tensors"]
    ]
    files = [str(f["path"]) for f in raw["files"]]
    meta = {str(f["path"]): dict(f["metadata"]) for f in raw["files"]}
    index = str(raw["index"]) if raw["index"] is not None else None
    return CheckpointInfo(str(raw["root"]), index, files, tensors, meta)


class TensorReader:
    """Reads tensor bytes with positioned reads (the Rust core's reader) into
    fresh buffers.

    Unlike a memory map, nothing stays resident after a tensor is dropped:
    mapped pages that were touched count in RSS until unmapped, which would
    make a merge's memory grow with the size of every input."""

    def read_into(self, entry: TensorEntry, buffer, at: int = 0) -> None:
        """Fills the writable ``buffer`` with the bytes of ``entry`` starting
        ``at`` bytes into the tensor."""
        n = memoryview(buffer).nbytes
        if at < 0 or at + n > entry.nbytes:
            raise ValueError(f"{entry.file}: tensor {entry.name!r}: {n} bytes at {at} overrun its {entry.nbytes} bytes")
        _core.read_tensor_into(entry.file, entry.data_start + at, buffer, entry.name)

    def read_bytes(self, entry: TensorEntry) -> bytearray:
        buf = bytearray(entry.nbytes)
        self.read_into(entry, buf)
        return buf

    def read(self, entry: TensorEntry):
        """The tensor as a torch tensor (imports torch)."""
        import torch

        dt = dtypes.get(entry.dtype)
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtypes.to_torch(dt.name))
        return torch.frombuffer(self.read_bytes(entry), dtype=dtypes.to_torch(dt.name)).reshape(entry.shape)

    def close(self):
        pass  # the Rust reader opens and closes the file per read


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
