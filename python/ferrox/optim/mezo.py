"""MeZO: zeroth-order SGD with in-place SPSA (Malladi et al., "Fine-Tuning
Language Models with Just Forward Passes", 2023).

Each step draws a Gaussian direction z (one Philox probe seed; tensor k of
the optimizer's parameters uses Philox stream k) and, for each of the
``n_probes`` probes,

    θ ← θ + εz;  ℓ+ = L(θ);  θ ← (θ − εz) − εz;  ℓ− = L(θ);  θ ← θ + εz
    g = (ℓ+ − ℓ−) / (2ε)                       (the projected gradient)

then θ ← θ·(1 − lr·λ) − lr·Σ_j g_j z_j / n. Every change is one fused pass
of the Rust core (CPU) or ``cuda/mezo.cu`` (CUDA, on torch's current
stream) that regenerates z from Philox instead of storing it: no memory of
parameter size beyond inference. The last probe's restore is fused with the
decay and its update term. The closure only returns the loss (a 0-d tensor
or a number; it is called under ``torch.no_grad()``), so the objective may
be non-differentiable (0/1 accuracy, F1).

Bits: CPU and CUDA passes give the same bits. Floating-point addition is not
invertible (``fl(a + b) − b`` is not always ``a``), so the +εz, −2εz, +εz
cycle can leave an element a rounding away from where it started when |θ| is
near or below ε|z| (measured and bounded in the tests). Nothing depends on
that being exact: the replay log re-runs the same passes and rebuilds the
weights bit for bit, and a resumed run continues bit-identically.

Precision: float32 parameters only. ε = 1e-3 is below bfloat16's resolution
(2^-8 relative: a weight of 0.5 moves in steps of 2^-9 ≈ 2e-3) and near
float16's, so the two losses would mostly see the same rounded weights;
16-bit parameters are refused with ``ValueError``.

Weight decay: per parameter group (``weight_decay``); MeZO's rule (no decay
on biases and normalisation weights) is :meth:`MeZO.param_groups`.

Replay: with ``record=True`` (default) ``opt.log`` holds the fine-tune as
one (seed, projected gradient) pair per probe plus each step's ε, lr and
weight decay; ``log.save(path)`` / ``MeZOLog.load(path)`` (a
``torch.load(weights_only=True)`` file) and ``log.replay(params)`` rebuilds
the weights from the initial ones bit for bit — a fine-tune in ~16 bytes per
probe.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .. import _core
from ._base import Optimizer, check_float, check_int, int_tensor, tensor_int

_GOLDEN = 0x9E3779B97F4A7C15
_M64 = 2**64 - 1
_FORMAT = "ferrox.mezo.log/1"


def probe_seed(seed: int, counter: int) -> int:
    """The Philox key of probe ``counter`` under the optimizer's ``seed``
    (splitmix64 of their combination, so nearby counters give unrelated keys)."""
    x = (seed + (counter + 1) * _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _f32(x: float) -> float:
    """x rounded to float32 (the value the kernel receives), as a Python float."""
    return float(np.float32(x))


def _loss_value(loss) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"closure: expected a 0-d loss, got a tensor of shape {list(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, (int, float, np.floating, np.integer)) and not isinstance(loss, bool):
        return float(loss)
    raise ValueError(f"closure: expected a 0-d tensor or a number, got {type(loss).__name__}")


class _Passes:
    """The fused pass over a fixed list of parameter groups (tensor k is
    Philox stream k), shared by the optimizer and the replay."""

    def __init__(self, groups):
        # groups: list of lists of tensors; streams follow the flat order.
        self.groups, self.streams, k = [], [], 0
        for params in groups:
            self.groups.append(list(params))
            self.streams.append(list(range(k, k + len(params))))
            k += len(params)
        flat = [p for g in self.groups for p in g]
        self.device = flat[0].device if flat else torch.device("cpu")

    def run(self, seed, restore=0.0, coef=0.0, decays=None):
        kw = {}
        if self.device.type == "cuda":
            kw["stream"] = torch.cuda.current_stream(self.device).cuda_stream
        for gi, (params, streams) in enumerate(zip(self.groups, self.streams)):
            decay = 1.0 if decays is None else decays[gi]
            c = coef[gi] if isinstance(coef, (list, tuple)) else coef
            if params:
                _core.mezo_pass([p.data for p in params], streams, seed, restore, decay, c, **kw)


def _run_step(passes, eps, seeds, probe, lrs, wds):
    """One MeZO step over ``passes``: ``probe(j, seed)`` evaluates probe j
    (between the +εz and −2εz passes it is handed) and returns its projected
    gradient, NaN for a non-finite loss. Returns the gradients and whether the
    update was applied (False: parameters restored, step skipped)."""
    n = len(seeds)
    e = _f32(eps)
    gs = []
    for j, s in enumerate(seeds):
        # θ − εz as (θ + εz) − εz − εz in one pass: undoing +εz by its exact
        # inverse before stepping on keeps the final restore exact (−2εz in
        # one addition would add a second rounding that +εz cannot undo).
        g = probe(j, s, lambda: passes.run(s, coef=e), lambda: passes.run(s, restore=-e, coef=-e))
        gs.append(g)
        if not math.isfinite(g):
            passes.run(s, coef=e)
            return gs, False
        if j < n - 1:
            passes.run(s, coef=e)
    decays = [_f32(1 - lr * wd) for lr, wd in zip(lrs, wds)]
    coefs = [[_f32(-lr * g / n) for lr in lrs] for g in gs]
    # The last probe's restore, the decay and its update in one pass.
    passes.run(seeds[-1], restore=e, coef=coefs[-1], decays=decays)
    for j in range(n - 1):
        passes.run(seeds[j], coef=coefs[j])
    return gs, True


class MeZOLog:
    """A MeZO fine-tune as data: per probe (step, seed, projected gradient),
    per step ε and each group's (lr, weight_decay); see the module docs."""

    def __init__(self, group_sizes, shapes, n_probes):
        self.group_sizes = list(group_sizes)
        self.shapes = [list(s) for s in shapes]
        self.n_probes = int(n_probes)
        self.steps = []  # (eps, [(lr, wd) per group], [(seed, g) per probe evaluated])

    def append(self, eps, hyper, probes):
        self.steps.append((float(eps), [(float(a), float(b)) for a, b in hyper], [(int(s), float(g)) for s, g in probes]))

    def __len__(self):
        return len(self.steps)

    def tensors(self) -> dict:
        """The log as tensors only (what ``save`` writes and state_dict holds)."""
        probes = [(i, s, g) for i, (_, _, ps) in enumerate(self.steps) for s, g in ps]
        return {
            "log_eps": torch.tensor([e for e, _, _ in self.steps], dtype=torch.float64),
            "log_hyper": torch.tensor([h for _, h, _ in self.steps], dtype=torch.float64).reshape(len(self.steps), len(self.group_sizes), 2),
            "log_step": torch.tensor([i for i, _, _ in probes], dtype=torch.int64),
            "log_seed": torch.stack([int_tensor(s) for _, s, _ in probes]) if probes else torch.zeros(0, dtype=torch.int64),
            "log_grad": torch.tensor([g for _, _, g in probes], dtype=torch.float64),
            "log_group_sizes": torch.tensor(self.group_sizes, dtype=torch.int64),
            "log_n_probes": torch.tensor(self.n_probes, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, t: dict, shapes):
        log = cls(t["log_group_sizes"].tolist(), shapes, int(t["log_n_probes"]))
        per_step = [[] for _ in range(len(t["log_eps"]))]
        for i, s, g in zip(t["log_step"].tolist(), t["log_seed"], t["log_grad"].tolist()):
            per_step[i].append((tensor_int(s), g))
        for i, eps in enumerate(t["log_eps"].tolist()):
            log.append(eps, t["log_hyper"][i].tolist(), per_step[i])
        return log

    def save(self, path):
        """Writes the log (atomically) as a ``torch.load(weights_only=True)`` file."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"format": _FORMAT, "shapes": self.shapes, **self.tensors()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "MeZOLog":
        t = torch.load(os.fspath(path), weights_only=True)
        if not isinstance(t, dict) or t.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a MeZO log ({_FORMAT})")
        return cls.from_tensors(t, t["shapes"])

    def replay(self, params) -> None:
        """Applies the logged fine-tune in place to ``params`` (the initial
        weights, float32, in the optimizer's order): bit for bit the trained
        weights."""
        params = list(params)
        if [list(p.shape) for p in params] != self.shapes:
            raise ValueError(f"params: expected shapes {self.shapes}, got {[list(p.shape) for p in params]}")
        if any(p.dtype != torch.float32 for p in params):
            raise ValueError("params: expected float32 tensors")
        groups, k = [], 0
        for size in self.group_sizes:
            groups.append(params[k:k + size])
            k += size
        passes = _Passes(groups)
        with torch.no_grad():
            for eps, hyper, probes in self.steps:
                seeds = [s for s, _ in probes]
                logged = [g for _, g in probes]

                def probe(j, s, plus, minus):
                    plus()
                    minus()
                    return logged[j]

                _run_step(passes, eps, seeds, probe, [h[0] for h in hyper], [h[1] for h in hyper])


class MeZO(Optimizer):
    """Zeroth-order SGD with in-place SPSA (see the module docs).

    ``MeZO(params, lr, eps=1e-3, *, n_probes=1, weight_decay=0.0, seed=0,
    nonfinite="skip", record=True)``; ``step(closure)`` with a closure that
    returns the loss. A non-finite loss restores the parameters and skips
    the step (``stats["skipped_steps"]``), or raises ``FloatingPointError``
    with ``nonfinite="raise"``.
    """

    STAT_NAMES = ("steps", "skipped_steps", "probes")

    def __init__(self, params, lr, eps=1e-3, *, n_probes=1, weight_decay=0.0, seed=0,
                 nonfinite="skip", record=True):
        lr = check_float("lr", lr, lo=0.0, lo_open=True)
        self.eps = check_float("eps", eps, lo=0.0, lo_open=True)
        self.n_probes = check_int("n_probes", n_probes, lo=1, hi=2**20)
        weight_decay = check_float("weight_decay", weight_decay, lo=0.0)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), nonfinite=nonfinite, seed=seed)
        flat = [p for g in self.param_groups for p in g["params"]]
        for g in self.param_groups:
            check_float("lr", g["lr"], lo=0.0, lo_open=True)
            check_float("weight_decay", g["weight_decay"], lo=0.0)
        for i, p in enumerate(flat):
            if p.dtype != torch.float32:
                raise ValueError(
                    f"params: MeZO needs float32 parameters, params[{i}] is {p.dtype}: ε={self.eps:g} is below "
                    "the resolution of 16-bit weights (bfloat16 steps are 2^-8 relative), so the two losses "
                    "would see the same rounded weights; keep a float32 copy to fine-tune")
            if p.device != flat[0].device:
                raise ValueError(f"params: all on one device, params[{i}] is on {p.device}, params[0] on {flat[0].device}")
        self._passes = _Passes([g["params"] for g in self.param_groups])
        self.log = MeZOLog([len(g["params"]) for g in self.param_groups], [list(p.shape) for p in flat],
                           self.n_probes) if record else None

    @staticmethod
    def param_groups(model: torch.nn.Module, weight_decay: float):
        """MeZO's weight-decay rule as param groups: decay on weights of two or
        more dimensions, none on biases and normalisation weights (1-d)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ]

    @property
    def stats(self) -> dict:
        s = super().stats
        s["skip_rate"] = s["skipped_steps"] / s["steps"] if s["steps"] else 0.0
        return s

    def step(self, closure=None):
        if closure is None:
            raise ValueError("closure: MeZO.step needs a closure that returns the loss")
        for g in self.param_groups:
            check_float("lr", g["lr"], lo=0.0, lo_open=True)
        seeds = [probe_seed(self.probe_seed, self.next_probe_counter()) for _ in range(self.n_probes)]
        first = []

        def probe(j, s, plus, minus):
            # autocast keeps one low-precision copy of each weight for its whole
            # region: after an in-place pass it would serve the old weights.
            plus()
            torch.clear_autocast_cache()
            out = closure()
            lp = _loss_value(out)
            if j == 0:
                first.append(out)
            minus()
            torch.clear_autocast_cache()
            lm = _loss_value(closure())
            self.count("probes")
            g = (lp - lm) / (2 * self.eps)
            return g if math.isfinite(lp) and math.isfinite(lm) and math.isfinite(g) else math.nan

        lrs = [g["lr"] for g in self.param_groups]
        wds = [g["weight_decay"] for g in self.param_groups]
        with torch.no_grad():
            gs, applied = _run_step(self._passes, self.eps, seeds, probe, lrs, wds)
        self.count("steps")
        if self.log is not None:
            self.log.append(self.eps, list(zip(lrs, wds)), list(zip(seeds, gs)))
        if not applied:
            self.count("skipped_steps")
            if self.nonfinite == "raise":
                raise FloatingPointError("MeZO: non-finite loss (NaN or Inf); parameters restored, step skipped")
        self.last_projected_grads = gs
        return first[0] if first else None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self.log is not None:
            sd["ferrox"].update(self.log.tensors())
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        log_keys = [k for k in self.global_state if k.startswith("log_")]
        if self.log is not None and log_keys:
            self.log = MeZOLog.from_tensors(self.global_state, self.log.shapes)
        for k in log_keys:
            del self.global_state[k]
