"""The one writer of model folders, shared by every command that writes one
(``ferrox merge`` today; ``compress`` and ``restore`` next).

An output folder is built in a temporary sibling (``.OUT.ferrox-tmp-...``)
and published with one rename, so a reader sees either the old folder or the
complete new one:

- ``OUT`` may not equal, contain or lie inside any input (real paths,
  symlinks followed), with or without ``force``: checked before anything is
  written;
- without ``force`` an existing ``OUT`` is an error, and one that appears
  while the work runs is never replaced (the rename refuses to replace);
- on an error, SIGINT, SIGTERM or SIGHUP the temporary folder is removed and
  an existing ``OUT`` is left as it was; temporaries left behind by a killed
  process (SIGKILL, power loss) are removed by the next run to the same
  ``OUT``;
- shards are fsynced before the rename unless ``fsync=False``.

Temporaries are named ``.OUT.ferrox-tmp-PID.TOKEN`` (and
``.OUT.ferrox-old-PID.TOKEN`` for a replaced folder during the rename).

Every safetensors file written here records ``ferrox_format`` (what wrote
it: ``merge``, ...) and ``ferrox_version`` in its metadata, and a folder may
carry ``ferrox_report.json`` (a summary plus one record per tensor), which
``ferrox inspect`` shows.
"""

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from . import dtypes

FORMAT_KEY = "ferrox_format"
VERSION_KEY = "ferrox_version"
REPORT_FILE = "ferrox_report.json"
# Files besides weights that make an output folder loadable.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
              "added_tokens.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# .OUT.ferrox-tmp-PID.TOKEN (the token keeps two writers in one process apart)
_STALE = re.compile(r"^\.(?P<name>.+)\.ferrox-(?:tmp|old)-(?P<pid>\d+)(?:\.[0-9a-f]+)?$")
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _version() -> str:
    from . import __version__

    return __version__


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """``path`` equals ``folder`` or lies below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out, inputs: Iterable = ()) -> str:
    """The absolute output path, after refusing one that equals, contains or
    lies inside an input (``ValueError``); symlinks are followed on both
    sides."""
    out_abs = os.path.abspath(os.fspath(out))
    real_out = _real(out_abs)
    for inp in inputs:
        if inp is None:
            continue
        real_in = _real(inp)
        if _inside(real_out, real_in):
            what = "is" if real_out == real_in else "lies inside"
            raise ValueError(f"output {out_abs} {what} the input {os.fspath(inp)}; refusing to write there "
                             f"(nothing was written)")
        if _inside(real_in, real_out):
            raise ValueError(f"output {out_abs} contains the input {os.fspath(inp)}; refusing to replace it "
                             f"(nothing was written)")
    return out_abs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_stale(out_abs: str, notice: Callable[[str], None] = _stderr) -> List[str]:
    """Removes the temporaries of earlier runs to ``out_abs`` whose process is
    gone; returns their paths."""
    parent, base = os.path.split(out_abs)
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _STALE.match(name)
        if not m or m.group("name") != base:
            continue
        pid = int(m.group("pid"))
        if _alive(pid):
            continue  # a run is writing it right now (maybe this process, another thread)
        path = os.path.join(parent, name)
        _remove(path)
        removed.append(path)
        notice(f"removed {path}, left behind by an earlier run (process {pid}) that did not finish")
    return removed


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None


def rename_noreplace(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst`` unless ``dst`` exists (``FileExistsError``),
    atomically where the kernel and filesystem support ``RENAME_NOREPLACE``."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src)
    # No atomic no-replace rename here: check, then rename (a short race).
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    everything fits in one shard). ``where[name]`` is ``(path, absolute
    offset, planned)`` for writers outside Python (the Rust core writes
    merged tensors there itself).
    """

    def __init__(self, folder, planned: Sequence[PlannedTensor], max_shard_bytes: int,
                 metadata: Optional[Dict[str, str]] = None):
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
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self._headers: Dict[str, tuple] = {}
        self.where = {}
        self.files = []
        for fname, group in zip(names, groups):
            header, offset = {"__metadata__": meta}, 0
            for t in group:
                header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # 8-byte aligned data section
            path = os.path.join(self.folder, fname)
            self._headers[path] = (header, len(raw))
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
                json.dump(index, f, indent=2)
        self._fds: Dict[str, int] = {}

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_WRONLY)
        return fd

    def write_bytes(self, name: str, data, at: int = 0) -> None:
        """Writes raw bytes of tensor ``name`` starting ``at`` bytes into it."""
        path, offset, planned = self.where[name]
        view = memoryview(data).cast("B")
        if at < 0 or at + len(view) > planned.nbytes:
            raise ValueError(f"{name}: {len(view)} bytes at {at} overrun its {planned.nbytes} planned bytes")
        fd, done = self._fd(path), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + at + done)

    def copy(self, name: str, entry, step: int = 16 << 20) -> None:
        """Copies the bytes of an input tensor (a ``checkpoint.TensorEntry``)
        to ``name``, ``step`` bytes at a time (any dtype, bit for bit)."""
        from .checkpoint import TensorReader

        _, _, planned = self.where[name]
        if entry.nbytes != planned.nbytes:
            raise ValueError(f"{name}: planned {planned.nbytes} bytes, the input has {entry.nbytes}")
        reader = TensorReader()
        buf = bytearray(min(step, entry.nbytes))
        for at in range(0, entry.nbytes, step):
            view = memoryview(buf)[:min(step, entry.nbytes - at)]
            reader.read_into(entry, view, at)
            self.write_bytes(name, view, at)

    def patch_metadata(self, key: str, value: str) -> None:
        """Replaces metadata ``key`` of every shard by a value of the same
        encoded length (e.g. hashes known only after the pass that wrote the
        tensors)."""
        for path in self.files:
            header, length = self._headers[path]
            header["__metadata__"][key] = str(value)
            raw = json.dumps(header, separators=(",", ":")).encode()
            if len(raw) > length:
                raise ValueError(f"{path}: metadata {key!r} grew from the planned header ({len(raw)} > {length} bytes)")
            raw += b" " * (length - len(raw))
            fd = self._fd(path)
            os.pwrite(fd, raw, 8)

    def write(self, name: str, tensor) -> None:
        """Writes a whole torch tensor (or numpy array) planned as ``name``."""
        _, _, planned = self.where[name]
        if hasattr(tensor, "numpy") and hasattr(tensor, "dtype") and str(tensor.dtype).startswith("torch."):
            import torch

            dtype = dtypes.from_torch(tensor.dtype)
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        else:
            import numpy as np

            arr = np.ascontiguousarray(tensor)
            dtype = dtypes.from_torch(arr.dtype.name)
            data = arr.reshape(-1).view(np.uint8)
        if dtype != planned.dtype or tuple(tensor.shape) != tuple(planned.shape):
            raise ValueError(f"{name}: planned {planned.dtype} {list(planned.shape)}, got {dtype} {list(tensor.shape)}")
        self.write_bytes(name, data)

    def close(self, sync: bool = True) -> None:
        """Closes the shards; with ``sync``, waits until they are on disk
        (before an atomic rename, so a crash cannot leave a renamed folder of
        half-written files)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if sync:
            # Tensors may also have been written by the Rust core through its
            # own handles: flush every shard, not only ours.
            for path in self.files:
                _fsync_path(path)


class OutputFolder:
    """A model folder written atomically (see the module docstring).

    ``with OutputFolder(out, fmt="merge", inputs=[...], force=...) as dest:``
    write into ``dest.path`` (or through ``dest.writer(...)``); the folder is
    published when the block ends without an exception. An exception or
    signal that ends the block carries ``output_state``: one sentence saying
    what is at ``out`` now (for the command line's message)."""

    def __init__(self, out, *, fmt: str, inputs: Iterable = (), force: bool = False, fsync: bool = True,
                 notice: Callable[[str], None] = _stderr):
        self.fmt = fmt
        self.force = force
        self.fsync = fsync
        self.notice = notice
        self.out = check_out(out, list(inputs))
        self.existed = os.path.lexists(self.out)
        self.path = None
        self._writers: List[ShardedWriter] = []
        self._previous = {}

    # --- what callers use ---------------------------------------------------

    def metadata(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return {FORMAT_KEY: self.fmt, VERSION_KEY: _version(), **(extra or {})}

    def writer(self, planned: Sequence[PlannedTensor], max_shard_bytes: int,
               metadata: Optional[Dict[str, str]] = None) -> ShardedWriter:
        w = ShardedWriter(self.path, planned, max_shard_bytes, metadata=self.metadata(metadata))
        self._writers.append(w)
        return w

    def copy_side_files(self, src) -> List[str]:
        """Copies config/tokenizer files of the model folder ``src`` (none for a file)."""
        copied = []
        if src is None or not os.path.isdir(src):
            return copied
        for name in SIDE_FILES:
            p = os.path.join(src, name)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(self.path, name))
                copied.append(name)
        return copied

    def write_text(self, name: str, text: str) -> None:
        with open(os.path.join(self.path, name), "w", encoding="utf-8") as f:
            f.write(text)

    def write_report(self, summary: dict, tensors: Dict[str, dict]) -> None:
        """``ferrox_report.json``: what ``ferrox inspect`` shows for this folder."""
        self.write_text(REPORT_FILE, json.dumps({FORMAT_KEY: self.fmt, VERSION_KEY: _version(), "summary": summary,
                                                 "tensors": tensors}, indent=1, allow_nan=False) + "\n")

    def model_card(self, title: str, body: Sequence[str]) -> None:
        lines = ["---", f"tags: [ferrox, {self.fmt}]", "---", "", f"# {title}", "", *body]
        self.write_text("README.md", "\n".join(lines) + "\n")

    # --- the context --------------------------------------------------------

    def __enter__(self) -> "OutputFolder":
        if self.existed and not self.force:
            raise FileExistsError(f"{self.out} exists; pass --force to replace it")
        parent, base = os.path.split(self.out)
        os.makedirs(parent, exist_ok=True)
        remove_stale(self.out, self.notice)
        self.path = os.path.join(parent, f".{base}.ferrox-tmp-{os.getpid()}.{os.urandom(4).hex()}")
        _remove(self.path)
        self._install_handlers()
        try:
            os.makedirs(self.path)
        except BaseException:
            self._restore_handlers()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc is None:
                self._finish()
                return False
            self._discard()
            try:
                exc.output_state = self._kept_state()
            except AttributeError:
                pass
            return False
        finally:
            self._restore_handlers()

    def _kept_state(self) -> str:
        if self.existed:
            return f"{self.out} was left as it was"
        return f"nothing was written to {self.out}"

    def _discard(self) -> None:
        for w in self._writers:
            try:
                w.close(sync=False)  # it is deleted next: no need to wait for the disk
            except OSError:
                pass
        _remove(self.path)

    def _finish(self) -> None:
        try:
            for w in self._writers:
                w.close(sync=self.fsync)
            if self.fsync:
                _fsync_path(self.path)
        except BaseException as e:
            self._discard()
            e.output_state = self._kept_state()
            raise
        published = False
        try:
            # No signal may split the publish: they wait until it is done (a
            # pending one is raised when they are unblocked).
            blocked = _block_signals()
            try:
                self._publish()
                published = True
            finally:
                _unblock_signals(blocked)
            if self.fsync:
                _fsync_path(os.path.dirname(self.out))
        except BaseException as e:
            if published:
                e.output_state = f"{self.out} had already been written completely"
            else:
                self._discard()
                e.output_state = self._kept_state()
            raise

    def _publish(self) -> None:
        appeared = FileExistsError(f"{self.out} appeared while this run was writing; it was not replaced "
                                   f"and this run's output was discarded")
        old = None
        if os.path.lexists(self.out):
            if not self.force:
                raise appeared
            parent, base = os.path.split(self.out)
            old = os.path.join(parent, f".{base}.ferrox-old-{os.getpid()}.{os.urandom(4).hex()}")
            _remove(old)
            os.rename(self.out, old)
        try:
            rename_noreplace(self.path, self.out)
        except BaseException as e:
            if old is not None and not os.path.lexists(self.out):
                os.rename(old, self.out)  # put the previous folder back
            if isinstance(e, FileExistsError):
                raise appeared from None
            raise
        if old is not None:
            _remove(old)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        for s in _SIGNALS:
            if s == signal.SIGINT:
                continue  # Python's own handler raises KeyboardInterrupt
            self._previous[s] = signal.signal(s, on_signal)

    def _restore_handlers(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def _block_signals():
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def read_folder(path: str, fmt: str, meta_key: str, label: str, packed: Callable[[str, dict, dict], object]):
    """The headers of a ferrox output folder whose every file records
    ``ferrox_format: fmt``: (the JSON under ``meta_key`` in its first file's
    metadata, {NAME: ``packed(NAME, record, stored tensors by name)``} for the
    records of kind ``fmt``, {NAME: its stored tensor} for the others, kept
    verbatim), in the metadata's tensor order; ``packed`` raises for a
    missing part. ``label`` names the format in errors ("codebook",
    "BitDelta"), which give the path and the formats found."""
    # Imported here: checkpoint loads the extension, which writers need not.
    from . import checkpoint as ckpt

    info = ckpt.read_checkpoint(path)
    metas = [info.metadata.get(f, {}) for f in info.files]
    if not metas or any(m.get(FORMAT_KEY) != fmt for m in metas):
        found = sorted({m.get(FORMAT_KEY, "no ferrox_format") for m in metas})
        raise ValueError(f"{path}: not a {label} folder (ferrox_format: {', '.join(found) or 'none'})")
    try:
        meta = json.loads(metas[0][meta_key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {label} metadata {meta_key!r} is missing or not JSON ({e})") from None
    by_name = {t.name: t for t in info.tensors}
    entries, verbatim = {}, {}
    for name, rec in meta["tensors"].items():
        if rec["kind"] == fmt:
            entries[name] = packed(name, rec, by_name)
        elif name in by_name:
            verbatim[name] = by_name[name]
        else:
            raise ValueError(f"{path}: tensor {name!r} is missing")
    return meta, entries, verbatim


def read_report(folder) -> Optional[dict]:
    """The ``ferrox_report.json`` of a ferrox output folder, or None."""
    path = os.path.join(os.fspath(folder), REPORT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
