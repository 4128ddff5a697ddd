"""Mixture of experts from dense models (mergekit-moe, Branch-Train-MiX).

``build_moe(config, out)`` reads mergekit-moe's YAML (``load_config``) and
writes a Mixtral checkpoint that ``transformers.MixtralForCausalLM`` loads:
each expert model's FFN becomes one expert of every layer, the other
tensors come from the base or are averaged over the experts
(``average_shared: true``, BTX), and the routers are random or derived from
prompts (``gates``). Names are imported on first use.
"""

from .._lazy import exports

_WHERE = {
    "build_moe": "build", "MoEReport": "build", "LAYOUTS": "build", "mixtral_config": "build",
    "router_name": "build", "expert_names": "build", "gate_vectors": "build",
    "load_config": "config", "parse_config": "config", "MoEConfig": "config", "Expert": "config",
    "GATE_MODES": "config",
    "random_gates": "gates", "cheap_embed_gates": "gates", "hidden_gates": "gates", "prompt_tokenizer": "gates",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = exports(__name__, _WHERE)
