"""``ferrox compress bitdelta --base B --finetuned F --out D``: a fine-tune
as the signs of its delta from the base plus one scale per matrix, streamed
through the Rust core; ``--distill --calib FILE`` then trains the scales
against the fine-tune's outputs on calibration token ids.

Calibration file: a ``.safetensors`` (or ``.pt``) file holding an integer
tensor ``input_ids`` of shape [N, seq] (token ids); it is cut into batches of
``--batch-size`` rows. Distillation needs torch models of both checkpoints:
ferrox's tiny GPT folders (``ferrox.testing``) are read directly, other
folders through ``transformers`` (``AutoModelForCausalLM``, else
``AutoModel``, local files only) when it is installed.
"""

import os

from .. import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "bitdelta", run, "a fine-tune as 1-bit sign deltas of its base plus scales",
                            description=__doc__.split("\n\n")[0].replace("``", ""),
                            full_name=f"{parent} bitdelta" if parent else "bitdelta")
    p.add_argument("--base", required=True, help="the base model (safetensors file or HF folder)")
    p.add_argument("--finetuned", required=True, help="the fine-tune of the base to compress")
    _common.add_output_options(p, device=False)
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="compress tensors matching GLOB ('!GLOB' excludes); repeatable. Default: every 2-D float "
                        "tensor except *embed*, *lm_head*, *norm*, *pooler*")
    p.add_argument("--per-row", action="store_true", help="one scale per output row instead of per matrix")
    p.add_argument("--distill", action="store_true", help="train the scales on --calib (needs torch models)")
    p.add_argument("--calib", help="calibration token ids (.safetensors/.pt with 'input_ids' [N, seq])")
    p.add_argument("--steps", type=int, default=100, help="distillation steps (default 100)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="distillation learning rate, relative to each matrix's initial scale (default 0.1)")
    p.add_argument("--absolute-lr", action="store_true",
                   help="--lr is an absolute learning rate (as in the BitDelta reference code, 1e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration rows per step (default 4)")
    return p


def load_calibration(path: str, batch_size: int):
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    ids = data.get("input_ids") if isinstance(data, dict) else data
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        raise ValueError(f"{path}: expected an integer tensor 'input_ids' of shape [N, seq]")
    return list(ids.long().split(batch_size))


def load_model(path: str):
    """A torch model of a checkpoint folder, for distillation."""
    import json

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: distillation needs a model folder with a config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if "ferrox_tiny_gpt" in json.dumps(cfg):
        from ...testing import load_pretrained

        return load_pretrained(path)
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{path}: distilling this model needs 'transformers' (pip install transformers)") from None
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return cls.from_pretrained(path, local_files_only=True)
        except ValueError:
            continue
    raise ValueError(f"{path}: transformers cannot load this model")


def run(args) -> int:
    from ... import checkpoint
    from ...delta import compress

    out = _common.output_path(args)
    if args.distill and not args.calib:
        raise ValueError("--distill needs --calib FILE (calibration token ids)")
    if args.calib and not args.distill:
        raise ValueError("--calib is only read with --distill")
    if args.steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {args.steps}")
    progress = _common.progress(args)
    if not args.distill:
        delta = compress(args.base, args.finetuned, args.select, out, per_row=args.per_row, force=args.force,
                         fsync=not args.no_fsync, progress=progress)
    else:
        from ...delta import distill

        batches = load_calibration(args.calib, args.batch_size)
        base_model, ft_model = load_model(args.base), load_model(args.finetuned)
        delta = compress(args.base, args.finetuned, args.select, None, per_row=args.per_row, progress=progress)
        result = distill(base_model, delta, ft_model, batches, steps=args.steps, lr=args.lr, per_row=args.per_row,
                         relative_lr=not args.absolute_lr, progress=progress)
        _common.say(args, f"distilled the scales in {args.steps} steps: output MSE {result.initial_loss:.4g} -> "
                          f"{result.losses[-1]:.4g} (last step)")
        delta = result.delta.save(out, force=args.force, fsync=not args.no_fsync)
    s = delta.report().get("summary", {})
    _common.say(args, f"compressed {s.get('compressed_matrices')} matrices ({s.get('verbatim_tensors')} tensors "
                      f"verbatim) into {delta.path}: {checkpoint.human_bytes(s.get('folder_tensor_bytes', 0))}, "
                      f"{s.get('ratio_vs_fp16_delta')}x smaller than an fp16 delta of those matrices")
    return 0
