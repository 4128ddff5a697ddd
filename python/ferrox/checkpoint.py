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
    #: absolute offset of the tensor's first byte in ``file``
    data_start: int = 0

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
        TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), str(t["file"]), int(t["nbytes"]), int(t["data_start"]))
        for t in raw["tensors"]
    ]
    files = [str(f["path"]) for f in raw["files"]]
    meta = {str(f["path"]): dict(f["metadata"]) for f in raw["files"]}
    index = str(raw["index"]) if raw["index"] is not None else None
    return CheckpointInfo(str(raw["root"]), index, files, tensors, meta)


TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                     "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorReader:
    """Reads whole tensors with positioned reads into fresh buffers.

    Unlike a memory map, nothing stays resident after a tensor is dropped:
    mapped pages that were touched count in RSS until unmapped, which would
    make a merge's memory grow with the size of every input."""

    def __init__(self):
        self._fds = {}

    def read(self, entry: TensorEntry):
        import torch

        name = TORCH_DTYPE_NAMES.get(entry.dtype)
        if name is None:
            raise ValueError(f"{entry.file}: tensor {entry.name!r} has dtype {entry.dtype}, which torch cannot hold")
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        buf = bytearray(entry.nbytes)
        view, done = memoryview(buf), 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.data_start + done)
            if n == 0:
                raise ValueError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
            done += n
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=getattr(torch, name))
        return torch.frombuffer(buf, dtype=getattr(torch, name)).reshape(entry.shape)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- writing ---------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL",
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors spelling
    shape: tuple
    nbytes: int


class ShardedWriter:
    """Writes a sharded safetensors checkpoint whose headers are computed up
    front from the planned tensors, so each tensor is written at its final
    offset as soon as it is produced and nothing accumulates in memory.

    Files are named like Hugging Face's (``model-00001-of-00003.safetensors``
    plus ``model.safetensors.index.json``; a single ``model.safetensors`` when
    everything fits in one shard).
    """

    def __init__(self, folder, planned, max_shard_bytes: int, metadata=None):
        import json as _json

        self.folder = os.fspath(folder)
        groups, size = [[]], 0
        for t in planned:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where = {}
        self.files = []
        for fname, group in zip(names, groups):
            header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
            for t in group:
                header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            raw = _json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte aligned data section
            path = os.path.join(self.folder, fname)
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            start = 8 + len(raw)
            for t in group:
                self.where[t.name] = (path, start + header[t.name]["data_offsets"][0], t)
            self.files.append(path)
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                     "weight_map": {t.name: fname for fname, g in zip(names, groups) for t in g}}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                _json.dump(index, f, indent=2)
        self._handles = {}

    def write(self, name: str, tensor) -> None:
        path, offset, planned = self.where[name]
        dtype = SAFETENSORS_DTYPES.get(str(tensor.dtype))
        if dtype != planned.dtype or tuple(tensor.shape) != tuple(planned.shape):
            raise ValueError(f"{name}: planned {planned.dtype} {list(planned.shape)}, got {dtype} {list(tensor.shape)}")
        data = tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy()
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "r+b")
        f.seek(offset)
        f.write(memoryview(data))

    def close(self, sync: bool = True) -> None:
        """Closes the shards; with ``sync``, waits until they are on disk
        (before an atomic rename, so a crash cannot leave a renamed folder of
        half-written files)."""
        for f in self._handles.values():
            f.close()
        self._handles = {}
        if not sync:
            return
        # Tensors may also have been written at their offsets by the Rust
        # core through its own handles: flush every shard.
        for path in self.files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
