"""Hessian estimates shared by SophiaH, SophiaG and AdaHessian.

Probes are Rademacher vectors drawn from ferrox's Philox stream keyed by
(seed, counter, parameter index): element ``e`` of parameter ``i`` is the sign
of uniform ``e + i·2^40`` of stream ``counter`` of key ``seed``. Nothing comes
from torch's global RNG, so every DDP rank draws the same probes and a resumed
run draws the ones it would have drawn.

Hessian-vector products run in torch (double backward): the closure must have
called ``loss.backward(create_graph=True)``, so each ``p.grad`` carries its
graph.

Under ``torch.distributed`` (an initialised process group with more than one
rank) the per-rank estimates are averaged in one all-reduce per refresh (Hz
for Hutchinson, ĝ for Gauss–Newton–Bartlett, whose B becomes the global row
count), so every rank keeps the same Hessian state. The first-order gradient
must already be the global mean (DDP, or an all-reduce in the closure).
"""

from __future__ import annotations

import torch

from .. import _core, philox

#: Elements reserved per parameter in a probe stream (parameter i starts at i·2^40).
PARAM_STRIDE = 1 << 40


_DIRECT = (torch.float32, torch.float16, torch.bfloat16)


def rademacher(shape, *, seed: int, counter: int, index: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """±1 probe for parameter ``index`` at probe draw ``counter``."""
    return probes([(tuple(shape), dtype, torch.device(device), index)], seed=seed, counter=counter)[0]


def probes(specs, *, seed: int, counter: int):
    """The ±1 probes of several parameters, ``specs`` = [(shape, dtype,
    device, index)]. CPU float probes of one dtype are written in one Rust
    call straight from the Philox bits (the sign bit decides ``u < 0.5``);
    other devices and dtypes go through ``philox.uniform``. Same values
    either way."""
    out = [None] * len(specs)
    direct = {}
    for k, (shape, dtype, device, index) in enumerate(specs):
        if device.type == "cpu" and dtype in _DIRECT:
            out[k] = torch.empty(shape, dtype=dtype)
            direct.setdefault(dtype, []).append(k)
        else:
            u = philox.uniform(tuple(shape), seed=seed, stream=counter, offset=index * PARAM_STRIDE, device=device)
            out[k] = torch.where(u < 0.5, 1.0, -1.0).to(dtype)
    for ks in direct.values():
        _core.optim_rademacher([out[k] for k in ks], seed, counter, [specs[k][3] * PARAM_STRIDE for k in ks])
    return out


def uniforms(n: int, *, seed: int, counter: int, device="cpu") -> torch.Tensor:
    """``n`` uniforms of the label stream (Sophia-G's sampled labels); it sits
    at the top of the probe stream, past any parameter's range."""
    return philox.uniform((n,), seed=seed, stream=counter, offset=(1 << 63), device=device)


def world_size() -> int:
    """Ranks of the default process group (1 when torch.distributed is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_ranks(tensors):
    """``tensors`` averaged over the ranks of the default group (one
    all-reduce of their concatenation); unchanged on a single rank."""
    w = world_size()
    if w == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= w
    return [c.view_as(t).to(t.dtype) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _graph_grads(params):
    grads = [p.grad for p in params]
    if not any(g is not None and g.requires_grad for g in grads):
        raise RuntimeError("the Hessian estimate needs the gradient's graph: the closure must call "
                           "loss.backward(create_graph=True)")
    return grads


def hutchinson(params, indices, *, seed: int, counter: int):
    """``(zs, hzs)``: Rademacher probes z and Hessian-vector products Hz for
    ``params`` (their ``.grad`` built with ``create_graph=True``); E[z ⊙ Hz]
    is the Hessian diagonal. A parameter the gradient does not depend on gets
    Hz = 0."""
    grads = _graph_grads(params)
    zs = probes([(p.shape, p.dtype, p.device, i) for p, i in zip(params, indices)], seed=seed, counter=counter)
    pairs = [(g, p, z) for g, p, z in zip(grads, params, zs) if g is not None and g.requires_grad]
    hz = torch.autograd.grad([g for g, _, _ in pairs], [p for _, p, _ in pairs],
                             grad_outputs=[z for _, _, z in pairs], allow_unused=True)
    by_id = {id(p): h for (_, p, _), h in zip(pairs, hz)}
    hzs = [by_id.get(id(p)) for p in params]
    hzs = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hzs)]
    return zs, mean_across_ranks(hzs)


def gauss_newton_bartlett(params, logits: torch.Tensor, *, seed: int, counter: int):
    """``(ĝ, B)``: the gradient of the mean cross-entropy of labels sampled
    from softmax(logits) (one per row of ``logits.reshape(-1, C)``), and B,
    the number of rows; B·ĝ⊙ĝ is Sophia-G's Hessian estimate. ``logits`` must
    still have its graph."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.requires_grad:
        raise ValueError("SophiaG: the closure must return (loss, logits) with logits [..., classes] "
                         "still attached to the graph")
    flat = logits.reshape(-1, logits.shape[-1])
    b = flat.shape[0]
    with torch.no_grad():
        cdf = torch.softmax(flat.float(), dim=-1).cumsum(-1)
        u = uniforms(b, seed=seed, counter=counter, device=flat.device)
        labels = (cdf < u[:, None]).sum(-1).clamp_(max=flat.shape[-1] - 1)
    loss = torch.nn.functional.cross_entropy(flat.float(), labels)
    try:
        gs = torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError as e:
        raise RuntimeError("SophiaG: the graph of the closure's logits was freed; on Hessian steps the closure "
                           "must keep it (loss.backward(create_graph=True) or retain_graph=True)") from e
    gs = [torch.zeros_like(p) if g is None else g.detach().to(p.dtype) for p, g in zip(params, gs)]
    return mean_across_ranks(gs), b * world_size()


def spatial_average(d: torch.Tensor) -> torch.Tensor:
    """AdaHessian's block averaging: a 4-D conv kernel's estimate is averaged
    over its spatial dims (each k×k block shares one value); other tensors
    are returned as they are."""
    if d.dim() == 4:
        return d.mean(dim=(2, 3), keepdim=True).expand_as(d).contiguous()
    return d


class HessianOptimizer:
    """Mixin of SophiaH/SophiaG/AdaHessian over ``_base.Optimizer``: the
    group walk, f32 state, the device counts tensor and the stats derived
    from it. Subclasses define ``_update_group``."""

    STAT_NAMES = ("steps", "skipped_steps", "hessian_updates", "updated_elements", "refreshed_elements")
    #: the two f32 state tensors of every parameter
    STATE_KEYS: tuple = ()

    def _indexed(self):
        """[(group, [(param index, param)])] over params with a gradient;
        the index (the probe key) counts every param of every group."""
        out, k = [], 0
        for group in self.param_groups:
            items = []
            for p in group["params"]:
                if p.grad is not None:
                    items.append((k, p))
                k += 1
            out.append((group, items))
        return out

    def _state_of(self, p):
        st = self.state[p]
        if not st:
            for key in self.STATE_KEYS:
                st[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    def _counts(self, device) -> torch.Tensor:
        c = self.global_state.get("counts")
        if c is None:
            c = torch.zeros(2, dtype=torch.int64, device=device)
        elif c.device != torch.device(device):
            c = c.to(device)
        self.global_state["counts"] = c
        return c

    @staticmethod
    def _release_graph(params):
        # The create_graph gradients hold the whole double-backward graph.
        for p in params:
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()

    @property
    def stats(self) -> dict:
        s = super().stats
        c = self.global_state.get("counts")
        clipped, positive = (0, 0) if c is None else (int(v) for v in c.tolist())
        s["clipped_elements"] = float(clipped)
        s["positive_hessian_elements"] = float(positive)
        s["clip_rate"] = clipped / s["updated_elements"] if s["updated_elements"] else 0.0
        s["hessian_positivity"] = positive / s["refreshed_elements"] if s["refreshed_elements"] else 0.0
        return s
