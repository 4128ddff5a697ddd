"""Scale distillation: the signs frozen, only the α's trained so that the
compressed model's outputs match the fine-tune's on calibration batches
(logits of a causal LM, the last hidden state of an encoder), with AdamW
and a cosine schedule — BitDelta's recipe, training α and nothing else."""

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from . import format as fmt
from .modules import apply_bitdelta


def model_output(out) -> torch.Tensor:
    """What distillation matches: a tensor as is, ``.logits`` when present
    (causal LMs), else ``.last_hidden_state`` (encoders), else the first
    element of a tuple."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if torch.is_tensor(value):
            return value
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"cannot find the output to match in a {type(out).__name__}; pass output_fn=")


@dataclass
class DistillResult:
    model: nn.Module           # the compressed model with the trained α's
    delta: fmt.BitDelta        # the same delta, its α's replaced by the trained ones
    losses: List[float]        # training loss (output MSE) per step
    initial_loss: float        # mean MSE over the batches before training (α = mean|Δ|)


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def distill(model_base: nn.Module, delta, model_ft: nn.Module, batches: Iterable, *, steps: int = 100,
            lr: float = 0.1, per_row: bool = False, relative_lr: bool = True, weight_decay: float = 0.0,
            output_fn: Callable = model_output, progress: Optional[bool] = None) -> DistillResult:
    """Trains the α's of ``delta`` on ``batches`` (a list of model inputs:
    tensors, or dicts of keyword arguments) to minimise the MSE between the
    compressed model's outputs and ``model_ft``'s. ``model_base`` is copied,
    not changed. ``per_row`` trains one α per output row (starting from the
    delta's α). Returns the trained model, the updated delta and the loss
    curve.

    ``relative_lr`` (default): each matrix's learning rate is ``lr`` times
    its initial α, so ``lr`` is the fraction by which an α may move per step
    whatever its magnitude (α's differ by orders of magnitude between models:
    about 1e-2 on the tiny GPT, 4e-4 on the MiniLM fine-tune, where one
    absolute lr diverges on one and crawls on the other). With Adam this is
    the same as training α/α₀. ``relative_lr=False``: ``lr`` is absolute,
    as in the BitDelta reference code (lr 1e-4)."""
    from tqdm import tqdm

    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one calibration batch")
    d = delta if isinstance(delta, fmt.BitDelta) else fmt.BitDelta.load(delta)
    model = copy.deepcopy(model_base)
    swapped = apply_bitdelta(model, d)
    for p in model.parameters():
        p.requires_grad_(False)
    if not isinstance(relative_lr, bool):
        raise TypeError(f"relative_lr: expected a bool, got {type(relative_lr).__name__}")
    groups = []
    for m in swapped.values():
        if per_row and m.alpha.dim() == 0:
            m.alpha = nn.Parameter(m.alpha.detach().expand(m.out_features).clone())
        m.alpha.requires_grad_(True)
        scale = float(m.alpha.detach().abs().mean()) if relative_lr else 1.0
        groups.append({"params": [m.alpha], "lr": lr * (scale if scale > 0 else 1.0)})
    model_ft.eval()
    model.eval()  # no dropout: the match is deterministic
    with torch.no_grad():
        targets = [output_fn(_call(model_ft, b)).detach() for b in batches]

    def loss_on(i):
        return nn.functional.mse_loss(output_fn(_call(model, batches[i])).float(), targets[i].float())

    with torch.no_grad():
        initial = sum(float(loss_on(i)) for i in range(len(batches))) / len(batches)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    losses = []
    for step in tqdm(range(steps), desc="ferrox distill", disable=None if progress is None else not progress):
        opt.zero_grad(set_to_none=True)
        loss = loss_on(step % len(batches))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    for m in swapped.values():
        m.alpha.requires_grad_(False)
    for name in d.entries:
        d.set_alpha(name, swapped[name.rpartition(".")[0]].alpha.detach())
    return DistillResult(model, d, losses, initial)


def output_mse(model: nn.Module, model_ft: nn.Module, batches: Iterable, output_fn: Callable = model_output) -> float:
    """Mean output MSE of ``model`` against ``model_ft`` over ``batches``."""
    batches = list(batches)
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(output_fn(_call(model, b)).float(),
                                                output_fn(_call(model_ft, b)).float())) for b in batches) / len(batches)
