"""A tiny byte-level GPT in the Llama layout, in plain torch.

The architecture is Llama's (pre-norm RMSNorm, rotary positions in Hugging
Face's ``rotate_half`` convention, causal multi-head attention with q/k/v/o
projections, SwiGLU MLP, untied ``lm_head``, no biases), so ``state_dict()``
has exactly Hugging Face's ``LlamaForCausalLM`` tensor names and a saved
folder is read by ``ferrox merge``/``inspect`` (and by ``transformers``) like
any Llama checkpoint. The vocabulary is the 256 byte values: no tokenizer.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

#: config.json key holding what Llama's config has no name for.
CONFIG_KEY = "ferrox_tiny_gpt"


@dataclass(frozen=True)
class TinyGPTConfig:
    vocab: int = 256  # byte-level
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn: int = 512  # SwiGLU hidden size (Llama's intermediate_size)
    max_seq: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab", "dim", "n_layers", "n_heads", "ffn", "max_seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyGPTConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"TinyGPTConfig: dim {self.dim} must split into {self.n_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_params(self) -> int:
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.ffn + 2 * self.dim
        return 2 * self.vocab * self.dim + self.n_layers * per_layer + self.dim

    def to_hf(self, dtype=torch.float32) -> dict:
        """A Hugging Face ``LlamaConfig`` dict describing this model."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab, "hidden_size": self.dim, "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_seq, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": None, "initializer_range": self.init_std,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "use_cache": True,
            # byte-level: no tokenizer, and no special tokens among the 256 bytes
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "torch_dtype": str(dtype).replace("torch.", ""),
            CONFIG_KEY: {"byte_level": True, **asdict(self)},
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> "TinyGPTConfig":
        own = cfg.get(CONFIG_KEY)
        if isinstance(own, dict):
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in own.items() if k in known})
        if cfg.get("model_type") != "llama":
            raise ValueError(f"config.json: model_type must be 'llama', got {cfg.get('model_type')!r}")
        if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
            raise ValueError("config.json: TinyGPT has no grouped-query attention (num_key_value_heads != num_attention_heads)")
        if cfg.get("tie_word_embeddings"):
            raise ValueError("config.json: TinyGPT has an untied lm_head (tie_word_embeddings is true)")
        return cls(vocab=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                   n_heads=cfg["num_attention_heads"], ffn=cfg["intermediate_size"],
                   max_seq=cfg.get("max_position_embeddings", 256), rope_theta=float(cfg.get("rope_theta", 10000.0)),
                   norm_eps=float(cfg.get("rms_norm_eps", 1e-5)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # as Hugging Face's LlamaRMSNorm: normalise in f32, scale in the weight's dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    """Llama's ``model.`` prefix: embeddings, blocks and the final norm."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class TinyGPT(nn.Module):
    """``forward(ids)`` with ``ids`` a LongTensor ``[batch, seq]`` (or
    ``[seq]``) of byte values returns next-byte logits ``[..., seq, vocab]``.

    ``seed`` initialises the weights from a private generator (the global
    RNG is left alone); without it torch's global RNG is used."""

    def __init__(self, config: TinyGPTConfig = TinyGPTConfig(), seed=None):
        super().__init__()
        self.config = config
        # nn.Linear/nn.Embedding draw a default init from the global RNG; with
        # a seed that draw is overwritten, so keep the global RNG untouched
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            self.model = _Body(config)
            self.lm_head = nn.Linear(config.dim, config.vocab, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        # rotary tables are derived, never saved: the state dict holds Llama's names only
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed=None):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        # GPT-2's residual scaling keeps the residual stream's variance flat with depth
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def _rotary(self, t: int, device, dtype):
        pos = torch.arange(t, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids):
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"TinyGPT.forward: ids must be [batch, seq] or [seq], got shape {list(ids.shape)}")
        if ids.shape[1] > self.config.max_seq:
            raise ValueError(f"TinyGPT.forward: sequence length {ids.shape[1]} exceeds max_seq {self.config.max_seq}")
        x = self.model.embed_tokens(ids)
        cos, sin = self._rotary(ids.shape[1], x.device, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        return logits[0] if squeeze else logits


def save_pretrained(model: TinyGPT, folder, dtype=torch.float32) -> str:
    """Writes ``model.safetensors`` (in ``dtype``) and a Llama ``config.json``
    into ``folder`` (created if needed); returns the folder."""
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"save_pretrained: dtype must be float32, float16 or bfloat16, got {dtype}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config.to_hf(dtype), f, indent=1)
    return folder


def _read_weights(folder: str) -> dict:
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):  # sharded (e.g. a merge output)
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_pretrained: missing weights file {path}")
        out.update(load_file(path))
    return out


def load_pretrained(folder, dtype=torch.float32) -> TinyGPT:
    """A ``TinyGPT`` from a folder written by ``save_pretrained`` or by a
    merge of such folders (f32/f16/bf16, single file or sharded); weights are
    converted to ``dtype``."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_pretrained: no config.json in {folder}")
    with open(cfg_path) as f:
        config = TinyGPTConfig.from_hf(json.load(f))
    weights = _read_weights(folder)
    model = TinyGPT(config, seed=0)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"load_pretrained: {folder}: missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"load_pretrained: {folder}: tensor {name!r} has shape {list(t.shape)}, "
                             f"expected {list(expected[name].shape)}")
        if not t.is_floating_point():
            raise TypeError(f"load_pretrained: {folder}: tensor {name!r} has dtype {t.dtype}, expected a float")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    return model.to(dtype)
