"""Byte-level language modelling on the ``corpus`` split: encoding, batches,
perplexity, deterministic training and the on-disk cache of the pretrained
tiny GPT and its fine-tunes.

``pretrained(seed)`` and ``fine_tuned(part, seed)`` return Hugging Face style
folders (``model.safetensors`` + ``config.json``) that are trained on first
use and cached under ``$FERROX_CACHE/tiny-gpt/<key>/`` (default
``~/.cache/ferrox``). The key hashes the model config, the split's text,
the training hyperparameters, the training thread count and
``CODE_VERSION``, so changing any of them retrains. Folders are published atomically (trained into a temporary sibling,
then renamed) under an exclusive file lock, so concurrent processes (pytest
-xdist workers) train once and never see a partial folder.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import corpus
from .tiny_gpt import TinyGPT, TinyGPTConfig, load_pretrained, save_pretrained

#: Bump when a change to the model or training code changes trained weights.
CODE_VERSION = 1
#: Threads torch uses while training in the cache (restored afterwards).
#: One: CPU kernels are bitwise deterministic for a fixed thread count, so the
#: cached weights do not depend on the machine's core count; and on a busy
#: machine two OpenMP threads spin-wait for each other (3x the CPU time
#: measured with 5 jobs on 2 cores).
TRAIN_THREADS = 1
#: Tokens scored by ``perplexity`` by default (the first ones of the text;
#: every held-out part of ``corpus.split(0)`` has more).
EVAL_TOKENS = 8192


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a LongTensor (the model's tokens)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _ids(text_or_ids) -> torch.Tensor:
    return encode(text_or_ids) if isinstance(text_or_ids, str) else torch.as_tensor(text_or_ids, dtype=torch.long)


def batches(text, seq_len: int, batch_size: int, seed: int):
    """Endless ``(inputs, targets)`` pairs of shape ``[batch_size, seq_len]``:
    windows at uniformly random offsets drawn from a private generator seeded
    with ``seed`` (the same sequence for the same seed, whatever else runs)."""
    ids = _ids(text)
    if ids.numel() < seq_len + 2:
        raise ValueError(f"batches: text of {ids.numel()} tokens is too short for seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=g)
        win = ids[starts[:, None] + span]
        yield win[:, :-1], win[:, 1:]


@torch.no_grad()
def perplexity(model: TinyGPT, text, seq_len: int = 128, max_tokens: int = EVAL_TOKENS, batch_size: int = 32,
               threads=TRAIN_THREADS) -> float:
    """exp(mean next-byte NLL) over the first ``min(max_tokens, len - 1)``
    predicted bytes of ``text``, scored in non-overlapping windows of
    ``seq_len`` predictions (each window sees only its own bytes as context;
    the last window may be shorter). The default window is the training
    window (rotary positions beyond it are never trained). Deterministic;
    runs on ``threads`` threads (restored after; ``None``: the current ones)."""
    ids = _ids(text)
    n = min(int(max_tokens), ids.numel() - 1)
    if n < 1:
        raise ValueError("perplexity: text needs at least 2 tokens")
    seq_len = min(seq_len, model.config.max_seq)
    was_training = model.training
    model.eval()
    try:
        with _threads(threads):
            return math.exp(_total_nll(model, ids, n, seq_len, batch_size) / n)
    finally:
        model.train(was_training)


def _total_nll(model, ids, n, seq_len, batch_size) -> float:
    total = 0.0
    full = n // seq_len
    x = ids[: full * seq_len].view(full, seq_len)
    y = ids[1: full * seq_len + 1].view(full, seq_len)
    for i in range(0, full, batch_size):
        logits = model(x[i: i + batch_size]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i: i + batch_size].flatten(), reduction="sum"))
    rest = n - full * seq_len
    if rest:
        logits = model(ids[full * seq_len: n].unsqueeze(0)).float()
        total += float(F.cross_entropy(logits[0], ids[full * seq_len + 1: n + 1], reduction="sum"))
    return total


@contextlib.contextmanager
def _threads(n):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: TinyGPT, text, steps: int, lr: float, seed: int, *, batch_size: int = 16, seq_len: int = 128,
          warmup: int = 10, weight_decay: float = 0.1, grad_clip: float = 1.0, threads=TRAIN_THREADS,
          log_every: int = 0) -> list:
    """Trains ``model`` in place on next-byte prediction: AdamW (betas 0.9,
    0.95; no decay on norm weights), linear warm-up then cosine decay, gradient
    clipping, batches from ``batches(text, seq_len, batch_size, seed)``.

    Deterministic: the global RNG is seeded with ``seed`` inside (and
    restored after), the batch order depends on ``seed`` alone, and torch runs
    on ``threads`` threads (restored after; ``None`` keeps the current
    setting). Returns the training loss of every step."""
    if steps < 1:
        raise ValueError(f"train: steps must be >= 1, got {steps}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    losses = []
    model.train()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data = batches(text, seq_len, batch_size, seed)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            x, y = next(data)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=False)
            opt.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  step {step:4d}  loss {losses[-1]:.3f}  lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    model.eval()
    return losses


# --- the cache ---------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters of one cached stage."""

    steps: int
    lr: float
    batch_size: int = 16
    seq_len: int = 128
    warmup: int = 10
    weight_decay: float = 0.1


MODEL_CONFIG = TinyGPTConfig()
# 1.1M parameters, 2,048 tokens a step: pretraining sees ~2.5 epochs of its
# 167 KB, each fine-tune ~2 epochs of its part.
PRETRAIN = Recipe(steps=200, lr=3e-3, warmup=20)
FINETUNE = Recipe(steps=80, lr=3e-3, warmup=10)


def cache_root() -> str:
    root = os.environ.get("FERROX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ferrox")
    return os.path.join(root, "tiny-gpt")


def cache_key() -> str:
    """Hash of everything that determines the cached weights."""
    spec = {"code_version": CODE_VERSION, "config": asdict(MODEL_CONFIG), "split": corpus.split(0).digest(),
            "pretrain": asdict(PRETRAIN), "finetune": asdict(FINETUNE), "threads": TRAIN_THREADS}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> str:
    return os.path.join(cache_root(), cache_key())


@contextlib.contextmanager
def _locked(path: str):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the cache whole
        yield False
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached(name: str, build, root: str = None, key: str = None) -> str:
    """The folder ``name`` of the cache ``root`` (default: the tiny GPT's,
    ``cache_dir()``; ``key`` is recorded with it), made by
    ``build(tmp_folder) -> info`` if missing, published atomically."""
    root = root or cache_dir()
    target = os.path.join(root, name)
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, f".{name}.lock")) as exclusive:
        if os.path.isfile(os.path.join(target, "model.safetensors")):
            return target  # another process made it while we waited
        for stale in os.listdir(root) if exclusive else ():  # left by killed processes
            if stale.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            info = build(tmp)
            info.update(wall_seconds=round(time.perf_counter() - wall, 2), cpu_seconds=round(time.process_time() - cpu, 2),
                        torch=torch.__version__, cache_key=key or cache_key())
            with open(os.path.join(tmp, "ferrox_training.json"), "w") as f:
                json.dump(info, f, indent=1)
            try:
                os.rename(tmp, target)
            except OSError:
                if not os.path.isfile(os.path.join(target, "model.safetensors")):
                    raise
                # published meanwhile by a process that does not honour the lock: use it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def stage_name(part: str = "pretrain", seed: int = 0) -> str:
    """The cache folder name of a stage: ``pretrained-seed0``, ``finetune-<part>-seed0``."""
    return f"pretrained-seed{seed}" if part == "pretrain" else f"finetune-{part}-seed{seed}"


def is_cached(part: str = "pretrain", seed: int = 0) -> bool:
    """Whether ``pretrained(seed)`` (``part="pretrain"``) or ``fine_tuned(part, seed)`` is already trained."""
    return os.path.isfile(os.path.join(cache_dir(), stage_name(part, seed), "model.safetensors"))


def _check_seed(seed):
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def pretrained(seed: int = 0) -> str:
    """Folder of the tiny GPT pretrained on ``corpus.split(0).pretrain``
    (weights initialised and batches drawn from ``seed``)."""
    _check_seed(seed)

    def build(tmp):
        model = TinyGPT(MODEL_CONFIG, seed=seed)
        r = PRETRAIN
        losses = train(model, corpus.split(0).pretrain, r.steps, r.lr, seed, batch_size=r.batch_size,
                       seq_len=r.seq_len, warmup=r.warmup, weight_decay=r.weight_decay)
        save_pretrained(model, tmp)
        return {"stage": "pretrain", "seed": seed, "recipe": asdict(r), "final_loss": losses[-1]}

    return _cached(stage_name("pretrain", seed), build)


def fine_tuned(part: str, seed: int = 0) -> str:
    """Folder of ``pretrained(seed)`` fine-tuned on ``corpus.split(0).finetune[part]``."""
    _check_seed(seed)
    parts = tuple(corpus.FINETUNE_TOPICS)
    if part not in parts:
        raise ValueError(f"fine_tuned: unknown part {part!r} (known: {list(parts)})")
    base = pretrained(seed)

    def build(tmp):
        model = load_pretrained(base)
        r = FINETUNE
        # a batch order of its own per part, from the same seed
        ft_seed = seed * 1000 + 1 + parts.index(part)
        losses = train(model, corpus.split(0).finetune[part], r.steps, r.lr, ft_seed, batch_size=r.batch_size,
                       seq_len=r.seq_len, warmup=r.warmup, weight_decay=r.weight_decay)
        save_pretrained(model, tmp)
        return {"stage": "finetune", "part": part, "seed": seed, "recipe": asdict(r), "final_loss": losses[-1]}

    return _cached(stage_name(part, seed), build)
