"""``ferrox compress codebook MODEL --bits B --out D``: every selected matrix
as 2^B k-means codewords plus packed B-bit codes (per tensor, or per group
of similarly distributed rows with ``--groups G``; d-dim sub-vectors with
``--vector-dim d``); other tensors verbatim.

Calibration file (``--calib FILE``): a ``.safetensors`` or ``.pt`` file with
either an integer tensor ``input_ids`` [N, seq] (token ids, run through the
model in batches of ``--batch-size`` rows to measure each Linear's mean
squared input per column; needs a torch model of MODEL: ferrox's tiny GPT
folders, or transformers for other folders), or float tensors named like
the model's weights (``NAME`` -> [in], the per-input-column weights
directly). Those weights make the k-means objective Σ_col w_col (W − Ŵ)²
(activation-weighted k-means).
"""

from .. import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "codebook", run, "k-means codebook quantization to 2-8 bits per weight",
                            description=__doc__.split("\n\n")[0].replace("``", ""),
                            full_name=f"{parent} codebook" if parent else "codebook")
    p.add_argument("model", help="the model to quantize (safetensors file or HF folder)")
    p.add_argument("--bits", type=int, required=True, choices=(2, 3, 4, 8), help="bits per code (2^B codewords)")
    p.add_argument("--groups", type=int, default=1, help="row groups per matrix, one codebook each (default 1)")
    p.add_argument("--vector-dim", type=int, default=1,
                   help="codewords of d consecutive columns (product quantization; default 1 = scalar)")
    p.add_argument("--calib", help="calibration file: 'input_ids' [N, seq], or per-column weights by tensor name")
    p.add_argument("--batch-size", type=int, default=8, help="calibration rows per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the grouping / vector k-means (default 0)")
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="quantize tensors matching GLOB ('!GLOB' excludes); repeatable. Default: every 2-D float "
                        "tensor except *embed*, *lm_head*, *norm*")
    _common.add_output_options(p, device=False, positional=False)
    return p


def calibration_weights(path: str, model: str, batch_size: int):
    """Per-column weights from a calibration file (see the module doc)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {batch_size}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a dict of tensors ('input_ids', or per-column weights by name)")
    if "input_ids" in data:
        ids = data["input_ids"]
        if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise ValueError(f"{path}: expected an integer tensor 'input_ids' of shape [N, seq]")
        from ...codebook.compress import column_statistics
        from .bitdelta import load_model

        return column_statistics(load_model(model), list(ids.long().split(batch_size)))
    bad = [k for k, v in data.items() if not torch.is_tensor(v) or not v.dtype.is_floating_point or v.dim() != 1]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is not a 1-D float tensor of per-column weights")
    return {k: v.float() for k, v in data.items()}


def run(args) -> int:
    from ... import checkpoint
    from ...codebook.compress import compress

    out = _common.output_path(args)
    if args.groups < 1:
        raise ValueError(f"--groups: expected a positive integer, got {args.groups}")
    if args.vector_dim < 1:
        raise ValueError(f"--vector-dim: expected a positive integer, got {args.vector_dim}")
    weights = calibration_weights(args.calib, args.model, args.batch_size) if args.calib else None
    folder = compress(args.model, args.bits, out, groups=args.groups, vector_dim=args.vector_dim, select=args.select,
                      column_weights=weights, seed=args.seed, force=args.force, fsync=not args.no_fsync,
                      progress=_common.progress(args))
    s = folder.compress_report.summary
    _common.say(args, f"quantized {s['quantized_matrices']} matrices at {args.bits} bits "
                      f"({s['bits_per_quantized_weight']} bits/weight with overheads; {s['verbatim_tensors']} tensors "
                      f"verbatim) into {folder.path}: {checkpoint.human_bytes(s['folder_tensor_bytes'])}, "
                      f"{s['ratio_vs_original']}x smaller")
    return 0
