"""Synthetic checkpoints for tests, benchmarks and demos: a Llama-layout
model (the layout mergekit understands) and fine-tunes of any checkpoint,
written as real safetensors folders. Deterministic in the seed."""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from .checkpoint import read_checkpoint


def llama_tensors(hidden=64, layers=2, intermediate=None, vocab=256, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    inter = intermediate or 2 * hidden

    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(dtype)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
         "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = w(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    return t


def llama_config(hidden, layers, intermediate, vocab, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 16),
        "num_key_value_heads": max(1, hidden // 16), "vocab_size": vocab, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", ""),
    }


def write_model(folder, tensors, config=None, max_shard_bytes=None):
    """Writes ``tensors`` as an HF folder (sharded when ``max_shard_bytes``)."""
    os.makedirs(folder, exist_ok=True)
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    if not max_shard_bytes:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards, size = [[]], 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nb
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return folder


def make_llama(folder, hidden=64, layers=2, intermediate=None, vocab=256, dtype=torch.bfloat16, seed=0, max_shard_bytes=None):
    inter = intermediate or 2 * hidden
    tensors = llama_tensors(hidden, layers, inter, vocab, dtype, seed)
    return write_model(folder, tensors, llama_config(hidden, layers, inter, vocab, dtype), max_shard_bytes)


def fine_tune(base_folder, folder, seed, scale=0.02, sparsity=0.0, max_shard_bytes=None):
    """A synthetic fine-tune: base + a seeded random delta on every float
    tensor (a fraction ``sparsity`` of it zero). Copies config/tokenizer files."""
    info = read_checkpoint(base_folder)
    g = torch.Generator().manual_seed(seed)
    from safetensors import safe_open

    tensors = {}
    for t in info.tensors:
        with safe_open(t.file, "pt") as f:
            x = f.get_tensor(t.name)
        if x.is_floating_point():
            spread = max(float(x.float().std()) if x.numel() > 1 else 1.0, 0.05)
            delta = torch.randn(x.shape, generator=g) * scale * spread
            if sparsity:
                delta[torch.rand(x.shape, generator=g) < sparsity] = 0
            x = (x.float() + delta).to(x.dtype)
        tensors[t.name] = x
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(base_folder):
        for name in os.listdir(base_folder):
            if name.endswith((".json", ".txt", ".model")) and "safetensors" not in name:
                shutil.copy2(os.path.join(base_folder, name), os.path.join(folder, name))
    return write_model(folder, tensors, None, max_shard_bytes)
