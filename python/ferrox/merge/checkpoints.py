"""Merging whole checkpoints: plan every output tensor from the input
headers, merge tensor by tensor, write each at its precomputed offset, and
publish the output folder atomically (``ferrox.output``).

A CPU merge by a generalized-task-arithmetic method streams every float
tensor through the Rust core from the input files to the output file and
never imports torch; so do slerp and model_stock on the CPU (their fused
versions in the core, streamed the same way); other methods (``TensorMethod``)
merge one tensor at a time in torch. Integer tensors are copied byte for byte. ``device="cuda"``
imports torch to move tensors to the GPU.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml

from .. import _core, dtypes
from .. import checkpoint as ckpt
from ..output import OutputFolder, PlannedTensor
from .config import MergeConfig, model_num_layers
from .methods.base import first_nonfinite
from .settings import LAYER_RE, layer_index
from .terms import merge_terms, row_length
from .tokenizer import Ref, VocabPlan, align_rows, build_vocab, is_vocab_tensor, resolve_chat_template, write_tokenizer

#: Working memory of a streamed tensor merge (all inputs' chunk buffers plus
#: the output's); bounds a merge's memory whatever the tensor sizes.
CHUNK_BYTES = 64 << 20


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


def load_state_dict(path) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Every tensor of a checkpoint (file or HF folder) in memory (imports torch)."""
    inp = _Inputs(os.fspath(path))
    return {t.name: inp.load(t) for t in inp.info.tensors}


class _Inputs:
    """One input checkpoint's header, by tensor name; with ``lora`` (mergekit's
    ``model+lora``) the PEFT adapter is applied to each tensor it changes as
    the tensor is read."""

    def __init__(self, path: str, lora: Optional[str] = None):
        self.info = ckpt.read_checkpoint(path)
        self.path = path if lora is None else f"{path}+{lora}"
        self.by_name = {t.name: t for t in self.info.tensors}
        self.reader = ckpt.TensorReader()
        self.lora = None
        if lora is not None:
            from ..extract.apply import _plan as lora_plan
            from ..extract.apply import read_adapter

            try:
                adapter_cfg, adapter_entries = read_adapter(lora)
                self.lora = lora_plan(self.info, adapter_cfg, adapter_entries, os.path.join(lora, "adapter_config.json"))
            except ValueError as e:
                raise MergeError(f"{self.path}: {e}") from None
            for name, job in self.lora.items():
                if job[0] != "replace" and self.by_name[name].dtype not in dtypes.KERNEL_FLOATS:
                    raise MergeError(f"{self.path}: the adapter changes tensor {name!r}, which is "
                                     f"{self.by_name[name].dtype}; expected F32, F16 or BF16")

    def entry(self, name):
        return self.by_name.get(name)

    def adapted(self, entry) -> bool:
        """The tensor is not the file's: the LoRA adapter changes it."""
        return self.lora is not None and entry.name in self.lora

    def load(self, entry):
        x = self.reader.read(entry)
        if not self.adapted(entry):
            return x
        job = self.lora[entry.name]
        if job[0] == "replace":  # modules_to_save: the adapter's copy, in the model's dtype
            y = self.reader.read(job[1])
            return y.to(x.dtype) if y.is_floating_point() else y
        if job[0] == "lora":
            # PEFT's merge_and_unload, which mergekit runs (its adapters upcast to
            # f32): a Linear adds the f32 update (B·A)·scale in place, rounding
            # once to the weight's dtype; an Embedding rounds the update to the
            # weight's dtype first, then adds (two roundings; checked in bf16).
            _, a, b, scale, transposed = job
            upd = self.reader.read(b).float() @ self.reader.read(a).float()
            upd = (upd.mT if transposed else upd) * scale
            if "lora_embedding_" in a.name:
                return x + upd.to(x.dtype)
            return (x.float() + upd).to(x.dtype)
        # a LoRA bias: bias + B.bias·scale, rounded once
        return (x.float() + self.reader.read(job[1]).float() * job[2]).to(x.dtype)


def _input_refs(cfg: MergeConfig) -> List[Ref]:
    """The merge's inputs in the order ``merge_checkpoints`` reads them."""
    refs = [cfg.base_ref] if cfg.merge_base else []
    return refs + [m.ref for m in cfg.models]


@dataclass
class _Vocab:
    """A tokenizer merge: the output vocabulary and the inputs' positions."""
    plan: VocabPlan
    refs: List[Ref]
    #: index (into ``refs``) of mergekit's base model when base_model is set, else None
    base: Optional[int]


def _vocab(cfg: MergeConfig, refs: List[Ref]) -> Optional[_Vocab]:
    if cfg.tokenizer is None:
        return None
    base_ref = cfg.base_ref
    base = next((i for i, r in enumerate(refs) if base_ref is not None and r.same(base_ref)), None)
    try:
        plan = build_vocab(cfg.tokenizer, refs, 0 if base is None else base)
    except ValueError as e:
        raise MergeError(str(e)) from None
    return _Vocab(plan, refs, base)


def _plan(cfg: MergeConfig, inputs: List[_Inputs], vocab_rows: Optional[int] = None) -> List[PlannedTensor]:
    """Output tensors in the reference model's order, checking every input
    has each tensor with the same shape, and the same dtype unless all are
    floats (mixed float inputs are cast to the merge's compute dtype, as
    mergekit does). With ``vocab_rows`` (a tokenizer merge) the vocabulary
    tensors may differ in their row count and get ``vocab_rows`` rows."""
    ref = inputs[0]
    planned = []
    by_name = [i.by_name for i in inputs]
    out_dtype_name = cfg.out_dtype or cfg.dtype
    for t in ref.info.tensors:
        vocab = vocab_rows is not None and is_vocab_tensor(t.name) and t.dtype in dtypes.KERNEL_FLOATS
        for inp, names in zip(inputs[1:], by_name[1:]):
            other = names.get(t.name)
            if other is None:
                raise MergeError(f"{inp.path}: tensor {t.name!r} is missing (present in {ref.path})")
            mixed_floats = other.dtype in dtypes.KERNEL_FLOATS and t.dtype in dtypes.KERNEL_FLOATS
            same_shape = other.shape[1:] == t.shape[1:] if vocab else other.shape == t.shape
            if not same_shape or (other.dtype != t.dtype and not mixed_floats):
                raise MergeError(f"{inp.path}: tensor {t.name!r} is {other.dtype} {list(other.shape)}, "
                                 f"but {t.dtype} {list(t.shape)} in {ref.path}")
        f64 = next((inp for inp in inputs if inp.by_name[t.name].dtype == "F64"), None)
        if f64 is not None:
            raise MergeError(f"{f64.path}: tensor {t.name!r} is F64; ferrox merges F32, F16 and BF16 tensors "
                             f"(convert the checkpoint, or set dtype to merge in another precision)")
        # Unset dtypes: the reference model's (mergekit's result dtype: the base's, or linear's first model's).
        out_dtype = t.dtype
        if t.dtype in dtypes.KERNEL_FLOATS and out_dtype_name:
            out_dtype = dtypes.from_config_name(out_dtype_name)
        shape = (vocab_rows, *t.shape[1:]) if vocab else t.shape
        nbytes = dtypes.numel(shape) * dtypes.itemsize(out_dtype)
        planned.append(PlannedTensor(t.name, out_dtype, shape, nbytes))
    for inp, names in zip(inputs[1:], by_name[1:]):
        extra = set(names) - {t.name for t in ref.info.tensors}
        if extra:
            raise MergeError(f"{inp.path}: tensor {sorted(extra)[0]!r} is not in {ref.path}")
    return planned


def _model_card(cfg: MergeConfig, report_bytes: int) -> List[str]:
    if cfg.method.in_core:
        lines = [
            f"Method: `{cfg.method.name}` ({cfg.method.reference}), granularity `{cfg.granularity}`, "
            f"normalize={cfg.normalize}, rescale={cfg.rescale}, lambda={cfg.lam}, seed={cfg.seed}.", "",
            f"Base model: `{cfg.base}`" if cfg.merge_base else
            f"No base model (`{cfg.base}` is one of the models and donates config.json)." if cfg.base else
            "No base model.", "", "Models:",
        ]
    else:
        shared = ", ".join(f"{k}={v}" for k, v in cfg.params.items()) or "none"
        base = cfg.models[cfg.base_index].path if cfg.base_index is not None else None
        lines = [
            f"Method: `{cfg.method.name}` ({cfg.method.reference}), parameters: {shared}.", "",
            f"Base model: `{base}`" if base else
            f"No base model (`{cfg.base}` is one of the models and donates config.json)." if cfg.base else
            "No base model.", "", "Models:",
        ]
    lines += [f"- `{m.path}`" + (" (base)" if m.is_base else "") + ": "
              + ", ".join(f"{k}={v}" for k, v in m.params.items()) for m in cfg.models]
    lines += ["", f"Weights: {ckpt.human_bytes(report_bytes)}. The resolved config is in `ferrox_config.yml`; "
              f"the fraction of weights each tensor's merge changed is in `ferrox_report.json`."]
    return lines


def _gta_params(cfg: MergeConfig, tensor_name: str):
    """(shared parameters, weight/density/gamma lists in model order) for one
    tensor, gradients and filters resolved (mergekit's defaults)."""
    shared, per_model = cfg.tensor_params(tensor_name)
    return shared, dict(weight=[m["weight"] for m in per_model],
                        density=[m.get("density", 1.0) for m in per_model],
                        gamma=[m.get("gamma", 0.01) for m in per_model])


@contextlib.contextmanager
def _naming_tensor(cfg: MergeConfig, p, paths, allow_nonfinite: bool):
    """Re-raises a bad-input error of one tensor's merge naming the tensor and inputs."""
    try:
        yield
    except ValueError as e:
        msg = str(e).replace("models[", "model[")
        if allow_nonfinite and "NaN" in msg and getattr(cfg.method, "sparsify", None) in ("magnitude", "band"):
            msg += (f"; {cfg.method.name} ranks |delta| and a NaN has no rank, so --allow-nonfinite "
                    f"cannot cover it (it covers methods that do not rank: linear, task_arithmetic, dare_*)")
        raise MergeError(f"tensor {p.name!r}: {msg} (inputs: {', '.join(paths)})") from None


def _compute_dtype(cfg: MergeConfig, entries) -> str:
    """The dtype inputs are cast to before merging: ``dtype`` when set (mergekit
    casts every input to it on load), else the inputs' common dtype, F32
    when they differ (torch's promotion of mixed float inputs, which is
    where mergekit's arithmetic then happens)."""
    if cfg.dtype:
        return dtypes.from_config_name(cfg.dtype)
    kinds = {e.dtype for e in entries}
    return kinds.pop() if len(kinds) == 1 else "F32"


def _merge_one(cfg: MergeConfig, p, entries, writer, allow_nonfinite: bool, chunk_bytes: int, paths) -> int:
    """Streams one float tensor's merge from the input files into the output
    file; returns how many elements changed."""
    base, models = (entries[0], entries[1:]) if cfg.merge_base else (None, entries)
    compute = _compute_dtype(cfg, entries)  # the core converts each input from its file's dtype
    width = dtypes.itemsize(compute) * (len(entries) + 1) + dtypes.itemsize(p.dtype)
    shared, per_model = _gta_params(cfg, p.name)
    weights, sparsify = merge_terms(cfg.method, len(models), seed=shared["seed"], tensor_name=p.name, **per_model)
    path, offset, _ = writer.where[p.name]
    locate = lambda e: (e.file, e.data_start, e.dtype)  # noqa: E731
    with _naming_tensor(cfg, p, paths, allow_nonfinite):
        return _core.merge_tensor_files(
            (path, offset, p.dtype), locate(base) if base else None, [locate(e) for e in models],
            dtypes.numel(p.shape), compute, weights, sparsify, cfg.method.consensus, shared["normalize"],
            shared["rescale"], float(shared["lambda"]), row_length(shared["granularity"], tuple(p.shape)),
            not allow_nonfinite,
            max(1, chunk_bytes // width),
        )


def _load_tensors(cfg: MergeConfig, p, inputs, entries, device, vocab: Optional[_Vocab], paths):
    """One tensor of each input, read whole (LoRA adapters applied), cast to the
    compute dtype (mergekit's cast on load), re-indexed to the output
    vocabulary when it is a vocabulary tensor of a tokenizer merge, and moved
    to ``device`` (None: stays on the CPU)."""
    compute = dtypes.to_torch(_compute_dtype(cfg, entries))
    tensors = [inp.load(e).to(compute) for inp, e in zip(inputs, entries)]
    if vocab is not None and is_vocab_tensor(p.name):
        try:
            tensors = align_rows(vocab.plan, p.name, tensors, list(range(len(tensors))), vocab.base, vocab.refs)
        except ValueError as e:
            raise MergeError(f"tensor {p.name!r}: {e} (inputs: {', '.join(paths)})") from None
    return tensors if device is None else [t.to(device) for t in tensors]


def _merge_on_device(cfg: MergeConfig, p, inputs, entries, writer, allow_nonfinite: bool, paths, device,
                     vocab: Optional[_Vocab] = None) -> int:
    """Merges one float tensor read whole: in ferrox's CUDA kernels on
    ``device``, or in the Rust core on the CPU (``device`` None: a tensor a
    LoRA adapter changes or a tokenizer merge re-indexes, which is not the
    file's bytes)."""
    import torch

    from .tensor import merge_tensors

    tensors = _load_tensors(cfg, p, inputs, entries, device, vocab, paths)  # cast before the kernels
    base, models = (tensors[0], tensors[1:]) if cfg.merge_base else (None, tensors)
    shared, per_model = _gta_params(cfg, p.name)
    with _naming_tensor(cfg, p, paths, allow_nonfinite):
        result = merge_tensors(
            cfg.method, base, models, lam=shared["lambda"], normalize=shared["normalize"],
            rescale=shared["rescale"], granularity=shared["granularity"], seed=shared["seed"], tensor_name=p.name,
            check_finite=not allow_nonfinite, **per_model,
        )
    ref = base if base is not None else models[0]
    changed = int(torch.count_nonzero(result != ref))
    writer.write(p.name, result.to(dtypes.to_torch(p.dtype)).cpu())
    return changed


def _check_finite(tensors, paths) -> None:
    for i, (x, path) in enumerate(zip(tensors, paths)):
        j = first_nonfinite(x)
        if j is not None:
            raise ValueError(f"models[{i}] ({path}): non-finite value {float(x.reshape(-1)[j])} at flat index {j}")


def _merge_native_files(cfg: MergeConfig, p, entries, writer, chunk_bytes: int, paths, allow_nonfinite: bool):
    """Merges one float tensor by a torch method's fused core version
    (slerp, model_stock), streamed from the input files into the output file
    as ``_merge_one`` streams GTA merges; returns how many elements changed,
    or None when an input is NaN/inf (nothing was written: the torch path
    then names it, or merges it under --allow-nonfinite)."""
    shared, _ = cfg.tensor_params(p.name)
    args = cfg.method.native_args(p.shape, cfg.method.resolve(shared))
    compute = _compute_dtype(cfg, entries)
    width = dtypes.itemsize(compute) * (len(entries) + 1) + dtypes.itemsize(p.dtype)
    path, offset, _ = writer.where[p.name]
    locate = lambda e: (e.file, e.data_start, e.dtype)  # noqa: E731
    models = [locate(e) for i, e in enumerate(entries) if i != cfg.base_index]
    with _naming_tensor(cfg, p, paths, allow_nonfinite):
        changed, nonfinite, _ = _core.interp_tensor_files(
            (path, offset, p.dtype), locate(entries[cfg.base_index]), models, dtypes.numel(p.shape), compute,
            chunk_len=max(1, chunk_bytes // width), **args)
    return None if nonfinite else changed


def _run_generator(cfg: MergeConfig, device):
    """One generator for the whole merge when a method draws as mergekit does
    (della's ``rng: mergekit``: seeded once, tensors merged in name order), else None."""
    if cfg.params.get("rng") != "mergekit":
        return None
    import torch

    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(cfg.params.get("seed", 0))
    return g


def _merge_order(cfg: MergeConfig, items, name_of):
    """mergekit's executor runs tensors in name order; draws from one
    generator (``_run_generator``) must follow it. Writes are positioned, so
    the order changes nothing else."""
    if cfg.params.get("rng") != "mergekit":
        return list(items)
    return sorted(items, key=name_of)


def _merge_torch(cfg: MergeConfig, p, inputs, entries, writer, allow_nonfinite: bool, paths, device,
                 generator=None, vocab: Optional[_Vocab] = None) -> int:
    """Merges one float tensor by a torch method (``TensorMethod``): one
    tensor of each input read, cast to the compute dtype (mergekit's cast on
    load), merged in float32 (on ``device`` when given), cast to the output
    dtype and written. Memory: this one tensor's inputs and temporaries."""
    import torch

    tensors = _load_tensors(cfg, p, inputs, entries, device, vocab, paths)
    shared, per_model = cfg.tensor_params(p.name)
    with _naming_tensor(cfg, p, paths, allow_nonfinite):
        if not allow_nonfinite:
            _check_finite(tensors, paths)
        result = cfg.method.merge(tensors, cfg.base_index, shared, per_model, tensor_name=p.name,
                                  generator=generator, out_dtype=dtypes.to_torch(p.dtype))
    out = result.to(dtypes.to_torch(p.dtype))
    ref = tensors[cfg.base_index or 0]
    changed = int(torch.count_nonzero(out != ref.to(out.dtype)))
    writer.write(p.name, out.cpu())
    return changed


def parse_device(device: str):
    """``None`` for ``"cpu"``, else the torch device (checked to exist)."""
    if device == "cpu":
        return None
    if not isinstance(device, str) or not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise MergeError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise MergeError(f"--device {device}: torch sees no CUDA device")
    gpu = torch.device(device)
    if gpu.index is not None and gpu.index >= torch.cuda.device_count():
        raise MergeError(f"--device {device}: cuda:{gpu.index} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return gpu


def _rewrite_config_dtype(dest: OutputFolder, dtype_name: str) -> None:
    _rewrite_config(dest, dtype_name, None)


def _rewrite_config(dest: OutputFolder, dtype_name: Optional[str], n_layers: Optional[int],
                    vocab_size: Optional[int] = None) -> None:
    """Sets the copied config.json's dtype field (``torch_dtype``, and ``dtype``
    where present) to the output's, ``num_hidden_layers`` to a sliced
    merge's layer count and ``vocab_size`` to a tokenizer merge's row count,
    as mergekit does; every other value is kept as read (key order too)."""
    path = os.path.join(dest.path, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise MergeError(f"config.json of the donor model is not valid JSON ({e}); cannot set its dtype") from None
    if not isinstance(config, dict):
        raise MergeError("config.json of the donor model is not a JSON object; cannot set its dtype")
    updates = {}
    if dtype_name:
        updates.update({k: dtype_name for k in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]})
    if n_layers is not None:
        updates["num_hidden_layers"] = n_layers
    if vocab_size is not None:
        updates["vocab_size"] = vocab_size
    if all(config.get(k) == v for k, v in updates.items()):
        return  # already right: leave the copy byte for byte
    config.update(updates)
    dest.write_text("config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _copy_integer(writer, p, inp: _Inputs, entry) -> None:
    if inp.adapted(entry):  # a LoRA adapter's modules_to_save copy
        writer.write(p.name, inp.load(entry))
    else:
        writer.copy(p.name, entry)


def _write_tokenizer(cfg: MergeConfig, dest: OutputFolder, vocab: Optional[_Vocab], donor: str, folders) -> None:
    template = resolve_chat_template(cfg.chat_template, folders)
    if vocab is None and template is None:
        return
    try:
        write_tokenizer(dest.path, vocab.plan if vocab else None, donor, template)
    except ValueError as e:
        raise MergeError(str(e)) from None


def _is_pre_layer(name: str) -> bool:
    """Tensors outside the layers that come before them (mergekit's
    architecture "pre_weights": the token embeddings); the rest (final norm,
    lm_head) follow the layers ("post_weights")."""
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def _renumber(name: str, layer: int) -> str:
    m = LAYER_RE.search(name)
    return name[:m.start(1)] + str(layer) + name[m.end(1):]


@dataclass
class _SliceJob:
    planned: PlannedTensor
    sl: object  # SliceEntry
    #: per source: (index into the inputs, input tensor name)
    sources: List[tuple]
    t: float


def _plan_sliced(cfg: MergeConfig, inputs: List[_Inputs], vocab_rows: Optional[int] = None) -> List[_SliceJob]:
    """mergekit's plan of a sliced merge: the pre-layer tensors from the
    first slice's sources, then each slice's layers at consecutive output
    indices (t = offset / (length - 1) within the slice, 1 for a one-layer
    slice), then the post-layer tensors from the last slice's sources (t = 0).
    ``vocab_rows``: a tokenizer merge's row count of the vocabulary tensors."""
    first, last = cfg.slices[0], cfg.slices[-1]
    out_dtype_name = cfg.out_dtype or cfg.dtype
    jobs = []

    def add(out_name, sl, names, t):
        entries = []
        for src, name in zip(sl.sources, names):
            inp = inputs[src.model]
            e = inp.entry(name)
            if e is None:
                raise MergeError(f"{inp.path}: tensor {name!r} is missing ({sl.where} reads it for {out_name!r})")
            entries.append(e)
        ref = entries[0]
        vocab = vocab_rows is not None and is_vocab_tensor(out_name) and ref.dtype in dtypes.KERNEL_FLOATS
        for src, e in zip(sl.sources[1:], entries[1:]):
            mixed = e.dtype in dtypes.KERNEL_FLOATS and ref.dtype in dtypes.KERNEL_FLOATS
            same_shape = e.shape[1:] == ref.shape[1:] if vocab else e.shape == ref.shape
            if not same_shape or (e.dtype != ref.dtype and not mixed):
                raise MergeError(f"{inputs[src.model].path}: tensor {e.name!r} is {e.dtype} {list(e.shape)}, but "
                                 f"{ref.dtype} {list(ref.shape)} in {inputs[sl.sources[0].model].path}")
        if any(e.dtype == "F64" for e in entries):
            raise MergeError(f"tensor {ref.name!r} is F64; ferrox merges F32, F16 and BF16 tensors")
        dtype = ref.dtype
        if dtype in dtypes.KERNEL_FLOATS and out_dtype_name:
            dtype = dtypes.from_config_name(out_dtype_name)
        shape = (vocab_rows, *ref.shape[1:]) if vocab else ref.shape
        planned = PlannedTensor(out_name, dtype, shape, dtypes.numel(shape) * dtypes.itemsize(dtype))
        jobs.append(_SliceJob(planned, sl, [(src.model, n) for src, n in zip(sl.sources, names)], t))

    def outside(sl, pre):
        ref = inputs[sl.sources[0].model]
        return [t.name for t in ref.info.tensors if layer_index(t.name) is None and _is_pre_layer(t.name) == pre]

    for name in outside(first, True):
        add(name, first, [name] * len(first.sources), 0.0)
    out_layer = 0
    for sl in cfg.slices:
        for k in range(sl.length):
            t = k / (sl.length - 1) if sl.length > 1 else 1.0
            src0 = sl.sources[0]
            names = [e.name for e in inputs[src0.model].info.tensors if layer_index(e.name) == src0.start + k]
            if not names:
                raise MergeError(f"{inputs[src0.model].path}: no tensors of layer {src0.start + k} "
                                 f"({src0.where}.layer_range)")
            for name in names:
                add(_renumber(name, out_layer), sl, [_renumber(name, s.start + k) for s in sl.sources], t)
            out_layer += 1
    for name in outside(last, False):
        add(name, last, [name] * len(last.sources), 0.0)
    return jobs


def _merge_sliced(cfg: MergeConfig, out: str, *, force, max_shard_bytes, allow_nonfinite, progress, device,
                  fsync) -> MergeReport:
    import torch
    from tqdm import tqdm

    gpu = parse_device(device)
    start = time.perf_counter()
    inputs = [_Inputs(m.path, m.lora) for m in cfg.models]
    paths = [i.path for i in inputs]
    vocab = _vocab(cfg, [m.ref for m in cfg.models])
    jobs = _plan_sliced(cfg, inputs, vocab.plan.rows if vocab else None)
    if vocab is not None and not any(is_vocab_tensor(j.planned.name) for j in jobs):
        raise MergeError(f"{paths[0]}: a tokenizer merge re-indexes the vocabulary tensors "
                         f"(embed_tokens, lm_head, ...), and this model has none")
    planned = [j.planned for j in jobs]
    total = sum(p.nbytes for p in planned)
    if max_shard_bytes == 0:
        max_shard_bytes = total + 1
    n_layers = sum(sl.length for sl in cfg.slices)
    density, merged, copied = {}, 0, 0
    donor = cfg.base or cfg.models[cfg.slices[0].sources[0].model].path
    sources = ([m.path for m in cfg.models] + [m.lora for m in cfg.models if m.lora]
               + ([cfg.config_path] if cfg.config_path else []))
    with OutputFolder(out, fmt="merge", inputs=sources, force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={"ferrox_method": cfg.method.name})
        bar = tqdm(total=total, desc=f"ferrox merge ({cfg.method.name}, slices)", unit="B", unit_scale=True,
                   disable=None if progress is None else not progress)
        generator = _run_generator(cfg, gpu)
        with bar:
            # mergekit's order: by the largest input tensor name of each output tensor
            for job in _merge_order(cfg, jobs, lambda j: max(n for _, n in j.sources)):
                p = job.planned
                entries = [inputs[i].entry(n) for i, n in job.sources]
                job_paths = [paths[i] for i, _ in job.sources]
                if entries[0].dtype not in dtypes.KERNEL_FLOATS:
                    _copy_integer(writer, p, inputs[job.sources[0][0]], entries[0])
                    copied += 1
                    bar.update(p.nbytes)
                    continue
                shared, per_model = cfg.slice_params(job.sl, p.name, [n for _, n in job.sources], job.t)
                vocab_job = vocab is not None and is_vocab_tensor(p.name)
                if (cfg.method.name == "passthrough" and per_model[0].get("scale") is None and not vocab_job
                        and entries[0].dtype == p.dtype and not inputs[job.sources[0][0]].adapted(entries[0])):
                    writer.copy(p.name, entries[0])  # a plain copy: the input's bits
                    density[p.name] = 0.0
                else:
                    compute = dtypes.to_torch(_compute_dtype(cfg, entries))
                    tensors = []
                    for (i, _), e in zip(job.sources, entries):
                        tensors.append(inputs[i].load(e).to(compute))
                    if vocab_job:
                        at = [i for i, _ in job.sources]
                        base_at = at.index(vocab.base) if vocab.base in at else None
                        try:
                            tensors = align_rows(vocab.plan, p.name, tensors, at, base_at, vocab.refs)
                        except ValueError as e:
                            raise MergeError(f"tensor {p.name!r}: {e} (inputs: {', '.join(job_paths)})") from None
                    if gpu is not None:
                        tensors = [x.to(gpu) for x in tensors]
                    with _naming_tensor(cfg, p, job_paths, allow_nonfinite):
                        if not allow_nonfinite:
                            _check_finite(tensors, job_paths)
                        result = cfg.method.merge(tensors, job.sl.base_index, shared, per_model, tensor_name=p.name,
                                                  generator=generator, out_dtype=dtypes.to_torch(p.dtype))
                    res = result.to(dtypes.to_torch(p.dtype))
                    ref = tensors[job.sl.base_index or 0]
                    density[p.name] = int(torch.count_nonzero(res != ref.to(res.dtype))) / max(1, res.numel())
                    writer.write(p.name, res.cpu())
                merged += 1
                bar.update(p.nbytes)
        dest.copy_side_files(donor)
        _write_tokenizer(cfg, dest, vocab, donor, [m.path for m in cfg.models])
        _rewrite_config(dest, cfg.out_dtype or cfg.dtype, n_layers, vocab.plan.rows if vocab else None)
        dest.write_text("ferrox_config.yml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
        lines = [f"Method: `{cfg.method.name}` ({cfg.method.reference}) over {len(cfg.slices)} slices, "
                 f"{n_layers} layers out.", "", "Slices:"]
        lines += [f"- {sl.where}: " + ", ".join(f"`{paths[s.model]}` layers [{s.start}, {s.end})" for s in sl.sources)
                  for sl in cfg.slices]
        lines += ["", f"Weights: {ckpt.human_bytes(total)}. The resolved config is in `ferrox_config.yml`."]
        dest.model_card(f"Merged with ferrox ({cfg.method.name})", lines)
        dest.write_report({"method": cfg.method.name, "tensors_merged": merged, "tensors_copied": copied,
                           "bytes": total, "layers": n_layers},
                          {name: {"changed": round(frac, 6)} for name, frac in density.items()})
        report_out = dest.out
    return MergeReport(report_out, len(planned), merged, copied, total, time.perf_counter() - start, density)


def merge_checkpoints(cfg: MergeConfig, out: str, *, force: bool = False, max_shard_bytes: int = 5 * 10**9,
                      allow_nonfinite: bool = False, progress: Optional[bool] = None,
                      chunk_bytes: int = CHUNK_BYTES, device: str = "cpu", fsync: bool = True) -> MergeReport:
    """Runs a merge config and writes the merged model to ``out``.

    A method outside generalized task arithmetic (slerp, model_stock, ...)
    is a torch function per tensor: one tensor of each input is read, merged
    in float32 and written before the next, so memory is bounded by the
    largest tensor's inputs, not the model's size.

    On the CPU each tensor of a GTA method is merged by the Rust core straight from the input
    files, chunk by chunk (positioned reads into reusable buffers of about
    ``chunk_bytes`` in all), and written at its precomputed offset in the
    output, so memory stays bounded whatever the model's size; torch is not
    imported. With ``device="cuda"`` (or ``"cuda:N"``) each tensor is moved to
    the GPU and merged by ferrox's CUDA kernels (bitwise the CPU result, per
    tensor or per row).

    The output is written by ``ferrox.output.OutputFolder``: refused if it
    overlaps an input, built in a temporary sibling folder, fsynced and
    renamed into place. ``fsync=False`` skips waiting for the disk: faster,
    but after a power loss or OS crash the renamed folder may hold incomplete
    files. ``max_shard_bytes`` splits the weights into shards of at most
    that many bytes (mergekit's ``--out-shard-size`` unit; a tensor is never
    split, so a larger one gets a shard of its own); 0 writes one shard.

    Inputs whose float dtypes differ are cast to the compute dtype (``dtype``,
    else F32); the copied config.json's dtype field is set to the output's
    when ``dtype``/``out_dtype`` is given."""
    from tqdm import tqdm

    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 0:
        raise MergeError(f"max_shard_bytes: expected a byte count >= 0 (0: one shard), got {max_shard_bytes!r}")
    if cfg.slices is not None:
        return _merge_sliced(cfg, out, force=force, max_shard_bytes=max_shard_bytes, allow_nonfinite=allow_nonfinite,
                             progress=progress, device=device, fsync=fsync)
    gpu = parse_device(device)
    start = time.perf_counter()
    refs = _input_refs(cfg)
    inputs = [_Inputs(r.path, r.lora) for r in refs]
    paths = [i.path for i in inputs]
    vocab = _vocab(cfg, refs)
    # The reference model (tensor order, default dtypes, integer buffers): the base, else the first model.
    ref = 0 if cfg.method.in_core else (cfg.base_index or 0)
    planned = _plan(cfg, [inputs[ref]] + inputs[:ref] + inputs[ref + 1:], vocab.plan.rows if vocab else None)
    if vocab is not None and not any(is_vocab_tensor(p.name) for p in planned):
        raise MergeError(f"{paths[ref]}: a tokenizer merge re-indexes the vocabulary tensors "
                         f"(embed_tokens, lm_head, ...), and this model has none")
    if cfg.num_layers is None:
        cfg.num_layers = model_num_layers(refs[ref].path, inputs[ref].by_name)
    if max_shard_bytes == 0:  # mergekit's "no limit"
        max_shard_bytes = sum(p.nbytes for p in planned) + 1
    density, merged, copied = {}, 0, 0
    total = sum(p.nbytes for p in planned)
    sources = [r.path for r in refs] + [r.lora for r in refs if r.lora] + ([cfg.config_path] if cfg.config_path else [])
    with OutputFolder(out, fmt="merge", inputs=sources, force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={"ferrox_method": cfg.method.name})
        bar = tqdm(total=total, desc=f"ferrox merge ({cfg.method.name})", unit="B", unit_scale=True,
                   disable=None if progress is None else not progress)
        generator = None if cfg.method.in_core else _run_generator(cfg, gpu)
        with bar:
            for p in _merge_order(cfg, planned, lambda q: q.name):
                entries = [i.entry(p.name) for i in inputs]
                if entries[ref].dtype not in dtypes.KERNEL_FLOATS:
                    _copy_integer(writer, p, inputs[ref], entries[ref])  # the reference model's, bit for bit
                    copied += 1
                else:
                    in_memory = (vocab is not None and is_vocab_tensor(p.name)) or any(
                        i.adapted(e) for i, e in zip(inputs, entries))
                    if not cfg.method.in_core:
                        streamed = (gpu is None and not in_memory and cfg.base_index is not None
                                    and getattr(cfg.method, "native", None) is not None)
                        changed = None
                        if streamed:
                            changed = _merge_native_files(cfg, p, entries, writer, chunk_bytes, paths,
                                                          allow_nonfinite)
                        if changed is None:
                            changed = _merge_torch(cfg, p, inputs, entries, writer, allow_nonfinite, paths, gpu,
                                                   generator, vocab)
                    elif gpu is not None or in_memory:
                        changed = _merge_on_device(cfg, p, inputs, entries, writer, allow_nonfinite, paths, gpu,
                                                   vocab)
                    else:
                        changed = _merge_one(cfg, p, entries, writer, allow_nonfinite, chunk_bytes, paths)
                    density[p.name] = changed / max(1, dtypes.numel(p.shape))
                    merged += 1
                bar.update(p.nbytes)
        donor = cfg.base or cfg.models[0].path  # mergekit's donor: base_model, else the first model
        dest.copy_side_files(donor)
        _write_tokenizer(cfg, dest, vocab, donor, [r.path for r in refs])
        if cfg.out_dtype or cfg.dtype or vocab is not None:
            _rewrite_config(dest, cfg.out_dtype or cfg.dtype, None, vocab.plan.rows if vocab else None)
        dest.write_text("ferrox_config.yml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
        dest.model_card(f"Merged with ferrox ({cfg.method.name})", _model_card(cfg, total))
        dest.write_report({"method": cfg.method.name, "tensors_merged": merged, "tensors_copied": copied,
                           "bytes": total},
                          {name: {"changed": round(frac, 6)} for name, frac in density.items()})
        report_out = dest.out
    return MergeReport(report_out, len(planned), merged, copied, total, time.perf_counter() - start, density)
