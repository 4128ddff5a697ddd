"""aTLAS: knowledge composition with learned anisotropic scaling of task
vectors (Zhang, Albert, Rodriguez-Opazo, van den Hengel, Abbasnejad,
NeurIPS 2024, https://arxiv.org/abs/2407.02880).

Task arithmetic adds task vectors τ_t = θ_t − θ0 with one global scale.
aTLAS splits every task vector into parameter blocks (by default one block
per parameter tensor) and learns one coefficient per (task vector, block):

    θ_b = θ0_b + Σ_t λ[t, b] · τ_{t,b}

Only λ is trained: T × B numbers that start at 0, i.e. at the pre-trained
model, with any loss backpropagated through the frozen network. The
gradient is ∂L/∂λ[t, b] = ⟨∇_{θ_b} L, τ_{t,b}⟩, one dot product per block
after an ordinary backward pass. The objective may be supervised (task
addition, few-shot learning) or unsupervised (the entropy of the model's
predictions, for test-time adaptation). ``blocks="isotropic"`` keeps one
coefficient per task vector, the baseline the paper compares against.
"""

import functools
import itertools
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.func import functional_call

from .. import _checks
from .task_vector import TaskVector

#: ``blocks`` presets: one block per parameter tensor (the paper's default)
#: or one block for the whole model (isotropic scaling, per task vector).
BLOCK_PRESETS = ("tensor", "isotropic")
OBJECTIVES = ("supervised", "entropy")

TaskVectorLike = Union[TaskVector, Mapping[str, torch.Tensor]]
Blocks = Union[str, Mapping[str, str]]


class ATLAS(torch.nn.Module):
    """A frozen base module whose parameters are θ0 + Σ_t λ[t, block] · τ_t.

    ``task_vectors`` are ``TaskVector`` objects or mappings name → delta;
    each must hold every parameter of ``base`` with its shape. Entries that
    name a buffer of ``base`` (batch-norm statistics) or a tied alias of a
    parameter are ignored: buffers stay the base's, as in the paper's code.
    ``blocks`` is ``"tensor"``, ``"isotropic"`` or a mapping parameter name →
    block label (parameters sharing a label share a coefficient).

    The base's parameters stop requiring grad; ``coef`` (T × B, zeros) is the
    only trainable parameter. Coefficients and the stacked task vectors are
    float64 when the base has float64 parameters, float32 otherwise.
    """

    def __init__(self, base: torch.nn.Module, task_vectors: Sequence[TaskVectorLike], blocks: Blocks = "tensor"):
        super().__init__()
        params = _float_parameters(base)
        deltas = _validated_deltas(base, params, task_vectors)
        self.param_names: Tuple[str, ...] = tuple(params)
        self.block_names, self.block_of_param = _assign_blocks(self.param_names, blocks)
        coef_dtype = functools.reduce(torch.promote_types, (p.dtype for p in params.values()), torch.float32)
        base.requires_grad_(False)
        self.base = base
        for i, (name, p) in enumerate(params.items()):
            stacked = torch.stack([d[name].to(device=p.device, dtype=coef_dtype) for d in deltas])
            # Not persistent: the task vectors are inputs, the state is λ.
            self.register_buffer(f"task_vectors_{i}", stacked, persistent=False)
        device = next(iter(params.values())).device
        self.coef = torch.nn.Parameter(torch.zeros(len(deltas), len(self.block_names), dtype=coef_dtype, device=device))

    @property
    def coefficients(self) -> torch.Tensor:
        """λ as a detached (task vectors × blocks) tensor."""
        return self.coef.detach().clone()

    def combined_parameters(self) -> Dict[str, torch.Tensor]:
        """θ0 + Σ_t λ[t, block] · τ_t for every parameter, differentiable in λ
        and in each base parameter's dtype."""
        out = {}
        for i, (name, theta0) in enumerate(self.base.named_parameters()):
            stacked = getattr(self, f"task_vectors_{i}")
            delta = torch.tensordot(self.coef[:, self.block_of_param[i]], stacked, dims=1)
            out[name] = (theta0.to(delta.dtype) + delta).to(theta0.dtype)
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.combined_parameters(), args, kwargs)

    def merged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The base's full state dict with every parameter replaced by
        θ0 + Σ λ τ: plain detached tensors in the base's dtypes, loadable into
        the base module (tied aliases get the same merged tensor)."""
        with torch.no_grad():
            merged = self.combined_parameters()
        name_of = {id(p): name for name, p in self.base.named_parameters()}
        state = self.base.state_dict(keep_vars=True)
        return {k: (merged[name_of[id(v)]] if id(v) in name_of else v.detach().clone()) for k, v in state.items()}

    def extra_repr(self) -> str:
        return f"task_vectors={self.coef.shape[0]}, blocks={self.coef.shape[1]}"


def _float_parameters(base: torch.nn.Module) -> Dict[str, torch.Tensor]:
    params = dict(base.named_parameters())
    if not params:
        raise ValueError("base: expected a module with parameters, got none")
    for name, p in params.items():
        if not p.is_floating_point():
            raise ValueError(f"base: parameter {name!r} has dtype {p.dtype}; aTLAS scales floating-point parameters")
    return params


def _validated_deltas(base: torch.nn.Module, params: Mapping[str, torch.Tensor],
                      task_vectors: Sequence[TaskVectorLike]) -> List[Mapping[str, torch.Tensor]]:
    deltas = [tv.deltas if isinstance(tv, TaskVector) else tv for tv in task_vectors]
    if not deltas:
        raise ValueError("task_vectors: expected at least one task vector, got none")
    known = set(base.state_dict())
    for i, delta in enumerate(deltas):
        where = f"task_vectors[{i}]"
        for name, d in delta.items():
            _checks.tensor(f"{where}[{name!r}]", d)
            if name not in known:
                raise ValueError(f"{where}: tensor {name!r} is not in the base model")
            if not d.is_floating_point():
                raise ValueError(f"{where}: tensor {name!r} has dtype {d.dtype}; expected a floating-point delta")
        for name, p in params.items():
            if name not in delta:
                raise ValueError(f"{where}: parameter {name!r} of the base model is missing")
            if delta[name].shape != p.shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {list(delta[name].shape)}, "
                                 f"the base model's has {list(p.shape)}")
    return deltas


def _assign_blocks(param_names: Sequence[str], blocks: Blocks) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """(block labels in first-use order, the block index of each parameter)."""
    if isinstance(blocks, str):
        if blocks not in BLOCK_PRESETS:
            raise ValueError(f"blocks: expected one of {BLOCK_PRESETS} or a mapping parameter -> block, got {blocks!r}")
        label_of = {n: (n if blocks == "tensor" else "all") for n in param_names}
    else:
        label_of = dict(blocks)
        missing = [n for n in param_names if n not in label_of]
        unknown = sorted(set(label_of) - set(param_names))
        if missing:
            raise ValueError(f"blocks: parameter {missing[0]!r} has no block")
        if unknown:
            raise ValueError(f"blocks: {unknown[0]!r} is not a parameter of the base model")
    labels = tuple(dict.fromkeys(label_of[n] for n in param_names))
    index = {label: b for b, label in enumerate(labels)}
    return labels, tuple(index[label_of[n]] for n in param_names)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the last dimension: the
    unsupervised objective (confident predictions on unlabelled data)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def train_atlas(atlas: ATLAS, batches: Iterable, *, loss_fn: Optional[Callable] = None,
                objective: str = "supervised", steps: int = 100, lr: float = 1e-2) -> List[float]:
    """Trains ``atlas.coef`` with Adam for ``steps`` steps, cycling through
    ``batches``; returns the loss of every step.

    Supervised batches are ``(inputs, targets)`` and the loss is
    ``loss_fn(atlas(*inputs), targets)``; entropy batches are ``inputs`` or
    ``(inputs, ...)`` (anything after the inputs is ignored). ``inputs`` is a
    tensor or a tuple of positional arguments.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if objective == "supervised" and loss_fn is None:
        raise ValueError("loss_fn: the supervised objective needs a loss function, got None")
    _checks.count("steps", steps, 1, 2**31 - 1)
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr}")
    optimizer = torch.optim.Adam([atlas.coef], lr=lr)
    losses = []
    for batch in itertools.islice(itertools.cycle(batches), steps):
        optimizer.zero_grad()
        loss = _batch_loss(atlas, batch, objective, loss_fn)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if not losses:
        raise ValueError("batches: expected at least one batch, got none")
    return losses


def fit_atlas(model: torch.nn.Module, task_vectors: Sequence[TaskVectorLike], batches: Iterable, *,
              loss_fn: Optional[Callable] = None, objective: str = "supervised", steps: int = 100,
              lr: float = 1e-2, blocks: Blocks = "tensor") -> ATLAS:
    """Wraps ``model`` in an ``ATLAS`` over ``task_vectors`` and trains the
    coefficients (``train_atlas``); ``merged_state_dict()`` of the result is
    the composed model."""
    atlas = ATLAS(model, task_vectors, blocks=blocks)
    train_atlas(atlas, batches, loss_fn=loss_fn, objective=objective, steps=steps, lr=lr)
    return atlas


def _batch_loss(atlas: ATLAS, batch, objective: str, loss_fn: Optional[Callable]) -> torch.Tensor:
    if objective == "supervised":
        inputs, targets = batch
        return loss_fn(atlas(*_as_args(inputs)), targets)
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return prediction_entropy(atlas(*_as_args(inputs)))


def _as_args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
