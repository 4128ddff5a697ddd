"""The shared base of ferrox's optimizers.

A ``torch.optim.Optimizer`` subclass that adds what every ferrox optimizer
promises on top of the torch contract:

* **tensor-only state**: per-parameter state lives in ``self.state[p]`` as
  tensors (integers as 0-d int64 tensors) and optimizer-wide state (the
  probe seed and counter, the ``stats`` counters) in ``self.global_state``,
  also tensors. ``state_dict()`` therefore loads with
  ``torch.load(weights_only=True)`` and holds everything an exact resume needs;
  ``load_state_dict`` keeps the saved dtypes (torch would cast f32 state to a
  bf16 parameter's dtype, which breaks bit-identical resume).
* **non-finite gradients**: ``nonfinite="skip"`` (default) leaves parameters
  and state untouched and counts the step in ``stats["skipped_steps"]``;
  ``nonfinite="raise"`` raises ``FloatingPointError`` before touching them.
* **validation**: the ``check_*`` helpers raise ``ValueError`` naming the
  hyperparameter.
* **probes**: ``probe_seed``/``next_probe_counter`` give the (seed, counter)
  pair a Hutchinson or SPSA probe is keyed by; the counter advances with the
  optimizer, not with any process's RNG, so every DDP rank draws the same.
"""

from __future__ import annotations

import math
import operator

import torch

from .. import _core

_U64 = 2**64 - 1
_NONFINITE = ("skip", "raise")


# --- hyperparameter checks -------------------------------------------------

def check_float(name: str, value, *, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number in the interval lo..hi (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise ValueError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or below or above:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a finite value in {left}{lo}, {hi}{right}, got {value}")
    return value


def check_int(name: str, value, *, lo: int = 0, hi: int = _U64) -> int:
    """An integer (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    value = operator.index(value)  # numpy integers too
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {lo} <= {name} <= {hi}, got {value}")
    return value


def check_betas(name: str, betas, n: int = 2) -> tuple:
    """A tuple of ``n`` EMA coefficients, each in [0, 1)."""
    try:
        values = tuple(betas)
    except TypeError:
        raise ValueError(f"{name}: expected {n} coefficients in [0, 1), got {betas!r}") from None
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} coefficients in [0, 1), got {betas!r}")
    return tuple(check_float(f"{name}[{i}]", b, lo=0.0, hi=1.0, hi_open=True) for i, b in enumerate(values))


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# --- tensor-only state helpers ----------------------------------------------

def int_tensor(value: int) -> torch.Tensor:
    """A 0-d int64 tensor; a u64 (a seed) is stored by its two's complement."""
    value = int(value)
    if value >= 2**63:
        value -= 2**64
    return torch.tensor(value, dtype=torch.int64)


def tensor_int(t: torch.Tensor) -> int:
    """Inverse of :func:`int_tensor` for non-negative values up to 2^64 - 1."""
    value = int(t.item())
    return value + 2**64 if value < 0 else value


def grads_finite(params) -> bool:
    """True when every gradient in ``params`` is finite (one sync overall)."""
    return all_finite([p.grad for p in params if p.grad is not None])


_SCANNED = (torch.float32, torch.float16, torch.bfloat16)


def all_finite(tensors) -> bool:
    """True when every tensor is finite. CPU float tensors: one parallel Rust
    scan that allocates nothing (``torch.isfinite`` writes a bool tensor per
    input, which cost more than the fused update itself); others: one
    reduction and one host sync per device."""
    scanned, by_device = [], {}
    for t in tensors:
        if t.device.type == "cpu" and t.dtype in _SCANNED:
            scanned.append(t.detach())
        else:
            by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    if scanned and not _core.optim_all_finite(scanned):
        return False
    return all(bool(torch.stack(flags).all()) for flags in by_device.values())


class Optimizer(torch.optim.Optimizer):
    """Base class of ferrox's optimizers (see the module docstring).

    Subclasses call ``super().__init__(params, defaults, nonfinite=..., seed=...)``
    and implement ``step``; they use :meth:`finite_or_skip` before changing any
    parameter and :meth:`count` for their ``stats`` counters.
    """

    #: counters every optimizer reports; subclasses extend with their own names
    STAT_NAMES: tuple = ("steps", "skipped_steps")

    def __init__(self, params, defaults: dict, *, nonfinite: str = "skip", seed: int = 0):
        self.nonfinite = check_choice("nonfinite", nonfinite, _NONFINITE)
        super().__init__(params, defaults)
        self.global_state = {"probe_seed": int_tensor(check_int("seed", seed)),
                             "probe_counter": int_tensor(0), "step": int_tensor(0)}
        for name in self.STAT_NAMES:
            self.global_state[f"stat_{name}"] = torch.tensor(0.0, dtype=torch.float64)

    # --- counters -----------------------------------------------------------

    def count(self, name: str, amount: float = 1.0) -> None:
        self.global_state[f"stat_{name}"] += float(amount)

    @property
    def stats(self) -> dict:
        """Counters for logging: totals, plus rates derived by subclasses."""
        return {k[5:]: float(v) for k, v in self.global_state.items() if k.startswith("stat_")}

    # --- probes -------------------------------------------------------------

    @property
    def probe_seed(self) -> int:
        return tensor_int(self.global_state["probe_seed"])

    @property
    def probe_counter(self) -> int:
        """The counter the next probe draw will use."""
        return tensor_int(self.global_state["probe_counter"])

    @property
    def step_count(self) -> int:
        """Steps taken (skipped ones not counted); saved in state_dict."""
        return tensor_int(self.global_state["step"])

    def advance_step(self) -> int:
        """Counts one step taken; returns the new ``step_count``."""
        t = self.step_count + 1
        self.global_state["step"] = int_tensor(t)
        return t

    def next_probe_counter(self) -> int:
        """The counter of the next probe draw; advances it (saved in state_dict)."""
        counter = tensor_int(self.global_state["probe_counter"])
        self.global_state["probe_counter"] = int_tensor(counter + 1)
        return counter

    # --- non-finite gradients -------------------------------------------------

    def finite_or_skip(self, params) -> bool:
        """True when the step may proceed; False (counted) when it is skipped.

        Raises ``FloatingPointError`` with ``nonfinite="raise"``; in neither
        case has anything been modified yet.
        """
        if grads_finite(params):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient (NaN or Inf); "
                                     "parameters and state left unchanged")
        self.count("skipped_steps")
        return False

    def group_params(self):
        """All parameters with a gradient, in param-group order."""
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    # --- state dict ---------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["ferrox"] = {k: v.clone() for k, v in self.global_state.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved_state = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; ferrox keeps
        # f32 state for bf16 parameters, so restore the saved dtypes.
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved_group["params"]):
                saved = saved_state.get(pid)
                if saved is not None:
                    self.state[p] = {k: (v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v)
                                     for k, v in saved.items()}
        for k, v in state_dict.get("ferrox", {}).items():
            self.global_state[k] = v.detach().to("cpu", copy=True)
