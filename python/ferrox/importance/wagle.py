"""WAGLE weight attribution for unlearning (Jia et al., "WAGLE: Strategic
Weight Attribution for Effective and Modular Unlearning in Large Language
Models", 2024).

Unlearning is a bilevel problem: forget (upper level) while the retain loss
stays at its optimum under the weight change (lower level). With the
retain Hessian approximated by ``γ·I``, the implicit gradient gives every
weight the score

    s = |(θ − ∇ℓ_retain / γ) ⊙ ∇ℓ_forget|,

and as ``γ → ∞`` it is SNIP's ``|θ ⊙ ∇ℓ_forget|`` (with ``gamma=math.inf``
the two are bit-identical here). The weights with the largest scores, ranked
globally over all tensors (:func:`global_topk_mask`, an exact multi-tensor
k-th largest in the Rust core), are the only ones the unlearning loss may
change (:func:`masked_unlearn`): a modular unlearning step whose other
weights stay bit-identical.
"""

import math

import torch

from .. import _core

__all__ = ["loss_gradients", "wagle_scores", "global_topk_mask", "masked_unlearn"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def loss_gradients(model, loss_fn, batches, params=None):
    """``{name: Σ_batches ∇ loss_fn(model, batch)}`` (float32, detached) for
    the parameters ``params`` (names; None: every parameter that requires
    grad). The gradients WAGLE needs are these sums over the forget and
    the retain data."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    for n in names:
        if n not in named:
            raise ValueError(f"params: {n!r} is not a parameter of the model")
    total = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}
    seen = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(model, batch), [named[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                total[n] += g.detach().float()
        seen += 1
    if not seen:
        raise ValueError("batches: no batch given")
    return total


def wagle_scores(params, retain_grads, forget_grads, gamma):
    """``{name: |(θ − g_retain/γ) ⊙ g_forget|}`` (float32) for every name of
    ``forget_grads``; ``params`` is a model (its named parameters) or a dict
    of tensors. ``gamma`` > 0; ``math.inf`` gives SNIP's ``|θ ⊙ g_forget|``
    exactly (``retain_grads`` is then not read and may be None)."""
    if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0):
        raise ValueError(f"gamma: expected a number > 0 (math.inf for SNIP), got {gamma!r}")
    theta = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else dict(params)
    snip = math.isinf(gamma)
    out = {}
    for name, g_f in forget_grads.items():
        if name not in theta:
            raise ValueError(f"params: no parameter {name!r} (named in forget_grads)")
        t = theta[name].detach().float()
        if g_f.shape != t.shape:
            raise ValueError(f"forget_grads[{name!r}]: shape {list(g_f.shape)} does not match the parameter's {list(t.shape)}")
        if not snip:
            if retain_grads is None or name not in retain_grads:
                raise ValueError(f"retain_grads: no gradient for {name!r}")
            g_r = retain_grads[name]
            if g_r.shape != t.shape:
                raise ValueError(f"retain_grads[{name!r}]: shape {list(g_r.shape)} does not match the parameter's {list(t.shape)}")
            t = t - g_r.detach().float().to(t.device) / gamma
        out[name] = (t * g_f.detach().float().to(t.device)).abs()
    return out


def global_topk_mask(scores, density):
    """One mask over all tensors: ``{name: bool tensor}`` with True on the
    ``round(density × total)`` largest scores of the whole dict (round half
    up: ``floor(density × total + 0.5)``), exactly that many. Scores are
    ranked by |score| as the flattened tensors concatenated in the dict's
    order; equal scores go to the earlier tensor, then to the lower index
    (the tie rule of ``ferrox.select``), so the mask is deterministic.
    float32/float16/bfloat16; tensors of mixed dtypes are compared in
    float32 (exact for all three), float64 is rounded to float32 first.
    NaN is a ``ValueError``. Masks come back on each score's device."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores: expected a non-empty dict of tensors")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density: expected a number in [0, 1], got {density!r}")
    names = list(scores)
    for n in names:
        s = scores[n]
        if not isinstance(s, torch.Tensor) or not (s.dtype in _FLOATS or s.dtype == torch.float64):
            raise TypeError(f"scores[{n!r}]: expected a float tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    dtypes = {scores[n].dtype for n in names}
    common = dtypes.pop() if len(dtypes) == 1 and torch.float64 not in dtypes else torch.float32
    # Flat views: the ranking is over flattened tensors anyway, and an empty
    # tensor of shape [0, n] has strides the tensor bridge calls strided.
    xs = [scores[n].detach().to("cpu", common).reshape(-1).contiguous() for n in names]
    total = sum(x.numel() for x in xs)
    k = math.floor(density * total + 0.5)
    outs = [torch.empty(x.numel(), dtype=torch.bool) for x in xs]
    try:
        _core.global_top_mask(xs, k, outs)
    except ValueError as e:
        # The core names tensors by position; say which score it was.
        msg = str(e)
        for i, n in enumerate(names):
            msg = msg.replace(f"x[{i}]", f"scores[{n!r}]")
        raise ValueError(msg) from None
    return {n: o.reshape(scores[n].shape).to(scores[n].device) for n, o in zip(names, outs)}


def masked_unlearn(model, masks, loss_fn, batches, steps, optimizer=None, lr=1e-3, stop=None):
    """Minimise ``loss_fn(model, batch)`` (any unlearning loss: gradient
    difference, NPO, ...) for ``steps`` steps, cycling over ``batches``,
    changing only the weights where ``masks`` is True. Gradient hooks zero
    the other entries' gradients, so optimizer states there stay zero; the
    unmasked values are also restored after every step, so they stay
    bit-identical whatever the optimizer does (weight decay included), at
    the cost of one copy of the masked tensors. Parameters not named in
    ``masks`` are not optimized. ``optimizer``: ``fn(params) -> Optimizer``
    (default SGD with ``lr``). ``stop``: ``fn(model, step) -> bool`` called
    after every step (1-based); True ends the run early (e.g. once the
    forget accuracy reached a target). Returns the losses."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    named = dict(model.named_parameters())
    params = []
    for n, m in masks.items():
        if n not in named:
            raise ValueError(f"masks: {n!r} is not a parameter of the model")
        p = named[n]
        if m.dtype != torch.bool or m.shape != p.shape:
            raise ValueError(f"masks[{n!r}]: expected a bool tensor of shape {list(p.shape)}, got {m.dtype} {list(m.shape)}")
        params.append((p, m.to(p.device)))
    batches = list(batches)
    if steps and not batches:
        raise ValueError("batches: no batch given")
    opt = optimizer([p for p, _ in params]) if optimizer is not None else torch.optim.SGD([p for p, _ in params], lr=lr)
    handles = [p.register_hook(lambda g, m=m: g.masked_fill(~m, 0)) for p, m in params]
    keep = [p.detach().clone() for p, _ in params]
    losses = []
    try:
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batches[step % len(batches)])
            loss.backward()
            opt.step()
            with torch.no_grad():
                for (p, m), k in zip(params, keep):
                    p.copy_(torch.where(m, p, k))
            losses.append(float(loss.detach()))
            if stop is not None and stop(model, step + 1):
                break
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return losses
