"""A real fine-tune of the embedded default model (all-MiniLM-L6-v2), offline:
contrastive sentence-embedding training on one part of the ``corpus`` split,
so that BitDelta, merges and other compressors have an encoder fine-tune
whose quality can be measured.

Task: pairs of adjacent sentences of one paragraph of Python's documentation
(``sentence_pairs``); the model learns to embed a sentence next to its
neighbour, against the other pairs of the batch (in-batch InfoNCE on
mean-pooled, L2-normalised embeddings, temperature ``TEMPERATURE``), as
sentence-transformers trains MiniLM. Dropout is off so training is
deterministic for a seed and thread count. ``fine_tuned(part, seed)``
returns a Hugging Face folder (the base's config and tokenizer files, the
fine-tuned ``model.safetensors`` with the base's tensor names, dtypes and
order), trained on first use and cached under
``$FERROX_CACHE/minilm/<key>/`` like the tiny GPT (``tasks``).

Measures: ``retrieval_accuracy`` (top-1 neighbour retrieval over held-out
pairs) and ``embedding_cosine`` (mean cosine between two models'
embeddings of the same sentences).
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import corpus, tasks

#: Bump when a change here changes the trained weights.
CODE_VERSION = 1
TEMPERATURE = 0.05
#: Tokens per sentence (longer ones are truncated).
MAX_TOKENS = 48


@dataclass(frozen=True)
class Recipe:
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 16
    warmup: int = 4


RECIPE = Recipe()
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentence_pairs(part: str = "statements", heldout: bool = False, min_chars: int = 25) -> List[Tuple[str, str]]:
    """(sentence, next sentence) pairs from the paragraphs of ``part``'s
    training text (or its held-out text), in text order; sentences shorter
    than ``min_chars`` are skipped, whitespace is collapsed."""
    s = corpus.split(0)
    text = s.heldout[part] if heldout else s.train_text(part)
    pairs = []
    for para in text.split("\n\n"):
        sents = [" ".join(x.split()) for x in _SENTENCE.split(para)]
        sents = [x for x in sents if len(x) >= min_chars]
        pairs += list(zip(sents, sents[1:]))
    return pairs


def load(folder: str = None):
    """(model, tokenizer) of a MiniLM folder (the embedded default model
    when ``folder`` is None), the model in eval mode, f32."""
    import transformers

    from ..models import default_model_path

    folder = folder or default_model_path()
    transformers.utils.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return model, tok


def tokenize(tok, sentences: Sequence[str]) -> dict:
    return dict(tok(list(sentences), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


def embed(model, batch: dict) -> torch.Tensor:
    """Mean-pooled (over real tokens), L2-normalised sentence embeddings."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def retrieval_accuracy(model, tok, pairs, batch_size: int = 64) -> float:
    """Fraction of held-out pairs whose first sentence's nearest second
    sentence (cosine, over all pairs) is its own."""
    a = torch.cat([embed(model, tokenize(tok, [p[0] for p in pairs[i:i + batch_size]])) for i in range(0, len(pairs), batch_size)])
    b = torch.cat([embed(model, tokenize(tok, [p[1] for p in pairs[i:i + batch_size]])) for i in range(0, len(pairs), batch_size)])
    return float(((a @ b.T).argmax(1) == torch.arange(len(pairs))).double().mean())


@torch.no_grad()
def embedding_cosine(model_a, model_b, tok, sentences: Sequence[str], batch_size: int = 64) -> float:
    """Mean cosine between the two models' embeddings of each sentence."""
    sims = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenize(tok, sentences[i:i + batch_size])
        sims.append((embed(model_a, batch) * embed(model_b, batch)).sum(-1))
    return float(torch.cat(sims).mean())


def cache_key() -> str:
    from ..models import default_model_path

    weights = os.path.join(default_model_path(), "model.safetensors")
    spec = {"code_version": CODE_VERSION, "recipe": asdict(RECIPE), "split": corpus.split(0).digest(),
            "temperature": TEMPERATURE, "max_tokens": MAX_TOKENS, "threads": tasks.TRAIN_THREADS,
            "base_bytes": os.path.getsize(weights)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> str:
    return os.path.join(os.path.dirname(tasks.cache_root()), "minilm", cache_key())


def is_cached(part: str = "statements", seed: int = 0) -> bool:
    return os.path.isfile(os.path.join(cache_dir(), f"finetune-{part}-seed{seed}", "model.safetensors"))


def train(model, tok, pairs, recipe: Recipe, seed: int) -> List[float]:
    """In-batch InfoNCE on ``pairs`` (batches drawn from ``seed``), AdamW with
    warmup then cosine decay (``tasks.lr_at``); returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    losses = []
    with tasks._threads(tasks.TRAIN_THREADS):
        for step in range(recipe.steps):
            for group in opt.param_groups:
                group["lr"] = tasks.lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
            idx = torch.randperm(len(pairs), generator=g)[:recipe.batch_size].tolist()
            a = embed(model, tokenize(tok, [pairs[i][0] for i in idx]))
            b = embed(model, tokenize(tok, [pairs[i][1] for i in idx]))
            logits = a @ b.T / TEMPERATURE
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def fine_tuned(part: str = "statements", seed: int = 0) -> str:
    """Folder of MiniLM fine-tuned on ``sentence_pairs(part)`` (cached)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..models import default_model_path

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if part not in corpus.FINETUNE_TOPICS:
        raise ValueError(f"fine_tuned: unknown part {part!r} (known: {list(corpus.FINETUNE_TOPICS)})")
    base = default_model_path()

    def build(tmp):
        torch.manual_seed(seed)
        model, tok = load(base)
        model.eval()  # dropout off: deterministic
        losses = train(model, tok, sentence_pairs(part), RECIPE, seed)
        trained = model.state_dict()
        os.makedirs(tmp)
        # the base's tensors, names, dtypes and order; trained values where the model has them
        with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
            out = {}
            for k in f.keys():
                orig = f.get_tensor(k)
                out[k] = trained.get(k, orig).detach().to(orig.dtype).contiguous()
        save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for side in os.listdir(base):
            src = os.path.join(base, side)
            if side != "model.safetensors" and os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, side))
        return {"stage": "minilm-finetune", "part": part, "seed": seed, "recipe": asdict(RECIPE),
                "first_loss": losses[0], "final_loss": losses[-1]}

    return tasks._cached(f"finetune-{part}-seed{seed}", build, root=cache_dir(), key=cache_key())
