"""``compress``: a model checkpoint to a codebook folder, streaming tensor by
tensor (one weight in memory at a time) through the shared atomic writer;
``restore``: the dense model back, every tensor in its original dtype and
order; ``column_statistics``: per-input-column weights (mean x² of each
Linear's inputs) from calibration batches; ``input_grams``: each Linear's
input Gram matrix H = XᵀX / n from calibration batches (accumulated batch
by batch with forward hooks; the inputs themselves are not kept).

Calibrated compression (``grams`` given for a matrix): the layer-output
error ‖X·Wᵀ − X·Ŵᵀ‖² = n·tr(E H Eᵀ) (E = W − Ŵ) is what is minimised.
Each such matrix is first quantized by activation-weighted k-means (the
column weights are diag H unless ``column_weights`` gives others), grouped
into ``groups`` row groups, then refined by ``ferrox.codebook.learn_codebook``
for ``calib_steps`` steps on H: codewords and per-row scales by Adam, the
assignments by the proximal STE (``ferrox.codebook.joint``). It is stored in
the same format, with row scales; its record holds the relative Frobenius
``error`` as always plus the relative layer-output error on the calibration
data before (``calib_output_error_kmeans``) and after
(``calib_output_error``) the refinement. ``calib_steps=0`` keeps the
weighted k-means result (no scales stored).

Default selection: every 2-D float weight except ``*embed*``,
``*lm_head*``, ``*norm*`` (``--select GLOB``/``!GLOB`` changes it); every
other tensor (int64 buffers included) is copied verbatim."""

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

from .. import checkpoint as ckpt
from .. import dtypes
from ..delta.select import Selection
from . import format as fmt

#: What the codebook compressor leaves verbatim by default.
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*norm*")
#: Defaults of calibrated (joint) learning: steps, Adam step of the
#: codewords (in units of the group's weight RMS) and scales, latent step of
#: the proximal STE (in mean codeword gaps).
CALIB_STEPS, CALIB_LR, ASSIGN_LR = 30, 1e-3, 0.01
#: Placeholder of a per-tensor error in the header, patched once known
#: (a JSON float's repr is at most 24 characters).
_ERROR_PLACEHOLDER = "?" * 24


@dataclass
class CompressReport:
    out: str
    quantized: int
    verbatim: int
    bytes_written: int
    seconds: float
    summary: dict
    #: Selected matrices stored verbatim because vector_dim does not divide their columns.
    undivided: list = field(default_factory=list)


def selection(select) -> Selection:
    """The codebook selection rule (BitDelta's glob rule with this
    compressor's default exclusions)."""
    if select is None:
        return Selection((), DEFAULT_EXCLUDE)
    patterns = [select] if isinstance(select, str) else list(select)
    inc = [p for p in patterns if not p.startswith("!")]
    exc = [p[1:] for p in patterns if p.startswith("!")]
    return Selection(inc, exc if exc else (DEFAULT_EXCLUDE if not inc else ()))


def compress(model, bits: int, out, *, groups: int = 1, vector_dim: int = 1, select=None,
             column_weights: Optional[Dict[str, "object"]] = None, method: str = "auto", seed: int = 0,
             grams: Optional[Dict[str, "object"]] = None, calib_steps: int = CALIB_STEPS,
             calib_lr: float = CALIB_LR, assign_lr: float = ASSIGN_LR, assign: str = "proximal",
             learn_scales: bool = True, force: bool = False, fsync: bool = True, progress: Optional[bool] = None,
             max_shard_bytes: int = 5 * 10**9) -> fmt.CodebookFolder:
    """Quantizes the selected matrices of the checkpoint ``model`` (file or
    folder) with 2**bits codewords into the folder ``out`` and returns it.

    ``groups``: row groups per matrix (one codebook each, rows grouped by
    their statistics); ``vector_dim``: sub-vector length of vector
    codebooks (a selected matrix whose column count it does not divide is
    an error where ``select`` has include globs, otherwise it is stored
    verbatim with a warning and listed in ``compress_report.undivided``); ``column_weights``: weight name -> float [in] per-input-column
    weights of the k-means objective (e.g. from ``column_statistics``; names
    that are not quantized matrices are ignored).

    ``grams``: weight name -> its layer's input Gram matrix H [in, in] (e.g.
    from ``input_grams``): those matrices are learned jointly on H (see the
    module docstring) for ``calib_steps`` steps with Adam step ``calib_lr``
    (codewords, in units of the group's weight RMS; scales), assignment step
    ``assign_lr`` (in mean codeword gaps; 0 freezes the codes), ``assign``
    ("proximal" or "ste") and ``learn_scales``; scalar codebooks only
    (``vector_dim`` 1)."""
    import torch
    from tqdm import tqdm

    from .. import _checks
    from ..output import OutputFolder, PlannedTensor
    from .codec import quantize

    if bits not in fmt.BITS:
        raise ValueError(f"bits: expected one of {fmt.BITS}, got {bits!r}")
    _checks.count("groups", groups, 1, 1 << 16)
    _checks.count("vector_dim", vector_dim, 1, 1 << 16)
    grams = grams or {}
    if grams:
        _check_joint_options(vector_dim, calib_steps, calib_lr, assign_lr, assign)
    joint = bool(grams) and calib_steps > 0
    start = time.perf_counter()
    path = os.fspath(model)
    info = ckpt.read_checkpoint(path)
    sel = selection(select)
    column_weights = column_weights or {}
    # Selected matrices whose columns d does not divide: an error where the
    # user named them (include globs), kept verbatim and reported otherwise.
    undivided = [t for t in info.tensors if sel(t.name, t.dtype, t.shape) and t.shape[1] % vector_dim]
    if undivided and sel.include:
        raise ValueError(f"vector_dim {vector_dim} does not divide the columns of "
                         + ", ".join(f"tensor {t.name!r} ({t.dtype} {list(t.shape)})" for t in undivided)
                         + f", selected by {list(sel.include)}: choose a vector_dim that divides every selected "
                         "matrix's column count or exclude them ('!GLOB')")
    if undivided:
        warnings.warn(f"vector_dim {vector_dim} does not divide the columns of {len(undivided)} selected "
                      "matrices, stored verbatim: "
                      + ", ".join(f"{t.name!r} ({t.dtype} {list(t.shape)})" for t in undivided), stacklevel=2)
    skipped = {t.name for t in undivided}
    planned, jobs, records = [], [], {}
    for t in info.tensors:
        if sel(t.name, t.dtype, t.shape) and t.name not in skipped:
            rows, cols = t.shape
            g = min(groups, rows)
            learned = joint and t.name in grams
            if t.name in grams and tuple(grams[t.name].shape) != (cols, cols):
                raise ValueError(f"grams: tensor {t.name!r} ({t.dtype} {list(t.shape)}) needs an input Gram "
                                 f"matrix [{cols}, {cols}], got {list(grams[t.name].shape)}")
            parts = fmt.planned_shapes(rows, cols, bits, vector_dim, g, permuted=g > 1,
                                       scaled=learned and learn_scales)
            for suffix, dt, shape in parts:
                planned.append(PlannedTensor(t.name + suffix, dt, shape, dtypes.numel(shape) * dtypes.itemsize(dt)))
            jobs.append(("codebook", t, g, parts))
            records[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "kind": "codebook", "bits": bits,
                               "vector_dim": vector_dim, "groups": g, "error": _ERROR_PLACEHOLDER,
                               "weighted": t.name in column_weights or t.name in grams,
                               "grouping": "std, max|w|/std, kurtosis (standardized), k-means" if g > 1 else "none"}
            if t.name in grams:
                records[t.name]["calib_output_error_kmeans"] = _ERROR_PLACEHOLDER
                records[t.name]["calib_output_error"] = _ERROR_PLACEHOLDER
                records[t.name]["joint"] = ({"steps": calib_steps, "lr": calib_lr, "assign": assign,
                                             "assign_lr": assign_lr, "learn_scales": learn_scales}
                                            if learned else None)
        else:
            planned.append(PlannedTensor(t.name, t.dtype, tuple(t.shape), t.nbytes))
            jobs.append(("verbatim", t))
            records[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "kind": "verbatim"}
            if t.name in skipped:
                records[t.name]["reason"] = f"vector_dim {vector_dim} does not divide {t.shape[1]} columns"
    def meta_json():
        return json.dumps({"select": sel.to_json(), "tensors": records}, separators=(",", ":"))

    total = sum(p.nbytes for p in planned)
    per, qbytes = {}, {}
    reader = ckpt.TensorReader()
    with OutputFolder(out, fmt=fmt.FORMAT, inputs=[path], force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={fmt.META_KEY: meta_json()})
        with tqdm(total=sum(t.nbytes for t in info.tensors), desc="ferrox compress codebook", unit="B",
                  unit_scale=True, disable=None if progress is None else not progress) as bar:
            for job in jobs:
                t = job[1]
                if job[0] == "verbatim":
                    writer.copy(t.name, t)
                    bar.update(t.nbytes)
                    continue
                _, _, g, parts = job
                w = reader.read(t)
                h = grams.get(t.name)
                cw = column_weights.get(t.name)
                if cw is None and h is not None:
                    cw = torch.as_tensor(h).diagonal().float().clamp(min=0)
                try:
                    q = quantize(w, bits, groups=g, vector_dim=vector_dim, weights=cw, method=method, seed=seed)
                    if h is not None:
                        rec = records[t.name]
                        bar.set_postfix_str(f"{t.name}: learning" if joint else t.name, refresh=True)
                        q, rec["calib_output_error_kmeans"], rec["calib_output_error"] = _learn(
                            w, q, h, calib_steps, calib_lr, assign_lr, assign, learn_scales)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"tensor {t.name!r} ({t.dtype} {list(t.shape)}): {e}") from None
                stored = q.stored()
                if g > 1 and fmt.PERM not in stored:  # planned: the grouping happened to keep the order
                    stored[fmt.PERM] = torch.arange(t.shape[0], dtype=fmt.perm_dtype(t.shape[0]))
                for suffix, _, _ in parts:
                    writer.write(t.name + suffix, stored[suffix])
                records[t.name]["error"] = float(q.error)
                qbytes[t.name] = sum(writer.where[t.name + s][2].nbytes for s, _, _ in parts)
                per[t.name] = {"bits": bits, "groups": g, "bits_per_weight": round(8 * qbytes[t.name] / t.numel, 4),
                               "rel_error": round(float(q.error), 6)}
                if h is not None:
                    for key in ("calib_output_error_kmeans", "calib_output_error"):
                        per[t.name][key] = round(records[t.name][key], 6)
                bar.update(t.nbytes)
        writer.patch_metadata(fmt.META_KEY, meta_json())
        dest.copy_side_files(path if os.path.isdir(path) else None)
        summary = fmt.summary(records, qbytes, total)
        dest.write_report(summary, per)
        dest.model_card("Codebook-quantized model (ferrox)", [
            f"Source: `{path}`", "",
            f"{summary['quantized_matrices']} matrices at {bits} bits ({summary['bits_per_quantized_weight']} "
            f"bits per weight with codebooks and permutations), {summary['verbatim_tensors']} tensors verbatim. "
            f"Restore with `ferrox restore {os.path.basename(os.fspath(out))} --out OUT`."])
        out_abs = dest.out
    folder = fmt.CodebookFolder.open(out_abs)
    folder.compress_report = CompressReport(out_abs, len(qbytes), len(jobs) - len(qbytes), total,
                                            time.perf_counter() - start, summary, sorted(skipped))
    return folder


def _check_joint_options(vector_dim, steps, lr, assign_lr, assign):
    from .joint import ASSIGN

    if vector_dim != 1:
        raise ValueError(f"calibrated (joint) learning needs scalar codebooks (vector_dim 1), got vector_dim "
                         f"{vector_dim}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"calib_steps: expected a non-negative integer, got {steps!r}")
    for name, v in (("calib_lr", lr), ("assign_lr", assign_lr)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < float("inf")):
            raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
    if assign not in ASSIGN:
        raise ValueError(f"assign: expected one of {ASSIGN}, got {assign!r}")


def _learn(w, q, gram, steps, lr, assign_lr, assign, learn_scales):
    """Refines the quantized ``q`` of ``w`` on the input Gram matrix ``gram``
    with ``learn_codebook``: (the new CodebookTensor, the relative layer-output
    error on the calibration data before, after). ``steps`` 0 only measures."""
    import torch

    from ..pack import pack_codes
    from .codec import codes as unpacked, dequantize, relative_error
    from .joint import learn_codebook, output_error

    h = torch.as_tensor(gram).detach().double().cpu()
    h = ((h + h.T) / 2).float()
    wf = w.detach().float().cpu()
    before = output_error(wf, dequantize(q, torch.float32), h)
    if steps == 0:
        return q, before, before
    if not float(((wf.double() @ h.double()) * wf.double()).sum()) > 0:
        # the layer's output is zero on the calibration data: nothing to fit,
        # so the weighted k-means result stays (unit scales, as planned)
        q.row_scale = torch.ones(q.shape[0]) if learn_scales else None
        return q, before, before
    perm = None if q.perm is None else q.perm.long()
    wp = wf if perm is None else wf[perm]
    cb, codes, scales, stats = learn_codebook(wp, q.codebooks[..., 0], unpacked(q), calib_gram=h,
                                              group_offsets=q.group_offsets, steps=steps, lr=lr, assign=assign,
                                              assign_lr=assign_lr, learn_scales=learn_scales, progress=False)
    out = type(q)(q.shape, q.dtype, q.bits, 1, pack_codes(codes, q.bits), cb[..., None].contiguous(),
                  q.group_offsets, q.perm, scales.float().contiguous() if learn_scales else None)
    w_hat = dequantize(out, torch.float32)
    out.error = relative_error(w, w_hat)
    return out, before, output_error(wf, w_hat, h)


def restore(folder, out=None, *, force: bool = False, fsync: bool = True, progress: Optional[bool] = None,
            max_shard_bytes: int = 5 * 10**9):
    """The dense model of a codebook folder: written to the folder ``out``
    (returns its path), or returned as a state dict when ``out`` is None.
    Quantized matrices are decoded in their original dtype and row order."""
    from tqdm import tqdm

    from ..output import OutputFolder, PlannedTensor
    from .codec import dequantize

    f = folder if isinstance(folder, fmt.CodebookFolder) else fmt.CodebookFolder.open(folder)
    reader = ckpt.TensorReader()
    if out is None:
        return {n: dequantize(f.codebook_tensor(n, reader)) if n in f.entries else reader.read(f.verbatim[n])
                for n in f.tensors}
    planned = [PlannedTensor(n, r["dtype"], tuple(r["shape"]), dtypes.numel(r["shape"]) * dtypes.itemsize(r["dtype"]))
               for n, r in f.tensors.items()]
    with OutputFolder(out, fmt="restore", inputs=[f.path], force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={"ferrox_restored_from": fmt.FORMAT})
        with tqdm(total=sum(p.nbytes for p in planned), desc="ferrox restore", unit="B", unit_scale=True,
                  disable=None if progress is None else not progress) as bar:
            for p in planned:
                if p.name in f.entries:
                    writer.write(p.name, dequantize(f.codebook_tensor(p.name, reader)))
                else:
                    writer.copy(p.name, f.verbatim[p.name])
                bar.update(p.nbytes)
        dest.copy_side_files(f.path)
        return dest.out


def _run_hooked(model, batches, names, hook, *, desc=None, progress: Optional[bool] = False):
    """Runs ``model`` without gradients over ``batches`` (token-id tensors,
    or mappings passed as ``model(**batch)``) with ``hook(key)``'s forward
    hook on every ``nn.Linear`` whose weight key (``MODULE.weight``) is in
    ``names`` (all when None); the hooks are removed whatever happens."""
    import torch
    from tqdm import tqdm

    hooks = []
    for mname, mod in model.named_modules():
        key = f"{mname}.weight" if mname else "weight"
        if isinstance(mod, torch.nn.Linear) and (names is None or key in names):
            hooks.append(mod.register_forward_hook(hook(key)))
    batches = list(batches)
    try:
        model.eval()
        with torch.no_grad():
            for b in tqdm(batches, desc=desc, unit="batch", disable=None if progress is None else not progress):
                if isinstance(b, Mapping):
                    model(**b)
                else:
                    model(b)
    finally:
        for h in hooks:
            h.remove()


def column_statistics(model, batches, names=None) -> Dict[str, "object"]:
    """Mean x² per input column of every ``nn.Linear`` of ``model`` over the
    calibration ``batches`` (token-id tensors passed to ``model``; a mapping
    is passed as ``model(**batch)``), keyed by the weight's state-dict name
    (``MODULE.weight``); ``names`` limits it."""
    sums, counts = {}, {}

    def hook(key):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return fn

    _run_hooked(model, batches, names, hook)
    return {k: (sums[k] / counts[k]).float() for k in sums}


def input_grams(model, batches, names=None, *, progress: Optional[bool] = None) -> Dict[str, "object"]:
    """The input Gram matrix H = XᵀX / n (float32 [in, in], accumulated in
    float64 batch by batch) of every ``nn.Linear`` of ``model`` over the
    calibration ``batches`` (token-id tensors passed to ``model``; a mapping
    is passed as ``model(**batch)``), keyed by the weight's state-dict name
    (``MODULE.weight``); ``names`` limits it. Memory: Σ in² × 8 bytes over those Linears (the inputs are not kept).
    Its diagonal is ``column_statistics``."""
    import torch

    sums, counts = {}, {}

    def hook(key):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to("cpu", torch.float64)
            if key in sums:
                sums[key].addmm_(x.T, x)
            else:
                sums[key] = x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return fn

    _run_hooked(model, batches, names, hook, desc="ferrox codebook calibration", progress=progress)
    return {k: (sums[k] / counts[k]).float() for k in sums}
