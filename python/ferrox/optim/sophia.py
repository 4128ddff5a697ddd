"""Sophia (Liu et al. 2023): clipped, diagonally preconditioned momentum.

Per element, with a Hessian-diagonal EMA h refreshed every ``update_period``
steps (the first step included)::

    θ ← θ·(1 − lr·λ)                       (decoupled weight decay)
    m ← β1·m + (1 − β1)·g
    h ← β2·h + (1 − β2)·ĥ                  (refresh steps only)
    θ ← θ − lr·clip(m / max(ρ·h, ε), 1)    (so |Δθ| ≤ lr per element)

This is the paper's parametrisation (its γ is ``rho``; the official code's
``rho·bs`` becomes ``rho`` here, with Sophia-G's batch factor B inside ĥ).
Defaults: the paper's β = (0.965, 0.99), ρ = 0.04, k = 10, λ = 0.1.

* ``SophiaH``: ĥ = z ⊙ Hz with Rademacher z (Hutchinson; the paper's Sophia-H
  draws Gaussian u, Rademacher has the same mean and a lower variance). The
  closure zeroes grads, computes the loss and calls
  ``loss.backward(create_graph=True)`` — the convention shared with
  ``AdaHessian``.
* ``SophiaG``: ĥ = B·ĝ ⊙ ĝ, ĝ the gradient of the mean cross-entropy of labels
  sampled from the model's own softmax (Gauss–Newton–Bartlett). The closure
  returns ``(loss, logits)`` (logits ``[..., classes]``, B = their rows) and
  calls ``loss.backward(...)`` keeping the graph on refresh steps
  (``create_graph=True`` as for SophiaH, or ``retain_graph=True``).

The elementwise update is one fused Rust (CPU) / CUDA call per parameter
group (``ferrox._core.sophia_update``). ``stats`` adds ``clip_rate`` (share of
updated elements whose ratio was clipped) and ``hessian_positivity`` (share of
refreshed h entries > 0).
"""

from __future__ import annotations

import torch

from .. import _core
from ..cuda import stream_of
from . import _hessian
from ._base import Optimizer, all_finite, check_betas, check_float, check_int


class _Sophia(_hessian.HessianOptimizer, Optimizer):
    STATE_KEYS = ("exp_avg", "hessian_moment")

    def __init__(self, params, lr, betas, rho, weight_decay, eps, update_period, seed, nonfinite):
        check_float("lr", lr, lo=0.0)
        betas = check_betas("betas", betas)
        check_float("rho", rho, lo=0.0, lo_open=True)
        check_float("weight_decay", weight_decay, lo=0.0)
        check_float("eps", eps, lo=0.0, lo_open=True)
        self.update_period = check_int("update_period", update_period, lo=1, hi=2**31)
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults, nonfinite=nonfinite, seed=seed)

    def _estimate(self, params, indices, extra):
        """[(x, y)] per param and the scale: ĥ = scale·x·y."""
        raise NotImplementedError

    def _closure(self, closure):
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step: a closure is required (it computes the Hessian estimate)")
        with torch.enable_grad():
            return closure()

    def step(self, closure=None):
        out = self._closure(closure)
        loss, extra = out if isinstance(out, tuple) else (out, None)
        groups = self._indexed()
        params = [p for _, items in groups for _, p in items]
        try:
            if not self.finite_or_skip(params):
                return loss
            # A skipped step leaves the counters too: the run resumes as if it never happened.
            refresh = self.step_count % self.update_period == 0
            estimate = None
            if refresh:
                counter = self.probe_counter
                estimate = self._estimate(params, [k for _, items in groups for k, _ in items], extra, counter)
                # x is a ±1 probe (SophiaH) or y itself (SophiaG): checking y covers x·y.
                if not self._finite_estimate(estimate[1]):
                    return loss
                self.next_probe_counter()
            self.advance_step()
            offset = 0
            for group, items in groups:
                if items:
                    self._update_group(group, [p for _, p in items], estimate, offset, len(items))
                offset += len(items)
            self.count("steps")
            if refresh:
                self.count("hessian_updates")
            return loss
        finally:
            self._release_graph(params)

    def _finite_estimate(self, ys) -> bool:
        if all_finite(ys):
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{type(self).__name__}: non-finite Hessian estimate; parameters and state left unchanged")
        self.count("skipped_steps")
        return False

    def _update_group(self, group, params, estimate, offset, n):
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        states = [self._state_of(p) for p in params]
        kw = dict(lr=lr, beta1=beta1, rho=group["rho"], eps=group["eps"], decay=1.0 - lr * wd,
                  stream=stream_of(params[0]))
        elements = sum(p.numel() for p in params)
        if estimate is not None:
            xs, ys, scale = estimate
            kw.update(probe_x=xs[offset:offset + n], probe_y=ys[offset:offset + n], beta2=beta2, scale=scale)
            self.count("refreshed_elements", elements)
        _core.sophia_update(params, [p.grad.detach() for p in params], [s["exp_avg"] for s in states],
                            [s["hessian_moment"] for s in states], self._counts(params[0].device), **kw)
        self.count("updated_elements", elements)


class SophiaH(_Sophia):
    """Sophia with the Hutchinson estimator (see the module docstring).

    ``step(closure)``: the closure zeroes grads, computes the loss and calls
    ``loss.backward(create_graph=True)``; it returns the loss.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, eps: float = 1e-12, update_period: int = 10, *,
                 seed: int = 0, nonfinite: str = "skip"):
        super().__init__(params, lr, betas, rho, weight_decay, eps, update_period, seed, nonfinite)

    def _estimate(self, params, indices, extra, counter):
        zs, hzs = _hessian.hutchinson(params, indices, seed=self.probe_seed, counter=counter)
        return zs, hzs, 1.0


class SophiaG(_Sophia):
    """Sophia with the Gauss–Newton–Bartlett estimator (see the module docstring).

    ``step(closure)``: the closure zeroes grads, computes ``logits`` and the
    loss, calls ``loss.backward(create_graph=True)`` (or
    ``retain_graph=True``) and returns ``(loss, logits)``.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 0.1, eps: float = 1e-12, update_period: int = 10, *,
                 seed: int = 0, nonfinite: str = "skip"):
        super().__init__(params, lr, betas, rho, weight_decay, eps, update_period, seed, nonfinite)

    def _estimate(self, params, indices, extra, counter):
        if extra is None:
            raise ValueError("SophiaG: the closure must return (loss, logits)")
        gs, b = _hessian.gauss_newton_bartlett(params, extra, seed=self.probe_seed, counter=counter)
        return gs, gs, float(b)
