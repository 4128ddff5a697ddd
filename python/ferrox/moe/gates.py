"""Router initialisation, as mergekit-moe's ``get_gate_params``: one row per
expert in every layer's router, ``[n_layers, n_experts, hidden]``.

- ``random``: standard normal (``uniform_random``: U(-1/sqrt(h), 1/sqrt(h)),
  torch.nn.Linear's default), from a seeded generator (mergekit uses the
  global RNG, unseeded);
- ``cheap_embed``: the mean token embedding of an expert's positive prompts
  (minus that of its negative prompts), normalised, the same in every layer;
- ``hidden`` / ``hidden_last``: the residual stream entering each layer at
  a prompt's last token, averaged over the prompts (negatives subtracted),
  normalised; ``hidden_avg``: the state averaged over the prompt's tokens.
  Needs a forward pass of the base model through ``transformers``.

Prompts are tokenized as mergekit does (the tokenizer's BOS text prepended,
no other special tokens) and run one at a time: mergekit pads a batch on the
left, which shifts the padded prompts' positions and, for ``hidden_avg``,
averages the pad positions in too; single prompts need neither. The forward
pass runs in float32 (mergekit: bfloat16)."""

import json
import math
import os
from typing import Callable, List, Sequence

import torch

Tokenize = Callable[[str], List[int]]


def random_gates(n_layers: int, n_experts: int, hidden: int, seed: int = 0, uniform: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if uniform:
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((n_layers, n_experts, hidden), generator=g) * 2 * scale - scale
    return torch.randn((n_layers, n_experts, hidden), generator=g)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_tokenizer(base_folder: str) -> Tokenize:
    """How prompts become token ids for ``base_folder``: its Hugging Face
    tokenizer (BOS text prepended, as mergekit does), or bytes for a
    byte-level model (the tiny GPT of ``ferrox.testing``)."""
    folder = base_folder if os.path.isdir(base_folder) else os.path.dirname(base_folder)
    has_tok = any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model",
                                                                     "tokenizer_config.json", "vocab.json"))
    if has_tok:
        try:
            import transformers
        except ImportError:
            raise ValueError("gate_mode needs the base model's tokenizer, read with transformers: pip install "
                             "transformers") from None
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        bos = tok.bos_token or ""
        return lambda p: list(tok(bos + p, add_special_tokens=False)["input_ids"])
    cfg_path = os.path.join(folder, "config.json")
    cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    own = cfg.get("ferrox_tiny_gpt")
    if isinstance(own, dict) and own.get("byte_level"):
        return lambda p: list(p.encode("utf-8"))
    raise ValueError(f"base_model: {base_folder} has no tokenizer (tokenizer.json / tokenizer_config.json), which "
                     f"prompt-based gate modes need; add one or use gate_mode: random")


def _tokens(tokenize: Tokenize, prompt: str, vocab: int, where: str) -> torch.Tensor:
    ids = tokenize(prompt)
    if not ids:
        raise ValueError(f"{where}: the prompt {prompt[:40]!r} has no tokens")
    ids = torch.tensor(ids, dtype=torch.long)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"{where}: token ids of {prompt[:40]!r} fall outside the vocabulary of {vocab}")
    return ids


def _per_expert(experts, one: Callable[[Sequence[str], str], torch.Tensor], normalise_each: bool) -> torch.Tensor:
    rows = []
    for i, e in enumerate(experts):
        v = one(e.positive_prompts, f"experts[{i}].positive_prompts")
        if normalise_each:
            v = _normalise(v)
        if e.negative_prompts:
            n = one(e.negative_prompts, f"experts[{i}].negative_prompts")
            v = v - (_normalise(n) if normalise_each else n)
        rows.append(_normalise(v))
    return torch.stack(rows, dim=1)  # [n_layers, n_experts, hidden]


def cheap_embed_gates(embed: torch.Tensor, experts, n_layers: int, tokenize: Tokenize) -> torch.Tensor:
    """``embed``: the base's ``[vocab, hidden]`` token embeddings."""
    table = embed.float()

    def one(prompts, where):
        ids = torch.cat([_tokens(tokenize, p, table.shape[0], f"{where}") for p in prompts])
        return table[ids].sum(dim=0, dtype=torch.float64).float().expand(n_layers, -1)

    # mergekit normalises the positive and negative sums before subtracting them
    return _per_expert(experts, one, normalise_each=True)


def hidden_gates(base_folder: str, experts, tokenize: Tokenize, mode: str = "hidden", device: str = "cpu") -> torch.Tensor:
    """Router rows from the base model's hidden states (``transformers``)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"gate_mode {mode} runs the base model through transformers: pip install transformers "
                         f"(or use gate_mode cheap_embed / random)") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).to(device).eval()
    vocab = model.get_input_embeddings().weight.shape[0]

    def one(prompts, where):
        acc = None
        for p in prompts:
            ids = _tokens(tokenize, p, vocab, where).to(device)
            with torch.no_grad():
                out = model(input_ids=ids[None], output_hidden_states=True, return_dict=True)
            # hidden_states[:-1]: the residual stream entering each layer (mergekit takes the same)
            states = torch.stack(out.hidden_states[:-1])[:, 0]  # [n_layers, seq, hidden]
            v = states.mean(dim=1) if mode == "hidden_avg" else states[:, -1]
            acc = v.double() if acc is None else acc + v.double()
        return (acc / len(prompts)).float().cpu()

    return _per_expert(experts, one, normalise_each=False)
