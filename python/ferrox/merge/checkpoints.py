"""Merging whole checkpoints: plan every output tensor from the input
headers, merge tensor by tensor, write each at its precomputed offset, and
publish the output folder atomically."""

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import yaml

from .. import _core
from .. import checkpoint as ckpt
from .config import MergeConfig
from .tensor import merge_terms, merge_tensors, row_length

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAME_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: Working memory of a streamed tensor merge (all inputs' chunk buffers plus
#: the output's); bounds a merge's memory whatever the tensor sizes.
CHUNK_BYTES = 64 << 20
ELEMENT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# Files besides weights that make an output folder loadable.
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
          "added_tokens.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class MergeError(ValueError):
    """Inputs that cannot be merged (missing tensors, mismatched shapes, ...)."""


@dataclass
class MergeReport:
    out: str
    tensors: int
    merged: int
    copied: int
    bytes_written: int
    seconds: float
    density: Dict[str, float]  # per merged tensor: fraction of elements that changed


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file or HF folder) in memory."""
    inp = _Inputs(os.fspath(path))
    try:
        return {t.name: inp.load(t) for t in inp.info.tensors}
    finally:
        inp.close()


class _Inputs:
    """Open safetensors handles of every input, by tensor name."""

    def __init__(self, path: str):
        self.info = ckpt.read_checkpoint(path)
        self.path = path
        self.by_name = {t.name: t for t in self.info.tensors}
        self.reader = ckpt.TensorReader()

    def entry(self, name):
        return self.by_name.get(name)

    def load(self, entry) -> torch.Tensor:
        return self.reader.read(entry)

    def close(self):
        self.reader.close()


def _plan(cfg: MergeConfig, inputs: List[_Inputs]):
    """Output tensors in the reference model's order, checking every input
    has each tensor with the same shape and dtype."""
    ref = inputs[0]
    planned = []
    by_name = [i.by_name for i in inputs]
    for t in ref.info.tensors:
        for inp, names in zip(inputs[1:], by_name[1:]):
            other = names.get(t.name)
            if other is None:
                raise MergeError(f"{inp.path}: tensor {t.name!r} is missing (present in {ref.path})")
            if other.shape != t.shape or other.dtype != t.dtype:
                raise MergeError(f"{inp.path}: tensor {t.name!r} is {other.dtype} {list(other.shape)}, "
                                 f"but {t.dtype} {list(t.shape)} in {ref.path}")
        out_dtype = t.dtype
        if t.dtype in TORCH_DTYPES and (cfg.out_dtype or cfg.dtype):
            out_dtype = NAME_DTYPES[cfg.out_dtype or cfg.dtype]
        size = ELEMENT_BYTES.get(out_dtype)
        nbytes = t.numel * size if size else t.nbytes
        planned.append(ckpt.PlannedTensor(t.name, out_dtype, t.shape, nbytes))
    for inp, names in zip(inputs[1:], by_name[1:]):
        extra = set(names) - {t.name for t in ref.info.tensors}
        if extra:
            raise MergeError(f"{inp.path}: tensor {sorted(extra)[0]!r} is not in {ref.path}")
    return planned


@contextlib.contextmanager
def _atomic_folder(out: str, force: bool):
    """Yields a temporary sibling of ``out``; renames it into place on success.
    On any error, SIGINT or SIGTERM the temporary folder is removed and an
    existing ``out`` is left untouched."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.ferrox-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        yield tmp
        old = None
        if os.path.exists(out):
            old = os.path.join(parent, f".{os.path.basename(out)}.ferrox-old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _copy_side_files(cfg: MergeConfig, dest: str):
    src = cfg.base or cfg.models[0].path
    if not os.path.isdir(src):
        return
    for name in COPIED:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dest, name))


def _model_card(cfg: MergeConfig, report_bytes: int) -> str:
    lines = [
        "---", "tags: [merge, ferrox]", "---", "",
        f"# Merged with ferrox ({cfg.method.name})", "",
        f"Method: `{cfg.method.name}` ({cfg.method.reference}), granularity `{cfg.granularity}`, "
        f"normalize={cfg.normalize}, rescale={cfg.rescale}, lambda={cfg.lam}, seed={cfg.seed}.", "",
        f"Base model: `{cfg.base}`" if cfg.base else "No base model.", "", "Models:",
    ]
    lines += [f"- `{m.path}`: " + ", ".join(f"{k}={v}" for k, v in m.params.items()) for m in cfg.models]
    lines += ["", f"Weights: {ckpt.human_bytes(report_bytes)}. The resolved config is in `ferrox_config.yml`."]
    return "\n".join(lines) + "\n"


def _per_model_params(cfg: MergeConfig) -> dict:
    """weight/density/gamma lists in model order (mergekit's defaults)."""
    return dict(weight=[m.params["weight"] for m in cfg.models],
                density=[m.params.get("density", 1.0) for m in cfg.models],
                gamma=[m.params.get("gamma", 0.01) for m in cfg.models])


@contextlib.contextmanager
def _naming_tensor(p, paths):
    """Re-raises a bad-input error of one tensor's merge naming the tensor and inputs."""
    try:
        yield
    except ValueError as e:
        msg = str(e).replace("models[", "model[")
        raise MergeError(f"tensor {p.name!r}: {msg} (inputs: {', '.join(paths)})") from None


def _merge_one(cfg: MergeConfig, p, entries, writer, allow_nonfinite: bool, chunk_bytes: int, paths) -> int:
    """Streams one float tensor's merge from the input files into the output
    file; returns how many elements changed."""
    base, models = (entries[0], entries[1:]) if cfg.base else (None, entries)
    compute = NAME_DTYPES[cfg.dtype] if cfg.dtype else entries[0].dtype
    width = ELEMENT_BYTES[compute] * (len(entries) + 1) + ELEMENT_BYTES[p.dtype]
    weights, sparsify = merge_terms(cfg.method, len(models), seed=cfg.seed, tensor_name=p.name,
                                    **_per_model_params(cfg))
    path, offset, _ = writer.where[p.name]
    locate = lambda e: (e.file, e.data_start, e.dtype)  # noqa: E731
    with _naming_tensor(p, paths):
        return _core.merge_tensor_files(
            (path, offset, p.dtype), locate(base) if base else None, [locate(e) for e in models], _numel(p.shape),
            compute, weights, sparsify, cfg.method.consensus, cfg.normalize, cfg.rescale,
            float(cfg.lam), row_length(cfg.granularity, tuple(p.shape)), not allow_nonfinite,
            max(1, chunk_bytes // width),
        )


def _merge_on_device(cfg: MergeConfig, p, inputs, entries, writer, allow_nonfinite: bool, paths, device) -> int:
    """Merges one float tensor in ferrox's CUDA kernels: the inputs are read
    whole, moved to ``device``, merged there and written back."""
    dtype = TORCH_DTYPES[NAME_DTYPES[cfg.dtype]] if cfg.dtype else None
    tensors = [i.load(e) for i, e in zip(inputs, entries)]
    tensors = [(t.to(dtype) if dtype is not None else t).to(device) for t in tensors]
    base, models = (tensors[0], tensors[1:]) if cfg.base else (None, tensors)
    with _naming_tensor(p, paths):
        result = merge_tensors(
            cfg.method, base, models, lam=cfg.lam, normalize=cfg.normalize, rescale=cfg.rescale,
            granularity=cfg.granularity, seed=cfg.seed, tensor_name=p.name,
            check_finite=not allow_nonfinite, **_per_model_params(cfg),
        )
    ref = base if base is not None else models[0]
    changed = int(torch.count_nonzero(result != ref))
    writer.write(p.name, result.to(TORCH_DTYPES[p.dtype]).cpu())
    return changed


def _cuda_device(device: str):
    if device == "cpu":
        return None
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise MergeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise MergeError(f"--device {device}: torch sees no CUDA device")
    gpu = torch.device(device)
    if gpu.index is not None and gpu.index >= torch.cuda.device_count():
        raise MergeError(f"--device {device}: cuda:{gpu.index} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return gpu


def merge_checkpoints(cfg: MergeConfig, out: str, *, force: bool = False, max_shard_elements: int = 5_000_000_000,
                      allow_nonfinite: bool = False, progress: Optional[bool] = None,
                      chunk_bytes: int = CHUNK_BYTES, device: str = "cpu", fsync: bool = True) -> MergeReport:
    """Runs a merge config and writes the merged model to ``out``.

    On the CPU each tensor is merged by the Rust core straight from the input
    files, chunk by chunk (positioned reads into reusable buffers of about
    ``chunk_bytes`` in all), and written at its precomputed offset in the
    output, so memory stays bounded whatever the model's size. With
    ``device="cuda"`` (or ``"cuda:N"``) each tensor is moved to the GPU and
    merged by ferrox's CUDA kernels (bitwise the CPU result, per tensor or
    per row).

    The output is written to a temporary sibling folder, fsynced, and renamed
    into place. ``fsync=False`` skips waiting for the disk: faster, but after
    a power loss or OS crash the renamed folder may hold incomplete files."""
    from tqdm import tqdm

    gpu = _cuda_device(device)

    start = time.perf_counter()
    paths = ([cfg.base] if cfg.base else []) + [m.path for m in cfg.models]
    inputs = [_Inputs(p) for p in paths]
    planned = _plan(cfg, inputs)
    # mergekit counts shard sizes in elements; the widest output element sets bytes.
    widest = max((p.nbytes // max(1, _numel(p.shape)) for p in planned), default=1)
    max_shard_bytes = max_shard_elements * widest
    density, merged, copied = {}, 0, 0
    total = sum(p.nbytes for p in planned)
    with _atomic_folder(out, force) as tmp:
        writer = ckpt.ShardedWriter(tmp, planned, max_shard_bytes, metadata={"merged_by": "ferrox"})
        done = False
        try:
            bar = tqdm(total=total, desc=f"ferrox merge ({cfg.method.name})", unit="B", unit_scale=True,
                       disable=None if progress is None else not progress)
            with bar:
                for p in planned:
                    entries = [i.entry(p.name) for i in inputs]
                    if entries[0].dtype not in TORCH_DTYPES:
                        writer.write(p.name, inputs[0].load(entries[0]))  # integer buffers: the reference model's
                        copied += 1
                    else:
                        if gpu is not None:
                            changed = _merge_on_device(cfg, p, inputs, entries, writer, allow_nonfinite, paths, gpu)
                        else:
                            changed = _merge_one(cfg, p, entries, writer, allow_nonfinite, chunk_bytes, paths)
                        density[p.name] = changed / max(1, _numel(p.shape))
                        merged += 1
                    bar.update(p.nbytes)
            done = True
        finally:
            writer.close(sync=fsync and done)  # a failed merge is deleted: no need to wait for the disk
            for i in inputs:
                i.close()
        _copy_side_files(cfg, tmp)
        with open(os.path.join(tmp, "ferrox_config.yml"), "w") as f:
            yaml.safe_dump(cfg.resolved(), f, sort_keys=False)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_model_card(cfg, total))
    return MergeReport(os.path.abspath(out), len(planned), merged, copied, total, time.perf_counter() - start, density)
