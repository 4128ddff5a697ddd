"""``ferrox moe CONFIG OUT``: a mergekit-moe YAML config into a Mixtral
checkpoint (dense experts' FFNs as the experts; Branch-Train-MiX with
``average_shared: true``), streamed tensor by tensor."""

from . import _common


def add_parser(sub, parent=None):
    from .merge import shard_size

    p = _common.add_command(sub, "moe", run, "a mixture of experts (Mixtral) from dense models, from a "
                                             "mergekit-moe YAML config")
    p.add_argument("config", help="YAML config: base_model, experts (source_model, positive_prompts, "
                                  "negative_prompts, noise_scale, residual_scale), gate_mode (hidden, hidden_avg, "
                                  "cheap_embed, random, uniform_random), dtype, experts_per_token, and ferrox's "
                                  "average_shared (BTX) and seed")
    _common.add_output_options(p)
    p.add_argument("--layout", choices=("experts", "fused"), default="experts",
                   help="experts (default): block_sparse_moe.experts.N.w1/w2/w3, read by transformers 4 and 5, "
                        "vLLM, llama.cpp; fused: transformers 5's mlp.experts.gate_up_proj/down_proj (what "
                        "mergekit 0.1.5 writes)")
    p.add_argument("--random-seed", type=int, help="seed for random routers and noise (overrides the config's seed)")
    p.add_argument("--out-shard-size", type=shard_size, default=shard_size("5B"),
                   help="bytes per output shard, as mergekit counts them (default 5B; 0: one shard)")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="build even when every expert is the same model (mergekit's flag)")
    return p


def run(args) -> int:
    from ..moe.build import build_moe
    from ..moe.config import _integer, load_config

    out = _common.output_path(args)
    cfg = load_config(args.config, allow_all_same=args.allow_all_same)
    if args.random_seed is not None:
        cfg.seed = _integer("--random-seed", args.random_seed, 0, 2**63)
    report = build_moe(cfg, out, layout=args.layout, force=args.force, fsync=not args.no_fsync,
                       max_shard_bytes=args.out_shard_size or 2**63, progress=_common.progress(args),
                       device=args.device)
    from .. import checkpoint

    _common.say(args, f"wrote a Mixtral of {report.n_experts} experts x {report.n_layers} layers "
                      f"(routers: {report.gate_mode}, layout {report.layout}) to {report.out}: "
                      f"{checkpoint.human_bytes(report.bytes_written)} in {report.seconds:.1f} s")
    return 0
