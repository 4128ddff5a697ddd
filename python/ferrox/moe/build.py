"""``build_moe``: dense Llama/Mistral experts into one Mixtral checkpoint,
streamed tensor by tensor from the input files into the shared atomic
writer (``ferrox.output.OutputFolder``).

Each expert's FFN (``mlp.gate_proj/up_proj/down_proj``) becomes one expert of
every layer's MoE block, copied bit for bit when no dtype change, noise or
residual scale applies. The other tensors come from the base (mergekit-moe)
or, with ``average_shared`` (Branch-Train-MiX), are the mean over the
experts, summed in float64 and rounded once to the output dtype. Routers come
from ``gates``. Two layouts, both loaded by transformers 5's
``MixtralForCausalLM``:

- ``experts`` (default): ``block_sparse_moe.experts.{e}.w1/w2/w3`` (gate,
  down, up) and ``block_sparse_moe.gate.weight``: Mixtral's original
  checkpoint names, which transformers 4 and 5, vLLM and llama.cpp read
  (transformers 5 fuses them while loading);
- ``fused``: transformers 5's own parameters, ``mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` (each expert's gate rows, then its up rows),
  ``mlp.experts.down_proj`` ``[E, H, I]`` and ``mlp.gate.weight``: what
  mergekit 0.1.5 writes; transformers 4 cannot read it.

Memory: one input tensor at a time (plus a float64 accumulator when
averaging); ``hidden`` gates load the base model whole, as mergekit does.
"""

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from .. import checkpoint as ckpt
from .. import dtypes
from ..output import OutputFolder, PlannedTensor
from .config import MoEConfig, load_config

LAYOUTS = ("experts", "fused")
FFN = ("gate_proj", "up_proj", "down_proj")
_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's names
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SHARED_IN_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
_SHARED_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# The Llama/Mistral config defaults that change a forward pass where Mixtral's differ (transformers'
# LlamaConfig/MistralConfig): a key the base's config.json leaves out must keep its base meaning.
_DEFAULTS = {
    "llama": {"hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "attention_dropout": 0.0},
    "mistral": {"hidden_act": "silu", "max_position_embeddings": 4096 * 32, "initializer_range": 0.02,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
                "eos_token_id": 2, "attention_dropout": 0.0, "num_key_value_heads": 8},
}
# Llama keys Mixtral has no use for, and ferrox's own (a MoE is no longer a tiny GPT)
_DROP = ("attention_bias", "mlp_bias", "pretraining_tp", "ferrox_tiny_gpt", "_name_or_path", "transformers_version",
         "auto_map", "sliding_window", "use_sliding_window", "max_window_layers")


@dataclass
class MoEReport:
    out: str
    n_experts: int
    n_layers: int
    gate_mode: str
    layout: str
    dtype: Optional[str]
    bytes_written: int
    seconds: float


def _config(model: str, key: str) -> dict:
    folder = model if os.path.isdir(model) else os.path.dirname(model)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{key}: {model} has no config.json (ferrox moe needs the model's architecture)")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{key}: {path} must hold a JSON object")
    mt = cfg.get("model_type")
    if mt not in _DEFAULTS:
        raise ValueError(f"{key}: model_type {mt!r} in {path}; the Mixtral output takes llama or mistral models")
    return cfg


def mixtral_config(base_cfg: dict, n_experts: int, experts_per_token: int, dtype: Optional[str]) -> dict:
    """The output's config.json: the base's Llama/Mistral config (its defaults
    filled in) as a MixtralConfig, as mergekit writes it (sliding window off)."""
    for flag in ("attention_bias", "mlp_bias"):
        if base_cfg.get(flag):
            raise ValueError(f"base_model config: {flag} is true; Mixtral has no bias terms")
    out = dict(_DEFAULTS[base_cfg["model_type"]])
    if "rope_parameters" in base_cfg:  # written by transformers 5: the theta lives there
        out.pop("rope_theta")
    out.setdefault("num_key_value_heads", base_cfg.get("num_attention_heads"))
    out.update({k: v for k, v in base_cfg.items() if k not in _DROP})
    out.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": n_experts,
                "num_experts_per_tok": experts_per_token, "sliding_window": None, "output_router_logits": False,
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0})
    if dtype is not None:
        name = dtypes.get(dtype).torch_name
        out["torch_dtype"] = out["dtype"] = name  # transformers 4's key and 5's
    return out


def _out_dtype(cfg: MoEConfig, base_cfg: dict) -> Optional[str]:
    if cfg.dtype:
        return cfg.dtype
    name = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    if isinstance(name, str):
        name = name.replace("torch.", "")
        if name in ("bfloat16", "float16", "float32"):
            return dtypes.from_config_name(name)
    return None  # mergekit: each tensor keeps its dtype


def _classify(info: ckpt.CheckpointInfo, n_layers: int, tied: bool):
    """The base's tensors as (shared names in file order, per-layer FFN names); anything a Mixtral has no place
    for is refused by name."""
    shared, ffn = [], {}
    for t in info.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n_layers:
            rest = m.group(2)
            if rest.startswith("mlp."):
                proj = rest[len("mlp."):-len(".weight")] if rest.endswith(".weight") else None
                if proj not in FFN:
                    raise ValueError(f"base_model: tensor {t.name!r}: an FFN tensor besides gate/up/down_proj "
                                     f"weights (a bias?); Mixtral's experts have none")
                ffn[(int(m.group(1)), proj)] = t.name
                continue
            if rest in _SHARED_IN_LAYER:
                shared.append(t.name)
                continue
            if rest.endswith("rotary_emb.inv_freq"):
                continue  # derived from the config, never loaded
        elif t.name in _SHARED_TOP:
            shared.append(t.name)
            continue
        raise ValueError(f"base_model: tensor {t.name!r} has no place in a Mixtral checkpoint (expected Llama/"
                         f"Mistral tensors of {n_layers} layers, no biases)")
    missing = [f"model.layers.{i}.mlp.{p}.weight" for i in range(n_layers) for p in FFN if (i, p) not in ffn]
    needed = [f"model.layers.{i}.{r}" for i in range(n_layers) for r in _SHARED_IN_LAYER]
    needed += [n for n in _SHARED_TOP if not (tied and n == "lm_head.weight")]
    missing += [n for n in needed if n not in shared]
    if missing:
        raise ValueError(f"base_model: missing tensor {missing[0]!r} (num_hidden_layers is {n_layers})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return shared, ffn


def _ffn_names(layer: int, expert: int, layout: str, n_experts: int) -> dict:
    """Where each FFN tensor of ``expert`` goes: ``{proj: (name, index into a fused tensor or None)}``."""
    if layout == "experts":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return {proj: (p + _W[proj] + ".weight", None) for proj in FFN}
    p = f"model.layers.{layer}.mlp.experts."
    return {"gate_proj": (p + "gate_up_proj", 2 * expert), "up_proj": (p + "gate_up_proj", 2 * expert + 1),
            "down_proj": (p + "down_proj", expert)}


def router_name(layer: int, layout: str = "experts") -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if layout == 'experts' else 'mlp'}.gate.weight"


def expert_names(layer: int, expert: int, layout: str = "experts") -> Dict[str, str]:
    """The output tensor holding each FFN projection (``gate_proj``/``up_proj``/``down_proj``) of an expert."""
    return {proj: name for proj, (name, _) in _ffn_names(layer, expert, layout, 0).items()}


def gate_vectors(cfg: MoEConfig, base_cfg: dict, base_info: ckpt.CheckpointInfo, *, tokenize=None,
                 device: str = "cpu"):
    """The routers ``[n_layers, n_experts, hidden]`` (float32) for ``cfg.gate_mode``."""
    from . import gates

    n_layers, hidden = int(base_cfg["num_hidden_layers"]), int(base_cfg["hidden_size"])
    mode = cfg.gate_mode
    if mode in ("random", "uniform_random"):
        return gates.random_gates(n_layers, cfg.n_experts, hidden, cfg.seed, uniform=mode == "uniform_random")
    tokenize = tokenize or gates.prompt_tokenizer(cfg.base_model)
    if mode == "cheap_embed":
        entry = next((t for t in base_info.tensors if t.name == "model.embed_tokens.weight"), None)
        embed = ckpt.TensorReader().read(entry)
        return gates.cheap_embed_gates(embed, cfg.experts, n_layers, tokenize)
    return gates.hidden_gates(cfg.base_model, cfg.experts, tokenize, mode, device=device)


def _noise_seed(seed: int, layer: int, expert: int, proj: str) -> int:
    return (seed * 1_000_003 + layer * 10_007 + expert * 101 + FFN.index(proj)) % 2**63


def build_moe(config, out, *, layout: str = "experts", force: bool = False, fsync: bool = True,
              max_shard_bytes: int = 5 * 10**9, progress: Optional[bool] = None, tokenize=None,
              device: str = "cpu", allow_all_same: bool = False) -> MoEReport:
    """Writes the MoE of ``config`` (a ``MoEConfig``, or a YAML path) to the
    folder ``out``. ``tokenize(prompt) -> ids`` overrides the base's
    tokenizer for prompt-based gates; ``device`` runs the ``hidden``
    forward pass there."""
    import torch
    from tqdm import tqdm

    start = time.perf_counter()
    cfg = config if isinstance(config, MoEConfig) else load_config(config, allow_all_same=allow_all_same)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    base_cfg = _config(cfg.base_model, "base_model")
    for i, e in enumerate(cfg.experts):
        ecfg = _config(e.source_model, f"experts[{i}].source_model")
        if ecfg["model_type"] != base_cfg["model_type"]:
            raise ValueError(f"experts[{i}].source_model: model_type {ecfg['model_type']!r}, the base's is "
                             f"{base_cfg['model_type']!r} (mergekit requires one architecture)")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        if not isinstance(base_cfg.get(key), int) or base_cfg[key] < 1:
            raise ValueError(f"base_model config: {key} must be a positive integer, got {base_cfg.get(key)!r}")
    n_layers, n_exp = base_cfg["num_hidden_layers"], cfg.n_experts
    tied = bool(base_cfg.get("tie_word_embeddings", _DEFAULTS[base_cfg["model_type"]]["tie_word_embeddings"]))
    out_dt = _out_dtype(cfg, base_cfg)
    mix_cfg = mixtral_config(base_cfg, n_exp, cfg.experts_per_token, out_dt)

    base_info = ckpt.read_checkpoint(cfg.base_model)
    by_name = {t.name: t for t in base_info.tensors}
    shared, ffn = _classify(base_info, n_layers, tied)
    experts = [{t.name: t for t in ckpt.read_checkpoint(e.source_model).tensors} for e in cfg.experts]

    def expert_entry(i: int, name: str, like: ckpt.TensorEntry) -> ckpt.TensorEntry:
        t = experts[i].get(name)
        if t is None:
            raise ValueError(f"experts[{i}].source_model: no tensor {name!r} ({cfg.experts[i].source_model})")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"experts[{i}].source_model: tensor {name!r} has shape {list(t.shape)}, the base's is "
                             f"{list(like.shape)}")
        if t.dtype not in dtypes.KERNEL_FLOATS:
            raise ValueError(f"experts[{i}].source_model: tensor {name!r} is {t.dtype}, expected a float")
        return t

    # every input checked before anything is computed or written
    ffn_src = {(l, e, p): expert_entry(e, ffn[(l, p)], by_name[ffn[(l, p)]])
               for l in range(n_layers) for e in range(n_exp) for p in FFN}
    shared_src = {n: ([expert_entry(e, n, by_name[n]) for e in range(n_exp)] if cfg.average_shared else [by_name[n]])
                  for n in shared}

    gate = gate_vectors(cfg, base_cfg, base_info, tokenize=tokenize, device=device)
    hidden = base_cfg["hidden_size"]
    if tuple(gate.shape) != (n_layers, n_exp, hidden):
        raise ValueError(f"router init: got shape {list(gate.shape)}, expected {[n_layers, n_exp, hidden]}")

    def dt(entry) -> str:
        return out_dt or entry.dtype

    planned: List[PlannedTensor] = []
    records: Dict[str, dict] = {}

    def plan(name, dtype, shape, record):
        planned.append(PlannedTensor(name, dtype, tuple(shape), dtypes.numel(shape) * dtypes.itemsize(dtype)))
        records[name] = {"dtype": dtype, "shape": list(shape), **record}

    for n in shared:
        plan(n, dt(shared_src[n][0]), by_name[n].shape, {"from": "average of experts" if cfg.average_shared else "base"})
    router_dt = out_dt or "F32"
    for l in range(n_layers):
        plan(router_name(l, layout), router_dt, (n_exp, hidden), {"from": f"router ({cfg.gate_mode})"})
        g, _, d = (ffn_src[(l, 0, p)] for p in FFN)
        if layout == "experts":
            for e in range(n_exp):
                for p, (name, _) in _ffn_names(l, e, layout, n_exp).items():
                    src = ffn_src[(l, e, p)]
                    plan(name, dt(src), src.shape, {"from": f"experts[{e}] {ffn[(l, p)]}"})
        else:
            if len({dt(ffn_src[(l, e, p)]) for e in range(n_exp) for p in FFN}) != 1:
                raise ValueError(f"layer {l}: the experts' FFN tensors have different dtypes; the fused layout "
                                 f"stores them in one tensor: set dtype")
            inter = g.shape[0]
            plan(_ffn_names(l, 0, layout, n_exp)["gate_proj"][0], dt(g), (n_exp, 2 * inter, hidden),
                 {"from": "experts' gate_proj and up_proj"})
            plan(_ffn_names(l, 0, layout, n_exp)["down_proj"][0], dt(d), (n_exp, hidden, d.shape[1]),
                 {"from": "experts' down_proj"})

    reader = ckpt.TensorReader()
    inputs = [cfg.base_model] + [e.source_model for e in cfg.experts]
    total = sum(p.nbytes for p in planned)
    with OutputFolder(out, fmt="moe", inputs=inputs, force=force, fsync=fsync) as dest:
        writer = dest.writer(planned, max_shard_bytes, metadata={"ferrox_moe": json.dumps(
            {"gate_mode": cfg.gate_mode, "average_shared": cfg.average_shared, "layout": layout, "seed": cfg.seed})})

        def put(name: str, at: int, src: ckpt.TensorEntry, transform=None) -> None:
            """The tensor ``src`` into ``name`` from byte ``at``: raw bytes when nothing changes it."""
            target = writer.where[name][2].dtype
            if transform is None and src.dtype == target:
                step = 16 << 20
                buf = bytearray(min(step, src.nbytes))
                for pos in range(0, src.nbytes, step):
                    view = memoryview(buf)[:min(step, src.nbytes - pos)]
                    reader.read_into(src, view, pos)
                    writer.write_bytes(name, view, at + pos)
                return
            x = reader.read(src)
            if transform is not None:
                x = transform(x.float())
            x = x.to(dtypes.to_torch(target)).contiguous()
            writer.write_bytes(name, x.reshape(-1).view(torch.uint8).numpy(), at)

        with tqdm(total=total, desc="ferrox moe", unit="B", unit_scale=True,
                  disable=None if progress is None else not progress) as bar:
            for n in shared:
                srcs = shared_src[n]
                if len(srcs) == 1:
                    put(n, 0, srcs[0])
                else:
                    acc = None
                    for s in srcs:
                        x = reader.read(s).to(torch.float64)
                        acc = x if acc is None else acc.add_(x)
                    acc.div_(len(srcs))
                    writer.write(n, acc.to(dtypes.to_torch(writer.where[n][2].dtype)))
                bar.update(writer.where[n][2].nbytes)
            for l in range(n_layers):
                writer.write(router_name(l, layout), gate[l].to(dtypes.to_torch(router_dt)).contiguous())
                for e, ex in enumerate(cfg.experts):
                    for p, (name, index) in _ffn_names(l, e, layout, n_exp).items():
                        src = ffn_src[(l, e, p)]
                        transform = None
                        if ex.noise_scale is not None or (p == "down_proj" and ex.residual_scale is not None):
                            def transform(x, p=p, e=e, ex=ex, l=l):
                                if ex.noise_scale is not None:
                                    g = torch.Generator().manual_seed(_noise_seed(cfg.seed, l, e, p))
                                    x = x + torch.randn(x.shape, generator=g) * ex.noise_scale
                                if p == "down_proj" and ex.residual_scale is not None:
                                    x = x * ex.residual_scale
                                return x
                        item = dtypes.itemsize(writer.where[name][2].dtype)
                        at = 0 if index is None else index * src.numel * item
                        put(name, at, src, transform)
                        bar.update(src.numel * item)
        dest.copy_side_files(cfg.base_model)  # tokenizer files; config.json is replaced next
        dest.write_text("config.json", json.dumps(mix_cfg, indent=2) + "\n")
        if cfg.text is not None:
            dest.write_text("mergekit_moe_config.yml", cfg.text)
        summary = {"experts": n_exp, "layers": n_layers, "experts_per_token": cfg.experts_per_token,
                   "gate_mode": cfg.gate_mode, "average_shared": cfg.average_shared, "layout": layout,
                   "dtype": out_dt, "base_model": cfg.base_model, "expert_models": [e.source_model for e in cfg.experts]}
        dest.write_report(summary, records)
        dest.model_card("Mixture of experts from dense models (ferrox moe)", [
            f"Base: `{cfg.base_model}`", "", *[f"- expert {i}: `{e.source_model}`" for i, e in enumerate(cfg.experts)],
            "", f"{n_exp} experts per layer, {cfg.experts_per_token} per token; routers from `{cfg.gate_mode}`; "
                f"attention, norms and embeddings {'averaged over the experts (Branch-Train-MiX)' if cfg.average_shared else 'from the base'}."])
        out_abs = dest.out
    return MoEReport(out_abs, n_exp, n_layers, cfg.gate_mode, layout, out_dt, total, time.perf_counter() - start)
