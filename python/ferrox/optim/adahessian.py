"""AdaHessian (Yao et al. 2021): Adam with the Hessian diagonal in place of
the squared gradient.

Per element, with D the Hutchinson estimate z ⊙ Hz (Rademacher z), averaged
over each spatial k×k block of a 4-D conv kernel (the paper's block averaging
of z ⊙ Hz; the official code averages |Hz|, equal outside conv kernels)::

    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·D²                           (refresh steps only)
    θ ← θ·(1 − lr·λ) − lr/(1 − β1^t) · m / ((v / (1 − β2^s))^(k/2) + ε)

t counts steps and s Hessian refreshes (s = t with ``update_period=1``, the
default). Defaults are the official code's: lr 0.15, β = (0.9, 0.999),
ε = 1e-4, k (``hessian_power``) = 1, λ = 0 (decoupled).

``step(closure)``: the closure zeroes grads, computes the loss and calls
``loss.backward(create_graph=True)`` (the convention shared with SophiaH).
The elementwise update is one fused Rust (CPU) / CUDA call per parameter
group (``ferrox._core.adahessian_update``).
"""

from __future__ import annotations

import torch

from .. import _core
from ..cuda import stream_of
from . import _hessian
from ._base import Optimizer, all_finite, check_betas, check_float, check_int


class AdaHessian(_hessian.HessianOptimizer, Optimizer):
    STATE_KEYS = ("exp_avg", "exp_hessian_diag_sq")

    def __init__(self, params, lr: float = 0.15, betas=(0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, update_period: int = 1, *,
                 seed: int = 0, nonfinite: str = "skip"):
        check_float("lr", lr, lo=0.0)
        betas = check_betas("betas", betas)
        check_float("eps", eps, lo=0.0, lo_open=True)
        check_float("weight_decay", weight_decay, lo=0.0)
        check_float("hessian_power", hessian_power, lo=0.0, hi=1.0)
        self.update_period = check_int("update_period", update_period, lo=1, hi=2**31)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        super().__init__(params, defaults, nonfinite=nonfinite, seed=seed)

    def step(self, closure=None):
        if closure is None:
            raise ValueError("AdaHessian.step: a closure is required (it computes the Hessian estimate)")
        with torch.enable_grad():
            loss = closure()
        groups = self._indexed()
        params = [p for _, items in groups for _, p in items]
        try:
            if not self.finite_or_skip(params):
                return loss
            refresh = self.step_count % self.update_period == 0
            ds = probes = None
            if refresh:
                zs, hzs = _hessian.hutchinson(params, [k for _, items in groups for k, _ in items],
                                              seed=self.probe_seed, counter=self.probe_counter)
                # D = z ⊙ Hz is fused into the update (Hz with its probe), except
                # for conv kernels, whose D is block-averaged here first.
                conv = [hz.dim() == 4 for hz in hzs]
                ds = [_hessian.spatial_average(z * hz) if c else hz for z, hz, c in zip(zs, hzs, conv)]
                probes = [None if c else z for z, c in zip(zs, conv)]
                # z = ±1, so z ⊙ Hz is finite exactly when Hz is.
                if not all_finite(ds):
                    if self.nonfinite == "raise":
                        raise FloatingPointError("AdaHessian: non-finite Hessian estimate; parameters and state left unchanged")
                    self.count("skipped_steps")
                    return loss
                self.next_probe_counter()
                self.count("hessian_updates")
            t = self.advance_step()
            s = int(self.stats["hessian_updates"])
            offset = 0
            for group, items in groups:
                if items:
                    part = slice(offset, offset + len(items))
                    self._update_group(group, [p for _, p in items], None if ds is None else ds[part], t, s,
                                       None if probes is None else probes[part])
                offset += len(items)
            self.count("steps")
            return loss
        finally:
            self._release_graph(params)

    def _update_group(self, group, params, ds, t, s, probes=None):
        """One fused update of ``params``; on refresh steps ``ds`` holds D, or
        Hz where ``probes`` has its z (D = z ⊙ Hz, formed in the kernel)."""
        lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
        states = [self._state_of(p) for p in params]
        elements = sum(p.numel() for p in params)
        kw = dict(step_size=lr / (1.0 - beta1 ** t), beta1=beta1, beta2=beta2, bias_correction2=1.0 - beta2 ** s,
                  eps=group["eps"], power=group["hessian_power"], decay=1.0 - lr * wd, stream=stream_of(params[0]))
        counts = self._counts(params[0].device)
        # Elementwise, so tensors with and without a probe may go in two calls.
        parts = [(range(len(params)), None)]
        if ds is not None:
            self.count("refreshed_elements", elements)
            probes = probes or [None] * len(params)
            fused = [i for i, z in enumerate(probes) if z is not None]
            plain = [i for i, z in enumerate(probes) if z is None]
            parts = [(ix, dict(hessians=[ds[i] for i in ix], probes=[probes[i] for i in ix] if ix is fused else None))
                     for ix in (fused, plain) if ix]
        for ix, extra in parts:
            _core.adahessian_update([params[i] for i in ix], [params[i].grad.detach() for i in ix],
                                    [states[i]["exp_avg"] for i in ix], [states[i]["exp_hessian_diag_sq"] for i in ix],
                                    counts, **kw, **(extra or {}))
        self.count("updated_elements", elements)
