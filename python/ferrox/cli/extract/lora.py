"""``ferrox extract lora --base B --finetuned F --rank R --out D``: each
selected matrix's task vector (fine-tune − base) factored by truncated SVD
and written as a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors), streamed tensor by tensor.

lora_alpha equals the rank, so the adapter adds B·A to the base. The SVD is
exact where 2·rank >= min(m, n) or min(m, n) <= 512, randomized (seeded)
otherwise; ferrox_report.json gives each matrix's relative Frobenius error
and the energy kept.
"""

from .. import _common


def add_parser(sub, parent=None):
    p = _common.add_command(sub, "lora", run, "a fine-tune's task vectors as a rank-R PEFT LoRA adapter",
                            description=__doc__.split("\n\n")[0].replace("``", ""),
                            full_name=f"{parent} lora" if parent else "lora")
    p.add_argument("--base", required=True, help="the base model (safetensors file or HF folder)")
    p.add_argument("--finetuned", required=True, help="the fine-tune of the base")
    p.add_argument("--rank", required=True, type=int, help="the LoRA rank r (also lora_alpha)")
    _common.add_output_options(p, device=False)
    p.add_argument("--select", action="append", metavar="GLOB",
                   help="factor module weights matching GLOB ('!GLOB' excludes); repeatable. Default: every 2-D "
                        "float module weight except *embed*, *lm_head*, *norm*, *pooler*")
    p.add_argument("--save-module", action="append", metavar="MODULE", dest="modules_to_save",
                   help="store this module's fine-tuned tensors whole (PEFT modules_to_save, e.g. lm_head, "
                        "embed_tokens); repeatable")
    p.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                   help="SVD: auto (default), exact (torch.linalg.svd) or randomized (torch.svd_lowrank)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the LoRA factors (default: each fine-tuned matrix's)")
    p.add_argument("--niter", type=int, default=4, help="power iterations of the randomized SVD (default 4)")
    p.add_argument("--oversample", type=int,
                   help="extra sketch columns of the randomized SVD (default max(10, rank/2))")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD's sketch (default 0)")
    return p


def run(args) -> int:
    from ...extract import extract_lora

    out = _common.output_path(args)
    r = extract_lora(args.base, args.finetuned, args.rank, out, select=args.select,
                     modules_to_save=args.modules_to_save, progress=_common.progress(args), force=args.force,
                     fsync=not args.no_fsync, svd=args.svd, dtype=args.dtype, oversample=args.oversample,
                     niter=args.niter, seed=args.seed)
    s = r.summary
    _common.say(args, f"extracted a rank-{s['rank']} LoRA of {s['factored_matrices']} matrices "
                      f"({s['exact_svd']} exact SVD, {s['randomized_svd']} randomized"
                      + (f", {len(s['saved_whole'])} tensors saved whole" if s["saved_whole"] else "")
                      + f") into {r.out}: relative error max {s['max_rel_error']:.4g}, mean "
                        f"{s['mean_rel_error']:.4g}, in {r.seconds:.1f} s")
    return 0
