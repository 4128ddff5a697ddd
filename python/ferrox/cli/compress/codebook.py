"""``ferrox compress codebook MODEL --bits B --out D``: every selected matrix
as 2^B k-means codewords plus packed B-bit codes (per tensor, or per group
of similarly distributed rows with ``--groups G``; d-dim sub-vectors with
``--vector-dim d``); other tensors verbatim.

Calibration file (``--calib FILE``): a ``.safetensors`` or ``.pt`` file with
either an integer tensor ``input_ids`` [N, seq] or float tensors named like
the model's weights (``NAME`` -> [in], per-input-column weights).

With ``input_ids`` (needs a torch model of MODEL: ferrox's tiny GPT folders,
or transformers for other folders) the rows run through the model in
batches of ``--batch-size``; forward hooks accumulate each selected
Linear's input Gram matrix H = XᵀX / n (Σ in² × 8 bytes of memory; the
inputs are not kept). Each matrix is then quantized by activation-weighted
k-means (column weights diag H) and refined by joint learning for
``--calib-steps`` steps: codewords and per-row scales by gradient, the
assignments by the proximal STE, minimising the layer-output error
‖X·Wᵀ − X·Ŵᵀ‖² (``ferrox.codebook.joint``). The learned row scales are
stored; ``ferrox inspect`` shows each matrix's layer-output error on the
calibration data before and after. ``--calib-steps 0`` (and ``--vector-dim``
> 1, which joint learning does not cover) stops at the weighted k-means.

With per-column weights the k-means objective is Σ_col w_col (W − Ŵ)²
(activation-weighted k-means, no joint learning).
"""

from .. import _common
from ...codebook.compress import ASSIGN_LR, CALIB_LR, CALIB_STEPS


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "codebook", run, "k-means codebook quantization to 2-8 bits per weight",
                            description=__doc__.split("\n\n")[0].replace("``", ""),
                            full_name=f"{parent} codebook" if parent else "codebook")
    p.add_argument("model", help="the model to quantize (safetensors file or HF folder)")
    p.add_argument("--bits", type=int, required=True, choices=(2, 3, 4, 8), help="bits per code (2^B codewords)")
    p.add_argument("--groups", type=int, default=1, help="row groups per matrix, one codebook each (default 1)")
    p.add_argument("--vector-dim", type=int, default=1,
                   help="codewords of d consecutive columns (product quantization; default 1 = scalar)")
    p.add_argument("--calib", help="calibration file: 'input_ids' [N, seq] (activation-weighted k-means, then "
                                   "joint learning of codewords, scales and assignments on each layer's inputs), "
                                   "or per-column weights by tensor name (weighted k-means only)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration rows per forward pass (default 8)")
    p.add_argument("--calib-steps", type=int, default=CALIB_STEPS,
                   help=f"joint-learning steps per matrix with --calib input_ids (default {CALIB_STEPS}; "
                        "0 = weighted k-means only)")
    p.add_argument("--calib-lr", type=float, default=CALIB_LR,
                   help=f"Adam step of the codewords (in units of the group's weight RMS) and row scales "
                        f"(default {CALIB_LR:g})")
    p.add_argument("--assign-lr", type=float, default=ASSIGN_LR,
                   help=f"proximal-STE latent step in mean codeword gaps (default {ASSIGN_LR:g}; 0 keeps the "
                        "k-means assignments)")
    p.add_argument("--seed", type=int, default=0, help="seed of the grouping / vector k-means (default 0)")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="quantize tensors matching GLOB ('!GLOB' excludes); repeatable. Default: every 2-D float "
                        "tensor except *embed*, *lm_head*, *norm*")
    _common.add_output_options(p, device=False, positional=False)
    return p


def _load_calib(path: str):
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a dict of tensors ('input_ids', or per-column weights by name)")
    return data


def _token_batches(path: str, data: dict, batch_size: int):
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
    ids = data["input_ids"]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        raise ValueError(f"{path}: expected an integer tensor 'input_ids' of shape [N, seq]")
    return list(ids.long().split(batch_size))


def _column_weights(path: str, data: dict):
    import torch

    bad = [k for k, v in data.items() if not torch.is_tensor(v) or not v.dtype.is_floating_point or v.dim() != 1]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is not a 1-D float tensor of per-column weights")
    return {k: v.float() for k, v in data.items()}


def calibration_weights(path: str, model: str, batch_size: int):
    """Per-column weights from a calibration file (see the module doc)."""
    data = _load_calib(path)
    if "input_ids" in data:
        from ...codebook.compress import column_statistics
        from .bitdelta import load_model

        return column_statistics(load_model(model), _token_batches(path, data, batch_size))
    return _column_weights(path, data)


def calibration_grams(path: str, model: str, batch_size: int, names=None, progress=None):
    """Input Gram matrices of the Linears named ``names`` (weight names) from
    a calibration file holding ``input_ids``, or None when it holds
    per-column weights instead."""
    data = _load_calib(path)
    if "input_ids" not in data:
        return None
    from ...codebook.compress import input_grams
    from .bitdelta import load_model

    batches = _token_batches(path, data, batch_size)
    net = load_model(model)
    keys = _checkpoint_names(net, names)
    grams = input_grams(net, batches, set(keys), progress=progress)
    return {keys[k]: h for k, h in grams.items()}


def _checkpoint_names(net, names):
    """Module weight name -> checkpoint tensor name for the Linears of
    ``net`` whose weight is one of ``names``: the same name, or the name
    without the leading components a task head adds (transformers'
    ``bert.encoder...`` for a checkpoint's ``encoder...``)."""
    import torch

    wanted = set(names) if names is not None else None
    out = {}
    for mname, mod in net.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        key = f"{mname}.weight" if mname else "weight"
        parts = key.split(".")
        for i in range(len(parts)):
            cand = ".".join(parts[i:])
            if wanted is None or cand in wanted:
                out[key] = cand
                break
    return out


def run(args) -> int:
    from ... import checkpoint
    from ...codebook.compress import compress, selection

    out = _common.output_path(args)
    if args.groups < 1:
        raise ValueError(f"--groups: expected a positive integer, got {args.groups}")
    if args.vector_dim < 1:
        raise ValueError(f"--vector-dim: expected a positive integer, got {args.vector_dim}")
    if args.calib_steps < 0:
        raise ValueError(f"--calib-steps: expected a non-negative integer, got {args.calib_steps}")
    for flag, v in (("--calib-lr", args.calib_lr), ("--assign-lr", args.assign_lr)):
        if not 0 <= v < float("inf"):
            raise ValueError(f"{flag}: expected a finite number >= 0, got {v}")
    weights = grams = None
    if args.calib:
        sel = selection(args.select)
        names = {t.name for t in checkpoint.read_checkpoint(args.model).tensors if sel(t.name, t.dtype, t.shape)}
        grams = calibration_grams(args.calib, args.model, args.batch_size, names, _common.progress(args))
        if grams is not None and not grams:
            raise ValueError(f"{args.calib}: the calibration run reached no nn.Linear whose weight is a selected "
                             f"matrix of {args.model} (module names differ from the checkpoint's?)")
        if grams is None:
            weights = _column_weights(args.calib, _load_calib(args.calib))
        elif args.vector_dim > 1 or args.calib_steps == 0:
            weights, grams = {k: h.diagonal().clone() for k, h in grams.items()}, None
    folder = compress(args.model, args.bits, out, groups=args.groups, vector_dim=args.vector_dim, select=args.select,
                      column_weights=weights, grams=grams, calib_steps=args.calib_steps, calib_lr=args.calib_lr,
                      assign_lr=args.assign_lr, seed=args.seed, force=args.force, fsync=not args.no_fsync,
                      progress=_common.progress(args))
    s = folder.compress_report.summary
    _common.say(args, f"quantized {s['quantized_matrices']} matrices at {args.bits} bits "
                      f"({s['bits_per_quantized_weight']} bits/weight with overheads; {s['verbatim_tensors']} tensors "
                      f"verbatim) into {folder.path}: {checkpoint.human_bytes(s['folder_tensor_bytes'])}, "
                      f"{s['ratio_vs_original']}x smaller")
    undivided = folder.compress_report.undivided
    if undivided:
        _common.say(args, f"--vector-dim {args.vector_dim} does not divide the columns of {len(undivided)} selected "
                          f"matrices, stored verbatim: {', '.join(undivided)}")
    return 0
