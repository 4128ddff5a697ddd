"""``apply_lora``: the reverse of ``extract_lora`` — a model with a PEFT LoRA
adapter merged into its weights, streamed tensor by tensor (what mergekit's
``model+lora`` inputs do before merging).

Each adapted weight becomes W + scale · B·A (``(B·A)ᵀ`` for PEFT's embedding
layout; transposed again with ``fan_in_fan_out``), computed in f32 and
rounded once to the weight's dtype (or ``dtype``); scale is
lora_alpha / r, or lora_alpha / √r with ``use_rslora``, with
``rank_pattern`` / ``alpha_pattern`` per module as PEFT reads them.
``modules_to_save`` tensors replace the model's; LoRA biases
(``lora_B.bias``) are added to the module's bias. DoRA and other PEFT
methods are refused.
"""

import json
import os
import re
from typing import Optional

from .. import checkpoint as ckpt
from .. import dtypes
from ..output import OutputFolder, PlannedTensor
from .lora import ADAPTER_FILE, CONFIG_FILE

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                   r"(?P<suffix>\.weight|\.bias)?$")


def split_lora_ref(ref: str):
    """mergekit's ``path+lora_path`` syntax: ``(model, adapter)``, adapter None
    when there is no ``+``."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"model: expected a path, got {ref!r}")
    if "+" not in ref:
        return ref, None
    model, adapter = ref.split("+", 1)
    if not model or not adapter:
        raise ValueError(f"model {ref!r}: expected MODEL+LORA with both parts")
    return model, adapter


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matching the module name
    (as a regex of a dotted suffix)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_adapter(folder):
    """``(config, entries)``: the adapter's config and its tensors (checkpoint
    entries by name, ``base_model.model.`` stripped)."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"adapter {folder}: no {CONFIG_FILE} (a PEFT LoRA adapter folder is expected)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} is not "
                         f"supported (only LORA)")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{cfg_path}: {key} must be a positive number, got {v!r}")
    path = os.path.join(folder, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"adapter {folder}: no {ADAPTER_FILE} (adapter_model.bin is not read: convert it)")
    entries = {}
    for t in ckpt.read_checkpoint(path).tensors:
        if not t.name.startswith(PREFIX):
            raise ValueError(f"{path}: tensor {t.name!r} does not start with {PREFIX!r} (not a PEFT adapter)")
        entries[t.name[len(PREFIX):]] = t
    return cfg, entries


def _plan(mi, cfg, entries, cfg_path):
    """Per model tensor: ``("lora", A, B, scale, embedding)``, ``("bias", B
    bias, scale)``, ``("replace", entry)`` or None (copied)."""
    by_name = {t.name: t for t in mi.tensors}
    plan, used = {}, set()
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rslora = bool(cfg.get("use_rslora"))
    fan = bool(cfg.get("fan_in_fan_out"))
    for key, e in entries.items():
        m = _LORA.match(key)
        if m is None:
            continue
        module, kind, suffix = m.group("module"), m.group("kind"), m.group("suffix")
        if kind.endswith("_A") and suffix != ".bias":
            emb = kind.startswith("lora_embedding")
            b_key = key[: m.start("kind")] + kind[:-1] + "B" + (suffix or "")
            if b_key not in entries:
                raise ValueError(f"adapter: {key!r} has no matching {b_key!r}")
            target = module + ".weight"
            w = by_name.get(target)
            if w is None:
                raise ValueError(f"adapter: {key!r} adapts {target!r}, which the model does not have")
            a, b = entries[key], entries[b_key]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter: {key!r} {list(a.shape)} and {b_key!r} {list(b.shape)} are not LoRA "
                                 f"factors of one rank")
            rows, cols = (b.shape[0], a.shape[1])
            want = (cols, rows) if (emb or fan) else (rows, cols)
            if tuple(w.shape) != want:
                raise ValueError(f"adapter: {key!r} gives a {rows}x{cols} update to {target!r} of shape "
                                 f"{list(w.shape)}")
            r = _pattern_value(cfg.get("rank_pattern"), module, r0)
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha0)
            scale = alpha / (r ** 0.5 if rslora else r)
            plan[target] = ("lora", a, b, scale, emb or fan)
            used.update((key, b_key))
    for key, e in entries.items():
        m = _LORA.match(key)
        if m is not None and m.group("kind") == "lora_B" and m.group("suffix") == ".bias":
            target = m.group("module") + ".bias"
            w = by_name.get(target)
            if w is None or tuple(w.shape) != tuple(e.shape):
                raise ValueError(f"adapter: {key!r} {list(e.shape)} has no matching bias {target!r} in the model")
            scale = plan.get(m.group("module") + ".weight", (None,) * 4)[3]
            plan[target] = ("bias", e, 1.0 if scale is None else scale)
            used.add(key)
    for key, e in entries.items():
        if key in used:
            continue
        if _LORA.match(key) is not None:
            raise ValueError(f"adapter: {key!r} has no matching factor")
        w = by_name.get(key)
        if w is None:
            raise ValueError(f"adapter: tensor {key!r} (modules_to_save) is not in the model")
        if tuple(w.shape) != tuple(e.shape):
            raise ValueError(f"adapter: tensor {key!r} {list(e.shape)} replaces a model tensor of shape "
                             f"{list(w.shape)} (a resized vocabulary is not supported)")
        plan[key] = ("replace", e)
    if not plan:
        raise ValueError(f"{cfg_path}: the adapter has no LoRA factors or saved modules")
    return plan


def apply_lora(model, adapter, out=None, *, dtype=None, force: bool = False, fsync: bool = True,
               progress: Optional[bool] = None, max_shard_bytes: int = 5 * 10**9):
    """``model`` (checkpoint file or folder) with the PEFT LoRA ``adapter``
    folder merged in: written to the folder ``out`` (atomically, config and
    tokenizer files copied from the model folder), or returned as a state
    dict when ``out`` is None. ``dtype``: of the merged tensors (default: each
    model tensor's). Mismatched names or shapes raise ``ValueError`` naming
    the tensor before anything is written."""
    import torch
    from tqdm import tqdm

    model_path = os.fspath(model)
    cfg, entries = read_adapter(adapter)
    mi = ckpt.read_checkpoint(model_path)
    plan = _plan(mi, cfg, entries, os.path.join(os.fspath(adapter), CONFIG_FILE))
    out_dt = None if dtype is None else (dtype if isinstance(dtype, str) and dtype in dtypes.DTYPES else
                                         dtypes.from_torch(dtype) if not isinstance(dtype, str)
                                         else dtypes.from_config_name(dtype))
    if out_dt is not None and out_dt not in dtypes.KERNEL_FLOATS:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    reader = ckpt.TensorReader()

    def out_dtype(t):
        return out_dt if (out_dt is not None and t.dtype in dtypes.KERNEL_FLOATS) else t.dtype

    def merged(t):
        job = plan[t.name]
        if job[0] == "replace":
            x = reader.read(job[1])
            return x.to(dtypes.to_torch(out_dtype(t))) if x.is_floating_point() else x
        w = reader.read(t).float()
        if job[0] == "lora":
            _, a, b, scale, transposed = job
            upd = reader.read(b).float() @ reader.read(a).float()
            w += scale * (upd.mT if transposed else upd)
        else:
            w += job[2] * reader.read(job[1]).float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"tensor {t.name!r}: merging the adapter gave non-finite values")
        return w.to(dtypes.to_torch(out_dtype(t)))

    for t in mi.tensors:
        if t.name in plan and plan[t.name][0] != "replace" and t.dtype not in dtypes.KERNEL_FLOATS:
            raise ValueError(f"tensor {t.name!r}: the adapter changes a {t.dtype} tensor; expected F32, F16 or BF16")
    bar = tqdm(total=len(mi.tensors), desc="ferrox apply lora", unit="tensor",
               disable=None if progress is None else not progress)
    with bar:
        if out is None:
            state = {}
            for t in mi.tensors:
                state[t.name] = merged(t) if t.name in plan else reader.read(t)
                bar.update(1)
            return state
        planned = [PlannedTensor(t.name, out_dtype(t), tuple(t.shape), t.numel * dtypes.itemsize(out_dtype(t)))
                   for t in mi.tensors]
        with OutputFolder(out, fmt="apply-lora", inputs=[model_path, os.fspath(adapter)], force=force,
                          fsync=fsync) as dest:
            writer = dest.writer(planned, max_shard_bytes)
            for t in mi.tensors:
                if t.name in plan:
                    writer.write(t.name, merged(t))
                elif out_dtype(t) != t.dtype:
                    writer.write(t.name, reader.read(t).to(dtypes.to_torch(out_dtype(t))))
                else:
                    writer.copy(t.name, t)
                bar.update(1)
            dest.copy_side_files(model_path if os.path.isdir(model_path) else None)
            return dest.out
