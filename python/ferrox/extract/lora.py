"""``extract_lora``: a fine-tune's task vectors as a PEFT LoRA adapter.

Each selected matrix's task vector Δ = W_ft − W_base (f32) is factored by a
truncated SVD, Δ ≈ U_r S_r V_rᵀ, written as ``lora_B = U_r √S_r`` and
``lora_A = √S_r V_rᵀ`` (the singular values split evenly between the two
factors, as mergekit-extract-lora does by default: both factors then have
the same norm). PEFT adds ``(lora_alpha / r) · B·A`` to the base weight, so
``lora_alpha = r`` and the adapter adds B·A exactly.

The SVD is exact (``torch.linalg.svd``) where the rank is at least half the
smaller side or the matrix is small, randomized otherwise
(``torch.svd_lowrank``: a seeded Gaussian sketch with oversampling and power
iterations, so the result is deterministic). The randomized factors are
those of PΔ for an orthogonal projector P, so their error is still measured,
not assumed: the report gives every matrix's relative Frobenius error
‖Δ − B·A‖_F / ‖Δ‖_F of the written (rounded) factors, the energy kept
Σ_{i≤r} s_i² / ‖Δ‖_F², and for the exact path the Eckart–Young optimum.

Checkpoints are read tensor by tensor (positioned reads of the Rust core):
memory is a base matrix, a fine-tune matrix and the SVD's workspace, never a
whole model. Tensors are assumed in ``nn.Linear`` layout ([out, in]); Conv1D
checkpoints (GPT-2's [in, out]) are not detected.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from .. import checkpoint as ckpt
from .. import dtypes
from ..delta.codec import _as_checkpoint
from ..delta.select import Selection
from ..output import OutputFolder, PlannedTensor

FORMAT = "lora"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: Matrices whose smaller side is at most this are factored exactly whatever
#: the rank (a full SVD of them costs less than the sketch's bookkeeping).
SMALL_SIDE = 512
#: Last module-name components of embedding tables: PEFT gives nn.Embedding
#: its own LoRA layout (``lora_embedding_A`` [r, vocab], ``lora_embedding_B``
#: [dim, r], the delta being (B·A)ᵀ).
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                     "token_type_embeddings", "embed_positions", "embed_in", "shared")
_ROW_BLOCK = 1024


@dataclass
class LoraExtraction:
    """What ``extract_lora`` produced: the folder (``out``) or, when no folder
    was asked for, the adapter's tensors (``state``, PEFT's names) and
    ``config`` (the ``adapter_config.json`` contents); ``summary`` and
    ``tensors`` are the report's."""
    out: Optional[str]
    config: dict
    state: Optional[dict]
    summary: dict
    tensors: Dict[str, dict]
    seconds: float


def is_lora_target(name: str, dtype: str, shape: Sequence[int]) -> bool:
    """A tensor PEFT can put a LoRA on: the ``weight`` of a module, a 2-D
    float matrix."""
    return name.endswith(".weight") and dtype in dtypes.KERNEL_FLOATS and len(shape) == 2 and 0 not in shape


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_MODULES


def _matches(module: str, key: str) -> bool:
    """PEFT's rule for a list entry of ``target_modules`` / ``modules_to_save``
    (the full name, or a dotted suffix of it)."""
    return module == key or module.endswith("." + key)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank: expected a positive integer, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank: expected a positive integer (at least 1), got {rank}")
    return rank


def _svd_choice(svd: str, rank: int, shape) -> str:
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd: expected 'auto', 'exact' or 'randomized', got {svd!r}")
    if svd != "auto":
        return svd
    k = min(shape)
    return "exact" if 2 * rank >= k or k <= SMALL_SIDE else "randomized"


def factor(delta, rank: int, svd: str = "auto", *, oversample: Optional[int] = None, niter: int = 4, seed: int = 0):
    """``(B, A, s, method, tail)`` for the f32 matrix ``delta`` [m, n]: B [m, r]
    and A [r, n] (f32) with B·A the rank-``rank`` truncated SVD (√S on each
    side), ``s`` the ``rank`` singular values kept, ``method`` ``"exact"`` or
    ``"randomized"``, and ``tail`` the sum of the squared discarded singular
    values (exact path; None for the randomized one)."""
    import torch

    m, n = delta.shape
    k = min(m, n)
    method = _svd_choice(svd, rank, delta.shape)
    if rank > k:
        raise ValueError(f"rank {rank} exceeds the smaller side of a {m}x{n} matrix")
    if oversample is None:
        oversample = max(10, rank // 2)
    if oversample < 0 or niter < 0:
        raise ValueError(f"oversample and niter: expected non-negative integers, got {oversample} and {niter}")
    q = min(rank + oversample, k)
    if method == "randomized" and q >= k:
        method = "exact"  # the sketch would be as wide as the matrix
    if method == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        tail = float(s[rank:].double().square().sum())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # svd_lowrank draws its sketch from the global generator
            u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
        vh = v.mT
        tail = None
    root = s[:rank].clamp_min(0).sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    return b.contiguous(), a.contiguous(), s[:rank].clone(), method, tail


def _residual_sq(delta, b, a) -> float:
    """‖delta − b·a‖_F² in f32 blocks of rows (no second m×n matrix)."""
    total = 0.0
    for i in range(0, delta.shape[0], _ROW_BLOCK):
        r = delta[i:i + _ROW_BLOCK] - b[i:i + _ROW_BLOCK] @ a
        total += float(r.double().square().sum())
    return total


@dataclass
class _Job:
    name: str        # the checkpoint tensor
    module: str
    ft: ckpt.TensorEntry
    base: ckpt.TensorEntry
    embedding: bool  # factor Δᵀ, PEFT's embedding layout
    a_name: str
    b_name: str
    out_dtype: str


def _peft_names(module: str, embedding: bool):
    prefix = f"base_model.model.{module}."
    if embedding:
        return prefix + "lora_embedding_A", prefix + "lora_embedding_B"
    return prefix + "lora_A.weight", prefix + "lora_B.weight"


def _out_dtype(dtype, ft_dtype: str) -> str:
    if dtype is None:
        return ft_dtype
    name = dtypes.from_torch(dtype) if not isinstance(dtype, str) else dtype
    if name not in dtypes.DTYPES:
        name = dtypes.from_config_name(name)
    if name not in dtypes.KERNEL_FLOATS:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    return name


def _plan(bi, fi, rank, sel, modules_to_save, dtype):
    base_by_name = {t.name: t for t in bi.tensors}
    saves = list(modules_to_save or ())
    for key in saves:
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith("."):
            raise ValueError(f"modules_to_save: expected module names such as 'lm_head', got {key!r}")
    saved, hit = [], set()
    for t in fi.tensors:
        mod = _module(t.name)
        keys = [k for k in saves if _matches(mod, k)]
        if keys:
            saved.append(t)
            hit.update(keys)
    missing = [k for k in saves if k not in hit]
    if missing:
        raise ValueError(f"modules_to_save: no tensor of the fine-tune belongs to a module named {missing[0]!r}")
    saved_names = {t.name for t in saved}
    jobs = []
    for t in fi.tensors:
        if t.name in saved_names or not is_lora_target(t.name, t.dtype, t.shape) or not sel(t.name, t.dtype, t.shape):
            continue
        b = base_by_name.get(t.name)
        if b is None:
            raise ValueError(f"tensor {t.name!r}: selected for the adapter but the base has no such tensor "
                             f"(exclude it with --select '!{t.name}', or save it whole with modules_to_save)")
        if tuple(b.shape) != tuple(t.shape):
            raise ValueError(f"tensor {t.name!r}: the base's shape is {list(b.shape)} and the fine-tune's "
                             f"{list(t.shape)}; a task vector needs equal shapes (save it whole with "
                             f"modules_to_save, or exclude it)")
        if b.dtype not in dtypes.KERNEL_FLOATS:
            raise ValueError(f"tensor {t.name!r}: the base's dtype is {b.dtype}; expected F32, F16 or BF16")
        if rank > min(t.shape):
            raise ValueError(f"rank {rank} exceeds the smaller side of tensor {t.name!r} {list(t.shape)}; "
                             f"use a rank of at most {min(t.shape)} or exclude it")
        mod = _module(t.name)
        emb = _is_embedding(mod)
        a_name, b_name = _peft_names(mod, emb)
        jobs.append(_Job(t.name, mod, t, b, emb, a_name, b_name, _out_dtype(dtype, t.dtype)))
    if not jobs:
        raise ValueError(f"select: no matrix selected for the adapter (rule: {sel.to_json()['rule']}; include "
                         f"{list(sel.include) or 'any'}, exclude {list(sel.exclude)}; {len(saved)} tensors saved "
                         f"whole)")
    return jobs, saved


def _target_modules(jobs, fi):
    """Last name components where they pick out exactly the factored modules
    (compact, as PEFT configs usually are), else the full module names."""
    mods = {j.module for j in jobs}
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in mods})
    all_mods = {_module(t.name) for t in fi.tensors}
    if all(m in mods for m in all_mods if any(_matches(m, s) for s in suffixes)):
        return suffixes
    return sorted(mods)


def _config(base_ref, rank, targets, saves, bi_root):
    task_type = None
    cfg_path = os.path.join(bi_root, "config.json") if bi_root and os.path.isdir(bi_root) else None
    if cfg_path and os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                archs = json.load(f).get("architectures") or []
        except (OSError, ValueError, AttributeError):
            archs = []
        if any(str(a).endswith("ForCausalLM") for a in archs):
            task_type = "CAUSAL_LM"
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_ref,
        "r": rank, "lora_alpha": rank, "target_modules": targets, "modules_to_save": list(saves) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def extract_lora(base, finetuned, rank, out=None, select=None, modules_to_save=None, progress=None, force=False,
                 fsync=True, *, svd: str = "auto", dtype=None, oversample: Optional[int] = None, niter: int = 4,
                 seed: int = 0) -> LoraExtraction:
    """Extracts a rank-``rank`` LoRA adapter from ``finetuned`` against
    ``base`` (checkpoint files/folders or state dicts).

    ``out``: the adapter folder to write (atomically; ``force`` replaces an
    existing one); None keeps the adapter in memory (``result.state``).
    ``select``: globs as in ``ferrox compress`` (``GLOB`` includes, ``!GLOB``
    excludes); by default every module weight that is a 2-D float matrix
    except ``*embed*``, ``*lm_head*``, ``*norm*``, ``*pooler*``.
    ``modules_to_save``: module names (``"lm_head"``, ``"embed_tokens"``)
    whose fine-tuned tensors are stored whole (PEFT's ``modules_to_save``).
    ``svd``: ``"auto"`` (exact where 2·rank ≥ min(m, n) or min(m, n) ≤ 512,
    randomized otherwise), ``"exact"`` or ``"randomized"`` (``oversample``
    extra sketch columns, default max(10, rank/2); ``niter`` power
    iterations; ``seed``). ``dtype``: of the factors (default: each
    fine-tuned matrix's dtype).

    Bad arguments (rank < 1 or above a selected matrix's smaller side, shape
    mismatches, nothing selected) raise ``ValueError`` before anything is
    written; a non-finite task vector raises one naming the tensor, and the
    folder is not written.
    """
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    rank = _check_rank(rank)
    _svd_choice(svd, rank, (rank, rank))
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    keep: list = []
    try:
        base_path = _as_checkpoint(base, "base", keep)
        ft_path = _as_checkpoint(finetuned, "finetuned", keep)
        bi, fi = ckpt.read_checkpoint(base_path), ckpt.read_checkpoint(ft_path)
        sel = Selection.from_patterns(select)
        jobs, saved = _plan(bi, fi, rank, sel, modules_to_save, dtype)
        base_ref = os.fspath(base) if isinstance(base, (str, os.PathLike)) else None
        config = _config(base_ref, rank, _target_modules(jobs, fi), modules_to_save or (),
                         base_path if os.path.isdir(base_path) else None)
        planned = []
        for j in jobs:
            m, n = j.ft.shape
            if j.embedding:
                m, n = n, m
            size = dtypes.itemsize(j.out_dtype)
            planned += [PlannedTensor(j.a_name, j.out_dtype, (rank, n), rank * n * size),
                        PlannedTensor(j.b_name, j.out_dtype, (m, rank), m * rank * size)]
        planned += [PlannedTensor(f"base_model.model.{t.name}", t.dtype, tuple(t.shape), t.nbytes) for t in saved]
        in_adapter = {j.name for j in jobs} | {t.name for t in saved}
        left_out = [t.name for t in fi.tensors if t.name not in in_adapter]
        reader = ckpt.TensorReader()
        records: Dict[str, dict] = {}
        state = {} if out is None else None

        def run(emit):
            total = sum(j.ft.nbytes + j.base.nbytes for j in jobs) + sum(t.nbytes for t in saved)
            with tqdm(total=total, desc="ferrox extract lora", unit="B", unit_scale=True,
                      disable=None if progress is None else not progress) as bar:
                for j in jobs:
                    t0 = time.perf_counter()
                    delta = reader.read(j.ft).float()
                    delta -= reader.read(j.base).float()
                    if j.embedding:
                        delta = delta.mT.contiguous()
                    if not bool(torch.isfinite(delta).all()):
                        raise ValueError(f"tensor {j.name!r}: the task vector (fine-tune − base) has non-finite "
                                         f"values")
                    norm_sq = float(delta.double().square().sum())
                    if norm_sq == 0.0:
                        b = torch.zeros(delta.shape[0], rank)
                        a = torch.zeros(rank, delta.shape[1])
                        s, method, tail = torch.zeros(rank), "zero", 0.0
                    else:
                        b, a, s, method, tail = factor(delta, rank, svd, oversample=oversample, niter=niter,
                                                       seed=seed)
                    td = dtypes.to_torch(j.out_dtype)
                    b, a = b.to(td), a.to(td)
                    err_sq = _residual_sq(delta, b.float(), a.float())
                    kept = float(s.double().square().sum())
                    rec = {"shape": list(j.ft.shape), "method": method, "embedding": j.embedding,
                           "rel_error": (err_sq / norm_sq) ** 0.5 if norm_sq else 0.0,
                           "energy_kept": min(kept / norm_sq, 1.0) if norm_sq else 1.0,
                           "delta_norm": norm_sq ** 0.5, "top_singular_value": float(s[0]) if rank else 0.0,
                           "seconds": round(time.perf_counter() - t0, 4)}
                    if tail is not None:
                        rec["optimal_rel_error"] = (tail / norm_sq) ** 0.5 if norm_sq else 0.0
                    records[j.name] = rec
                    emit(j.a_name, a)
                    emit(j.b_name, b)
                    del delta
                    bar.update(j.ft.nbytes + j.base.nbytes)
                for t in saved:
                    emit(f"base_model.model.{t.name}", reader.read(t))
                    bar.update(t.nbytes)

        def summary():
            errs = [r["rel_error"] for r in records.values()]
            return {"rank": rank, "lora_alpha": rank, "factored_matrices": len(jobs),
                    "exact_svd": sum(r["method"] == "exact" for r in records.values()),
                    "randomized_svd": sum(r["method"] == "randomized" for r in records.values()),
                    "zero_deltas": sum(r["method"] == "zero" for r in records.values()),
                    "saved_whole": [t.name for t in saved], "left_out": left_out,
                    "max_rel_error": max(errs), "mean_rel_error": sum(errs) / len(errs),
                    "adapter_bytes": sum(p.nbytes for p in planned), "split": "sqrt(S) on both factors",
                    "target_modules": config["target_modules"]}

        if out is None:
            def keep_tensor(name, tensor):
                state[name] = tensor

            run(keep_tensor)
            return LoraExtraction(None, config, state, summary(), records, time.perf_counter() - start)

        with OutputFolder(out, fmt=FORMAT, inputs=[base_path, ft_path], force=force, fsync=fsync) as dest:
            # One file, however large: PEFT reads only adapter_model.safetensors.
            writer = dest.writer(planned, 1 << 62)
            run(writer.write)
            writer.close(sync=fsync)
            final = os.path.join(dest.path, ADAPTER_FILE)
            os.rename(writer.files[0], final)
            writer.files = [final]
            dest.write_text(CONFIG_FILE, json.dumps(config, indent=2) + "\n")
            s = summary()
            dest.write_report(s, records)
            dest.model_card("LoRA adapter extracted from a fine-tune (ferrox)", [
                f"Base: `{base_ref}`", "", f"Fine-tune: `{ft_path}`", "",
                f"Rank {rank} (lora_alpha {rank}: the adapter adds B·A) on {len(jobs)} matrices, by truncated "
                f"SVD of each task vector; relative Frobenius error at most {s['max_rel_error']:.4g} "
                f"(mean {s['mean_rel_error']:.4g}). Load with `peft.PeftModel.from_pretrained(base_model, "
                f"\"{os.path.basename(dest.out)}\")`."])
            out_abs = dest.out
        return LoraExtraction(out_abs, config, None, s, records, time.perf_counter() - start)
    finally:
        for tmp in keep:
            shutil.rmtree(tmp, ignore_errors=True)
